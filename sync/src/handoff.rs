//! The handoff of snapshot writes between a node's task and the threads that write them.
//!
//! At a barrier the task captures its state synchronously and hands the writes (the
//! asynchronous part) to a writer thread; it acknowledges the checkpoint only once the files are
//! durable. The task [`submit`](Handoff::submit)s a lane (the subtask) and an id (the checkpoint)
//! *before* it starts the writer, which gets the [`Ticket`]; the writer
//! [`complete`](Ticket::complete)s it once its writes are synced; the task [`take`](Handoff::take)s
//! finished writes between steps and then acknowledges.
//!
//! *Contract* (checked by the loom models in `tests/loom.rs`): every ticket is taken exactly once
//! — also when the writer finishes before the task looks, and when the writer dies (a ticket
//! dropped without `complete` is taken as [`Outcome::Abandoned`], so an acknowledgement is never
//! silently lost); a ticket is taken only after its writer completed it, and with everything the
//! writer did before (so an acknowledgement follows durable files); tickets of one lane are taken
//! in the order they were submitted, whatever order their writers finish in; a task waiting in
//! [`Handoff::ready`] wakes once something can be taken.

use std::collections::{BTreeMap, VecDeque};

use crate::shim::{lock, Arc, Mutex};
use crate::signal::Signal;

/// Writes submitted and not yet taken by the task, over all lanes, at most `pending_max` (given to
/// [`Handoff::new`]; asserted).
pub struct Handoff<K, I, T> {
    state: Mutex<HandoffState<K, I, T>>,
    /// Notified whenever a ticket is completed or abandoned.
    ready: Signal,
    pending_max: usize,
}

struct HandoffState<K, I, T> {
    /// Per lane, its tickets in submission order.
    lanes: BTreeMap<K, VecDeque<Slot<I, T>>>,
    pending_count: usize,
    ticket_next: u64,
}

struct Slot<I, T> {
    ticket: u64,
    id: I,
    outcome: Option<Outcome<T>>,
}

/// How a writer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// What the writer completed its ticket with.
    Done(T),
    /// The writer dropped its ticket without completing it (it panicked).
    Abandoned,
}

/// A finished write, as the task takes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Handed<K, I, T> {
    pub lane: K,
    pub id: I,
    pub outcome: Outcome<T>,
}

/// The writer's side of one submitted write: complete it, or drop it (abandoned).
#[must_use = "a ticket dropped without `complete` is taken as abandoned"]
pub struct Ticket<K: Ord + Clone, I, T> {
    handoff: Arc<Handoff<K, I, T>>,
    lane: K,
    ticket: u64,
    finished: bool,
}

impl<K: Ord + Clone, I, T> Handoff<K, I, T> {
    pub fn new(pending_max: usize) -> Handoff<K, I, T> {
        assert!(pending_max > 0, "a handoff for no writes");
        let state = HandoffState { lanes: BTreeMap::new(), pending_count: 0, ticket_next: 0 };
        Handoff { state: Mutex::new(state), ready: Signal::new(), pending_max }
    }

    /// Registers a write of `lane` for `id`, after every earlier one of `lane`; the writer gets the
    /// ticket.
    pub fn submit(handoff: &Arc<Self>, lane: K, id: I) -> Ticket<K, I, T> {
        let ticket = {
            let mut state = lock(&handoff.state);
            let ticket = state.ticket_next;
            state.ticket_next += 1;
            state.lanes.entry(lane.clone()).or_default().push_back(Slot { ticket, id, outcome: None });
            state.pending_count += 1;
            assert!(
                state.pending_count <= handoff.pending_max,
                "{} snapshot writes pending, at most {}",
                state.pending_count,
                handoff.pending_max
            );
            ticket
        };
        Ticket { handoff: handoff.clone(), lane, ticket, finished: false }
    }

    /// The oldest write of a lane, once its writer finished (lanes in key order).
    pub fn take(&self) -> Option<Handed<K, I, T>> {
        let mut state = lock(&self.state);
        let lane = state.lanes.iter().find(|(_, slots)| Self::head_finished(slots)).map(|(lane, _)| lane.clone())?;
        let slots = state.lanes.get_mut(&lane).expect("the lane just found");
        let slot = slots.pop_front().expect("a finished head");
        if slots.is_empty() {
            state.lanes.remove(&lane);
        }
        assert!(state.pending_count > 0, "taking a write none is pending for");
        state.pending_count -= 1;
        let outcome = slot.outcome.expect("a finished head has its outcome");
        Some(Handed { lane, id: slot.id, outcome })
    }

    /// Completes once a write can be taken. Cancel-safe.
    pub async fn ready(&self) {
        loop {
            // Registered before looking, so that a writer finishing in between wakes it.
            let notified = self.ready.notified();
            if lock(&self.state).lanes.values().any(|slots| Self::head_finished(slots)) {
                return;
            }
            notified.await;
        }
    }

    /// Writes submitted and not taken.
    pub fn pending_count(&self) -> usize {
        lock(&self.state).pending_count
    }

    fn head_finished(slots: &VecDeque<Slot<I, T>>) -> bool {
        slots.front().is_some_and(|slot| slot.outcome.is_some())
    }
}

impl<K: Ord + Clone, I, T> Ticket<K, I, T> {
    /// The write is durable: the task may acknowledge it, with `result`.
    pub fn complete(mut self, result: T) {
        self.finish(Outcome::Done(result));
    }

    fn finish(&mut self, outcome: Outcome<T>) {
        self.finished = true;
        {
            let mut state = lock(&self.handoff.state);
            let Some(slot) =
                state.lanes.get_mut(&self.lane).and_then(|slots| slots.iter_mut().find(|s| s.ticket == self.ticket))
            else {
                unreachable!("ticket {} left its lane before its writer finished", self.ticket)
            };
            assert!(slot.outcome.is_none(), "ticket {} finished twice", self.ticket);
            slot.outcome = Some(outcome);
        }
        self.handoff.ready.notify();
    }
}

impl<K: Ord + Clone, I, T> Drop for Ticket<K, I, T> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(Outcome::Abandoned);
        }
    }
}
