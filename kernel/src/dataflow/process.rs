//! The keyed process function: the general-purpose building block of keyed operators.
//!
//! A [`KeyedProcessFunction`] handles each record of a keyed stream, and each timer it set, with
//! its key current in a [`KeyedState`], and may read and write that key's state, register and
//! delete event-time and processing-time timers (per key and namespace, see
//! [`TimerService`]), read the record's event time, the current watermark and processing time,
//! emit rows to its output and send rows to a side output. [`KeyedProcessOperator`] runs one:
//! it keeps the state, the timers and the side output's file sink, fires timers, forwards
//! watermarks, and takes part in checkpoints. The event-time windows
//! ([`super::event_window`]) are such a function.
//!
//! # The per-record path
//! The operator hands the function each batch once ([`KeyedProcessFunction::bind`]: it takes
//! the columns it reads, an `Arc` clone each) and then each row by index, so nothing is
//! allocated per record unless the function does. Rows the function emits are collected in a
//! reused vector of its own row type and turned into one Arrow batch per batch, watermark or
//! timer firing ([`KeyedProcessFunction::output_batch`]).
//!
//! # Time
//! - A watermark `W` fires every event-time timer due at `W` (timers registered while firing
//!   included), in the order (time, key group, key, namespace), and only then is forwarded:
//!   the output watermark never passes a timer that has not fired. Watermarks never go back
//!   (an assertion); after a restore, watermarks up to the restored one repeat what is known
//!   and are not forwarded again.
//! - Processing-time timers fire when the driver calls [`Operator::on_processing_time`] at or
//!   after [`Operator::poll_timeout`] (the earliest processing-time timer).
//! - At the end of input every remaining timer fires: event-time ones as at the greatest
//!   watermark, then processing-time ones in their order, as if processing time had reached
//!   them. No more records can come, so firing is the only way a window's result is not lost.
//!
//! # Checkpoints
//! A snapshot holds the keyed state (the function's states and the timers), the watermark, and
//! the side output's pre-committed files. Restore takes the key groups of this subtask from
//! the snapshots of any number of subtasks (rescaling) and the lowest watermark among them.

use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{ArrowError, DataType, Field, SchemaRef};

use super::sink::FileSink;
use super::watermark::event_times;
use super::window::{capture_target, key_column, KeyColumn, KeyType};
use super::{read_u64_file, u64_file_bytes, Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot};
use crate::checkpoint::manifest::TaskSnapshot;
use crate::dataflow::graph::SubtaskId;
use crate::element::{CheckpointId, Element};
use crate::key_group::MaxParallelism;
use crate::state::keyed::KeyedState;
use crate::state::timers::{Timer, TimerService, TimerTime};
use crate::state::{FileWrite, StateBackend, StateError};
use crate::time::{EventTime, Instant};

/// A function run per record and per timer of a keyed stream, with the record's key current.
pub trait KeyedProcessFunction: Send + 'static {
    /// A row of the main output.
    type Out: Send;
    /// A row of the side output (`()` if the function has none).
    type Side: Send;

    /// The schema of the main output's batches.
    fn output_schema(&self) -> SchemaRef;

    /// The schema of the side output's batches, if the function has a side output.
    fn side_output_schema(&self) -> Option<SchemaRef> {
        None
    }

    /// Takes the columns the function reads from `batch`, before its rows are processed. A
    /// column of the wrong type is malformed input.
    fn bind(&mut self, batch: &RecordBatch) -> Result<(), OperatorError>;

    /// Handles row `row` of the batch last bound, with its key current.
    fn process_element(
        &mut self,
        context: &mut ProcessContext<'_, Self::Out, Self::Side>,
        row: usize,
    ) -> Result<(), OperatorError>;

    /// Handles a timer that fired, with its key and namespace current.
    fn on_timer(
        &mut self,
        context: &mut ProcessContext<'_, Self::Out, Self::Side>,
        timer: &Timer,
    ) -> Result<(), OperatorError>;

    /// One batch of the main output from rows the function emitted.
    fn output_batch(&self, schema: &SchemaRef, rows: &[Self::Out]) -> Result<RecordBatch, ArrowError>;

    /// One batch of the side output from rows the function sent there.
    fn side_output_batch(&self, _schema: &SchemaRef, _rows: &[Self::Side]) -> Result<RecordBatch, ArrowError> {
        unreachable!("side_output_batch called for a function without a side output")
    }
}

/// What a keyed process function sees and may do while it handles a record or a timer.
pub struct ProcessContext<'a, O, S> {
    /// The keyed state, with the record's (or timer's) key current. Setting a namespace is the
    /// function's choice; timers belong to the current key and namespace.
    pub state: &'a mut KeyedState,
    timers: &'a mut TimerService,
    key: u64,
    timestamp: Option<EventTime>,
    watermark: EventTime,
    now: Instant,
    out: &'a mut Vec<O>,
    side: Option<&'a mut Vec<S>>,
    metrics: &'a mut OperatorMetrics,
}

impl<O, S> ProcessContext<'_, O, S> {
    /// The current key, as the key column holds it: a `UInt64` key as is, an `Int64` key as its
    /// two's-complement bits (`key as i64` gives it back).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The event time of the record (`None` without an event-time column), or the time of the
    /// event-time timer being handled.
    pub fn timestamp(&self) -> Option<EventTime> {
        self.timestamp
    }

    /// The operator's current input watermark.
    pub fn watermark(&self) -> EventTime {
        self.watermark
    }

    /// Processing time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Registers an event-time timer for the current key and namespace (again: one timer).
    pub fn register_event_timer(&mut self, time: EventTime) -> Result<(), StateError> {
        self.timers.register_event_timer(self.state, time)
    }

    /// Registers a processing-time timer for the current key and namespace.
    pub fn register_processing_timer(&mut self, time: Instant) -> Result<(), StateError> {
        self.timers.register_processing_timer(self.state, time)
    }

    /// Deletes the current key and namespace's event-time timer at `time`, if there is one.
    pub fn delete_event_timer(&mut self, time: EventTime) -> Result<(), StateError> {
        self.timers.delete_event_timer(self.state, time)
    }

    /// Deletes the current key and namespace's processing-time timer at `time`, if any.
    pub fn delete_processing_timer(&mut self, time: Instant) -> Result<(), StateError> {
        self.timers.delete_processing_timer(self.state, time)
    }

    /// Emits a row to the main output.
    pub fn emit(&mut self, row: O) {
        self.out.push(row);
    }

    /// Sends a row to the side output. A function without one calling this is a bug.
    pub fn side_output(&mut self, row: S) {
        self.side.as_mut().expect("side_output called by a function declared without a side output").push(row);
    }

    /// The operator's counters (records in and out are counted by the operator).
    pub fn metrics(&mut self) -> &mut OperatorMetrics {
        self.metrics
    }
}

/// Where a keyed process operator finds its key and event time, and where its side output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The operator's name, also the prefix of its checkpoint files (a file-name-safe word).
    pub name: String,
    pub key_index: usize,
    pub key_type: KeyType,
    /// The records' event time, for [`ProcessContext::timestamp`].
    pub event_time_index: Option<usize>,
    /// The file sink (`output/<name>/`) of the side output, committed exactly once with the
    /// job's checkpoints; `None` if the function has no side output.
    pub side_output: Option<String>,
}

/// Runs a [`KeyedProcessFunction`] as an operator.
pub struct KeyedProcessOperator<F: KeyedProcessFunction> {
    spec: ProcessSpec,
    function: F,
    state: KeyedState,
    timers: TimerService,
    side_sink: Option<FileSink>,
    /// The input watermark: every event-time timer at or below it has fired.
    watermark: EventTime,
    /// The watermark restored from a checkpoint: watermarks up to it repeat what is known.
    watermark_restored: EventTime,
    /// The earliest processing-time timer, read after every change.
    deadline: Option<Instant>,
    schema: SchemaRef,
    side_schema: Option<SchemaRef>,
    out: Vec<F::Out>,
    side: Vec<F::Side>,
    metrics: OperatorMetrics,
}

impl<F: KeyedProcessFunction> KeyedProcessOperator<F> {
    /// An operator in a fresh `backend`, of the function `open` makes: it declares the
    /// function's states (before the timers' states; the same states in the same order on every
    /// run, as for any operator) and keeps their handles. A side output declared on one side only
    /// (the spec or the function) is a bug in the job's construction.
    pub fn new(
        spec: ProcessSpec,
        max_parallelism: MaxParallelism,
        backend: Box<dyn StateBackend>,
        subtask: SubtaskId,
        open: impl FnOnce(&mut KeyedState) -> Result<F, StateError>,
    ) -> Result<KeyedProcessOperator<F>, StateError> {
        let mut state = KeyedState::new(backend, max_parallelism);
        let function = open(&mut state)?;
        let timers = TimerService::declare(&mut state)?;
        let side_schema = function.side_output_schema();
        assert_eq!(
            side_schema.is_some(),
            spec.side_output.is_some(),
            "{}: a side output declared by the function and by the job differ",
            spec.name
        );
        Ok(KeyedProcessOperator {
            side_sink: spec.side_output.as_deref().map(|name| FileSink::new_files(name, subtask)),
            schema: function.output_schema(),
            side_schema,
            spec,
            function,
            state,
            timers,
            watermark: EventTime::MIN,
            watermark_restored: EventTime::MIN,
            deadline: None,
            out: Vec::new(),
            side: Vec::new(),
            metrics: OperatorMetrics::default(),
        })
    }

    /// The function, for tests and queries.
    pub fn function(&self) -> &F {
        &self.function
    }

    fn key_of(&self, timer: &Timer) -> u64 {
        match self.spec.key_type {
            KeyType::UInt64 => timer.key_u64(),
            KeyType::Int64 => timer.key_i64().map(|key| key as u64),
        }
        .expect("timers are set on the operator's integer keys")
    }

    fn process_row(
        &mut self,
        key: u64,
        timestamp: Option<EventTime>,
        now: Instant,
        row: usize,
    ) -> Result<(), OperatorError> {
        match self.spec.key_type {
            KeyType::UInt64 => self.state.set_current_key_u64(key),
            KeyType::Int64 => self.state.set_current_key_i64(key as i64),
        }
        self.call(key, timestamp, now, |function, context| function.process_element(context, row))
    }

    /// Fires the event-time timers due at `watermark`, in order.
    fn fire_event_timers(&mut self, watermark: EventTime, now: Instant) -> Result<(), OperatorError> {
        while let Some(timer) = self.timers.poll_event_timer(&mut self.state, watermark)? {
            let TimerTime::Event(time) = timer.time else { unreachable!("an event-time poll fired {timer:?}") };
            self.fire(&timer, Some(time), now)?;
        }
        Ok(())
    }

    /// Fires the processing-time timers due at `now`, in order.
    fn fire_processing_timers(&mut self, now: Instant) -> Result<(), OperatorError> {
        while let Some(timer) = self.timers.poll_processing_timer(&mut self.state, now)? {
            self.fire(&timer, None, now)?;
        }
        Ok(())
    }

    fn fire(&mut self, timer: &Timer, timestamp: Option<EventTime>, now: Instant) -> Result<(), OperatorError> {
        let key = self.key_of(timer);
        self.call(key, timestamp, now, |function, context| function.on_timer(context, timer))
    }

    /// Calls the function with a context for `key` (whose state is current) at `timestamp`.
    fn call<R>(
        &mut self,
        key: u64,
        timestamp: Option<EventTime>,
        now: Instant,
        call: impl FnOnce(&mut F, &mut ProcessContext<'_, F::Out, F::Side>) -> R,
    ) -> R {
        let mut context = ProcessContext {
            state: &mut self.state,
            timers: &mut self.timers,
            key,
            timestamp,
            watermark: self.watermark,
            now,
            out: &mut self.out,
            side: self.side_sink.is_some().then_some(&mut self.side),
            metrics: &mut self.metrics,
        };
        call(&mut self.function, &mut context)
    }

    /// Sends what the function emitted, and reads the next processing-time deadline.
    fn flush(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        if !self.out.is_empty() {
            let batch = self.function.output_batch(&self.schema, &self.out)?;
            self.metrics.records_out += self.out.len() as u64;
            self.out.clear();
            context.emit(Element::Batch(batch));
        }
        if !self.side.is_empty() {
            let schema = self.side_schema.as_ref().expect("side rows only with a side output");
            let batch = self.function.side_output_batch(schema, &self.side)?;
            self.side.clear();
            self.side_sink.as_mut().expect("side rows only with a side output").on_batch(context, batch)?;
        }
        self.deadline = self.timers.next_processing_time(&mut self.state)?;
        Ok(())
    }
}

impl<F: KeyedProcessFunction> Operator for KeyedProcessOperator<F> {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let now = context.now;
        self.state.set_processing_time(now);
        self.function.bind(&batch)?;
        let times = match self.spec.event_time_index {
            Some(index) => Some(event_times(&batch, index, &self.spec.name)?),
            None => None,
        };
        let timestamp = |row: usize| times.map(|times| EventTime(times[row]));
        match key_column(&batch, self.spec.key_index, self.spec.key_type)? {
            KeyColumn::UInt64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.process_row(key, timestamp(row), now, row)?;
                }
            }
            KeyColumn::Int64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.process_row(key as u64, timestamp(row), now, row)?;
                }
            }
        }
        self.metrics.records_in += batch.num_rows() as u64;
        self.flush(context)
    }

    /// Fires every event-time timer the watermark reached, then forwards it.
    fn on_watermark(&mut self, context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        if watermark <= self.watermark_restored {
            return Ok(());
        }
        assert!(watermark > self.watermark, "{}: watermark {watermark:?} after {:?}", self.spec.name, self.watermark);
        self.watermark = watermark;
        self.state.set_event_time(watermark);
        self.state.set_processing_time(context.now);
        self.fire_event_timers(watermark, context.now)?;
        self.flush(context)?;
        context.emit(Element::Watermark(watermark));
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    fn on_processing_time(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        self.state.set_processing_time(context.now);
        self.fire_processing_timers(context.now)?;
        self.flush(context)
    }

    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        self.watermark = EventTime::MAX;
        self.state.set_event_time(EventTime::MAX);
        self.fire_event_timers(EventTime::MAX, context.now)?;
        self.fire_processing_timers(Instant(u64::MAX))?;
        self.flush(context)?;
        if let Some(sink) = self.side_sink.as_mut() {
            sink.on_end(context)?;
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        let mut snapshot = match self.side_sink.as_mut() {
            Some(sink) => sink.on_barrier(context, checkpoint)?,
            None => OperatorSnapshot::default(),
        };
        if checkpoint == CheckpointId::END_OF_INPUT {
            // Every timer fired at the end of input.
            return Ok(snapshot);
        }
        let target = capture_target(checkpoint, &self.spec.name, context.subtask);
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
        match self.side_sink.as_mut() {
            Some(sink) => sink.on_checkpoint_complete(context, checkpoint),
            None => Ok(()),
        }
    }

    /// Restores this subtask's key groups (state and timers), the lowest restored watermark,
    /// and the side output's sink.
    fn restore(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        // Its own files: another keyed operator of the chain snapshots beside it.
        let files: Vec<String> = snapshots
            .iter()
            .flat_map(|s| s.files.iter())
            .filter(|file| is_capture_of(file, &self.spec.name))
            .cloned()
            .collect();
        let mut watermark: Option<i64> = None;
        for file in files.iter().filter(|file| file.ends_with(".watermark")) {
            let restored = read_u64_file(context.storage, file)? as i64;
            watermark = Some(watermark.map_or(restored, |w| w.min(restored)));
        }
        self.state.restore_files(context.storage, &files)?;
        self.watermark = EventTime(watermark.unwrap_or(i64::MIN));
        self.watermark_restored = self.watermark;
        self.state.set_event_time(self.watermark);
        self.deadline = self.timers.next_processing_time(&mut self.state)?;
        if let Some(sink) = self.side_sink.as_mut() {
            sink.restore(context, snapshots)?;
        }
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        OperatorMetrics { state_size_bytes: self.state.size_bytes(), ..self.metrics }
    }
}

/// Whether `file` belongs to a capture of the operator named `name` (`capture_target`'s paths:
/// a path component `<name>-VVVVV-IIIII`).
fn is_capture_of(file: &str, name: &str) -> bool {
    file.split('/').any(|component| {
        let Some(rest) = component.strip_prefix(name).and_then(|rest| rest.strip_prefix('-')) else {
            return false;
        };
        let bytes = rest.as_bytes();
        bytes.len() >= 11
            && bytes[..5].iter().all(u8::is_ascii_digit)
            && bytes[5] == b'-'
            && bytes[6..11].iter().all(u8::is_ascii_digit)
    })
}

/// A non-null key field of `key_type`, named `key`: the first column of keyed outputs.
pub fn key_field(key_type: KeyType) -> Field {
    match key_type {
        KeyType::UInt64 => Field::new("key", DataType::UInt64, false),
        KeyType::Int64 => Field::new("key", DataType::Int64, false),
    }
}

/// A key column of `key_type` from keys as [`ProcessContext::key`] gives them.
pub fn key_array(key_type: KeyType, keys: impl Iterator<Item = u64>) -> ArrayRef {
    match key_type {
        KeyType::UInt64 => Arc::new(keys.collect::<UInt64Array>()),
        KeyType::Int64 => Arc::new(keys.map(|key| key as i64).collect::<Int64Array>()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow_schema::Schema;

    use super::*;
    use crate::dataflow::graph::VertexId;
    use crate::dataflow::sink::read_committed;
    use crate::env::MemStorage;
    use crate::key_group::KeyGroupRange;
    use crate::state::keyed::ValueState;
    use crate::state::testing::Lcg;
    use crate::state::HeapBackend;

    /// A row: key, count of the key's records so far, the timer's time, and which timer
    /// (0: the key's inactivity timeout on event time, 1: its report on processing time).
    type Row = (u64, u64, i64, u8);

    /// A user's function: per key, counts records; a record with a negative value goes to the
    /// side output instead. Each counted record moves the key's event-time timeout to its
    /// event time + `TIMEOUT` (deleting the previous timer); the timeout emits the count. The
    /// key's first record also sets a processing-time report `REPORT` ms later, which emits the
    /// count then and sets the next report only if the key is still active (has a timeout).
    struct Timeouts {
        count: ValueState<u64>,
        deadline: ValueState<i64>,
        values: ScalarBuffer<i64>,
    }

    const TIMEOUT: i64 = 100;
    const REPORT: u64 = 30;

    use arrow_buffer::ScalarBuffer;

    impl Timeouts {
        fn open(state: &mut KeyedState) -> Result<Timeouts, StateError> {
            Ok(Timeouts {
                count: state.value_state("count", None)?,
                deadline: state.value_state("deadline", None)?,
                values: ScalarBuffer::from(Vec::new()),
            })
        }
    }

    impl KeyedProcessFunction for Timeouts {
        type Out = Row;
        type Side = (u64, i64);

        fn output_schema(&self) -> SchemaRef {
            Arc::new(Schema::new(vec![
                Field::new("key", DataType::UInt64, false),
                Field::new("count", DataType::UInt64, false),
                Field::new("time", DataType::Int64, false),
                Field::new("timer", DataType::UInt64, false),
            ]))
        }

        fn side_output_schema(&self) -> Option<SchemaRef> {
            Some(Arc::new(Schema::new(vec![
                Field::new("key", DataType::UInt64, false),
                Field::new("value", DataType::Int64, false),
            ])))
        }

        fn bind(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
            let values = batch.column(1).as_any().downcast_ref::<Int64Array>();
            self.values = values.ok_or_else(|| OperatorError::Malformed("value".into()))?.values().clone();
            Ok(())
        }

        fn process_element(
            &mut self,
            context: &mut ProcessContext<'_, Row, (u64, i64)>,
            row: usize,
        ) -> Result<(), OperatorError> {
            let value = self.values[row];
            if value < 0 {
                context.side_output((context.key(), value));
                return Ok(());
            }
            let count = self.count.get(context.state)?.unwrap_or(0) + 1;
            self.count.update(context.state, &count)?;
            if let Some(old) = self.deadline.get(context.state)? {
                context.delete_event_timer(EventTime(old))?;
            }
            let deadline = context.timestamp().expect("an event-time column").0 + TIMEOUT;
            self.deadline.update(context.state, &deadline)?;
            context.register_event_timer(EventTime(deadline))?;
            if count == 1 {
                context.register_processing_timer(Instant(context.now().0 + REPORT))?;
            }
            Ok(())
        }

        fn on_timer(
            &mut self,
            context: &mut ProcessContext<'_, Row, (u64, i64)>,
            timer: &Timer,
        ) -> Result<(), OperatorError> {
            let count = self.count.get(context.state)?.expect("a timer after a record");
            match timer.time {
                TimerTime::Event(time) => {
                    assert_eq!(context.timestamp(), Some(time));
                    assert!(time <= context.watermark(), "{time:?} fired above the watermark");
                    self.deadline.clear(context.state)?;
                    context.emit((context.key(), count, time.0, 0));
                }
                TimerTime::Processing(time) => {
                    context.emit((context.key(), count, time.0 as i64, 1));
                    if self.deadline.get(context.state)?.is_some() {
                        context.register_processing_timer(Instant(time.0 + REPORT))?;
                    }
                }
            }
            Ok(())
        }

        fn output_batch(&self, schema: &SchemaRef, rows: &[Row]) -> Result<RecordBatch, ArrowError> {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(rows.iter().map(|r| r.0).collect::<UInt64Array>()),
                Arc::new(rows.iter().map(|r| r.1).collect::<UInt64Array>()),
                Arc::new(rows.iter().map(|r| r.2).collect::<Int64Array>()),
                Arc::new(rows.iter().map(|r| u64::from(r.3)).collect::<UInt64Array>()),
            ];
            RecordBatch::try_new(schema.clone(), columns)
        }

        fn side_output_batch(&self, schema: &SchemaRef, rows: &[(u64, i64)]) -> Result<RecordBatch, ArrowError> {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(rows.iter().map(|r| r.0).collect::<UInt64Array>()),
                Arc::new(rows.iter().map(|r| r.1).collect::<Int64Array>()),
            ];
            RecordBatch::try_new(schema.clone(), columns)
        }
    }

    /// The function's semantics written directly: per key its count, timeout and next report;
    /// timers fire in the order (time, key group, key).
    #[derive(Default)]
    struct Model {
        count: BTreeMap<u64, u64>,
        timeout: BTreeMap<u64, i64>,
        report: BTreeMap<u64, u64>,
        side: Vec<(u64, i64)>,
        /// Processing time, and the timers fired so far.
        now: u64,
        fired: usize,
    }

    impl Model {
        fn record(&mut self, key: u64, ts: i64, value: i64, now: u64) {
            if value < 0 {
                self.side.push((key, value));
                return;
            }
            let count = self.count.entry(key).or_insert(0);
            *count += 1;
            self.timeout.insert(key, ts + TIMEOUT);
            if *count == 1 {
                self.report.insert(key, now + REPORT);
            }
        }

        /// Every timeout at or below `watermark`, in firing order.
        fn watermark(&mut self, watermark: i64, max: MaxParallelism) -> Vec<Row> {
            let mut due: Vec<(i64, u16, u64)> = self
                .timeout
                .iter()
                .filter(|(_, &time)| time <= watermark)
                .map(|(&key, &time)| (time, max.key_group_of_u64(key).0, key))
                .collect();
            due.sort_unstable();
            due.iter()
                .map(|&(time, _, key)| {
                    self.timeout.remove(&key);
                    (key, self.count[&key], time, 0)
                })
                .collect()
        }

        /// Every report due at `now`, in firing order (reports set while firing fire later).
        fn clock(&mut self, now: u64, max: MaxParallelism) -> Vec<Row> {
            let mut rows = Vec::new();
            loop {
                let next = self
                    .report
                    .iter()
                    .filter(|(_, &time)| time <= now)
                    .map(|(&key, &time)| (time, max.key_group_of_u64(key).0, key))
                    .min();
                let Some((time, _, key)) = next else { return rows };
                rows.push((key, self.count[&key], time as i64, 1));
                if self.timeout.contains_key(&key) {
                    self.report.insert(key, time + REPORT);
                } else {
                    self.report.remove(&key);
                }
            }
        }
    }

    fn spec() -> ProcessSpec {
        ProcessSpec {
            name: "timeouts".into(),
            key_index: 0,
            key_type: KeyType::UInt64,
            event_time_index: Some(2),
            side_output: Some("timeouts-side".into()),
        }
    }

    fn operator(max: MaxParallelism, range: KeyGroupRange, index: u16) -> KeyedProcessOperator<Timeouts> {
        let subtask = SubtaskId { vertex: VertexId(1), index };
        KeyedProcessOperator::new(spec(), max, Box::new(HeapBackend::new(range)), subtask, Timeouts::open).unwrap()
    }

    fn batch(key: u64, value: i64, ts: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::UInt64, false),
            Field::new("value", DataType::Int64, false),
            Field::new("ts_ms", DataType::Int64, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(vec![key])),
            Arc::new(Int64Array::from(vec![value])),
            Arc::new(Int64Array::from(vec![ts])),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    /// The rows of a run's output, and where its watermarks fell among them.
    fn rows_of(out: &[Element]) -> Vec<Row> {
        let mut rows = Vec::new();
        for element in out {
            let Element::Batch(batch) = element else { continue };
            let u64s = |i: usize| batch.column(i).as_any().downcast_ref::<UInt64Array>().unwrap().clone();
            let times = batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
            let (keys, counts, timers) = (u64s(0), u64s(1), u64s(3));
            for row in 0..batch.num_rows() {
                rows.push((keys.value(row), counts.value(row), times.value(row), timers.value(row) as u8));
            }
        }
        rows
    }

    #[derive(Clone, Copy, Debug)]
    enum Input {
        Record {
            key: u64,
            ts: i64,
            value: i64,
        },
        Watermark(i64),
        /// Processing time moves on by this much.
        Clock(u64),
    }

    fn inputs(rng: &mut Lcg) -> Vec<Input> {
        let mut inputs = Vec::new();
        let (mut high, mut watermark) = (0_i64, 0_i64);
        for i in 0..500_i64 {
            let ts = i * 2 - rng.below(40) as i64;
            high = high.max(ts);
            let value = rng.below(100) as i64 - 10;
            // Keys come and go: each of 12 keys is active for a stretch of the input.
            inputs.push(Input::Record {
                key: (i / 40 + rng.below(4) as i64) as u64 % 12,
                ts: ts.max(watermark + 1),
                value,
            });
            match rng.below(10) {
                0..=1 if high - 40 > watermark => {
                    watermark = high - 40;
                    inputs.push(Input::Watermark(watermark));
                }
                2..=3 => inputs.push(Input::Clock(rng.below(25))),
                _ => {}
            }
        }
        inputs
    }

    // Goal: a keyed process function gets each record with its key current, its keyed state,
    // the record's event time, the watermark and processing time; its event-time timers fire
    // when the watermark reaches them and processing-time timers when the clock does, exactly
    // once each, in the order (time, key group, key), before the watermark is forwarded (the
    // output watermark never passes an unfired timer); a deleted timer never fires; timers set
    // while firing fire in their turn; side-output rows are committed to their own sink; and all
    // of it survives a checkpoint restored at parallelism 3.
    // Method: seeded inputs (seed printed) against a model of the function; before the
    // checkpoint, each firing's rows must equal the model's in order; after it, three operators
    // restored from the snapshot take the keys of their key groups, and the rows of each firing
    // must equal the model's rows of those keys, in order.
    #[test]
    fn process_function_timers_state_and_side_output_match_a_model() {
        for seed in 0..10_u64 {
            println!("seed {seed}");
            let mut rng = Lcg::new(seed);
            let inputs = inputs(&mut rng);
            let max = MaxParallelism::default();
            let mut storage = MemStorage::new();
            let mut model = Model::default();
            let (before, after) = inputs.split_at(inputs.len() / 2);
            let mut ops = vec![operator(max, KeyGroupRange::all(max), 0)];
            let run = |ops: &mut Vec<KeyedProcessOperator<Timeouts>>,
                       storage: &mut MemStorage,
                       model: &mut Model,
                       input: Input| {
                let parallelism = ops.len() as u16;
                let mine = |index: usize, key: u64| {
                    max.range_of(index as u16, parallelism).contains(max.key_group_of_u64(key))
                };
                let expected = match input {
                    Input::Record { key, ts, value } => {
                        model.record(key, ts, value, model.now);
                        Vec::new()
                    }
                    Input::Watermark(w) => model.watermark(w, max),
                    Input::Clock(ms) => {
                        model.now += ms;
                        model.clock(model.now, max)
                    }
                };
                model.fired += expected.len();
                let now = model.now;
                for (index, op) in ops.iter_mut().enumerate() {
                    let mut out = Vec::new();
                    let subtask = SubtaskId { vertex: VertexId(1), index: index as u16 };
                    let mut context = Context::new(Instant(now), storage, subtask, &mut out);
                    match input {
                        Input::Record { key, ts, value } if mine(index, key) => {
                            op.on_batch(&mut context, batch(key, value, ts)).unwrap()
                        }
                        Input::Record { .. } => {}
                        Input::Watermark(w) => {
                            op.on_watermark(&mut context, EventTime(w)).unwrap();
                            assert!(matches!(out.last(), Some(Element::Watermark(EventTime(x))) if *x == w));
                        }
                        Input::Clock(_) => {
                            if op.poll_timeout().is_some_and(|at| at <= Instant(now)) {
                                op.on_processing_time(&mut context).unwrap();
                            }
                        }
                    }
                    let mine_expected: Vec<Row> = expected.iter().filter(|row| mine(index, row.0)).copied().collect();
                    assert_eq!(rows_of(&out), mine_expected, "seed {seed}: subtask {index} after {input:?}");
                }
            };
            for &input in before {
                run(&mut ops, &mut storage, &mut model, input);
            }
            let now = model.now;
            let mut out = Vec::new();
            let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
            let mut context = Context::new(Instant(now), &mut storage, subtask, &mut out).with_checkpointing(true);
            let written = ops[0].on_barrier(&mut context, CheckpointId(1)).unwrap();
            let mut files = written.files;
            for write in written.writes {
                files.extend(write.write(&mut storage).unwrap());
            }
            ops[0]
                .on_checkpoint_complete(
                    &mut Context::new(Instant(now), &mut storage, subtask, &mut out).with_checkpointing(true),
                    CheckpointId(1),
                )
                .unwrap();
            let snapshots =
                [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: written.pending_output }];
            let mut ops: Vec<_> = (0..3).map(|index| operator(max, max.range_of(index, 3), index)).collect();
            for (index, op) in ops.iter_mut().enumerate() {
                let subtask = SubtaskId { vertex: VertexId(1), index: index as u16 };
                op.restore(&mut Context::new(Instant(now), &mut storage, subtask, &mut out), &snapshots).unwrap();
            }
            for &input in after {
                run(&mut ops, &mut storage, &mut model, input);
            }
            let now = model.now;
            // The end: every timeout fires, then the reports (each once: the timeouts are gone).
            let mut expected = model.watermark(i64::MAX, max);
            expected.extend(model.clock(u64::MAX - REPORT, max));
            let mut rows = Vec::new();
            for (index, op) in ops.iter_mut().enumerate() {
                let subtask = SubtaskId { vertex: VertexId(1), index: index as u16 };
                let mut out = Vec::new();
                op.on_end(&mut Context::new(Instant(now), &mut storage, subtask, &mut out)).unwrap();
                rows.extend(rows_of(&out));
            }
            rows.sort_unstable();
            expected.sort_unstable();
            assert_eq!(rows, expected, "seed {seed}: the end");
            assert!(model.fired > 50, "seed {seed}: {} timers fired before the end", model.fired);
            // The side output: every negative record, exactly once (before the checkpoint it was
            // committed by it; after, at the end).
            let mut side: Vec<(u64, i64)> = Vec::new();
            for batch in read_committed(&mut storage, "timeouts-side").unwrap() {
                let keys = batch.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
                let values = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                side.extend((0..batch.num_rows()).map(|i| (keys.value(i), values.value(i))));
            }
            side.sort_unstable();
            model.side.sort_unstable();
            assert_eq!(side, model.side, "seed {seed}: side output");
            println!("seed {seed}: {} timers fired before the end, {} side-output rows", model.fired, side.len());
        }
    }
}
