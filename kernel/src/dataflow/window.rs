//! The keyed tumbling event-time window: count and sum per key and window, fired by the watermark.
//!
//! State: an aggregating state `count-sum` in the subtask's [`KeyedState`], with the window start
//! as namespace: one entry per (key, window), its accumulator `(count u64, sum i64)`. A window `[start, end)`
//! fires when the input watermark reaches `end`; its rows are emitted before the watermark is
//! forwarded, so downstream sees each result ahead of the watermark that completed it. A record
//! whose window already fired is late: it is dropped and counted in `records_late_dropped`.
//! At end of input every open window fires. Within a window, rows come by key group, then in the
//! order their keys first arrived: a function of the input sequence, so a replay emits the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, SchemaRef};

use super::graph::{field, schema_of};
use super::watermark::event_times;
use super::{read_u64_file, u64_file_bytes, Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot};
use crate::checkpoint::manifest::{checkpoint_dir, shared_dir, TaskSnapshot};
use crate::element::CheckpointId;
use crate::element::Element;
use crate::key_group::{KeyGroupRange, MaxParallelism};
use crate::state::keyed::{AggregateFunction, AggregatingState, KeyedState};
use crate::state::{order_preserving_i64_inverse, read_u64_be, CaptureTarget, FileWrite, StateBackend};
use crate::time::EventTime;

/// The key column types a keyed stream may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyType {
    UInt64,
    Int64,
}

impl KeyType {
    pub fn of(data_type: &DataType) -> Option<KeyType> {
        match data_type {
            DataType::UInt64 => Some(KeyType::UInt64),
            DataType::Int64 => Some(KeyType::Int64),
            _ => None,
        }
    }
}

/// The key column of a batch as the `u64`s that the key-group hash takes.
pub(crate) fn key_column<'a>(
    batch: &'a RecordBatch,
    index: usize,
    key_type: KeyType,
) -> Result<KeyColumn<'a>, OperatorError> {
    let column = batch.column(index);
    if column.null_count() > 0 {
        return Err(OperatorError::Malformed(format!("{} records with a null key", column.null_count())));
    }
    let wrong = || OperatorError::Malformed(format!("key column is {}, expected {key_type:?}", column.data_type()));
    Ok(match key_type {
        KeyType::UInt64 => KeyColumn::UInt64(column.as_any().downcast_ref::<UInt64Array>().ok_or_else(wrong)?.values()),
        KeyType::Int64 => KeyColumn::Int64(column.as_any().downcast_ref::<Int64Array>().ok_or_else(wrong)?.values()),
    })
}

/// The Int64 value column `index` of a batch, checked to have no nulls.
pub(crate) fn int64_values<'a>(
    batch: &'a RecordBatch,
    index: usize,
    operator: &str,
) -> Result<&'a [i64], OperatorError> {
    let column = batch.column(index);
    if column.null_count() > 0 {
        return Err(OperatorError::Malformed(format!("{operator}: {} null values", column.null_count())));
    }
    let array = column.as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
        OperatorError::Malformed(format!("{operator}: value column is {}, not Int64", column.data_type()))
    })?;
    Ok(array.values())
}

/// Where an operator subtask's keyed state goes in checkpoint `checkpoint`: files named
/// `<prefix>-<vertex>-<index>` in the checkpoint's directory, shared files beside it.
pub(crate) fn capture_target(
    checkpoint: CheckpointId,
    prefix: &str,
    subtask: crate::dataflow::SubtaskId,
) -> CaptureTarget {
    let name = format!("{prefix}-{:05}-{:05}", subtask.vertex.0, subtask.index);
    CaptureTarget {
        checkpoint,
        path: format!("{}/{name}", checkpoint_dir(checkpoint)),
        shared_dir: format!("{}/{name}", shared_dir()),
    }
}

pub(crate) enum KeyColumn<'a> {
    UInt64(&'a [u64]),
    Int64(&'a [i64]),
}

/// Counts and sums a window's values. Records through cells what the state layer's callbacks
/// saw: whether an accumulator was created (a new entry), and whether a sum overflowed.
#[derive(Debug, Default)]
pub struct CountSum {
    pub(crate) created: std::cell::Cell<bool>,
    pub(crate) overflow: std::cell::Cell<bool>,
}

impl AggregateFunction for CountSum {
    type In = i64;
    type Acc = (u64, i64);
    type Out = (u64, i64);

    fn create_accumulator(&self) -> (u64, i64) {
        self.created.set(true);
        (0, 0)
    }

    #[inline]
    fn add(&self, value: &i64, accumulator: &mut (u64, i64)) {
        accumulator.0 += 1;
        match accumulator.1.checked_add(*value) {
            Some(sum) => accumulator.1 = sum,
            None => self.overflow.set(true),
        }
    }

    fn merge(&self, a: (u64, i64), b: (u64, i64)) -> (u64, i64) {
        let sum = a.1.checked_add(b.1).unwrap_or_else(|| {
            self.overflow.set(true);
            a.1
        });
        (a.0 + b.0, sum)
    }

    fn get_result(&self, accumulator: &(u64, i64)) -> (u64, i64) {
        *accumulator
    }
}

/// What a tumbling window reads, and how wide its windows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub key_index: usize,
    pub key_type: KeyType,
    pub event_time_index: usize,
    pub value_index: usize,
    pub size_ms: i64,
}

pub struct TumblingWindowCountSum {
    spec: WindowSpec,
    max_parallelism: MaxParallelism,
    state: KeyedState,
    aggregate: AggregatingState<CountSum>,
    /// The state's key groups (asked once: the backend is behind a virtual call).
    key_groups: KeyGroupRange,
    /// The input watermark: windows ending at or before it have fired.
    watermark: EventTime,
    /// The watermark restored from a checkpoint. The generators upstream start over after a
    /// restore, so the input watermark climbs again from below it: until it passes this one,
    /// it repeats what the window already knew, and changes nothing.
    watermark_restored: EventTime,
    /// Open windows by start, with the keys of each of their entries in state, by key group
    /// (indexed from the first group of the backend): the windows' timers, in effect. They move
    /// into the state backend with the event-time timers.
    windows_open: BTreeMap<i64, Vec<Vec<u64>>>,
    schema: SchemaRef,
    /// Rows of the windows being fired, reused across firings.
    fired: Vec<(u64, i64, u64, i64)>,
    metrics: OperatorMetrics,
}

impl TumblingWindowCountSum {
    /// The output has no event-time column of its own.
    pub const EVENT_TIME_INDEX: Option<usize> = None;

    pub fn schema(key: Field) -> SchemaRef {
        schema_of(vec![
            key.with_nullable(false),
            field("window_start", DataType::Int64),
            field("window_end", DataType::Int64),
            field("count", DataType::UInt64),
            field("sum", DataType::Int64),
        ])
    }

    pub fn new(spec: WindowSpec, max_parallelism: MaxParallelism, backend: Box<dyn StateBackend>) -> Self {
        assert!(spec.size_ms > 0, "window size {} ms", spec.size_ms);
        let key_field = match spec.key_type {
            KeyType::UInt64 => field("key", DataType::UInt64),
            KeyType::Int64 => field("key", DataType::Int64),
        };
        let mut state = KeyedState::new(backend, max_parallelism);
        let aggregate = state
            .aggregating_state("count-sum", CountSum::default(), None)
            .expect("the window's only state is declared once, in a fresh backend");
        TumblingWindowCountSum {
            spec,
            max_parallelism,
            key_groups: state.key_groups(),
            state,
            aggregate,
            watermark: EventTime::MIN,
            watermark_restored: EventTime::MIN,
            windows_open: BTreeMap::new(),
            schema: Self::schema(key_field),
            fired: Vec::new(),
            metrics: OperatorMetrics::default(),
        }
    }

    /// Adds one record to its window. `key_hash` is the key as `u64` for the key-group hash.
    #[inline]
    fn add(&mut self, key_hash: u64, ts: i64, value: i64) -> Result<(), OperatorError> {
        let start = ts - ts.rem_euclid(self.spec.size_ms);
        let end = start.checked_add(self.spec.size_ms).ok_or_else(|| {
            OperatorError::Malformed(format!("tumbling-window: event time {ts} has no window end below i64::MAX"))
        })?;
        if end <= self.watermark.0 {
            self.metrics.records_late_dropped += 1;
            return Ok(());
        }
        self.set_key(key_hash);
        self.state.set_namespace_i64(start);
        let key_group = self.state.current_key_group();
        self.aggregate.add(&mut self.state, &value)?;
        let function = self.aggregate.function();
        let created = function.created.take();
        if function.overflow.take() {
            return Err(OperatorError::Malformed(format!(
                "tumbling-window: sum overflows i64 for key {key_hash} in window {start}"
            )));
        }
        if created {
            let offset = usize::from(key_group.0 - self.key_groups.start());
            // Nearly every new entry belongs to the newest window: look there before the map.
            let groups = match self.windows_open.last_entry() {
                Some(newest) if *newest.key() == start => newest.into_mut(),
                _ => {
                    let group_count = self.key_groups.count();
                    self.windows_open.entry(start).or_insert_with(|| vec![Vec::new(); group_count])
                }
            };
            groups[offset].push(key_hash);
        }
        Ok(())
    }

    /// Makes `key_hash` (the key as the `u64` the key-group hash takes) the state's current key.
    #[inline]
    fn set_key(&mut self, key_hash: u64) {
        match self.spec.key_type {
            KeyType::UInt64 => self.state.set_current_key_u64(key_hash),
            KeyType::Int64 => self.state.set_current_key_i64(key_hash as i64),
        }
    }

    /// Emits and clears every window that ends at or before `watermark`, window by window.
    fn fire(&mut self, context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        let mut fired = std::mem::take(&mut self.fired);
        fired.clear();
        while let Some(window) = self.windows_open.first_entry() {
            let start = *window.key();
            // `start + size` cannot overflow: `add` checked it before opening the window.
            if start + self.spec.size_ms > watermark.0 {
                break;
            }
            // Key group by key group (each group's table is small enough to stay in cache),
            // and within a group in the order the keys first arrived: a function of the input
            // sequence, so deterministic, and cheaper than sorting by key.
            for keys in window.remove() {
                for key in keys {
                    self.set_key(key);
                    self.state.set_namespace_i64(start);
                    let taken = self.aggregate.take(&mut self.state)?;
                    let (count, sum) =
                        taken.unwrap_or_else(|| panic!("window {start} of key {key} is open but has no state"));
                    fired.push((key, start, count, sum));
                }
            }
            self.metrics.windows_fired += 1;
        }
        let result = self.emit_rows(context, &fired);
        self.fired = fired;
        result
    }

    /// Emits fired rows `(key, window start, count, sum)` as one batch.
    fn emit_rows(&mut self, context: &mut Context<'_>, fired: &[(u64, i64, u64, i64)]) -> Result<(), OperatorError> {
        if fired.is_empty() {
            return Ok(());
        }
        context.emit(Element::Batch(self.rows_batch(fired)?));
        self.metrics.records_out += fired.len() as u64;
        Ok(())
    }

    /// Rows `(key, window start, count, sum)` as a batch of the output schema.
    fn rows_batch(&self, fired: &[(u64, i64, u64, i64)]) -> Result<RecordBatch, OperatorError> {
        let key_column: ArrayRef = match self.spec.key_type {
            KeyType::UInt64 => Arc::new(fired.iter().map(|row| row.0).collect::<UInt64Array>()),
            KeyType::Int64 => Arc::new(fired.iter().map(|row| row.0 as i64).collect::<Int64Array>()),
        };
        let columns: Vec<ArrayRef> = vec![
            key_column,
            Arc::new(fired.iter().map(|row| row.1).collect::<Int64Array>()),
            Arc::new(fired.iter().map(|row| row.1 + self.spec.size_ms).collect::<Int64Array>()),
            Arc::new(fired.iter().map(|row| row.2).collect::<UInt64Array>()),
            Arc::new(fired.iter().map(|row| row.3).collect::<Int64Array>()),
        ];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl Operator for TumblingWindowCountSum {
    fn name(&self) -> &str {
        "tumbling-window"
    }

    fn on_batch(&mut self, _context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let times = event_times(&batch, self.spec.event_time_index, "tumbling-window")?;
        let values = int64_values(&batch, self.spec.value_index, "tumbling-window")?;
        match key_column(&batch, self.spec.key_index, self.spec.key_type)? {
            KeyColumn::UInt64(keys) => {
                for row in 0..keys.len() {
                    self.add(keys[row], times[row], values[row])?;
                }
            }
            KeyColumn::Int64(keys) => {
                for row in 0..keys.len() {
                    self.add(keys[row] as u64, times[row], values[row])?;
                }
            }
        }
        self.metrics.records_in += batch.num_rows() as u64;
        Ok(())
    }

    fn on_watermark(&mut self, context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        if watermark <= self.watermark_restored {
            return Ok(());
        }
        assert!(watermark > self.watermark, "watermark {watermark:?} after {:?}", self.watermark);
        self.fire(context, watermark)?;
        self.watermark = watermark;
        context.emit(Element::Watermark(watermark));
        Ok(())
    }

    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        self.fire(context, EventTime::MAX)
    }

    /// Writes the state (portable snapshot format) and the input watermark.
    fn on_barrier(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        if checkpoint == CheckpointId::END_OF_INPUT {
            // At the end of input every window fired: there is no state to keep.
            assert!(self.windows_open.is_empty(), "windows open after the end of input");
            return Ok(OperatorSnapshot::default());
        }
        let target = capture_target(checkpoint, "window", context.subtask);
        let watermark_path = format!("{}.watermark", target.path);
        // The synchronous part captures the state; writing it is left to the driver.
        let capture = self.state.capture(&target)?;
        let mut files = capture.files;
        files.push(watermark_path.clone());
        let writes = vec![capture.write, FileWrite::boxed(watermark_path, u64_file_bytes(self.watermark.0 as u64))];
        Ok(OperatorSnapshot { files, pending_output: Vec::new(), writes })
    }

    fn on_checkpoint_complete(
        &mut self,
        _context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<(), OperatorError> {
        self.state.checkpoint_complete(checkpoint);
        Ok(())
    }

    /// Loads the entries of this subtask's key groups from every subtask's state file, takes the
    /// lowest of their watermarks (so none goes back), and rebuilds the open-window index.
    fn restore(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        let range = self.key_groups;
        let mut watermark: Option<i64> = None;
        let files: Vec<String> = snapshots.iter().flat_map(|s| s.files.iter().cloned()).collect();
        for file in files.iter().filter(|file| file.ends_with(".watermark")) {
            let restored = read_u64_file(context.storage, file)? as i64;
            watermark = Some(watermark.map_or(restored, |w| w.min(restored)));
        }
        self.state.restore_files(context.storage, &files)?;
        self.watermark = EventTime(watermark.unwrap_or(i64::MIN));
        self.watermark_restored = self.watermark;
        self.windows_open.clear();
        let (group_count, key_type) = (range.count(), self.spec.key_type);
        let id = self.aggregate.id();
        for (offset, key_group) in range.iter().enumerate() {
            let windows_open = &mut self.windows_open;
            self.state.for_each_key(id, key_group, &mut |key, namespace| {
                let start = order_preserving_i64_inverse(read_u64_be(namespace)?);
                let groups = windows_open.entry(start).or_insert_with(|| vec![Vec::new(); group_count]);
                // The index holds keys as the u64 the hash takes; state holds Int64 keys order-preserving.
                let stored = read_u64_be(key)?;
                let key_hash = match key_type {
                    KeyType::UInt64 => stored,
                    KeyType::Int64 => order_preserving_i64_inverse(stored) as u64,
                };
                groups[offset].push(key_hash);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The open windows of `key`, by start: `key, window_start, window_end, count, sum` so far.
    fn query(&mut self, key: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let key_group = self.max_parallelism.key_group_of_u64(key);
        if !self.key_groups.contains(key_group) {
            return Err(OperatorError::Protocol(format!(
                "key {key} is in key group {}, not held by this subtask",
                key_group.0
            )));
        }
        let mut rows = Vec::new();
        let starts: Vec<i64> = self.windows_open.keys().copied().collect();
        for start in starts {
            self.set_key(key);
            self.state.set_namespace_i64(start);
            if let Some((count, sum)) = self.aggregate.get(&mut self.state)? {
                rows.push((key, start, count, sum));
            }
        }
        Ok(Some(self.rows_batch(&rows)?))
    }

    fn metrics(&self) -> OperatorMetrics {
        OperatorMetrics { state_size_bytes: self.state.size_bytes(), ..self.metrics }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch, UInt64Array};

    use super::*;
    use crate::dataflow::graph::{SubtaskId, VertexId};
    use crate::env::MemStorage;
    use crate::key_group::KeyGroupRange;
    use crate::state::HeapBackend;
    use crate::testing::window_rows;
    use crate::time::Instant;

    /// Key in column 0, value in 1, event time in 2, windows of 10 ms.
    fn spec(key_type: KeyType) -> WindowSpec {
        WindowSpec { key_index: 0, key_type, event_time_index: 2, value_index: 1, size_ms: 10 }
    }

    fn window() -> TumblingWindowCountSum {
        let max = MaxParallelism::default();
        let state = Box::new(HeapBackend::new(KeyGroupRange::all(max)));
        TumblingWindowCountSum::new(spec(KeyType::UInt64), max, state)
    }

    fn batch(rows: &[(Option<u64>, i64, i64)]) -> RecordBatch {
        // A nullable key field, so that a batch can carry the null key a source should not send.
        let generator = crate::dataflow::source::GeneratorSource::schema();
        let mut fields: Vec<arrow_schema::Field> = generator.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields[0] = fields[0].clone().with_nullable(true);
        let schema = Arc::new(arrow_schema::Schema::new(fields));
        let keys: UInt64Array = rows.iter().map(|r| r.0).collect();
        let values: Int64Array = rows.iter().map(|r| Some(r.1)).collect();
        let times: Int64Array = rows.iter().map(|r| Some(r.2)).collect();
        RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(values), Arc::new(times)]).unwrap()
    }

    /// Runs `f` with a context and returns what the operator emitted.
    fn emitted(f: impl FnOnce(&mut Context<'_>) -> Result<(), OperatorError>) -> Result<Vec<Element>, OperatorError> {
        let mut storage = MemStorage::new();
        let mut out = Vec::new();
        let subtask = SubtaskId { vertex: VertexId(0), index: 0 };
        f(&mut Context::new(Instant(0), &mut storage, subtask, &mut out))?;
        Ok(out)
    }

    fn rows(elements: &[Element]) -> Vec<(u64, i64, u64, i64)> {
        let batches: Vec<RecordBatch> = elements
            .iter()
            .filter_map(|e| match e {
                Element::Batch(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        window_rows(&batches).into_iter().map(|((k, s), (c, v))| (k, s, c, v)).collect()
    }

    // Goal: a window fires exactly when the watermark reaches its end, results before the watermark;
    // a record for a fired window is late: dropped, counted, and it changes no result.
    // Method: a script of batches and watermarks with the expected output after each step.
    #[test]
    fn fires_at_window_end_and_drops_late_records() {
        let mut op = window();
        let out = emitted(|c| op.on_batch(c, batch(&[(Some(1), 5, 3), (Some(2), 7, 9), (Some(1), 1, 12)]))).unwrap();
        assert!(out.is_empty());
        // Watermark 9: window [0, 10) has not ended.
        let out = emitted(|c| op.on_watermark(c, EventTime(9))).unwrap();
        assert!(matches!(out.as_slice(), [Element::Watermark(EventTime(9))]));
        // Watermark 10: it fires, rows first, then the watermark.
        let out = emitted(|c| op.on_watermark(c, EventTime(10))).unwrap();
        assert_eq!(rows(&out), vec![(1, 0, 1, 5), (2, 0, 1, 7)]);
        assert!(matches!(out.last(), Some(Element::Watermark(EventTime(10)))));
        // A record at 4 is late now; one at 10 is on time.
        emitted(|c| op.on_batch(c, batch(&[(Some(1), 100, 4), (Some(1), 2, 10)]))).unwrap();
        assert_eq!(op.metrics().records_late_dropped, 1);
        let out = emitted(|c| op.on_end(c)).unwrap();
        assert_eq!(rows(&out), vec![(1, 10, 2, 3)]);
        assert_eq!(op.metrics().windows_fired, 2);
        assert_eq!(op.metrics().state_size_bytes, 0);
    }

    // Goal: a query answers a key's open windows as they stand (fired windows are gone), equal
    // to a model that sums the on-time records of the key per window; other keys are not seen.
    // Method: random records (seed printed), queries after every batch and after a watermark.
    #[test]
    fn query_answers_open_windows_of_a_key() {
        let seed = 0x5eed_0007_u64;
        println!("seed {seed}");
        let mut random = seed;
        let mut next = |bound: u64| {
            random = random.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (random >> 33) % bound
        };
        let mut op = window();
        let mut model: BTreeMap<(u64, i64), (u64, i64)> = BTreeMap::new();
        let mut watermark = i64::MIN;
        for round in 0..20 {
            let records: Vec<(Option<u64>, i64, i64)> =
                (0..30).map(|_| (Some(next(4)), next(100) as i64 - 50, next(60) as i64)).collect();
            emitted(|c| op.on_batch(c, batch(&records))).unwrap();
            for &(key, value, time) in &records {
                let start = time - time.rem_euclid(10);
                if start + 10 > watermark {
                    let entry = model.entry((key.unwrap(), start)).or_default();
                    *entry = (entry.0 + 1, entry.1 + value);
                }
            }
            if round % 5 == 4 {
                watermark = 10 * (round as i64 / 5 + 1);
                emitted(|c| op.on_watermark(c, EventTime(watermark))).unwrap();
                model.retain(|&(_, start), _| start + 10 > watermark);
            }
            for key in 0..5 {
                let answer = op.query(key).unwrap().expect("the window is queryable");
                let expected: Vec<(u64, i64, u64, i64)> =
                    model.range((key, i64::MIN)..=(key, i64::MAX)).map(|(&(k, s), &(c, v))| (k, s, c, v)).collect();
                assert_eq!(rows(&[Element::Batch(answer)]), expected, "seed {seed}, round {round}, key {key}");
            }
        }
        // A key of a group this subtask does not hold is refused.
        let max = MaxParallelism::default();
        let half = KeyGroupRange::new(0, max.get() / 2);
        let mut op = TumblingWindowCountSum::new(spec(KeyType::UInt64), max, Box::new(HeapBackend::new(half)));
        let outside = (0..).find(|&key| !half.contains(max.key_group_of_u64(key))).unwrap();
        assert!(matches!(op.query(outside), Err(OperatorError::Protocol(m)) if m.contains("not held")));
    }

    // Goal: Int64 keys, negative ones included, come out as they went in.
    #[test]
    fn int64_keys_round_trip() {
        let max = MaxParallelism::default();
        let state = Box::new(HeapBackend::new(KeyGroupRange::all(max)));
        let mut op = TumblingWindowCountSum::new(spec(KeyType::Int64), max, state);
        let schema = Arc::new(arrow_schema::Schema::new(vec![
            arrow_schema::Field::new("key", arrow_schema::DataType::Int64, false),
            arrow_schema::Field::new("value", arrow_schema::DataType::Int64, false),
            arrow_schema::Field::new("ts_ms", arrow_schema::DataType::Int64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![-5, 7, -5])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(Int64Array::from(vec![1, 2, 3])),
        ];
        emitted(|c| op.on_batch(c, RecordBatch::try_new(schema, columns).unwrap())).unwrap();
        let out = emitted(|c| op.on_end(c)).unwrap();
        let Some(Element::Batch(batch)) = out.first() else { panic!("{out:?}") };
        let keys = batch.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let mut got: Vec<(i64, u64)> = (0..batch.num_rows())
            .map(|row| (keys.value(row), batch.column(3).as_any().downcast_ref::<UInt64Array>().unwrap().value(row)))
            .collect();
        got.sort();
        assert_eq!(got, vec![(-5, 2), (7, 1)]);
    }

    // Goal: a snapshot restores into the same results, also split over more subtasks (rescaling),
    // and the restored watermark keeps dropping records that were late before the checkpoint.
    // Method: one operator takes records and a barrier; three operators with the key-group ranges
    // of parallelism 3 restore from it; their output at end equals the original's.
    #[test]
    fn snapshot_restores_and_rescales() {
        let mut storage = MemStorage::new();
        let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
        let mut out = Vec::new();
        let mut op = window();
        let input: Vec<(Option<u64>, i64, i64)> =
            (0..200).map(|i| (Some(i % 37), i as i64, 10 + i as i64 % 25)).collect();
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        op.on_batch(&mut context, batch(&input)).unwrap();
        op.on_watermark(&mut context, EventTime(20)).unwrap();
        let written = op.on_barrier(&mut context, CheckpointId(3)).unwrap();
        assert!(written.files.iter().all(|f| f.starts_with("checkpoints/chk-00000000000000000003/")));
        op.on_end(&mut context).unwrap();
        // The asynchronous part, as a driver does it: after the state changed (all windows fired),
        // it still writes what the barrier captured.
        let mut files = written.files;
        for write in written.writes {
            files.extend(write.write(context.storage).unwrap());
        }
        let expected = rows(&out);
        let snapshots = [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: vec![] }];
        let max = MaxParallelism::default();
        let mut restored_rows = Vec::new();
        for index in 0..3 {
            let state = Box::new(HeapBackend::new(max.range_of(index, 3)));
            let mut restored = TumblingWindowCountSum::new(spec(KeyType::UInt64), max, state);
            let mut out = Vec::new();
            let mut context =
                Context::new(Instant(0), &mut storage, SubtaskId { vertex: VertexId(1), index }, &mut out);
            restored.restore(&mut context, &snapshots).unwrap();
            // A record for window [10, 20), which fired before the checkpoint: still late.
            restored.on_batch(&mut context, batch(&[(Some(1), 1, 15)])).unwrap();
            assert_eq!(restored.metrics().records_late_dropped, 1);
            restored.on_end(&mut context).unwrap();
            restored_rows.extend(rows(&out));
        }
        // Windows ending at or before the checkpoint's watermark (20) fired before it.
        let (fired_before, mut after): (Vec<_>, Vec<_>) = expected.into_iter().partition(|r| r.1 + 10 <= 20);
        after.sort();
        restored_rows.sort();
        assert!(!fired_before.is_empty() && !after.is_empty(), "the script fires windows before and after");
        assert_eq!(restored_rows, after);
    }

    // Goal (regression, found by the simulator: `sim/tests/regressions.rs`,
    // `restored_window_takes_a_lower_watermark`): after a restore, the watermark generators
    // start over, so the first watermarks can be at or below the one the window restored; the
    // window takes them without panicking, fires nothing for them, and fires as before once the
    // watermark passes its restored one. Method: snapshot at watermark 20, restore, then
    // watermarks 12, 20 and 30.
    #[test]
    fn restored_window_takes_a_lower_watermark() {
        let mut storage = MemStorage::new();
        let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
        let mut out = Vec::new();
        let mut op = window();
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        op.on_batch(&mut context, batch(&[(Some(1), 5, 15), (Some(2), 7, 25)])).unwrap();
        op.on_watermark(&mut context, EventTime(20)).unwrap();
        let written = op.on_barrier(&mut context, CheckpointId(1)).unwrap();
        let mut files = written.files;
        for write in written.writes {
            files.extend(write.write(context.storage).unwrap());
        }
        let snapshots = [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: vec![] }];
        let mut restored = window();
        let mut out = Vec::new();
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        restored.restore(&mut context, &snapshots).unwrap();
        restored.on_watermark(&mut context, EventTime(12)).unwrap();
        restored.on_watermark(&mut context, EventTime(20)).unwrap();
        assert!(out.is_empty(), "watermarks the window already had change nothing: {out:?}");
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        restored.on_watermark(&mut context, EventTime(30)).unwrap();
        assert_eq!(rows(&out), vec![(2, 20, 1, 7)]);
        assert!(matches!(out.last(), Some(Element::Watermark(EventTime(30)))));
    }

    // Goal: records the operator cannot take are errors that name the problem, never a panic or a
    // silently wrong sum: a null key, and a sum beyond i64.
    #[test]
    fn malformed_records_are_errors() {
        let mut op = window();
        let error = emitted(|c| op.on_batch(c, batch(&[(None, 1, 1)]))).unwrap_err();
        assert!(error.to_string().contains("null key"), "{error}");
        let mut op = window();
        let error = emitted(|c| op.on_batch(c, batch(&[(Some(1), i64::MAX, 1), (Some(1), 1, 2)]))).unwrap_err();
        assert!(error.to_string().contains("overflows"), "{error}");
    }
}
