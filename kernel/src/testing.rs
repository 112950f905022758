//! Test support for the kernel and its dependents: in-memory runs and reference models.
//!
//! `run_in_memory` steps every node of a plan in one thread, moving elements between them in a
//! fixed order: the pure kernel run that real drivers are compared with. [`cluster`] is the
//! single-threaded cluster harness of the simulator: seeded network interleaving, a manual clock,
//! the faulty disk, crashes and restarts, and the checks made on the way; [`planted`] holds the
//! deliberate bugs the simulator must find.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use arrow_array::{Array, Int64Array, RecordBatch, UInt64Array};

use crate::dataflow::sink::read_committed;
use crate::dataflow::{OperatorError, PhysicalPlan};
use crate::env::{MemStorage, Storage, StorageError};
use crate::node::{Event, Node, NodeError, NodeMetrics, NodeOptions, Step};
use crate::state::HeapBackend;
use crate::time::Instant;
use crate::workload;

pub mod cluster;
#[cfg(test)]
mod fuzz_seeds;
pub mod planted;

/// One [`MemStorage`] shared by all nodes of an in-memory run.
#[derive(Clone, Default)]
pub struct SharedMemStorage(pub Arc<Mutex<MemStorage>>);

impl Storage for SharedMemStorage {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        self.0.lock().expect("storage lock").write(path, data)
    }
    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        self.0.lock().expect("storage lock").sync_file(path)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        self.0.lock().expect("storage lock").rename(from, to)
    }
    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        self.0.lock().expect("storage lock").sync_dir(dir)
    }
    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        self.0.lock().expect("storage lock").read(path)
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        self.0.lock().expect("storage lock").list(dir)
    }
    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        self.0.lock().expect("storage lock").delete(path)
    }
}

/// What an in-memory run leaves behind.
pub struct InMemoryRun {
    pub storage: SharedMemStorage,
    pub metrics: NodeMetrics,
    /// How many times the harness stepped a node.
    pub step_count: u64,
    /// The processing time the run took on its manual clock (a millisecond per round of steps,
    /// and jumps to the next timeout while every node waits).
    pub virtual_ms: u64,
}

impl InMemoryRun {
    pub fn committed(&mut self, sink: &str) -> Result<Vec<RecordBatch>, OperatorError> {
        read_committed(&mut self.storage, sink)
    }
}

/// Runs `plan` to the end on heap state and shared in-memory storage, all nodes in this thread.
pub fn run_in_memory(plan: PhysicalPlan) -> Result<InMemoryRun, NodeError> {
    let storage = SharedMemStorage::default();
    run_in_memory_with(plan, storage.clone(), |_| Box::new(storage.clone()))
}

/// As [`run_in_memory`], with each node's storage made by `storage_of(node index)`; `storage` is
/// where the run's committed output is read from afterwards.
pub fn run_in_memory_with(
    plan: PhysicalPlan,
    storage: SharedMemStorage,
    mut storage_of: impl FnMut(u16) -> Box<dyn Storage + Send>,
) -> Result<InMemoryRun, NodeError> {
    let plan = Arc::new(plan);
    let mut nodes: Vec<Node> = (0..plan.node_count)
        .map(|index| {
            Node::new(
                plan.clone(),
                index,
                storage_of(index),
                &mut |_, range| Ok(Box::new(HeapBackend::new(range))),
                NodeOptions::default(),
            )
            .expect("heap backends do not fail")
        })
        .collect();
    // A manual clock: a millisecond per round, and straight to the earliest timeout when every
    // node waits for time (a source's stall, an idle timeout, a periodic watermark).
    let mut now = Instant(0);
    let mut step_count = 0_u64;
    // An element taken from a node's outbox whose receiver had no room yet: the node's one in flight.
    let mut held: Vec<Held> = vec![None; nodes.len()];
    loop {
        let mut busy = false;
        for index in 0..nodes.len() {
            let step = nodes[index].handle_step(now)?;
            step_count += 1;
            busy |= step == Step::Busy;
            while nodes[index].poll_event().is_some() {}
            busy |= move_output(&plan, &mut nodes, &mut held, index, now);
        }
        if nodes.iter().all(Node::is_finished) {
            assert!(held.iter().all(Option::is_none), "elements left in flight after every node finished");
            break;
        }
        if busy {
            now = now.saturating_add_ms(1);
            continue;
        }
        let wake = nodes.iter().filter_map(Node::poll_timeout).min();
        let wake = wake.unwrap_or_else(|| panic!("in-memory run stalled at {now:?}: no node can make progress"));
        assert!(wake > now, "in-memory run stalled at {now:?}: a timeout at {wake:?} was not handled");
        now = wake;
    }
    let metrics: NodeMetrics = nodes.iter().map(Node::metrics).sum();
    Ok(InMemoryRun { storage, metrics, step_count, virtual_ms: now.0 })
}

/// An element taken from a node's outbox whose receiver had no room yet: one per node at most.
type Held = Option<(crate::env::ChannelId, crate::element::Element)>;

/// Moves what node `index` sends to its receivers while they have room (the first element that
/// does not fit waits in `held`). Returns whether anything moved.
fn move_output(plan: &PhysicalPlan, nodes: &mut [Node], held: &mut [Held], index: usize, now: Instant) -> bool {
    let mut moved = false;
    while let Some((channel, element)) = held[index].take().or_else(|| nodes[index].poll_transmit()) {
        let receiver = usize::from(plan.node_of(plan.channel(channel).to));
        if nodes[receiver].inbox_room() == 0 {
            held[index] = Some((channel, element));
            break;
        }
        nodes[receiver].handle_element(now, channel, element);
        moved = true;
    }
    moved
}

/// Snapshot files being written: the step they are done at, and for which checkpoint and task.
type PendingWrites =
    (u64, crate::element::CheckpointId, crate::dataflow::SubtaskId, Vec<Box<dyn crate::state::SnapshotWrite>>);

/// How a checkpointed in-memory run goes: checkpoints every `interval_steps` steps, and a crash
/// (every node lost, storage losing what was not synced) at each of `crash_at_steps`.
#[derive(Clone, Debug)]
pub struct CrashSchedule {
    pub interval_steps: u64,
    pub crash_at_steps: Vec<u64>,
    /// Steps `[start, end)` during which the disk is full: every write fails with
    /// `StorageError::Full` (snapshot files, manifests, sink output alike).
    pub disk_full_steps: Vec<(u64, u64)>,
    /// Stop (as if killed, without restarting) at this step; the storage stays as it was.
    pub stop_at_step: Option<u64>,
}

/// Storage that refuses writes while `full` is set, as a disk that ran out of space.
#[derive(Clone)]
struct FillableDisk {
    inner: SharedMemStorage,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl Storage for FillableDisk {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        if self.full.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StorageError::Full { path: path.to_string() });
        }
        self.inner.write(path, data)
    }
    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        self.inner.sync_file(path)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        self.inner.sync_dir(dir)
    }
    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.read(path)
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(dir)
    }
    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        self.inner.delete(path)
    }
}

/// Task failures a checkpointed run tolerates (each restarts the job) before it gives up.
const TASK_FAILURES_MAX: u64 = 10_000;

/// A checkpointed run's outcome.
pub struct CheckpointedRun {
    pub storage: SharedMemStorage,
    pub checkpoints_completed: u64,
    pub recoveries: u64,
    /// Recoveries that found a completed checkpoint (the others started over).
    pub restored_from_checkpoint: u64,
    /// Task failures (an operator's `Err`, such as a full disk), each answered by a restart.
    pub task_failures: u64,
    pub checkpoints_aborted: u64,
    /// Acknowledgements that carried in-flight data (unaligned snapshots that overtook elements).
    pub in_flight_acks: u64,
    pub step_count: u64,
}

/// The most steps a checkpointed run may take before it is declared stuck.
const CHECKPOINTED_STEPS_MAX: u64 = 10_000_000;

/// Runs `plan` with checkpoints and crashes, recovering each time from the latest completed
/// checkpoint as a restarted job would: the pure-kernel exactly-once experiment.
pub fn run_checkpointed(plan: PhysicalPlan, schedule: &CrashSchedule) -> Result<CheckpointedRun, String> {
    run_checkpointed_on(plan, schedule, SharedMemStorage::default())
}

/// As [`run_checkpointed`], on `storage` as an earlier run (perhaps of another parallelism) left it.
pub fn run_checkpointed_on(
    plan: PhysicalPlan,
    schedule: &CrashSchedule,
    storage: SharedMemStorage,
) -> Result<CheckpointedRun, String> {
    run_checkpointed_with(plan, schedule, storage, Alignment::default())
}

/// How the barriers of a checkpointed run align.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alignment {
    pub unaligned: bool,
    /// Aligned barriers waiting longer than this many steps switch to unaligned.
    pub timeout_steps: Option<u64>,
}

/// As [`run_checkpointed_on`], with barriers aligned as `alignment` says.
pub fn run_checkpointed_with(
    plan: PhysicalPlan,
    schedule: &CrashSchedule,
    storage: SharedMemStorage,
    alignment: Alignment,
) -> Result<CheckpointedRun, String> {
    use crate::checkpoint::coordinator::{Action, CheckpointKind, Coordinator, CoordinatorConfig};
    use crate::checkpoint::manifest::{find_latest, persist};
    use crate::element::BarrierKind;

    let plan = Arc::new(plan);
    let disk = FillableDisk { inner: storage.clone(), full: Arc::new(std::sync::atomic::AtomicBool::new(false)) };
    let mut crashes = schedule.crash_at_steps.clone();
    crashes.sort_unstable();
    crashes.reverse();
    let mut step = 0_u64;
    let mut run = CheckpointedRun {
        storage: storage.clone(),
        checkpoints_completed: 0,
        recoveries: 0,
        restored_from_checkpoint: 0,
        task_failures: 0,
        checkpoints_aborted: 0,
        in_flight_acks: 0,
        step_count: 0,
    };
    // A task's `Err` fails the job attempt: restart from the latest checkpoint, as a crash does
    // (without losing unsynced data: the process lives on).
    macro_rules! or_restart {
        ($result:expr, $attempt:lifetime) => {
            match $result {
                Ok(value) => value,
                Err(error) => {
                    run.task_failures += 1;
                    if run.task_failures > TASK_FAILURES_MAX {
                        return Err(format!("{} task failures, the last: {error}", run.task_failures));
                    }
                    continue $attempt;
                }
            }
        };
    }
    'attempt: loop {
        let recovery = find_latest(&mut storage.clone(), &plan.graph.name).map_err(|e| e.to_string())?;
        let restored = recovery.manifest.map(Arc::new);
        run.restored_from_checkpoint += u64::from(restored.is_some());
        let options = NodeOptions {
            checkpointing: true,
            restore: restored.clone(),
            alignment_timeout_ms: alignment.timeout_steps,
        };
        let mut nodes = Vec::new();
        for index in 0..plan.node_count {
            let mut backends = |_, range| Ok(Box::new(HeapBackend::new(range)) as Box<dyn crate::state::StateBackend>);
            nodes.push(or_restart!(
                Node::new(plan.clone(), index, Box::new(disk.clone()), &mut backends, options.clone()),
                'attempt
            ));
        }
        let config = CoordinatorConfig {
            interval_ms: schedule.interval_steps,
            timeout_ms: 1 << 40,
            concurrent_max: 1,
            retained_count: 2,
        };
        let mut coordinator = Coordinator::new(
            config,
            &plan.graph.name,
            plan.graph.max_parallelism.get(),
            plan.graph.subtasks(),
            restored.as_deref().cloned(),
        );
        let mut held: Vec<Held> = vec![None; nodes.len()];
        // Snapshot files being written (the asynchronous part), with the step they are done at.
        let mut writing: VecDeque<PendingWrites> = VecDeque::new();
        loop {
            step += 1;
            assert!(step < CHECKPOINTED_STEPS_MAX, "checkpointed run stuck");
            let now = Instant(step);
            let full = schedule.disk_full_steps.iter().any(|&(start, end)| (start..end).contains(&step));
            disk.full.store(full, std::sync::atomic::Ordering::Relaxed);
            if schedule.stop_at_step == Some(step) {
                storage.0.lock().expect("storage lock").crash();
                run.step_count = step;
                return Ok(run);
            }
            if crashes.last() == Some(&step) {
                crashes.pop();
                storage.0.lock().expect("storage lock").crash();
                run.recoveries += 1;
                continue 'attempt;
            }
            while writing.front().is_some_and(|(due, ..)| *due <= step) {
                let (_, checkpoint, subtask, writes) = writing.pop_front().expect("checked above");
                let mut files = Vec::new();
                for write in writes {
                    let mut disk = disk.clone();
                    files.extend(or_restart!(write.write(&mut disk), 'attempt));
                }
                nodes[usize::from(plan.node_of(subtask))].handle_snapshot_written(checkpoint, subtask, files);
            }
            coordinator.handle_timeout(now);
            while let Some(action) = coordinator.poll_action() {
                match action {
                    Action::Trigger { checkpoint, kind } => {
                        let barrier_kind = match kind {
                            CheckpointKind::Checkpoint if alignment.unaligned => BarrierKind::Unaligned,
                            _ => BarrierKind::Aligned,
                        };
                        for node in nodes.iter_mut() {
                            or_restart!(node.handle_checkpoint_trigger(now, checkpoint, barrier_kind), 'attempt);
                        }
                    }
                    Action::Persist { manifest } => match persist(&mut disk.clone(), &manifest) {
                        Ok(()) => coordinator.handle_persisted(manifest.checkpoint).map_err(|e| e.to_string())?,
                        Err(error) => coordinator
                            .handle_persist_failed(manifest.checkpoint, &error.to_string())
                            .map_err(|e| e.to_string())?,
                    },
                    Action::NotifyComplete { checkpoint } => {
                        run.checkpoints_completed += 1;
                        for node in nodes.iter_mut() {
                            or_restart!(node.handle_checkpoint_complete(now, checkpoint), 'attempt);
                        }
                    }
                    Action::Abort { .. } => run.checkpoints_aborted += 1,
                    Action::Discard { files, .. } => {
                        for file in files {
                            let _ = storage.clone().delete(&file);
                        }
                    }
                }
            }
            for index in 0..nodes.len() {
                if !nodes[index].is_finished() {
                    or_restart!(nodes[index].handle_step(now), 'attempt);
                }
                while let Some(event) = nodes[index].poll_event() {
                    match event {
                        Event::CheckpointAck { checkpoint, snapshot } => {
                            run.in_flight_acks += u64::from(snapshot.files.iter().any(|f| f.contains("/inflight-")));
                            coordinator.handle_ack(checkpoint, snapshot).map_err(|e| e.to_string())?;
                        }
                        // The asynchronous part: written a step later, while the nodes go on.
                        Event::SnapshotWrites { checkpoint, subtask, writes } => {
                            writing.push_back((step + 1, checkpoint, subtask, writes))
                        }
                        Event::TaskFinished { .. } => {}
                    }
                }
                move_output(&plan, &mut nodes, &mut held, index, now);
            }
            if nodes.iter().all(Node::is_done) {
                run.step_count = step;
                return Ok(run);
            }
        }
    }
}

/// Window rows `(key, window start) -> (count, sum)`; panics on a duplicate row (output twice).
pub fn window_rows(batches: &[RecordBatch]) -> BTreeMap<(u64, i64), (u64, i64)> {
    let mut rows = BTreeMap::new();
    for batch in batches {
        let column = |i: usize| batch.column(i).clone();
        let keys = column(0);
        let keys = keys.as_any().downcast_ref::<UInt64Array>().expect("key column");
        let starts = column(1);
        let starts = starts.as_any().downcast_ref::<Int64Array>().expect("window_start column");
        let ends = column(2);
        let ends = ends.as_any().downcast_ref::<Int64Array>().expect("window_end column");
        let counts = column(3);
        let counts = counts.as_any().downcast_ref::<UInt64Array>().expect("count column");
        let sums = column(4);
        let sums = sums.as_any().downcast_ref::<Int64Array>().expect("sum column");
        for row in 0..batch.num_rows() {
            assert!(ends.value(row) > starts.value(row));
            let previous = rows.insert((keys.value(row), starts.value(row)), (counts.value(row), sums.value(row)));
            assert!(
                previous.is_none(),
                "window row for key {} at {} emitted twice",
                keys.value(row),
                starts.value(row)
            );
        }
    }
    rows
}

/// The W2 reference: a plain `BTreeMap` fold over the generated records, windows of `size_ms`.
pub fn w2_reference(record_count: u64, size_ms: i64) -> BTreeMap<(u64, i64), (u64, i64)> {
    let mut model: BTreeMap<(u64, i64), (u64, i64)> = BTreeMap::new();
    for i in 0..record_count {
        let record = workload::record(i);
        let start = record.ts_ms - record.ts_ms.rem_euclid(size_ms);
        let entry = model.entry((record.key, start)).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += record.value;
    }
    model
}

/// The W1 reference: the `(key, ts_ms)` of every record with an even value, sorted.
pub fn w1_reference(record_count: u64) -> Vec<(u64, i64)> {
    let mut rows: Vec<(u64, i64)> = (0..record_count)
        .map(workload::record)
        .filter(|record| record.value % 2 == 0)
        .map(|record| (record.key, record.ts_ms))
        .collect();
    rows.sort_unstable();
    rows
}

/// The `(key, ts_ms)` rows of W1 output batches, sorted.
pub fn w1_rows(batches: &[RecordBatch]) -> Vec<(u64, i64)> {
    let mut rows = Vec::new();
    for batch in batches {
        let keys = batch.column(0).as_any().downcast_ref::<UInt64Array>().expect("key column").clone();
        let times = batch.column(1).as_any().downcast_ref::<Int64Array>().expect("ts_ms column").clone();
        assert_eq!(keys.null_count() + times.null_count(), 0);
        rows.extend(keys.values().iter().copied().zip(times.values().iter().copied()));
    }
    rows.sort_unstable();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{w1_job, w2_job, W2_WINDOW_SIZE_MS};

    // Goal: W2 computes exactly the reference windows, at any parallelism and batch size, on one
    // node or several. Method: compare committed output with a BTreeMap fold over the same records.
    #[test]
    fn w2_matches_reference_model() {
        let record_count = 30_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        for (parallelism, node_count, batch_size) in [(1, 1, 1_000), (3, 1, 777), (4, 4, 256), (2, 2, 5_000)] {
            let graph = w2_job(record_count, parallelism, batch_size).unwrap();
            let mut run = run_in_memory(PhysicalPlan::new(graph, node_count)).unwrap();
            let rows = window_rows(&run.committed("w2").unwrap());
            assert_eq!(rows, expected, "parallelism {parallelism}, nodes {node_count}, batch {batch_size}");
            assert_eq!(run.metrics.records_in, record_count);
            assert_eq!(run.metrics.records_out, expected.len() as u64);
            assert_eq!(run.metrics.records_late_dropped, 0);
            assert_eq!(run.metrics.state_size_bytes, 0, "every window fired and was cleared");
        }
    }

    // Goal: W1 (filter and projection) keeps exactly the reference rows.
    #[test]
    fn w1_matches_reference_model() {
        let record_count = 20_000;
        for (parallelism, node_count) in [(1, 1), (3, 3)] {
            let graph = w1_job(record_count, parallelism, 999).unwrap();
            let mut run = run_in_memory(PhysicalPlan::new(graph, node_count)).unwrap();
            assert_eq!(w1_rows(&run.committed("w1").unwrap()), w1_reference(record_count));
        }
    }

    /// Storage whose disk is full: every write fails, as `ENOSPC` does.
    struct FullDisk(SharedMemStorage);

    impl Storage for FullDisk {
        fn write(&mut self, path: &str, _data: &[u8]) -> Result<(), StorageError> {
            Err(StorageError::Full { path: path.to_string() })
        }
        fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
            self.0.sync_file(path)
        }
        fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
            self.0.rename(from, to)
        }
        fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
            self.0.sync_dir(dir)
        }
        fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
            self.0.read(path)
        }
        fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
            self.0.list(dir)
        }
        fn delete(&mut self, path: &str) -> Result<(), StorageError> {
            self.0.delete(path)
        }
    }

    // Goal: a full disk fails the job with an error that names the file and says the disk is
    // full, and nothing becomes visible as committed output. Method: W2 on storage refusing writes.
    #[test]
    fn full_disk_fails_the_job_and_commits_nothing() {
        let storage = SharedMemStorage::default();
        let plan = PhysicalPlan::new(w2_job(5_000, 2, 500).unwrap(), 2);
        let shared = storage.clone();
        let error = run_in_memory_with(plan, storage.clone(), move |_| Box::new(FullDisk(shared.clone())))
            .err()
            .expect("the job fails");
        let message = error.to_string();
        assert!(message.contains("(w2): storage is full while writing \"output/w2/.pending/part-"), "{message}");
        let mut storage = storage;
        assert!(read_committed(&mut storage, "w2").unwrap().is_empty());
    }

    // Goal: exactly once through crashes: with checkpoints and crashes at random steps (every node
    // lost, unsynced data lost), recovery from the latest completed checkpoint commits exactly the
    // reference windows, each once. Method: seeded crash schedules (the seed is printed), W2 at
    // parallelism 2 on 2 nodes, compared with the BTreeMap reference.
    #[test]
    fn checkpointed_runs_are_exactly_once_through_crashes() {
        let record_count = 40_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        let plan = || PhysicalPlan::new(w2_job(record_count, 2, 100).unwrap(), 2);
        let (mut recoveries, mut restored) = (0, 0);
        for seed in 0..12_u64 {
            println!("seed {seed} (replay: this test; the schedule is derived from the seed)");
            let mut rng = crate::state::testing::Lcg::new(seed);
            let interval_steps = 2 + rng.below(10);
            // A run without crashes says how long a run is; crashes fall anywhere in the runs.
            let dry = run_checkpointed(
                plan(),
                &CrashSchedule { interval_steps, crash_at_steps: vec![], disk_full_steps: vec![], stop_at_step: None },
            )
            .unwrap();
            let crash_count = 1 + rng.below(4);
            let mut crash_at_steps: Vec<u64> =
                (0..crash_count).map(|_| 1 + rng.below(dry.step_count + dry.step_count / 4)).collect();
            // And one in the last steps, where the final output is being committed.
            crash_at_steps.push(dry.step_count - rng.below(4));
            let schedule =
                CrashSchedule { interval_steps, crash_at_steps, disk_full_steps: vec![], stop_at_step: None };
            println!("  {schedule:?}, dry run {} steps", dry.step_count);
            let run = run_checkpointed(plan(), &schedule).unwrap();
            let mut storage = run.storage.clone();
            let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
            assert_eq!(rows, expected, "seed {seed}: {schedule:?}");
            println!(
                "  {} steps, {} checkpoints completed, {} recoveries ({} from a checkpoint)",
                run.step_count, run.checkpoints_completed, run.recoveries, run.restored_from_checkpoint
            );
            recoveries += run.recoveries;
            restored += run.restored_from_checkpoint;
        }
        assert!(
            recoveries >= 18 && restored >= 12,
            "the schedules crash, and recover from checkpoints: {recoveries}, {restored}"
        );
    }

    // Goal: unaligned checkpoints, and aligned ones that time out into unaligned, are exactly once
    // through crashes: the elements a barrier overtook are stored with the snapshot and replayed
    // on recovery. Method: seeded crash schedules, W2 at parallelism 3 (three inputs per window),
    // the output compared with the reference; the runs must really store in-flight data.
    #[test]
    fn unaligned_checkpoints_are_exactly_once_through_crashes() {
        let record_count = 40_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        let mut in_flight = 0;
        for seed in 0..10_u64 {
            let mut rng = crate::state::testing::Lcg::new(seed);
            let alignment = if seed % 2 == 0 {
                Alignment { unaligned: true, timeout_steps: None }
            } else {
                Alignment { unaligned: false, timeout_steps: Some(rng.below(3)) }
            };
            println!("seed {seed}: {alignment:?}");
            let crash_at_steps = (0..1 + rng.below(3)).map(|_| 1 + rng.below(80)).collect();
            let schedule = CrashSchedule {
                interval_steps: 2 + rng.below(4),
                crash_at_steps,
                disk_full_steps: vec![],
                stop_at_step: None,
            };
            let plan = PhysicalPlan::new(w2_job(record_count, 3, 100).unwrap(), 3);
            let run = run_checkpointed_with(plan, &schedule, SharedMemStorage::default(), alignment).unwrap();
            let mut storage = run.storage.clone();
            assert_eq!(
                window_rows(&read_committed(&mut storage, "w2").unwrap()),
                expected,
                "seed {seed}: {schedule:?}"
            );
            println!("  {} recoveries, {} acknowledgements with in-flight data", run.recoveries, run.in_flight_acks);
            in_flight += run.in_flight_acks;
        }
        assert!(in_flight > 10, "unaligned snapshots overtook elements: {in_flight}");
    }

    // Goal: a full disk during checkpoints and sink writes fails tasks and aborts checkpoints, the
    // job restarts from the latest completed checkpoint, and once space is back the committed
    // output is still exactly the reference. Method: seeded spans of a full disk, with crashes.
    #[test]
    fn checkpointed_runs_survive_a_full_disk() {
        let record_count = 40_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        let (mut failures, mut aborted) = (0, 0);
        for seed in 0..6_u64 {
            println!("seed {seed}");
            let mut rng = crate::state::testing::Lcg::new(seed);
            let disk_full_steps: Vec<(u64, u64)> = (0..2)
                .map(|_| {
                    let start = 5 + rng.below(50);
                    (start, start + 1 + rng.below(8))
                })
                .collect();
            let crash_at_steps = vec![10 + rng.below(60)];
            let schedule = CrashSchedule { interval_steps: 3, crash_at_steps, disk_full_steps, stop_at_step: None };
            let run = run_checkpointed(PhysicalPlan::new(w2_job(record_count, 2, 100).unwrap(), 2), &schedule).unwrap();
            let mut storage = run.storage.clone();
            assert_eq!(
                window_rows(&read_committed(&mut storage, "w2").unwrap()),
                expected,
                "seed {seed}: {schedule:?}"
            );
            println!("  {} task failures, {} checkpoints aborted", run.task_failures, run.checkpoints_aborted);
            failures += run.task_failures;
            aborted += run.checkpoints_aborted;
        }
        assert!(failures > 0 && aborted > 0, "the full disk failed tasks ({failures}) and checkpoints ({aborted})");
    }

    // Goal: a job stopped (killed) at one parallelism resumes from its latest checkpoint at
    // another — key groups move between window subtasks, source splits between source subtasks,
    // pending sink output is committed — and the committed output is exactly the reference.
    // Method: W2 at parallelism p stopped at a seeded step, continued at q, for growing and shrinking.
    #[test]
    fn checkpoints_restore_at_another_parallelism() {
        let record_count = 40_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        for (seed, (before, after)) in [(2_u16, 3_u16), (3, 1), (1, 4), (4, 2)].into_iter().enumerate() {
            println!("seed {seed}: parallelism {before} -> {after}");
            let mut rng = crate::state::testing::Lcg::new(seed as u64);
            let stop = CrashSchedule {
                interval_steps: 3,
                crash_at_steps: vec![],
                disk_full_steps: vec![],
                stop_at_step: Some(20 + rng.below(20)),
            };
            let first =
                run_checkpointed(PhysicalPlan::new(w2_job(record_count, before, 100).unwrap(), before), &stop).unwrap();
            assert!(first.checkpoints_completed > 0, "a checkpoint to resume from");
            let go_on = CrashSchedule { stop_at_step: None, ..stop };
            let plan = PhysicalPlan::new(w2_job(record_count, after, 100).unwrap(), after);
            let second = run_checkpointed_on(plan, &go_on, first.storage.clone()).unwrap();
            assert_eq!(second.restored_from_checkpoint, 1, "the second run resumed");
            let mut storage = second.storage.clone();
            assert_eq!(window_rows(&read_committed(&mut storage, "w2").unwrap()), expected, "{before} -> {after}");
        }
    }

    /// A user's transactional sink, as the trait is meant to be used: each transaction is a file
    /// `kv/txn-<vertex>-<subtask>-<checkpoint>`, and committing it writes a marker
    /// `kv/committed/<its name>`. Readers see the rows of transactions that have a marker.
    struct MarkerSink {
        subtask: crate::dataflow::SubtaskId,
        rows: Vec<RecordBatch>,
    }

    impl crate::dataflow::sink::TransactionalSink for MarkerSink {
        fn name(&self) -> &str {
            "kv"
        }
        fn write(&mut self, _: &mut crate::dataflow::Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
            self.rows.push(batch);
            Ok(())
        }
        fn pre_commit(
            &mut self,
            context: &mut crate::dataflow::Context<'_>,
            checkpoint: crate::element::CheckpointId,
        ) -> Result<crate::dataflow::OperatorSnapshot, OperatorError> {
            let name = format!("txn-{}-{}-{}", self.subtask.vertex.0, self.subtask.index, checkpoint.0);
            let path = format!("kv/{name}");
            let schema = crate::dataflow::window::TumblingWindowCountSum::schema(arrow_schema::Field::new(
                "key",
                arrow_schema::DataType::UInt64,
                false,
            ));
            let bytes = crate::dataflow::sink::encode_ipc_file(&schema, &std::mem::take(&mut self.rows))?;
            context.storage.write(&path, &bytes)?;
            context.storage.sync_file(&path)?;
            context.storage.sync_dir("kv")?;
            Ok(crate::dataflow::OperatorSnapshot { files: vec![], pending_output: vec![path], writes: vec![] })
        }
        fn commit(
            &mut self,
            context: &mut crate::dataflow::Context<'_>,
            handles: &[String],
        ) -> Result<(), OperatorError> {
            for handle in handles {
                let marker = format!("kv/committed/{}", handle.trim_start_matches("kv/"));
                context.storage.write(&marker, b"")?;
                context.storage.sync_file(&marker)?;
            }
            context.storage.sync_dir("kv/committed")?;
            Ok(())
        }
        fn recover(
            &mut self,
            _: &mut crate::dataflow::Context<'_>,
            _: &[crate::checkpoint::manifest::TaskSnapshot],
        ) -> Result<(), OperatorError> {
            // Transactions of epochs that never completed have no marker; their files are
            // overwritten when the same checkpoint ids come again.
            Ok(())
        }
    }

    fn marker_sink_rows(storage: &mut SharedMemStorage) -> BTreeMap<(u64, i64), (u64, i64)> {
        let mut batches = Vec::new();
        for marker in storage.list("kv/committed").unwrap() {
            batches.extend(
                crate::dataflow::sink::decode_ipc_file(storage.read(&format!("kv/{marker}")).unwrap()).unwrap(),
            );
        }
        window_rows(&batches)
    }

    // Goal: a user's own transactional sink, written against the trait only, is exactly once
    // through crashes, like the file sink. Method: W2 into the marker sink under seeded crashes.
    #[test]
    fn user_transactional_sinks_are_exactly_once() {
        use crate::dataflow::graph::SourceSpec;
        use crate::dataflow::sink::{SinkFactory, TransactionalSink};
        let record_count = 30_000;
        let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
        for seed in 0..4_u64 {
            println!("seed {seed}");
            let mut rng = crate::state::testing::Lcg::new(seed);
            let factory = SinkFactory::new(|subtask| {
                Box::new(MarkerSink { subtask, rows: Vec::new() }) as Box<dyn TransactionalSink>
            });
            let graph = crate::dataflow::JobBuilder::new("w2-kv")
                .source(
                    "generator",
                    SourceSpec::Generator {
                        record_count,
                        batch_size: 100,
                        keys: Default::default(),
                        splits: Default::default(),
                    },
                    2,
                )
                .unwrap()
                .assign_watermarks(crate::workload::W2_OUT_OF_ORDERNESS_MS)
                .unwrap()
                .key_by("key", 2)
                .unwrap()
                .tumbling_window_count_sum(W2_WINDOW_SIZE_MS, "value")
                .unwrap()
                .sink("kv", factory)
                .unwrap();
            let crash_at_steps = (0..3).map(|_| 1 + rng.below(60)).collect();
            let schedule =
                CrashSchedule { interval_steps: 3, crash_at_steps, disk_full_steps: vec![], stop_at_step: None };
            let mut run = run_checkpointed(PhysicalPlan::new(graph, 2), &schedule).unwrap();
            assert_eq!(marker_sink_rows(&mut run.storage), expected, "seed {seed}: {schedule:?}");
        }
    }

    // Goal: the same plan gives the same committed bytes every time (determinism of the kernel).
    #[test]
    fn in_memory_runs_are_deterministic() {
        let committed = || {
            let run = run_in_memory(PhysicalPlan::new(w2_job(5_000, 3, 100).unwrap(), 3)).unwrap();
            let mut storage = run.storage.0.lock().unwrap().clone();
            let files = storage.list("output/w2").unwrap();
            files.iter().map(|f| (f.clone(), storage.read(&format!("output/w2/{f}")).unwrap())).collect::<Vec<_>>()
        };
        let first = committed();
        assert!(!first.is_empty());
        assert_eq!(first, committed());
    }
}
