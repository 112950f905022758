//! W2 across processes: records per second of the whole job run by the `sabot` binary, in one
//! process (in-process channels, and loopback TCP between its nodes) and on a coordinator with
//! one worker process of one node, one worker of two nodes, and two workers of one node each.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench cluster`. Every run: 2,000,000 records, parallelism 2, batches of 4,096,
//! heap state (so state does not dominate), checkpoints every second (a cluster always takes
//! them; the one-process runs take them too, for the same work), a fresh data directory. Each
//! iteration is a whole job, process start and the final commit included.

use std::process::{Command, Stdio};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const RECORDS: u64 = 2_000_000;

fn sabot() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sabot"));
    command.stdout(Stdio::null()).stderr(Stdio::null());
    command
}

fn job_flags() -> Vec<String> {
    [
        "--records",
        &RECORDS.to_string(),
        "--parallelism",
        "2",
        "--batch-size",
        "4096",
        "--checkpoint-interval-ms",
        "1000",
    ]
    .map(str::to_string)
    .to_vec()
}

/// One `sabot run` with `transport`.
fn one_process(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let status = sabot()
        .arg("run")
        .args(job_flags())
        .args(["--state", "heap", "--transport", transport, "--data-dir"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
}

/// One job on a coordinator and `workers` worker processes of `nodes` nodes each.
fn cluster(workers: u16, nodes: u16) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"bench secret").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let address = format!("127.0.0.1:{port}");
    let data_dir = dir.path().join("data");
    let mut coordinator = sabot()
        .args(["coordinator", "--workers", &workers.to_string(), "--listen", &address])
        .args(job_flags())
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--secret-file")
        .arg(&secret)
        .spawn()
        .unwrap();
    let mut children: Vec<_> = (0..workers)
        .map(|_| {
            sabot()
                .args(["worker", "--coordinator", &address, "--nodes", &nodes.to_string()])
                .args(["--state", "heap", "--data-dir"])
                .arg(&data_dir)
                .arg("--secret-file")
                .arg(&secret)
                .spawn()
                .unwrap()
        })
        .collect();
    assert!(coordinator.wait().unwrap().success());
    for child in &mut children {
        assert!(child.wait().unwrap().success());
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("w2_processes");
    group.throughput(Throughput::Elements(RECORDS));
    group.sample_size(10);
    group.bench_function("one_process_inproc_channels", |b| b.iter(|| one_process("inproc")));
    group.bench_function("one_process_tcp_loopback", |b| b.iter(|| one_process("tcp")));
    group.bench_function("coordinator_1_worker", |b| b.iter(|| cluster(1, 1)));
    group.bench_function("coordinator_1_worker_2_nodes", |b| b.iter(|| cluster(1, 2)));
    group.bench_function("coordinator_2_workers", |b| b.iter(|| cluster(2, 1)));
    group.finish();
}

criterion_group!(cluster_benches, benches);
criterion_main!(cluster_benches);
