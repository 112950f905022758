//! Dataflow: the job graph, its operators, and how they process elements column-wise.
//!
//! A job is a chain of vertices ([`graph`]); each vertex runs as `parallelism` subtasks, each a source
//! or an input gate followed by a chain of [`Operator`]s. Operators see one merged stream: the gate
//! of their subtask has already combined watermarks, idleness and end-of-input over all inputs.

pub mod event_window;
pub mod exchange;
pub mod graph;
pub mod keyed_stats;
pub mod map;
pub mod process;
pub mod sink;
pub mod source;
pub mod watermark;
pub mod window;

use arrow_array::RecordBatch;
use arrow_schema::ArrowError;

use crate::checkpoint::manifest::TaskSnapshot;
use crate::element::{CheckpointId, Element};
use crate::env::{Storage, StorageError};
use crate::state::{SnapshotWrite, StateError};
use crate::time::{EventTime, Instant};

pub use graph::{JobBuilder, JobGraph, PhysicalPlan, Stream, SubtaskId, VertexId};

/// Why an operator failed. Each is the world failing or bad input, never a bug in Sabot.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A record that the operator cannot process (a null key, an overflowing sum, …).
    #[error("malformed record: {0}")]
    Malformed(String),
    /// Elements that break the stream protocol (a watermark going back, data after end, …).
    #[error("stream protocol violated: {0}")]
    Protocol(String),
}

/// Per-operator counters, summed over subtasks for progress and summaries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OperatorMetrics {
    pub records_in: u64,
    pub records_out: u64,
    /// Records that arrived behind the watermark for a window that had already fired.
    pub records_late_dropped: u64,
    /// Late records that updated a window within its allowed lateness (and fired it again).
    pub records_late_updated: u64,
    /// Late records sent to a side output.
    pub records_late_side_output: u64,
    pub windows_fired: u64,
    pub state_size_bytes: u64,
}

impl OperatorMetrics {
    pub fn add(&mut self, other: &OperatorMetrics) {
        self.records_in += other.records_in;
        self.records_out += other.records_out;
        self.records_late_dropped += other.records_late_dropped;
        self.records_late_updated += other.records_late_updated;
        self.records_late_side_output += other.records_late_side_output;
        self.windows_fired += other.windows_fired;
        self.state_size_bytes += other.state_size_bytes;
    }
}

/// What an operator may touch while it handles an element.
pub struct Context<'a> {
    pub now: Instant,
    pub storage: &'a mut dyn Storage,
    pub subtask: SubtaskId,
    /// The job takes checkpoints: sinks commit only what completed checkpoints cover, also at
    /// the end of input (the final snapshot, `CheckpointId::END_OF_INPUT`).
    pub checkpointing: bool,
    output: &'a mut Vec<Element>,
}

impl<'a> Context<'a> {
    /// Sets whether the job takes checkpoints (off by default).
    pub fn with_checkpointing(mut self, checkpointing: bool) -> Self {
        self.checkpointing = checkpointing;
        self
    }

    pub fn new(now: Instant, storage: &'a mut dyn Storage, subtask: SubtaskId, output: &'a mut Vec<Element>) -> Self {
        Context { now, storage, subtask, checkpointing: false, output }
    }

    /// Hands an element to the next operator of the chain (or the subtask's outputs).
    #[inline]
    pub fn emit(&mut self, element: Element) {
        self.output.push(element);
    }
}

/// One step of a chain. Processes a merged, FIFO stream of elements.
pub trait Operator: Send {
    fn name(&self) -> &str;

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError>;

    /// The merged input watermark advanced. The default forwards it.
    fn on_watermark(&mut self, context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        context.emit(Element::Watermark(watermark));
        Ok(())
    }

    /// When the operator next needs [`Operator::on_processing_time`]: its earliest
    /// processing-time timer. The default needs none.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// Processing time reached `context.now`, at or after [`Operator::poll_timeout`]: fire what
    /// is due. Called by the node between elements, never during one.
    fn on_processing_time(&mut self, _context: &mut Context<'_>) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Every input ended: emit what is left. `End` itself is forwarded after this returns.
    fn on_end(&mut self, _context: &mut Context<'_>) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Barrier `checkpoint` reached this operator, after every element before it: write what the
    /// operator must keep for the checkpoint (synced) and say what was written. The default keeps
    /// nothing.
    fn on_barrier(
        &mut self,
        _context: &mut Context<'_>,
        _checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        Ok(OperatorSnapshot::default())
    }

    /// Checkpoint `checkpoint` is complete and durable (sinks commit what it covers).
    fn on_checkpoint_complete(
        &mut self,
        _context: &mut Context<'_>,
        _checkpoint: CheckpointId,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Restores from the snapshots that every subtask of this operator's vertex took for a
    /// completed checkpoint (all of them: after rescaling, a subtask's key groups may come from
    /// any). Called once, before the first element.
    fn restore(&mut self, _context: &mut Context<'_>, _snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Queryable state: the rows of the live state this operator holds for `key` (as the
    /// key-group hash takes it), including the effect of records whose output no checkpoint
    /// committed yet; `None` if the operator has no queryable state. It only reads.
    fn query(&mut self, _key: u64) -> Result<Option<RecordBatch>, OperatorError> {
        Ok(None)
    }

    fn metrics(&self) -> OperatorMetrics;
}

/// What an operator wrote for a checkpoint.
#[derive(Default)]
pub struct OperatorSnapshot {
    /// Files the checkpoint owns (deleted when it is discarded).
    pub files: Vec<String>,
    /// Pre-committed output, committed when the checkpoint completes.
    pub pending_output: Vec<String>,
    /// The asynchronous part: what the driver writes durably (write, sync file, sync directory)
    /// while the task goes on; the task acknowledges once it is written.
    pub writes: Vec<Box<dyn SnapshotWrite>>,
}

impl std::fmt::Debug for OperatorSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSnapshot")
            .field("files", &self.files)
            .field("pending_output", &self.pending_output)
            .field("writes", &self.writes.len())
            .finish()
    }
}

/// Writes a small integer durably, with a checksum: operator metadata of a checkpoint.
pub fn write_u64_file(storage: &mut dyn Storage, path: &str, value: u64) -> Result<(), StorageError> {
    storage.write(path, &u64_file_bytes(value))?;
    storage.sync_file(path)
}

/// The bytes of a small checksummed integer file (what [`read_u64_file`] reads).
pub fn u64_file_bytes(value: u64) -> Vec<u8> {
    let mut bytes = value.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&value.to_le_bytes()).to_le_bytes());
    bytes
}

/// Reads what [`write_u64_file`] wrote; a damaged file is an error naming it.
pub fn read_u64_file(storage: &mut dyn Storage, path: &str) -> Result<u64, OperatorError> {
    let bytes = storage.read(path)?;
    let corrupt = || OperatorError::State(StateError::Corrupt { what: format!("checkpoint metadata file {path}") });
    let (value, crc) = bytes.split_at_checked(8).filter(|(_, crc)| crc.len() == 4).ok_or_else(corrupt)?;
    if crc32fast::hash(value).to_le_bytes() != crc {
        return Err(corrupt());
    }
    Ok(u64::from_le_bytes(value.try_into().expect("eight bytes")))
}

/// How far a source has read one split of its input: a replayable part that can move between
/// subtasks (rescaling). Split ids are the source's own; positions count records read.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SplitPosition {
    pub split: u64,
    pub position: u64,
}

/// Rows of a batch that came from one split: `rows` consecutive rows, in batch order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRun {
    pub split: u64,
    pub rows: u32,
}

/// Where one split of a source stands now: what idleness detection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitStatus {
    pub split: u64,
    /// It has records to read now (whether or not alignment lets the source read them).
    pub available: bool,
    /// It has no records left.
    pub ended: bool,
}

/// What a source read.
#[derive(Debug)]
pub enum SourcePoll {
    /// Records; `runs` say which split each run of rows came from, in order, covering the batch.
    Batch { batch: RecordBatch, runs: smallvec::SmallVec<[SplitRun; 2]> },
    /// Nothing now: every split with records left is paused or has none available yet. Ask
    /// again at `Source::poll_timeout`, or when alignment resumes a split.
    Pending,
    /// The end of the input: every split ended.
    End,
}

impl SourcePoll {
    /// The records read, if any.
    pub fn into_batch(self) -> Option<RecordBatch> {
        match self {
            SourcePoll::Batch { batch, .. } => Some(batch),
            SourcePoll::Pending | SourcePoll::End => None,
        }
    }
}

/// A replayable source of batches for one subtask, reading one or more splits.
pub trait Source: Send {
    fn name(&self) -> &str;
    /// The next batch from splits that are not in `paused` (watermark alignment).
    fn poll_batch(&mut self, now: Instant, paused: &[u64]) -> Result<SourcePoll, OperatorError>;
    /// Pushes the status of each of its splits at `now`.
    fn split_statuses(&self, now: Instant, out: &mut Vec<SplitStatus>);
    /// When a split without available records may have some (the node asks again then).
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    /// Where each of its splits stands: what a checkpoint records.
    fn positions(&self) -> Vec<SplitPosition>;
    /// Reads exactly `positions` from now on (splits recorded by any subtask of the source, at
    /// any parallelism), replacing the splits it had.
    fn restore(&mut self, positions: &[SplitPosition]) -> Result<(), OperatorError>;
    fn metrics(&self) -> OperatorMetrics;
}
