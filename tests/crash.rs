//! Exactly once through SIGKILL: the `sabot` command killed at random points and restarted.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::state::testing::Lcg;
use sabot_kernel::testing::{w2_reference, window_rows};
use sabot_kernel::workload::W2_WINDOW_SIZE_MS;

/// Kills per run; the issue asks for at least 20.
const KILL_COUNT: u32 = 20;
/// The seed of the kill schedule; change it to explore, and it is printed for replay.
const SEED: u64 = 20_261_124;

// Goal: the committed output of W2 on RocksDB with checkpoints, killed with SIGKILL at random
// points 20 times and restarted each time (resuming from its latest checkpoint), equals the output
// of an uninterrupted run: nothing lost, nothing twice. Method: a seeded kill schedule (printed),
// the real binary as a child process, and the BTreeMap reference of the same input.
#[test]
fn w2_exactly_once_through_sigkill() {
    println!("seed {SEED} (replay: set SEED in tests/crash.rs to this value)");
    let record_count: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let args = [
        "run",
        "--records",
        &record_count.to_string(),
        "--parallelism",
        "2",
        "--batch-size",
        "1000",
        "--checkpoint-interval-ms",
        "30",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ]
    .map(str::to_string);
    let sabot = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sabot"));
        command
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    };
    let mut rng = Lcg::new(SEED);
    let (mut kills, mut finished_early) = (0, 0);
    let started = Instant::now();
    while kills < KILL_COUNT {
        let mut child = sabot().spawn().expect("starting sabot");
        let wait = Duration::from_millis(30 + rng.below(400));
        std::thread::sleep(wait);
        match child.try_wait().expect("polling sabot") {
            Some(status) => {
                assert!(
                    status.success(),
                    "a run that was not killed failed: {status}"
                );
                finished_early += 1;
                assert!(
                    finished_early < 5,
                    "the job keeps finishing before the kill: make it longer"
                );
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reaping sabot");
                kills += 1;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "kill loop took too long"
        );
    }
    let output = sabot()
        .stderr(Stdio::piped())
        .output()
        .expect("the last run");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the last run failed: {log}");
    let resumed = log
        .lines()
        .find(|line| line.starts_with("resuming from checkpoint"));
    println!(
        "{kills} kills in {:?}; the last run: {resumed:?}",
        started.elapsed()
    );
    assert!(
        resumed.is_some(),
        "the last run resumed from a checkpoint: {log}"
    );
    let mut storage = LocalFsStorage::open(&data_dir).unwrap();
    let rows = window_rows(&read_committed(&mut storage, "w2").unwrap());
    let expected = w2_reference(record_count, W2_WINDOW_SIZE_MS);
    assert_eq!(rows.len(), expected.len(), "{kills} kills");
    assert!(
        rows == expected,
        "committed output differs from the uninterrupted run's after {kills} kills"
    );
}
