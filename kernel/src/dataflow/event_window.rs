//! Keyed event-time windows on timers: tumbling, sliding and session windows counting and
//! summing a value, with allowed lateness and an explicit policy for late records.
//!
//! # Semantics (Flink's)
//! - A record with event time `t` belongs to the windows its [`WindowKind`] assigns: one
//!   tumbling window `[t - t mod size, … + size)`; every sliding window `[s, s + size)` with
//!   `s` a multiple of `slide` and `s <= t < s + size`; a session window `[t, t + gap)`, merged
//!   with every session of the same key it overlaps or touches (their accumulators merge).
//! - A window fires when the watermark reaches its end (`end <= watermark`): it emits
//!   `key, window_start, window_end, count, sum`.
//! - Allowed lateness `L`: a window keeps its state until the watermark reaches `end + L`. A
//!   record for a window that fired but is not yet cleaned updates it and fires it again at
//!   once (the new row supersedes the old one; `records_late_updated` counts these records).
//! - A record none of whose windows can still change (for sessions: whose merged window ends
//!   at or before `watermark - L`) is late: [`LatePolicy::Drop`] counts it in
//!   `records_late_dropped`; [`LatePolicy::SideOutput`] writes it (`key, value, ts`) to a file
//!   sink of its own, committed exactly once with the job's checkpoints
//!   (`records_late_side_output`). Late data is never lost silently.
//! - Window state is cleared when the watermark reaches `end + L`.
//!
//! # State
//! An aggregating state `count-sum` per key with the window `(start, end)` as namespace (16
//! bytes, order-preserving), a map state `sessions` (start → end, void namespace) of each key's
//! open session windows, and the [`TimerService`]: a timer at `end` fires a window, one at
//! `end + L` clears it (the same timer when `L = 0`). Timers fire in the order (time, key group,
//! key, namespace), so the output's order is a function of the input's.

use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, SchemaRef};

use super::graph::{field, schema_of};
use super::sink::FileSink;
use super::watermark::event_times;
use super::window::{capture_target, int64_values, key_column, CountSum, KeyColumn, KeyType};
use super::{read_u64_file, u64_file_bytes, Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot};
use crate::checkpoint::manifest::TaskSnapshot;
use crate::dataflow::graph::SubtaskId;
use crate::element::{CheckpointId, Element};
use crate::key_group::MaxParallelism;
use crate::state::keyed::{AggregatingState, KeyedState, MapState};
use crate::state::timers::TimerService;
use crate::state::StateBackend;
use crate::state::{order_preserving_i64, order_preserving_i64_inverse, read_u64_be, FileWrite};
use crate::time::EventTime;

/// How records are assigned to windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Tumbling { size_ms: i64 },
    Sliding { size_ms: i64, slide_ms: i64 },
    Session { gap_ms: i64 },
}

impl WindowKind {
    /// Checks the sizes: positive, and a slide no larger than the size.
    pub fn validate(self) -> Result<(), String> {
        match self {
            WindowKind::Tumbling { size_ms } if size_ms > 0 => Ok(()),
            WindowKind::Sliding { size_ms, slide_ms } if size_ms > 0 && slide_ms > 0 && slide_ms <= size_ms => Ok(()),
            WindowKind::Session { gap_ms } if gap_ms > 0 => Ok(()),
            other => Err(format!("{other:?}: sizes must be positive, and a slide at most the size")),
        }
    }

    /// The windows `[start, end)` of a record at `ts` (a session's before merging), ascending.
    /// `None` if a window's end would overflow.
    pub fn assign(self, ts: i64, out: &mut Vec<(i64, i64)>) -> Option<()> {
        out.clear();
        match self {
            WindowKind::Tumbling { size_ms } => {
                let start = ts - ts.rem_euclid(size_ms);
                out.push((start, start.checked_add(size_ms)?));
            }
            WindowKind::Sliding { size_ms, slide_ms } => {
                let last = ts - ts.rem_euclid(slide_ms);
                let mut start = last;
                while start > ts - size_ms {
                    start -= slide_ms;
                }
                start += slide_ms;
                while start <= last {
                    out.push((start, start.checked_add(size_ms)?));
                    start += slide_ms;
                }
            }
            WindowKind::Session { gap_ms } => out.push((ts, ts.checked_add(gap_ms)?)),
        }
        Some(())
    }
}

/// What happens to a record too late for any window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LatePolicy {
    Drop,
    /// Into the file sink of this name (`output/<name>/`): rows `key, value, ts`.
    SideOutput(String),
}

/// What the windows read and do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventWindowSpec {
    pub key_index: usize,
    pub key_type: KeyType,
    pub event_time_index: usize,
    pub value_index: usize,
    pub kind: WindowKind,
    pub allowed_lateness_ms: i64,
    pub late: LatePolicy,
}

fn window_namespace(start: i64, end: i64) -> [u8; 16] {
    let mut bytes = [0_u8; 16];
    bytes[..8].copy_from_slice(&order_preserving_i64(start).to_be_bytes());
    bytes[8..].copy_from_slice(&order_preserving_i64(end).to_be_bytes());
    bytes
}

fn window_of_namespace(bytes: &[u8]) -> Option<(i64, i64)> {
    let start = order_preserving_i64_inverse(read_u64_be(bytes.get(..8)?).ok()?);
    let end = order_preserving_i64_inverse(read_u64_be(bytes.get(8..16)?).ok()?);
    Some((start, end))
}

pub struct EventTimeWindows {
    spec: EventWindowSpec,
    state: KeyedState,
    aggregate: AggregatingState<CountSum>,
    sessions: MapState<i64, i64>,
    timers: TimerService,
    late_sink: Option<FileSink>,
    /// The input watermark; windows ending at or before it have fired.
    watermark: EventTime,
    /// The watermark restored from a checkpoint: watermarks up to it repeat what is known.
    watermark_restored: EventTime,
    schema: SchemaRef,
    late_schema: SchemaRef,
    /// Reused: a record's windows.
    windows: Vec<(i64, i64)>,
    /// Rows `(key, start, end, count, sum)` to emit, and late records `(key, value, ts)`.
    rows: Vec<(u64, i64, i64, u64, i64)>,
    late_rows: Vec<(u64, i64, i64)>,
    metrics: OperatorMetrics,
}

impl EventTimeWindows {
    pub fn schema(key_type: KeyType) -> SchemaRef {
        schema_of(vec![
            key_field(key_type),
            field("window_start", DataType::Int64),
            field("window_end", DataType::Int64),
            field("count", DataType::UInt64),
            field("sum", DataType::Int64),
        ])
    }

    /// The rows of the late-record side output.
    pub fn late_schema(key_type: KeyType) -> SchemaRef {
        schema_of(vec![key_field(key_type), field("value", DataType::Int64), field("ts_ms", DataType::Int64)])
    }

    pub fn new(
        spec: EventWindowSpec,
        max_parallelism: MaxParallelism,
        backend: Box<dyn StateBackend>,
        subtask: SubtaskId,
    ) -> EventTimeWindows {
        spec.kind.validate().expect("window sizes are validated when the job is built");
        assert!(spec.allowed_lateness_ms >= 0, "allowed lateness {} ms", spec.allowed_lateness_ms);
        let mut state = KeyedState::new(backend, max_parallelism);
        let declared = "the windows declare their states once, in a fresh backend";
        let aggregate = state.aggregating_state("count-sum", CountSum::default(), None).expect(declared);
        let sessions = state.map_state::<i64, i64>("sessions", None).expect(declared);
        let timers = TimerService::declare(&mut state).expect(declared);
        let late_sink = match &spec.late {
            LatePolicy::Drop => None,
            LatePolicy::SideOutput(name) => Some(FileSink::new_files(name, subtask)),
        };
        EventTimeWindows {
            schema: Self::schema(spec.key_type),
            late_schema: Self::late_schema(spec.key_type),
            spec,
            state,
            aggregate,
            sessions,
            timers,
            late_sink,
            watermark: EventTime::MIN,
            watermark_restored: EventTime::MIN,
            windows: Vec::new(),
            rows: Vec::new(),
            late_rows: Vec::new(),
            metrics: OperatorMetrics::default(),
        }
    }

    fn set_key(&mut self, key_hash: u64) {
        match self.spec.key_type {
            KeyType::UInt64 => self.state.set_current_key_u64(key_hash),
            KeyType::Int64 => self.state.set_current_key_i64(key_hash as i64),
        }
    }

    /// Whether window `end` can no longer change at the current watermark.
    fn is_cleaned(&self, end: i64) -> bool {
        end.saturating_add(self.spec.allowed_lateness_ms) <= self.watermark.0
    }

    /// Registers the timers of window `(start, end)` of the current key (namespace set): the
    /// firing at `end` unless the watermark passed it already (the window then fires at once,
    /// as a late firing), and the cleanup at `end + allowed lateness`.
    fn register_timers(&mut self, end: i64) -> Result<(), OperatorError> {
        if end > self.watermark.0 {
            self.timers.register_event_timer(&mut self.state, EventTime(end))?;
        }
        let cleanup = end.saturating_add(self.spec.allowed_lateness_ms);
        if cleanup != end || end <= self.watermark.0 {
            self.timers.register_event_timer(&mut self.state, EventTime(cleanup))?;
        }
        Ok(())
    }

    fn delete_timers(&mut self, end: i64) -> Result<(), OperatorError> {
        self.timers.delete_event_timer(&mut self.state, EventTime(end))?;
        let cleanup = end.saturating_add(self.spec.allowed_lateness_ms);
        if cleanup != end {
            self.timers.delete_event_timer(&mut self.state, EventTime(cleanup))?;
        }
        Ok(())
    }

    /// Adds `value` to window `(start, end)` of the current key; fires it again at once if it
    /// already fired (a late update within the allowed lateness).
    fn add_to_window(&mut self, key_hash: u64, start: i64, end: i64, value: i64) -> Result<(), OperatorError> {
        self.state.set_namespace(&window_namespace(start, end))?;
        self.aggregate.add(&mut self.state, &value)?;
        let function = self.aggregate.function();
        let created = function.created.take();
        if function.overflow.take() {
            return Err(OperatorError::Malformed(format!(
                "event-time windows: sum overflows i64 for key {key_hash} in window [{start}, {end})"
            )));
        }
        if created {
            self.register_timers(end)?;
        }
        if end <= self.watermark.0 {
            let (count, sum) = self.aggregate.get(&mut self.state)?.expect("just added");
            self.rows.push((key_hash, start, end, count, sum));
        }
        Ok(())
    }

    fn add(&mut self, key_hash: u64, ts: i64, value: i64) -> Result<(), OperatorError> {
        let mut windows = std::mem::take(&mut self.windows);
        let overflow = || OperatorError::Malformed(format!("event-time windows: event time {ts} has no window end"));
        self.spec.kind.assign(ts, &mut windows).ok_or_else(overflow)?;
        self.set_key(key_hash);
        let result = match self.spec.kind {
            WindowKind::Session { .. } => self.add_to_session(key_hash, windows[0], value),
            _ => {
                let mut any = false;
                let mut late_update = false;
                for &(start, end) in &windows {
                    if self.is_cleaned(end) {
                        continue;
                    }
                    any = true;
                    late_update |= end <= self.watermark.0;
                    self.add_to_window(key_hash, start, end, value)?;
                }
                self.metrics.records_late_updated += u64::from(any && late_update);
                Ok(any)
            }
        };
        self.windows = windows;
        if !result? {
            self.late(key_hash, value, ts);
        }
        Ok(())
    }

    /// Merges the session `[start, end)` of a record into the key's sessions; `false` if the
    /// merged session is already cleaned (the record is late).
    fn add_to_session(&mut self, key_hash: u64, window: (i64, i64), value: i64) -> Result<bool, OperatorError> {
        self.state.set_namespace(&[])?;
        let mut merged = window;
        let mut overlapping = Vec::new();
        self.sessions.for_each(&mut self.state, |start, end| {
            if start <= window.1 && window.0 <= end {
                overlapping.push((start, end));
                merged = (merged.0.min(start), merged.1.max(end));
            }
            Ok(start <= window.1)
        })?;
        if self.is_cleaned(merged.1) {
            return Ok(false);
        }
        let late_update = merged.1 <= self.watermark.0;
        self.metrics.records_late_updated += u64::from(late_update);
        if overlapping.as_slice() != [merged] {
            // The merged session takes the accumulators and replaces the sessions it covers.
            for &(start, end) in &overlapping {
                self.sessions.remove(&mut self.state, &start)?;
                self.state.set_namespace(&window_namespace(start, end))?;
                self.delete_timers(end)?;
                self.state.set_namespace(&[])?;
            }
            self.sessions.put(&mut self.state, &merged.0, &merged.1)?;
            let target = window_namespace(merged.0, merged.1);
            let sources: Vec<[u8; 16]> = overlapping.iter().map(|&(start, end)| window_namespace(start, end)).collect();
            let sources: Vec<&[u8]> = sources.iter().map(|source| source.as_slice()).collect();
            self.aggregate.merge_namespaces(&mut self.state, &target, &sources)?;
            if self.aggregate.function().overflow.take() {
                return Err(OperatorError::Malformed(format!(
                    "event-time windows: sum overflows i64 for key {key_hash} merging sessions"
                )));
            }
            self.aggregate.function().created.take();
            self.state.set_namespace(&target)?;
            // An accumulator merged in has timers no longer: the merged window gets its own.
            if !overlapping.is_empty() {
                self.register_timers(merged.1)?;
            }
        }
        self.add_to_window(key_hash, merged.0, merged.1, value)?;
        Ok(true)
    }

    fn late(&mut self, key_hash: u64, value: i64, ts: i64) {
        match self.spec.late {
            LatePolicy::Drop => self.metrics.records_late_dropped += 1,
            LatePolicy::SideOutput(_) => {
                self.metrics.records_late_side_output += 1;
                self.late_rows.push((key_hash, value, ts));
            }
        }
    }

    /// Fires and clears what the watermark reached, in timer order.
    fn on_timers(&mut self, watermark: EventTime) -> Result<(), OperatorError> {
        while let Some(timer) = self.timers.poll_event_timer(&mut self.state, watermark)? {
            let (start, end) = window_of_namespace(timer.namespace()).expect("timers are set on window namespaces");
            let key_hash = match self.spec.key_type {
                KeyType::UInt64 => timer.key_u64(),
                KeyType::Int64 => timer.key_i64().map(|key| key as u64),
            }
            .expect("timers are set on integer keys");
            let time = match timer.time {
                crate::state::timers::TimerTime::Event(time) => time.0,
                crate::state::timers::TimerTime::Processing(_) => unreachable!("only event-time timers"),
            };
            if time == end {
                if let Some((count, sum)) = self.aggregate.get(&mut self.state)? {
                    self.rows.push((key_hash, start, end, count, sum));
                    self.metrics.windows_fired += 1;
                }
            }
            if time == end.saturating_add(self.spec.allowed_lateness_ms) {
                self.aggregate.clear(&mut self.state)?;
                if matches!(self.spec.kind, WindowKind::Session { .. }) {
                    self.state.set_namespace(&[])?;
                    self.sessions.remove(&mut self.state, &start)?;
                }
            }
        }
        Ok(())
    }

    fn emit(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        if !self.rows.is_empty() {
            let rows = std::mem::take(&mut self.rows);
            let key: ArrayRef = match self.spec.key_type {
                KeyType::UInt64 => Arc::new(rows.iter().map(|row| row.0).collect::<UInt64Array>()),
                KeyType::Int64 => Arc::new(rows.iter().map(|row| row.0 as i64).collect::<Int64Array>()),
            };
            let columns: Vec<ArrayRef> = vec![
                key,
                Arc::new(rows.iter().map(|row| row.1).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|row| row.2).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|row| row.3).collect::<UInt64Array>()),
                Arc::new(rows.iter().map(|row| row.4).collect::<Int64Array>()),
            ];
            context.emit(Element::Batch(RecordBatch::try_new(self.schema.clone(), columns)?));
            self.metrics.records_out += rows.len() as u64;
            self.rows = rows;
            self.rows.clear();
        }
        if !self.late_rows.is_empty() {
            let rows = std::mem::take(&mut self.late_rows);
            let key: ArrayRef = match self.spec.key_type {
                KeyType::UInt64 => Arc::new(rows.iter().map(|row| row.0).collect::<UInt64Array>()),
                KeyType::Int64 => Arc::new(rows.iter().map(|row| row.0 as i64).collect::<Int64Array>()),
            };
            let columns: Vec<ArrayRef> = vec![
                key,
                Arc::new(rows.iter().map(|row| row.1).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|row| row.2).collect::<Int64Array>()),
            ];
            let batch = RecordBatch::try_new(self.late_schema.clone(), columns)?;
            self.late_sink.as_mut().expect("late rows only with a side output").on_batch(context, batch)?;
            self.late_rows = rows;
            self.late_rows.clear();
        }
        Ok(())
    }
}

fn key_field(key_type: KeyType) -> arrow_schema::Field {
    match key_type {
        KeyType::UInt64 => field("key", DataType::UInt64),
        KeyType::Int64 => field("key", DataType::Int64),
    }
    .with_nullable(false)
}

impl Operator for EventTimeWindows {
    fn name(&self) -> &str {
        "event-time-windows"
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let times = event_times(&batch, self.spec.event_time_index, "event-time windows")?;
        let values = int64_values(&batch, self.spec.value_index, "event-time windows")?;
        match key_column(&batch, self.spec.key_index, self.spec.key_type)? {
            KeyColumn::UInt64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key, times[row], values[row])?;
                }
            }
            KeyColumn::Int64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key as u64, times[row], values[row])?;
                }
            }
        }
        self.metrics.records_in += batch.num_rows() as u64;
        self.emit(context)
    }

    /// Fires every window the watermark reached (all its timers), then forwards it.
    fn on_watermark(&mut self, context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        if watermark <= self.watermark_restored {
            return Ok(());
        }
        assert!(watermark > self.watermark, "watermark {watermark:?} after {:?}", self.watermark);
        self.watermark = watermark;
        self.state.set_event_time(watermark);
        self.on_timers(watermark)?;
        self.emit(context)?;
        context.emit(Element::Watermark(watermark));
        Ok(())
    }

    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        self.watermark = EventTime::MAX;
        self.on_timers(EventTime::MAX)?;
        self.emit(context)?;
        if let Some(sink) = self.late_sink.as_mut() {
            sink.on_end(context)?;
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        let mut snapshot = match self.late_sink.as_mut() {
            Some(sink) => sink.on_barrier(context, checkpoint)?,
            None => OperatorSnapshot::default(),
        };
        if checkpoint == CheckpointId::END_OF_INPUT {
            // Every window fired and was cleared at the end of input.
            return Ok(snapshot);
        }
        let target = capture_target(checkpoint, "windows", context.subtask);
        let capture = self.state.capture(&target)?;
        let watermark_path = format!("{}.watermark", target.path);
        snapshot.files.extend(capture.files);
        snapshot.files.push(watermark_path.clone());
        snapshot.writes.push(capture.write);
        snapshot.writes.push(FileWrite::boxed(watermark_path, u64_file_bytes(self.watermark.0 as u64)));
        Ok(snapshot)
    }

    fn on_checkpoint_complete(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<(), OperatorError> {
        self.state.checkpoint_complete(checkpoint);
        match self.late_sink.as_mut() {
            Some(sink) => sink.on_checkpoint_complete(context, checkpoint),
            None => Ok(()),
        }
    }

    /// Restores the state of this subtask's key groups, the lowest restored watermark, and the
    /// late-record sink.
    fn restore(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        let files: Vec<String> = snapshots.iter().flat_map(|s| s.files.iter().cloned()).collect();
        let mut watermark: Option<i64> = None;
        for file in files.iter().filter(|file| file.ends_with(".watermark") && file.contains("/windows-")) {
            let restored = read_u64_file(context.storage, file)? as i64;
            watermark = Some(watermark.map_or(restored, |w| w.min(restored)));
        }
        self.state.restore_files(context.storage, &files)?;
        self.watermark = EventTime(watermark.unwrap_or(i64::MIN));
        self.watermark_restored = self.watermark;
        self.state.set_event_time(self.watermark);
        if let Some(sink) = self.late_sink.as_mut() {
            sink.restore(context, snapshots)?;
        }
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        OperatorMetrics { state_size_bytes: self.state.size_bytes(), ..self.metrics }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dataflow::graph::VertexId;
    use crate::dataflow::sink::read_committed;
    use crate::env::MemStorage;
    use crate::key_group::KeyGroupRange;
    use crate::state::testing::Lcg;
    use crate::state::HeapBackend;
    use crate::time::Instant;

    type Row = (u64, i64, i64, u64, i64);

    #[derive(Clone, Copy, Debug)]
    enum Input {
        Record { key: u64, ts: i64, value: i64 },
        Watermark(i64),
    }

    /// The windows' semantics written directly: per key, the open windows and their aggregates.
    struct Model {
        kind: WindowKind,
        lateness: i64,
        watermark: i64,
        windows: BTreeMap<(u64, i64, i64), (u64, i64)>,
        rows: Vec<Row>,
        late: Vec<(u64, i64, i64)>,
    }

    impl Model {
        fn record(&mut self, key: u64, ts: i64, value: i64) {
            let cleaned = |end: i64, watermark: i64| end + self.lateness <= watermark;
            let mut targets = Vec::new();
            match self.kind {
                WindowKind::Session { gap_ms } => {
                    let new = (ts, ts + gap_ms);
                    let overlapping: Vec<(i64, i64)> = self
                        .windows
                        .keys()
                        .filter(|(k, s, e)| *k == key && *s <= new.1 && new.0 <= *e)
                        .map(|&(_, s, e)| (s, e))
                        .collect();
                    let merged = overlapping.iter().fold(new, |m, &(s, e)| (m.0.min(s), m.1.max(e)));
                    if !cleaned(merged.1, self.watermark) {
                        let mut total = (0, 0);
                        for (s, e) in overlapping {
                            let (count, sum) = self.windows.remove(&(key, s, e)).unwrap();
                            total = (total.0 + count, total.1 + sum);
                        }
                        self.windows.insert((key, merged.0, merged.1), total);
                        targets.push(merged);
                    }
                }
                kind => {
                    let mut windows = Vec::new();
                    kind.assign(ts, &mut windows).unwrap();
                    targets.extend(windows.into_iter().filter(|w| !cleaned(w.1, self.watermark)));
                }
            }
            if targets.is_empty() {
                self.late.push((key, value, ts));
            }
            for (start, end) in targets {
                let entry = self.windows.entry((key, start, end)).or_insert((0, 0));
                *entry = (entry.0 + 1, entry.1 + value);
                if end <= self.watermark {
                    self.rows.push((key, start, end, entry.0, entry.1));
                }
            }
        }

        fn advance(&mut self, watermark: i64) {
            for (&(key, start, end), &(count, sum)) in &self.windows {
                if self.watermark < end && end <= watermark {
                    self.rows.push((key, start, end, count, sum));
                }
            }
            self.watermark = watermark;
            self.windows.retain(|&(_, _, end), _| end + self.lateness > watermark);
        }
    }

    fn batch(records: &[(u64, i64, i64)]) -> RecordBatch {
        let schema = schema_of(vec![
            field("key", DataType::UInt64),
            field("value", DataType::Int64),
            field("ts_ms", DataType::Int64),
        ]);
        let keys: UInt64Array = records.iter().map(|r| r.0).collect();
        let values: Int64Array = records.iter().map(|r| r.1).collect();
        let times: Int64Array = records.iter().map(|r| r.2).collect();
        RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(values), Arc::new(times)]).unwrap()
    }

    fn rows_of(elements: &[Element]) -> Vec<Row> {
        let mut rows = Vec::new();
        for element in elements {
            let Element::Batch(batch) = element else { continue };
            let column = |i: usize| batch.column(i).as_any().downcast_ref::<Int64Array>().unwrap().clone();
            let keys = batch.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
            let counts = batch.column(3).as_any().downcast_ref::<UInt64Array>().unwrap();
            let (starts, ends, sums) = (column(1), column(2), column(4));
            for row in 0..batch.num_rows() {
                rows.push((keys.value(row), starts.value(row), ends.value(row), counts.value(row), sums.value(row)));
            }
        }
        rows
    }

    fn spec(kind: WindowKind, lateness: i64) -> EventWindowSpec {
        EventWindowSpec {
            key_index: 0,
            key_type: KeyType::UInt64,
            event_time_index: 2,
            value_index: 1,
            kind,
            allowed_lateness_ms: lateness,
            late: LatePolicy::SideOutput("late".into()),
        }
    }

    /// Random out-of-order records (disorder up to 300 ms), watermarks trailing the highest
    /// time by a random bound (so some records are late, some beyond the lateness).
    fn inputs(rng: &mut Lcg) -> Vec<Input> {
        let mut inputs = Vec::new();
        let (mut high, mut watermark) = (0_i64, i64::MIN);
        for i in 0..600_i64 {
            let ts = i * 3 - rng.below(300) as i64;
            high = high.max(ts);
            inputs.push(Input::Record { key: rng.below(6), ts, value: rng.below(100) as i64 - 20 });
            if rng.below(8) == 0 {
                let next = high - rng.below(150) as i64;
                if next > watermark {
                    watermark = next;
                    inputs.push(Input::Watermark(next));
                }
            }
        }
        inputs
    }

    fn context<'a>(storage: &'a mut MemStorage, out: &'a mut Vec<Element>, index: u16) -> Context<'a> {
        Context::new(Instant(0), storage, SubtaskId { vertex: VertexId(1), index }, out)
    }

    fn feed(op: &mut EventTimeWindows, context: &mut Context<'_>, input: Input) {
        match input {
            Input::Record { key, ts, value } => op.on_batch(context, batch(&[(key, value, ts)])).unwrap(),
            Input::Watermark(w) => op.on_watermark(context, EventTime(w)).unwrap(),
        }
    }

    // Goal: for random out-of-order inputs, every kind of window (tumbling, sliding, session)
    // with and without allowed lateness emits exactly the rows of a model that computes each
    // window from the input as the semantics say (late firings included), sends exactly the
    // model's late records to the side output, and fires each watermark's windows in timer order
    // (end, key group, key, start); the same through a checkpoint restored at parallelism 3.
    // Method: seeded inputs (seed printed); the operator at parallelism 1 checkpoints halfway;
    // three operators restore the snapshot and take the rest of the input by key group.
    #[test]
    fn windows_match_a_model_with_lateness_and_restore() {
        let kinds = [
            WindowKind::Tumbling { size_ms: 100 },
            WindowKind::Sliding { size_ms: 120, slide_ms: 40 },
            WindowKind::Session { gap_ms: 25 },
        ];
        for seed in 0..12_u64 {
            let kind = kinds[seed as usize % 3];
            let lateness = [0, 90][(seed / 3) as usize % 2];
            println!("seed {seed}: {kind:?}, allowed lateness {lateness} ms");
            let mut rng = Lcg::new(seed);
            let inputs = inputs(&mut rng);
            let mut model =
                Model { kind, lateness, watermark: i64::MIN, windows: BTreeMap::new(), rows: vec![], late: vec![] };
            for input in &inputs {
                match *input {
                    Input::Record { key, ts, value } => model.record(key, ts, value),
                    Input::Watermark(w) => model.advance(w),
                }
            }
            model.advance(i64::MAX);

            let max = MaxParallelism::default();
            let mut storage = MemStorage::new();
            let (before, after) = inputs.split_at(inputs.len() / 2);
            let mut out = Vec::new();
            let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
            let mut op = EventTimeWindows::new(
                spec(kind, lateness),
                max,
                Box::new(HeapBackend::new(KeyGroupRange::all(max))),
                subtask,
            );
            let mut files;
            let mut pending;
            {
                let mut context = context(&mut storage, &mut out, 0);
                for &input in before {
                    feed(&mut op, &mut context, input);
                }
                let written = op.on_barrier(&mut context, CheckpointId(1)).unwrap();
                files = written.files;
                pending = written.pending_output;
                for write in written.writes {
                    files.extend(write.write(context.storage).unwrap());
                }
            }
            let mut rows = rows_of(&out);
            let snapshots = [TaskSnapshot {
                subtask,
                source_positions: vec![],
                files,
                pending_output: std::mem::take(&mut pending),
            }];
            for index in 0..3 {
                let range = max.range_of(index, 3);
                let subtask = SubtaskId { vertex: VertexId(1), index };
                let mut restored =
                    EventTimeWindows::new(spec(kind, lateness), max, Box::new(HeapBackend::new(range)), subtask);
                let mut out = Vec::new();
                let mut context = context(&mut storage, &mut out, index);
                restored.restore(&mut context, &snapshots).unwrap();
                for &input in after {
                    match input {
                        Input::Record { key, .. } if !range.contains(max.key_group_of_u64(key)) => {}
                        input => feed(&mut restored, &mut context, input),
                    }
                }
                restored.on_end(&mut context).unwrap();
                // Each batch (one watermark's firing, or one record's late firings) in timer order.
                for element in out.iter().filter(|e| matches!(e, Element::Batch(_))) {
                    let order: Vec<(i64, u16, u64, i64)> = rows_of(std::slice::from_ref(element))
                        .iter()
                        .map(|r| (r.2, max.key_group_of_u64(r.0).0, r.0, r.1))
                        .collect();
                    assert!(order.windows(2).all(|pair| pair[0] < pair[1]), "seed {seed}: timer order {order:?}");
                }
                rows.extend(rows_of(&out));
            }
            let mut expected = model.rows.clone();
            expected.sort_unstable();
            rows.sort_unstable();
            assert_eq!(rows, expected, "seed {seed}: window rows");
            // The side output: exactly the model's late records, committed at the end.
            let late = read_committed(&mut storage, "late").unwrap();
            let mut late_rows: Vec<(u64, i64, i64)> = Vec::new();
            for batch in &late {
                let keys = batch.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
                let values = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                let times = batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
                late_rows.extend((0..batch.num_rows()).map(|i| (keys.value(i), values.value(i), times.value(i))));
            }
            let mut expected_late = model.late.clone();
            expected_late.sort_unstable();
            late_rows.sort_unstable();
            assert_eq!(late_rows, expected_late, "seed {seed}: late records");
            assert!(
                !model.late.is_empty() && model.rows.len() > 20,
                "seed {seed}: the input has late records and windows"
            );
        }
    }

    // Goal: the job builder refuses windows it cannot run: bad sizes, negative lateness, a side
    // output named as the job's sink (both would write the same files).
    #[test]
    fn builder_refuses_bad_windows() {
        use crate::dataflow::graph::SourceSpec;
        use crate::dataflow::JobBuilder;
        let build = |kind: WindowKind, lateness: i64, late: LatePolicy| {
            let source = SourceSpec::Generator {
                record_count: 10,
                batch_size: 5,
                keys: crate::workload::Keys::Uniform,
                splits: Default::default(),
            };
            JobBuilder::new("j")
                .source("generator", source, 1)?
                .assign_watermarks(10)?
                .key_by("key", 1)?
                .windows(kind, "value", lateness, late)?
                .sink_files("out")
        };
        let tumbling = WindowKind::Tumbling { size_ms: 10 };
        assert!(build(tumbling, 5, LatePolicy::SideOutput("late".into())).is_ok());
        assert!(build(WindowKind::Sliding { size_ms: 10, slide_ms: 20 }, 0, LatePolicy::Drop).is_err());
        assert!(build(WindowKind::Session { gap_ms: 0 }, 0, LatePolicy::Drop).is_err());
        assert!(build(tumbling, -1, LatePolicy::Drop).is_err());
        assert!(build(tumbling, 0, LatePolicy::SideOutput("out".into())).is_err());
        assert!(build(tumbling, 0, LatePolicy::SideOutput("bad name".into())).is_err());
    }

    // Goal: a sliding window's assignment is every window holding the record, ascending.
    #[test]
    fn sliding_assignment() {
        let mut out = Vec::new();
        WindowKind::Sliding { size_ms: 10, slide_ms: 4 }.assign(9, &mut out).unwrap();
        assert_eq!(out, vec![(0, 10), (4, 14), (8, 18)]);
        WindowKind::Sliding { size_ms: 10, slide_ms: 5 }.assign(-1, &mut out).unwrap();
        assert_eq!(out, vec![(-10, 0), (-5, 5)]);
        WindowKind::Tumbling { size_ms: 10 }.assign(-1, &mut out).unwrap();
        assert_eq!(out, vec![(-10, 0)]);
        assert!(WindowKind::Sliding { size_ms: 4, slide_ms: 5 }.validate().is_err());
        assert!(WindowKind::Tumbling { size_ms: 10 }.assign(i64::MAX - 1, &mut out).is_none());
    }
}
