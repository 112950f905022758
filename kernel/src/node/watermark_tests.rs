//! Watermarks made inside sources, through a node: idleness reaching the gates downstream,
//! alignment bounding the drift between splits, and alignment leaving catch-up speed alone.

use std::sync::Arc;

use super::*;
use crate::dataflow::source::{GeneratorSplits, GeneratorStalls};
use crate::state::HeapBackend;
use crate::testing::{w2_reference, window_rows, SharedMemStorage};
use crate::workload::{w2_job_split_watermarks, Keys, SplitWatermarkOptions, W2Options};

fn options(record_count: u64, source_parallelism: u16, parallelism: u16, out_of_orderness_ms: i64) -> W2Options {
    W2Options {
        record_count,
        source_parallelism,
        parallelism,
        batch_size: 10,
        out_of_orderness_ms,
        window_size_ms: 1_000,
        keys: Keys::Uniform,
    }
}

/// What a stepped run of one node saw.
#[derive(Debug, Default)]
struct Observed {
    /// Processing time on the manual clock when the node finished.
    virtual_ms: u64,
    /// The largest spread of the split watermarks (over splits that have started and not ended).
    drift_max: i64,
    /// A gate's watermark stood above an input that was idle: idleness let it pass.
    passed_idle_input: bool,
    /// A gate forwarded idleness (all its inputs idle).
    gate_idle: bool,
    /// The most keyed state the node held at once (open windows).
    state_size_max: u64,
    records_in: u64,
    records_late_dropped: u64,
    rows: BTreeMap<(u64, i64), (u64, i64)>,
}

/// Runs `options` with `watermarks` on one node, a millisecond per step (and straight to the next
/// timeout when the node waits), observing its splits and gates after every step.
fn run_observed(options: W2Options, watermarks: SplitWatermarkOptions) -> Observed {
    let plan = Arc::new(PhysicalPlan::new(w2_job_split_watermarks(options, watermarks).unwrap(), 1));
    let storage = SharedMemStorage::default();
    let mut backends = |_, range| Ok(Box::new(HeapBackend::new(range)) as Box<dyn StateBackend>);
    let mut node = Node::new(plan, 0, Box::new(storage.clone()), &mut backends, NodeOptions::default()).unwrap();
    let mut observed = Observed::default();
    let mut now = Instant(0);
    for _ in 0..10_000_000 {
        let step = node.handle_step(now).unwrap();
        while node.poll_event().is_some() {}
        observe(&node, &mut observed);
        match step {
            Step::Finished => break,
            Step::Busy => now = now.saturating_add_ms(1),
            Step::Idle => {
                let wake = node.poll_timeout().expect("a waiting node has a timeout");
                assert!(wake > now, "timeout {wake:?} at {now:?} not handled");
                now = wake;
            }
        }
    }
    assert!(node.is_finished(), "the run did not finish");
    let metrics = node.metrics();
    observed.virtual_ms = now.0;
    observed.records_in = metrics.records_in;
    observed.records_late_dropped = metrics.records_late_dropped;
    observed.rows = window_rows(&crate::dataflow::sink::read_committed(&mut storage.clone(), "w2").unwrap());
    observed
}

fn observe(node: &Node, observed: &mut Observed) {
    observed.state_size_max = observed.state_size_max.max(node.metrics().state_size_bytes);
    let splits: Vec<EventTime> =
        node.split_watermarks().iter().filter(|(_, s)| !s.ended).map(|(_, s)| s.watermark).collect();
    if !splits.is_empty() && splits.iter().all(|&w| w > EventTime::MIN) {
        let (min, max) = (splits.iter().min().unwrap(), splits.iter().max().unwrap());
        observed.drift_max = observed.drift_max.max(max.0 - min.0);
    }
    for task in &node.tasks {
        let Head::Gate(gate) = &task.head else { continue };
        observed.gate_idle |= gate.idle;
        observed.passed_idle_input |=
            gate.inputs.iter().any(|input| input.idle && !input.ended && gate.watermark > input.watermark);
    }
}

/// Every record is either in exactly one window's count or dropped as late.
fn assert_conserved(observed: &Observed) {
    let counted: u64 = observed.rows.values().map(|(count, _)| count).sum();
    assert_eq!(counted + observed.records_late_dropped, observed.records_in, "{observed:?}");
}

// Goal: source splits that go quiet become idle after the timeout: the source says Idle when all
// of its splits are, the gate downstream then stops waiting for it (its watermark passes the idle
// input's), forwards idleness when every input is idle, and the output is still exactly W2's
// (its bound exceeds the input's event-time span, so no record can be late whatever the timing).
// Method: two source subtasks whose splits stall for 40 ms every 50 and 100 records, idle
// timeout 10 ms, one node stepped on a manual clock; gates observed after every step.
#[test]
fn idle_splits_let_the_watermark_pass_and_all_idle_is_forwarded() {
    let splits = GeneratorSplits { count: None, stalls: Some(GeneratorStalls { every_records: 50, stall_ms: 40 }) };
    let watermarks =
        SplitWatermarkOptions { splits, idle_timeout_ms: Some(10), emit_interval_ms: 0, max_drift_ms: None };
    let observed = run_observed(options(3_000, 2, 1, 5_000), watermarks);
    println!("{} ms, drift max {} ms", observed.virtual_ms, observed.drift_max);
    assert!(observed.passed_idle_input, "the window's watermark passed an idle input");
    assert!(observed.gate_idle, "the window's gate forwarded idleness");
    assert_eq!(observed.rows, w2_reference(3_000, 1_000));
}

// Goal: idleness is a trade: with it, the watermark runs past a stalled split and that split's
// records may come late (dropped and counted, never counted twice); without it, the stalled
// split holds the watermark and nothing is late. Method: W2 with a 3 s bound (above the
// generator's disorder) over 30,000 records whose splits stall, with and without a 10 ms idle
// timeout; compare with the reference and check that every record is counted or dropped once.
#[test]
fn idleness_lets_the_watermark_pass_stalled_splits_and_late_records_are_counted() {
    let splits = GeneratorSplits { count: None, stalls: Some(GeneratorStalls { every_records: 50, stall_ms: 40 }) };
    let base = SplitWatermarkOptions { splits, idle_timeout_ms: None, emit_interval_ms: 5, max_drift_ms: None };
    let held = run_observed(options(30_000, 3, 2, 3_000), base);
    assert_eq!(held.records_late_dropped, 0);
    assert_eq!(held.rows, w2_reference(30_000, 1_000), "without idleness the output is W2's");
    let idle = run_observed(options(30_000, 3, 2, 3_000), SplitWatermarkOptions { idle_timeout_ms: Some(10), ..base });
    println!("late records with idleness: {} of {}", idle.records_late_dropped, idle.records_in);
    assert!(idle.records_late_dropped > 0, "an idle split resumed behind the watermark");
    assert_conserved(&idle);
}

// Goal: alignment keeps the splits of a group within the drift (plus what one batch moves a
// split), where without it splits that stall less run far ahead; the output stays W2's.
// Method: three source subtasks whose splits stall 30 ms every 20, 40 and 80 records (so they
// read at different speeds), no idleness, drift 200 ms; the spread of split watermarks after
// every step, with and without alignment.
#[test]
fn alignment_bounds_the_drift_between_splits() {
    let splits = GeneratorSplits { count: None, stalls: Some(GeneratorStalls { every_records: 20, stall_ms: 30 }) };
    let base = SplitWatermarkOptions { splits, idle_timeout_ms: None, emit_interval_ms: 0, max_drift_ms: None };
    let free = run_observed(options(20_000, 3, 1, 5_000), base);
    let aligned = run_observed(options(20_000, 3, 1, 5_000), SplitWatermarkOptions { max_drift_ms: Some(200), ..base });
    // One batch moves a split by its rows times the stride, plus the generator's disorder.
    let bound = 200 + 10 * 3 + 2_000;
    println!(
        "drift max: {} ms free, {} ms aligned (bound {bound}); {} ms and {} ms of processing time",
        free.drift_max, aligned.drift_max, free.virtual_ms, aligned.virtual_ms
    );
    assert!(aligned.drift_max <= bound, "aligned drift {} > {bound}", aligned.drift_max);
    assert!(free.drift_max > 3 * bound, "without alignment the splits drift apart: {}", free.drift_max);
    assert_eq!(aligned.rows, w2_reference(20_000, 1_000));
    assert_eq!(free.rows, aligned.rows);
}

// Goal: alignment does not cap catch-up speed. Through a backlog (every record available) where
// one source subtask reads two splits and the other one (so that split runs ahead twice as fast
// without alignment), the aligned run keeps the drift bounded and takes no more processing time
// than the free one: a paused split's subtask gives its turn to the others, and the group's
// minimum moves with every batch, not on a timer. It holds fewer windows open, too: the
// watermark (the slowest split's) no longer trails the records the fast split brings.
// Method: three splits on two source subtasks over 100,000 records, drift 100 ms, on the
// manual clock of one node; both runs' processing time, drift, peak state and output.
#[test]
fn alignment_does_not_cap_catch_up_through_a_backlog() {
    let splits = GeneratorSplits { count: Some(3), stalls: None };
    let base = SplitWatermarkOptions { splits, idle_timeout_ms: None, emit_interval_ms: 0, max_drift_ms: None };
    let free = run_observed(options(100_000, 2, 2, 5_000), base);
    let aligned =
        run_observed(options(100_000, 2, 2, 5_000), SplitWatermarkOptions { max_drift_ms: Some(100), ..base });
    println!(
        "backlog: {} ms free, {} ms aligned; drift max {} ms free, {} ms aligned; state max {} bytes free, {} aligned",
        free.virtual_ms,
        aligned.virtual_ms,
        free.drift_max,
        aligned.drift_max,
        free.state_size_max,
        aligned.state_size_max
    );
    assert!(aligned.state_size_max < free.state_size_max, "fewer windows open with alignment");
    assert!(aligned.drift_max <= 100 + 10 * 3 + 2_000, "{}", aligned.drift_max);
    assert!(free.drift_max > 10_000, "without alignment the faster split runs ahead: {}", free.drift_max);
    assert!(
        aligned.virtual_ms * 100 <= free.virtual_ms * 105,
        "{} ms aligned, {} ms free",
        aligned.virtual_ms,
        free.virtual_ms
    );
    assert_eq!(aligned.rows, w2_reference(100_000, 1_000));
    assert_eq!(free.rows, aligned.rows);
}

/// Per key, the totals of count and result (`(count, sum)`) over window rows.
fn totals_by_key(batches: &[RecordBatch]) -> BTreeMap<u64, (u64, i64)> {
    let mut totals = BTreeMap::new();
    for ((key, _), (count, sum)) in window_rows_by_window(batches) {
        let total: &mut (u64, i64) = totals.entry(key).or_default();
        total.0 += count;
        total.1 += sum;
    }
    totals
}

/// The rows `key, window_start, window_end, count, sum` of windows, by `(key, (start, end))`;
/// a window twice is a bug.
fn window_rows_by_window(batches: &[RecordBatch]) -> BTreeMap<(u64, (i64, i64)), (u64, i64)> {
    use arrow_array::{Int64Array, UInt64Array};
    let mut rows = BTreeMap::new();
    for batch in batches {
        let u64s = |i: usize| batch.column(i).as_any().downcast_ref::<UInt64Array>().unwrap().clone();
        let i64s = |i: usize| batch.column(i).as_any().downcast_ref::<Int64Array>().unwrap().clone();
        let (keys, starts, ends, counts, sums) = (u64s(0), i64s(1), i64s(2), u64s(3), i64s(4));
        for row in 0..batch.num_rows() {
            let window = (keys.value(row), (starts.value(row), ends.value(row)));
            let previous = rows.insert(window, (counts.value(row), sums.value(row)));
            assert!(previous.is_none(), "window {window:?} emitted twice");
        }
    }
    rows
}

// Goal: processing-time windows run through a node: the node wakes each operator at its
// earliest processing-time timer (poll_timeout), so windows fire while the input still flows,
// not only at its end; each window is emitted once, and per key every record is counted once
// per window it belongs to; session windows of a key never overlap.
// Method: W5 (generator → key by → windows on processing time → file sink) on one node whose
// manual clock moves 1 ms per busy step and straight to the node's timeout when it waits;
// compared with what the records total per key (w5_totals), for tumbling, sliding and session
// windows, with keys skewed so that windows hold many records.
#[test]
fn processing_time_windows_fire_as_the_node_clock_moves() {
    use crate::dataflow::event_window::WindowKind;
    use crate::workload::{w5_job_with, w5_totals};
    for kind in [
        WindowKind::Tumbling { size_ms: 20 },
        WindowKind::Sliding { size_ms: 30, slide_ms: 10 },
        WindowKind::Session { gap_ms: 3 },
    ] {
        // Skewed keys, so that a key's records meet in windows.
        let options = W2Options { keys: Keys::Skewed { hot: 8 }, ..options(20_000, 2, 2, 0) };
        let plan = Arc::new(PhysicalPlan::new(w5_job_with(options, kind).unwrap(), 1));
        let storage = SharedMemStorage::default();
        let mut backends = |_, range| Ok(Box::new(HeapBackend::new(range)) as Box<dyn StateBackend>);
        let mut node = Node::new(plan, 0, Box::new(storage.clone()), &mut backends, NodeOptions::default()).unwrap();
        let mut now = Instant(0);
        let mut fired_while_running = 0;
        loop {
            let step = node.handle_step(now).unwrap();
            while node.poll_event().is_some() {}
            match step {
                Step::Finished => break,
                Step::Busy => now = now.saturating_add_ms(1),
                Step::Idle => now = node.poll_timeout().expect("a waiting node has a timeout"),
            }
            if !node.is_finished() {
                fired_while_running = node.metrics().windows_fired;
            }
        }
        let batches = crate::dataflow::sink::read_committed(&mut storage.clone(), "w5").unwrap();
        let rows = window_rows_by_window(&batches);
        println!("{kind:?}: {} windows, {fired_while_running} fired before the end, {} ms", rows.len(), now.0);
        assert!(fired_while_running > rows.len() as u64 / 2, "{kind:?}: windows fired on processing time");
        assert_eq!(totals_by_key(&batches), w5_totals(20_000, options.keys, kind), "{kind:?}: per-key totals");
        if let WindowKind::Session { .. } = kind {
            let mut last: BTreeMap<u64, i64> = BTreeMap::new();
            for &(key, (start, end)) in rows.keys() {
                assert!(last.get(&key).is_none_or(|&previous_end| previous_end <= start), "sessions overlap");
                last.insert(key, end);
            }
        }
    }
}
