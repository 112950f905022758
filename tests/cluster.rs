//! Exactly once across processes: `sabot coordinator` and `sabot worker` on loopback, workers
//! killed with SIGKILL and restarted, and the job rescaled between numbers of workers.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sabot::driver::cluster::query;
use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::state::testing::Lcg;
use sabot_kernel::testing::{w2_reference, window_rows};
use sabot_kernel::workload::W2_WINDOW_SIZE_MS;

/// The seed of the kill schedule; printed for replay.
const SEED: u64 = 420_261_124;
/// Worker kills in the kill test; the issue asks for at least 10.
const KILL_COUNT: u32 = 10;

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    records: u64,
    /// `w2` unless a test says otherwise.
    job: &'static str,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    fn new(records: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), b"cluster test secret").unwrap();
        Cluster { dir, port: free_port(), records, job: "w2" }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn secret(&self) -> PathBuf {
        self.dir.path().join("secret")
    }

    fn coordinator(&self, workers: u16) -> Child {
        self.coordinator_with(workers, &["--parallelism", "3"])
    }

    /// A coordinator waiting for `workers`; `extra` must give `--parallelism`.
    fn coordinator_with(&self, workers: u16, extra: &[&str]) -> Child {
        Command::new(env!("CARGO_BIN_EXE_sabot"))
            .args(["coordinator", "--workers", &workers.to_string(), "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(extra)
            .args(["--records", &self.records.to_string(), "--batch-size", "1000", "--job", self.job])
            .args(["--checkpoint-interval-ms", "50", "--data-dir", self.data_dir().to_str().unwrap()])
            .arg("--secret-file")
            .arg(self.secret())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the coordinator")
    }

    /// A worker running one node.
    fn worker(&self) -> Child {
        self.worker_with_nodes(1)
    }

    fn worker_with_nodes(&self, nodes: u16) -> Child {
        self.worker_command(nodes).stderr(Stdio::null()).spawn().expect("starting a worker")
    }

    /// A worker running one node whose log the test reads.
    fn worker_logged(&self) -> Child {
        self.worker_command(1).stderr(Stdio::piped()).spawn().expect("starting a worker")
    }

    fn worker_command(&self, nodes: u16) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sabot"));
        command
            .args(["worker", "--coordinator", &format!("127.0.0.1:{}", self.port), "--nodes", &nodes.to_string()])
            .args(["--data-dir", self.data_dir().to_str().unwrap()])
            .arg("--secret-file")
            .arg(self.secret())
            .stdout(Stdio::null());
        command
    }

    /// The id the latest-checkpoint pointer names, 0 before the first.
    fn latest_checkpoint(&self) -> u64 {
        std::fs::read(self.data_dir().join("checkpoints/_latest"))
            .ok()
            .filter(|b| b.len() == 16)
            .map_or(0, |b| u64::from_le_bytes(b[4..12].try_into().unwrap()))
    }

    /// Waits until the pointer names a checkpoint newer than `than`; `false` if the coordinator
    /// ended first.
    fn wait_for_checkpoint_after(&self, than: u64, coordinator: &mut Child) -> bool {
        let started = Instant::now();
        while self.latest_checkpoint() <= than {
            if coordinator.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after {than} in two minutes");
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Checks the committed output against the reference.
    fn check_output(&self) {
        let mut storage = LocalFsStorage::open(self.data_dir()).unwrap();
        // Duplicated rows fail inside window_rows.
        let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
        let expected = w2_reference(self.records, W2_WINDOW_SIZE_MS);
        assert_eq!(rows.len(), expected.len());
        assert!(rows == expected, "committed output differs from the uninterrupted run's");
    }
}

/// Waits for the coordinator to end; its log, and whether it succeeded.
fn finish(coordinator: Child) -> (bool, String) {
    let output = coordinator.wait_with_output().expect("waiting for the coordinator");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

fn kill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reaping");
}

fn reap(workers: Vec<Child>) {
    for mut worker in workers {
        // Workers exit once the coordinator says the job is complete (or is gone).
        let started = Instant::now();
        while worker.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(30), "a worker did not exit after the job");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// Goal: W2 on a coordinator and three worker processes over loopback TCP commits exactly the
// reference output, and every process exits by itself at the end.
#[test]
fn three_workers_commit_the_reference() {
    let cluster = Cluster::new(300_000);
    let coordinator = cluster.coordinator(3);
    let workers: Vec<Child> = (0..3).map(|_| cluster.worker()).collect();
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    reap(workers);
    cluster.check_output();
}

// Goal: watermark alignment spans worker processes: a source whose split runs ahead pauses for
// a split read in another process (the coordinator relays each process's group minima), and
// the output is still W2's. Without the relay, each process would see only its own split, the
// minimum of its group, and never pause. Method: `--job w2-aligned` (two source subtasks whose
// splits pause every 200 and 400 records, so one reads twice as fast; drift 200 ms) on two
// worker processes of one node each; the workers' logs say how often their sources paused.
#[test]
fn alignment_spans_worker_processes() {
    let mut cluster = Cluster::new(20_000);
    cluster.job = "w2-aligned";
    let coordinator = cluster.coordinator_with(2, &["--parallelism", "2"]);
    let workers: Vec<Child> = (0..2).map(|_| cluster.worker_logged()).collect();
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    let mut paused = Vec::new();
    for worker in workers {
        let output = worker.wait_with_output().expect("waiting for a worker");
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        let line = log.lines().find(|line| line.contains("sources paused for watermark alignment"));
        let count: u64 = line
            .and_then(|line| line.split_whitespace().rev().nth(1))
            .and_then(|count| count.parse().ok())
            .unwrap_or_else(|| panic!("no pause count in the worker's log: {log}"));
        paused.push(count);
    }
    println!("sources paused for alignment, per worker: {paused:?}");
    assert!(paused.iter().any(|&count| count > 0), "a source paused for a split in another process: {paused:?}");
    let mut storage = LocalFsStorage::open(cluster.data_dir()).unwrap();
    let rows = window_rows(&read_committed(&mut storage, "w2-aligned").unwrap());
    assert!(rows == w2_reference(cluster.records, W2_WINDOW_SIZE_MS), "the output is W2's");
}

// Goal: a worker killed with SIGKILL at random points (10 times, seeded, the seed printed) and
// restarted fails the attempt; every subtask restarts from the latest completed checkpoint, and
// the committed output equals the uninterrupted run's exactly. Method: each kill waits for a
// checkpoint newer than the one before the previous kill (so the job progresses), then a seeded
// delay, then kills a seeded choice among the three workers.
#[test]
fn worker_kills_keep_exactly_once() {
    println!("seed {SEED} (replay: set SEED in tests/cluster.rs)");
    let mut rng = Lcg::new(SEED);
    let cluster = Cluster::new(2_000_000);
    let mut coordinator = cluster.coordinator(3);
    let mut workers: Vec<Child> = (0..3).map(|_| cluster.worker()).collect();
    let started = Instant::now();
    let mut kills = 0;
    let mut seen = 0;
    while kills < KILL_COUNT {
        if !cluster.wait_for_checkpoint_after(seen, &mut coordinator) {
            break;
        }
        seen = cluster.latest_checkpoint();
        std::thread::sleep(Duration::from_millis(rng.below(800)));
        let victim = rng.below(3) as usize;
        kill(&mut workers[victim]);
        workers[victim] = cluster.worker();
        kills += 1;
    }
    let (ok, log) = finish(coordinator);
    println!("{kills} kills in {:?}\n{log}", started.elapsed());
    assert_eq!(kills, KILL_COUNT, "the job ended before {KILL_COUNT} kills: make it longer; {log}");
    assert!(ok, "the coordinator failed: {log}");
    let attempts = log.lines().filter(|line| line.contains("attempt") && line.contains("with 3 workers")).count();
    assert!(attempts > usize::try_from(KILL_COUNT).unwrap() / 2, "kills failed attempts: {log}");
    reap(workers);
    cluster.check_output();
}

/// Kills the coordinator and every worker (the whole cluster goes down).
fn kill_all(coordinator: &mut Child, workers: &mut Vec<Child>) {
    kill(coordinator);
    for worker in workers.iter_mut() {
        kill(worker);
    }
    workers.clear();
}

// Goal: the job rescales through its checkpoints: it runs on 3 workers, the cluster goes down,
// comes back with 2 workers (subtasks and key groups move between processes), goes down again,
// and finishes on 4; the committed output equals the uninterrupted run's exactly.
#[test]
fn rescaling_three_to_two_to_four_workers() {
    let cluster = Cluster::new(2_000_000);
    let mut workers = Vec::new();
    let mut coordinator = cluster.coordinator(3);
    workers.extend((0..3).map(|_| cluster.worker()));
    assert!(cluster.wait_for_checkpoint_after(2, &mut coordinator), "the job ended before its 3rd checkpoint");
    kill_all(&mut coordinator, &mut workers);

    let before = cluster.latest_checkpoint();
    let mut coordinator = cluster.coordinator(2);
    workers.extend((0..2).map(|_| cluster.worker()));
    assert!(cluster.wait_for_checkpoint_after(before + 2, &mut coordinator), "the job ended on 2 workers");
    kill_all(&mut coordinator, &mut workers);

    let coordinator = cluster.coordinator(4);
    workers.extend((0..4).map(|_| cluster.worker()));
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    assert!(log.contains("attempt 1 with 4 workers (4 nodes), from checkpoint"), "{log}");
    reap(workers);
    cluster.check_output();
}

// Goal: the parallelism changes through the cluster too, and workers run several nodes: P=3 on
// 3 one-node workers, then P=4 on 2 workers of 2 nodes each, then P=2 on one worker of 3 nodes
// (a node without subtasks); exact output.
#[test]
fn rescaling_parallelism_three_to_four_to_two_on_multi_node_workers() {
    let cluster = Cluster::new(2_000_000);
    let mut workers = Vec::new();
    let mut coordinator = cluster.coordinator_with(3, &["--parallelism", "3"]);
    workers.extend((0..3).map(|_| cluster.worker()));
    assert!(cluster.wait_for_checkpoint_after(2, &mut coordinator), "the job ended before its 3rd checkpoint");
    kill_all(&mut coordinator, &mut workers);

    let before = cluster.latest_checkpoint();
    let mut coordinator = cluster.coordinator_with(2, &["--parallelism", "4"]);
    workers.extend((0..2).map(|_| cluster.worker_with_nodes(2)));
    assert!(cluster.wait_for_checkpoint_after(before + 2, &mut coordinator), "the job ended at parallelism 4");
    kill_all(&mut coordinator, &mut workers);

    let coordinator = cluster.coordinator_with(1, &["--parallelism", "2"]);
    workers.push(cluster.worker_with_nodes(3));
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    assert!(log.contains("attempt 1 with 1 workers (3 nodes), from checkpoint"), "{log}");
    reap(workers);
    cluster.check_output();
}

// Goal: the coordinator serves queryable state while the job runs: every answer is the live
// state of a key's open windows, so each row's window appears in the final output with at least
// the count seen live (a row can only grow until its window fires); unknown operators, wrong
// secrets and queries at no running attempt get clear refusals; the `sabot query` command prints
// the rows.
#[test]
fn coordinator_answers_queries_from_live_state() {
    let cluster = Cluster::new(3_000_000);
    let address: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port).parse().unwrap();
    let secret = b"cluster test secret".to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ask = |operator: &str, key: u64| runtime.block_on(query(address, &secret, operator, key));
    let mut coordinator = cluster.coordinator_with(2, &["--parallelism", "3"]);
    // Before the workers registered, there is no attempt to ask.
    let mut early = None;
    for _ in 0..250 {
        match ask("tumbling-window", 1) {
            Err(error) if error.to_string().contains("no attempt") => {
                early = Some(error);
                break;
            }
            // Not listening yet.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => panic!("an answer before any worker registered"),
        }
    }
    assert!(early.is_some(), "no refusal while waiting for workers");
    let workers: Vec<Child> = (0..2).map(|_| cluster.worker_with_nodes(2)).collect();
    assert!(cluster.wait_for_checkpoint_after(0, &mut coordinator), "the job ended before its first checkpoint");
    let mut live = Vec::new();
    for key in 0..400 {
        match ask("tumbling-window", key) {
            Ok(batches) => live.extend(window_rows(&batches)),
            // The attempt may end between the query and its answer only through a failure.
            Err(error) => panic!("query for key {key}: {error}"),
        }
    }
    let error = ask("no-such-operator", 1).unwrap_err().to_string();
    assert!(error.contains("no operator \"no-such-operator\""), "{error}");
    let error = runtime.block_on(query(address, b"wrong", "tumbling-window", 1)).unwrap_err().to_string();
    assert!(error.contains("connection closed"), "{error}");
    let output = Command::new(env!("CARGO_BIN_EXE_sabot"))
        .args(["query", "--coordinator", &address.to_string(), "--key", &live[0].0 .0.to_string()])
        .arg("--secret-file")
        .arg(cluster.secret())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed} {}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.starts_with("key\twindow_start\twindow_end\tcount\tsum\n"), "{printed}");
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    assert!(log.contains("presented the wrong secret"), "{log}");
    reap(workers);
    cluster.check_output();
    assert!(live.len() >= 10, "only {} live rows for 400 keys", live.len());
    let expected = w2_reference(cluster.records, W2_WINDOW_SIZE_MS);
    for ((key, start), (count, _)) in live {
        let (count_final, _) = expected.get(&(key, start)).unwrap_or_else(|| panic!("live window {start} of {key}"));
        assert!(count <= *count_final, "key {key} window {start}: {count} live, {count_final} in the end");
    }
}

// Goal: with --min-workers, a job whose worker dies for good goes on with the workers that
// remain (after the grace period for a replacement) and still commits exactly the reference.
#[test]
fn lost_worker_not_replaced_the_rest_finish() {
    let cluster = Cluster::new(500_000);
    let mut coordinator = cluster.coordinator_with(3, &["--min-workers", "2"]);
    let mut workers: Vec<Child> = (0..3).map(|_| cluster.worker()).collect();
    assert!(cluster.wait_for_checkpoint_after(1, &mut coordinator), "the job ended before its 2nd checkpoint");
    kill(&mut workers[1]);
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    assert!(log.contains("attempt 2 with 2 workers"), "{log}");
    workers.remove(1).wait().expect("the killed worker was reaped");
    reap(workers);
    cluster.check_output();
}

// Regression (found by the madsim simulator, seed 3): when the only worker of an attempt dies,
// the checkpoint coordinator's reports end with its connection, and the coordinator took that
// for the job's completion (exit 0, output incomplete). Now it is a failed attempt: the next
// worker to register resumes the job from the latest checkpoint, and the output is exact.
#[test]
fn lone_worker_killed_the_job_waits_for_the_next() {
    let cluster = Cluster::new(500_000);
    let mut coordinator = cluster.coordinator(1);
    let mut worker = cluster.worker();
    assert!(cluster.wait_for_checkpoint_after(0, &mut coordinator), "the job ended before its first checkpoint");
    kill(&mut worker);
    let worker = cluster.worker();
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    assert!(log.contains("attempt 2 with 1 workers (1 nodes), from checkpoint"), "{log}");
    reap(vec![worker]);
    cluster.check_output();
}

/// The committed rows of sink `name`, each as its integer columns, sorted.
fn sorted_rows(batches: &[arrow_array::RecordBatch]) -> Vec<Vec<i128>> {
    use arrow_array::{Array, Int64Array, UInt64Array};
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells = batch.columns().iter().map(|column| {
                if let Some(values) = column.as_any().downcast_ref::<UInt64Array>() {
                    i128::from(values.value(row))
                } else {
                    i128::from(column.as_any().downcast_ref::<Int64Array>().expect("integer columns").value(row))
                }
            });
            rows.push(cells.collect());
        }
    }
    rows.sort_unstable();
    rows
}

// Goal: keyed state of every kind (W3: value, list, map, reducing and aggregating state in
// RocksDB column families) is exactly once across processes: workers killed with SIGKILL at
// seeded points, then the whole cluster down and back at another parallelism (state moves by key
// group), and the committed rows equal a failure-free in-memory run's. Method: as
// `worker_kills_keep_exactly_once`, 4 kills, then a rescale from 3 workers (P=3) to 2 (P=2).
#[test]
fn keyed_state_of_every_kind_survives_kills_and_rescaling() {
    println!("seed {SEED} (replay: set SEED in tests/cluster.rs)");
    let mut rng = Lcg::new(SEED ^ 3);
    let mut cluster = Cluster::new(600_000);
    cluster.job = "w3";
    let mut coordinator = cluster.coordinator(3);
    let mut workers: Vec<Child> = (0..3).map(|_| cluster.worker()).collect();
    let mut seen = 0;
    for _ in 0..4 {
        assert!(cluster.wait_for_checkpoint_after(seen, &mut coordinator), "the job ended before 4 kills");
        seen = cluster.latest_checkpoint();
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        let victim = rng.below(3) as usize;
        kill(&mut workers[victim]);
        workers[victim] = cluster.worker();
    }
    assert!(cluster.wait_for_checkpoint_after(seen, &mut coordinator), "the job ended before the rescale");
    kill_all(&mut coordinator, &mut workers);
    let coordinator = cluster.coordinator_with(2, &["--parallelism", "2"]);
    let workers: Vec<Child> = (0..2).map(|_| cluster.worker()).collect();
    let (ok, log) = finish(coordinator);
    assert!(ok, "the coordinator failed: {log}");
    reap(workers);
    let mut storage = LocalFsStorage::open(cluster.data_dir()).unwrap();
    let rows = sorted_rows(&read_committed(&mut storage, "w3").unwrap());
    let plan = sabot_kernel::dataflow::PhysicalPlan::new(sabot_kernel::workload::w3_job(600_000, 2, 1000).unwrap(), 2);
    let mut reference = sabot_kernel::testing::run_in_memory(plan).unwrap();
    let expected = sorted_rows(&reference.committed("w3").unwrap());
    assert!(expected.len() > 1_000, "{} keys", expected.len());
    assert_eq!(rows.len(), expected.len(), "rows committed vs the reference's");
    assert!(rows == expected, "committed rows differ from the failure-free run's");
}
