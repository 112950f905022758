//! The single-threaded cluster harness (DESIGN.md §5, the kernel level): the nodes of a plan,
//! a checkpoint coordinator, an in-memory network and the faulty disk, stepped on a manual clock
//! in one thread, in an order drawn from a seed.
//!
//! # The world it simulates
//! - **Time**: a global virtual clock advances `tick_ms` per iteration. Each node and the
//!   coordinator read it with their own skew, which jumps forward when the fault plan says
//!   (a driver's clock never goes back, as `env::Clock` promises).
//! - **Network**: every channel between nodes is FIFO and bounded (`channel_capacity`); each
//!   element arrives after a seeded delay, and channels and nodes are served in a seeded order.
//!   Control messages (triggers, completions) and acknowledgements travel with delays too, FIFO
//!   per node. A node is stepped in an iteration with a seeded probability (slow nodes).
//! - **Asynchronous work**: snapshot writes and manifest persists finish after seeded delays.
//! - **Failures**: a task's `Err`, a node crash or a power loss (the disk loses what was not
//!   synced) fails the job attempt; the job restarts after a delay from the latest completed
//!   checkpoint, as the real coordinator does (`manifest::find_latest`, then `sweep_before`).
//!   After `heal_at_ms` no fault strikes: the job must then finish within `liveness_ms`, or end
//!   in a clear refusal (the same failure attempt after attempt).
//!
//! # Checks made on the way ([`Violation`])
//! - watermarks never go back on a channel;
//! - no committed sink file is visible before a checkpoint that names it was announced complete
//!   (or restored from);
//! - no checkpoint is announced before its manifest and the pointer naming it are durable;
//! - coordinator inputs fit its state.
//!
//! Consistent cuts are checked by the caller: [`ClusterRun::cut_samples`] holds what a power loss
//! right after a sampled checkpoint completed would have left, to restart from without faults.
//! Every event is hashed into [`ClusterRun::trace_hash`] (and kept as text with `trace`), so two
//! runs of one seed can be compared bit for bit. With `trace`, the run also keeps
//! [`ClusterRun::protocol`]: the checkpoint protocol's events ([`ProtocolEvent`]) as the TLA+
//! trace validation reads them (tla/README.md, "Trace validation").

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use crate::checkpoint::coordinator::{Action, CheckpointKind, Coordinator, CoordinatorConfig};
use crate::checkpoint::manifest::{self, Manifest, TaskSnapshot};
use crate::dataflow::PhysicalPlan;
use crate::element::{BarrierKind, CheckpointId, Element};
use crate::env::fault_storage::{Fault, FaultConfig, FaultDisk, FaultStorage};
use crate::env::{ChannelId, Storage};
use crate::node::{Event, Node, NodeOptions};
use crate::state::testing::Lcg;
use crate::state::{HeapBackend, StateBackend};
use crate::time::{EventTime, Instant};

/// Failed attempts after the heal before the run is a refusal: without faults, a failure
/// repeats because the stored world makes it repeat.
const ATTEMPTS_AFTER_HEAL_MAX: u64 = 3;
/// Consistent-cut samples a run keeps (each costs the caller a run).
const CUT_SAMPLES_MAX: usize = 1;
/// Elements the network delivers in one iteration at most (a bound on the loop).
const DELIVERIES_PER_TICK_MAX: usize = 4096;

/// How the coordinator checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSettings {
    pub interval_ms: u64,
    pub unaligned: bool,
    pub alignment_timeout_ms: Option<u64>,
    pub timeout_ms: u64,
    pub concurrent_max: usize,
    pub retained_count: usize,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        CheckpointSettings {
            interval_ms: 20,
            unaligned: false,
            alignment_timeout_ms: None,
            timeout_ms: 10_000,
            concurrent_max: 1,
            retained_count: 2,
        }
    }
}

/// How the network and the nodes' asynchronous work behave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSettings {
    pub tick_ms: u64,
    pub delay_ms_max: u64,
    pub channel_capacity: usize,
    /// How likely a node is stepped in one iteration, in parts per million.
    pub step_ppm: u32,
    pub write_delay_ms_max: u64,
    pub persist_delay_ms_max: u64,
}

impl Default for NetworkSettings {
    fn default() -> Self {
        NetworkSettings {
            tick_ms: 1,
            delay_ms_max: 0,
            channel_capacity: 8,
            step_ppm: 1_000_000,
            write_delay_ms_max: 0,
            persist_delay_ms_max: 0,
        }
    }
}

/// Something the fault plan does at a moment of virtual time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultEvent {
    /// Every node is lost and the disk loses what was not synced.
    PowerLoss,
    /// One node's process dies: the job fails and restarts (the disk keeps its page cache).
    NodeCrash {
        node: u16,
    },
    DiskFull {
        full: bool,
    },
    /// One bit of one file of the newest completed checkpoint (its manifest or a file it owns)
    /// flipped for good. At most one per plan: the older checkpoint stays intact.
    CorruptNewestCheckpoint,
    /// One bit of the latest-checkpoint pointer flipped for good.
    CorruptPointer,
    /// A clock jumps forward; `node == node_count` is the coordinator's clock.
    ClockJump {
        node: u16,
        ms: u64,
    },
}

/// When which faults strike.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// From here on, nothing strikes.
    pub heal_at_ms: u64,
    /// By time; several at one time happen in the order given.
    pub events: Vec<(u64, FaultEvent)>,
    /// The disk's random faults until the heal.
    pub storage: FaultConfig,
    /// Clock skew of each node and, last, the coordinator.
    pub clock_skew_ms: Vec<u64>,
    pub restart_delay_ms_max: u64,
}

/// One simulated run.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub seed: u64,
    pub plan: Arc<PhysicalPlan>,
    pub checkpoints: CheckpointSettings,
    pub network: NetworkSettings,
    pub faults: FaultPlan,
    /// Keep the trace as text, not only its hash.
    pub trace: bool,
    /// Virtual time after the heal within which the job must finish.
    pub liveness_ms: u64,
}

/// An invariant the run broke: a bug in the kernel (or in the harness).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every node finished and its final output is committed.
    Finished,
    /// After the heal the job failed the same way attempt after attempt: it refuses to go on.
    Refused {
        error: String,
    },
    /// Not finished within the liveness bound after the heal.
    Stuck {
        detail: String,
    },
    Violation(Violation),
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterStats {
    pub ticks: u64,
    pub virtual_ms: u64,
    pub node_steps: u64,
    pub elements_delivered: u64,
    pub attempts: u64,
    pub restored_from_checkpoint: u64,
    pub task_failures: u64,
    pub restart_failures: u64,
    pub node_crashes: u64,
    pub power_losses: u64,
    pub checkpoints_completed: u64,
    pub checkpoints_aborted: u64,
    pub in_flight_acks: u64,
    pub watermarks_checked: u64,
    pub commit_checks: u64,
    pub announcements_checked: u64,
    /// Times a source subtask said `Idle`, and reads of sources with splits paused by
    /// watermark alignment (summed over attempts).
    pub source_idle_count: u64,
    pub source_paused_count: u64,
}

/// A checkpoint-protocol event, abstracted to what the TLA+ trace validation checks
/// (`tla/Trace.tla`): checkpoint ids, task and split numbers, offsets and sink file numbers, never
/// record contents. Tasks are numbered in the order of `JobGraph::subtasks`, splits and sink files
/// in the order the run first names them (so that the numbers stay small).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolEvent {
    /// An attempt starts: recovery chose `restored` (`None`: from scratch) and passed over
    /// `skipped`, and the restore begins.
    Start {
        restored: Option<CheckpointId>,
        skipped: Vec<CheckpointId>,
    },
    /// The attempt's nodes are restored: what the restore committed came before, as `Commit`s.
    Started,
    /// The coordinator triggers a checkpoint.
    Trigger {
        checkpoint: CheckpointId,
    },
    /// The coordinator takes a task's acknowledgement: the source offsets it recorded, as
    /// `(split, position)`, and the sink output its snapshot names for commit.
    Ack {
        checkpoint: CheckpointId,
        task: u32,
        offsets: Vec<(u32, u64)>,
        files: Vec<u32>,
    },
    /// The manifest and the pointer naming it are written and synced.
    Persisted {
        checkpoint: CheckpointId,
    },
    /// Persisting failed part way: the manifest, even the pointer, may or may not be durable.
    PersistFailed {
        checkpoint: CheckpointId,
    },
    /// The coordinator announces completion (`Action::NotifyComplete`).
    Complete {
        checkpoint: CheckpointId,
    },
    Abort {
        checkpoint: CheckpointId,
    },
    /// A sink file became visible (committed).
    Commit {
        file: u32,
    },
    /// The attempt is lost: a node crash, a task's failure, or a power loss (`power`).
    Crash {
        power: bool,
    },
    /// Checkpoint metadata was damaged for good: recovery may rightly pass over a checkpoint.
    Damage,
}

pub struct ClusterRun {
    pub outcome: Outcome,
    pub storage: FaultStorage,
    pub stats: ClusterStats,
    pub trace_hash: u64,
    pub trace: Vec<String>,
    /// The protocol events (kept with `trace`).
    pub protocol: Vec<ProtocolEvent>,
    /// Faults the disk injected.
    pub disk_faults: Vec<Fault>,
    /// Faults of the plan that happened (crashes, corruption, clock jumps), with their time.
    pub plan_faults: Vec<(u64, FaultEvent)>,
    /// Durable damage was done to checkpoint metadata: a refusal to go on may be right.
    pub durable_damage: bool,
    /// What the disk would hold after a power loss right after a checkpoint completed.
    pub cut_samples: Vec<(CheckpointId, FaultDisk)>,
    /// The job's sinks that write files (their committed output is in `output/<name>/`).
    pub file_sinks: Vec<String>,
}

/// FNV-1a over everything written into it: the trace hash, stable across builds and platforms.
struct TraceHasher(u64);

impl fmt::Write for TraceHasher {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Ok(())
    }
}

/// A message to a node from the coordinator.
#[derive(Clone, Copy, Debug)]
enum Control {
    Trigger(CheckpointId, BarrierKind),
    Complete(CheckpointId),
}

/// A running job attempt: everything that dies with it.
struct Attempt {
    nodes: Vec<Node>,
    coordinator: Coordinator,
    /// Per remote channel: elements in flight with the time they arrive.
    channels: BTreeMap<ChannelId, VecDeque<(u64, Element)>>,
    /// Per node: an element polled from its outbox whose channel was full.
    held: Vec<Option<(ChannelId, Element)>>,
    control: Vec<VecDeque<(u64, Control)>>,
    acks: VecDeque<(u64, CheckpointId, TaskSnapshot)>,
    writes: Vec<super::PendingWrites>,
    persists: VecDeque<(u64, Manifest)>,
    /// Checkpoints the coordinator aborted: a persist still queued for one is dropped, as the
    /// driver's would be (persisting it would move the pointer back past a newer checkpoint).
    aborted: BTreeSet<CheckpointId>,
    /// Manifests being persisted or persisted, by checkpoint (for announcements).
    manifests: BTreeMap<CheckpointId, Manifest>,
    watermarks: BTreeMap<ChannelId, EventTime>,
    final_checkpoint_requested: bool,
}

/// Why an attempt ends early.
enum AttemptEnd {
    Failed(String),
    Violation(Violation),
}

struct Harness<'a> {
    config: &'a ClusterConfig,
    storage: FaultStorage,
    rng: Lcg,
    now: u64,
    skew: Vec<u64>,
    stats: ClusterStats,
    hasher: TraceHasher,
    trace: Vec<String>,
    protocol: Vec<ProtocolEvent>,
    /// Numbers of tasks, splits and sink files in `protocol`.
    task_numbers: BTreeMap<crate::dataflow::graph::SubtaskId, u32>,
    split_numbers: BTreeMap<u64, u32>,
    file_numbers: BTreeMap<String, u32>,
    /// Committed sink files already reported as `ProtocolEvent::Commit`.
    committed_seen: BTreeSet<String>,
    plan_faults: Vec<(u64, FaultEvent)>,
    durable_damage: bool,
    corrupted_newest: bool,
    /// Checkpoints persisted (durable manifests written by any attempt), newest last.
    completed: BTreeMap<CheckpointId, Manifest>,
    /// Names of committed sink files a checkpoint allowed: announced or restored from.
    committable: BTreeSet<String>,
    file_sinks: Vec<String>,
    cut_samples: Vec<(CheckpointId, FaultDisk)>,
    cut_candidates: u64,
    healed: bool,
    failures_after_heal: u64,
}

/// Runs the job of `config` on `storage` (empty, or left by an earlier run) to its end.
pub fn run(config: &ClusterConfig, storage: FaultStorage) -> ClusterRun {
    let node_count = usize::from(config.plan.node_count);
    let mut skew = config.faults.clock_skew_ms.clone();
    skew.resize(node_count + 1, 0);
    let file_sinks = config.plan.graph.file_sinks();
    storage.disk().set_faults(config.faults.storage);
    let mut harness = Harness {
        config,
        storage,
        rng: Lcg::new(config.seed),
        now: 0,
        skew,
        stats: ClusterStats::default(),
        hasher: TraceHasher(0xcbf2_9ce4_8422_2325),
        trace: Vec::new(),
        protocol: Vec::new(),
        task_numbers: config.plan.graph.subtasks().zip(0..).collect(),
        split_numbers: BTreeMap::new(),
        file_numbers: BTreeMap::new(),
        committed_seen: BTreeSet::new(),
        plan_faults: Vec::new(),
        durable_damage: false,
        corrupted_newest: false,
        completed: BTreeMap::new(),
        committable: BTreeSet::new(),
        file_sinks,
        cut_samples: Vec::new(),
        cut_candidates: 0,
        healed: false,
        failures_after_heal: 0,
    };
    // Output committed before this run (a restart from an earlier run's disk) was judged there.
    for sink in harness.file_sinks.clone() {
        let committed = harness.storage.disk().peek_list(&format!("output/{sink}"));
        harness.committed_seen.extend(committed.iter().map(|file| format!("{sink}/{file}")));
        harness.committable.extend(committed);
    }
    let outcome = harness.run();
    harness.record(format_args!("end {outcome:?}"));
    let disk_faults = harness.storage.disk().injected().to_vec();
    // Misdirected writes damage durable data the kernel believed written: a refusal may be right.
    harness.durable_damage |= disk_faults.iter().any(|f| matches!(f, Fault::Misdirected { .. }));
    ClusterRun {
        outcome,
        storage: harness.storage,
        stats: harness.stats,
        trace_hash: harness.hasher.0,
        trace: harness.trace,
        protocol: harness.protocol,
        disk_faults,
        plan_faults: harness.plan_faults,
        durable_damage: harness.durable_damage,
        cut_samples: harness.cut_samples,
        file_sinks: harness.file_sinks,
    }
}

impl Harness<'_> {
    fn record(&mut self, event: fmt::Arguments<'_>) {
        let now = self.now;
        let _ = writeln!(self.hasher, "{now} {event}");
        if self.config.trace {
            self.trace.push(format!("{now:>8} {event}"));
        }
    }

    fn protocol_event(&mut self, event: ProtocolEvent) {
        if self.config.trace {
            self.protocol.push(event);
        }
    }

    /// The number of a sink file (`output/<sink>/.pending/<file>` or `<sink>/<file>`).
    fn file_number(&mut self, path: &str) -> u32 {
        let mut parts = path.rsplit('/');
        let file = parts.next().expect("a file name");
        let sink = parts.find(|p| *p != ".pending").unwrap_or("");
        let next = self.file_numbers.len() as u32 + 1;
        *self.file_numbers.entry(format!("{sink}/{file}")).or_insert(next)
    }

    fn ack_event(&mut self, checkpoint: CheckpointId, snapshot: &TaskSnapshot) -> ProtocolEvent {
        let task = self.task_numbers.get(&snapshot.subtask).copied().unwrap_or(u32::MAX);
        let mut offsets = Vec::new();
        for position in &snapshot.source_positions {
            let next = self.split_numbers.len() as u32 + 1;
            let split = *self.split_numbers.entry(position.split).or_insert(next);
            offsets.push((split, position.position));
        }
        let files = snapshot.pending_output.iter().map(|path| self.file_number(path)).collect();
        ProtocolEvent::Ack { checkpoint, task, offsets, files }
    }

    /// Reports sink files that became visible since the last call as `ProtocolEvent::Commit`.
    fn trace_commits(&mut self) {
        if !self.config.trace {
            return;
        }
        for sink in self.file_sinks.clone() {
            let files = self.storage.disk().peek_list(&format!("output/{sink}"));
            for file in files {
                if !file.ends_with(".arrow") || !self.committed_seen.insert(format!("{sink}/{file}")) {
                    continue;
                }
                let number = self.file_number(&format!("{sink}/{file}"));
                self.protocol_event(ProtocolEvent::Commit { file: number });
            }
        }
    }

    fn chance(&mut self, ppm: u32) -> bool {
        self.rng.below(1_000_000) < u64::from(ppm)
    }

    fn delay(&mut self, max: u64) -> u64 {
        self.now + if max == 0 { 0 } else { self.rng.below(max + 1) }
    }

    /// The clock of node `index` (the coordinator's is `node_count`).
    fn clock(&self, index: usize) -> Instant {
        Instant(self.now + self.skew[index])
    }

    fn run(&mut self) -> Outcome {
        let heal_at = self.config.faults.heal_at_ms;
        let deadline = heal_at + self.config.liveness_ms;
        let mut events: VecDeque<(u64, FaultEvent)> = self.config.faults.events.iter().cloned().collect();
        let mut attempt: Option<Attempt> = None;
        let mut restart_at = 0_u64;
        let mut last_error = String::new();
        loop {
            self.now += self.config.network.tick_ms;
            self.stats.ticks += 1;
            self.stats.virtual_ms = self.now;
            if !self.healed && self.now >= heal_at {
                self.healed = true;
                self.storage.disk().heal();
                self.record(format_args!("heal"));
            }
            while events.front().is_some_and(|(at, _)| *at <= self.now) {
                let (_, event) = events.pop_front().expect("checked above");
                if self.healed {
                    continue;
                }
                if self.apply_fault(&event, &mut attempt) {
                    restart_at = self.delay(self.config.faults.restart_delay_ms_max);
                }
            }
            if self.now > deadline {
                let state = if attempt.is_some() { "running" } else { "down" };
                let detail = format!(
                    "not finished {} ms after the heal (job {state}; last error: {last_error})",
                    self.config.liveness_ms
                );
                return Outcome::Stuck { detail };
            }
            if attempt.is_none() && self.now >= restart_at {
                match self.start() {
                    Ok(started) => attempt = Some(started),
                    Err(error) => {
                        self.stats.restart_failures += 1;
                        self.record(format_args!("restart failed: {error}"));
                        self.trace_commits();
                        self.protocol_event(ProtocolEvent::Crash { power: false });
                        if let Some(outcome) = self.failed_after_heal(&error) {
                            return outcome;
                        }
                        last_error = error;
                        restart_at = self.delay(self.config.faults.restart_delay_ms_max.max(1));
                        continue;
                    }
                }
            }
            let Some(running) = attempt.as_mut() else { continue };
            let result = self.tick(running);
            self.trace_disk_faults();
            match result {
                Ok(true) => {
                    self.retire(running);
                    return Outcome::Finished;
                }
                Ok(false) => {}
                Err(AttemptEnd::Violation(violation)) => return Outcome::Violation(violation),
                Err(AttemptEnd::Failed(error)) => {
                    self.stats.task_failures += 1;
                    self.record(format_args!("attempt failed: {error}"));
                    self.protocol_event(ProtocolEvent::Crash { power: false });
                    if let Some(failed) = attempt.take() {
                        self.retire(&failed);
                    }
                    if let Some(outcome) = self.failed_after_heal(&error) {
                        return outcome;
                    }
                    last_error = error;
                    restart_at = self.delay(self.config.faults.restart_delay_ms_max);
                }
            }
        }
    }

    fn failed_after_heal(&mut self, error: &str) -> Option<Outcome> {
        if !self.healed {
            return None;
        }
        self.failures_after_heal += 1;
        (self.failures_after_heal >= ATTEMPTS_AFTER_HEAL_MAX).then(|| Outcome::Refused { error: error.to_string() })
    }

    fn trace_disk_faults(&mut self) {
        let faults: Vec<Fault> = self.storage.disk().take_new_faults().to_vec();
        for fault in faults {
            // A misdirected write damages a file for good. A failed or corrupted read of a
            // checkpoint's file looks the same to recovery, which passes over that checkpoint
            // as it would over a damaged one (it cannot tell them apart).
            let damages = match &fault {
                Fault::Misdirected { .. } => true,
                Fault::ReadError { path } | Fault::ReadCorrupt { path, .. } => path.starts_with("checkpoints/"),
                _ => false,
            };
            if damages {
                self.protocol_event(ProtocolEvent::Damage);
            }
            self.record(format_args!("disk fault {fault:?}"));
        }
    }

    /// Applies a fault of the plan; `true` if it ended the running attempt.
    fn apply_fault(&mut self, event: &FaultEvent, attempt: &mut Option<Attempt>) -> bool {
        let applied = match event {
            FaultEvent::PowerLoss => {
                self.stats.power_losses += 1;
                self.storage.disk().crash();
                true
            }
            FaultEvent::NodeCrash { .. } => {
                self.stats.node_crashes += u64::from(attempt.is_some());
                attempt.is_some()
            }
            FaultEvent::DiskFull { full } => {
                self.storage.disk().set_full(*full);
                true
            }
            FaultEvent::CorruptNewestCheckpoint => self.corrupt_newest(),
            FaultEvent::CorruptPointer => {
                let done = self.storage.disk().corrupt_durable(manifest::POINTER_PATH);
                self.durable_damage |= done;
                done
            }
            FaultEvent::ClockJump { node, ms } => {
                let index = usize::from(*node).min(self.skew.len() - 1);
                self.skew[index] += ms;
                true
            }
        };
        if !applied {
            return false;
        }
        self.plan_faults.push((self.now, event.clone()));
        self.record(format_args!("fault {event:?}"));
        self.trace_disk_faults();
        match event {
            FaultEvent::CorruptNewestCheckpoint | FaultEvent::CorruptPointer => {
                self.protocol_event(ProtocolEvent::Damage)
            }
            FaultEvent::PowerLoss => self.protocol_event(ProtocolEvent::Crash { power: true }),
            FaultEvent::NodeCrash { .. } => self.protocol_event(ProtocolEvent::Crash { power: false }),
            FaultEvent::DiskFull { .. } | FaultEvent::ClockJump { .. } => {}
        }
        if matches!(event, FaultEvent::PowerLoss | FaultEvent::NodeCrash { .. }) {
            if let Some(lost) = attempt.take() {
                self.retire(&lost);
                return true;
            }
        }
        false
    }

    /// Counts what an attempt's nodes did before it ended.
    fn retire(&mut self, attempt: &Attempt) {
        let metrics: crate::node::NodeMetrics = attempt.nodes.iter().map(Node::metrics).sum();
        self.stats.source_idle_count += metrics.source_idle_count;
        self.stats.source_paused_count += metrics.source_paused_count;
    }

    /// Flips a bit of the newest durable checkpoint's manifest or of one of its own files.
    fn corrupt_newest(&mut self) -> bool {
        if self.corrupted_newest {
            return false;
        }
        let newest = self
            .completed
            .iter()
            .rev()
            .find(|(id, _)| self.storage.disk().peek_durable(&manifest::manifest_path(**id)).is_some());
        let Some((&id, manifest)) = newest else { return false };
        let shared = format!("{}/", manifest::shared_dir());
        let mut paths = vec![manifest::manifest_path(id)];
        paths.extend(manifest.tasks.iter().flat_map(|t| t.files.iter()).filter(|f| !f.starts_with(&shared)).cloned());
        let path = paths[self.rng.below(paths.len() as u64) as usize].clone();
        let done = self.storage.disk().corrupt_durable(&path);
        self.corrupted_newest |= done;
        self.durable_damage |= done;
        done
    }

    /// Starts an attempt from the latest usable checkpoint, as a restarted job does.
    fn start(&mut self) -> Result<Attempt, String> {
        self.stats.attempts += 1;
        let plan = self.config.plan.clone();
        let job = plan.graph.name.clone();
        let mut storage = self.storage.clone();
        let recovery = manifest::find_latest(&mut storage, &job);
        // Reads recovery made may have failed or come back corrupted: the trace says so first.
        self.trace_disk_faults();
        let recovery = recovery.map_err(|e| e.to_string())?;
        for (id, reason) in &recovery.skipped {
            self.record(format_args!("recovery skips checkpoint {} ({reason})", id.0));
        }
        let recovery_id_max = recovery.checkpoint_id_max();
        let skipped = recovery.skipped.iter().map(|(id, _)| *id).collect();
        self.protocol_event(ProtocolEvent::Start {
            restored: recovery.manifest.as_ref().map(|m| m.checkpoint),
            skipped,
        });
        let restored = recovery.manifest.map(Arc::new);
        if let Some(manifest) = &restored {
            // Restoring commits its pre-committed output: from now on that output may be visible.
            self.allow_commits(manifest);
            manifest::sweep_before(&mut storage, &job, manifest).map_err(|e| format!("sweep: {e}"))?;
        }
        let (attempt, from) = (self.stats.attempts, restored.as_ref().map(|m| m.checkpoint.0));
        self.record(format_args!("start attempt {attempt} from {from:?}"));
        let settings = &self.config.checkpoints;
        let options = NodeOptions {
            checkpointing: true,
            restore: restored.clone(),
            alignment_timeout_ms: settings.alignment_timeout_ms,
        };
        let mut nodes = Vec::new();
        for index in 0..plan.node_count {
            let mut backends = |_, range| Ok(Box::new(HeapBackend::new(range)) as Box<dyn StateBackend>);
            let node = Node::new(plan.clone(), index, Box::new(storage.clone()), &mut backends, options.clone())
                .map_err(|e| e.to_string())?;
            nodes.push(node);
        }
        self.stats.restored_from_checkpoint += u64::from(restored.is_some());
        self.trace_commits();
        self.protocol_event(ProtocolEvent::Started);
        let config = CoordinatorConfig {
            interval_ms: settings.interval_ms,
            timeout_ms: settings.timeout_ms,
            concurrent_max: settings.concurrent_max,
            retained_count: settings.retained_count,
        };
        let mut coordinator = Coordinator::new(
            config,
            &job,
            plan.graph.max_parallelism.get(),
            plan.graph.subtasks(),
            restored.as_deref().cloned(),
        );
        if let Some(newest) = recovery_id_max {
            coordinator.continue_after(newest);
        }
        let channels = plan
            .channels
            .iter()
            .enumerate()
            .filter(|(_, c)| plan.node_of(c.from) != plan.node_of(c.to))
            .map(|(id, _)| (ChannelId(id as u32), VecDeque::new()))
            .collect();
        let node_count = nodes.len();
        Ok(Attempt {
            nodes,
            coordinator,
            channels,
            held: (0..node_count).map(|_| None).collect(),
            control: vec![VecDeque::new(); node_count],
            acks: VecDeque::new(),
            writes: Vec::new(),
            persists: VecDeque::new(),
            aborted: BTreeSet::new(),
            manifests: BTreeMap::new(),
            watermarks: BTreeMap::new(),
            final_checkpoint_requested: false,
        })
    }

    fn allow_commits(&mut self, manifest: &Manifest) {
        for path in manifest.tasks.iter().flat_map(|t| t.pending_output.iter()) {
            self.committable.insert(path.rsplit('/').next().expect("a file name").to_string());
        }
    }

    /// One iteration of a running attempt; `Ok(true)` when the job is done.
    fn tick(&mut self, attempt: &mut Attempt) -> Result<bool, AttemptEnd> {
        self.coordinate(attempt)?;
        self.deliver_control(attempt)?;
        self.finish_writes(attempt)?;
        self.deliver_acks(attempt)?;
        self.deliver_data(attempt)?;
        self.step_nodes(attempt)?;
        self.carry_alignment(attempt);
        // Nodes that finished are not stepped, but what they still hold must go out.
        for index in 0..attempt.nodes.len() {
            self.transmit(attempt, index);
        }
        self.trace_commits();
        self.check_commits()?;
        if attempt.nodes.iter().all(Node::is_finished) && !attempt.final_checkpoint_requested {
            attempt.final_checkpoint_requested = true;
            attempt.coordinator.request_checkpoint();
        }
        Ok(attempt.nodes.iter().all(Node::is_done))
    }

    /// Lets the coordinator act, and performs persists that are due.
    fn coordinate(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        let now = self.clock(self.skew.len() - 1);
        attempt.coordinator.handle_timeout(now);
        self.coordinator_actions(attempt)?;
        while attempt.persists.front().is_some_and(|(due, _)| *due <= self.now) {
            let (_, manifest) = attempt.persists.pop_front().expect("checked above");
            let checkpoint = manifest.checkpoint;
            if attempt.aborted.contains(&checkpoint) {
                self.record(format_args!("persist of aborted checkpoint {} dropped", checkpoint.0));
                continue;
            }
            let mut storage = self.storage.clone();
            match manifest::persist(&mut storage, &manifest) {
                Ok(()) => {
                    self.record(format_args!("persisted checkpoint {}", checkpoint.0));
                    self.protocol_event(ProtocolEvent::Persisted { checkpoint });
                    self.completed.insert(checkpoint, manifest);
                    self.sample_cut(checkpoint);
                    attempt.coordinator.handle_persisted(checkpoint).map_err(coordinator_violation)?;
                }
                Err(error) => {
                    self.record(format_args!("persist of checkpoint {} failed: {error}", checkpoint.0));
                    self.protocol_event(ProtocolEvent::PersistFailed { checkpoint });
                    attempt
                        .coordinator
                        .handle_persist_failed(checkpoint, &error.to_string())
                        .map_err(coordinator_violation)?;
                }
            }
            self.coordinator_actions(attempt)?;
        }
        Ok(())
    }

    /// Keeps what a power loss now would leave, for one seeded checkpoint of the run.
    fn sample_cut(&mut self, checkpoint: CheckpointId) {
        self.cut_candidates += 1;
        // Reservoir sampling: each completed checkpoint equally likely to be kept.
        let keep = self.cut_samples.len() < CUT_SAMPLES_MAX || self.rng.below(self.cut_candidates) == 0;
        if keep {
            let copy = self.storage.disk().durable_copy(self.config.seed ^ checkpoint.0);
            if self.cut_samples.len() == CUT_SAMPLES_MAX {
                self.cut_samples.remove(0);
            }
            self.cut_samples.push((checkpoint, copy));
        }
    }

    fn coordinator_actions(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        while let Some(action) = attempt.coordinator.poll_action() {
            match action {
                Action::Trigger { checkpoint, kind } => {
                    self.record(format_args!("trigger {} {kind:?}", checkpoint.0));
                    self.protocol_event(ProtocolEvent::Trigger { checkpoint });
                    let barrier = match kind {
                        CheckpointKind::Checkpoint if self.config.checkpoints.unaligned => BarrierKind::Unaligned,
                        _ => BarrierKind::Aligned,
                    };
                    self.send_control(attempt, Control::Trigger(checkpoint, barrier));
                }
                Action::Persist { manifest } => {
                    let due = self.delay(self.config.network.persist_delay_ms_max);
                    attempt.manifests.insert(manifest.checkpoint, manifest.clone());
                    attempt.persists.push_back((due, manifest));
                }
                Action::NotifyComplete { checkpoint } => {
                    self.protocol_event(ProtocolEvent::Complete { checkpoint });
                    self.check_durable(checkpoint)?;
                    self.stats.checkpoints_completed += 1;
                    self.record(format_args!("complete {}", checkpoint.0));
                    if let Some(manifest) = attempt.manifests.get(&checkpoint).cloned() {
                        self.allow_commits(&manifest);
                    }
                    self.send_control(attempt, Control::Complete(checkpoint));
                }
                Action::Abort { checkpoint, reason } => {
                    attempt.aborted.insert(checkpoint);
                    self.protocol_event(ProtocolEvent::Abort { checkpoint });
                    self.stats.checkpoints_aborted += 1;
                    self.record(format_args!("abort {} {reason:?}", checkpoint.0));
                }
                Action::Discard { checkpoint, files } => {
                    self.record(format_args!("discard {} ({} files)", checkpoint.0, files.len()));
                    let mut storage = self.storage.clone();
                    for file in files {
                        // A delete that fails leaves garbage, never a wrong result.
                        let _ = storage.delete(&file);
                    }
                }
            }
        }
        Ok(())
    }

    /// No checkpoint is announced before its manifest and the pointer naming it are durable.
    fn check_durable(&mut self, checkpoint: CheckpointId) -> Result<(), AttemptEnd> {
        self.stats.announcements_checked += 1;
        let disk = self.storage.disk();
        let manifest = disk.peek_durable(&manifest::manifest_path(checkpoint)).map(Manifest::decode);
        let pointer = disk.peek_durable(manifest::POINTER_PATH).map(manifest::decode_pointer);
        // A misdirected write leaves zeros where the kernel wrote (and synced): durable, but
        // unreadable, which recovery detects; it is not an announcement before durability.
        let misdirected = |path: &str| {
            disk.injected().iter().any(|f| matches!(f, Fault::Misdirected { path: p } if p.starts_with(path)))
        };
        let manifest_durable = match &manifest {
            Some(Ok(m)) => m.checkpoint == checkpoint,
            Some(Err(_)) => misdirected(&manifest::manifest_path(checkpoint)),
            None => false,
        };
        let pointer_durable = match &pointer {
            Some(Ok(id)) => *id >= checkpoint,
            Some(Err(_)) => misdirected(manifest::POINTER_PATH),
            None => false,
        };
        if manifest_durable && pointer_durable {
            return Ok(());
        }
        Err(AttemptEnd::Violation(Violation {
            check: "announced only when durable",
            detail: format!(
                "checkpoint {} announced complete, but its durable manifest is {:?} and the durable pointer {:?}",
                checkpoint.0,
                manifest.map(|m| m.map(|m| m.checkpoint.0)),
                pointer
            ),
        }))
    }

    fn send_control(&mut self, attempt: &mut Attempt, control: Control) {
        for node in 0..attempt.nodes.len() {
            let queue_last = attempt.control[node].back().map_or(0, |(due, _)| *due);
            let due = self.delay(self.config.network.delay_ms_max).max(queue_last);
            attempt.control[node].push_back((due, control));
        }
    }

    fn deliver_control(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        for index in 0..attempt.nodes.len() {
            while attempt.control[index].front().is_some_and(|(due, _)| *due <= self.now) {
                let (_, control) = attempt.control[index].pop_front().expect("checked above");
                let now = self.clock(index);
                let node = &mut attempt.nodes[index];
                match control {
                    Control::Trigger(checkpoint, kind) => node.handle_checkpoint_trigger(now, checkpoint, kind),
                    Control::Complete(checkpoint) => node.handle_checkpoint_complete(now, checkpoint),
                }
                .map_err(|e| AttemptEnd::Failed(e.to_string()))?;
                self.drain_node(attempt, index)?;
            }
        }
        Ok(())
    }

    fn finish_writes(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        let now = self.now;
        let mut due = Vec::new();
        let mut index = 0;
        while index < attempt.writes.len() {
            if attempt.writes[index].0 <= now {
                due.push(attempt.writes.remove(index));
            } else {
                index += 1;
            }
        }
        for (_, checkpoint, subtask, writes) in due {
            let mut files = Vec::new();
            for write in writes {
                let mut storage = self.storage.clone();
                let written = write.write(&mut storage).map_err(|e| {
                    AttemptEnd::Failed(format!("{subtask}: snapshot write of checkpoint {}: {e}", checkpoint.0))
                })?;
                files.extend(written);
            }
            let node = usize::from(self.config.plan.node_of(subtask));
            attempt.nodes[node].handle_snapshot_written(checkpoint, subtask, files);
            self.drain_node(attempt, node)?;
        }
        Ok(())
    }

    fn deliver_acks(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        while attempt.acks.front().is_some_and(|(due, ..)| *due <= self.now) {
            let (_, checkpoint, snapshot) = attempt.acks.pop_front().expect("checked above");
            self.record(format_args!("ack {} from {}", checkpoint.0, snapshot.subtask));
            if self.config.trace {
                let event = self.ack_event(checkpoint, &snapshot);
                self.protocol_event(event);
            }
            attempt.coordinator.handle_ack(checkpoint, snapshot).map_err(coordinator_violation)?;
        }
        self.coordinator_actions(attempt)
    }

    /// Delivers elements whose time came, channel by channel in a seeded order, while receivers
    /// have room.
    fn deliver_data(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        let plan = self.config.plan.clone();
        for _ in 0..DELIVERIES_PER_TICK_MAX {
            let ready: Vec<ChannelId> = attempt
                .channels
                .iter()
                .filter(|(id, queue)| {
                    queue.front().is_some_and(|(due, _)| *due <= self.now)
                        && attempt.nodes[usize::from(plan.node_of(plan.channel(**id).to))].inbox_room() > 0
                })
                .map(|(id, _)| *id)
                .collect();
            if ready.is_empty() {
                return Ok(());
            }
            let channel = ready[self.rng.below(ready.len() as u64) as usize];
            let (_, element) = attempt.channels.get_mut(&channel).expect("listed").pop_front().expect("ready");
            self.check_watermark(attempt, channel, &element)?;
            self.record(format_args!("deliver {channel} {}", describe(&element)));
            self.stats.elements_delivered += 1;
            let receiver = usize::from(plan.node_of(plan.channel(channel).to));
            let now = self.clock(receiver);
            attempt.nodes[receiver].handle_element(now, channel, element);
        }
        Ok(())
    }

    fn check_watermark(
        &mut self,
        attempt: &mut Attempt,
        channel: ChannelId,
        element: &Element,
    ) -> Result<(), AttemptEnd> {
        let Element::Watermark(watermark) = element else { return Ok(()) };
        self.stats.watermarks_checked += 1;
        let last = attempt.watermarks.entry(channel).or_insert(EventTime::MIN);
        if *watermark < *last {
            return Err(AttemptEnd::Violation(Violation {
                check: "watermarks monotonic",
                detail: format!("{channel}: watermark {watermark:?} after {last:?}"),
            }));
        }
        *last = *watermark;
        Ok(())
    }

    fn step_nodes(&mut self, attempt: &mut Attempt) -> Result<(), AttemptEnd> {
        let count = attempt.nodes.len();
        let first = self.rng.below(count as u64) as usize;
        for offset in 0..count {
            let index = (first + offset) % count;
            if attempt.nodes[index].is_finished() || !self.chance(self.config.network.step_ppm) {
                continue;
            }
            let now = self.clock(index);
            self.stats.node_steps += 1;
            attempt.nodes[index].handle_step(now).map_err(|e| AttemptEnd::Failed(e.to_string()))?;
            self.drain_node(attempt, index)?;
        }
        Ok(())
    }

    /// Carries each watermark alignment group's minimum between nodes, as a driver does: every
    /// node learns the minimum over the others' sources, once per iteration.
    fn carry_alignment(&mut self, attempt: &mut Attempt) {
        let reports: Vec<Vec<(String, Option<EventTime>)>> =
            attempt.nodes.iter().map(Node::alignment_watermarks).collect();
        if reports.iter().all(Vec::is_empty) {
            return;
        }
        for (index, report) in reports.iter().enumerate() {
            for (group, _) in report {
                let elsewhere = reports
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .flat_map(|(_, report)| report.iter())
                    .filter(|(other_group, _)| other_group == group)
                    .filter_map(|(_, minimum)| *minimum)
                    .min();
                attempt.nodes[index].handle_alignment(group, elsewhere);
            }
        }
    }

    /// Takes a node's events and what it sends.
    fn drain_node(&mut self, attempt: &mut Attempt, index: usize) -> Result<(), AttemptEnd> {
        while let Some(event) = attempt.nodes[index].poll_event() {
            match event {
                Event::CheckpointAck { checkpoint, snapshot } => {
                    self.stats.in_flight_acks += u64::from(snapshot.files.iter().any(|f| f.contains("/inflight-")));
                    let queue_last = attempt.acks.back().map_or(0, |(due, ..)| *due);
                    let due = self.delay(self.config.network.delay_ms_max).max(queue_last);
                    attempt.acks.push_back((due, checkpoint, snapshot));
                }
                Event::SnapshotWrites { checkpoint, subtask, writes } => {
                    let due = self.delay(self.config.network.write_delay_ms_max);
                    attempt.writes.push((due, checkpoint, subtask, writes));
                }
                Event::TaskFinished { subtask } => self.record(format_args!("finished {subtask}")),
            }
        }
        self.transmit(attempt, index);
        Ok(())
    }

    /// Moves what node `index` sends into the network while its channels have room; the first
    /// element that does not fit waits in `held`.
    fn transmit(&mut self, attempt: &mut Attempt, index: usize) {
        let capacity = self.config.network.channel_capacity;
        loop {
            let next = attempt.held[index].take().or_else(|| attempt.nodes[index].poll_transmit());
            let Some((channel, element)) = next else { break };
            let queue = attempt.channels.get_mut(&channel).expect("a remote channel");
            if queue.len() >= capacity {
                attempt.held[index] = Some((channel, element));
                break;
            }
            let queue_last = queue.back().map_or(0, |(due, _)| *due);
            let due = self.delay(self.config.network.delay_ms_max).max(queue_last);
            attempt.channels.get_mut(&channel).expect("checked above").push_back((due, element));
        }
    }

    /// Every committed sink file is named by a checkpoint announced complete or restored from.
    fn check_commits(&mut self) -> Result<(), AttemptEnd> {
        for sink in &self.file_sinks {
            self.stats.commit_checks += 1;
            let files = self.storage.disk().peek_list(&format!("output/{sink}"));
            if let Some(file) = files.iter().find(|f| f.ends_with(".arrow") && !self.committable.contains(*f)) {
                return Err(AttemptEnd::Violation(Violation {
                    check: "no output before its checkpoint completed",
                    detail: format!("output/{sink}/{file} is committed, but no completed checkpoint names it"),
                }));
            }
        }
        Ok(())
    }
}

fn coordinator_violation(error: crate::checkpoint::coordinator::CoordinatorError) -> AttemptEnd {
    AttemptEnd::Violation(Violation { check: "coordinator inputs", detail: error.to_string() })
}

/// An element as the trace shows it.
fn describe(element: &Element) -> String {
    match element {
        Element::Batch(batch) => format!("batch {} rows", batch.num_rows()),
        Element::Watermark(watermark) => format!("watermark {}", watermark.0),
        Element::Barrier(barrier) => format!("barrier {} {:?}", barrier.checkpoint.0, barrier.kind),
        Element::Idle => "idle".into(),
        Element::Active => "active".into(),
        Element::End => "end".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::sink::read_committed;
    use crate::testing::{w2_reference, window_rows};
    use crate::workload::{w2_job, W2_WINDOW_SIZE_MS};

    fn config(seed: u64, plan: PhysicalPlan) -> ClusterConfig {
        ClusterConfig {
            seed,
            plan: Arc::new(plan),
            checkpoints: CheckpointSettings::default(),
            network: NetworkSettings {
                delay_ms_max: 3,
                write_delay_ms_max: 4,
                persist_delay_ms_max: 4,
                step_ppm: 700_000,
                ..NetworkSettings::default()
            },
            faults: FaultPlan { heal_at_ms: 0, ..FaultPlan::default() },
            trace: false,
            liveness_ms: 1_000_000,
        }
    }

    // Goal: without faults, the harness runs W2 to the end with checkpoints and commits exactly
    // the reference windows, whatever the seeded interleaving. Method: a few seeds, W2 on 2 nodes.
    #[test]
    fn fault_free_runs_match_the_reference() {
        let record_count = 3_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        for seed in 0..4 {
            println!("seed {seed}");
            let run = run(
                &config(seed, PhysicalPlan::new(w2_job(record_count, 2, 50).unwrap(), 2)),
                FaultStorage::new(FaultDisk::new(seed)),
            );
            assert_eq!(run.outcome, Outcome::Finished, "seed {seed}");
            assert!(run.stats.checkpoints_completed > 1, "seed {seed}: {:?}", run.stats);
            let mut storage = run.storage.clone();
            assert_eq!(window_rows(&read_committed(&mut storage, "w2").unwrap()), expected, "seed {seed}");
        }
    }

    // Goal: the trace hash is a function of the seed: the same seed twice gives the same hash,
    // another seed another one. Method: three runs with faults.
    #[test]
    fn trace_hash_is_deterministic() {
        let run_seed = |seed| {
            let mut config = config(seed, PhysicalPlan::new(w2_job(2_000, 2, 40).unwrap(), 2));
            config.faults = FaultPlan {
                heal_at_ms: 150,
                events: vec![(40, FaultEvent::PowerLoss), (90, FaultEvent::NodeCrash { node: 1 })],
                storage: FaultConfig {
                    read_error_ppm: 2_000,
                    write_error_ppm: 2_000,
                    torn_ppm: 500_000,
                    ..FaultConfig::default()
                },
                clock_skew_ms: vec![0, 5, 9],
                restart_delay_ms_max: 5,
            };
            run(&config, FaultStorage::new(FaultDisk::new(seed))).trace_hash
        };
        assert_eq!(run_seed(3), run_seed(3));
        assert_ne!(run_seed(3), run_seed(4));
    }
}
