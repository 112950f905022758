//! Keyed windows as a [`KeyedProcessFunction`]: tumbling, sliding and session windows on event
//! time or processing time, with incremental aggregation (count and sum) or a full-window
//! function, allowed lateness, and an explicit policy for late records.
//!
//! # Semantics (Flink's)
//! - A record at time `t` (its event time, or processing time when it arrives) belongs to the
//!   windows its [`WindowKind`] assigns: one tumbling window `[t - t mod size, … + size)`; every
//!   sliding window `[s, s + size)` with `s` a multiple of `slide` and `s <= t < s + size`; a
//!   session window `[t, t + gap)`, merged with every session of the same key it overlaps or
//!   touches (their contents merge).
//! - A window fires when the watermark (processing time) reaches its end (`end <= watermark`):
//!   it emits `key, window_start, window_end, count, <result>`, where the result is the sum of
//!   the values ([`WindowFunction::CountSum`], kept as one accumulator per window) or what a
//!   full-window function computes from all the window's values
//!   ([`WindowFunction::Full`], kept as a list per window).
//! - Allowed lateness `L` (event time only): a window keeps its state until the watermark
//!   reaches `end + L`. A record for a window that fired but is not yet cleaned updates it and
//!   fires it again at once (the new row supersedes the old one; `records_late_updated` counts
//!   these records).
//! - A record none of whose windows can still change (for sessions: whose merged window ends
//!   at or before `watermark - L`) is late: [`LatePolicy::Drop`] counts it in
//!   `records_late_dropped`; [`LatePolicy::SideOutput`] writes it (`key, value, ts`) to a file
//!   sink of its own, committed exactly once with the job's checkpoints
//!   (`records_late_side_output`). Late data is never lost silently. On processing time no
//!   record is late: it belongs to the windows of the time it arrives.
//! - Window state is cleared when the watermark reaches `end + L`.
//!
//! # State
//! Per key, with the window `(start, end)` as namespace (16 bytes, order-preserving): an
//! aggregating state `count-sum`, or a list state `values` for a full-window function; a map
//! state `sessions` (start → end, void namespace) of each key's open session windows; and the
//! timers: one at `end` fires a window, one at `end + L` clears it (the same timer when
//! `L = 0`). Timers fire in the order (time, key group, key, namespace), so on event time the
//! output's order is a function of the input's.

use std::fmt;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_buffer::ScalarBuffer;
use arrow_schema::{ArrowError, DataType, SchemaRef};

use super::graph::{field, schema_of};
use super::process::{key_array, key_field, KeyedProcessFunction, KeyedProcessOperator, ProcessContext, ProcessSpec};
use super::window::{CountSum, KeyType};
use super::OperatorError;
use crate::dataflow::graph::SubtaskId;
use crate::key_group::MaxParallelism;
use crate::state::keyed::{AggregatingState, KeyedState, ListState, MapState};
use crate::state::timers::{Timer, TimerTime};
use crate::state::{order_preserving_i64, order_preserving_i64_inverse, read_u64_be, StateBackend, StateError};
use crate::time::{EventTime, Instant};

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

/// Which clock assigns records to windows and fires them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowTime {
    /// The records' event time (the column at `event_time_index`); windows fire on watermarks.
    Event { event_time_index: usize },
    /// Processing time when a record arrives; windows fire when processing time reaches their
    /// end. Results depend on when records arrive: a replay after a failure may window them
    /// differently, but counts each exactly once.
    Processing,
}

/// What happens to a record too late for any window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LatePolicy {
    Drop,
    /// Into the file sink of this name (`output/<name>/`): rows `key, value, ts`.
    SideOutput(String),
}

/// A function of all of a window's values (in no particular order), computed when it fires.
/// It may reorder the slice. It must be deterministic: a replay computes it again.
#[derive(Clone)]
pub struct FullWindowFunction {
    name: String,
    apply: Arc<WindowValuesFn>,
}

/// What a full-window function computes from a window's values.
type WindowValuesFn = dyn Fn(&mut [i64]) -> i64 + Send + Sync;

impl FullWindowFunction {
    /// A function named `name` (the output column's name: a file-name-safe word).
    pub fn new(name: &str, apply: impl Fn(&mut [i64]) -> i64 + Send + Sync + 'static) -> FullWindowFunction {
        FullWindowFunction { name: name.to_string(), apply: Arc::new(apply) }
    }

    /// The lower median: the value at index `(n - 1) / 2` of the sorted values.
    pub fn median() -> FullWindowFunction {
        FullWindowFunction::new("median", |values| {
            let middle = (values.len() - 1) / 2;
            *values.select_nth_unstable(middle).1
        })
    }

    /// The number of distinct values.
    pub fn distinct() -> FullWindowFunction {
        FullWindowFunction::new("distinct", |values| {
            values.sort_unstable();
            let mut count = 1;
            for pair in values.windows(2) {
                count += i64::from(pair[0] != pair[1]);
            }
            count
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for FullWindowFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FullWindowFunction({})", self.name)
    }
}

impl PartialEq for FullWindowFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && Arc::ptr_eq(&self.apply, &other.apply)
    }
}

impl Eq for FullWindowFunction {}

/// How a window's values become its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowFunction {
    /// Incremental: one `(count, sum)` accumulator per window; the result is the sum.
    CountSum,
    /// A full-window function over every value, kept until the window is cleaned.
    Full(FullWindowFunction),
}

impl WindowFunction {
    /// The name of the result column.
    pub fn result_name(&self) -> &str {
        match self {
            WindowFunction::CountSum => "sum",
            WindowFunction::Full(function) => function.name(),
        }
    }
}

/// What the windows read and do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventWindowSpec {
    pub key_index: usize,
    pub key_type: KeyType,
    pub value_index: usize,
    pub kind: WindowKind,
    pub time: WindowTime,
    pub function: WindowFunction,
    /// Event time only: zero on processing time.
    pub allowed_lateness_ms: i64,
    pub late: LatePolicy,
}

impl EventWindowSpec {
    /// The output's schema: `key, window_start, window_end, count, <result>`.
    pub fn schema(&self) -> SchemaRef {
        schema_of(vec![
            key_field(self.key_type),
            field("window_start", DataType::Int64),
            field("window_end", DataType::Int64),
            field("count", DataType::UInt64),
            field(self.function.result_name(), DataType::Int64),
        ])
    }

    /// The rows of the late-record side output.
    pub fn late_schema(&self) -> SchemaRef {
        schema_of(vec![key_field(self.key_type), field("value", DataType::Int64), field("ts_ms", DataType::Int64)])
    }

    /// The name of the late records' side output, if they have one.
    pub fn side_output(&self) -> Option<&str> {
        match &self.late {
            LatePolicy::Drop => None,
            LatePolicy::SideOutput(name) => Some(name),
        }
    }

    /// Checks what the job builder cannot check by types.
    pub fn validate(&self) -> Result<(), String> {
        self.kind.validate()?;
        if self.allowed_lateness_ms < 0 {
            return Err(format!("allowed lateness {} ms < 0", self.allowed_lateness_ms));
        }
        if self.time == WindowTime::Processing && (self.allowed_lateness_ms != 0 || self.late != LatePolicy::Drop) {
            return Err("processing-time windows have no late records: no allowed lateness, no side output".into());
        }
        Ok(())
    }

    /// The operator of these windows for `subtask`, in a fresh `backend`.
    pub fn instantiate(
        &self,
        max_parallelism: MaxParallelism,
        backend: Box<dyn StateBackend>,
        subtask: SubtaskId,
    ) -> Result<WindowOperator, StateError> {
        self.validate().expect("window specs are validated when the job is built");
        let spec = ProcessSpec {
            name: "windows".into(),
            key_index: self.key_index,
            key_type: self.key_type,
            event_time_index: match self.time {
                WindowTime::Event { event_time_index } => Some(event_time_index),
                WindowTime::Processing => None,
            },
            side_output: self.side_output().map(str::to_string),
        };
        KeyedProcessOperator::new(spec, max_parallelism, backend, subtask, |state| Windows::open(self.clone(), state))
    }
}

/// The windows' operator.
pub type WindowOperator = KeyedProcessOperator<Windows>;

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

/// A window's contents in state: an accumulator, or every value.
enum Contents {
    Aggregate(AggregatingState<CountSum>),
    Values(ListState<i64>, FullWindowFunction),
}

/// A row of the output: key, window start, window end, count, result.
pub type WindowRow = (u64, i64, i64, u64, i64);
/// A late record: key, value, time.
pub type LateRow = (u64, i64, i64);

/// The windows' process function.
pub struct Windows {
    spec: EventWindowSpec,
    contents: Contents,
    sessions: MapState<i64, i64>,
    /// The value column of the batch being processed.
    values: ScalarBuffer<i64>,
    /// Reused: a record's windows.
    windows: Vec<(i64, i64)>,
}

type Ctx<'a, 'b> = ProcessContext<'a, WindowRow, LateRow>;

impl Windows {
    /// Declares the windows' states in `state`.
    pub fn open(spec: EventWindowSpec, state: &mut KeyedState) -> Result<Windows, StateError> {
        let contents = match &spec.function {
            WindowFunction::CountSum => {
                Contents::Aggregate(state.aggregating_state("count-sum", CountSum::default(), None)?)
            }
            WindowFunction::Full(function) => {
                Contents::Values(state.list_state::<i64>("values", None)?, function.clone())
            }
        };
        let sessions = state.map_state::<i64, i64>("sessions", None)?;
        Ok(Windows { spec, contents, sessions, values: ScalarBuffer::from(Vec::new()), windows: Vec::new() })
    }

    /// Where the clock the windows fire on stands: the watermark, or (on processing time, where
    /// nothing is late) the earliest time.
    fn fired_through(&self, context: &Ctx<'_, '_>) -> i64 {
        match self.spec.time {
            WindowTime::Event { .. } => context.watermark().0,
            WindowTime::Processing => i64::MIN,
        }
    }

    /// Whether window `end` can no longer change.
    fn is_cleaned(&self, context: &Ctx<'_, '_>, end: i64) -> bool {
        end.saturating_add(self.spec.allowed_lateness_ms) <= self.fired_through(context)
    }

    fn register_timer(&self, context: &mut Ctx<'_, '_>, time: i64) -> Result<(), StateError> {
        match self.spec.time {
            WindowTime::Event { .. } => context.register_event_timer(EventTime(time)),
            WindowTime::Processing => context.register_processing_timer(Instant(time as u64)),
        }
    }

    fn delete_timer(&self, context: &mut Ctx<'_, '_>, time: i64) -> Result<(), StateError> {
        match self.spec.time {
            WindowTime::Event { .. } => context.delete_event_timer(EventTime(time)),
            WindowTime::Processing => context.delete_processing_timer(Instant(time as u64)),
        }
    }

    /// Registers the timers of window `end` of the current key (namespace set): the firing at
    /// `end` unless the watermark passed it already (the window then fires at once, as a late
    /// firing), and the cleanup at `end + allowed lateness`.
    fn register_timers(&self, context: &mut Ctx<'_, '_>, end: i64) -> Result<(), StateError> {
        let fired_through = self.fired_through(context);
        if end > fired_through {
            self.register_timer(context, end)?;
        }
        let cleanup = end.saturating_add(self.spec.allowed_lateness_ms);
        if cleanup != end || end <= fired_through {
            self.register_timer(context, cleanup)?;
        }
        Ok(())
    }

    fn delete_timers(&self, context: &mut Ctx<'_, '_>, end: i64) -> Result<(), StateError> {
        self.delete_timer(context, end)?;
        let cleanup = end.saturating_add(self.spec.allowed_lateness_ms);
        if cleanup != end {
            self.delete_timer(context, cleanup)?;
        }
        Ok(())
    }

    /// The current window's count and result, if it has values.
    fn result(&self, state: &mut KeyedState) -> Result<Option<(u64, i64)>, StateError> {
        match &self.contents {
            Contents::Aggregate(aggregate) => aggregate.get(state),
            Contents::Values(values, function) => Ok(values.get(state)?.map(|mut values| {
                let result = (function.apply)(&mut values);
                (values.len() as u64, result)
            })),
        }
    }

    fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        match &self.contents {
            Contents::Aggregate(aggregate) => aggregate.clear(state),
            Contents::Values(values, _) => values.clear(state),
        }
    }

    /// Adds `value` to window `(start, end)` of the current key; fires it again at once if it
    /// already fired (a late update within the allowed lateness).
    fn add_to_window(&self, context: &mut Ctx<'_, '_>, start: i64, end: i64, value: i64) -> Result<(), OperatorError> {
        context.state.set_namespace(&window_namespace(start, end))?;
        let created = match &self.contents {
            Contents::Aggregate(aggregate) => {
                aggregate.add(context.state, &value)?;
                let function = aggregate.function();
                if function.overflow.take() {
                    return Err(OperatorError::Malformed(format!(
                        "windows: sum overflows i64 for key {} in window [{start}, {end})",
                        context.key()
                    )));
                }
                function.created.take()
            }
            // Appending does not read the list: register the timers again (one timer per
            // key, namespace and time).
            Contents::Values(values, _) => {
                values.add(context.state, &value)?;
                true
            }
        };
        if created {
            self.register_timers(context, end)?;
        }
        if end <= self.fired_through(context) {
            let (count, result) = self.result(context.state)?.expect("just added");
            context.emit((context.key(), start, end, count, result));
        }
        Ok(())
    }

    /// Adds `value` to each of `windows` (of the current key) that can still change; `false`
    /// if none can (the record is late).
    fn add_to_windows(
        &self,
        context: &mut Ctx<'_, '_>,
        windows: &[(i64, i64)],
        value: i64,
    ) -> Result<bool, OperatorError> {
        let mut any = false;
        let mut late_update = false;
        for &(start, end) in windows {
            if self.is_cleaned(context, end) {
                continue;
            }
            any = true;
            late_update |= end <= self.fired_through(context);
            self.add_to_window(context, start, end, value)?;
        }
        context.metrics().records_late_updated += u64::from(any && late_update);
        Ok(any)
    }

    /// Merges the session `[start, end)` of a record into the key's sessions; `false` if the
    /// merged session is already cleaned (the record is late).
    fn add_to_session(&self, context: &mut Ctx<'_, '_>, window: (i64, i64), value: i64) -> Result<bool, OperatorError> {
        context.state.set_namespace(&[])?;
        let mut merged = window;
        let mut overlapping = Vec::new();
        self.sessions.for_each(context.state, |start, end| {
            if start <= window.1 && window.0 <= end {
                overlapping.push((start, end));
                merged = (merged.0.min(start), merged.1.max(end));
            }
            Ok(start <= window.1)
        })?;
        if self.is_cleaned(context, merged.1) {
            return Ok(false);
        }
        let late_update = merged.1 <= self.fired_through(context);
        context.metrics().records_late_updated += u64::from(late_update);
        if overlapping.as_slice() != [merged] {
            // The merged session takes the contents and replaces the sessions it covers.
            for &(start, end) in &overlapping {
                self.sessions.remove(context.state, &start)?;
                context.state.set_namespace(&window_namespace(start, end))?;
                self.delete_timers(context, end)?;
                context.state.set_namespace(&[])?;
            }
            self.sessions.put(context.state, &merged.0, &merged.1)?;
            let target = window_namespace(merged.0, merged.1);
            let sources: Vec<[u8; 16]> = overlapping.iter().map(|&(start, end)| window_namespace(start, end)).collect();
            let sources: Vec<&[u8]> = sources.iter().map(|source| source.as_slice()).collect();
            match &self.contents {
                Contents::Aggregate(aggregate) => {
                    aggregate.merge_namespaces(context.state, &target, &sources)?;
                    if aggregate.function().overflow.take() {
                        return Err(OperatorError::Malformed(format!(
                            "windows: sum overflows i64 for key {} merging sessions",
                            context.key()
                        )));
                    }
                    aggregate.function().created.take();
                }
                Contents::Values(values, _) => values.merge_namespaces(context.state, &target, &sources)?,
            }
            context.state.set_namespace(&target)?;
            // The contents merged in have timers no longer: the merged window gets its own.
            if !overlapping.is_empty() {
                self.register_timers(context, merged.1)?;
            }
        }
        self.add_to_window(context, merged.0, merged.1, value)?;
        Ok(true)
    }
}

impl KeyedProcessFunction for Windows {
    type Out = WindowRow;
    type Side = LateRow;

    fn output_schema(&self) -> SchemaRef {
        self.spec.schema()
    }

    fn side_output_schema(&self) -> Option<SchemaRef> {
        self.spec.side_output().map(|_| self.spec.late_schema())
    }

    fn bind(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        let column = batch.column(self.spec.value_index);
        if column.null_count() > 0 {
            return Err(OperatorError::Malformed(format!("windows: {} null values", column.null_count())));
        }
        let array = column.as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
            OperatorError::Malformed(format!("windows: value column is {}, not Int64", column.data_type()))
        })?;
        self.values = array.values().clone();
        Ok(())
    }

    fn process_element(&mut self, context: &mut Ctx<'_, '_>, row: usize) -> Result<(), OperatorError> {
        let value = self.values[row];
        let ts = match context.timestamp() {
            Some(time) => time.0,
            None => i64::try_from(context.now().0).unwrap_or(i64::MAX),
        };
        let mut windows = std::mem::take(&mut self.windows);
        let overflow = || OperatorError::Malformed(format!("windows: time {ts} has no window end"));
        self.spec.kind.assign(ts, &mut windows).ok_or_else(overflow)?;
        let result = match self.spec.kind {
            WindowKind::Session { .. } => self.add_to_session(context, windows[0], value),
            _ => self.add_to_windows(context, &windows, value),
        };
        self.windows = windows;
        if !result? {
            match self.spec.late {
                LatePolicy::Drop => context.metrics().records_late_dropped += 1,
                LatePolicy::SideOutput(_) => {
                    context.metrics().records_late_side_output += 1;
                    context.side_output((context.key(), value, ts));
                }
            }
        }
        Ok(())
    }

    /// Fires the window at its end, clears it at its end plus the allowed lateness.
    fn on_timer(&mut self, context: &mut Ctx<'_, '_>, timer: &Timer) -> Result<(), OperatorError> {
        let (start, end) = window_of_namespace(timer.namespace()).expect("timers are set on window namespaces");
        let time = match timer.time {
            TimerTime::Event(time) => time.0,
            TimerTime::Processing(instant) => instant.0 as i64,
        };
        if time == end {
            if let Some((count, result)) = self.result(context.state)? {
                context.emit((context.key(), start, end, count, result));
                context.metrics().windows_fired += 1;
            }
        }
        if time == end.saturating_add(self.spec.allowed_lateness_ms) {
            self.clear(context.state)?;
            if matches!(self.spec.kind, WindowKind::Session { .. }) {
                context.state.set_namespace(&[])?;
                self.sessions.remove(context.state, &start)?;
            }
        }
        Ok(())
    }

    fn output_batch(&self, schema: &SchemaRef, rows: &[WindowRow]) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            key_array(self.spec.key_type, rows.iter().map(|row| row.0)),
            Arc::new(rows.iter().map(|row| row.1).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|row| row.2).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|row| row.3).collect::<UInt64Array>()),
            Arc::new(rows.iter().map(|row| row.4).collect::<Int64Array>()),
        ];
        RecordBatch::try_new(schema.clone(), columns)
    }

    fn side_output_batch(&self, schema: &SchemaRef, rows: &[LateRow]) -> Result<RecordBatch, ArrowError> {
        let columns: Vec<ArrayRef> = vec![
            key_array(self.spec.key_type, rows.iter().map(|row| row.0)),
            Arc::new(rows.iter().map(|row| row.1).collect::<Int64Array>()),
            Arc::new(rows.iter().map(|row| row.2).collect::<Int64Array>()),
        ];
        RecordBatch::try_new(schema.clone(), columns)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::checkpoint::manifest::TaskSnapshot;
    use crate::dataflow::graph::VertexId;
    use crate::dataflow::sink::read_committed;
    use crate::dataflow::{Context, Operator};
    use crate::element::{CheckpointId, Element};
    use crate::env::MemStorage;
    use crate::key_group::KeyGroupRange;
    use crate::state::testing::Lcg;
    use crate::state::HeapBackend;

    type Row = (u64, i64, i64, u64, i64);

    #[derive(Clone, Copy, Debug)]
    enum Input {
        Record { key: u64, ts: i64, value: i64 },
        Watermark(i64),
    }

    /// The windows' semantics written directly: per key, the open windows and their aggregates.
    struct Model {
        kind: WindowKind,
        median: bool,
        lateness: i64,
        watermark: i64,
        windows: BTreeMap<(u64, i64, i64), Vec<i64>>,
        rows: Vec<Row>,
        late: Vec<(u64, i64, i64)>,
    }

    /// A window's row computed from its values: the count and the sum, or the lower median.
    fn reference_row(key: u64, start: i64, end: i64, values: &[i64], median: bool) -> Row {
        let result = if median {
            let mut sorted = values.to_vec();
            sorted.sort();
            sorted[(sorted.len() - 1) / 2]
        } else {
            values.iter().sum()
        };
        (key, start, end, values.len() as u64, result)
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
                        let mut total = Vec::new();
                        for (s, e) in overlapping {
                            total.extend(self.windows.remove(&(key, s, e)).unwrap());
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
                let values = self.windows.entry((key, start, end)).or_default();
                values.push(value);
                if end <= self.watermark {
                    self.rows.push(reference_row(key, start, end, values, self.median));
                }
            }
        }

        fn advance(&mut self, watermark: i64) {
            for (&(key, start, end), values) in &self.windows {
                if self.watermark < end && end <= watermark {
                    self.rows.push(reference_row(key, start, end, values, self.median));
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

    fn spec(kind: WindowKind, lateness: i64, median: bool) -> EventWindowSpec {
        EventWindowSpec {
            key_index: 0,
            key_type: KeyType::UInt64,
            value_index: 1,
            kind,
            time: WindowTime::Event { event_time_index: 2 },
            function: if median {
                WindowFunction::Full(FullWindowFunction::median())
            } else {
                WindowFunction::CountSum
            },
            allowed_lateness_ms: lateness,
            late: LatePolicy::SideOutput("late".into()),
        }
    }

    fn operator(spec: &EventWindowSpec, max: MaxParallelism, range: KeyGroupRange, index: u16) -> WindowOperator {
        let subtask = SubtaskId { vertex: VertexId(1), index };
        spec.instantiate(max, Box::new(HeapBackend::new(range)), subtask).unwrap()
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

    fn context_at<'a>(storage: &'a mut MemStorage, out: &'a mut Vec<Element>, index: u16, at: u64) -> Context<'a> {
        Context::new(Instant(at), storage, SubtaskId { vertex: VertexId(1), index }, out)
    }

    fn feed(op: &mut WindowOperator, context: &mut Context<'_>, input: Input) {
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
        for seed in 0..24_u64 {
            let kind = kinds[seed as usize % 3];
            let lateness = [0, 90][(seed / 3) as usize % 2];
            let median = seed >= 12;
            let spec = spec(kind, lateness, median);
            println!("seed {seed}: {kind:?}, allowed lateness {lateness} ms, {:?}", spec.function);
            let mut rng = Lcg::new(seed);
            let inputs = inputs(&mut rng);
            let mut model = Model {
                kind,
                median,
                lateness,
                watermark: i64::MIN,
                windows: BTreeMap::new(),
                rows: vec![],
                late: vec![],
            };
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
            let mut op = operator(&spec, max, KeyGroupRange::all(max), 0);
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
                let mut restored = operator(&spec, max, range, index);
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

    // Goal: processing-time windows (tumbling, sliding, session; count-sum and a full-window
    // function) put each record in the windows of the time it arrives and fire each window once
    // processing time reaches its end, through the operator's poll_timeout / on_processing_time,
    // also across a checkpoint restored at parallelism 2; nothing is late on processing time.
    // Method: seeded arrivals (seed printed) on a clock that moves 0-9 ms per record; the clock
    // is offered to the operator whenever it passes poll_timeout; a model windows the same
    // arrivals; the rows fired at each wake-up are exactly the model's windows ending by then.
    #[test]
    fn processing_time_windows_fire_on_the_clock() {
        let kinds = [
            WindowKind::Tumbling { size_ms: 50 },
            WindowKind::Sliding { size_ms: 60, slide_ms: 20 },
            WindowKind::Session { gap_ms: 15 },
        ];
        for seed in 0..6_u64 {
            let kind = kinds[seed as usize % 3];
            let median = seed >= 3;
            let mut spec = spec(kind, 0, median);
            spec.time = WindowTime::Processing;
            spec.late = LatePolicy::Drop;
            spec.validate().unwrap();
            println!("seed {seed}: {kind:?}, {:?}", spec.function);
            let mut rng = Lcg::new(seed);
            let mut model = Model {
                kind,
                median,
                lateness: 0,
                watermark: i64::MIN,
                windows: BTreeMap::new(),
                rows: vec![],
                late: vec![],
            };
            let max = MaxParallelism::default();
            let mut storage = MemStorage::new();
            let mut now = 0_u64;
            let arrivals: Vec<(u64, u64, i64)> = (0..400)
                .map(|_| {
                    now += rng.below(10);
                    (now, rng.below(5), rng.below(1_000) as i64)
                })
                .collect();
            // Offers the clock to every operator whose deadline passed; what they fire must be
            // the model's windows ending by then.
            let mut rows = Vec::new();
            let mut wake = |ops: &mut [WindowOperator], model: &mut Model, storage: &mut MemStorage, at: u64| {
                let mut fired = Vec::new();
                for (index, op) in ops.iter_mut().enumerate() {
                    if op.poll_timeout().is_some_and(|deadline| deadline.0 <= at) {
                        let mut out = Vec::new();
                        op.on_processing_time(&mut context_at(storage, &mut out, index as u16, at)).unwrap();
                        fired.extend(rows_of(&out));
                    }
                }
                let before = model.rows.len();
                model.advance(at as i64);
                let mut expected: Vec<Row> = model.rows[before..].to_vec();
                fired.sort_unstable();
                expected.sort_unstable();
                assert_eq!(fired, expected, "seed {seed}: windows fired at {at} ms");
                rows.extend(fired);
            };
            let arrive = |ops: &mut [WindowOperator], model: &mut Model, storage: &mut MemStorage, arrival| {
                let (at, key, value) = arrival;
                let index = (0..ops.len())
                    .find(|&i| max.range_of(i as u16, ops.len() as u16).contains(max.key_group_of_u64(key)));
                let index = index.expect("a key group belongs to one operator");
                let mut out = Vec::new();
                ops[index]
                    .on_batch(&mut context_at(storage, &mut out, index as u16, at), batch(&[(key, value, -1)]))
                    .unwrap();
                assert!(out.is_empty(), "seed {seed}: nothing fires on arrival");
                model.record(key, at as i64, value);
            };
            let (before, after) = arrivals.split_at(arrivals.len() / 2);
            let mut ops = vec![operator(&spec, max, KeyGroupRange::all(max), 0)];
            for &arrival in before {
                wake(&mut ops, &mut model, &mut storage, arrival.0);
                arrive(&mut ops, &mut model, &mut storage, arrival);
            }
            let mut out = Vec::new();
            let written = ops[0].on_barrier(&mut context(&mut storage, &mut out, 0), CheckpointId(1)).unwrap();
            let mut files = written.files;
            for write in written.writes {
                files.extend(write.write(&mut storage).unwrap());
            }
            let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
            let snapshots = [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: vec![] }];
            let mut ops: Vec<WindowOperator> =
                (0..2).map(|index| operator(&spec, max, max.range_of(index, 2), index)).collect();
            for (index, op) in ops.iter_mut().enumerate() {
                op.restore(&mut context(&mut storage, &mut out, index as u16), &snapshots).unwrap();
            }
            let fired_before = model.rows.len();
            for &arrival in after {
                wake(&mut ops, &mut model, &mut storage, arrival.0);
                arrive(&mut ops, &mut model, &mut storage, arrival);
            }
            for (index, op) in ops.iter_mut().enumerate() {
                let mut out = Vec::new();
                op.on_end(&mut context(&mut storage, &mut out, index as u16)).unwrap();
                rows.extend(rows_of(&out));
            }
            model.advance(i64::MAX);
            assert!(model.late.is_empty() && model.rows.len() > fired_before + 20, "seed {seed}: windows fired");
            let mut expected = model.rows.clone();
            expected.sort_unstable();
            rows.sort_unstable();
            assert_eq!(rows, expected, "seed {seed}: every window, once");
        }
    }

    /// Each window's row computed from the whole input at once: every record's windows (for
    /// sessions: each key's times sorted, and merged while the next starts at or before the
    /// current end), then the count and the sum or lower median of their values.
    fn reference_from_full_input(records: &[(u64, i64, i64)], kind: WindowKind, median: bool) -> Vec<Row> {
        let mut windows: BTreeMap<(u64, i64, i64), Vec<i64>> = BTreeMap::new();
        match kind {
            WindowKind::Session { gap_ms } => {
                let mut by_key: BTreeMap<u64, Vec<(i64, i64)>> = BTreeMap::new();
                for &(key, ts, value) in records {
                    by_key.entry(key).or_default().push((ts, value));
                }
                for (key, mut times) in by_key {
                    times.sort();
                    let mut current: Option<(i64, i64, Vec<i64>)> = None;
                    for (ts, value) in times {
                        match &mut current {
                            Some((_, end, values)) if ts <= *end => {
                                *end = (*end).max(ts + gap_ms);
                                values.push(value);
                            }
                            _ => {
                                if let Some((start, end, values)) = current.take() {
                                    windows.insert((key, start, end), values);
                                }
                                current = Some((ts, ts + gap_ms, vec![value]));
                            }
                        }
                    }
                    if let Some((start, end, values)) = current {
                        windows.insert((key, start, end), values);
                    }
                }
            }
            WindowKind::Tumbling { size_ms } => {
                for &(key, ts, value) in records {
                    let start = ts.div_euclid(size_ms) * size_ms;
                    windows.entry((key, start, start + size_ms)).or_default().push(value);
                }
            }
            WindowKind::Sliding { size_ms, slide_ms } => {
                for &(key, ts, value) in records {
                    // Every multiple of the slide in (ts - size, ts].
                    let mut start = ts.div_euclid(slide_ms) * slide_ms;
                    while start > ts - size_ms {
                        windows.entry((key, start, start + size_ms)).or_default().push(value);
                        start -= slide_ms;
                    }
                }
            }
        }
        windows.into_iter().map(|((key, start, end), values)| reference_row(key, start, end, &values, median)).collect()
    }

    mod generated {
        use proptest::prelude::*;

        use super::*;

        fn cases() -> u32 {
            std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(48)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

            // Goal: for random out-of-order inputs whose disorder stays within the watermark's
            // bound (so nothing is late), every window kind, with the sum or a full-window
            // function, emits each window exactly once, equal to a reference that computes each
            // window from the full input at once (session windows merged by sorting), also when
            // the operator is checkpointed at a random point and restored at parallelism 1 to 4.
            // Method: proptest draws the records (key, step, disorder, value), the kind, the
            // function, the checkpoint point and the parallelism, and shrinks failures; records
            // are `base + disorder` with `base` non-decreasing and the watermark `base - 1`.
            #[test]
            fn windows_equal_a_reference_computed_from_the_full_input(
                draws in prop::collection::vec((0..6_u64, 0..15_i64, 0..40_i64, -50..100_i64), 1..300),
                kind in 0..3_usize,
                median in any::<bool>(),
                split in 0.0..1.0_f64,
                parallelism in 1..5_u16,
            ) {
                let kind = [
                    WindowKind::Tumbling { size_ms: 50 },
                    WindowKind::Sliding { size_ms: 60, slide_ms: 20 },
                    WindowKind::Session { gap_ms: 12 },
                ][kind];
                let mut spec = spec(kind, 0, median);
                spec.late = LatePolicy::Drop;
                let mut inputs = Vec::new();
                let mut records = Vec::new();
                let (mut base, mut watermark) = (0_i64, i64::MIN);
                for (key, step, disorder, value) in draws {
                    base += step;
                    records.push((key, base + disorder, value));
                    inputs.push(Input::Record { key, ts: base + disorder, value });
                    if base - 1 > watermark {
                        watermark = base - 1;
                        inputs.push(Input::Watermark(watermark));
                    }
                }
                let expected = reference_from_full_input(&records, kind, median);

                let max = MaxParallelism::default();
                let mut storage = MemStorage::new();
                let (before, after) = inputs.split_at((inputs.len() as f64 * split) as usize);
                let mut out = Vec::new();
                let mut op = operator(&spec, max, KeyGroupRange::all(max), 0);
                let mut first = context(&mut storage, &mut out, 0);
                for &input in before {
                    feed(&mut op, &mut first, input);
                }
                let written = op.on_barrier(&mut first, CheckpointId(1)).unwrap();
                let mut files = written.files;
                for write in written.writes {
                    files.extend(write.write(first.storage).unwrap());
                }
                let mut rows = rows_of(&out);
                let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
                let snapshots = [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: vec![] }];
                for index in 0..parallelism {
                    let range = max.range_of(index, parallelism);
                    let mut restored = operator(&spec, max, range, index);
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
                    prop_assert_eq!(restored.metrics().records_late_dropped, 0);
                    rows.extend(rows_of(&out));
                }
                rows.sort_unstable();
                prop_assert_eq!(rows, expected);
            }
        }
    }
}
