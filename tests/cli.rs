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
        (vec!["run", "--window", "tumbling", "--window-time", "wall"], "--window-time is event or processing"),
        (
            vec!["run", "--window", "tumbling", "--window-function", "mean"],
            "--window-function is sum, median or distinct",
        ),
        (
            vec!["run", "--window", "session", "--window-time", "processing", "--late", "side-output"],
            "processing-time windows have no late records",
        ),
        (vec!["run", "--window-function", "median"], "go with --window"),
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

// Goal: `sabot run` runs windows with a full-window function and windows on processing time,
// counting every record once per window it belongs to.
// Method: 20,000 records on the heap: sliding windows of 2 s every 1 s (each record in two
// windows; the 5 s watermark bound exceeds the generator's disorder, so none is late) with the
// median, and tumbling windows of 50 ms on processing time; the summary's count checksum.
#[test]
fn run_full_window_functions_and_processing_time_windows() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().unwrap();
    let common = ["run", "--records", "20_000", "--parallelism", "2", "--state", "heap", "--data-dir", data_dir];
    for (extra, count_sum) in [
        (
            &["--window", "sliding", "--window-size-ms", "2000", "--slide-ms", "1000", "--window-function", "median"][..],
            "count sum 40,000,",
        ),
        (&["--window", "tumbling", "--window-size-ms", "50", "--window-time", "processing"][..], "count sum 20,000,"),
    ] {
        let args: Vec<&str> = common.iter().chain(extra).copied().collect();
        let (code, stdout, stderr) = sabot(&args);
        assert_eq!(code, 0, "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
        assert!(stdout.contains(count_sum), "{args:?}: every record counted once per window: {stdout}");
        assert!(stdout.contains("0 dropped"), "{args:?}: nothing late: {stdout}");
    }
}
