//! Barrier alignment for a task with several inputs: a small pure state machine, one explicit
//! state per input (DESIGN.md §4, step 3).
//!
//! - **Aligned**: after an input delivers `Barrier(n)` its further elements are held
//!   ([`Aligner::is_held`]) until every input delivered it; then the task snapshots, forwards the
//!   barrier and releases what it held, in order.
//! - **Unaligned**: the task snapshots at the first `Barrier(n)` and forwards it at once; elements
//!   that arrive afterwards on inputs that have not delivered `Barrier(n)` yet were overtaken by
//!   it ([`Aligner::is_in_flight`]): they are processed and also stored with the snapshot, and the
//!   snapshot is complete when every input delivered the barrier.
//! - **Aligned with a timeout**: aligned, but if alignment takes longer than the timeout the task
//!   switches to unaligned for that checkpoint: it snapshots, forwards, and releases what it held
//!   (those elements came after the barrier on their inputs, so they are not in flight).
//!
//! The barrier says which: `BarrierKind::Unaligned` barriers are unaligned, `Aligned` ones aligned
//! (with the aligner's timeout, if it has one). Savepoints always come with aligned barriers.
//!
//! A newer barrier while a checkpoint is still aligning aborts the older one; barriers of
//! checkpoints already finished or aborted are stale and ignored. An ended input counts as aligned.

use crate::element::{Barrier, BarrierKind, CheckpointId};
use crate::time::Instant;

/// Where one input stands in the current checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputState {
    /// Has not delivered the current barrier (or no checkpoint is aligning).
    Open,
    /// Delivered the current barrier.
    Barrier,
    /// Ended: counts as aligned for every checkpoint.
    Ended,
}

/// What the task must do, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlignAction {
    /// Give up the checkpoint: a newer barrier arrived before it finished.
    Abort { checkpoint: CheckpointId },
    /// Snapshot state now and forward the barrier downstream. With `unaligned`, elements that
    /// `is_in_flight` from now on belong to the snapshot too.
    Snapshot { checkpoint: CheckpointId, unaligned: bool },
    /// Re-deliver the held elements, in the order they arrived; nothing is held any more.
    Release,
    /// Unaligned: every input delivered the barrier; the snapshot's in-flight data is complete.
    InFlightComplete { checkpoint: CheckpointId },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlignError {
    #[error("second barrier of {checkpoint:?} on input {input}")]
    SecondBarrier { checkpoint: CheckpointId, input: usize },
    #[error("barrier of {checkpoint:?} on input {input} after its end")]
    AfterEnd { checkpoint: CheckpointId, input: usize },
}

#[derive(Clone, Copy, Debug)]
struct Current {
    checkpoint: CheckpointId,
    started_at: Instant,
    /// The snapshot was taken (always, in unaligned; after alignment or timeout, in aligned).
    snapshot_taken: bool,
}

#[derive(Debug)]
pub struct Aligner {
    /// Aligned barriers that wait longer than this switch to unaligned.
    timeout_ms: Option<u64>,
    inputs: Vec<InputState>,
    current: Option<Current>,
    /// The newest checkpoint finished or aborted here: its barriers and older ones are stale.
    finished: Option<CheckpointId>,
}

impl Aligner {
    pub fn new(timeout_ms: Option<u64>, input_count: usize) -> Aligner {
        assert!(input_count > 0, "a task with inputs");
        Aligner { timeout_ms, inputs: vec![InputState::Open; input_count], current: None, finished: None }
    }

    /// Aligned mode: elements of `input` must be held now.
    pub fn is_held(&self, input: usize) -> bool {
        if planted!(BarrierNotAligned) {
            return false;
        }
        matches!(self.current, Some(Current { snapshot_taken: false, .. })) && self.inputs[input] == InputState::Barrier
    }

    /// Unaligned: elements of `input` arriving now were overtaken by the barrier.
    pub fn is_in_flight(&self, input: usize) -> bool {
        matches!(self.current, Some(Current { snapshot_taken: true, .. })) && self.inputs[input] == InputState::Open
    }

    /// When the checkpoint being aligned saw its first barrier, if one is.
    pub fn aligning_since(&self) -> Option<Instant> {
        self.current.map(|current| current.started_at)
    }

    /// When an aligned checkpoint times out into an unaligned one, if one is aligning.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.timeout_ms, self.current) {
            (Some(timeout), Some(current)) if !current.snapshot_taken => {
                Some(current.started_at.saturating_add_ms(timeout))
            }
            _ => None,
        }
    }

    pub fn on_barrier(&mut self, now: Instant, input: usize, barrier: Barrier) -> Result<Vec<AlignAction>, AlignError> {
        let checkpoint = barrier.checkpoint;
        match self.inputs[input] {
            InputState::Ended => return Err(AlignError::AfterEnd { checkpoint, input }),
            InputState::Barrier if self.current.is_some_and(|c| c.checkpoint == checkpoint) => {
                return Err(AlignError::SecondBarrier { checkpoint, input })
            }
            _ => {}
        }
        if self.finished.is_some_and(|finished| checkpoint <= finished) {
            return Ok(Vec::new());
        }
        let mut actions = Vec::new();
        match self.current {
            Some(current) if current.checkpoint == checkpoint => {}
            Some(current) if current.checkpoint > checkpoint => return Ok(actions),
            Some(current) => {
                actions.push(AlignAction::Abort { checkpoint: current.checkpoint });
                self.finish(current.checkpoint);
                self.start(now, barrier, &mut actions);
                // What was held came before the newer barrier on its input: released after the
                // newer checkpoint's snapshot (if unaligned, it is taken now), so that it is that
                // snapshot's in-flight data and not also in its state.
                if !current.snapshot_taken {
                    actions.push(AlignAction::Release);
                }
            }
            None => self.start(now, barrier, &mut actions),
        }
        self.inputs[input] = InputState::Barrier;
        self.check_complete(&mut actions);
        Ok(actions)
    }

    fn start(&mut self, now: Instant, barrier: Barrier, actions: &mut Vec<AlignAction>) {
        let (checkpoint, unaligned) = (barrier.checkpoint, barrier.kind == BarrierKind::Unaligned);
        self.current = Some(Current { checkpoint, started_at: now, snapshot_taken: unaligned });
        if unaligned {
            actions.push(AlignAction::Snapshot { checkpoint, unaligned: true });
        }
    }

    /// Every input delivered the barrier or ended: finish the current checkpoint.
    fn check_complete(&mut self, actions: &mut Vec<AlignAction>) {
        let Some(current) = self.current else { return };
        if self.inputs.contains(&InputState::Open) {
            return;
        }
        if current.snapshot_taken {
            actions.push(AlignAction::InFlightComplete { checkpoint: current.checkpoint });
        } else {
            actions.push(AlignAction::Snapshot { checkpoint: current.checkpoint, unaligned: false });
            actions.push(AlignAction::Release);
        }
        self.finish(current.checkpoint);
    }

    fn finish(&mut self, checkpoint: CheckpointId) {
        self.current = None;
        self.finished = Some(checkpoint);
        for state in self.inputs.iter_mut().filter(|state| **state == InputState::Barrier) {
            *state = InputState::Open;
        }
    }

    /// `input` ended: it no longer holds back alignment.
    pub fn on_end(&mut self, input: usize) -> Vec<AlignAction> {
        self.inputs[input] = InputState::Ended;
        let mut actions = Vec::new();
        self.check_complete(&mut actions);
        actions
    }

    /// Switches an aligned checkpoint that waited past its timeout to unaligned.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<AlignAction> {
        let mut actions = Vec::new();
        if self.poll_timeout().is_some_and(|at| now >= at) {
            let current = self.current.as_mut().expect("a timeout belongs to an aligning checkpoint");
            current.snapshot_taken = true;
            actions.push(AlignAction::Snapshot { checkpoint: current.checkpoint, unaligned: true });
            actions.push(AlignAction::Release);
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use super::*;
    use crate::element::BarrierKind;
    use crate::state::testing::Lcg;

    fn barrier(id: u64) -> Barrier {
        Barrier { checkpoint: CheckpointId(id), kind: BarrierKind::Aligned }
    }

    fn unaligned(id: u64) -> Barrier {
        Barrier { checkpoint: CheckpointId(id), kind: BarrierKind::Unaligned }
    }

    // Goal: the aligned script: hold after the barrier, snapshot and release when the last input
    // delivers it; an ended input counts as aligned; stale and repeated barriers are handled.
    #[test]
    fn aligned_script() {
        let mut a = Aligner::new(None, 3);
        assert_eq!(a.on_barrier(Instant(0), 0, barrier(1)), Ok(vec![]));
        assert!(a.is_held(0) && !a.is_held(1));
        assert_eq!(
            a.on_barrier(Instant(0), 0, barrier(1)),
            Err(AlignError::SecondBarrier { checkpoint: CheckpointId(1), input: 0 })
        );
        assert_eq!(a.on_barrier(Instant(0), 1, barrier(1)), Ok(vec![]));
        assert_eq!(
            a.on_end(2),
            vec![AlignAction::Snapshot { checkpoint: CheckpointId(1), unaligned: false }, AlignAction::Release]
        );
        assert!(!a.is_held(0) && !a.is_held(1));
        assert_eq!(a.on_barrier(Instant(5), 1, barrier(1)), Ok(vec![]), "stale: already finished");
        assert_eq!(
            a.on_barrier(Instant(5), 2, barrier(2)),
            Err(AlignError::AfterEnd { checkpoint: CheckpointId(2), input: 2 })
        );
    }

    // Goal: the unaligned script, and the switch from aligned to unaligned on timeout.
    #[test]
    fn unaligned_and_timeout_scripts() {
        let mut a = Aligner::new(None, 2);
        assert_eq!(
            a.on_barrier(Instant(0), 1, unaligned(4)),
            Ok(vec![AlignAction::Snapshot { checkpoint: CheckpointId(4), unaligned: true }])
        );
        assert!(a.is_in_flight(0) && !a.is_in_flight(1) && !a.is_held(1));
        assert_eq!(
            a.on_barrier(Instant(1), 0, unaligned(4)),
            Ok(vec![AlignAction::InFlightComplete { checkpoint: CheckpointId(4) }])
        );

        let mut a = Aligner::new(Some(10), 2);
        a.on_barrier(Instant(100), 0, barrier(1)).unwrap();
        assert_eq!(a.poll_timeout(), Some(Instant(110)));
        assert_eq!(a.handle_timeout(Instant(109)), vec![]);
        assert_eq!(
            a.handle_timeout(Instant(110)),
            vec![AlignAction::Snapshot { checkpoint: CheckpointId(1), unaligned: true }, AlignAction::Release]
        );
        assert!(!a.is_held(0) && a.is_in_flight(1) && !a.is_in_flight(0));
        assert_eq!(a.poll_timeout(), None);
        assert_eq!(
            a.on_barrier(Instant(120), 1, barrier(1)),
            Ok(vec![AlignAction::InFlightComplete { checkpoint: CheckpointId(1) }])
        );
    }

    // Goal (regression, found by the `aligner` fuzz target): when an unaligned barrier of a newer
    // checkpoint overtakes an aligned one that holds inputs (a savepoint's aligned barriers among
    // unaligned checkpoints), the held elements are released after the newer snapshot, as its
    // in-flight data. They were released before it: processed into the state the snapshot then
    // took, while the aligner already called them in flight (a node found no unaligned snapshot
    // to record them in, and panicked).
    #[test]
    fn newer_unaligned_barrier_releases_held_elements_after_its_snapshot() {
        let mut a = Aligner::new(None, 2);
        assert_eq!(a.on_barrier(Instant(0), 0, barrier(1)), Ok(vec![]));
        assert!(a.is_held(0), "input 0 holds its elements after barrier 1");
        assert_eq!(
            a.on_barrier(Instant(1), 1, unaligned(2)),
            Ok(vec![
                AlignAction::Abort { checkpoint: CheckpointId(1) },
                AlignAction::Snapshot { checkpoint: CheckpointId(2), unaligned: true },
                AlignAction::Release,
            ])
        );
        assert!(!a.is_held(0) && a.is_in_flight(0), "what input 0 held is in flight for checkpoint 2");
    }

    #[derive(Clone, Copy, Debug)]
    enum Item {
        Record,
        Barrier(u64),
        End,
    }

    /// One task driven by an aligner over random inputs, checking every finished snapshot.
    struct Harness {
        aligner: Aligner,
        kind: BarrierKind,
        processed: Vec<u64>,
        held: VecDeque<(usize, Item)>,
        /// Records each input carried before each barrier: the consistent cut.
        before_barrier: BTreeMap<(u64, usize), u64>,
        records_total: Vec<u64>,
        snapshots: BTreeMap<u64, Vec<u64>>,
        in_flight: BTreeMap<u64, Vec<u64>>,
        unaligned_open: Option<u64>,
        finished: Vec<u64>,
    }

    impl Harness {
        fn deliver(&mut self, now: Instant, input: usize, item: Item) {
            if self.aligner.is_held(input) {
                self.held.push_back((input, item));
                return;
            }
            let actions = match item {
                Item::Record => {
                    self.processed[input] += 1;
                    if self.aligner.is_in_flight(input) {
                        let open = self.unaligned_open.expect("in flight belongs to an open snapshot");
                        self.in_flight.get_mut(&open).unwrap()[input] += 1;
                    }
                    vec![]
                }
                Item::Barrier(id) => {
                    let barrier = Barrier { checkpoint: CheckpointId(id), kind: self.kind };
                    self.aligner.on_barrier(now, input, barrier).unwrap()
                }
                Item::End => self.aligner.on_end(input),
            };
            self.apply(now, actions);
        }

        fn apply(&mut self, now: Instant, actions: Vec<AlignAction>) {
            for action in actions {
                match action {
                    AlignAction::Snapshot { checkpoint, unaligned } => {
                        self.snapshots.insert(checkpoint.0, self.processed.clone());
                        self.in_flight.insert(checkpoint.0, vec![0; self.processed.len()]);
                        if unaligned {
                            self.unaligned_open = Some(checkpoint.0);
                        } else {
                            self.finished.push(checkpoint.0);
                        }
                    }
                    AlignAction::InFlightComplete { checkpoint } => {
                        assert_eq!(self.unaligned_open, Some(checkpoint.0));
                        self.unaligned_open = None;
                        self.finished.push(checkpoint.0);
                    }
                    AlignAction::Abort { checkpoint } => {
                        if self.unaligned_open == Some(checkpoint.0) {
                            self.unaligned_open = None;
                        }
                        self.snapshots.remove(&checkpoint.0);
                    }
                    AlignAction::Release => {
                        for (input, item) in std::mem::take(&mut self.held) {
                            self.deliver(now, input, item);
                        }
                    }
                }
            }
        }

        /// A finished snapshot plus its in-flight records is exactly what came before the barrier.
        fn check(&self, seed: u64) {
            for &id in &self.finished {
                for input in 0..self.processed.len() {
                    let cut = self.before_barrier.get(&(id, input)).copied().unwrap_or(self.records_total[input]);
                    let taken = self.snapshots[&id][input] + self.in_flight[&id][input];
                    assert_eq!(taken, cut, "seed {seed}: checkpoint {id} input {input}");
                }
            }
        }
    }

    // Goal: every finished snapshot is a consistent cut: state plus in-flight records equal the
    // records before the barrier on every input — aligned, unaligned, and aligned with timeouts.
    // Method: random input sequences and interleavings, seeded (the seed is printed).
    #[test]
    fn snapshots_are_consistent_cuts() {
        let mut finished_total = 0;
        for seed in 0..300_u64 {
            println!("seed {seed}");
            let mut rng = Lcg::new(seed);
            let input_count = 1 + rng.below(4) as usize;
            // Aligned, unaligned, or aligned with a timeout.
            let (kind, timeout_ms) = match rng.below(3) {
                0 => (BarrierKind::Aligned, None),
                1 => (BarrierKind::Unaligned, None),
                _ => (BarrierKind::Aligned, Some(1 + rng.below(5))),
            };
            let barrier_count = 1 + rng.below(5);
            let mut queues: Vec<VecDeque<Item>> = Vec::new();
            let mut harness = Harness {
                aligner: Aligner::new(timeout_ms, input_count),
                kind,
                processed: vec![0; input_count],
                held: VecDeque::new(),
                before_barrier: BTreeMap::new(),
                records_total: vec![0; input_count],
                snapshots: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                unaligned_open: None,
                finished: Vec::new(),
            };
            for input in 0..input_count {
                let mut queue = VecDeque::new();
                // Some inputs end before their last barriers.
                let barriers = if rng.below(4) == 0 { rng.below(barrier_count + 1) } else { barrier_count };
                let mut records = 0;
                for id in 1..=barriers {
                    for _ in 0..rng.below(6) {
                        queue.push_back(Item::Record);
                        records += 1;
                    }
                    harness.before_barrier.insert((id, input), records);
                    queue.push_back(Item::Barrier(id));
                }
                for _ in 0..rng.below(4) {
                    queue.push_back(Item::Record);
                    records += 1;
                }
                queue.push_back(Item::End);
                harness.records_total[input] = records;
                queues.push(queue);
            }
            let mut now = 0;
            while queues.iter().any(|q| !q.is_empty()) {
                now += rng.below(3);
                let actions = harness.aligner.handle_timeout(Instant(now));
                harness.apply(Instant(now), actions);
                let input = rng.below(input_count as u64) as usize;
                if let Some(item) = queues[input].pop_front() {
                    harness.deliver(Instant(now), input, item);
                }
            }
            assert!(harness.held.is_empty(), "seed {seed}: nothing is held at the end");
            harness.check(seed);
            finished_total += harness.finished.len();
            if (kind, timeout_ms) == (BarrierKind::Aligned, None) {
                assert!(
                    harness.in_flight.values().flatten().all(|&n| n == 0),
                    "seed {seed}: aligned has no in-flight data"
                );
            }
        }
        assert!(finished_total > 500, "the runs finish checkpoints to check: {finished_total}");
    }
}
