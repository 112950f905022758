//! A wake-up that an async waiter cannot miss: an event count.
//!
//! Every primitive of this crate wakes its waiters through a `Signal`. The waiting side follows
//! one pattern: take a [`Notified`] *first*, then look at the shared state, and await the
//! `Notified` only if there was nothing to do. A `Notified` counts as registered from the moment
//! it is made (it remembers the signal's epoch), so a [`Signal::notify`] that happens after it
//! was made and before it is awaited still completes it: a change made between "looked" and
//! "waits" is never lost. This is the contract of tokio's `Notify::notify_waiters`, written here
//! so that loom can check it together with the primitives that rely on it (`tests/loom.rs`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::shim::{lock, Mutex};

/// Live [`Notified`]s that were polled and wait on one signal, at most. A task waits on a few at
/// a time; a `Notified` that is dropped leaves the list at once.
pub const WAITERS_MAX: usize = 4096;

/// Wakes every [`Notified`] made before the call. See the module doc for the pattern.
pub struct Signal {
    state: Mutex<SignalState>,
}

struct SignalState {
    /// Incremented by every `notify`: a `Notified` made at another epoch is complete.
    epoch: u64,
    /// The polled `Notified`s of the current epoch, by key.
    waiters: Vec<(u64, Waker)>,
    key_next: u64,
}

impl Signal {
    pub fn new() -> Signal {
        Signal { state: Mutex::new(SignalState { epoch: 0, waiters: Vec::new(), key_next: 0 }) }
    }

    /// A future that completes at the next `notify` after this call (registered now, polled or
    /// not).
    pub fn notified(&self) -> Notified<'_> {
        let epoch = lock(&self.state).epoch;
        Notified { signal: self, epoch, key: None }
    }

    /// Completes every `Notified` made before this call.
    pub fn notify(&self) {
        let waiters = {
            let mut state = lock(&self.state);
            state.epoch = state.epoch.wrapping_add(1);
            std::mem::take(&mut state.waiters)
        };
        // Woken outside the lock: a waker may run its task on this thread.
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    /// Polled `Notified`s waiting now (for tests: a dropped one must not stay).
    pub fn waiter_count(&self) -> usize {
        lock(&self.state).waiters.len()
    }
}

impl Default for Signal {
    fn default() -> Signal {
        Signal::new()
    }
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("Signal").field("epoch", &state.epoch).field("waiter_count", &state.waiters.len()).finish()
    }
}

/// The future of [`Signal::notified`]. Cancel-safe: dropping it only unregisters it.
#[must_use = "a Notified does nothing unless awaited"]
pub struct Notified<'a> {
    signal: &'a Signal,
    /// The signal's epoch when this was made.
    epoch: u64,
    /// This waiter's key in the signal's list, once polled and until complete.
    key: Option<u64>,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut state = lock(&this.signal.state);
        if state.epoch != this.epoch {
            // `notify` took the whole list when it changed the epoch: this waiter is not in it.
            this.key = None;
            return Poll::Ready(());
        }
        match this.key {
            Some(key) => {
                let Some((_, waker)) = state.waiters.iter_mut().find(|(k, _)| *k == key) else {
                    unreachable!("waiter {key} left the list of epoch {} without a notify", this.epoch)
                };
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            None => {
                let key = state.key_next;
                state.key_next += 1;
                state.waiters.push((key, cx.waker().clone()));
                assert!(state.waiters.len() <= WAITERS_MAX, "{} waiters on one signal", state.waiters.len());
                this.key = Some(key);
            }
        }
        Poll::Pending
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            lock(&self.signal.state).waiters.retain(|(k, _)| *k != key);
        }
    }
}
