//! The job graph: a builder that checks schemas as it goes, and the physical plan of subtasks and channels.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

use super::event_window::{EventWindowSpec, LatePolicy, WindowFunction, WindowKind, WindowTime};
use super::keyed_stats::{KeyedStats, KeyedStatsSpec};
use super::map::{Filter, Predicate, Project};
use super::process::{KeyedProcessFunction, KeyedProcessOperator, ProcessSpec};
use super::sink::{FileSink, FileTransactions, SinkFactory, TwoPhaseCommitSink};
use super::source::{GeneratorSource, GeneratorSplits};
use super::watermark::WatermarkAssigner;
use super::window::{KeyType, TumblingWindowCountSum, WindowSpec};
use super::{Operator, Source};
use crate::env::ChannelId;
use crate::key_group::{KeyGroupRange, MaxParallelism};
use crate::state::keyed::KeyedState;
use crate::state::{HeapBackend, StateBackend, StateError};
use crate::time::watermarks::{Punctuation, SourceWatermarkSpec, WatermarkKind, WatermarkStrategy};

/// The largest parallelism of one vertex.
pub const PARALLELISM_MAX: u16 = 1024;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct VertexId(pub u16);

/// One parallel instance of a vertex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubtaskId {
    pub vertex: VertexId,
    pub index: u16,
}

impl fmt::Debug for SubtaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subtask {}.{}", self.vertex.0, self.index)
    }
}

impl fmt::Display for SubtaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a job graph was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("{operator}: no column {column:?} in the stream (columns: {available})")]
    ColumnNotFound { operator: String, column: String, available: String },
    #[error("{operator}: column {column:?} is {found}, expected {expected}")]
    ColumnType { operator: String, column: String, found: String, expected: String },
    #[error("{operator}: the stream has no event-time column (did a projection drop it?)")]
    NoEventTime { operator: String },
    #[error("{operator}: the stream has no watermarks; call assign_watermarks before it")]
    NoWatermarks { operator: String },
    #[error("{operator}: the stream is not keyed; call key_by before it")]
    NotKeyed { operator: String },
    #[error("parallelism {parallelism} of {vertex:?} is outside 1..={max}")]
    Parallelism { vertex: String, parallelism: u16, max: u16 },
    #[error("max parallelism {0} is outside 1..=32768")]
    MaxParallelism(u16),
    #[error("{operator}: {reason}")]
    Invalid { operator: String, reason: String },
}

/// How the records of an edge are spread over the receiving subtasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioning {
    /// Subtask `i` sends to subtask `i` (equal parallelism on both sides).
    Forward,
    /// By the key group of the key column, to the subtask that owns that key group.
    Hash { key_index: usize, key_type: KeyType },
}

/// A source, with what it needs to create one instance per subtask.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// The workload generator of WORKLOADS.md: records `0..record_count`, in batches; `splits`
    /// may set how many splits it has and make them pause in processing time (the same records).
    Generator { record_count: u64, batch_size: usize, keys: crate::workload::Keys, splits: GeneratorSplits },
}

impl SourceSpec {
    fn schema(&self) -> SchemaRef {
        match self {
            SourceSpec::Generator { .. } => GeneratorSource::schema(),
        }
    }

    fn event_time_column(&self) -> &'static str {
        match self {
            SourceSpec::Generator { .. } => GeneratorSource::EVENT_TIME_COLUMN,
        }
    }

    fn validate(&self, name: &str) -> Result<(), BuildError> {
        match self {
            SourceSpec::Generator { batch_size, .. } if !(1..=GeneratorSource::BATCH_SIZE_MAX).contains(batch_size) => {
                Err(BuildError::Invalid {
                    operator: name.to_string(),
                    reason: format!("batch size {batch_size} is outside 1..={}", GeneratorSource::BATCH_SIZE_MAX),
                })
            }
            SourceSpec::Generator { splits: GeneratorSplits { count: Some(0), .. }, .. } => {
                Err(BuildError::Invalid { operator: name.to_string(), reason: "a generator of no splits".into() })
            }
            SourceSpec::Generator { .. } => Ok(()),
        }
    }

    pub fn instantiate(&self, name: &str, subtask: SubtaskId, parallelism: u16) -> Box<dyn Source> {
        match self {
            SourceSpec::Generator { record_count, batch_size, keys, splits } => Box::new(
                GeneratorSource::new(
                    name,
                    *record_count,
                    *batch_size,
                    u64::from(subtask.index),
                    u64::from(parallelism),
                )
                .with_keys(*keys)
                .with_splits(*splits, u64::from(subtask.index), u64::from(parallelism)),
            ),
        }
    }
}

/// An operator of a chain, with what it needs to create one instance per subtask.
#[derive(Clone)]
pub enum OperatorSpec {
    Watermarks {
        event_time_index: usize,
        bound_ms: i64,
    },
    Filter {
        name: String,
        predicate: Predicate,
    },
    Project {
        indices: Vec<usize>,
        schema: SchemaRef,
    },
    TumblingWindow(WindowSpec),
    KeyedStats(KeyedStatsSpec),
    EventWindows(EventWindowSpec),
    /// A user's keyed process function (`Stream::process`).
    Process {
        spec: ProcessSpec,
        factory: ProcessFactory,
    },
    Sink {
        name: String,
    },
    /// A user's transactional sink, run exactly once by `TwoPhaseCommitSink`.
    TransactionalSink {
        name: String,
        factory: SinkFactory,
    },
}

impl fmt::Debug for OperatorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl OperatorSpec {
    pub fn name(&self) -> &str {
        match self {
            OperatorSpec::Watermarks { .. } => "watermarks",
            OperatorSpec::Filter { name, .. } => name,
            OperatorSpec::Project { .. } => "project",
            OperatorSpec::TumblingWindow(_) => "tumbling-window",
            OperatorSpec::KeyedStats(_) => "keyed-stats",
            OperatorSpec::EventWindows(_) => "windows",
            OperatorSpec::Process { spec, .. } => &spec.name,
            OperatorSpec::Sink { name } | OperatorSpec::TransactionalSink { name, .. } => name,
        }
    }

    /// What names the operator's checkpoint files (`<prefix>-VVVVV-IIIII`), if it keeps state:
    /// unique within a vertex's chain.
    pub fn capture_prefix(&self) -> Option<&str> {
        match self {
            OperatorSpec::TumblingWindow(_) => Some("window"),
            OperatorSpec::KeyedStats(_) => Some("stats"),
            OperatorSpec::EventWindows(_) => Some("windows"),
            OperatorSpec::Process { spec, .. } => Some(&spec.name),
            _ => None,
        }
    }

    /// The file sink of the operator's side output, if it has one.
    pub fn side_output(&self) -> Option<&str> {
        match self {
            OperatorSpec::EventWindows(spec) => spec.side_output(),
            OperatorSpec::Process { spec, .. } => spec.side_output.as_deref(),
            _ => None,
        }
    }

    /// Whether instances keep keyed state (and so need a [`StateBackend`]).
    pub fn is_stateful(&self) -> bool {
        matches!(
            self,
            OperatorSpec::TumblingWindow(_)
                | OperatorSpec::KeyedStats(_)
                | OperatorSpec::EventWindows(_)
                | OperatorSpec::Process { .. }
        )
    }

    /// Creates the instance for `subtask`; `state` is given exactly to stateful operators.
    pub fn instantiate(
        &self,
        subtask: SubtaskId,
        max_parallelism: MaxParallelism,
        state: Option<Box<dyn StateBackend>>,
    ) -> Box<dyn Operator> {
        assert_eq!(state.is_some(), self.is_stateful(), "{}: state given to the wrong operator", self.name());
        match self {
            OperatorSpec::Watermarks { event_time_index, bound_ms } => {
                Box::new(WatermarkAssigner::new(*event_time_index, *bound_ms))
            }
            OperatorSpec::Filter { name, predicate } => Box::new(Filter::new(name, predicate.clone())),
            OperatorSpec::Project { indices, schema } => Box::new(Project::new(indices.clone(), schema.clone())),
            &OperatorSpec::TumblingWindow(spec) => {
                Box::new(TumblingWindowCountSum::new(spec, max_parallelism, state.expect("checked above")))
            }
            OperatorSpec::EventWindows(spec) => Box::new(
                spec.instantiate(max_parallelism, state.expect("checked above"), subtask)
                    .expect("the windows declare their states once, in a fresh backend"),
            ),
            OperatorSpec::Process { factory, .. } => {
                (factory.0)(subtask, max_parallelism, state.expect("checked above"))
                    .expect("a process function declares its states once, in a fresh backend")
            }
            &OperatorSpec::KeyedStats(spec) => {
                Box::new(KeyedStats::new(spec, max_parallelism, state.expect("checked above")))
            }
            OperatorSpec::Sink { name } => Box::new(FileSink::new_files(name, subtask)),
            OperatorSpec::TransactionalSink { factory, .. } => Box::new(TwoPhaseCommitSink::new((factory.0)(subtask))),
        }
    }
}

/// A vertex: a source or an input, then a chain of operators, run as `parallelism` subtasks.
#[derive(Clone, Debug)]
pub struct Vertex {
    pub id: VertexId,
    pub name: String,
    pub parallelism: u16,
    pub source: Option<SourceSpec>,
    /// A source's watermarks, generated per split inside it (`JobBuilder::source_with_watermarks`).
    pub watermarks: Option<SourceWatermarkSpec>,
    pub input: Option<(VertexId, Partitioning)>,
    pub chain: Vec<OperatorSpec>,
}

/// A checked job: vertices in topological order (every input comes before its consumer).
#[derive(Clone, Debug)]
pub struct JobGraph {
    pub name: String,
    pub max_parallelism: MaxParallelism,
    pub vertices: Vec<Vertex>,
}

/// Makes the keyed process operator of one subtask, in its state backend.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct ProcessFactory(
    Arc<
        dyn Fn(SubtaskId, MaxParallelism, Box<dyn StateBackend>) -> Result<Box<dyn Operator>, StateError> + Send + Sync,
    >,
);

/// Windows to compute, for [`Stream::windows_with`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windows {
    pub kind: WindowKind,
    /// On processing time (no watermarks needed; no lateness, no late records), or on the
    /// stream's event time.
    pub processing_time: bool,
    pub function: WindowFunction,
    pub allowed_lateness_ms: i64,
    pub late: LatePolicy,
}

impl Windows {
    /// Event-time windows of `kind`, counting and summing, without lateness, dropping late
    /// records (counted).
    pub fn new(kind: WindowKind) -> Windows {
        Windows {
            kind,
            processing_time: false,
            function: WindowFunction::CountSum,
            allowed_lateness_ms: 0,
            late: LatePolicy::Drop,
        }
    }
}

/// Starts a job.
#[derive(Debug)]
pub struct JobBuilder {
    name: String,
    max_parallelism: MaxParallelism,
    vertices: Vec<Vertex>,
}

impl JobBuilder {
    pub fn new(name: &str) -> JobBuilder {
        JobBuilder { name: name.to_string(), max_parallelism: MaxParallelism::default(), vertices: Vec::new() }
    }

    /// Sets the number of key groups (default 128); it bounds every keyed vertex's parallelism.
    pub fn max_parallelism(mut self, count: u16) -> Result<JobBuilder, BuildError> {
        self.max_parallelism = MaxParallelism::new(count).ok_or(BuildError::MaxParallelism(count))?;
        Ok(self)
    }

    pub fn source(mut self, name: &str, spec: SourceSpec, parallelism: u16) -> Result<Stream, BuildError> {
        spec.validate(name)?;
        let schema = spec.schema();
        let event_time = Some(schema.index_of(spec.event_time_column()).expect("a source names its own column"));
        let id = self.push_vertex(name, parallelism, Some(spec), None)?;
        Ok(Stream { job: self, vertex: id, schema, event_time, has_watermarks: false, key: None })
    }

    /// A source that generates watermarks itself, per split, as `strategy` says: each split
    /// has its own generator, the source's watermark is the minimum over its active splits, idle
    /// splits stop holding it back, and (with an alignment group) splits that run ahead pause.
    pub fn source_with_watermarks(
        self,
        name: &str,
        spec: SourceSpec,
        parallelism: u16,
        strategy: WatermarkStrategy,
    ) -> Result<Stream, BuildError> {
        let mut stream = self.source(name, spec, parallelism)?;
        let watermarks = stream.watermark_spec(name, strategy)?;
        stream.job.vertices[usize::from(stream.vertex.0)].watermarks = Some(watermarks);
        stream.has_watermarks = true;
        Ok(stream)
    }

    fn push_vertex(
        &mut self,
        name: &str,
        parallelism: u16,
        source: Option<SourceSpec>,
        input: Option<(VertexId, Partitioning)>,
    ) -> Result<VertexId, BuildError> {
        let max = PARALLELISM_MAX.min(self.max_parallelism.get());
        if !(1..=max).contains(&parallelism) {
            return Err(BuildError::Parallelism { vertex: name.to_string(), parallelism, max });
        }
        let id = VertexId(self.vertices.len() as u16);
        let chain = Vec::new();
        self.vertices.push(Vertex { id, name: name.to_string(), parallelism, source, watermarks: None, input, chain });
        Ok(id)
    }
}

/// A stream under construction: the job so far, and what is known of the stream's records.
#[derive(Debug)]
pub struct Stream {
    job: JobBuilder,
    vertex: VertexId,
    schema: SchemaRef,
    event_time: Option<usize>,
    has_watermarks: bool,
    key: Option<(usize, KeyType)>,
}

impl Stream {
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn push(&mut self, spec: OperatorSpec) {
        self.job.vertices[usize::from(self.vertex.0)].chain.push(spec);
    }

    fn column(&self, operator: &str, column: &str) -> Result<usize, BuildError> {
        self.schema.index_of(column).map_err(|_| BuildError::ColumnNotFound {
            operator: operator.to_string(),
            column: column.to_string(),
            available: self.schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    fn column_of_type(&self, operator: &str, column: &str, expected: &[DataType]) -> Result<usize, BuildError> {
        let index = self.column(operator, column)?;
        let found = self.schema.field(index).data_type();
        if !expected.contains(found) {
            return Err(BuildError::ColumnType {
                operator: operator.to_string(),
                column: column.to_string(),
                found: found.to_string(),
                expected: expected.iter().map(DataType::to_string).collect::<Vec<_>>().join(" or "),
            });
        }
        Ok(index)
    }

    /// Checks `strategy` against this (source's) stream.
    fn watermark_spec(&self, operator: &str, strategy: WatermarkStrategy) -> Result<SourceWatermarkSpec, BuildError> {
        let invalid = |reason: String| BuildError::Invalid { operator: operator.into(), reason };
        let event_time_index = self.event_time.ok_or(BuildError::NoEventTime { operator: operator.into() })?;
        let punctuation = match &strategy.kind {
            WatermarkKind::BoundedOutOfOrderness { bound_ms } if *bound_ms < 0 => {
                return Err(invalid(format!("out-of-orderness bound {bound_ms} ms < 0")));
            }
            WatermarkKind::BoundedOutOfOrderness { .. } | WatermarkKind::Monotonous => None,
            WatermarkKind::Punctuated { column } => {
                let index = self.column_of_type(operator, column, &[DataType::Boolean, DataType::Int64])?;
                Some(match self.schema.field(index).data_type() {
                    DataType::Boolean => Punctuation::Marker { index },
                    _ => Punctuation::Value { index },
                })
            }
        };
        if strategy.idle_timeout_ms == Some(0) {
            return Err(invalid("idle timeout 0 ms: a split would be idle whenever it has no record at hand".into()));
        }
        if strategy.alignment.as_ref().is_some_and(|group| group.name.is_empty()) {
            return Err(invalid("an alignment group needs a name".into()));
        }
        Ok(SourceWatermarkSpec { strategy, event_time_index, punctuation })
    }

    /// Generates watermarks from the event-time column, trailing the highest time seen by `bound_ms`.
    pub fn assign_watermarks(mut self, bound_ms: i64) -> Result<Stream, BuildError> {
        let operator = "watermarks";
        if self.has_watermarks {
            return Err(BuildError::Invalid {
                operator: operator.into(),
                reason: "the stream already has watermarks (from its source)".into(),
            });
        }
        let event_time_index = self.event_time.ok_or(BuildError::NoEventTime { operator: operator.into() })?;
        if bound_ms < 0 {
            return Err(BuildError::Invalid { operator: operator.into(), reason: format!("bound {bound_ms} ms < 0") });
        }
        self.push(OperatorSpec::Watermarks { event_time_index, bound_ms });
        self.has_watermarks = true;
        Ok(self)
    }

    /// Keeps the rows for which `predicate` is true (column-wise: it maps a batch to a mask).
    pub fn filter(mut self, name: &str, predicate: Predicate) -> Result<Stream, BuildError> {
        self.push(OperatorSpec::Filter { name: name.to_string(), predicate });
        Ok(self)
    }

    /// Keeps the named columns, in the order given.
    pub fn project(mut self, columns: &[&str]) -> Result<Stream, BuildError> {
        let indices = columns.iter().map(|c| self.column("project", c)).collect::<Result<Vec<_>, _>>()?;
        let schema = Arc::new(self.schema.project(&indices).expect("indices checked"));
        self.event_time = self.event_time.and_then(|old| indices.iter().position(|&i| i == old));
        self.key = self.key.and_then(|(old, key_type)| Some((indices.iter().position(|&i| i == old)?, key_type)));
        self.push(OperatorSpec::Project { indices, schema: schema.clone() });
        self.schema = schema;
        Ok(self)
    }

    /// Repartitions by the key group of `column`; the new vertex runs with `parallelism` subtasks.
    pub fn key_by(mut self, column: &str, parallelism: u16) -> Result<Stream, BuildError> {
        let operator = "key-by";
        let key_index = self.column_of_type(operator, column, &[DataType::UInt64, DataType::Int64])?;
        let key_type = KeyType::of(self.schema.field(key_index).data_type()).expect("type checked");
        let partitioning = Partitioning::Hash { key_index, key_type };
        let name = format!("key-by {column}");
        self.vertex = self.job.push_vertex(&name, parallelism, None, Some((self.vertex, partitioning)))?;
        self.key = Some((key_index, key_type));
        Ok(self)
    }

    /// Per key and tumbling event-time window of `size_ms`: the count of records and the sum of `value`.
    /// Output columns: key, window_start, window_end, count (UInt64), sum (Int64).
    pub fn tumbling_window_count_sum(mut self, size_ms: i64, value: &str) -> Result<Stream, BuildError> {
        let operator = "tumbling-window";
        let (key_index, key_type) = self.key.ok_or(BuildError::NotKeyed { operator: operator.into() })?;
        let event_time_index = self.event_time.ok_or(BuildError::NoEventTime { operator: operator.into() })?;
        if !self.has_watermarks {
            return Err(BuildError::NoWatermarks { operator: operator.into() });
        }
        if size_ms <= 0 {
            return Err(BuildError::Invalid { operator: operator.into(), reason: format!("size {size_ms} ms <= 0") });
        }
        let value_index = self.column_of_type(operator, value, &[DataType::Int64])?;
        self.push(OperatorSpec::TumblingWindow(WindowSpec {
            key_index,
            key_type,
            event_time_index,
            value_index,
            size_ms,
        }));
        self.schema = TumblingWindowCountSum::schema(self.schema.field(key_index).clone());
        self.event_time = TumblingWindowCountSum::EVENT_TIME_INDEX;
        self.key = Some((0, key_type));
        Ok(self)
    }

    /// Per key and event-time window (tumbling, sliding or session): the count of records and
    /// the sum of `value`, with `allowed_lateness_ms` and a policy for records later than that
    /// (see [`super::event_window`]). Output columns: key, window_start, window_end, count, sum.
    pub fn windows(
        self,
        kind: WindowKind,
        value: &str,
        allowed_lateness_ms: i64,
        late: LatePolicy,
    ) -> Result<Stream, BuildError> {
        let windows =
            Windows { kind, processing_time: false, function: WindowFunction::CountSum, allowed_lateness_ms, late };
        self.windows_with(value, windows)
    }

    /// Per key and window, on event time or processing time, with incremental aggregation or a
    /// full-window function (see [`super::event_window`]). Output columns: key, window_start,
    /// window_end, count, and the result (`sum`, or the full-window function's name).
    pub fn windows_with(mut self, value: &str, windows: Windows) -> Result<Stream, BuildError> {
        let operator = "windows";
        let (key_index, key_type) = self.key.ok_or(BuildError::NotKeyed { operator: operator.into() })?;
        let time = if windows.processing_time {
            WindowTime::Processing
        } else {
            let event_time_index = self.event_time.ok_or(BuildError::NoEventTime { operator: operator.into() })?;
            if !self.has_watermarks {
                return Err(BuildError::NoWatermarks { operator: operator.into() });
            }
            WindowTime::Event { event_time_index }
        };
        let invalid = |reason: String| BuildError::Invalid { operator: operator.into(), reason };
        if let LatePolicy::SideOutput(name) = &windows.late {
            FileTransactions::validate_name(name).map_err(invalid)?;
        }
        if let WindowFunction::Full(function) = &windows.function {
            FileTransactions::validate_name(function.name()).map_err(invalid)?;
        }
        let value_index = self.column_of_type(operator, value, &[DataType::Int64])?;
        let spec = EventWindowSpec {
            key_index,
            key_type,
            value_index,
            kind: windows.kind,
            time,
            function: windows.function,
            allowed_lateness_ms: windows.allowed_lateness_ms,
            late: windows.late,
        };
        spec.validate().map_err(invalid)?;
        self.schema = spec.schema();
        self.push(OperatorSpec::EventWindows(spec));
        self.event_time = None;
        self.key = Some((0, key_type));
        Ok(self)
    }

    /// Runs a keyed process function on the keyed stream (see [`super::process`]): each subtask
    /// makes its instance with `open`, which declares the function's states in a fresh
    /// [`KeyedState`] and returns the function. `name` names the operator and its checkpoint
    /// files; `side_output` is the file sink of the function's side output, if it has one. The
    /// output has the function's schema and is not keyed.
    pub fn process<F: KeyedProcessFunction>(
        mut self,
        name: &str,
        side_output: Option<&str>,
        open: impl Fn(&mut KeyedState) -> Result<F, StateError> + Send + Sync + 'static,
    ) -> Result<Stream, BuildError> {
        let invalid = |reason: String| BuildError::Invalid { operator: name.into(), reason };
        FileTransactions::validate_name(name).map_err(invalid)?;
        if let Some(side) = side_output {
            FileTransactions::validate_name(side).map_err(invalid)?;
        }
        let (key_index, key_type) = self.key.ok_or(BuildError::NotKeyed { operator: name.into() })?;
        let chain = &self.job.vertices[usize::from(self.vertex.0)].chain;
        if chain.iter().any(|spec| spec.capture_prefix() == Some(name)) {
            return Err(invalid(format!("another keyed operator of this vertex names its checkpoint files {name:?}")));
        }
        let max = self.job.max_parallelism;
        // The output's schema, from an instance over an empty backend.
        let mut probe_state = KeyedState::new(Box::new(HeapBackend::new(KeyGroupRange::all(max))), max);
        let probe = open(&mut probe_state).map_err(|error| invalid(format!("declaring its states: {error}")))?;
        if probe.side_output_schema().is_some() != side_output.is_some() {
            return Err(invalid("the function's side output and the job's side output sink must both be given".into()));
        }
        let spec = ProcessSpec {
            name: name.to_string(),
            key_index,
            key_type,
            event_time_index: self.event_time,
            side_output: side_output.map(str::to_string),
        };
        let open = Arc::new(open);
        let instance_spec = spec.clone();
        let factory = ProcessFactory(Arc::new(move |subtask, max, backend| {
            let open = open.clone();
            let operator =
                KeyedProcessOperator::new(instance_spec.clone(), max, backend, subtask, |state| open(state))?;
            Ok(Box::new(operator) as Box<dyn Operator>)
        }));
        self.push(OperatorSpec::Process { spec, factory });
        self.schema = probe.output_schema();
        self.event_time = None;
        self.key = None;
        Ok(self)
    }

    /// Per key, over the whole input, statistics of `value` kept in every kind of keyed state
    /// (see [`KeyedStats`]), emitted at the end of input. Output columns: key, count, sum, max,
    /// buckets, bucket_checksum, multiples, multiples_sum.
    pub fn keyed_stats(mut self, value: &str) -> Result<Stream, BuildError> {
        let operator = "keyed-stats";
        let (key_index, key_type) = self.key.ok_or(BuildError::NotKeyed { operator: operator.into() })?;
        let value_index = self.column_of_type(operator, value, &[DataType::Int64])?;
        self.push(OperatorSpec::KeyedStats(KeyedStatsSpec { key_index, key_type, value_index }));
        self.schema = KeyedStats::schema(self.schema.field(key_index).clone());
        self.event_time = None;
        self.key = Some((0, key_type));
        Ok(self)
    }

    /// Ends the job in a sink that commits its output as Arrow IPC files under `output/<name>/`.
    pub fn sink_files(self, name: &str) -> Result<JobGraph, BuildError> {
        self.finish(name, OperatorSpec::Sink { name: name.to_string() })
    }

    /// Ends the job in a user's transactional sink (one instance per subtask from `factory`),
    /// committed exactly once: through checkpoints when the job takes them, at the end otherwise.
    pub fn sink(self, name: &str, factory: SinkFactory) -> Result<JobGraph, BuildError> {
        self.finish(name, OperatorSpec::TransactionalSink { name: name.to_string(), factory })
    }

    fn finish(mut self, name: &str, sink: OperatorSpec) -> Result<JobGraph, BuildError> {
        FileTransactions::validate_name(name)
            .map_err(|reason| BuildError::Invalid { operator: name.into(), reason })?;
        // A side output writes beside the job's sink, in the same subtasks: its name must differ.
        let side_outputs = self.job.vertices.iter().flat_map(|vertex| vertex.chain.iter());
        for spec in side_outputs {
            if let Some(side) = spec.side_output() {
                if side == name {
                    let reason = format!("the late records' side output and the job's sink are both named {name:?}");
                    return Err(BuildError::Invalid { operator: name.into(), reason });
                }
            }
        }
        self.push(sink);
        let job = self.job;
        let graph = JobGraph { name: job.name, max_parallelism: job.max_parallelism, vertices: job.vertices };
        graph.validate()?;
        Ok(graph)
    }
}

impl JobGraph {
    /// The names of the job's file sinks: its sink, and the side outputs of its operators.
    pub fn file_sinks(&self) -> Vec<String> {
        let mut names = Vec::new();
        for spec in self.vertices.iter().flat_map(|vertex| vertex.chain.iter()) {
            match spec {
                OperatorSpec::Sink { name } => names.push(name.clone()),
                spec => names.extend(spec.side_output().map(str::to_string)),
            }
        }
        names
    }

    fn validate(&self) -> Result<(), BuildError> {
        for vertex in &self.vertices {
            if let Some((input, Partitioning::Forward)) = vertex.input {
                let upstream = &self.vertices[usize::from(input.0)];
                if upstream.parallelism != vertex.parallelism {
                    return Err(BuildError::Invalid {
                        operator: vertex.name.clone(),
                        reason: format!("a forward edge needs equal parallelism, not {}", upstream.parallelism),
                    });
                }
            }
        }
        Ok(())
    }

    /// The key groups of a subtask of a keyed vertex.
    pub fn key_groups_of(&self, subtask: SubtaskId) -> KeyGroupRange {
        let parallelism = self.vertices[usize::from(subtask.vertex.0)].parallelism;
        self.max_parallelism.range_of(subtask.index, parallelism)
    }

    pub fn vertex(&self, id: VertexId) -> &Vertex {
        &self.vertices[usize::from(id.0)]
    }

    /// Every subtask, by vertex then index.
    pub fn subtasks(&self) -> impl Iterator<Item = SubtaskId> + '_ {
        self.vertices.iter().flat_map(|v| (0..v.parallelism).map(move |index| SubtaskId { vertex: v.id, index }))
    }
}

/// A logical channel of the physical plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    pub from: SubtaskId,
    pub to: SubtaskId,
    /// The position of this channel among the receiving subtask's inputs.
    pub input_index: u16,
}

/// One output edge of a subtask: how to partition, and the channel to each receiving subtask.
#[derive(Clone, Debug)]
pub struct OutputSpec {
    pub partitioning: Partitioning,
    /// Indexed by the receiving subtask's index (for `Forward`, exactly one channel).
    pub channels: Vec<ChannelId>,
}

/// The job expanded into subtasks and channels, and placed onto `node_count` nodes.
#[derive(Clone, Debug)]
pub struct PhysicalPlan {
    pub graph: JobGraph,
    pub node_count: u16,
    pub channels: Vec<ChannelSpec>,
    pub inputs: BTreeMap<SubtaskId, Vec<ChannelId>>,
    pub outputs: BTreeMap<SubtaskId, Vec<OutputSpec>>,
}

impl PhysicalPlan {
    /// Expands `graph`; subtask `i` of every vertex runs on node `i % node_count`.
    pub fn new(graph: JobGraph, node_count: u16) -> PhysicalPlan {
        assert!(node_count >= 1, "a plan needs a node");
        let mut plan = PhysicalPlan {
            inputs: graph.subtasks().map(|s| (s, Vec::new())).collect(),
            outputs: graph.subtasks().map(|s| (s, Vec::new())).collect(),
            graph,
            node_count,
            channels: Vec::new(),
        };
        for vertex in plan.graph.vertices.clone() {
            let Some((upstream, partitioning)) = vertex.input else {
                continue;
            };
            let upstream_parallelism = plan.graph.vertex(upstream).parallelism;
            for from_index in 0..upstream_parallelism {
                let from = SubtaskId { vertex: upstream, index: from_index };
                let targets: Vec<u16> = match partitioning {
                    Partitioning::Forward => vec![from_index],
                    Partitioning::Hash { .. } => (0..vertex.parallelism).collect(),
                };
                let channels = targets
                    .iter()
                    .map(|&to_index| plan.add_channel(from, SubtaskId { vertex: vertex.id, index: to_index }))
                    .collect();
                plan.outputs.get_mut(&from).expect("every subtask").push(OutputSpec { partitioning, channels });
            }
        }
        plan
    }

    fn add_channel(&mut self, from: SubtaskId, to: SubtaskId) -> ChannelId {
        let id = ChannelId(self.channels.len() as u32);
        let inputs = self.inputs.get_mut(&to).expect("every subtask");
        self.channels.push(ChannelSpec { from, to, input_index: inputs.len() as u16 });
        inputs.push(id);
        id
    }

    pub fn node_of(&self, subtask: SubtaskId) -> u16 {
        subtask.index % self.node_count
    }

    /// Where the state of `operator` for `key` lives: the subtask of its (keyed) vertex that
    /// holds the key's group, and that subtask's node.
    pub fn locate_key(&self, operator: &str, key: u64) -> Result<(SubtaskId, u16), String> {
        let vertex = self
            .graph
            .vertices
            .iter()
            .find(|vertex| vertex.chain.iter().any(|spec| spec.name() == operator))
            .ok_or_else(|| format!("the job has no operator {operator:?}"))?;
        if !vertex.chain.iter().any(|spec| spec.name() == operator && spec.is_stateful()) {
            return Err(format!("operator {operator:?} keeps no keyed state"));
        }
        let key_group = self.graph.max_parallelism.key_group_of_u64(key);
        let index = self.graph.max_parallelism.subtask_of(key_group, vertex.parallelism);
        let subtask = SubtaskId { vertex: vertex.id, index };
        Ok((subtask, self.node_of(subtask)))
    }

    pub fn channel(&self, id: ChannelId) -> &ChannelSpec {
        &self.channels[id.0 as usize]
    }
}

/// The schema of a stream's field, for building output schemas.
pub(crate) fn field(name: &str, data_type: DataType) -> Field {
    Field::new(name, data_type, false)
}

pub(crate) fn schema_of(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::watermarks::WatermarkStrategy;

    fn generator() -> SourceSpec {
        SourceSpec::Generator { record_count: 10, batch_size: 5, keys: Default::default(), splits: Default::default() }
    }

    fn with(strategy: WatermarkStrategy) -> Result<Stream, BuildError> {
        JobBuilder::new("j").source_with_watermarks("gen", generator(), 2, strategy)
    }

    // Goal: a watermark strategy is checked against the source's schema when the job is built:
    // a punctuation column must exist and be Boolean or Int64, bounds and idle timeouts must make
    // sense, and a stream with watermarks from its source takes no second generator.
    // Method: build jobs with each mistake and with valid strategies; compare the errors.
    #[test]
    fn source_watermark_strategies_are_checked_when_built() {
        let stream = with(WatermarkStrategy::punctuated("ts_ms").with_idleness(5).with_alignment("g", 100)).unwrap();
        let spec = stream.job.vertices[0].watermarks.clone().unwrap();
        assert_eq!(spec.punctuation, Some(Punctuation::Value { index: 2 }));
        assert_eq!(spec.event_time_index, 2);
        assert!(matches!(
            with(WatermarkStrategy::punctuated("key")),
            Err(BuildError::ColumnType { column, found, .. }) if column == "key" && found == "UInt64"
        ));
        assert!(matches!(with(WatermarkStrategy::punctuated("nope")), Err(BuildError::ColumnNotFound { .. })));
        for strategy in [
            WatermarkStrategy::bounded_out_of_orderness(-1),
            WatermarkStrategy::monotonous().with_idleness(0),
            WatermarkStrategy::monotonous().with_alignment("", 10),
        ] {
            assert!(matches!(with(strategy.clone()), Err(BuildError::Invalid { .. })), "{strategy:?}");
        }
        let error = with(WatermarkStrategy::monotonous()).unwrap().assign_watermarks(10).unwrap_err();
        assert!(error.to_string().contains("already has watermarks"), "{error}");
        let job = with(WatermarkStrategy::bounded_out_of_orderness(5)).unwrap();
        let window = job.key_by("key", 2).unwrap().tumbling_window_count_sum(10, "value");
        assert!(window.is_ok(), "windows take the source's watermarks");
    }
}
