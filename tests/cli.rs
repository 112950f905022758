//! The `sabot` command as a person runs it: help, bad flags, and a small run to its summary.

use std::process::Command;

fn sabot(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sabot")).args(args).output().expect("running sabot");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("utf-8");
    (output.status.code().expect("exit code"), text(output.stdout), text(output.stderr))
}

// Goal: mistakes on the command line get exit code 2 and a message naming the mistake.
#[test]
fn bad_flags_are_named() {
    for (args, message) in [
        (vec!["run", "--records", "many"], "--records takes a whole number, not \"many\""),
        (vec!["run", "--bogus"], "unknown flag \"--bogus\""),
        (vec!["run", "--state", "redis"], "--state is rocksdb or heap"),
        (vec!["run", "--parallelism", "0"], "--parallelism must be at least 1"),
        (vec!["run", "--data-dir"], "--data-dir needs a value"),
        (vec!["frobnicate"], "unknown command \"frobnicate\""),
    ] {
        let (code, _, stderr) = sabot(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(stderr.contains("usage:"), "{args:?} points to the usage");
    }
    let (code, stdout, _) = sabot(&["help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("sabot run"));
}

// Goal: `sabot run` completes on RocksDB in a data directory, prints its summary, and a second run
// replaces the first run's output instead of adding to it.
#[test]
fn run_prints_summary_and_replaces_previous_output() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let args = ["run", "--records", "20_000", "--parallelism", "2", "--data-dir", data_dir.to_str().unwrap()];
    for _ in 0..2 {
        let (code, stdout, stderr) = sabot(&args);
        assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains("records in      20,000"), "{stdout}");
        assert!(stdout.contains("count sum 20,000,"), "every record counted once: {stdout}");
        assert!(stdout.contains("throughput"), "{stdout}");
    }
}
