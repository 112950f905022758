//! Timers held to a model: one conformance suite for [`TimerService`] over any backend.
//!
//! [`check_timers_against_model`] drives a seeded random sequence of operations through the
//! subtasks of an operator (each a [`KeyedState`] with a [`TimerService`] and a value state
//! counting the timers fired per key and namespace) and through a model, and compares every
//! timer fired. [`check_timer_ops_against_model`] runs given operation words instead (a
//! proptest's input, shrunk when it fails).
//!
//! # What a run does
//! - Registers event-time and processing-time timers for twelve keys (unsigned, signed and
//!   byte keys, one empty, one too long for inline storage) in five namespaces, at times close
//!   to the watermark or to processing time (so that registrations repeat, and some are already
//!   due), rarely at the lowest and highest times; deletes timers that exist and some that do not.
//! - Advances the watermark and processing time, and fires at every subtask, in lockstep with
//!   the model: each timer polled must be the one the model says is next (due, in the order
//!   `(time, key group, key, namespace)`), and the loop must end exactly when the model has no
//!   timer due. A fired timer's handler counts it in a value state of its key and namespace (so
//!   the key and namespace must be current), and sometimes registers a timer of its key (due
//!   at once or later) or deletes one.
//! - After every firing: the next timer times and the watermark bound agree with the model, and
//!   the bound is not below the watermark (an output watermark never passes an unfired timer).
//! - Checkpoints (captures written some operations later, some completed), recoveries from
//!   them at the same or another parallelism (unwritten captures are lost, as in a crash),
//!   portable snapshots restored at a parallelism. Time goes on across recoveries: restored
//!   timers that are due fire at the next advance.
//! - Every run ends with a checkpoint restored at another parallelism, then the watermark and
//!   processing time at their maximum: every timer left fires, and none is left after.
//!
//! # The model
//! A `BTreeSet` of timers `(domain, time, key group, encoded key, encoded namespace)`, which is
//! the firing order, so registering twice is one timer; and a `BTreeMap` of fire counts. A
//! checkpoint copies both.
//!
//! # Replay
//! A run prints its seed, length and setup; the same call replays it. A failed comparison names
//! the step and the operation.

use std::collections::{BTreeMap, BTreeSet};

use super::keyed::FreshBackend;
use super::Lcg;
use crate::element::CheckpointId;
use crate::env::MemStorage;
use crate::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use crate::state::codec::StateCodec;
use crate::state::keyed::{KeyedState, Queried, QueryKey, ValueState};
use crate::state::snapshot::SnapshotWriter;
use crate::state::timers::{TimeDomain, Timer, TimerService, TimerTime};
use crate::state::{order_preserving_i64, CaptureTarget, StateCapture, StateError};
use crate::time::{EventTime, Instant};

/// How many backends a restore asks for before it gives up (a backend may refuse another's
/// native format, saying so; see `testing::keyed`).
const RESTORE_ATTEMPTS_MAX: usize = 4;
const PENDING_MAX: usize = 3;
const CHECKPOINTS_KEPT_MAX: usize = 4;
const PARALLELISM_MAX: u16 = 4;
/// Timers one firing loop may fire: handlers register new due timers rarely, so a loop that
/// goes on beyond this is a bug.
const FIRES_PER_LOOP_MAX: usize = 100_000;
const SETUP_SALT: u64 = 0x7133_u64 << 40;
/// The state that counts fired timers per key and namespace.
const FIRES_STATE: &str = "fires";

/// Drives `op_count` random operations (from `seed`) against the model and against timer
/// services over backends from `fresh`; panics, naming the step, at the first difference.
pub fn check_timers_against_model(fresh: &mut FreshBackend<'_>, seed: u64, op_count: usize) {
    println!("timers model: seed {seed}, {op_count} operations (replay: check_timers_against_model(fresh, {seed}, {op_count}))");
    let mut rng = Lcg::new(seed);
    let words: Vec<u64> = (0..op_count).map(|_| rng.next_u64()).collect();
    run(fresh, seed, &words);
}

/// As [`check_timers_against_model`], with the setup from `seed` and one operation per word.
pub fn check_timer_ops_against_model(fresh: &mut FreshBackend<'_>, seed: u64, words: &[u64]) {
    println!("timers model: seed {seed}, {} operation words", words.len());
    run(fresh, seed, words);
}

fn run(fresh: &mut FreshBackend<'_>, seed: u64, words: &[u64]) {
    let setup = Setup::of(seed);
    println!("setup: {setup:?}");
    let mut run = Run::new(fresh, setup);
    for (step, &word) in words.iter().enumerate() {
        run.step = step;
        run.apply(&Op::of_word(word), word);
    }
    run.step = words.len();
    run.finish();
}

// ----- keys and namespaces

/// A key. No two of the pool share their bytes.
#[derive(Clone, Copy, Debug)]
enum Key {
    U64(u64),
    I64(i64),
    Bytes(&'static [u8]),
}

/// The first [`KEYS_HOT`] get most operations, so that registrations and deletions meet.
const KEYS: [Key; 12] = [
    Key::U64(1),
    Key::I64(-7),
    Key::Bytes(b"a"),
    Key::U64(0),
    Key::U64(2),
    Key::U64(1_000_000),
    Key::U64(u64::MAX),
    Key::I64(42),
    Key::Bytes(b""),
    Key::Bytes(b"ab"),
    Key::Bytes(b"k\0"),
    Key::Bytes(b"a key longer than a timer key's inline storage"),
];
const KEYS_HOT: u64 = 4;

impl Key {
    fn encoded(self) -> Vec<u8> {
        let bytes = match self {
            Key::U64(key) => key.to_be_bytes().to_vec(),
            Key::I64(key) => order_preserving_i64(key).to_be_bytes().to_vec(),
            Key::Bytes(key) => key.to_vec(),
        };
        [&(bytes.len() as u16).to_be_bytes()[..], &bytes].concat()
    }

    fn query(self) -> QueryKey<'static> {
        match self {
            Key::U64(key) => QueryKey::U64(key),
            Key::I64(key) => QueryKey::I64(key),
            Key::Bytes(key) => QueryKey::Bytes(key),
        }
    }

    fn key_group(self, max: MaxParallelism) -> KeyGroup {
        self.query().key_group(max)
    }

    fn make_current(self, state: &mut KeyedState) {
        match self {
            Key::U64(key) => state.set_current_key_u64(key),
            Key::I64(key) => state.set_current_key_i64(key),
            Key::Bytes(key) => state.set_current_key_bytes(key).expect("a short key"),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Namespace {
    Void,
    Int(i64),
    Bytes(&'static [u8]),
}

const NAMESPACES: [Namespace; 5] =
    [Namespace::Void, Namespace::Int(-1), Namespace::Int(10), Namespace::Bytes(b"w"), Namespace::Bytes(b"w\0")];

impl Namespace {
    fn bytes(self) -> Vec<u8> {
        match self {
            Namespace::Void => Vec::new(),
            Namespace::Int(namespace) => order_preserving_i64(namespace).to_be_bytes().to_vec(),
            Namespace::Bytes(bytes) => bytes.to_vec(),
        }
    }

    fn encoded(self) -> Vec<u8> {
        let bytes = self.bytes();
        [&(bytes.len() as u16).to_be_bytes()[..], &bytes].concat()
    }

    fn make_current(self, state: &mut KeyedState) {
        match self {
            Namespace::Void => state.set_namespace(&[]).expect("a short namespace"),
            Namespace::Int(namespace) => state.set_namespace_i64(namespace),
            Namespace::Bytes(bytes) => state.set_namespace(bytes).expect("a short namespace"),
        }
    }
}

// ----- the setup and the operations

#[derive(Clone, Copy, Debug)]
struct Setup {
    max: MaxParallelism,
    parallelism: u16,
}

impl Setup {
    fn of(seed: u64) -> Setup {
        let mut rng = Lcg::new(seed ^ SETUP_SALT);
        let max = MaxParallelism::new([1, 3, 8, 32, 128][rng.below(5) as usize]).expect("in range");
        let parallelism = 1 + rng.below(u64::from(PARALLELISM_MAX.min(max.get()))) as u16;
        Setup { max, parallelism }
    }
}

/// A timer's time, relative to the current watermark or processing time, or at an extreme.
#[derive(Clone, Copy, Debug)]
enum When {
    /// This many ms from the current time (the watermark, 0 before the first).
    Near(i64),
    Lowest,
    Highest,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Register {
        domain: TimeDomain,
        key: usize,
        namespace: usize,
        when: When,
    },
    /// Deletes the `pick`-th timer of the model in `domain` (modulo their number), if any.
    DeleteExisting {
        domain: TimeDomain,
        pick: u64,
    },
    /// Deletes a timer that may not exist.
    Delete {
        domain: TimeDomain,
        key: usize,
        namespace: usize,
        when: When,
    },
    AdvanceWatermark(i64),
    AdvanceProcessingTime(u64),
    Capture,
    WriteCaptures,
    Complete,
    Recover {
        checkpoint: usize,
        parallelism: u16,
    },
    RestoreSnapshot {
        parallelism: u16,
    },
    Verify,
}

fn random_domain(rng: &mut Lcg) -> TimeDomain {
    if rng.below(2) == 0 {
        TimeDomain::EventTime
    } else {
        TimeDomain::ProcessingTime
    }
}

fn random_when(rng: &mut Lcg) -> When {
    match rng.below(50) {
        0 => When::Lowest,
        1 => When::Highest,
        _ => When::Near(rng.below(16) as i64 - 3),
    }
}

impl Op {
    fn of_word(word: u64) -> Op {
        let mut rng = Lcg::new(word);
        let key = if rng.below(10) < 7 { rng.below(KEYS_HOT) } else { rng.below(KEYS.len() as u64) } as usize;
        let namespace = rng.below(NAMESPACES.len() as u64) as usize;
        let domain = random_domain(&mut rng);
        let parallelism = 1 + rng.below(u64::from(PARALLELISM_MAX)) as u16;
        match rng.below(100) {
            0..=44 => Op::Register { domain, key, namespace, when: random_when(&mut rng) },
            45..=54 => Op::DeleteExisting { domain, pick: rng.next_u64() },
            55..=59 => Op::Delete { domain, key, namespace, when: random_when(&mut rng) },
            60..=71 => Op::AdvanceWatermark(rng.below(7) as i64),
            72..=83 => Op::AdvanceProcessingTime(rng.below(7)),
            84..=88 => Op::Capture,
            89..=91 => Op::WriteCaptures,
            92 => Op::Complete,
            93..=95 => Op::Recover { checkpoint: rng.below(CHECKPOINTS_KEPT_MAX as u64) as usize, parallelism },
            96..=97 => Op::RestoreSnapshot { parallelism },
            _ => Op::Verify,
        }
    }
}

// ----- the model

/// `(domain, time, key group, encoded key, encoded namespace, key index, namespace index)`:
/// ordered as timers fire (the indexes follow from the encodings).
type ModelTimer = (TimeDomain, u64, u16, Vec<u8>, Vec<u8>, usize, usize);

#[derive(Clone, Debug, Default)]
struct Model {
    timers: BTreeSet<ModelTimer>,
    /// Timers fired, per `(key, namespace)` index.
    fires: BTreeMap<(usize, usize), u64>,
}

impl Model {
    /// Removes and returns the first timer of `domain` in `range` if it is due at `limit`.
    fn pop_due(&mut self, domain: TimeDomain, range: KeyGroupRange, limit: u64) -> Option<ModelTimer> {
        let first = self.first(domain, range)?;
        if first.1 > limit {
            return None;
        }
        let first = first.clone();
        self.timers.remove(&first);
        Some(first)
    }

    fn first(&self, domain: TimeDomain, range: KeyGroupRange) -> Option<&ModelTimer> {
        self.timers.iter().find(|timer| timer.0 == domain && range.contains(KeyGroup(timer.2)))
    }
}

fn sort_key(time: TimerTime) -> u64 {
    match time {
        TimerTime::Event(time) => order_preserving_i64(time.0),
        TimerTime::Processing(instant) => instant.0,
    }
}

// ----- the run

struct Subtask {
    state: KeyedState,
    timers: TimerService,
}

struct PendingCapture {
    checkpoint: CheckpointId,
    generation: u64,
    model: Model,
    captures: Vec<StateCapture>,
}

struct WrittenCheckpoint {
    checkpoint: CheckpointId,
    generation: u64,
    model: Model,
    files: Vec<String>,
}

struct Run<'f, 'a> {
    fresh: &'f mut FreshBackend<'a>,
    setup: Setup,
    subtasks: Vec<Subtask>,
    parallelism: u16,
    fires: ValueState<u64>,
    model: Model,
    /// The watermark (`i64::MIN` before the first) and processing time.
    watermark: i64,
    now: u64,
    storage: MemStorage,
    pending: Vec<PendingCapture>,
    checkpoints: Vec<WrittenCheckpoint>,
    generation: u64,
    checkpoint_last: u64,
    step: usize,
    fired_count: u64,
    registered_count: u64,
    restore_count: usize,
}

fn ok<T>(result: Result<T, StateError>, at: &str) -> T {
    result.unwrap_or_else(|error| panic!("{at}: {error}"))
}

impl<'f, 'a> Run<'f, 'a> {
    fn new(fresh: &'f mut FreshBackend<'a>, setup: Setup) -> Run<'f, 'a> {
        let mut probe = KeyedState::new(Box::new(crate::state::HeapBackend::new(KeyGroupRange::new(0, 0))), setup.max);
        let fires = probe.value_state(FIRES_STATE, None).expect("declared");
        let mut run = Run {
            fresh,
            setup,
            subtasks: Vec::new(),
            parallelism: 0,
            fires,
            model: Model::default(),
            watermark: i64::MIN,
            now: 0,
            storage: MemStorage::new(),
            pending: Vec::new(),
            checkpoints: Vec::new(),
            generation: 0,
            checkpoint_last: 0,
            step: 0,
            fired_count: 0,
            registered_count: 0,
            restore_count: 0,
        };
        let parallelism = run.parallelism_for(setup.parallelism);
        run.subtasks =
            (0..parallelism).map(|index| run.fresh_subtask(setup.max.range_of(index, parallelism))).collect();
        run.parallelism = parallelism;
        run
    }

    fn parallelism_for(&self, parallelism: u16) -> u16 {
        parallelism.clamp(1, self.setup.max.get().min(PARALLELISM_MAX))
    }

    /// A subtask over an empty backend: the fires state, then the timers (ids 0, 1, 2).
    fn fresh_subtask(&mut self, range: KeyGroupRange) -> Subtask {
        let backend = (self.fresh)(range);
        assert_eq!(backend.key_groups(), range, "step {}: a fresh backend for {range:?}", self.step);
        let mut state = KeyedState::new(backend, self.setup.max);
        self.fires = ok(state.value_state(FIRES_STATE, None), "declaring fires");
        let timers = ok(TimerService::declare(&mut state), "declaring the timers");
        Subtask { state, timers }
    }

    fn subtask_of(&self, key: Key) -> usize {
        let group = key.key_group(self.setup.max);
        usize::from(self.setup.max.subtask_of(group, self.parallelism))
    }

    fn time_of(&self, domain: TimeDomain, when: When) -> TimerTime {
        match (domain, when) {
            (TimeDomain::EventTime, When::Near(ms)) => {
                TimerTime::Event(EventTime(self.watermark.max(0).saturating_add(ms)))
            }
            (TimeDomain::EventTime, When::Lowest) => TimerTime::Event(EventTime::MIN),
            (TimeDomain::EventTime, When::Highest) => TimerTime::Event(EventTime::MAX),
            (TimeDomain::ProcessingTime, When::Near(ms)) => {
                TimerTime::Processing(Instant(self.now.saturating_add_signed(ms)))
            }
            (TimeDomain::ProcessingTime, When::Lowest) => TimerTime::Processing(Instant(0)),
            (TimeDomain::ProcessingTime, When::Highest) => TimerTime::Processing(Instant(u64::MAX)),
        }
    }

    fn model_timer(&self, time: TimerTime, key: usize, namespace: usize) -> ModelTimer {
        let group = KEYS[key].key_group(self.setup.max).0;
        (time.domain(), sort_key(time), group, KEYS[key].encoded(), NAMESPACES[namespace].encoded(), key, namespace)
    }

    fn apply(&mut self, op: &Op, word: u64) {
        let at = format!("step {}: {op:?}", self.step);
        match *op {
            Op::Register { domain, key, namespace, when } => {
                let time = self.time_of(domain, when);
                let index = self.subtask_of(KEYS[key]);
                let Subtask { state, timers } = &mut self.subtasks[index];
                KEYS[key].make_current(state);
                NAMESPACES[namespace].make_current(state);
                ok(register(timers, state, time), &at);
                self.registered_count += 1;
                self.model.timers.insert(self.model_timer(time, key, namespace));
            }
            Op::DeleteExisting { domain, pick } => {
                let existing: Vec<&ModelTimer> = self.model.timers.iter().filter(|t| t.0 == domain).collect();
                if existing.is_empty() {
                    return;
                }
                let timer = existing[(pick % existing.len() as u64) as usize].clone();
                let time = match domain {
                    TimeDomain::EventTime => {
                        TimerTime::Event(EventTime(crate::state::order_preserving_i64_inverse(timer.1)))
                    }
                    TimeDomain::ProcessingTime => TimerTime::Processing(Instant(timer.1)),
                };
                self.delete(time, timer.5, timer.6, &at);
            }
            Op::Delete { domain, key, namespace, when } => {
                let time = self.time_of(domain, when);
                self.delete(time, key, namespace, &at);
            }
            Op::AdvanceWatermark(ms) => {
                self.watermark = match self.watermark {
                    i64::MIN => ms - 3,
                    watermark => watermark.saturating_add(ms),
                };
                self.fire_all(TimeDomain::EventTime, word, &at);
            }
            Op::AdvanceProcessingTime(ms) => {
                self.now = self.now.saturating_add(ms);
                self.fire_all(TimeDomain::ProcessingTime, word, &at);
            }
            Op::Capture => self.capture(),
            Op::WriteCaptures => self.write_captures(),
            Op::Complete => {
                let generation = self.generation;
                if let Some(written) = self.checkpoints.iter().rev().find(|c| c.generation == generation) {
                    let checkpoint = written.checkpoint;
                    self.subtasks.iter_mut().for_each(|subtask| subtask.state.checkpoint_complete(checkpoint));
                }
            }
            Op::Recover { checkpoint, parallelism } => self.recover(checkpoint, parallelism),
            Op::RestoreSnapshot { parallelism } => self.restore_snapshot(parallelism),
            Op::Verify => self.verify(&at),
        }
    }

    fn delete(&mut self, time: TimerTime, key: usize, namespace: usize, at: &str) {
        let index = self.subtask_of(KEYS[key]);
        let Subtask { state, timers } = &mut self.subtasks[index];
        KEYS[key].make_current(state);
        NAMESPACES[namespace].make_current(state);
        ok(delete(timers, state, time), at);
        let timer = self.model_timer(time, key, namespace);
        self.model.timers.remove(&timer);
    }

    fn limit(&self, domain: TimeDomain) -> TimerTime {
        match domain {
            TimeDomain::EventTime => TimerTime::Event(EventTime(self.watermark)),
            TimeDomain::ProcessingTime => TimerTime::Processing(Instant(self.now)),
        }
    }

    /// Fires the due timers of `domain` at every subtask, in lockstep with the model, and checks
    /// what is left.
    fn fire_all(&mut self, domain: TimeDomain, word: u64, at: &str) {
        let limit = self.limit(domain);
        // Handlers draw from their own generator, in firing order: the same in model and service.
        let mut rng = Lcg::new(word ^ 0x71);
        for index in 0..self.subtasks.len() {
            let range = self.subtasks[index].state.key_groups();
            let mut fired = 0;
            loop {
                let Subtask { state, timers } = &mut self.subtasks[index];
                let got = ok(poll(timers, state, limit), at);
                let expected = self.model.pop_due(domain, range, sort_key(limit));
                let (got, expected) = match (got, expected) {
                    (None, None) => break,
                    (Some(got), Some(expected)) => (got, expected),
                    (got, expected) => {
                        panic!("{at}: subtask {index} fired {got:?}, the model {expected:?} (limit {limit:?})")
                    }
                };
                fired += 1;
                assert!(fired <= FIRES_PER_LOOP_MAX, "{at}: a firing loop that does not end");
                self.check_fired(&got, &expected, index, at);
                self.handle(index, &got, &expected, &mut rng, at);
            }
            self.fired_count += fired as u64;
            self.check_next(index, domain == TimeDomain::EventTime, at);
        }
    }

    /// The timer fired is the model's, and its key and namespace are current.
    fn check_fired(&mut self, got: &Timer, expected: &ModelTimer, index: usize, at: &str) {
        let at = format!("{at}: subtask {index} fired {got:?}, the model {expected:?}");
        assert_eq!(sort_key(got.time), expected.1, "{at}");
        assert_eq!(got.time.domain(), expected.0, "{at}");
        assert_eq!(got.key_group.0, expected.2, "{at}");
        assert_eq!([&(got.key().len() as u16).to_be_bytes()[..], got.key()].concat(), expected.3, "{at}");
        assert_eq!(got.namespace(), NAMESPACES[expected.6].bytes(), "{at}");
        let state = &mut self.subtasks[index].state;
        assert_eq!(state.current_key_group(), got.key_group, "{at}");
        match KEYS[expected.5] {
            Key::U64(key) => assert_eq!(got.key_u64(), Some(key), "{at}"),
            Key::I64(key) => assert_eq!(got.key_i64(), Some(key), "{at}"),
            Key::Bytes(_) => {}
        }
        if let Namespace::Int(namespace) = NAMESPACES[expected.6] {
            assert_eq!(got.namespace_i64(), Some(namespace), "{at}");
        }
    }

    /// A timer's handler: counts it in its key's and namespace's state (current as it fired),
    /// and sometimes registers or deletes a timer of its key.
    fn handle(&mut self, index: usize, got: &Timer, expected: &ModelTimer, rng: &mut Lcg, at: &str) {
        let (key, namespace) = (expected.5, expected.6);
        let fires = &self.fires;
        let state = &mut self.subtasks[index].state;
        let count = ok(fires.get(state), at).unwrap_or(0);
        ok(fires.update(state, &(count + 1)), at);
        let modelled = self.model.fires.entry((key, namespace)).or_default();
        assert_eq!(count, *modelled, "{at}: fires of {:?} in {:?} before {got:?}", KEYS[key], NAMESPACES[namespace]);
        *modelled += 1;
        let domain = got.time.domain();
        match rng.below(10) {
            0..=2 => {
                // Around the limit: due at once (fires in this loop) or later.
                let namespace = rng.below(NAMESPACES.len() as u64) as usize;
                let time = self.time_of(domain, When::Near(0));
                let time = match time {
                    TimerTime::Event(t) => TimerTime::Event(EventTime(t.0.saturating_add(rng.below(5) as i64 - 3))),
                    TimerTime::Processing(t) => {
                        TimerTime::Processing(Instant(t.0.saturating_add_signed(rng.below(5) as i64 - 3)))
                    }
                };
                let Subtask { state, timers } = &mut self.subtasks[index];
                NAMESPACES[namespace].make_current(state);
                ok(register(timers, state, time), at);
                self.registered_count += 1;
                self.model.timers.insert(self.model_timer(time, key, namespace));
            }
            3 => {
                let namespace = rng.below(NAMESPACES.len() as u64) as usize;
                let time = self.time_of(domain, When::Near(rng.below(4) as i64));
                self.delete(time, key, namespace, at);
            }
            _ => {}
        }
    }

    /// The next timer times and the watermark bound agree with the model at subtask `index`;
    /// `fired`: every due event-time timer just fired.
    fn check_next(&mut self, index: usize, fired: bool, at: &str) {
        let range = self.subtasks[index].state.key_groups();
        let next_event = self.model.first(TimeDomain::EventTime, range).map(|timer| timer.1);
        let next_processing = self.model.first(TimeDomain::ProcessingTime, range).map(|timer| timer.1);
        let Subtask { state, timers } = &mut self.subtasks[index];
        let got_event = ok(timers.next_event_time(state), at);
        assert_eq!(got_event.map(|time| order_preserving_i64(time.0)), next_event, "{at}: next event time at {index}");
        let got_processing = ok(timers.next_processing_time(state), at);
        assert_eq!(got_processing.map(|time| time.0), next_processing, "{at}: next processing time at {index}");
        let bound = ok(timers.watermark_bound(state), at);
        let expected = got_event.map_or(EventTime::MAX, |next| EventTime(next.0.saturating_sub(1)));
        assert_eq!(bound, expected, "{at}: watermark bound at {index}");
        // All due timers fired: the watermark passes none that has not (a timer at the lowest
        // time is due at every watermark, so the bound can only be at it then).
        if fired && self.watermark > i64::MIN {
            let due_left = got_event.is_some_and(|next| next.0 <= self.watermark);
            assert!(!due_left, "{at}: subtask {index} left a timer at {got_event:?} at watermark {}", self.watermark);
            assert!(bound.0 >= self.watermark, "{at}: bound {bound:?} below watermark {}", self.watermark);
        }
    }

    fn verify(&mut self, at: &str) {
        for index in 0..self.subtasks.len() {
            self.check_next(index, false, at);
        }
        for (key_index, key) in KEYS.iter().enumerate() {
            let index = self.subtask_of(*key);
            for (namespace_index, namespace) in NAMESPACES.iter().enumerate() {
                let got = ok(self.subtasks[index].state.query(FIRES_STATE, key.query(), &namespace.bytes()), at);
                let expected = match self.model.fires.get(&(key_index, namespace_index)) {
                    None => Queried::Absent,
                    Some(count) => {
                        let mut encoded = Vec::new();
                        count.encode(&mut encoded);
                        Queried::Value(encoded)
                    }
                };
                assert_eq!(got, expected, "{at}: fires of {key:?} in {namespace:?}");
            }
        }
    }

    fn capture(&mut self) {
        if self.pending.len() == PENDING_MAX {
            self.write_oldest_capture();
        }
        self.checkpoint_last += 1;
        let checkpoint = CheckpointId(self.checkpoint_last);
        let at = format!("step {}: capture {checkpoint:?}", self.step);
        let mut captures = Vec::new();
        for (index, subtask) in self.subtasks.iter_mut().enumerate() {
            let target = CaptureTarget {
                checkpoint,
                path: format!("chk-{}/timers-{index}", checkpoint.0),
                shared_dir: "shared/timers".to_string(),
            };
            captures.push(ok(subtask.state.capture(&target), &at));
        }
        let model = self.model.clone();
        self.pending.push(PendingCapture { checkpoint, generation: self.generation, model, captures });
    }

    fn write_oldest_capture(&mut self) {
        let pending = self.pending.remove(0);
        let at = format!("step {}: write {:?}", self.step, pending.checkpoint);
        let mut files = Vec::new();
        for capture in pending.captures {
            files.extend(capture.files);
            files.extend(ok(capture.write.write(&mut self.storage), &at));
        }
        if self.checkpoints.len() == CHECKPOINTS_KEPT_MAX {
            self.checkpoints.remove(0);
        }
        let (checkpoint, generation, model) = (pending.checkpoint, pending.generation, pending.model);
        self.checkpoints.push(WrittenCheckpoint { checkpoint, generation, model, files });
    }

    fn write_captures(&mut self) {
        while !self.pending.is_empty() {
            self.write_oldest_capture();
        }
    }

    /// A crash and a recovery from written checkpoint `choice` at `parallelism`.
    fn recover(&mut self, choice: usize, parallelism: u16) {
        if self.checkpoints.is_empty() {
            return;
        }
        self.pending.clear();
        let written = &self.checkpoints[choice % self.checkpoints.len()];
        let (files, model) = (written.files.clone(), written.model.clone());
        let what = format!("step {}: recover {:?}", self.step, written.checkpoint);
        let parallelism = self.parallelism_for(parallelism);
        let mut subtasks = Vec::new();
        for index in 0..parallelism {
            subtasks.push(self.restored(self.setup.max.range_of(index, parallelism), &files, &what));
        }
        self.replace_subtasks(subtasks, parallelism, model);
        self.verify(&format!("{what} at parallelism {parallelism}"));
    }

    /// A subtask restored from `files`, asking `fresh` again if a backend refuses another's format.
    fn restored(&mut self, range: KeyGroupRange, files: &[String], what: &str) -> Subtask {
        for _ in 0..RESTORE_ATTEMPTS_MAX {
            let mut subtask = self.fresh_subtask(range);
            match subtask.state.restore_files(&mut self.storage, files) {
                Ok(()) => return subtask,
                Err(StateError::Backend(reason)) if reason.contains("only the backend that wrote it") => {
                    println!("{what}: {range:?} refused ({reason}), asking for another backend");
                }
                Err(error) => panic!("{what}: restore of {range:?} from {files:?}: {error}"),
            }
        }
        panic!("{what}: {RESTORE_ATTEMPTS_MAX} backends refused to restore {range:?}")
    }

    fn replace_subtasks(&mut self, subtasks: Vec<Subtask>, parallelism: u16, model: Model) {
        self.subtasks = subtasks;
        self.parallelism = parallelism;
        self.model = model;
        self.generation += 1;
        self.restore_count += 1;
    }

    /// Portable snapshots of every subtask restored at `parallelism` through raw backend access.
    fn restore_snapshot(&mut self, parallelism: u16) {
        self.write_captures();
        let at = format!("step {}: portable snapshot", self.step);
        let mut writer = SnapshotWriter::new();
        for subtask in &mut self.subtasks {
            let part = ok(subtask.state.backend_mut().snapshot(), &at);
            for (key_group, key, value) in part.entries() {
                writer.add(key_group, key, value);
            }
        }
        let snapshot = writer.finish();
        let parallelism = self.parallelism_for(parallelism);
        let mut subtasks = Vec::new();
        for index in 0..parallelism {
            let mut subtask = self.fresh_subtask(self.setup.max.range_of(index, parallelism));
            // The service reads its heads before the restore: the restore must make it read again.
            ok(subtask.timers.next_event_time(&mut subtask.state), &at);
            ok(subtask.state.backend_mut().restore(&snapshot), &at);
            subtasks.push(subtask);
        }
        let model = self.model.clone();
        self.replace_subtasks(subtasks, parallelism, model);
        self.verify(&format!("{at} restored at parallelism {parallelism}"));
    }

    /// A checkpoint restored at another parallelism, then every timer fires.
    fn finish(&mut self) {
        self.capture();
        self.write_captures();
        let last = self.checkpoints.len() - 1;
        let other = if self.parallelism == 1 { 2 } else { self.parallelism - 1 };
        self.recover(last, other);
        let at = format!("step {}: finish", self.step);
        self.watermark = i64::MAX;
        self.fire_all(TimeDomain::EventTime, 1, &at);
        self.now = u64::MAX;
        self.fire_all(TimeDomain::ProcessingTime, 2, &at);
        assert!(self.model.timers.is_empty(), "{at}: the model holds {:?}", self.model.timers);
        self.verify(&at);
        println!(
            "timers model: {} steps, {} registrations, {} timers fired, {} restores",
            self.step, self.registered_count, self.fired_count, self.restore_count
        );
    }
}

fn register(timers: &mut TimerService, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
    match time {
        TimerTime::Event(time) => timers.register_event_timer(state, time),
        TimerTime::Processing(time) => timers.register_processing_timer(state, time),
    }
}

fn delete(timers: &mut TimerService, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
    match time {
        TimerTime::Event(time) => timers.delete_event_timer(state, time),
        TimerTime::Processing(time) => timers.delete_processing_timer(state, time),
    }
}

fn poll(timers: &mut TimerService, state: &mut KeyedState, limit: TimerTime) -> Result<Option<Timer>, StateError> {
    match limit {
        TimerTime::Event(watermark) => timers.poll_event_timer(state, watermark),
        TimerTime::Processing(now) => timers.poll_processing_timer(state, now),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::state::{HeapBackend, StateBackend};

    fn heap(range: KeyGroupRange) -> Box<dyn StateBackend> {
        Box::new(HeapBackend::new(range))
    }

    // Goal: every timer fires exactly once, in (time, key group, key, namespace) order, none
    // before its time, through checkpoints, recoveries and rescaling, on the heap backend.
    // Method: seeded runs of the timers conformance suite in lockstep with its model (each run
    // prints its seed and how to replay it).
    #[test]
    fn heap_timers_match_model() {
        for seed in 0..32 {
            check_timers_against_model(&mut heap, seed, 1_500);
        }
    }

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(64)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        // Goal: as above, for operation sequences proptest draws and shrinks.
        // Method: a setup seed and up to 400 operation words; a failure prints the shrunk seed
        // and words (replay: check_timer_ops_against_model with them). PROPTEST_CASES sets the
        // number of cases (64 by default).
        #[test]
        fn heap_timers_match_model_on_generated_operations(
            seed in any::<u64>(),
            words in prop::collection::vec(any::<u64>(), 0..400),
        ) {
            check_timer_ops_against_model(&mut heap, seed, &words);
        }
    }
}
