//! Catch-up through a backlog with watermarks made per split in the source, with and without
//! watermark alignment: records per second on one thread with heap state.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench watermarks` (criterion prints the throughput in elements/s = records/s).
//! The job is W2 with its watermarks made inside the source (`w2_job_split_watermarks`): three
//! splits read by two source subtasks, so that the subtask with one split would run ahead of the
//! other in event time without alignment; every record is available at once (a backlog). The
//! aligned cases pause a split whose watermark is more than the drift ahead of the group's
//! minimum: 1 s is below one batch's event-time span (4,096 records × 3 splits ≈ 12 s), so a
//! split is paused after nearly every batch; 60 s pauses now and then. Each iteration checks
//! its record count and that nothing came late. Alignment does not slow the backlog down (a
//! paused subtask gives its turn to the others); it may speed it up, since without it the
//! watermark trails the faster split by up to half the input and the window holds that many
//! more windows open (`node::watermark_tests`, `alignment_does_not_cap_catch_up_through_a_backlog`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sabot_kernel::dataflow::source::GeneratorSplits;
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::testing::run_in_memory;
use sabot_kernel::workload::{self, w2_job_split_watermarks, SplitWatermarkOptions, W2Options};

const RECORD_COUNT: u64 = 2_000_000;
const BATCH_SIZE: usize = 4_096;

fn catch_up(c: &mut Criterion) {
    let options = W2Options {
        record_count: RECORD_COUNT,
        source_parallelism: 2,
        parallelism: 1,
        batch_size: BATCH_SIZE,
        out_of_orderness_ms: workload::W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: workload::W2_WINDOW_SIZE_MS,
        keys: workload::Keys::Uniform,
    };
    let mut group = c.benchmark_group("catch_up");
    group.throughput(Throughput::Elements(RECORD_COUNT));
    group.sample_size(10);
    for (name, max_drift_ms) in [("free", None), ("aligned_drift_1s", Some(1_000)), ("aligned_drift_60s", Some(60_000))]
    {
        let watermarks = SplitWatermarkOptions {
            splits: GeneratorSplits { count: Some(3), stalls: None },
            idle_timeout_ms: None,
            emit_interval_ms: 0,
            max_drift_ms,
        };
        group.bench_function(format!("w2_3_splits_2_sources_{name}"), |b| {
            b.iter(|| {
                let graph = w2_job_split_watermarks(options, watermarks).expect("w2 job");
                let run = run_in_memory(PhysicalPlan::new(graph, 1)).expect("w2 run");
                assert_eq!(run.metrics.records_in, RECORD_COUNT);
                assert_eq!(run.metrics.records_late_dropped, 0);
                (run.metrics.records_out, run.metrics.source_paused_count)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, catch_up);
criterion_main!(benches);
