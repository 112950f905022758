//! The windows' per-record path: records per second through the keyed process operator that
//! runs the windows (`dataflow::event_window` on `dataflow::process`), on one thread.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench windows` (criterion prints elements/s = records/s).
//! Input: W2's generator records (`workload::record`), 100,000 keys uniformly or skewed onto 64
//! hot keys, in batches of 4,096 in generation order (event-time disorder under 2 s), a
//! watermark of the batch's lowest possible time after each batch, so windows fire and are
//! cleaned as the input goes; all windows are flushed at the end. Per iteration 200,000 records.
//! Cases: tumbling 10 s, sliding 10 s every 5 s (each record in two windows), session with a
//! 100 ms gap, each counting and summing; tumbling with a full-window function (the median of
//! every value the window kept); and tumbling on processing time (one clock tick per batch).
//! Heap state, and RocksDB (default configuration: its write-back cache holds the open windows)
//! for tumbling windows.

use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sabot::rocks::{RocksDbBackend, CACHE_ENTRIES_MAX};
use sabot_kernel::dataflow::event_window::{
    EventWindowSpec, FullWindowFunction, LatePolicy, WindowFunction, WindowKind, WindowTime,
};
use sabot_kernel::dataflow::graph::{SubtaskId, VertexId};
use sabot_kernel::dataflow::window::KeyType;
use sabot_kernel::dataflow::{Context, Operator};
use sabot_kernel::element::Element;
use sabot_kernel::env::MemStorage;
use sabot_kernel::key_group::{KeyGroupRange, MaxParallelism};
use sabot_kernel::state::{HeapBackend, StateBackend};
use sabot_kernel::time::{EventTime, Instant};
use sabot_kernel::workload::{self, Keys};

const RECORD_COUNT: u64 = 200_000;
const BATCH_SIZE: u64 = 4_096;

fn batches(keys: Keys) -> Vec<(RecordBatch, i64)> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("key", DataType::UInt64, false),
        Field::new("value", DataType::Int64, false),
        Field::new("ts_ms", DataType::Int64, false),
    ]));
    (0..RECORD_COUNT.div_ceil(BATCH_SIZE))
        .map(|b| {
            let records: Vec<_> = (b * BATCH_SIZE..((b + 1) * BATCH_SIZE).min(RECORD_COUNT))
                .map(|i| workload::record_with(i, keys))
                .collect();
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(records.iter().map(|r| r.key).collect::<UInt64Array>()),
                    Arc::new(records.iter().map(|r| r.value).collect::<Int64Array>()),
                    Arc::new(records.iter().map(|r| r.ts_ms).collect::<Int64Array>()),
                ],
            )
            .unwrap();
            // Records after this batch have times at or above their index.
            (batch, ((b + 1) * BATCH_SIZE) as i64 - 1)
        })
        .collect()
}

fn spec(kind: WindowKind, time: WindowTime, function: WindowFunction) -> EventWindowSpec {
    EventWindowSpec {
        key_index: 0,
        key_type: KeyType::UInt64,
        value_index: 1,
        kind,
        time,
        function,
        allowed_lateness_ms: 0,
        late: LatePolicy::Drop,
    }
}

/// Runs every batch through fresh windows over `backend`; returns the rows emitted.
fn run(spec: &EventWindowSpec, backend: Box<dyn StateBackend>, batches: &[(RecordBatch, i64)]) -> usize {
    let max = MaxParallelism::default();
    let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
    let mut op = spec.instantiate(max, backend, subtask).unwrap();
    let mut storage = MemStorage::new();
    let mut out = Vec::new();
    let mut rows = 0;
    for (tick, (batch, watermark)) in batches.iter().enumerate() {
        let mut context = Context::new(Instant(tick as u64), &mut storage, subtask, &mut out);
        if op.poll_timeout().is_some_and(|at| at.0 <= tick as u64) {
            op.on_processing_time(&mut context).unwrap();
        }
        op.on_batch(&mut context, batch.clone()).unwrap();
        if matches!(spec.time, WindowTime::Event { .. }) {
            op.on_watermark(&mut context, EventTime(*watermark)).unwrap();
        }
        rows += count_rows(&mut out);
    }
    let mut context = Context::new(Instant(u64::MAX / 2), &mut storage, subtask, &mut out);
    op.on_end(&mut context).unwrap();
    assert_eq!(op.metrics().records_late_dropped, 0);
    rows + count_rows(&mut out)
}

fn count_rows(out: &mut Vec<Element>) -> usize {
    let rows = out.iter().map(|e| if let Element::Batch(b) = e { b.num_rows() } else { 0 }).sum();
    out.clear();
    rows
}

fn windows(c: &mut Criterion) {
    let event = WindowTime::Event { event_time_index: 2 };
    let median = || WindowFunction::Full(FullWindowFunction::median());
    let tumbling = WindowKind::Tumbling { size_ms: 10_000 };
    let cases = [
        ("tumbling_sum", tumbling, event, WindowFunction::CountSum),
        ("sliding_sum", WindowKind::Sliding { size_ms: 10_000, slide_ms: 5_000 }, event, WindowFunction::CountSum),
        ("session_sum", WindowKind::Session { gap_ms: 100 }, event, WindowFunction::CountSum),
        ("tumbling_median", tumbling, event, median()),
        (
            "tumbling_processing_time_sum",
            WindowKind::Tumbling { size_ms: 10 },
            WindowTime::Processing,
            WindowFunction::CountSum,
        ),
    ];
    let mut group = c.benchmark_group("windows");
    group.throughput(Throughput::Elements(RECORD_COUNT));
    group.sample_size(10);
    for (keys_name, keys) in [("uniform_keys", Keys::Uniform), ("hot_keys", Keys::Skewed { hot: 64 })] {
        let batches = batches(keys);
        for (name, kind, time, function) in &cases {
            let spec = spec(*kind, *time, function.clone());
            group.bench_function(format!("heap_{name}_{keys_name}"), |b| {
                b.iter(|| {
                    run(&spec, Box::new(HeapBackend::new(KeyGroupRange::all(MaxParallelism::default()))), &batches)
                })
            });
        }
        let spec = spec(tumbling, event, WindowFunction::CountSum);
        group.bench_function(format!("rocksdb_tumbling_sum_{keys_name}"), |b| {
            b.iter(|| {
                let dir = tempfile::tempdir().unwrap();
                let range = KeyGroupRange::all(MaxParallelism::default());
                let backend = RocksDbBackend::open_empty(dir.path().join("db"), range, CACHE_ENTRIES_MAX).unwrap();
                run(&spec, Box::new(backend), &batches)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, windows);
criterion_main!(benches);
