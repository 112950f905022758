//! W2 (keyed tumbling window, WORKLOADS.md) in-process on one thread with heap state: records per second.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench w2` (criterion prints the throughput in elements/s = records/s).
//! The job is the whole pipeline: generator, watermarks, key-by, window, and the file sink
//! committing Arrow IPC files into in-memory storage. Each iteration checks its output count.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::testing::run_in_memory;
use sabot_kernel::workload::{w1_job, w2_job};

/// Records per iteration: enough for many windows to open and fire (one per 10 s of event time).
const RECORD_COUNT: u64 = 2_000_000;
const BATCH_SIZE: usize = 4_096;

fn w2(c: &mut Criterion) {
    let mut group = c.benchmark_group("w2");
    group.throughput(Throughput::Elements(RECORD_COUNT));
    group.sample_size(10);
    group.bench_function("keyed_tumbling_window_1_thread_heap", |b| {
        b.iter(|| {
            let plan = PhysicalPlan::new(w2_job(RECORD_COUNT, 1, BATCH_SIZE).expect("w2 job"), 1);
            let run = run_in_memory(plan).expect("w2 run");
            assert_eq!(run.metrics.records_in, RECORD_COUNT);
            run.metrics.records_out
        })
    });
    group.finish();

    let mut group = c.benchmark_group("w1");
    group.throughput(Throughput::Elements(RECORD_COUNT));
    group.sample_size(10);
    group.bench_function("filter_project_1_thread", |b| {
        b.iter(|| {
            let plan = PhysicalPlan::new(w1_job(RECORD_COUNT, 1, BATCH_SIZE).expect("w1 job"), 1);
            run_in_memory(plan).expect("w1 run").metrics.records_out
        })
    });
    group.finish();
}

criterion_group!(benches, w2);
criterion_main!(benches);
