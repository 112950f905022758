//! Many seeds in parallel threads: a progress line while they run, and the failures at the end.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::kernel_level::{run_seed, Report, RunOptions};
use crate::oracle::Failure;
use crate::oracle::Verdict;

#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub seeds: Range<u64>,
    pub jobs: usize,
    pub run: RunOptions,
    /// Run every seed twice and fail it if the two trace hashes differ.
    pub determinism: bool,
    /// Print a progress line on stderr.
    pub progress: bool,
    /// Stop handing out seeds after the first failure.
    pub stop_at_first_failure: bool,
}

/// A failing seed.
#[derive(Clone, Debug)]
pub struct SweepFailure {
    pub seed: u64,
    pub failure: Failure,
    pub workload: &'static str,
    pub replay: String,
}

#[derive(Clone, Debug, Default)]
pub struct SweepResult {
    pub seeds_run: u64,
    pub refused_correctly: u64,
    pub failures: Vec<SweepFailure>,
    pub wall: Duration,
    /// Summed over seeds: the virtual time simulated and the wall time it took (one thread each).
    pub virtual_ms: u64,
    pub seed_wall: Duration,
    /// Seeds whose source made watermarks per split (`W2-idle`, `W3-idle`); of those, seeds in
    /// which a source subtask went idle and seeds in which alignment paused a split.
    pub split_watermark_seeds: u64,
    pub seeds_with_idle_sources: u64,
    pub seeds_with_paused_splits: u64,
    /// Seeds of W5 (windows on processing time, judged by per-key totals).
    pub processing_time_window_seeds: u64,
}

impl SweepResult {
    /// Seeds per minute of one core: seeds over the wall time their threads spent on them.
    pub fn seeds_per_minute_per_core(&self) -> f64 {
        self.seeds_run as f64 * 60.0 / self.seed_wall.as_secs_f64().max(1e-9)
    }

    pub fn virtual_seconds_per_wall_second(&self) -> f64 {
        self.virtual_ms as f64 / 1000.0 / self.seed_wall.as_secs_f64().max(1e-9)
    }
}

/// Judges one seed, twice if asked, comparing the trace hashes.
pub fn run_checked(seed: u64, options: &SweepOptions) -> Report {
    let mut report = run_seed(seed, &options.run);
    if options.determinism && !report.verdict.is_failure() {
        let again = run_seed(seed, &options.run);
        report.wall += again.wall;
        if again.trace_hash != report.trace_hash {
            report.verdict = Verdict::Failed(Failure {
                check: "determinism".into(),
                detail: format!("trace hash {:016x}, then {:016x}", report.trace_hash, again.trace_hash),
            });
        }
    }
    report
}

pub fn sweep(options: &SweepOptions) -> SweepResult {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(options.seeds.start));
    let stop = Arc::new(AtomicU64::new(u64::MAX));
    let (sender, receiver) = mpsc::channel::<Report>();
    let jobs = options.jobs.max(1);
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, stop, sender, options) = (next.clone(), stop.clone(), sender.clone(), options.clone());
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= options.seeds.end || seed > stop.load(Ordering::Relaxed) {
                    break;
                }
                let report = run_checked(seed, &options);
                if report.verdict.is_failure() && options.stop_at_first_failure {
                    stop.fetch_min(seed, Ordering::Relaxed);
                }
                if sender.send(report).is_err() {
                    break;
                }
            })
        })
        .collect();
    drop(sender);
    let total = options.seeds.end.saturating_sub(options.seeds.start);
    let mut result = SweepResult::default();
    for report in receiver {
        result.seeds_run += 1;
        result.virtual_ms += report.stats.virtual_ms;
        result.seed_wall += report.wall;
        if matches!(report.scenario.workload.name(), "W2-idle" | "W3-idle") {
            result.split_watermark_seeds += 1;
            result.seeds_with_idle_sources += u64::from(report.stats.source_idle_count > 0);
            result.seeds_with_paused_splits += u64::from(report.stats.source_paused_count > 0);
        }
        result.processing_time_window_seeds += u64::from(report.scenario.workload.totals().is_some());
        match &report.verdict {
            Verdict::ExactlyOnce => {}
            Verdict::RefusedCorrectly { .. } => result.refused_correctly += 1,
            Verdict::Failed(failure) => result.failures.push(SweepFailure {
                seed: report.seed,
                failure: failure.clone(),
                workload: report.scenario.workload.name(),
                replay: options.run.replay_command(report.seed),
            }),
        }
        if options.progress {
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            eprint!(
                "\r[{}/{}] {} failed, {} refused correctly, {:.0} seeds/min   ",
                result.seeds_run,
                total,
                result.failures.len(),
                result.refused_correctly,
                result.seeds_run as f64 * 60.0 / elapsed
            );
        }
    }
    if options.progress {
        eprintln!();
    }
    for worker in workers {
        worker.join().expect("sweep workers catch the panics of their seeds");
    }
    result.failures.sort_by_key(|f| f.seed);
    result.wall = started.elapsed();
    result
}

impl SweepResult {
    /// The table of failures, one line each with the command that replays it.
    pub fn failure_table(&self) -> String {
        let mut out = String::new();
        if self.failures.is_empty() {
            return out;
        }
        out.push_str(&format!("{:>8}  {:<16}  {:<40}  detail\n", "seed", "workload", "check"));
        for failure in &self.failures {
            let detail: String = failure.failure.detail.chars().take(160).collect();
            out.push_str(&format!(
                "{:>8}  {:<16}  {:<40}  {}\n          replay: {}\n",
                failure.seed, failure.workload, failure.failure.check, detail, failure.replay
            ));
        }
        out
    }
}
