//! Work that two threads may both need done first, done once by whichever comes first.
//!
//! The RocksDB backend's capture leaves one piece of work between the task and the
//! asynchronous writer: RocksDB's own checkpoint, which must be taken before the backend writes
//! to RocksDB again (else the checkpoint sees writes from after the barrier). The writer needs it
//! to upload files; the backend needs it before its next write. Whoever [`settle`](Settle::settle)s
//! first does it, holding the lock meanwhile; the other waits for it or finds it done.
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): the work runs exactly once; every
//! `settle` returns its result, and only after it ran (so what a caller does after `settle` is
//! never seen by the work); neither caller waits forever for the other.

use crate::shim::{lock, Mutex};

pub struct Settle<W, R> {
    state: Mutex<SettleState<W, R>>,
}

enum SettleState<W, R> {
    /// The work, until someone takes it.
    Unsettled(W),
    Settled(R),
    /// Only while a `settle` runs the work (the lock is held meanwhile) — or after it panicked.
    Running,
}

impl<W, R: Clone> Settle<W, R> {
    pub fn new(work: W) -> Settle<W, R> {
        Settle { state: Mutex::new(SettleState::Unsettled(work)) }
    }

    /// Runs `run` on the work unless it ran; its result either way.
    pub fn settle(&self, run: impl FnOnce(W) -> R) -> R {
        let mut state = lock(&self.state);
        match std::mem::replace(&mut *state, SettleState::Running) {
            SettleState::Unsettled(work) => {
                let result = run(work);
                *state = SettleState::Settled(result.clone());
                result
            }
            SettleState::Settled(result) => {
                *state = SettleState::Settled(result.clone());
                result
            }
            SettleState::Running => unreachable!("settling work whose run panicked"),
        }
    }

    /// Whether the work ran.
    pub fn is_settled(&self) -> bool {
        matches!(*lock(&self.state), SettleState::Settled(_))
    }
}
