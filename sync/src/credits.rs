//! Credit-based flow control between processes, as the tasks of one process share it.
//!
//! A sending process may have at most `window` elements of one channel that the receiving node
//! has not taken yet. [`SendCredits`] is the sender's side, shared by its nodes' endpoints (which
//! take a credit per element) and its connections' readers (which add the credits a peer grants
//! back, and mark a peer lost). [`ReceiveCredits`] is the receiver's side, shared by the readers
//! (which count each element received, refusing one beyond the window) and the endpoints (which
//! grant back what their node took).
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): a channel never has more than
//! `window` elements sent and not granted back; an endpoint waiting in
//! [`SendCredits::writable`] wakes for every grant and for the loss of the peer; a grant or an
//! element beyond the window is the peer's protocol error (`Err`), never an overflow.

use std::collections::BTreeMap;

use crate::shim::{lock, Mutex};
use crate::signal::Signal;

/// The sender's side: credits per channel `K`, and the peers `P` lost, with why.
pub struct SendCredits<K, P> {
    state: Mutex<SendState<K, P>>,
    /// Notified by every grant and every loss.
    changed: Signal,
    window: u32,
}

struct SendState<K, P> {
    available: BTreeMap<K, u32>,
    lost: BTreeMap<P, String>,
}

/// The receiver's side: elements received and not granted back, per channel `K`.
pub struct ReceiveCredits<K> {
    outstanding: Mutex<BTreeMap<K, u32>>,
    window: u32,
}

/// What a peer sent beyond the window: its protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeyondWindow {
    pub window: u32,
}

impl<K: Ord, P: Ord> SendCredits<K, P> {
    /// A full window for each of `channels`.
    pub fn new(window: u32, channels: impl IntoIterator<Item = K>) -> SendCredits<K, P> {
        assert!(window > 0, "a window of 0 credits");
        let available = channels.into_iter().map(|channel| (channel, window)).collect();
        SendCredits {
            state: Mutex::new(SendState { available, lost: BTreeMap::new() }),
            changed: Signal::new(),
            window,
        }
    }

    /// Takes a credit of `channel` for one element; `false` when none is left.
    pub fn try_take(&self, channel: &K) -> bool {
        let mut state = lock(&self.state);
        let Some(available) = state.available.get_mut(channel) else {
            unreachable!("taking a credit of a channel that does not leave this process")
        };
        if *available == 0 {
            return false;
        }
        *available -= 1;
        true
    }

    /// Adds the `credits` the receiver granted back for `channel`.
    pub fn grant(&self, channel: &K, credits: u32) -> Result<(), BeyondWindow> {
        {
            let mut state = lock(&self.state);
            let Some(available) = state.available.get_mut(channel) else {
                unreachable!("a grant for a channel the reader did not check")
            };
            let window = self.window;
            *available = available.checked_add(credits).filter(|c| *c <= window).ok_or(BeyondWindow { window })?;
        }
        self.changed.notify();
        Ok(())
    }

    /// Marks `peer` lost (the first reason stays): its channels' waits end.
    pub fn lose(&self, peer: P, reason: String) {
        lock(&self.state).lost.entry(peer).or_insert(reason);
        self.changed.notify();
    }

    /// Completes once `channel` has a credit (another endpoint may take it first: callers retry
    /// `try_take`), or with the reason once `peer`, its receiver's process, is lost. Cancel-safe.
    pub async fn writable(&self, channel: &K, peer: &P) -> Result<(), String> {
        loop {
            // Registered before looking, so that a grant or loss in between wakes it.
            let notified = self.changed.notified();
            {
                let state = lock(&self.state);
                if let Some(reason) = state.lost.get(peer) {
                    return Err(reason.clone());
                }
                if state.available.get(channel).copied().unwrap_or(0) > 0 {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Credits of `channel` left now (for tests).
    pub fn available(&self, channel: &K) -> u32 {
        lock(&self.state).available.get(channel).copied().unwrap_or(0)
    }
}

impl<K: Ord> ReceiveCredits<K> {
    /// Nothing outstanding on each of `channels`.
    pub fn new(window: u32, channels: impl IntoIterator<Item = K>) -> ReceiveCredits<K> {
        assert!(window > 0, "a window of 0 credits");
        ReceiveCredits { outstanding: Mutex::new(channels.into_iter().map(|c| (c, 0)).collect()), window }
    }

    /// Counts an element received on `channel`; `Err` if the sender went beyond the window.
    pub fn receive(&self, channel: &K) -> Result<(), BeyondWindow> {
        let mut outstanding = lock(&self.outstanding);
        let Some(count) = outstanding.get_mut(channel) else {
            unreachable!("an element of a channel the reader did not check")
        };
        if *count >= self.window {
            return Err(BeyondWindow { window: self.window });
        }
        *count += 1;
        Ok(())
    }

    /// Grants back `credits` of `channel`, which the node took.
    pub fn grant(&self, channel: &K, credits: u32) {
        let mut outstanding = lock(&self.outstanding);
        let Some(count) = outstanding.get_mut(channel) else {
            unreachable!("granting credits of a channel that does not come into this process")
        };
        assert!(*count >= credits, "granting {credits} of {} received", *count);
        *count -= credits;
    }
}
