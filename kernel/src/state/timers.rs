//! Timers: event-time and processing-time timers per key and namespace, kept in the state backend.
//!
//! An operator that needs timers declares a [`TimerService`] beside its other states
//! ([`TimerService::declare`], at the same place in its declaration order on every run, as for
//! any state). A timer belongs to the current key and namespace of the [`KeyedState`] when it is
//! registered, and to a time: an [`EventTime`] (it fires once the watermark reaches it) or an
//! [`Instant`] (once processing time does). Registering the same `(key, namespace, time)` again
//! is one timer; [`TimerService::delete_event_timer`] removes one, and deleting a timer that does
//! not exist does nothing.
//!
//! # Firing, and the order of firing
//! Timers fire through polls: [`TimerService::poll_event_timer`] removes the next timer due at a
//! watermark (time <= watermark), makes its key and namespace current in the `KeyedState`, and
//! returns it, so the caller reads and writes that key's state as it handles the timer, and may
//! register or delete timers meanwhile. A timer it registers for a time already due fires in the
//! same loop, in its place in the order. Timers of one domain fire in the total order
//! `(time, key group, key, namespace)`, where a key and a namespace compare as their encoded
//! bytes compare (`length u16 BE | bytes`: integer keys and namespaces numerically, byte strings
//! shorter first), so every run and every backend fires them in the same order.
//!
//! # The output watermark never passes an unfired timer
//! An operator handles a watermark `W` by firing every event-time timer due at `W`, then
//! forwarding `W`:
//! ```text
//! state.set_event_time(watermark); // event-time TTL reads it, in the handlers too
//! while let Some(timer) = timers.poll_event_timer(state, watermark)? {
//!     on_timer(state, &timer)?; // may register timers, also for times <= watermark
//! }
//! emit(Watermark(watermark));
//! ```
//! When the loop ends no timer at or below `W` is left, so `W` passes none that has not fired.
//! (A poll changes the current key and namespace: set them again before other state access.)
//! An operator that holds its output watermark below its input's for any other reason bounds
//! it with [`TimerService::watermark_bound`]. Drivers wake an operator for processing time at
//! [`TimerService::next_processing_time`] (`poll_timeout`), and poll with the `now` they pass.
//!
//! # Storage
//! The timers are the entries (with empty values) of two states the service declares, of kind
//! [`StateKind::Timers`](super::keyed::StateKind::Timers), named [`EVENT_TIMERS_STATE`] and
//! [`PROCESSING_TIMERS_STATE`] (names starting with `timers/` are reserved for them). A timer's
//! key is
//! `state id (u16 BE) | time (u64 BE) | key length (u16 BE) | key | namespace length (u16 BE) | namespace`,
//! where the time is an event time with its sign bit flipped (so byte order is numeric order)
//! or an instant as it is. The states are declared `ordered`, so a key group's timers are in
//! time order in every backend: in RocksDB the state's column family, on the heap its ordered
//! index. Being state, timers are part of every capture and snapshot, restore with the other
//! states at any parallelism (by key group), and take part in the descriptors' compatibility
//! check: a snapshot with timers does not restore into an operator that declares none.
//!
//! # Memory
//! The service keeps in memory only, per key group and domain: the time of the group's earliest
//! timer (`heads`, ordered as `(time, key group)` in `order`); a key at or below the group's
//! smallest timer key (`floors`, where the next read starts: past the tombstones of the timers
//! fired before, which RocksDB would otherwise step over again on every read); and up to
//! eight (`READ_AHEAD_MAX`) of the group's first timer keys, read in one scan (`ahead`: a RocksDB
//! iterator costs microseconds to create, so one serves several timers), which registrations
//! and deletions keep exact. Its memory grows with the number of key groups, never with the
//! number of timers; the timers themselves are where the backend keeps its state (RocksDB: on
//! disk, 10,000,000 timers in about 250 MB of resident memory, see `benches/timers.rs`). All
//! of it is read from the backend again (one scan per key group and domain) whenever the
//! `KeyedState`'s [`generation`](KeyedState::generation) changes: after a restore, or raw
//! access to the backend.

use std::collections::{BTreeSet, VecDeque};

use smallvec::SmallVec;

use super::keyed::KeyedState;
use super::{order_preserving_i64, order_preserving_i64_inverse, StateBackend, StateError, StateId};
use crate::key_group::{KeyGroup, KeyGroupRange};
use crate::time::{EventTime, Instant};

/// The state that holds the event-time timers.
pub const EVENT_TIMERS_STATE: &str = "timers/event";
/// The state that holds the processing-time timers.
pub const PROCESSING_TIMERS_STATE: &str = "timers/processing";

/// The bytes of a timer's key before its key and namespace: the state id and the time.
const TIME_END: usize = 2 + 8;
/// The shortest timer key: the time, an empty key and an empty namespace.
const TIMER_KEY_SIZE_MIN: usize = TIME_END + 2 + 2;

/// Timer keys a poll reads ahead per key group: one scan of the backend (in RocksDB an
/// iterator, which costs microseconds to create) serves this many timers.
const READ_AHEAD_MAX: usize = 8;
/// A timer's key, or its key and namespace: inline up to the size of typical ones.
type TimerKey = SmallVec<[u8; 40]>;

/// Which clock a timer waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeDomain {
    EventTime,
    ProcessingTime,
}

impl TimeDomain {
    fn index(self) -> usize {
        match self {
            TimeDomain::EventTime => 0,
            TimeDomain::ProcessingTime => 1,
        }
    }
}

/// When a timer fires: an event time or a processing-time instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerTime {
    Event(EventTime),
    Processing(Instant),
}

impl TimerTime {
    pub fn domain(self) -> TimeDomain {
        match self {
            TimerTime::Event(_) => TimeDomain::EventTime,
            TimerTime::Processing(_) => TimeDomain::ProcessingTime,
        }
    }

    /// The time as a timer's key holds it: ordered as the times are.
    fn sort_key(self) -> u64 {
        match self {
            TimerTime::Event(time) => order_preserving_i64(time.0),
            TimerTime::Processing(instant) => instant.0,
        }
    }

    fn of_sort_key(domain: TimeDomain, sort_key: u64) -> TimerTime {
        match domain {
            TimeDomain::EventTime => TimerTime::Event(EventTime(order_preserving_i64_inverse(sort_key))),
            TimeDomain::ProcessingTime => TimerTime::Processing(Instant(sort_key)),
        }
    }
}

/// A timer that fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timer {
    pub time: TimerTime,
    pub key_group: KeyGroup,
    /// `key length | key | namespace length | namespace`.
    encoded: TimerKey,
    /// Where the namespace length starts in `encoded`.
    key_end: usize,
}

impl Timer {
    /// The key's bytes, as the `set_current_key_*` call that registered it encoded them:
    /// integers big-endian, signed ones with the sign bit flipped.
    pub fn key(&self) -> &[u8] {
        &self.encoded[2..self.key_end]
    }

    /// The namespace's bytes (`set_namespace_i64`: big-endian, the sign bit flipped).
    pub fn namespace(&self) -> &[u8] {
        &self.encoded[self.key_end + 2..]
    }

    /// The key, if it was set by `set_current_key_u64`.
    pub fn key_u64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.key().try_into().ok()?))
    }

    /// The key, if it was set by `set_current_key_i64`.
    pub fn key_i64(&self) -> Option<i64> {
        self.key_u64().map(order_preserving_i64_inverse)
    }

    /// The namespace, if it was set by `set_namespace_i64`.
    pub fn namespace_i64(&self) -> Option<i64> {
        Some(order_preserving_i64_inverse(u64::from_be_bytes(self.namespace().try_into().ok()?)))
    }
}

/// The timers of one domain: where they are, and what the service remembers of them.
struct Queue {
    domain: TimeDomain,
    id: StateId,
    /// The time (sort key) of the earliest timer of each key group, by offset in the range.
    heads: Vec<Option<u64>>,
    /// `(earliest time, key group)` of every group that has timers: the first names the next timer.
    order: BTreeSet<(u64, u16)>,
    /// Per group, a key at or below every one of the group's timer keys (empty: the state's
    /// first key): reads of the group start there.
    floors: Vec<TimerKey>,
    /// Per group, up to [`READ_AHEAD_MAX`] of its first timer keys, in order, read ahead in one
    /// scan: every timer key of the group up to the last of them is among them (empty: none
    /// known). Registrations and deletions keep them so.
    ahead: Vec<VecDeque<TimerKey>>,
}

impl Queue {
    fn new(domain: TimeDomain, id: StateId, range: KeyGroupRange) -> Queue {
        Queue {
            domain,
            id,
            heads: vec![None; range.count()],
            order: BTreeSet::new(),
            floors: vec![TimerKey::new(); range.count()],
            ahead: vec![VecDeque::new(); range.count()],
        }
    }

    fn state_name(&self) -> &'static str {
        match self.domain {
            TimeDomain::EventTime => EVENT_TIMERS_STATE,
            TimeDomain::ProcessingTime => PROCESSING_TIMERS_STATE,
        }
    }

    /// The time of a timer key read from the backend (it came from outside: it may be damaged).
    fn time_of(&self, key: &[u8], key_group: KeyGroup) -> Result<u64, StateError> {
        if key.len() < TIMER_KEY_SIZE_MIN {
            return Err(StateError::Value {
                state: self.state_name().to_string(),
                key_group: key_group.0,
                reason: format!("timer key of {} bytes, shorter than {TIMER_KEY_SIZE_MIN}", key.len()),
            });
        }
        Ok(sort_key_of(key))
    }

    /// Makes `head` the earliest time of group `key_group` (at `offset` in the range).
    fn set_head(&mut self, offset: usize, key_group: KeyGroup, head: Option<u64>) {
        if self.heads[offset] == head {
            return;
        }
        if let Some(old) = self.heads[offset] {
            let removed = self.order.remove(&(old, key_group.0));
            assert!(removed, "head {old} of key group {} missing from the order", key_group.0);
        }
        self.heads[offset] = head;
        if let Some(new) = head {
            self.order.insert((new, key_group.0));
        }
        assert!(self.order.len() <= self.heads.len(), "{} heads of {} key groups", self.order.len(), self.heads.len());
    }

    /// Reads the first timer keys of `key_group` (from its floor) into its empty read-ahead.
    fn read_ahead(
        &mut self,
        backend: &mut dyn StateBackend,
        key_group: KeyGroup,
        offset: usize,
    ) -> Result<(), StateError> {
        assert!(self.ahead[offset].is_empty(), "read ahead of key group {} while it holds keys", key_group.0);
        let mut keys = std::mem::take(&mut self.ahead[offset]);
        let mut damaged = None;
        let result = backend.scan_range_keys(key_group, &self.id.prefix(), &self.floors[offset], &mut |key| {
            if let Err(error) = self.time_of(key, key_group) {
                damaged = Some(error);
                return Ok(false);
            }
            keys.push_back(TimerKey::from_slice(key));
            Ok(keys.len() < READ_AHEAD_MAX)
        });
        if result.is_err() || damaged.is_some() {
            keys.clear();
        }
        self.ahead[offset] = keys;
        result?;
        damaged.map_or(Ok(()), Err)
    }

    /// The time of the first timer of `key_group`, reading ahead if nothing is known.
    fn first_time(
        &mut self,
        backend: &mut dyn StateBackend,
        key_group: KeyGroup,
        offset: usize,
    ) -> Result<Option<u64>, StateError> {
        if self.ahead[offset].is_empty() {
            self.read_ahead(backend, key_group, offset)?;
        }
        Ok(self.ahead[offset].front().map(|key| sort_key_of(key)))
    }

    /// Reads every group's earliest timers from the backend, forgetting what was known.
    fn read_heads(&mut self, backend: &mut dyn StateBackend, range: KeyGroupRange) -> Result<(), StateError> {
        self.order.clear();
        self.heads.iter_mut().for_each(|head| *head = None);
        self.floors.iter_mut().for_each(TimerKey::clear);
        self.ahead.iter_mut().for_each(VecDeque::clear);
        for (offset, key_group) in range.iter().enumerate() {
            let head = self.first_time(backend, key_group, offset)?;
            self.set_head(offset, key_group, head);
        }
        Ok(())
    }

    /// Takes a timer key registered in group `offset` into the read-ahead if it falls among it.
    fn registered(&mut self, offset: usize, key: &[u8]) {
        let ahead = &mut self.ahead[offset];
        let Some(last) = ahead.back() else { return };
        if key >= last.as_slice() {
            // Beyond what is known (or the last itself): a later read finds it.
            return;
        }
        let at = ahead.partition_point(|known| known.as_slice() < key);
        if ahead[at].as_slice() != key {
            ahead.insert(at, TimerKey::from_slice(key));
            if ahead.len() > READ_AHEAD_MAX {
                ahead.pop_back();
            }
            assert!(ahead.len() <= READ_AHEAD_MAX, "{} keys read ahead", ahead.len());
        }
    }

    /// Drops a timer key deleted in group `offset` from the read-ahead.
    fn deleted(&mut self, offset: usize, key: &[u8]) {
        let ahead = &mut self.ahead[offset];
        let at = ahead.partition_point(|known| known.as_slice() < key);
        if ahead.get(at).is_some_and(|known| known.as_slice() == key) {
            ahead.remove(at);
        }
    }
}

/// The time in a timer key of at least [`TIME_END`] bytes.
fn sort_key_of(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[2..TIME_END].try_into().expect("eight bytes"))
}

/// The event-time and processing-time timers of one operator subtask; see the module
/// documentation. Every method takes the [`KeyedState`] the service was declared in.
pub struct TimerService {
    range: KeyGroupRange,
    /// Event time, processing time ([`TimeDomain::index`]).
    queues: [Queue; 2],
    /// The `KeyedState`'s generation the heads were read at (`None`: not read yet).
    generation: Option<u64>,
    /// Reused: the key of a timer registered or deleted.
    key: TimerKey,
}

impl TimerService {
    /// Declares the timers' two states in `state` (the next two state ids): once per operator,
    /// at the same place among its declarations on every run.
    pub fn declare(state: &mut KeyedState) -> Result<TimerService, StateError> {
        let range = state.key_groups();
        let event = state.timers_state(EVENT_TIMERS_STATE)?;
        let processing = state.timers_state(PROCESSING_TIMERS_STATE)?;
        Ok(TimerService {
            range,
            queues: [
                Queue::new(TimeDomain::EventTime, event, range),
                Queue::new(TimeDomain::ProcessingTime, processing, range),
            ],
            generation: None,
            key: TimerKey::new(),
        })
    }

    /// Registers an event-time timer for the current key and namespace of `state`.
    pub fn register_event_timer(&mut self, state: &mut KeyedState, time: EventTime) -> Result<(), StateError> {
        self.register(state, TimerTime::Event(time))
    }

    /// Registers a processing-time timer for the current key and namespace of `state`.
    pub fn register_processing_timer(&mut self, state: &mut KeyedState, time: Instant) -> Result<(), StateError> {
        self.register(state, TimerTime::Processing(time))
    }

    /// Deletes the event-time timer of the current key and namespace at `time`, if there is one.
    pub fn delete_event_timer(&mut self, state: &mut KeyedState, time: EventTime) -> Result<(), StateError> {
        self.delete(state, TimerTime::Event(time))
    }

    /// Deletes the processing-time timer of the current key and namespace at `time`, if any.
    pub fn delete_processing_timer(&mut self, state: &mut KeyedState, time: Instant) -> Result<(), StateError> {
        self.delete(state, TimerTime::Processing(time))
    }

    /// Removes and returns the next event-time timer due at `watermark` (its time is at or below
    /// it), with its key and namespace made current in `state`; `None` if none is due.
    pub fn poll_event_timer(
        &mut self,
        state: &mut KeyedState,
        watermark: EventTime,
    ) -> Result<Option<Timer>, StateError> {
        self.poll(state, TimerTime::Event(watermark))
    }

    /// As [`TimerService::poll_event_timer`], for processing-time timers due at `now`.
    pub fn poll_processing_timer(&mut self, state: &mut KeyedState, now: Instant) -> Result<Option<Timer>, StateError> {
        self.poll(state, TimerTime::Processing(now))
    }

    /// The time of the next event-time timer, if there is one.
    pub fn next_event_time(&mut self, state: &mut KeyedState) -> Result<Option<EventTime>, StateError> {
        Ok(self.next(state, TimeDomain::EventTime)?.map(|time| match time {
            TimerTime::Event(time) => time,
            TimerTime::Processing(_) => unreachable!("a processing time among the event-time timers"),
        }))
    }

    /// The time of the next processing-time timer, if there is one: when a driver should wake
    /// the operator.
    pub fn next_processing_time(&mut self, state: &mut KeyedState) -> Result<Option<Instant>, StateError> {
        Ok(self.next(state, TimeDomain::ProcessingTime)?.map(|time| match time {
            TimerTime::Processing(instant) => instant,
            TimerTime::Event(_) => unreachable!("an event time among the processing-time timers"),
        }))
    }

    /// The highest watermark the operator may emit now without passing a timer that has not
    /// fired: just below the next event-time timer (`EventTime::MIN` if that is at
    /// `EventTime::MIN`), or `EventTime::MAX` if there is none.
    pub fn watermark_bound(&mut self, state: &mut KeyedState) -> Result<EventTime, StateError> {
        Ok(match self.next_event_time(state)? {
            None => EventTime::MAX,
            Some(next) => EventTime(next.0.saturating_sub(1)),
        })
    }

    /// Reads the heads from the backend if `state` changed behind the service's back.
    fn sync(&mut self, state: &mut KeyedState) -> Result<(), StateError> {
        assert_eq!(state.key_groups(), self.range, "a timer service used with another keyed state");
        if self.generation == Some(state.generation()) {
            return Ok(());
        }
        self.generation = None;
        for queue in &self.queues {
            let declared = state.descriptors().get(usize::from(queue.id.0)).map(|state| state.name.as_str());
            assert_eq!(declared, Some(queue.state_name()), "a timer service used with another keyed state");
        }
        for queue in &mut self.queues {
            queue.read_heads(state.backend_for_timers(), self.range)?;
        }
        self.generation = Some(state.generation());
        Ok(())
    }

    /// Builds the key of a timer at `time` of the current key and namespace in `self.key`.
    fn build_key(&mut self, state: &KeyedState, time: TimerTime) -> (KeyGroup, usize) {
        let (key_group, encoded) = state.current_encoded();
        let queue = &self.queues[time.domain().index()];
        self.key.clear();
        self.key.extend_from_slice(&queue.id.prefix());
        self.key.extend_from_slice(&time.sort_key().to_be_bytes());
        self.key.extend_from_slice(encoded);
        (key_group, usize::from(key_group.0 - self.range.start()))
    }

    /// After an error from the backend, what it holds is not known for sure: the next call
    /// reads it again.
    fn forget_on_error<T>(&mut self, result: Result<T, StateError>) -> Result<T, StateError> {
        if result.is_err() {
            self.generation = None;
        }
        result
    }

    fn register(&mut self, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
        self.sync(state)?;
        let result = self.register_synced(state, time);
        self.forget_on_error(result)
    }

    fn register_synced(&mut self, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
        let (key_group, offset) = self.build_key(state, time);
        state.backend_for_timers().put(key_group, &self.key, &[])?;
        let queue = &mut self.queues[time.domain().index()];
        if self.key.as_slice() < queue.floors[offset].as_slice() {
            queue.floors[offset] = self.key.clone();
        }
        queue.registered(offset, &self.key);
        let sort_key = time.sort_key();
        if queue.heads[offset].is_none_or(|head| sort_key < head) {
            queue.set_head(offset, key_group, Some(sort_key));
        }
        Ok(())
    }

    fn delete(&mut self, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
        self.sync(state)?;
        let result = self.delete_synced(state, time);
        self.forget_on_error(result)
    }

    fn delete_synced(&mut self, state: &mut KeyedState, time: TimerTime) -> Result<(), StateError> {
        let (key_group, offset) = self.build_key(state, time);
        let backend = state.backend_for_timers();
        backend.delete(key_group, &self.key)?;
        let queue = &mut self.queues[time.domain().index()];
        queue.deleted(offset, &self.key);
        if queue.heads[offset] == Some(time.sort_key()) {
            let head = queue.first_time(backend, key_group, offset)?;
            queue.set_head(offset, key_group, head);
        }
        Ok(())
    }

    fn next(&mut self, state: &mut KeyedState, domain: TimeDomain) -> Result<Option<TimerTime>, StateError> {
        self.sync(state)?;
        let queue = &self.queues[domain.index()];
        Ok(queue.order.first().map(|&(sort_key, _)| TimerTime::of_sort_key(domain, sort_key)))
    }

    /// Removes and returns the first timer of `limit`'s domain, if it is due at `limit`.
    fn poll(&mut self, state: &mut KeyedState, limit: TimerTime) -> Result<Option<Timer>, StateError> {
        self.sync(state)?;
        let result = self.poll_synced(state, limit);
        self.forget_on_error(result)
    }

    fn poll_synced(&mut self, state: &mut KeyedState, limit: TimerTime) -> Result<Option<Timer>, StateError> {
        let domain = limit.domain();
        let queue = &mut self.queues[domain.index()];
        let Some(&(sort_key, group)) = queue.order.first() else {
            return Ok(None);
        };
        if sort_key > limit.sort_key() {
            return Ok(None);
        }
        let key_group = KeyGroup(group);
        let offset = usize::from(group - self.range.start());
        let backend = state.backend_for_timers();
        let first = queue.first_time(backend, key_group, offset)?;
        assert_eq!(first, Some(sort_key), "the first {domain:?} timer of key group {group} is not the one remembered");
        // Made current first: a key and namespace that do not parse are an error, and the timer stays.
        let first = &queue.ahead[offset][0];
        state.set_current_encoded(key_group, &first[TIME_END..])?;
        let first = queue.ahead[offset].pop_front().expect("read above");
        let backend = state.backend_for_timers();
        backend.delete(key_group, &first)?;
        let encoded = TimerKey::from_slice(&first[TIME_END..]);
        queue.floors[offset] = first;
        let next = queue.first_time(backend, key_group, offset)?;
        queue.set_head(offset, key_group, next);
        let key_end = 2 + usize::from(u16::from_be_bytes([encoded[0], encoded[1]]));
        Ok(Some(Timer { time: TimerTime::of_sort_key(domain, sort_key), key_group, encoded, key_end }))
    }
}

#[cfg(test)]
mod tests;
