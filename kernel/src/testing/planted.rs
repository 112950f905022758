//! Planted bugs (feature `testing`): deliberate protocol bugs that the simulator must find.
//!
//! A bug is switched on for the current thread ([`set`]) and read by the kernel through the
//! `planted!` macro, which is `false` without the `testing` feature: normal builds carry no trace
//! of them. Each sweep thread runs its seeds with its own set.

use std::cell::Cell;

/// A deliberate bug, named by what it breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PlantedBug {
    /// The sink commits an epoch's output at its barrier, before the checkpoint completed.
    SinkCommitsEarly,
    /// Input gates never hold an input after its barrier: snapshots include later elements.
    BarrierNotAligned,
    /// Recovery does not commit the restored checkpoint's pre-committed output.
    RecoveryForgetsCommit,
    /// Snapshot files are written without fsync (their directory is synced).
    SnapshotWithoutFsync,
    /// A source records its offset after reading the batch that follows the barrier.
    SourceOffsetAfterBarrier,
    /// The coordinator announces a checkpoint complete before its manifest is durable.
    AnnounceBeforeDurable,
    /// A source that goes idle forgets the watermark it emitted: back from idleness behind
    /// the others, a split sends the source's watermark back.
    IdleForgetsWatermark,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 7] = [
        PlantedBug::SinkCommitsEarly,
        PlantedBug::BarrierNotAligned,
        PlantedBug::RecoveryForgetsCommit,
        PlantedBug::SnapshotWithoutFsync,
        PlantedBug::SourceOffsetAfterBarrier,
        PlantedBug::AnnounceBeforeDurable,
        PlantedBug::IdleForgetsWatermark,
    ];

    /// The name on the command line (`--planted <name>`).
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::SinkCommitsEarly => "sink-commits-early",
            PlantedBug::BarrierNotAligned => "barrier-not-aligned",
            PlantedBug::RecoveryForgetsCommit => "recovery-forgets-commit",
            PlantedBug::SnapshotWithoutFsync => "snapshot-without-fsync",
            PlantedBug::SourceOffsetAfterBarrier => "source-offset-after-barrier",
            PlantedBug::AnnounceBeforeDurable => "announce-before-durable",
            PlantedBug::IdleForgetsWatermark => "idle-forgets-watermark",
        }
    }

    pub fn from_name(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|bug| bug.name() == name)
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

thread_local! {
    static PLANTED: Cell<u32> = const { Cell::new(0) };
}

/// Switches exactly `bugs` on for this thread (none: the kernel as written).
pub fn set(bugs: &[PlantedBug]) {
    PLANTED.with(|planted| planted.set(bugs.iter().fold(0, |set, bug| set | bug.bit())));
}

/// Whether `bug` is on for this thread.
pub fn is_on(bug: PlantedBug) -> bool {
    PLANTED.with(|planted| planted.get() & bug.bit() != 0)
}

/// Switches the bugs on for as long as the guard lives.
pub struct Planted(());

impl Planted {
    pub fn new(bugs: &[PlantedBug]) -> Planted {
        set(bugs);
        Planted(())
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        set(&[]);
    }
}
