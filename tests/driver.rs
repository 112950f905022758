//! The tokio driver on real disks against the pure kernel run: the same input gives the same output.

use std::sync::Arc;

use sabot::driver::{self, CheckpointSettings, CheckpointStats, DriverConfig, Progress, StateKind, TransportKind};
use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::env::Storage;
use sabot_kernel::testing::{run_in_memory, w1_reference, w1_rows, w2_reference, window_rows};
use sabot_kernel::workload::{w1_job, w2_job, W2_WINDOW_SIZE_MS};

fn run_driver(
    plan: PhysicalPlan,
    state: StateKind,
    transport: TransportKind,
    dir: &std::path::Path,
) -> sabot_kernel::node::NodeMetrics {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(plan.node_count))
        .enable_all()
        .build()
        .unwrap();
    let progress = Progress::default();
    let config = DriverConfig {
        data_dir: dir.to_path_buf(),
        state,
        checkpoints: None,
        restore: None,
        stop_with_savepoint_after_ms: None,
        transport,
    };
    runtime
        .block_on(driver::run(Arc::new(plan), config, progress.clone(), CheckpointStats::default()))
        .expect("driver run");
    progress.total()
}

// Goal: with checkpoints on tokio + RocksDB — aligned, unaligned, and aligned with a timeout into
// unaligned, in-process and over TCP (barriers and credits crossing real connections) — output
// is committed only through completed checkpoints, and it is exactly the reference.
// Method: W2 at parallelism 3 with a checkpoint every 2 ms.
#[test]
fn w2_with_checkpoints_equals_reference() {
    let record_count = 60_000;
    let (inproc, tcp) = (TransportKind::InProcess, TransportKind::TcpLoopback);
    for (unaligned, alignment_timeout_ms, transport) in
        [(false, None, inproc), (true, None, inproc), (false, Some(0), inproc), (false, None, tcp), (true, None, tcp)]
    {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(3).enable_all().build().unwrap();
        let checkpoints =
            Some(CheckpointSettings { interval_ms: 2, retained_count: 2, unaligned, alignment_timeout_ms });
        let config = DriverConfig {
            data_dir: dir.path().to_path_buf(),
            state: StateKind::RocksDb,
            checkpoints,
            restore: None,
            stop_with_savepoint_after_ms: None,
            transport,
        };
        let plan = Arc::new(PhysicalPlan::new(w2_job(record_count, 3, 500).unwrap(), 3));
        let stats = CheckpointStats::default();
        let progress = Progress::default();
        runtime.block_on(driver::run(plan, config, progress.clone(), stats.clone())).expect("driver run");
        let metrics = progress.total();
        assert!(metrics.alignment_count > 0, "windows took snapshots");
        if unaligned {
            assert_eq!(metrics.alignment_ms_max, 0, "unaligned snapshots hold no input");
        }
        let mut storage = LocalFsStorage::open(dir.path()).unwrap();
        let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
        assert_eq!(
            rows,
            w2_reference(record_count, W2_WINDOW_SIZE_MS),
            "unaligned {unaligned}, timeout {alignment_timeout_ms:?}, {transport:?}"
        );
        let (completed, _) = stats.completed_aborted();
        assert!(completed >= 1, "the final output was committed by a checkpoint");
        assert!(storage.list("checkpoints").unwrap().iter().any(|name| name == "_latest"));
    }
}

// Goal: tokio + RocksDB + local disk commit exactly what the pure in-memory kernel run commits,
// which is exactly the BTreeMap reference, at several parallelisms and batch sizes, in-process
// and over TCP (where nodes that finish close their connections to peers still running).
// Method: run W2 both ways on the same plan; compare the committed window rows.
#[test]
fn w2_on_tokio_and_rocksdb_equals_in_memory_run() {
    let record_count = 60_000;
    let reference = w2_reference(record_count, W2_WINDOW_SIZE_MS);
    let (inproc, tcp) = (TransportKind::InProcess, TransportKind::TcpLoopback);
    for (parallelism, batch_size, state, transport) in [
        (1, 1_000, StateKind::RocksDb, inproc),
        (2, 512, StateKind::RocksDb, inproc),
        (3, 4_096, StateKind::Heap, inproc),
        (3, 700, StateKind::Heap, tcp),
        (2, 1_000, StateKind::RocksDb, tcp),
    ] {
        let graph = w2_job(record_count, parallelism, batch_size).unwrap();
        let mut in_memory = run_in_memory(PhysicalPlan::new(graph.clone(), parallelism)).unwrap();
        let expected = window_rows(&in_memory.committed("w2").unwrap());
        assert_eq!(expected, reference);

        let dir = tempfile::tempdir().unwrap();
        let metrics = run_driver(PhysicalPlan::new(graph, parallelism), state.clone(), transport, dir.path());
        let mut storage = LocalFsStorage::open(dir.path()).unwrap();
        let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
        assert_eq!(rows, expected, "parallelism {parallelism}, batch {batch_size}, {state:?}, {transport:?}");
        assert_eq!(metrics.records_in, record_count);
        assert_eq!(metrics.records_out, reference.len() as u64);
        // Committed means moved out of the pending directory: nothing is left there.
        assert_eq!(storage.list("output/w2/.pending").unwrap(), Vec::<String>::new());
        if state == StateKind::RocksDb {
            assert!(dir.path().join("state/w2").is_dir(), "RocksDB state was on disk");
        }
    }
}

// Goal: the stateless pipeline (W1) on the driver keeps exactly the reference rows.
#[test]
fn w1_on_tokio_equals_reference() {
    let dir = tempfile::tempdir().unwrap();
    let plan = PhysicalPlan::new(w1_job(30_000, 2, 1_000).unwrap(), 2);
    run_driver(plan, StateKind::Heap, TransportKind::InProcess, dir.path());
    let mut storage = LocalFsStorage::open(dir.path()).unwrap();
    assert_eq!(w1_rows(&read_committed(&mut storage, "w1").unwrap()), w1_reference(30_000));
}

// Goal: a state directory that cannot be opened is an error naming the subtask, not a panic.
// Method: put a file where RocksDB wants its directory.
#[test]
fn unusable_state_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(dir.path().join("state/w2"), b"not a directory").unwrap();
    let plan = Arc::new(PhysicalPlan::new(w2_job(1_000, 1, 100).unwrap(), 1));
    let config = DriverConfig {
        data_dir: dir.path().to_path_buf(),
        state: StateKind::RocksDb,
        checkpoints: None,
        restore: None,
        stop_with_savepoint_after_ms: None,
        transport: TransportKind::InProcess,
    };
    let error = driver::build_nodes(&plan, &config).err().expect("an error");
    let message = error.to_string();
    assert!(message.contains("subtask 1.0 (state backend): state backend failed:"), "{message}");
    assert!(message.contains("state/w2/1-0"), "the message names the directory: {message}");
}

// Goal: on tokio, watermarks made in the source align across the nodes of a process: the source
// subtask reading one split (on node 1) would run ahead of the one reading two (on node 0), and
// the shared minimum pauses it (only the other node's minimum can: its drift bound is above
// what node 0's own splits ever differ by); the output is exactly W2's. With stalling splits
// and idleness, every record is counted once or dropped as late, and the run ends.
// Method: three splits on two source subtasks on two nodes, 60,000 records; then stalls of
// 3 ms every 1,000 records with a 1 ms idle timeout.
#[test]
fn split_watermarks_align_across_nodes_on_tokio() {
    use sabot_kernel::dataflow::source::{GeneratorSplits, GeneratorStalls};
    use sabot_kernel::workload::{self, w2_job_split_watermarks, SplitWatermarkOptions, W2Options};
    let record_count = 60_000;
    let options = W2Options {
        record_count,
        source_parallelism: 2,
        parallelism: 2,
        batch_size: 100,
        out_of_orderness_ms: workload::W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: W2_WINDOW_SIZE_MS,
        keys: workload::Keys::Uniform,
    };
    let aligned = SplitWatermarkOptions {
        splits: GeneratorSplits { count: Some(3), stalls: None },
        idle_timeout_ms: None,
        emit_interval_ms: 0,
        max_drift_ms: Some(3_000),
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PhysicalPlan::new(w2_job_split_watermarks(options, aligned).unwrap(), 2);
    let metrics = run_driver(plan, StateKind::Heap, TransportKind::InProcess, dir.path());
    let mut storage = LocalFsStorage::open(dir.path()).unwrap();
    let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
    assert_eq!(rows, w2_reference(record_count, W2_WINDOW_SIZE_MS));
    println!("aligned: {} reads with paused splits", metrics.source_paused_count);
    assert!(metrics.source_paused_count > 0, "the faster split was paused");

    let stalls = Some(GeneratorStalls { every_records: 1_000, stall_ms: 3 });
    let idle = SplitWatermarkOptions {
        splits: GeneratorSplits { count: Some(3), stalls },
        idle_timeout_ms: Some(1),
        ..aligned
    };
    let dir = tempfile::tempdir().unwrap();
    let plan = PhysicalPlan::new(w2_job_split_watermarks(options, idle).unwrap(), 2);
    let metrics = run_driver(plan, StateKind::Heap, TransportKind::InProcess, dir.path());
    let mut storage = LocalFsStorage::open(dir.path()).unwrap();
    let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
    let counted: u64 = rows.values().map(|(count, _)| count).sum();
    println!(
        "stalls and idleness: {} times a source went idle, {} late of {record_count}",
        metrics.source_idle_count, metrics.records_late_dropped
    );
    assert_eq!(metrics.records_in, record_count);
    assert_eq!(counted + metrics.records_late_dropped, record_count, "each record counted or dropped once");
}
