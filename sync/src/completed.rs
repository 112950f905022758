//! The notification of completed checkpoints, from the coordinator's side of a process to its
//! nodes.
//!
//! The coordinator (or a worker's dispatcher) [`publish`](Completed::publish)es checkpoint `n`
//! once it is durable; each node reads it through its own [`CompletedCursor`] and lets its sinks
//! commit. A later completion subsumes the earlier ones (Flink's semantics: completing `n`
//! commits every epoch up to `n`), so a node that was busy while `n` and `n + 1` completed sees
//! only `n + 1`.
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): every node takes the newest
//! completion exactly once and never one twice; what it takes only grows; it never takes a
//! checkpoint that was not published, and it sees everything the publisher did before publishing
//! (the manifest made durable), so no sink commits before completion; a node waiting in
//! [`CompletedCursor::wait`] wakes for every new completion; a node that learns of anything the
//! publisher sent after publishing (the driver's `Stop`) finds the completion when it looks.

use crate::shim::atomic::{AtomicU64, Ordering};
use crate::signal::Signal;

/// The newest completed checkpoint of a process (0: none yet; checkpoint ids start at 1).
pub struct Completed {
    newest: AtomicU64,
    changed: Signal,
}

/// What one node has taken of a [`Completed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletedCursor {
    taken: u64,
}

impl Completed {
    pub fn new() -> Completed {
        Completed { newest: AtomicU64::new(0), changed: Signal::new() }
    }

    /// Announces that `checkpoint` is complete and durable; an older one than the newest changes
    /// nothing.
    pub fn publish(&self, checkpoint: u64) {
        assert!(checkpoint > 0, "checkpoint ids start at 1");
        // Release: whoever reads it sees what made it durable.
        let before = self.newest.fetch_max(checkpoint, Ordering::AcqRel);
        if checkpoint > before {
            self.changed.notify();
        }
    }

    /// A cursor that has taken nothing yet.
    pub fn cursor(&self) -> CompletedCursor {
        CompletedCursor { taken: 0 }
    }

    fn newest(&self) -> u64 {
        // Acquire: pairs with `publish`.
        self.newest.load(Ordering::Acquire)
    }
}

impl Default for Completed {
    fn default() -> Completed {
        Completed::new()
    }
}

impl std::fmt::Debug for Completed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completed").field("newest", &self.newest()).finish()
    }
}

impl CompletedCursor {
    /// The newest completed checkpoint, if it is newer than what this cursor took before.
    pub fn take(&mut self, completed: &Completed) -> Option<u64> {
        let newest = completed.newest();
        if newest <= self.taken {
            return None;
        }
        self.taken = newest;
        Some(newest)
    }

    /// Completes once a checkpoint newer than what this cursor took is published. Cancel-safe.
    pub async fn wait(&self, completed: &Completed) {
        loop {
            // Registered before looking, so that a publish in between wakes it.
            let notified = completed.changed.notified();
            if completed.newest() > self.taken {
                return;
            }
            notified.await;
        }
    }

    /// The newest checkpoint this cursor took (0: none).
    pub fn taken(&self) -> u64 {
        self.taken
    }
}
