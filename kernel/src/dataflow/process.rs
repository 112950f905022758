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
        self.function.process_element(&mut context, row)
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
        self.function.on_timer(&mut context, timer)
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
        let files: Vec<String> = snapshots.iter().flat_map(|s| s.files.iter().cloned()).collect();
        let mine = format!("/{}-", self.spec.name);
        let mut watermark: Option<i64> = None;
        for file in files.iter().filter(|file| file.ends_with(".watermark") && file.contains(&mine)) {
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
