//! The barrier aligner (`checkpoint::align::Aligner`) of a task with 1 to 4 inputs, driven by an
//! arbitrary interleaving of records, barriers (aligned or unaligned, checkpoint ids growing per
//! input, sometimes repeated or going back: protocol breaks), ends of input and timeouts at
//! arbitrary times, and checked two ways:
//!
//! - against a model of the alignment rules written here from `align.rs`'s documentation
//!   ([`Model`]): every call's actions and errors, and `is_held`, `is_in_flight`,
//!   `poll_timeout`, `aligning_since` after every step;
//! - by what the task does with the actions ([`Task`], as `node.rs` does): records are
//!   numbered per input, and no record is lost, repeated or reordered; a record of a held input
//!   is never processed before the snapshot; a checkpoint is snapshotted at most once, aligned
//!   only once every input delivered its barrier or ended; every completed checkpoint is a
//!   consistent cut (state at the snapshot plus in-flight records = the records before the
//!   barrier on every input); an error names an input that broke the protocol (a barrier after
//!   its end, or its second barrier of the checkpoint being aligned). At the end every input
//!   ends: nothing stays held and no checkpoint stays open.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sabot_kernel::checkpoint::align::{AlignAction, AlignError, Aligner};
use sabot_kernel::element::{Barrier, BarrierKind, CheckpointId};
use sabot_kernel::time::Instant;

/// Operations one input runs at most (a bound on the run's cost).
const OPS_MAX: usize = 512;

#[derive(Clone, Copy, Debug)]
enum Step {
    /// The input's last barrier again (a protocol break the aligner may report).
    Again,
    /// One below the input's last barrier (a protocol break the aligner ignores).
    Back,
    /// This many above the input's last barrier.
    Up(u64),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Record {
        input: usize,
    },
    Barrier {
        input: usize,
        step: Step,
        unaligned: bool,
    },
    End {
        input: usize,
    },
    /// The clock advances and the task checks its alignment timeout.
    Tick {
        ms: u64,
    },
    /// `handle_timeout` at an arbitrary time (even one before the clock).
    TimeoutAt {
        now: u64,
    },
}

#[derive(Debug)]
struct Input {
    input_count: usize,
    timeout_ms: Option<u64>,
    ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Input> {
        let input_count = u.int_in_range(1..=4)?;
        let timeout_ms = match u.int_in_range(0..=3)? {
            0 | 1 => None,
            2 => Some(u.int_in_range(0..=20)?),
            _ => Some(u64::arbitrary(u)?),
        };
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < OPS_MAX {
            let input = u.int_in_range(0..=input_count - 1)?;
            let op = match u.int_in_range(0..=19)? {
                0..=7 => Op::Record { input },
                8..=13 => {
                    let step = match u.int_in_range(0..=9)? {
                        0 => Step::Again,
                        1 => Step::Back,
                        2 => Step::Up(u.int_in_range(2..=4)?),
                        _ => Step::Up(1),
                    };
                    Op::Barrier { input, step, unaligned: bool::arbitrary(u)? }
                }
                14 => Op::End { input },
                15..=18 => Op::Tick { ms: u.int_in_range(0..=8)? },
                _ => Op::TimeoutAt { now: u64::arbitrary(u)? },
            };
            ops.push(op);
        }
        Ok(Input { input_count, timeout_ms, ops })
    }
}

/// The checkpoint being aligned, in the model.
#[derive(Clone, Debug)]
struct Pending {
    checkpoint: u64,
    since: u64,
    /// Inputs whose barrier of `checkpoint` the aligner took.
    arrived: BTreeSet<usize>,
    /// Unaligned from its first barrier, or switched to unaligned by the timeout.
    snapshot_taken: bool,
}

/// The alignment rules of `align.rs`'s documentation, for one task.
#[derive(Debug)]
struct Model {
    timeout_ms: Option<u64>,
    ended: Vec<bool>,
    pending: Option<Pending>,
    /// The newest checkpoint finished or aborted: its barriers and older ones are stale.
    closed_max: Option<u64>,
}

impl Model {
    fn is_held(&self, input: usize) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.snapshot_taken && p.arrived.contains(&input)) && !self.ended[input]
    }

    fn is_in_flight(&self, input: usize) -> bool {
        self.pending.as_ref().is_some_and(|p| p.snapshot_taken && !p.arrived.contains(&input)) && !self.ended[input]
    }

    fn poll_timeout(&self) -> Option<u64> {
        let pending = self.pending.as_ref().filter(|p| !p.snapshot_taken)?;
        Some(pending.since.saturating_add(self.timeout_ms?))
    }

    fn on_barrier(
        &mut self,
        now: u64,
        input: usize,
        checkpoint: u64,
        unaligned: bool,
    ) -> Result<Vec<AlignAction>, AlignError> {
        let id = CheckpointId(checkpoint);
        if self.ended[input] {
            return Err(AlignError::AfterEnd { checkpoint: id, input });
        }
        if self.pending.as_ref().is_some_and(|p| p.checkpoint == checkpoint && p.arrived.contains(&input)) {
            return Err(AlignError::SecondBarrier { checkpoint: id, input });
        }
        if self.closed_max.is_some_and(|closed| checkpoint <= closed) {
            return Ok(vec![]);
        }
        let mut actions = Vec::new();
        if let Some(pending) = &self.pending {
            if pending.checkpoint > checkpoint {
                return Ok(vec![]);
            }
            if pending.checkpoint < checkpoint {
                // A newer checkpoint takes over: the older one is given up. What was held goes on
                // to be processed, after the newer one's snapshot if that is taken at once (held
                // elements came before the newer barrier on their inputs: they are its in-flight
                // data, not its state).
                actions.push(AlignAction::Abort { checkpoint: CheckpointId(pending.checkpoint) });
                let release = !pending.snapshot_taken;
                self.closed_max = Some(pending.checkpoint);
                self.pending = None;
                self.start(now, checkpoint, unaligned, &mut actions);
                if release {
                    actions.push(AlignAction::Release);
                }
            }
        } else {
            self.start(now, checkpoint, unaligned, &mut actions);
        }
        self.pending.as_mut().expect("started above").arrived.insert(input);
        self.complete_if_aligned(&mut actions);
        Ok(actions)
    }

    fn start(&mut self, now: u64, checkpoint: u64, unaligned: bool, actions: &mut Vec<AlignAction>) {
        self.pending = Some(Pending { checkpoint, since: now, arrived: BTreeSet::new(), snapshot_taken: unaligned });
        if unaligned {
            actions.push(AlignAction::Snapshot { checkpoint: CheckpointId(checkpoint), unaligned: true });
        }
    }

    fn on_end(&mut self, input: usize) -> Vec<AlignAction> {
        self.ended[input] = true;
        let mut actions = Vec::new();
        self.complete_if_aligned(&mut actions);
        actions
    }

    fn complete_if_aligned(&mut self, actions: &mut Vec<AlignAction>) {
        let Some(pending) = &self.pending else { return };
        if !(0..self.ended.len()).all(|input| self.ended[input] || pending.arrived.contains(&input)) {
            return;
        }
        let checkpoint = CheckpointId(pending.checkpoint);
        if pending.snapshot_taken {
            actions.push(AlignAction::InFlightComplete { checkpoint });
        } else {
            actions.push(AlignAction::Snapshot { checkpoint, unaligned: false });
            actions.push(AlignAction::Release);
        }
        self.closed_max = Some(pending.checkpoint);
        self.pending = None;
    }

    fn handle_timeout(&mut self, now: u64) -> Vec<AlignAction> {
        if !self.poll_timeout().is_some_and(|at| now >= at) {
            return vec![];
        }
        let pending = self.pending.as_mut().expect("a timeout belongs to a pending checkpoint");
        pending.snapshot_taken = true;
        let checkpoint = CheckpointId(pending.checkpoint);
        vec![AlignAction::Snapshot { checkpoint, unaligned: true }, AlignAction::Release]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    /// The record's number on its input.
    Record(u64),
    Barrier(u64, BarrierKind),
    End,
}

/// One task: the aligner, what it holds, and what it processed; every check made on the way.
struct Task {
    aligner: Aligner,
    model: Model,
    now: u64,
    /// Everything each input sent, in order.
    sent: Vec<Vec<Item>>,
    held: VecDeque<(usize, Item)>,
    /// Records processed per input (they are numbered in order: the next one's number).
    processed: Vec<u64>,
    /// Inputs whose barrier the aligner took (without an error), per checkpoint.
    barriers_taken: BTreeMap<u64, BTreeSet<usize>>,
    /// Inputs whose end the aligner took.
    ended: Vec<bool>,
    /// Per checkpoint snapshotted: the records processed per input at the snapshot.
    snapshots: BTreeMap<u64, Vec<u64>>,
    in_flight: BTreeMap<u64, Vec<u64>>,
    /// The unaligned snapshot collecting in-flight records.
    open_unaligned: Option<u64>,
    completed: BTreeSet<u64>,
    aborted: BTreeSet<u64>,
}

impl Task {
    fn send(&mut self, input: usize, item: Item) {
        self.sent[input].push(item);
        self.deliver(input, item);
        self.check_views();
    }

    /// As `Node::deliver`: held while the aligner says so, else taken by the aligner.
    fn deliver(&mut self, input: usize, item: Item) {
        let held = self.aligner.is_held(input);
        assert_eq!(held, self.model.is_held(input), "is_held({input}): model {:?}", self.model);
        if held {
            self.held.push_back((input, item));
            return;
        }
        match item {
            Item::Record(number) => self.process(input, number),
            Item::Barrier(checkpoint, kind) => {
                let barrier = Barrier { checkpoint: CheckpointId(checkpoint), kind };
                let result = self.aligner.on_barrier(Instant(self.now), input, barrier);
                let expected = self.model.on_barrier(self.now, input, checkpoint, kind == BarrierKind::Unaligned);
                assert_eq!(result, expected, "barrier {checkpoint} {kind:?} on input {input}");
                match result {
                    Ok(actions) => {
                        self.barriers_taken.entry(checkpoint).or_default().insert(input);
                        self.apply(actions);
                    }
                    Err(AlignError::AfterEnd { checkpoint: id, input: named }) => {
                        assert_eq!((id.0, named), (checkpoint, input));
                        assert!(self.ended[input], "after-end error on input {input}, which has not ended");
                    }
                    Err(AlignError::SecondBarrier { checkpoint: id, input: named }) => {
                        assert_eq!((id.0, named), (checkpoint, input));
                        let earlier = self.barriers_taken.get(&checkpoint).is_some_and(|s| s.contains(&input));
                        assert!(earlier, "second-barrier error on input {input}, which gave no barrier {checkpoint}");
                    }
                }
            }
            Item::End => {
                let actions = self.aligner.on_end(input);
                assert_eq!(actions, self.model.on_end(input), "end of input {input}");
                self.ended[input] = true;
                self.apply(actions);
            }
        }
    }

    fn process(&mut self, input: usize, number: u64) {
        assert_eq!(number, self.processed[input], "input {input}: record {number} out of order, lost or repeated");
        self.processed[input] += 1;
        let in_flight = self.aligner.is_in_flight(input);
        assert_eq!(in_flight, self.model.is_in_flight(input), "is_in_flight({input})");
        if in_flight {
            let open = self.open_unaligned.expect("in-flight records belong to an open unaligned snapshot");
            self.in_flight.get_mut(&open).expect("snapshotted")[input] += 1;
        }
    }

    fn apply(&mut self, actions: Vec<AlignAction>) {
        for action in actions {
            match action {
                AlignAction::Snapshot { checkpoint, unaligned } => self.snapshot(checkpoint.0, unaligned),
                AlignAction::Release => {
                    for (input, item) in std::mem::take(&mut self.held) {
                        self.deliver(input, item);
                    }
                }
                AlignAction::InFlightComplete { checkpoint } => {
                    let checkpoint = checkpoint.0;
                    assert_eq!(self.open_unaligned, Some(checkpoint), "in-flight data of {checkpoint} completes");
                    self.open_unaligned = None;
                    self.complete(checkpoint);
                }
                AlignAction::Abort { checkpoint } => {
                    let checkpoint = checkpoint.0;
                    assert!(!self.completed.contains(&checkpoint), "abort of completed checkpoint {checkpoint}");
                    assert!(self.aborted.insert(checkpoint), "checkpoint {checkpoint} aborted twice");
                    if self.open_unaligned == Some(checkpoint) {
                        self.open_unaligned = None;
                    }
                }
            }
        }
    }

    fn snapshot(&mut self, checkpoint: u64, unaligned: bool) {
        assert!(!self.snapshots.contains_key(&checkpoint), "checkpoint {checkpoint} snapshotted twice");
        assert!(!self.aborted.contains(&checkpoint), "checkpoint {checkpoint} snapshotted after its abort");
        assert_eq!(self.open_unaligned, None, "snapshot of {checkpoint} while another collects in-flight data");
        self.snapshots.insert(checkpoint, self.processed.clone());
        self.in_flight.insert(checkpoint, vec![0; self.processed.len()]);
        if unaligned {
            self.open_unaligned = Some(checkpoint);
            return;
        }
        let taken = self.barriers_taken.get(&checkpoint).cloned().unwrap_or_default();
        for input in 0..self.processed.len() {
            assert!(
                taken.contains(&input) || self.ended[input],
                "aligned snapshot of {checkpoint} without a barrier or an end from input {input}"
            );
        }
        self.complete(checkpoint);
    }

    /// A completed checkpoint is a consistent cut: its state plus its in-flight records are the
    /// records before its barrier on every input (all of an input's records, if it ended first).
    fn complete(&mut self, checkpoint: u64) {
        assert!(self.completed.insert(checkpoint), "checkpoint {checkpoint} completed twice");
        for input in 0..self.processed.len() {
            let barrier_at =
                self.sent[input].iter().position(|item| matches!(item, Item::Barrier(c, _) if *c == checkpoint));
            let before = &self.sent[input][..barrier_at.unwrap_or(self.sent[input].len())];
            if barrier_at.is_none() {
                assert!(
                    self.ended[input],
                    "checkpoint {checkpoint} complete without a barrier or an end on input {input}"
                );
            }
            let cut = before.iter().filter(|item| matches!(item, Item::Record(_))).count() as u64;
            let taken = self.snapshots[&checkpoint][input] + self.in_flight[&checkpoint][input];
            assert_eq!(taken, cut, "checkpoint {checkpoint}, input {input}: state and in-flight records vs the cut");
        }
    }

    fn check_views(&self) {
        for input in 0..self.processed.len() {
            assert_eq!(self.aligner.is_held(input), self.model.is_held(input), "is_held({input})");
            assert_eq!(self.aligner.is_in_flight(input), self.model.is_in_flight(input), "is_in_flight({input})");
        }
        assert_eq!(self.aligner.poll_timeout().map(|at| at.0), self.model.poll_timeout(), "poll_timeout");
        let since = self.model.pending.as_ref().map(|p| p.since);
        assert_eq!(self.aligner.aligning_since().map(|at| at.0), since, "aligning_since");
    }

    fn timeout(&mut self, now: u64) {
        let actions = self.aligner.handle_timeout(Instant(now));
        assert_eq!(actions, self.model.handle_timeout(now), "handle_timeout({now})");
        self.apply(actions);
        self.check_views();
    }
}

fuzz_target!(|input: Input| {
    let count = input.input_count;
    let mut task = Task {
        aligner: Aligner::new(input.timeout_ms, count),
        model: Model { timeout_ms: input.timeout_ms, ended: vec![false; count], pending: None, closed_max: None },
        now: 0,
        sent: vec![Vec::new(); count],
        held: VecDeque::new(),
        processed: vec![0; count],
        barriers_taken: BTreeMap::new(),
        ended: vec![false; count],
        snapshots: BTreeMap::new(),
        in_flight: BTreeMap::new(),
        open_unaligned: None,
        completed: BTreeSet::new(),
        aborted: BTreeSet::new(),
    };
    // Per input: records sent, the last barrier sent, whether its end was sent.
    let mut records = vec![0_u64; count];
    let mut last_barrier = vec![0_u64; count];
    let mut end_sent = vec![false; count];
    for op in input.ops {
        match op {
            // A closed channel carries nothing more; a barrier after the end is sent (a protocol
            // break the aligner must report).
            Op::Record { input } | Op::End { input } if end_sent[input] => {}
            Op::Record { input } => {
                task.send(input, Item::Record(records[input]));
                records[input] += 1;
            }
            Op::End { input } => {
                end_sent[input] = true;
                task.send(input, Item::End);
            }
            Op::Barrier { input, step, unaligned } => {
                let checkpoint = match step {
                    Step::Again if last_barrier[input] > 0 => last_barrier[input],
                    Step::Back if last_barrier[input] > 1 => last_barrier[input] - 1,
                    Step::Again | Step::Back => last_barrier[input] + 1,
                    Step::Up(by) => last_barrier[input] + by,
                };
                last_barrier[input] = last_barrier[input].max(checkpoint);
                let kind = if unaligned { BarrierKind::Unaligned } else { BarrierKind::Aligned };
                task.send(input, Item::Barrier(checkpoint, kind));
            }
            Op::Tick { ms } => {
                task.now += ms;
                task.timeout(task.now);
            }
            Op::TimeoutAt { now } => task.timeout(now),
        }
    }
    // Every input ends: nothing stays held, every record was processed once, nothing is open.
    for input in 0..count {
        if !end_sent[input] {
            end_sent[input] = true;
            task.send(input, Item::End);
        }
    }
    assert!(task.held.is_empty(), "{} elements held after every input ended", task.held.len());
    assert_eq!(task.processed, records, "records processed per input");
    assert_eq!(task.open_unaligned, None, "an unaligned snapshot open after every input ended");
    assert!(task.model.pending.is_none(), "a checkpoint pending after every input ended: {:?}", task.model);
});
