//! What a stream carries, in FIFO order per channel.

use arrow_array::RecordBatch;

use crate::time::EventTime;

/// A checkpoint's identity; checkpoint ids grow by one per triggered checkpoint.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// The snapshot a task takes when it has processed all of its input: its final state and
    /// output, made durable and committed by the job's final checkpoint.
    pub const END_OF_INPUT: CheckpointId = CheckpointId(u64::MAX);
}

/// How operators with several inputs treat a barrier (DESIGN.md §4, step 3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum BarrierKind {
    /// Hold an input after its barrier until every input delivered it.
    Aligned,
    /// Snapshot at the first barrier and keep the overtaken in-flight elements with the snapshot.
    Unaligned,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Barrier {
    pub checkpoint: CheckpointId,
    pub kind: BarrierKind,
}

/// One element of a stream.
#[derive(Clone, Debug)]
pub enum Element {
    /// Records, column-wise; every batch of a stream has that stream's schema.
    Batch(RecordBatch),
    /// No record with an event time below this follows on this channel.
    Watermark(EventTime),
    /// Cuts the stream for a checkpoint.
    Barrier(Barrier),
    /// The sender has no data for now: do not let this channel hold back the watermark.
    Idle,
    /// The sender has data again after `Idle`.
    Active,
    /// Nothing follows on this channel.
    End,
}

impl Element {
    /// A short name for messages and traces.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Element::Batch(_) => "batch",
            Element::Watermark(_) => "watermark",
            Element::Barrier(_) => "barrier",
            Element::Idle => "idle",
            Element::Active => "active",
            Element::End => "end",
        }
    }
}
