//! The kernel level of the simulator: one seed run on the single-threaded cluster harness
//! (`sabot_kernel::testing::cluster`), judged by the oracle.
//!
//! A seed gives a [`Scenario`]; the job first runs fault-free on `run_in_memory` (the reference:
//! no checkpoints, another code path), then with the scenario's faults on the harness; the oracle
//! compares. Each run also keeps one checkpoint's durable state as a power loss right after it
//! completed would have left it, and restarts from it without faults: that restart must commit
//! exactly the reference too (every completed checkpoint is a consistent cut).
//!
//! W5 (windows on processing time) commits rows that depend on timing: its runs, the reference
//! and the restarts from a cut included, are held to the per-key totals of its input instead
//! ([`oracle::Expected::Totals`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use sabot_kernel::env::fault_storage::{FaultDisk, FaultStorage};
use sabot_kernel::testing::cluster::{self, ClusterStats, FaultEvent, ProtocolEvent};
use sabot_kernel::testing::planted::{Planted, PlantedBug};
use sabot_kernel::testing::run_in_memory;

use crate::oracle::{self, Expected, Failure, Row, Verdict};
use crate::swarm::{Scenario, SwarmLimits};

/// What to run for each seed.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub limits: SwarmLimits,
    /// Replaces the scenario's record count (to measure speed on bigger inputs).
    pub record_count: Option<u64>,
    pub planted: Vec<PlantedBug>,
    /// Keep the event trace as text.
    pub trace: bool,
}

impl RunOptions {
    /// The command that replays `seed` with these options.
    pub fn replay_command(&self, seed: u64) -> String {
        let mut command = format!("cargo run --release -p sabot-sim -- run --seed {seed}");
        for bug in &self.planted {
            command.push_str(&format!(" --planted {}", bug.name()));
        }
        if let Some(records) = self.record_count {
            command.push_str(&format!(" --records {records}"));
        }
        if self.limits.record_count_max != SwarmLimits::default().record_count_max {
            command.push_str(&format!(" --records-max {}", self.limits.record_count_max));
        }
        command
    }
}

/// What one seed did.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    pub scenario: Scenario,
    pub verdict: Verdict,
    pub stats: ClusterStats,
    pub trace_hash: u64,
    pub trace: Vec<String>,
    /// The checkpoint protocol's events (with `trace`), for the TLA+ trace validation.
    pub protocol: Vec<ProtocolEvent>,
    /// The job's subtasks: every one acknowledges each checkpoint.
    pub task_count: usize,
    /// Disk faults injected, by kind.
    pub disk_faults: BTreeMap<&'static str, u64>,
    pub plan_faults: Vec<(u64, FaultEvent)>,
    /// Checkpoints whose cut was restarted from and checked.
    pub cuts_checked: Vec<u64>,
    pub reference_rows: usize,
    pub wall: Duration,
}

thread_local! {
    /// The message and place of the last panic on this thread, while a seed runs.
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static CAPTURING: RefCell<bool> = const { RefCell::new(false) };
}

/// Installs (once) a panic hook that, on threads running seeds, records the panic for the report
/// instead of printing it; elsewhere it prints as before.
fn capture_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(|c| *c.borrow()) {
                PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into an `Err` with its message and place.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    capture_panics();
    CAPTURING.with(|c| *c.borrow_mut() = true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CAPTURING.with(|c| *c.borrow_mut() = false);
    result.map_err(|_| PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "a panic".into()))
}

fn failure(check: &str, detail: String) -> Verdict {
    Verdict::Failed(Failure { check: check.to_string(), detail })
}

/// What the scenario's committed output must be, and how many rows the reference committed: the
/// reference's rows, or for W5 the totals of its input (which the reference must meet too).
fn expected(scenario: &Scenario) -> Result<(Expected, usize), String> {
    let rows = reference(scenario)?;
    let count = rows.len();
    let Some(totals) = scenario.workload.totals() else { return Ok((Expected::Rows(rows), count)) };
    let expected = Expected::Totals(totals);
    let mismatch = oracle::compare(&expected, &rows)?;
    if mismatch != oracle::Mismatch::default() {
        return Err(format!("the fault-free run missed its per-key totals: {mismatch:?}"));
    }
    Ok((expected, count))
}

/// The reference output of the scenario's job: a fault-free run without checkpoints.
fn reference(scenario: &Scenario) -> Result<Vec<Row>, String> {
    let plan = scenario.workload.plan(scenario.node_count);
    let sinks = plan.graph.file_sinks();
    let result = catch(|| run_in_memory(plan)).map_err(|p| format!("reference run panicked: {p}"))?;
    let mut run = result.map_err(|e| format!("reference run failed: {e}"))?;
    let mut batches = Vec::new();
    for sink in &sinks {
        batches.extend(run.committed(sink).map_err(|e| e.to_string())?);
    }
    oracle::rows_of(&batches)
}

/// Runs one seed and judges it.
pub fn run_seed(seed: u64, options: &RunOptions) -> Report {
    let limits = SwarmLimits { record_count: options.record_count, ..options.limits };
    run_scenario(Scenario::from_seed(seed, limits), options)
}

/// Runs one scenario (drawn from a seed, or built by hand or by the `cluster` fuzz target) and
/// judges it, with its restarts from sampled checkpoints.
pub fn run_scenario(scenario: Scenario, options: &RunOptions) -> Report {
    let started = Instant::now();
    let seed = scenario.seed;
    let mut report = Report {
        seed,
        scenario: scenario.clone(),
        verdict: Verdict::ExactlyOnce,
        stats: ClusterStats::default(),
        trace_hash: 0,
        trace: Vec::new(),
        protocol: Vec::new(),
        task_count: 0,
        disk_faults: BTreeMap::new(),
        plan_faults: Vec::new(),
        cuts_checked: Vec::new(),
        reference_rows: 0,
        wall: Duration::ZERO,
    };
    // The reference runs without planted bugs: it is the kernel as written, without checkpoints.
    let (expected, reference_rows) = match expected(&scenario) {
        Ok(expected) => expected,
        Err(error) => {
            report.verdict = failure("reference run", error);
            report.wall = started.elapsed();
            return report;
        }
    };
    report.reference_rows = reference_rows;
    let _planted = Planted::new(&options.planted);
    let config = scenario.cluster_config(options.trace);
    let run = match catch(|| cluster::run(&config, FaultStorage::new(FaultDisk::new(seed)))) {
        Ok(run) => run,
        Err(panic) => {
            report.verdict = failure("no panic", panic);
            report.wall = started.elapsed();
            return report;
        }
    };
    report.stats = run.stats;
    report.trace_hash = run.trace_hash;
    for fault in &run.disk_faults {
        *report.disk_faults.entry(fault.kind()).or_default() += 1;
    }
    report.plan_faults = run.plan_faults.clone();
    report.verdict = oracle::judge(&run, &expected);
    report.trace = run.trace;
    report.protocol = run.protocol;
    report.task_count = config.plan.graph.subtasks().count();
    if !report.verdict.is_failure() {
        let cuts = check_cuts(
            &scenario,
            run.cut_samples,
            run.durable_damage,
            &expected,
            &mut report.cuts_checked,
            &mut report.trace,
            options.trace,
        );
        if cuts.is_failure() {
            report.verdict = cuts;
        }
    }
    report.wall = started.elapsed();
    report
}

/// Restarts from each sampled checkpoint's durable state without faults: the output must be
/// exactly what is expected (or, after durable damage, a correct refusal).
fn check_cuts(
    scenario: &Scenario,
    samples: Vec<(sabot_kernel::element::CheckpointId, FaultDisk)>,
    durable_damage: bool,
    expected: &Expected,
    checked: &mut Vec<u64>,
    trace: &mut Vec<String>,
    keep_trace: bool,
) -> Verdict {
    let config = scenario.without_faults().cluster_config(keep_trace);
    for (checkpoint, disk) in samples {
        checked.push(checkpoint.0);
        let run = match catch(|| cluster::run(&config, FaultStorage::new(disk))) {
            Ok(run) => run,
            Err(panic) => {
                return failure("consistent cut", format!("restart from checkpoint {} panicked: {panic}", checkpoint.0))
            }
        };
        trace.extend(run.trace.iter().map(|line| format!("cut {}: {line}", checkpoint.0)));
        match oracle::judge(&run, expected) {
            Verdict::ExactlyOnce => {}
            Verdict::RefusedCorrectly { .. } => {}
            Verdict::Failed(Failure { check, detail }) if check == "refuses only after durable damage" && durable_damage => {
                let _ = detail;
            }
            Verdict::Failed(Failure { check, detail }) => {
                return failure(
                    "consistent cut",
                    format!("a restart from checkpoint {} (as a power loss right after it completed would leave the disk) failed {check}: {detail}", checkpoint.0),
                )
            }
        }
    }
    Verdict::ExactlyOnce
}

impl Report {
    /// A readable summary: the world, the faults injected, the checks passed, the verdict.
    pub fn summary(&self, options: &RunOptions) -> String {
        let mut out = String::new();
        let s = &self.stats;
        out.push_str(&format!("seed {} ({} ms wall)\n", self.seed, self.wall.as_millis()));
        out.push_str(&self.scenario.to_string());
        out.push_str(&format!(
            "run        {} virtual ms, {} ticks, {} node steps, {} elements delivered\n",
            s.virtual_ms, s.ticks, s.node_steps, s.elements_delivered
        ));
        out.push_str(&format!(
            "recovery   {} attempts ({} from a checkpoint), {} task failures, {} restart failures\n",
            s.attempts, s.restored_from_checkpoint, s.task_failures, s.restart_failures
        ));
        out.push_str(&format!(
            "checkpoints {} completed, {} aborted, {} acknowledgements with in-flight data\n",
            s.checkpoints_completed, s.checkpoints_aborted, s.in_flight_acks
        ));
        let planned: Vec<String> = self.plan_faults.iter().map(|(at, e)| format!("{e:?} at {at} ms")).collect();
        out.push_str(&format!(
            "faults     plan: {}\n",
            if planned.is_empty() { "none".into() } else { planned.join(", ") }
        ));
        out.push_str(&format!("           disk: {:?}\n", self.disk_faults));
        out.push_str(&format!(
            "checks     {} watermarks monotonic, {} commit visibility checks, {} announcements durable, \
             consistent cuts restarted from: {:?}, output vs {} reference rows\n",
            s.watermarks_checked, s.commit_checks, s.announcements_checked, self.cuts_checked, self.reference_rows
        ));
        out.push_str(&format!(
            "watermarks {} times a source went idle, {} reads with splits paused by alignment\n",
            s.source_idle_count, s.source_paused_count
        ));
        out.push_str(&format!("trace hash {:016x}\n", self.trace_hash));
        match &self.verdict {
            Verdict::ExactlyOnce => out.push_str("verdict    PASS: exactly once\n"),
            Verdict::RefusedCorrectly { error } => {
                out.push_str(&format!("verdict    PASS: refused to go on after durable damage ({error})\n"))
            }
            Verdict::Failed(Failure { check, detail }) => {
                out.push_str(&format!("verdict    FAIL: {check}: {detail}\n"));
                out.push_str(&format!("replay     {}\n", options.replay_command(self.seed)));
            }
        }
        out
    }
}
