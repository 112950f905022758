//! The benchmark workloads of `shared/bench/WORKLOADS.md`: the record generator and the expected results.
//!
//! The generator is a pure function of the record index, so a source is replayable from any offset.

/// `2^31 - 1`, the modulus of the generator.
const MODULUS: u64 = (1 << 31) - 1;

/// The record count of the published workloads.
pub const RECORD_COUNT_DEFAULT: u64 = 20_000_000;
/// The number of distinct keys.
pub const KEY_COUNT: u64 = 100_000;

/// W2's bounded out-of-orderness, in milliseconds.
pub const W2_OUT_OF_ORDERNESS_MS: i64 = 5_000;
/// W2's tumbling window size, in milliseconds.
pub const W2_WINDOW_SIZE_MS: i64 = 10_000;

/// The published checksums of W2 over the default record count.
pub const W2_EXPECTED_ROWS: u64 = 19_031_751;
pub const W2_EXPECTED_COUNT_SUM: u64 = 20_000_000;
pub const W2_EXPECTED_SUM_SUM: i128 = 21_471_771_238_884_417;

/// The published checksums of W1 over the default record count.
pub const W1_EXPECTED_ROWS: u64 = 9_998_397;
pub const W1_EXPECTED_KEY_SUM: u64 = 500_040_700_159;

/// One generated record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: u64,
    pub value: i64,
    pub ts_ms: i64,
}

/// Record `i` of the workload generator.
#[inline(always)]
pub fn record(i: u64) -> Record {
    let x1 = ((i + 1) * 48_271) % MODULUS;
    let x2 = (x1 * x1) % MODULUS;
    let x3 = (x2 * x2 + 12_345) % MODULUS;
    Record { key: x2 % KEY_COUNT, value: x3 as i64, ts_ms: i as i64 + (x1 % 2_000) as i64 }
}

/// How the generator spreads records over keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Keys {
    /// `KEY_COUNT` keys, uniformly (the published workloads).
    #[default]
    Uniform,
    /// Skewed: three records in four go to one of `hot` keys (so to at most `hot` key groups),
    /// the rest uniformly to all keys. The simulator's hot-key variant.
    Skewed { hot: u64 },
}

/// Record `i` with its key drawn as `keys` says (the same value and event time as [`record`]).
#[inline(always)]
pub fn record_with(i: u64, keys: Keys) -> Record {
    let record = record(i);
    match keys {
        Keys::Uniform => record,
        Keys::Skewed { hot } => {
            let x1 = ((i + 1) * 48_271) % MODULUS;
            let key = if (x1 >> 3) % 4 != 0 { record.key % hot.max(1) } else { record.key };
            Record { key, ..record }
        }
    }
}

/// W2 as a job: generator → watermarks (5 s) → key by `key` → 10 s tumbling count/sum → file sink `w2`.
pub fn w2_job(
    record_count: u64,
    parallelism: u16,
    batch_size: usize,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::SourceSpec;
    crate::dataflow::JobBuilder::new("w2")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys: Keys::Uniform, splits: Default::default() },
            parallelism,
        )?
        .assign_watermarks(W2_OUT_OF_ORDERNESS_MS)?
        .key_by("key", parallelism)?
        .tumbling_window_count_sum(W2_WINDOW_SIZE_MS, "value")?
        .sink_files("w2")
}

/// A W2-shaped job with its knobs exposed, for the simulator's smaller variants: a source of
/// another parallelism than the windows, a tighter out-of-orderness bound (late records, which
/// the windows drop), other window sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct W2Options {
    pub record_count: u64,
    pub source_parallelism: u16,
    pub parallelism: u16,
    pub batch_size: usize,
    pub out_of_orderness_ms: i64,
    pub window_size_ms: i64,
    pub keys: Keys,
}

/// W2 as [`W2Options`] say: generator → watermarks → key by `key` → tumbling count/sum → file sink `w2`.
pub fn w2_job_with(options: W2Options) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::SourceSpec;
    let W2Options { record_count, source_parallelism, parallelism, batch_size, keys, .. } = options;
    crate::dataflow::JobBuilder::new("w2")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys, splits: Default::default() },
            source_parallelism,
        )?
        .assign_watermarks(options.out_of_orderness_ms)?
        .key_by("key", parallelism)?
        .tumbling_window_count_sum(options.window_size_ms, "value")?
        .sink_files("w2")
}

/// How [`w2_job_split_watermarks`] makes its watermarks: inside the source, per split, with
/// bounded out-of-orderness (`W2Options::out_of_orderness_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitWatermarkOptions {
    /// How many splits the generator has, and whether they pause now and then in processing
    /// time (the same records).
    pub splits: crate::dataflow::source::GeneratorSplits,
    pub idle_timeout_ms: Option<u64>,
    pub emit_interval_ms: u64,
    /// Aligns the source's splits (one group, `w2`) with this drift.
    pub max_drift_ms: Option<u64>,
}

/// W2 with its watermarks made per split inside the source (`JobBuilder::source_with_watermarks`)
/// rather than by an operator after it: generator → key by `key` → tumbling count/sum → file sink
/// `w2`. Idleness, periodic emission, alignment and stalls as `watermarks` says.
pub fn w2_job_split_watermarks(
    options: W2Options,
    watermarks: SplitWatermarkOptions,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    source_with_split_watermarks("w2", options, watermarks)?
        .key_by("key", options.parallelism)?
        .tumbling_window_count_sum(options.window_size_ms, "value")?
        .sink_files("w2")
}

/// The drift of [`w2_aligned_job`]'s alignment group.
pub const W2_ALIGNED_DRIFT_MS: u64 = 200;

/// W2 with aligned sources, as `sabot coordinator --job w2-aligned` runs it: job and file sink
/// `w2-aligned`, one split per source subtask (one source subtask per keyed subtask), each
/// pausing 20 ms after every `200 << (split mod 3)` records (so splits read at different
/// speeds), watermarks made per split, all in one alignment group `w2-aligned` with a drift of
/// [`W2_ALIGNED_DRIFT_MS`]. Its output equals W2's (no record can be late: the bound exceeds the
/// generator's disorder), whatever the pauses.
pub fn w2_aligned_job(
    record_count: u64,
    parallelism: u16,
    batch_size: usize,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::source::{GeneratorSplits, GeneratorStalls};
    let options = W2Options {
        record_count,
        source_parallelism: parallelism,
        parallelism,
        batch_size,
        out_of_orderness_ms: W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: W2_WINDOW_SIZE_MS,
        keys: Keys::Uniform,
    };
    let watermarks = SplitWatermarkOptions {
        splits: GeneratorSplits { count: None, stalls: Some(GeneratorStalls { every_records: 200, stall_ms: 20 }) },
        idle_timeout_ms: None,
        emit_interval_ms: 0,
        max_drift_ms: Some(W2_ALIGNED_DRIFT_MS),
    };
    source_with_split_watermarks("w2-aligned", options, watermarks)?
        .key_by("key", parallelism)?
        .tumbling_window_count_sum(options.window_size_ms, "value")?
        .sink_files("w2-aligned")
}

/// W3 ([`w3_job_with`]) with its watermarks made per split inside the source, as
/// [`w2_job_split_watermarks`] makes W2's.
pub fn w3_job_split_watermarks(
    options: W2Options,
    watermarks: SplitWatermarkOptions,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    source_with_split_watermarks("w3", options, watermarks)?
        .key_by("key", options.parallelism)?
        .keyed_stats("value")?
        .sink_files("w3")
}

/// The generator of job `job` with bounded out-of-orderness watermarks per split.
fn source_with_split_watermarks(
    job: &str,
    options: W2Options,
    watermarks: SplitWatermarkOptions,
) -> Result<crate::dataflow::graph::Stream, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::SourceSpec;
    use crate::time::watermarks::WatermarkStrategy;
    let W2Options { record_count, source_parallelism, batch_size, keys, .. } = options;
    let mut strategy = WatermarkStrategy::bounded_out_of_orderness(options.out_of_orderness_ms)
        .with_emit_interval(watermarks.emit_interval_ms);
    strategy.idle_timeout_ms = watermarks.idle_timeout_ms;
    if let Some(max_drift_ms) = watermarks.max_drift_ms {
        strategy = strategy.with_alignment(job, max_drift_ms);
    }
    let source = SourceSpec::Generator { record_count, batch_size, keys, splits: watermarks.splits };
    crate::dataflow::JobBuilder::new(job).source_with_watermarks("generator", source, source_parallelism, strategy)
}

/// W3, the simulator's keyed-state workload: generator → watermarks → key by `key` →
/// [`crate::dataflow::keyed_stats::KeyedStats`] (value, list, map, reducing and aggregating
/// state per key) → file sink `w3`. Of [`W2Options`] it uses the counts, parallelisms, batch
/// size and keys.
pub fn w3_job_with(options: W2Options) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::SourceSpec;
    let W2Options { record_count, source_parallelism, parallelism, batch_size, keys, .. } = options;
    crate::dataflow::JobBuilder::new("w3")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys, splits: Default::default() },
            source_parallelism,
        )?
        .assign_watermarks(options.out_of_orderness_ms)?
        .key_by("key", parallelism)?
        .keyed_stats("value")?
        .sink_files("w3")
}

/// W4, the simulator's event-time windows on timers: generator → watermarks → key by `key` →
/// the windows of [`crate::dataflow::event_window`] of `kind` with `allowed_lateness_ms`,
/// late records to the side output `w4-late` → file sink `w4`. Of [`W2Options`] it uses the
/// counts, parallelisms, batch size, keys and out-of-orderness bound.
pub fn w4_job_with(
    options: W2Options,
    kind: crate::dataflow::event_window::WindowKind,
    allowed_lateness_ms: i64,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::event_window::LatePolicy;
    use crate::dataflow::graph::SourceSpec;
    let W2Options { record_count, source_parallelism, parallelism, batch_size, keys, .. } = options;
    crate::dataflow::JobBuilder::new("w4")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys, splits: Default::default() },
            source_parallelism,
        )?
        .assign_watermarks(options.out_of_orderness_ms)?
        .key_by("key", parallelism)?
        .windows(kind, "value", allowed_lateness_ms, LatePolicy::SideOutput("w4-late".into()))?
        .sink_files("w4")
}

/// W5, windows on processing time: generator → key by `key` → tumbling, sliding or session
/// windows of `kind` on processing time, counting and summing `value` → file sink `w5`. Which
/// window a record lands in depends on when it arrives, so runs differ; what every run must
/// keep is each record counted exactly once per window it belongs to: per key, the counts and
/// sums of the rows total what the key's records give (times the windows per record for
/// sliding windows). Of [`W2Options`] it uses the counts, parallelisms, batch size and keys.
pub fn w5_job_with(
    options: W2Options,
    kind: crate::dataflow::event_window::WindowKind,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::{SourceSpec, Windows};
    let W2Options { record_count, source_parallelism, parallelism, batch_size, keys, .. } = options;
    crate::dataflow::JobBuilder::new("w5")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys, splits: Default::default() },
            source_parallelism,
        )?
        .key_by("key", parallelism)?
        .windows_with("value", Windows { processing_time: true, ..Windows::new(kind) })?
        .sink_files("w5")
}

/// What W5 must total per key whatever the timing: `(count, sum)` of the key's records, each
/// counted once per window it belongs to (`size / slide` windows for sliding windows).
pub fn w5_totals(
    record_count: u64,
    keys: Keys,
    kind: crate::dataflow::event_window::WindowKind,
) -> std::collections::BTreeMap<u64, (u64, i64)> {
    use crate::dataflow::event_window::WindowKind;
    let per_record = match kind {
        WindowKind::Sliding { size_ms, slide_ms } => {
            assert_eq!(size_ms % slide_ms, 0, "a slide that divides the size: a record is in size / slide windows");
            (size_ms / slide_ms) as u64
        }
        WindowKind::Tumbling { .. } | WindowKind::Session { .. } => 1,
    };
    let mut totals = std::collections::BTreeMap::<u64, (u64, i64)>::new();
    for i in 0..record_count {
        let record = record_with(i, keys);
        let total = totals.entry(record.key).or_insert((0, 0));
        total.0 += per_record;
        total.1 += record.value * per_record as i64;
    }
    totals
}

/// The hot keys of [`w3_job`]: three records in four go to one of them.
pub const W3_HOT_KEYS: u64 = 64;

/// W3 as `sabot` runs it: [`w3_job_with`] with one source per keyed subtask and
/// [`W3_HOT_KEYS`] hot keys, so that keys gather long lists and full maps.
pub fn w3_job(
    record_count: u64,
    parallelism: u16,
    batch_size: usize,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    w3_job_with(W2Options {
        record_count,
        source_parallelism: parallelism,
        parallelism,
        batch_size,
        out_of_orderness_ms: W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: W2_WINDOW_SIZE_MS,
        keys: Keys::Skewed { hot: W3_HOT_KEYS },
    })
}

/// W1 as a job: generator → keep even values → project `(key, ts_ms)` → file sink `w1`.
pub fn w1_job(
    record_count: u64,
    parallelism: u16,
    batch_size: usize,
) -> Result<crate::dataflow::JobGraph, crate::dataflow::graph::BuildError> {
    use crate::dataflow::graph::SourceSpec;
    use crate::dataflow::map::Predicate;
    use arrow_array::{BooleanArray, Int64Array};
    let even = Predicate::new(|batch| {
        let values =
            batch.column(1).as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
                arrow_schema::ArrowError::InvalidArgumentError("w1: value column is not Int64".into())
            })?;
        Ok(values.iter().map(|value| value.map(|v| v % 2 == 0)).collect::<BooleanArray>())
    });
    crate::dataflow::JobBuilder::new("w1")
        .source(
            "generator",
            SourceSpec::Generator { record_count, batch_size, keys: Keys::Uniform, splits: Default::default() },
            parallelism,
        )?
        .filter("even-value", even)?
        .project(&["key", "ts_ms"])?
        .sink_files("w1")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the generator is the published one. Method: the first records, computed by hand from the
    // formulas of WORKLOADS.md (in Python), and the bound on disorder that W2 relies on.
    #[test]
    fn generator_matches_definition() {
        assert_eq!(record(0), Record { key: 5_794, value: 1_914_732_982, ts_ms: 271 });
        assert_eq!(record(1), Record { key: 23_176, value: 570_771_479, ts_ms: 543 });
        for i in 0..100_000 {
            let r = record(i);
            assert!(r.key < KEY_COUNT);
            assert!((0..2_000).contains(&(r.ts_ms - i as i64)));
            assert!(r.value >= 0 && (r.value as u64) < MODULUS);
        }
    }

    // Goal: the skewed variant keeps values and times, and sends about three records in four to
    // its hot keys (counted over 100,000 records), the rest over the whole key space.
    #[test]
    fn skewed_keys_are_hot() {
        let keys = Keys::Skewed { hot: 4 };
        let mut hot = 0;
        for i in 0..100_000 {
            let (plain, skewed) = (record(i), record_with(i, keys));
            assert_eq!((plain.value, plain.ts_ms), (skewed.value, skewed.ts_ms));
            assert!(skewed.key == plain.key || skewed.key < 4);
            hot += u64::from(skewed.key < 4);
        }
        assert!((72_000..80_000).contains(&hot), "{hot} hot records of 100,000");
        assert_eq!(record_with(7, Keys::Uniform), record(7));
    }
}
