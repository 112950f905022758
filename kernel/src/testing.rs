//! Test support for the kernel and its dependents: in-memory runs and reference models.
//!
//! `run_in_memory` steps every node of a plan in one thread, moving elements between them in a
//! fixed order: the pure kernel run that real drivers are compared with.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, Int64Array, RecordBatch, UInt64Array};

use crate::dataflow::sink::read_committed;
use crate::dataflow::{OperatorError, PhysicalPlan};
use crate::env::{MemStorage, Storage, StorageError};
use crate::node::{Node, NodeError, NodeMetrics, Step};
use crate::state::HeapBackend;
use crate::time::Instant;
use crate::workload;

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
            Node::new(plan.clone(), index, storage_of(index), &mut |_, range| {
                Ok(Box::new(HeapBackend::new(range)))
            })
            .expect("heap backends do not fail")
        })
        .collect();
    let now = Instant(0);
    let mut step_count = 0_u64;
    // An element taken from a node's outbox whose receiver had no room yet: the node's one in flight.
    let mut held: Vec<Option<(crate::env::ChannelId, crate::element::Element)>> =
        vec![None; nodes.len()];
    loop {
        let mut busy = false;
        for index in 0..nodes.len() {
            let step = nodes[index].handle_step(now)?;
            step_count += 1;
            busy |= step == Step::Busy;
            while nodes[index].poll_event().is_some() {}
            // Move what this node sends to its receivers while they have room; the rest waits.
            loop {
                let Some((channel, element)) =
                    held[index].take().or_else(|| nodes[index].poll_transmit())
                else {
                    break;
                };
                let receiver = usize::from(plan.node_of(plan.channel(channel).to));
                if nodes[receiver].inbox_room() == 0 {
                    held[index] = Some((channel, element));
                    break;
                }
                nodes[receiver].handle_element(now, channel, element);
                busy = true;
            }
        }
        if nodes.iter().all(Node::is_finished) {
            assert!(
                held.iter().all(Option::is_none),
                "elements left in flight after every node finished"
            );
            break;
        }
        assert!(busy, "in-memory run stalled: no node can make progress");
    }
    let metrics: NodeMetrics = nodes.iter().map(Node::metrics).sum();
    Ok(InMemoryRun {
        storage,
        metrics,
        step_count,
    })
}

/// Window rows `(key, window start) -> (count, sum)`; panics on a duplicate row (output twice).
pub fn window_rows(batches: &[RecordBatch]) -> BTreeMap<(u64, i64), (u64, i64)> {
    let mut rows = BTreeMap::new();
    for batch in batches {
        let column = |i: usize| batch.column(i).clone();
        let keys = column(0);
        let keys = keys
            .as_any()
            .downcast_ref::<UInt64Array>()
            .expect("key column");
        let starts = column(1);
        let starts = starts
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("window_start column");
        let ends = column(2);
        let ends = ends
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("window_end column");
        let counts = column(3);
        let counts = counts
            .as_any()
            .downcast_ref::<UInt64Array>()
            .expect("count column");
        let sums = column(4);
        let sums = sums
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("sum column");
        for row in 0..batch.num_rows() {
            assert!(ends.value(row) > starts.value(row));
            let previous = rows.insert(
                (keys.value(row), starts.value(row)),
                (counts.value(row), sums.value(row)),
            );
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
        let keys = batch
            .column(0)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .expect("key column")
            .clone();
        let times = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("ts_ms column")
            .clone();
        assert_eq!(keys.null_count() + times.null_count(), 0);
        rows.extend(
            keys.values()
                .iter()
                .copied()
                .zip(times.values().iter().copied()),
        );
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
        for (parallelism, node_count, batch_size) in
            [(1, 1, 1_000), (3, 1, 777), (4, 4, 256), (2, 2, 5_000)]
        {
            let graph = w2_job(record_count, parallelism, batch_size).unwrap();
            let mut run = run_in_memory(PhysicalPlan::new(graph, node_count)).unwrap();
            let rows = window_rows(&run.committed("w2").unwrap());
            assert_eq!(
                rows, expected,
                "parallelism {parallelism}, nodes {node_count}, batch {batch_size}"
            );
            assert_eq!(run.metrics.records_in, record_count);
            assert_eq!(run.metrics.records_out, expected.len() as u64);
            assert_eq!(run.metrics.records_late_dropped, 0);
            assert_eq!(
                run.metrics.state_size_bytes, 0,
                "every window fired and was cleared"
            );
        }
    }

    // Goal: W1 (filter and projection) keeps exactly the reference rows.
    #[test]
    fn w1_matches_reference_model() {
        let record_count = 20_000;
        for (parallelism, node_count) in [(1, 1), (3, 3)] {
            let graph = w1_job(record_count, parallelism, 999).unwrap();
            let mut run = run_in_memory(PhysicalPlan::new(graph, node_count)).unwrap();
            assert_eq!(
                w1_rows(&run.committed("w1").unwrap()),
                w1_reference(record_count)
            );
        }
    }

    /// Storage whose disk is full: every write fails, as `ENOSPC` does.
    struct FullDisk(SharedMemStorage);

    impl Storage for FullDisk {
        fn write(&mut self, path: &str, _data: &[u8]) -> Result<(), StorageError> {
            Err(StorageError::Full {
                path: path.to_string(),
            })
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
        let error = run_in_memory_with(plan, storage.clone(), move |_| {
            Box::new(FullDisk(shared.clone()))
        })
        .err()
        .expect("the job fails");
        let message = error.to_string();
        assert!(
            message.contains("(w2): storage is full while writing \"output/w2/.pending/part-"),
            "{message}"
        );
        let mut storage = storage;
        assert!(read_committed(&mut storage, "w2").unwrap().is_empty());
    }

    // Goal: the same plan gives the same committed bytes every time (determinism of the kernel).
    #[test]
    fn in_memory_runs_are_deterministic() {
        let committed = || {
            let run = run_in_memory(PhysicalPlan::new(w2_job(5_000, 3, 100).unwrap(), 3)).unwrap();
            let mut storage = run.storage.0.lock().unwrap().clone();
            let files = storage.list("output/w2").unwrap();
            files
                .iter()
                .map(|f| (f.clone(), storage.read(&format!("output/w2/{f}")).unwrap()))
                .collect::<Vec<_>>()
        };
        let first = committed();
        assert!(!first.is_empty());
        assert_eq!(first, committed());
    }
}
