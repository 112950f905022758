//! `sabot-sim`: run one seed, sweep many, or replay one with its full event trace.
//!
//! ```text
//! sabot-sim run    --seed N [options]            one run: a summary of faults injected and checks passed
//! sabot-sim sweep  --seeds A..B [--jobs J] [options] [--determinism] [--stop-at-first-failure]
//! sabot-sim replay --seed N [--trace] [options]  one run with its full event trace
//! sabot-sim trace-tla --seeds A..B | --seed N --out DIR [options]
//!                                                runs with protocol traces, written as DIR/TraceData.tla
//!                                                for tla/Trace.tla (tla/validate-traces.sh)
//! sabot-sim planted                              the planted bugs' names
//! options: --level kernel|madsim  --planted <bug> (repeatable)  --records N  --records-max N
//! ```

use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use sabot_kernel::testing::planted::PlantedBug;
use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::sweep::{run_checked, sweep, SweepOptions};
use sabot_sim::Level;

const USAGE: &str = "usage:
  sabot-sim run    --seed N [options]
  sabot-sim sweep  --seeds A..B [--jobs J] [--determinism] [--stop-at-first-failure] [options]
  sabot-sim replay --seed N [--trace] [options]
  sabot-sim trace-tla --seeds A..B | --seed N --out DIR [options]
  sabot-sim planted
options:
  --level kernel|madsim   which simulator (default kernel; madsim needs a build with
                          RUSTFLAGS=\"--cfg madsim\" and its own CARGO_TARGET_DIR; it takes
                          run, sweep and replay with its own swarm of plans, and no --planted)
  --planted <bug>         switch a planted bug on (repeatable; see `sabot-sim planted`)
  --records N             the workload's record count (default: drawn from the seed)
  --records-max N         the largest record count the swarm draws (default 3000)";

struct Arguments {
    command: String,
    seed: Option<u64>,
    seeds: Option<std::ops::Range<u64>>,
    jobs: usize,
    trace: bool,
    determinism: bool,
    stop_at_first_failure: bool,
    out: Option<std::path::PathBuf>,
    level: Level,
    run: RunOptions,
}

fn value<'a>(iter: &mut impl Iterator<Item = &'a String>, flag: &str) -> Result<&'a String> {
    iter.next().ok_or_else(|| anyhow!("{flag} needs a value"))
}

fn number(text: &str, flag: &str) -> Result<u64> {
    text.replace('_', "").parse().with_context(|| format!("{flag} {text:?} is not a number"))
}

fn parse(args: &[String]) -> Result<Arguments> {
    let command = args.first().ok_or_else(|| anyhow!("no command"))?.clone();
    let mut parsed = Arguments {
        command,
        seed: None,
        seeds: None,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        trace: false,
        determinism: false,
        stop_at_first_failure: false,
        out: None,
        level: Level::Kernel,
        run: RunOptions::default(),
    };
    let mut iter = args[1..].iter();
    while let Some(flag) = iter.next() {
        match flag.as_str() {
            "--seed" => parsed.seed = Some(number(value(&mut iter, flag)?, flag)?),
            "--seeds" => {
                let text = value(&mut iter, flag)?;
                let (start, end) = text.split_once("..").ok_or_else(|| anyhow!("--seeds takes A..B, not {text:?}"))?;
                parsed.seeds = Some(number(start, flag)?..number(end, flag)?);
            }
            "--jobs" => parsed.jobs = number(value(&mut iter, flag)?, flag)?.max(1) as usize,
            "--trace" => parsed.trace = true,
            "--out" => parsed.out = Some(value(&mut iter, flag)?.into()),
            "--determinism" => parsed.determinism = true,
            "--stop-at-first-failure" => parsed.stop_at_first_failure = true,
            "--planted" => {
                let name = value(&mut iter, flag)?;
                let bug = PlantedBug::from_name(name)
                    .ok_or_else(|| anyhow!("no planted bug {name:?}; `sabot-sim planted` lists them"))?;
                parsed.run.planted.push(bug);
            }
            "--records" => parsed.run.record_count = Some(number(value(&mut iter, flag)?, flag)?.max(1)),
            "--records-max" => parsed.run.limits.record_count_max = number(value(&mut iter, flag)?, flag)?.max(8),
            "--level" => {
                parsed.level = Level::from_name(value(&mut iter, flag)?)
                    .ok_or_else(|| anyhow!("--level takes kernel or madsim"))?
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args).and_then(|arguments| execute(&arguments)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("sabot-sim: {error:#}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; `Ok(false)` when a seed failed.
fn execute(arguments: &Arguments) -> Result<bool> {
    if arguments.level == Level::Madsim {
        return madsim(arguments);
    }
    let seed = || arguments.seed.ok_or_else(|| anyhow!("{} needs --seed N", arguments.command));
    match arguments.command.as_str() {
        "run" => {
            let options = SweepOptions {
                seeds: 0..0,
                jobs: 1,
                run: arguments.run.clone(),
                determinism: true,
                progress: false,
                stop_at_first_failure: false,
            };
            let report = run_checked(seed()?, &options);
            print!("{}", report.summary(&arguments.run));
            println!(
                "determinism the seed ran twice with the same trace hash: {}",
                !report.verdict.is_failure()
                    || !matches!(&report.verdict, sabot_sim::oracle::Verdict::Failed(f) if f.check == "determinism")
            );
            Ok(!report.verdict.is_failure())
        }
        "replay" => {
            let run = RunOptions { trace: arguments.trace, ..arguments.run.clone() };
            let report = run_seed(seed()?, &run);
            for line in &report.trace {
                println!("{line}");
            }
            print!("{}", report.summary(&arguments.run));
            Ok(!report.verdict.is_failure())
        }
        "sweep" => {
            let seeds = arguments.seeds.clone().ok_or_else(|| anyhow!("sweep needs --seeds A..B"))?;
            let options = SweepOptions {
                seeds: seeds.clone(),
                jobs: arguments.jobs,
                run: arguments.run.clone(),
                determinism: arguments.determinism,
                progress: true,
                stop_at_first_failure: arguments.stop_at_first_failure,
            };
            let result = sweep(&options);
            let planted: Vec<&str> = arguments.run.planted.iter().map(|b| b.name()).collect();
            println!(
                "seeds {}..{} (planted: {}): {} run, {} failed, {} refused correctly after durable damage",
                seeds.start,
                seeds.end,
                if planted.is_empty() { "none".into() } else { planted.join(", ") },
                result.seeds_run,
                result.failures.len(),
                result.refused_correctly
            );
            println!(
                "speed: {:.1} s wall with {} jobs; {:.0} seeds/min per core; {:.1} virtual s per wall s",
                result.wall.as_secs_f64(),
                arguments.jobs,
                result.seeds_per_minute_per_core(),
                result.virtual_seconds_per_wall_second()
            );
            println!(
                "watermarks in sources: {} seeds, {} with a source gone idle, {} with splits paused by alignment",
                result.split_watermark_seeds, result.seeds_with_idle_sources, result.seeds_with_paused_splits
            );
            println!(
                "windows on processing time (W5, judged by per-key totals): {} seeds",
                result.processing_time_window_seeds
            );
            print!("{}", result.failure_table());
            Ok(result.failures.is_empty())
        }
        "trace-tla" => trace_tla(arguments),
        "planted" => {
            for bug in PlantedBug::ALL {
                println!("{:<28} {bug:?}", bug.name());
            }
            Ok(true)
        }
        other => bail!("unknown command {other:?}"),
    }
}

/// Runs seeds with protocol traces and writes them as `TraceData.tla` for `tla/Trace.tla`.
/// Prints, per seed, what its trace holds and the simulator's verdict (planted bugs fail it).
fn trace_tla(arguments: &Arguments) -> Result<bool> {
    use sabot_sim::trace_tla::{module, TraceCounts};
    let seeds = match (&arguments.seeds, arguments.seed) {
        (Some(seeds), _) => seeds.clone(),
        (None, Some(seed)) => seed..seed + 1,
        (None, None) => bail!("trace-tla needs --seeds A..B or --seed N"),
    };
    let out = arguments.out.clone().ok_or_else(|| anyhow!("trace-tla needs --out DIR"))?;
    let run = RunOptions { trace: true, ..arguments.run.clone() };
    let mut reports = Vec::new();
    let (mut with_crash, mut with_restore) = (0, 0);
    for seed in seeds.clone() {
        let report = run_seed(seed, &run);
        let counts = TraceCounts::of(&report.protocol);
        with_crash += usize::from(counts.crashes > 0);
        with_restore += usize::from(counts.restores > 0);
        let verdict = match &report.verdict {
            sabot_sim::oracle::Verdict::Failed(failure) => format!("simulator FAIL: {}", failure.check),
            _ => "simulator pass".into(),
        };
        println!(
            "seed {seed}: {} events, {} crashes, {} restores from a checkpoint, {} completions, {} commits; {verdict}",
            counts.events, counts.crashes, counts.restores, counts.completions, counts.commits
        );
        reports.push(report);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("TraceData.tla"), module(&reports)).context("writing TraceData.tla")?;
    println!(
        "traces: {} seeds ({}..{}), {with_crash} with a crash, {with_restore} with a restore from a checkpoint; \
         written to {}",
        reports.len(),
        seeds.start,
        seeds.end,
        out.join("TraceData.tla").display()
    );
    Ok(true)
}

/// The madsim level: the real driver on madsim (a `--cfg madsim` build).
#[cfg(madsim)]
fn madsim(arguments: &Arguments) -> Result<bool> {
    use sabot_sim::madsim_level::run;
    if !arguments.run.planted.is_empty() || arguments.run.record_count.is_some() {
        bail!("the madsim level draws its own plan from the seed: no --planted or --records");
    }
    let scratch = std::env::temp_dir().join(format!("sabot-sim-madsim-{}", std::process::id()));
    let seeds = match (arguments.command.as_str(), &arguments.seeds, arguments.seed) {
        ("sweep", Some(seeds), _) => seeds.clone(),
        ("run" | "replay", _, Some(seed)) => seed..seed + 1,
        (command, ..) => bail!("{command} needs --seed N (run, replay) or --seeds A..B (sweep)"),
    };
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for seed in seeds.clone() {
        match run(seed, &scratch) {
            Ok(outcome) => {
                if arguments.trace {
                    outcome.events.iter().for_each(|event| println!("{event}"));
                }
                let plan = &outcome.plan;
                println!(
                    "seed {seed}: {} workers x {} nodes, parallelism {}, {} records, {} fault events injected: \
                     {} rows exactly once, complete at {:.3} s virtual",
                    plan.workers,
                    plan.nodes_per_worker,
                    plan.parallelism,
                    plan.records,
                    outcome.events.len(),
                    outcome.rows,
                    outcome.finished_after.as_secs_f64()
                );
            }
            Err(finding) => {
                println!("seed {seed}: FAILED: {finding}");
                println!("  replay: RUSTFLAGS=\"--cfg madsim\" cargo run -p sabot-sim -- replay --level madsim --seed {seed} --trace");
                failures.push(seed);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "seeds {}..{}: {} failed, {:.1} s wall",
        seeds.start,
        seeds.end,
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(failures.is_empty())
}

#[cfg(not(madsim))]
fn madsim(_: &Arguments) -> Result<bool> {
    bail!(
        "--level madsim runs the real driver on madsim, which needs its own build: \
         RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=<another directory> cargo run -p sabot-sim -- ..."
    )
}
