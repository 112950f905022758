//! Typed keyed state: descriptors, the five primitives, time-to-live, snapshots and queries.
//!
//! An operator owns one [`KeyedState`] over its subtask's [`StateBackend`]. It declares its
//! states once, by name and type (`value_state::<u64>("count", None)`), and gets a handle per
//! state; the runtime creates the state in the backend (a RocksDB column family). Before each
//! access the operator sets the current key (which fixes the key group) and, where it needs one,
//! a namespace (a window). A handle's methods take the `KeyedState`, so state access is a plain
//! function call with no shared ownership.
//!
//! # Absent is not a default
//! A state that was never written, or cleared, or expired, reads as `None`: the primitives never
//! hide a missing value behind a default.
//!
//! # Key layout
//! Every entry's key in the backend is
//! `state id (u16 BE) | key length (u16 BE) | key | namespace length (u16 BE) | namespace | user key`,
//! where the user key is a map state's [`MapKey`] encoding (empty for the other kinds). The
//! RocksDB backend stores the rest of the key after its key group in the state's column family,
//! so its layout is `key group | key | namespace | user key` per state.
//!
//! # Values
//! - Value, reducing and aggregating state: the [`StateCodec`] encoding of the value (or the
//!   accumulator), after an 8-byte time stamp (`i64` LE, milliseconds) when the state has TTL.
//! - List state: the elements one after another, each `length (u32 LE) | [time stamp] | encoding`,
//!   so that adding an element appends to the stored bytes.
//! - Map state: one entry per user key, its value encoded as a value state's.
//!
//! # TTL
//! A state with a [`TtlConfig`] stamps every value (every element of a list, every entry of a
//! map) with the time it was written (and, with [`TtlUpdate::OnReadAndWrite`], read). It expires
//! once `stamp + ttl <= now`, where now is processing time (from [`KeyedState::set_processing_time`])
//! or event time (the watermark, from [`KeyedState::set_event_time`]). Expired entries are
//! removed when read, on every capture (`cleanup_on_snapshot`), and a bounded number of entries
//! per [`KeyedState::cleanup_step`] (`cleanup_incremental`), so that state of quiet keys does
//! not grow without bound. [`TtlVisibility`] says whether an expired value that is still stored
//! may be returned (once: reading it removes it).
//!
//! # Timers
//! The timer service ([`super::timers`]) keeps its timers in two states of kind
//! [`StateKind::Timers`] it declares here, under names starting with [`TIMER_STATE_PREFIX`]
//! (reserved: no other state may take them). They are captured, restored and checked like
//! every state, and are not queryable.
//!
//! # Snapshots
//! A capture writes the backend's files and `<path>.descriptors`: every state's id, name, kind,
//! types (with encoding versions) and TTL. A restore reads the descriptors first and refuses,
//! with a message naming the state, a snapshot whose states do not match the declared ones.

use std::marker::PhantomData;

use super::codec::StateCodec;
use super::map_key::MapKey;
use super::{
    write_durably, CaptureTarget, HeapBackend, SnapshotWrite, StateBackend, StateCapture, StateError, StateId,
};
use crate::element::CheckpointId;
use crate::env::Storage;
use crate::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use crate::state::order_preserving_i64;
use crate::time::{EventTime, Instant};

/// The names of states starting with this are reserved for timers ([`StateKind::Timers`]).
pub const TIMER_STATE_PREFIX: &str = "timers/";
/// The extension of the file that describes a capture's states.
pub const DESCRIPTORS_EXTENSION: &str = ".descriptors";
const DESCRIPTORS_MAGIC: &[u8; 4] = b"SBSD";
const DESCRIPTORS_VERSION: u16 = 1;
/// The most states one operator may declare.
pub const STATES_MAX: usize = 1024;
const STAMP_SIZE: usize = 8;
/// The value type of a timers state: its entries' values are empty (version 1 of the layout).
const TIMER_VALUE_TYPE: &str = "timer";

/// What kind of state a descriptor declares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateKind {
    Value,
    List,
    Map,
    Reducing,
    Aggregating,
    /// The timers of a [`super::timers::TimerService`] (one state per time domain): entries
    /// with empty values whose keys start with the time. Declared by the timer service only,
    /// under the reserved names [`TIMER_STATE_PREFIX`]`…`; not queryable.
    Timers,
}

impl StateKind {
    fn code(self) -> u8 {
        match self {
            StateKind::Value => 1,
            StateKind::List => 2,
            StateKind::Map => 3,
            StateKind::Reducing => 4,
            StateKind::Aggregating => 5,
            StateKind::Timers => 6,
        }
    }

    fn of_code(code: u8) -> Option<StateKind> {
        Some(match code {
            1 => StateKind::Value,
            2 => StateKind::List,
            3 => StateKind::Map,
            4 => StateKind::Reducing,
            5 => StateKind::Aggregating,
            6 => StateKind::Timers,
            _ => return None,
        })
    }
}

/// Which clock a state's TTL reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlTime {
    ProcessingTime,
    /// The operator's current watermark. Before the first watermark event time is the lowest
    /// instant, so entries written then carry that stamp and expire at the first watermark:
    /// event-time TTL counts from the first watermark, not from the start of the job.
    EventTime,
}

/// When an entry's time stamp is renewed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlUpdate {
    OnCreateAndWrite,
    OnReadAndWrite,
}

/// Whether a read may return an expired entry that cleanup has not removed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlVisibility {
    NeverReturnExpired,
    /// The expired entry is returned once: the read removes it.
    ReturnExpiredIfNotCleanedUp,
}

/// Time-to-live of a state's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlConfig {
    pub ttl_ms: u64,
    pub time: TtlTime,
    pub update: TtlUpdate,
    pub visibility: TtlVisibility,
    /// Remove expired entries before every capture (so snapshots hold none).
    pub cleanup_on_snapshot: bool,
    /// Entries [`KeyedState::cleanup_step`] examines per call, over all of this state's entries in
    /// turn (0: none).
    pub cleanup_incremental: usize,
}

impl TtlConfig {
    /// Processing-time TTL renewed on writes, never returning expired entries, cleaned on
    /// snapshots and 64 entries per step.
    pub fn processing_time(ttl_ms: u64) -> TtlConfig {
        TtlConfig {
            ttl_ms,
            time: TtlTime::ProcessingTime,
            update: TtlUpdate::OnCreateAndWrite,
            visibility: TtlVisibility::NeverReturnExpired,
            cleanup_on_snapshot: true,
            cleanup_incremental: 64,
        }
    }

    /// As [`TtlConfig::processing_time`], on event time.
    pub fn event_time(ttl_ms: u64) -> TtlConfig {
        TtlConfig { time: TtlTime::EventTime, ..TtlConfig::processing_time(ttl_ms) }
    }
}

/// A declared state, as snapshots record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDescriptor {
    pub name: String,
    pub kind: StateKind,
    /// The type of the values (the accumulator, for aggregating state), with its version.
    pub value_type: String,
    /// The type of a map state's keys.
    pub key_type: Option<String>,
    pub ttl: Option<TtlConfig>,
}

impl StateDescriptor {
    /// Whether the backend keeps this state's keys ordered: map states iterate in key order,
    /// timers fire in time order, and incremental TTL cleanup walks a state's keys.
    fn ordered(&self) -> bool {
        matches!(self.kind, StateKind::Map | StateKind::Timers)
            || self.ttl.is_some_and(|ttl| ttl.cleanup_incremental > 0)
    }
}

/// Combines, for [`AggregatingState`]: inputs into an accumulator, accumulators into one.
pub trait AggregateFunction {
    type In;
    type Acc: StateCodec;
    type Out;
    fn create_accumulator(&self) -> Self::Acc;
    fn add(&self, value: &Self::In, accumulator: &mut Self::Acc);
    fn merge(&self, a: Self::Acc, b: Self::Acc) -> Self::Acc;
    fn get_result(&self, accumulator: &Self::Acc) -> Self::Out;
}

/// The current key, already encoded.
#[derive(Clone, Debug, Default)]
struct CurrentKey {
    key_group: Option<KeyGroup>,
    /// `key length | key | namespace length | namespace`.
    bytes: Vec<u8>,
    /// Where the namespace length starts in `bytes`.
    key_end: usize,
}

/// The keyed state of one operator subtask.
pub struct KeyedState {
    backend: Box<dyn StateBackend>,
    max_parallelism: MaxParallelism,
    states: Vec<StateDescriptor>,
    current: CurrentKey,
    processing_time: i64,
    event_time: i64,
    /// Reused: the full key of an access.
    full_key: Vec<u8>,
    /// Reused: a value read.
    value: Vec<u8>,
    /// Reused: a value written.
    written: Vec<u8>,
    /// Incremental TTL cleanup: the state, group and next key it resumes at.
    cleanup_cursor: (usize, u16, Vec<u8>),
    /// Changes whenever entries may have changed other than through this type's methods (a
    /// restore, raw access to the backend), so that what others derive from the entries (the
    /// timer service's earliest timers) knows to read them again.
    generation: u64,
}

fn value_error(state: &StateDescriptor, key_group: KeyGroup, reason: impl std::fmt::Display) -> StateError {
    StateError::Value { state: state.name.clone(), key_group: key_group.0, reason: reason.to_string() }
}

impl KeyedState {
    pub fn new(backend: Box<dyn StateBackend>, max_parallelism: MaxParallelism) -> KeyedState {
        let range = backend.key_groups();
        assert!(range.end() <= max_parallelism.get(), "{range:?} beyond {} key groups", max_parallelism.get());
        KeyedState {
            backend,
            max_parallelism,
            states: Vec::new(),
            current: CurrentKey::default(),
            processing_time: 0,
            event_time: i64::MIN,
            full_key: Vec::with_capacity(64),
            value: Vec::with_capacity(64),
            written: Vec::with_capacity(64),
            cleanup_cursor: (0, range.start(), Vec::new()),
            generation: 0,
        }
    }

    pub fn key_groups(&self) -> KeyGroupRange {
        self.backend.key_groups()
    }

    pub fn max_parallelism(&self) -> MaxParallelism {
        self.max_parallelism
    }

    pub fn descriptors(&self) -> &[StateDescriptor] {
        &self.states
    }

    /// The backend, for raw access (snapshots, restores): whatever the caller does with it, the
    /// state's [`KeyedState::generation`] changes.
    pub fn backend_mut(&mut self) -> &mut dyn StateBackend {
        self.generation += 1;
        self.backend.as_mut()
    }

    /// Changes whenever the entries may have changed other than through the typed layer (a
    /// restore, [`KeyedState::backend_mut`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The backend, for the timer service's own entries (no new generation).
    pub(super) fn backend_for_timers(&mut self) -> &mut dyn StateBackend {
        self.backend.as_mut()
    }

    pub fn size_bytes(&self) -> u64 {
        self.backend.size_bytes()
    }

    // ----- declaring states

    fn declare(&mut self, descriptor: StateDescriptor) -> Result<StateId, StateError> {
        if let Some(existing) = self.states.iter().find(|state| state.name == descriptor.name) {
            return Err(StateError::Declaration(format!(
                "state {:?} is declared twice (first as {:?} of {})",
                descriptor.name, existing.kind, existing.value_type
            )));
        }
        if self.states.len() >= STATES_MAX {
            return Err(StateError::Declaration(format!("more than {STATES_MAX} states")));
        }
        if descriptor.name.is_empty() || descriptor.name.len() > 255 {
            return Err(StateError::Declaration(format!("state name {:?} must have 1 to 255 bytes", descriptor.name)));
        }
        if descriptor.name.starts_with(TIMER_STATE_PREFIX) != (descriptor.kind == StateKind::Timers) {
            return Err(StateError::Declaration(format!(
                "state {:?} of kind {:?}: names starting with {TIMER_STATE_PREFIX:?} are reserved for the timer \
                 service's states, and only they",
                descriptor.name, descriptor.kind
            )));
        }
        if let Some(ttl) = descriptor.ttl {
            if ttl.ttl_ms == 0 || ttl.ttl_ms > i64::MAX as u64 {
                return Err(StateError::Declaration(format!("state {:?}: TTL of {} ms", descriptor.name, ttl.ttl_ms)));
            }
        }
        let id = StateId(self.states.len() as u16);
        self.backend.declare_state(id, &descriptor.name, descriptor.ordered())?;
        self.states.push(descriptor);
        Ok(id)
    }

    /// Declares a state of timers (by the timer service, under a reserved name).
    pub(super) fn timers_state(&mut self, name: &str) -> Result<StateId, StateError> {
        self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::Timers,
            value_type: TIMER_VALUE_TYPE.to_string(),
            key_type: None,
            ttl: None,
        })
    }

    pub fn value_state<T: StateCodec>(
        &mut self,
        name: &str,
        ttl: Option<TtlConfig>,
    ) -> Result<ValueState<T>, StateError> {
        let id = self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::Value,
            value_type: T::type_name(),
            key_type: None,
            ttl,
        })?;
        Ok(ValueState { id, _type: PhantomData })
    }

    pub fn list_state<T: StateCodec>(
        &mut self,
        name: &str,
        ttl: Option<TtlConfig>,
    ) -> Result<ListState<T>, StateError> {
        let id = self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::List,
            value_type: T::type_name(),
            key_type: None,
            ttl,
        })?;
        Ok(ListState { id, _type: PhantomData })
    }

    pub fn map_state<K: MapKey, V: StateCodec>(
        &mut self,
        name: &str,
        ttl: Option<TtlConfig>,
    ) -> Result<MapState<K, V>, StateError> {
        let id = self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::Map,
            value_type: V::type_name(),
            key_type: Some(K::type_name()),
            ttl,
        })?;
        Ok(MapState { id, _type: PhantomData })
    }

    pub fn reducing_state<T: StateCodec, F: Fn(&T, &T) -> T>(
        &mut self,
        name: &str,
        reduce: F,
        ttl: Option<TtlConfig>,
    ) -> Result<ReducingState<T, F>, StateError> {
        let id = self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::Reducing,
            value_type: T::type_name(),
            key_type: None,
            ttl,
        })?;
        Ok(ReducingState { id, reduce, _type: PhantomData })
    }

    pub fn aggregating_state<A: AggregateFunction>(
        &mut self,
        name: &str,
        function: A,
        ttl: Option<TtlConfig>,
    ) -> Result<AggregatingState<A>, StateError> {
        let id = self.declare(StateDescriptor {
            name: name.to_string(),
            kind: StateKind::Aggregating,
            value_type: A::Acc::type_name(),
            key_type: None,
            ttl,
        })?;
        Ok(AggregatingState { id, function })
    }

    // ----- the current key, namespace and time

    fn set_key_bytes_encoded(&mut self, key_group: KeyGroup, key: &[u8]) {
        assert!(self.key_groups().contains(key_group), "key group {} outside {:?}", key_group.0, self.key_groups());
        let current = &mut self.current;
        current.key_group = Some(key_group);
        current.bytes.clear();
        current.bytes.extend_from_slice(&(key.len() as u16).to_be_bytes());
        current.bytes.extend_from_slice(key);
        current.key_end = current.bytes.len();
        current.bytes.extend_from_slice(&0_u16.to_be_bytes());
    }

    /// Makes `key` (an unsigned integer key) current, in the void namespace.
    #[inline]
    pub fn set_current_key_u64(&mut self, key: u64) {
        let key_group = self.max_parallelism.key_group_of_u64(key);
        self.set_key_bytes_encoded(key_group, &key.to_be_bytes());
    }

    /// Makes `key` (a signed integer key, grouped by its two's-complement bits as `u64`) current.
    #[inline]
    pub fn set_current_key_i64(&mut self, key: i64) {
        let key_group = self.max_parallelism.key_group_of_u64(key as u64);
        self.set_key_bytes_encoded(key_group, &order_preserving_i64(key).to_be_bytes());
    }

    /// Makes `key` (a byte-string key) current.
    pub fn set_current_key_bytes(&mut self, key: &[u8]) -> Result<(), StateError> {
        if key.len() > usize::from(u16::MAX) {
            return Err(StateError::KeyTooLarge { size: key.len() });
        }
        let key_group = self.max_parallelism.key_group_of_bytes(key);
        self.set_key_bytes_encoded(key_group, key);
        Ok(())
    }

    /// The current key group and the encoded current key and namespace,
    /// `key length (u16 BE) | key | namespace length (u16 BE) | namespace`.
    pub(super) fn current_encoded(&self) -> (KeyGroup, &[u8]) {
        (self.current_key_group(), &self.current.bytes)
    }

    /// Makes a key and namespace current from their encoding (as [`KeyedState::current_encoded`]
    /// gives it) and their key group, as read from the backend: bytes that do not parse are an
    /// error, a key group this state does not hold is a bug.
    pub(super) fn set_current_encoded(&mut self, key_group: KeyGroup, encoded: &[u8]) -> Result<(), StateError> {
        assert!(self.key_groups().contains(key_group), "key group {} outside {:?}", key_group.0, self.key_groups());
        let (key, namespace) = split_key(encoded).ok_or_else(|| StateError::Corrupt {
            what: format!("key and namespace of {} bytes in key group {} do not parse", encoded.len(), key_group.0),
        })?;
        let key_end = 2 + key.len();
        if key_end + 2 + namespace.len() != encoded.len() {
            return Err(StateError::Corrupt {
                what: format!("{} bytes after a key and namespace in key group {}", encoded.len(), key_group.0),
            });
        }
        let current = &mut self.current;
        current.key_group = Some(key_group);
        current.bytes.clear();
        current.bytes.extend_from_slice(encoded);
        current.key_end = key_end;
        Ok(())
    }

    /// The key group of the current key.
    pub fn current_key_group(&self) -> KeyGroup {
        self.current.key_group.expect("no current key: set one before accessing state")
    }

    /// Sets the namespace of the next accesses (the current key keeps it until the next key).
    pub fn set_namespace(&mut self, namespace: &[u8]) -> Result<(), StateError> {
        if namespace.len() > usize::from(u16::MAX) {
            return Err(StateError::KeyTooLarge { size: namespace.len() });
        }
        let current = &mut self.current;
        assert!(current.key_group.is_some(), "no current key: set one before its namespace");
        current.bytes.truncate(current.key_end);
        current.bytes.extend_from_slice(&(namespace.len() as u16).to_be_bytes());
        current.bytes.extend_from_slice(namespace);
        Ok(())
    }

    /// Sets an integer namespace (a window's end), order-preserving.
    #[inline]
    pub fn set_namespace_i64(&mut self, namespace: i64) {
        let current = &mut self.current;
        assert!(current.key_group.is_some(), "no current key: set one before its namespace");
        current.bytes.truncate(current.key_end);
        current.bytes.extend_from_slice(&8_u16.to_be_bytes());
        current.bytes.extend_from_slice(&order_preserving_i64(namespace).to_be_bytes());
    }

    /// Processing time, for TTL on processing time.
    pub fn set_processing_time(&mut self, now: Instant) {
        self.processing_time = i64::try_from(now.0).unwrap_or(i64::MAX);
    }

    /// The operator's watermark, for TTL on event time.
    pub fn set_event_time(&mut self, watermark: EventTime) {
        self.event_time = watermark.0;
    }

    fn now(&self, ttl: &TtlConfig) -> i64 {
        match ttl.time {
            TtlTime::ProcessingTime => self.processing_time,
            TtlTime::EventTime => self.event_time,
        }
    }

    // ----- raw access, shared by the primitives

    /// Builds the full key of state `id` for the current key and namespace, then `user_key`.
    #[inline]
    fn build_key(&mut self, id: StateId) -> KeyGroup {
        let key_group = self.current_key_group();
        self.full_key.clear();
        self.full_key.extend_from_slice(&id.prefix());
        self.full_key.extend_from_slice(&self.current.bytes);
        key_group
    }

    fn descriptor(&self, id: StateId) -> &StateDescriptor {
        &self.states[usize::from(id.0)]
    }

    /// Reads the value at `full_key` into `self.value` with TTL applied: `Some(offset)` of the
    /// payload if present and visible. Expired values are removed; OnReadAndWrite renews.
    fn read_stamped(&mut self, id: StateId, key_group: KeyGroup) -> Result<Option<usize>, StateError> {
        if !self.backend.get(key_group, &self.full_key, &mut self.value)? {
            return Ok(None);
        }
        let Some(ttl) = self.descriptor(id).ttl else {
            return Ok(Some(0));
        };
        if self.value.len() < STAMP_SIZE {
            return Err(value_error(self.descriptor(id), key_group, "value shorter than its TTL time stamp"));
        }
        let stamp = i64::from_le_bytes(self.value[..STAMP_SIZE].try_into().expect("eight bytes"));
        let now = self.now(&ttl);
        if expired(stamp, &ttl, now) {
            self.backend.delete(key_group, &self.full_key)?;
            return Ok((ttl.visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp).then_some(STAMP_SIZE));
        }
        if ttl.update == TtlUpdate::OnReadAndWrite && stamp != now {
            self.value[..STAMP_SIZE].copy_from_slice(&now.to_le_bytes());
            self.backend.put(key_group, &self.full_key, &self.value)?;
        }
        Ok(Some(STAMP_SIZE))
    }

    /// Starts `self.written` with the time stamp, if state `id` has TTL.
    #[inline]
    fn start_written(&mut self, id: StateId) {
        self.written.clear();
        if let Some(ttl) = self.descriptor(id).ttl {
            let now = self.now(&ttl);
            self.written.extend_from_slice(&now.to_le_bytes());
        }
    }

    fn decode<T: StateCodec>(&self, id: StateId, key_group: KeyGroup, bytes: &[u8]) -> Result<T, StateError> {
        T::decode(bytes).map_err(|error| value_error(self.descriptor(id), key_group, error))
    }

    fn get_value<T: StateCodec>(&mut self, id: StateId) -> Result<Option<T>, StateError> {
        let key_group = self.build_key(id);
        match self.read_stamped(id, key_group)? {
            None => Ok(None),
            Some(offset) => self.decode(id, key_group, &self.value[offset..]).map(Some),
        }
    }

    fn put_value<T: StateCodec>(&mut self, id: StateId, value: &T) -> Result<(), StateError> {
        let key_group = self.build_key(id);
        self.start_written(id);
        value.encode(&mut self.written);
        self.backend.put(key_group, &self.full_key, &self.written)
    }

    fn clear_value(&mut self, id: StateId) -> Result<(), StateError> {
        let key_group = self.build_key(id);
        self.backend.delete(key_group, &self.full_key)
    }

    /// Reads and removes a value-like state in one access (`None`: absent or expired and hidden).
    fn take_value<T: StateCodec>(&mut self, id: StateId) -> Result<Option<T>, StateError> {
        let key_group = self.build_key(id);
        if !self.backend.take(key_group, &self.full_key, &mut self.value)? {
            return Ok(None);
        }
        let offset = match self.descriptor(id).ttl {
            None => 0,
            Some(ttl) => {
                let Some(stamp) = self.value.get(..STAMP_SIZE) else {
                    return Err(value_error(self.descriptor(id), key_group, "value shorter than its TTL time stamp"));
                };
                let stamp = i64::from_le_bytes(stamp.try_into().expect("eight bytes"));
                if expired(stamp, &ttl, self.now(&ttl)) && ttl.visibility == TtlVisibility::NeverReturnExpired {
                    return Ok(None);
                }
                STAMP_SIZE
            }
        };
        self.decode(id, key_group, &self.value[offset..]).map(Some)
    }

    /// Visits the `(key, namespace)` of every entry of state `id` in `key_group`, in key order
    /// (a map state's entries once per map key), as the bytes the current key and namespace
    /// are set from: integer keys and namespaces big-endian, signed ones with the sign bit flipped.
    pub fn for_each_key(
        &mut self,
        id: StateId,
        key_group: KeyGroup,
        visit: &mut super::Visit<'_>,
    ) -> Result<(), StateError> {
        let prefix = id.prefix();
        let mut failure = None;
        self.backend.scan_range(key_group, &prefix, &prefix, &mut |key, _| {
            match split_key(&key[2..]) {
                Some((user_key, namespace)) => visit(user_key, namespace)?,
                None => {
                    failure = Some(format!("malformed state key of {} bytes", key.len()));
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        match failure {
            Some(reason) => Err(value_error(self.descriptor(id), key_group, reason)),
            None => Ok(()),
        }
    }

    /// Read-modify-write of a value-like state: `combine(old)` (None: absent or expired).
    fn merge_value<T: StateCodec>(
        &mut self,
        id: StateId,
        mut combine: impl FnMut(Option<T>) -> T,
    ) -> Result<(), StateError> {
        let key_group = self.build_key(id);
        let descriptor = &self.states[usize::from(id.0)];
        let ttl = descriptor.ttl;
        let now = ttl.map(|ttl| match ttl.time {
            TtlTime::ProcessingTime => self.processing_time,
            TtlTime::EventTime => self.event_time,
        });
        let mut failure = None;
        let result = self.backend.merge(key_group, &self.full_key, &mut |old, new| {
            let old = match (old, ttl, now) {
                (None, _, _) => None,
                (Some(bytes), Some(ttl), Some(now)) => {
                    let Some(stamp) = bytes.get(..STAMP_SIZE) else {
                        failure = Some("value shorter than its TTL time stamp".to_string());
                        return Err(StateError::Corrupt { what: "TTL time stamp".to_string() });
                    };
                    let stamp = i64::from_le_bytes(stamp.try_into().expect("eight bytes"));
                    (!expired(stamp, &ttl, now)).then(|| &bytes[STAMP_SIZE..])
                }
                (Some(bytes), _, _) => Some(bytes),
            };
            let old = match old.map(T::decode).transpose() {
                Ok(old) => old,
                Err(error) => {
                    failure = Some(error.to_string());
                    return Err(StateError::Corrupt { what: error.to_string() });
                }
            };
            if let Some(now) = now {
                new.extend_from_slice(&now.to_le_bytes());
            }
            combine(old).encode(new);
            Ok(())
        });
        match failure {
            Some(reason) => Err(value_error(&self.states[usize::from(id.0)], key_group, reason)),
            None => result,
        }
    }

    // ----- checkpoints

    /// The synchronous part of a checkpoint: TTL cleanup where configured, the backend's capture,
    /// and this state's descriptors.
    pub fn capture(&mut self, target: &CaptureTarget) -> Result<StateCapture, StateError> {
        for index in 0..self.states.len() {
            if self.states[index].ttl.is_some_and(|ttl| ttl.cleanup_on_snapshot) {
                self.cleanup_state(index, None)?;
            }
        }
        let mut capture = self.backend.capture(target)?;
        let path = format!("{}{DESCRIPTORS_EXTENSION}", target.path);
        capture.files.push(path.clone());
        let bytes = encode_descriptors(&self.states);
        capture.write = Box::new(WithDescriptors { path, bytes, state: capture.write });
        Ok(capture)
    }

    pub fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        self.backend.checkpoint_complete(checkpoint);
    }

    /// Replaces all state by what the captures among `files` (of any subtasks, any parallelism)
    /// hold for this subtask's key groups. Refuses a snapshot whose states differ from the
    /// declared ones: another type, kind or encoding version, TTL on one side only, or a state
    /// declared under another position.
    pub fn restore_files(&mut self, storage: &mut dyn Storage, files: &[String]) -> Result<(), StateError> {
        let mut restored: Option<(String, Vec<StateDescriptor>)> = None;
        for file in files.iter().filter(|file| file.ends_with(DESCRIPTORS_EXTENSION)) {
            let states = decode_descriptors(&storage.read(file)?).map_err(|error| error.in_file(file))?;
            match &restored {
                Some((first, seen)) if *seen != states => {
                    return Err(StateError::Incompatible(format!("{file} and {first} describe different states")));
                }
                Some(_) => {}
                None => restored = Some((file.clone(), states)),
            }
        }
        let has_state_files = files.iter().any(|file| file.contains(super::PORTABLE_EXTENSION));
        match &restored {
            None if has_state_files => {
                return Err(StateError::Incompatible(
                    "the snapshot's state files have no descriptors: written by a build without typed state"
                        .to_string(),
                ))
            }
            None => {}
            Some((file, states)) => check_compatible(file, states, &self.states)?,
        }
        self.generation += 1;
        self.backend.restore_files(storage, files)
    }

    // ----- TTL cleanup

    /// Examines up to the configured number of entries of each state with incremental cleanup,
    /// resuming where the last call stopped, and removes the expired ones.
    pub fn cleanup_step(&mut self) -> Result<(), StateError> {
        let budget: usize = self.states.iter().filter_map(|state| state.ttl).map(|ttl| ttl.cleanup_incremental).sum();
        if budget == 0 {
            return Ok(());
        }
        let range = self.key_groups();
        let mut left = budget;
        // At most one pass over every (state, group): a state with little data does not loop.
        let mut visited = 0;
        let positions = self.states.len() * range.count();
        while left > 0 && visited <= positions {
            let (index, group, from) = std::mem::take(&mut self.cleanup_cursor);
            let index = if index >= self.states.len() { 0 } else { index };
            let incremental = self.states[index].ttl.map_or(0, |ttl| ttl.cleanup_incremental);
            if incremental == 0 || range.count() == 0 {
                self.cleanup_cursor = (index + 1, range.start(), Vec::new());
                visited += range.count().max(1);
                continue;
            }
            let group = if range.contains(KeyGroup(group)) { group } else { range.start() };
            let (examined, next) = self.cleanup_group(index, KeyGroup(group), &from, left)?;
            // A visit of an empty group costs as much as one entry, so a step stays bounded.
            left -= examined.max(1).min(left);
            self.cleanup_cursor = match next {
                Some(next) => (index, group, next),
                None if group + 1 < range.end() => (index, group + 1, Vec::new()),
                None => (index + 1, range.start(), Vec::new()),
            };
            visited += 1;
        }
        Ok(())
    }

    /// Removes the expired entries of state `index` in every key group (`limit`: None).
    fn cleanup_state(&mut self, index: usize, limit: Option<usize>) -> Result<(), StateError> {
        for group in self.key_groups().iter() {
            self.cleanup_group(index, group, &[], limit.unwrap_or(usize::MAX))?;
        }
        Ok(())
    }

    /// Examines up to `limit` entries of state `index` in `group` from key `from`, removing
    /// expired ones (and expired list elements). Returns how many it examined and the key to
    /// resume at, if entries remain.
    fn cleanup_group(
        &mut self,
        index: usize,
        group: KeyGroup,
        from: &[u8],
        limit: usize,
    ) -> Result<(usize, Option<Vec<u8>>), StateError> {
        let descriptor = &self.states[index];
        let Some(ttl) = descriptor.ttl else {
            return Ok((0, None));
        };
        let now = self.now(&ttl);
        let kind = descriptor.kind;
        let prefix = StateId(index as u16).prefix();
        let mut examined = 0;
        let mut next = None;
        // Keys to delete, and lists to rewrite with their live elements.
        let mut deletes: Vec<Vec<u8>> = Vec::new();
        let mut rewrites: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut corrupt = None;
        self.backend.scan_range(group, &prefix, from, &mut |key, value| {
            if examined == limit {
                next = Some(key.to_vec());
                return Ok(false);
            }
            examined += 1;
            if kind == StateKind::List {
                match live_elements(value, &ttl, now) {
                    Ok(None) => {}
                    Ok(Some(live)) if live.is_empty() => deletes.push(key.to_vec()),
                    Ok(Some(live)) => rewrites.push((key.to_vec(), live)),
                    Err(reason) => {
                        corrupt = Some(reason);
                        return Ok(false);
                    }
                }
            } else {
                match value.get(..STAMP_SIZE) {
                    Some(stamp) => {
                        if expired(i64::from_le_bytes(stamp.try_into().expect("eight bytes")), &ttl, now) {
                            deletes.push(key.to_vec());
                        }
                    }
                    None => {
                        corrupt = Some("value shorter than its TTL time stamp".to_string());
                        return Ok(false);
                    }
                }
            }
            Ok(true)
        })?;
        if let Some(reason) = corrupt {
            return Err(value_error(&self.states[index], group, reason));
        }
        for key in deletes {
            self.backend.delete(group, &key)?;
        }
        for (key, value) in rewrites {
            self.backend.put(group, &key, &value)?;
        }
        Ok((examined, next))
    }

    // ----- queryable state

    /// Reads state `name` of `key` in `namespace` without changing anything (no TTL cleanup, no
    /// renewal): the live state, between two steps of the operator.
    pub fn query(&mut self, name: &str, key: QueryKey<'_>, namespace: &[u8]) -> Result<Queried, StateError> {
        let index = self
            .states
            .iter()
            .position(|state| state.name == name)
            .ok_or_else(|| StateError::Declaration(format!("no state named {name:?}")))?;
        if self.states[index].kind == StateKind::Timers {
            return Err(StateError::Declaration(format!("state {name:?} holds timers, which are not queryable")));
        }
        let saved = std::mem::take(&mut self.current);
        let result = self.query_current(index, key, namespace);
        self.current = saved;
        result
    }

    fn query_current(&mut self, index: usize, key: QueryKey<'_>, namespace: &[u8]) -> Result<Queried, StateError> {
        // A query names any key: one another subtask holds is the asker's mistake, not a bug here.
        let key_group = key.key_group(self.max_parallelism);
        if !self.key_groups().contains(key_group) {
            return Err(StateError::Declaration(format!(
                "key group {} of the queried key is not held here ({:?}): ask the subtask that holds it",
                key_group.0,
                self.key_groups()
            )));
        }
        match key {
            QueryKey::U64(key) => self.set_current_key_u64(key),
            QueryKey::I64(key) => self.set_current_key_i64(key),
            QueryKey::Bytes(key) => self.set_current_key_bytes(key)?,
        }
        self.set_namespace(namespace)?;
        let descriptor = self.states[index].clone();
        let id = StateId(index as u16);
        let key_group = self.build_key(id);
        let now = descriptor.ttl.map(|ttl| self.now(&ttl));
        let visible = |stamped: &[u8]| -> Result<Option<Vec<u8>>, String> {
            match (descriptor.ttl, now) {
                (Some(ttl), Some(now)) => {
                    let stamp = stamped.get(..STAMP_SIZE).ok_or("value shorter than its TTL time stamp")?;
                    let expired = expired(i64::from_le_bytes(stamp.try_into().expect("eight bytes")), &ttl, now);
                    Ok((!expired || ttl.visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp)
                        .then(|| stamped[STAMP_SIZE..].to_vec()))
                }
                _ => Ok(Some(stamped.to_vec())),
            }
        };
        let answer = match descriptor.kind {
            StateKind::Timers => unreachable!("query of timers state {:?}: refused by `query`", descriptor.name),
            StateKind::Value | StateKind::Reducing | StateKind::Aggregating => {
                if !self.backend.get(key_group, &self.full_key, &mut self.value)? {
                    Queried::Absent
                } else {
                    match visible(&self.value).map_err(|reason| value_error(&descriptor, key_group, reason))? {
                        Some(value) => Queried::Value(value),
                        None => Queried::Absent,
                    }
                }
            }
            StateKind::List => {
                if !self.backend.get(key_group, &self.full_key, &mut self.value)? {
                    Queried::Absent
                } else {
                    let mut elements = Vec::new();
                    for element in
                        list_elements(&self.value).map_err(|reason| value_error(&descriptor, key_group, reason))?
                    {
                        if let Some(value) =
                            visible(element).map_err(|reason| value_error(&descriptor, key_group, reason))?
                        {
                            elements.push(value);
                        }
                    }
                    if elements.is_empty() {
                        Queried::Absent
                    } else {
                        Queried::List(elements)
                    }
                }
            }
            StateKind::Map => {
                let prefix = self.full_key.clone();
                let mut entries = Vec::new();
                let mut failure = None;
                self.backend.scan_range(key_group, &prefix, &prefix, &mut |key, value| {
                    match visible(value) {
                        Ok(Some(value)) => entries.push((key[prefix.len()..].to_vec(), value)),
                        Ok(None) => {}
                        Err(reason) => {
                            failure = Some(reason);
                            return Ok(false);
                        }
                    }
                    Ok(true)
                })?;
                if let Some(reason) = failure {
                    return Err(value_error(&descriptor, key_group, reason));
                }
                if entries.is_empty() {
                    Queried::Absent
                } else {
                    Queried::Map(entries)
                }
            }
        };
        Ok(answer)
    }
}

/// A key, as a query names it.
#[derive(Clone, Copy, Debug)]
pub enum QueryKey<'a> {
    U64(u64),
    I64(i64),
    Bytes(&'a [u8]),
}

impl QueryKey<'_> {
    /// The key group of the key, as the `set_current_key_*` call for its type computes it.
    pub fn key_group(self, max_parallelism: MaxParallelism) -> KeyGroup {
        match self {
            QueryKey::U64(key) => max_parallelism.key_group_of_u64(key),
            QueryKey::I64(key) => max_parallelism.key_group_of_u64(key as u64),
            QueryKey::Bytes(key) => max_parallelism.key_group_of_bytes(key),
        }
    }
}

/// The answer to a query: encoded values (a [`StateCodec`] encoding; map keys in their
/// [`MapKey`] encoding), decoded by the caller with the types the state's descriptor names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queried {
    Absent,
    Value(Vec<u8>),
    List(Vec<Vec<u8>>),
    Map(Vec<(Vec<u8>, Vec<u8>)>),
}

/// The clocks TTL reads, as of which a query of a checkpoint applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlTimes {
    pub processing_time: Instant,
    /// The watermark.
    pub event_time: EventTime,
}

/// Answers a query from a completed checkpoint instead of live state: loads the key group of
/// `key` from the checkpoint's state `files` (portable format) into a fresh heap backend, with
/// the states the checkpoint's descriptors name, and reads it there. TTL applies as of `now`, as
/// a live query at that time would see the checkpoint's entries (a capture without
/// `cleanup_on_snapshot` may hold expired ones).
pub fn query_snapshot(
    storage: &mut dyn Storage,
    files: &[String],
    max_parallelism: MaxParallelism,
    name: &str,
    key: QueryKey<'_>,
    namespace: &[u8],
    now: TtlTimes,
) -> Result<Queried, StateError> {
    let backend = |range| Ok(Box::new(HeapBackend::new(range)) as Box<dyn StateBackend>);
    query_snapshot_with(storage, files, max_parallelism, backend, name, key, namespace, now)
}

/// As [`query_snapshot`], loading the key group into the backend `backend_for` opens for a
/// range: one that reads the checkpoint's format (RocksDB's native checkpoints need RocksDB).
#[allow(clippy::too_many_arguments)]
pub fn query_snapshot_with(
    storage: &mut dyn Storage,
    files: &[String],
    max_parallelism: MaxParallelism,
    backend_for: impl FnOnce(KeyGroupRange) -> Result<Box<dyn StateBackend>, StateError>,
    name: &str,
    key: QueryKey<'_>,
    namespace: &[u8],
    now: TtlTimes,
) -> Result<Queried, StateError> {
    let key_group = key.key_group(max_parallelism);
    let descriptors_file = files
        .iter()
        .find(|file| file.ends_with(DESCRIPTORS_EXTENSION))
        .ok_or_else(|| StateError::Incompatible("the checkpoint has no state descriptors".to_string()))?;
    let descriptors =
        decode_descriptors(&storage.read(descriptors_file)?).map_err(|error| error.in_file(descriptors_file))?;
    let range = KeyGroupRange::new(key_group.0, key_group.0 + 1);
    let mut state = KeyedState::new(backend_for(range)?, max_parallelism);
    for descriptor in descriptors {
        state.declare(descriptor)?;
    }
    state.restore_files(storage, files)?;
    state.set_processing_time(now.processing_time);
    state.set_event_time(now.event_time);
    state.query(name, key, namespace)
}

/// Splits `key length | key | namespace length | namespace | …` into key and namespace.
fn split_key(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let key_length = usize::from(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]));
    let key = bytes.get(2..2 + key_length)?;
    let rest = &bytes[2 + key_length..];
    let namespace_length = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    Some((key, rest.get(2..2 + namespace_length)?))
}

#[inline]
fn expired(stamp: i64, ttl: &TtlConfig, now: i64) -> bool {
    stamp.saturating_add(ttl.ttl_ms as i64) <= now
}

/// A list value's elements (each with its time stamp, if the state has TTL).
fn list_elements(mut bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut elements = Vec::new();
    while !bytes.is_empty() {
        let length = bytes.get(..4).ok_or("list element length cut short")?;
        let length = u32::from_le_bytes(length.try_into().expect("four bytes")) as usize;
        let element = bytes.get(4..4 + length).ok_or_else(|| format!("list element of {length} bytes cut short"))?;
        elements.push(element);
        bytes = &bytes[4 + length..];
    }
    Ok(elements)
}

/// A list's bytes without its expired elements, or `None` if none expired.
fn live_elements(bytes: &[u8], ttl: &TtlConfig, now: i64) -> Result<Option<Vec<u8>>, String> {
    let elements = list_elements(bytes)?;
    let mut live = Vec::new();
    let mut any_expired = false;
    for element in elements {
        let stamp = element.get(..STAMP_SIZE).ok_or("list element shorter than its TTL time stamp")?;
        if expired(i64::from_le_bytes(stamp.try_into().expect("eight bytes")), ttl, now) {
            any_expired = true;
        } else {
            live.extend_from_slice(&(element.len() as u32).to_le_bytes());
            live.extend_from_slice(element);
        }
    }
    Ok(any_expired.then_some(live))
}

/// The asynchronous part of a capture: the backend's files, then the descriptors.
struct WithDescriptors {
    path: String,
    bytes: Vec<u8>,
    state: Box<dyn SnapshotWrite>,
}

impl SnapshotWrite for WithDescriptors {
    fn write(self: Box<Self>, storage: &mut dyn Storage) -> Result<Vec<String>, StateError> {
        let files = self.state.write(storage)?;
        write_durably(storage, &self.path, &self.bytes)?;
        Ok(files)
    }
}

/// The descriptors file, version 1 (integers little-endian):
/// `magic "SBSD" | version u16 | count u16 | per state: name (u8 length, bytes) | kind u8 |
/// value type (u16 length, bytes) | key type flag u8 [u16 length, bytes] | TTL flag u8
/// [ttl ms u64 | time u8 | update u8 | visibility u8 | on snapshot u8 | incremental u32] |
/// crc32 of everything before it`.
pub fn encode_descriptors(states: &[StateDescriptor]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(DESCRIPTORS_MAGIC);
    out.extend_from_slice(&DESCRIPTORS_VERSION.to_le_bytes());
    out.extend_from_slice(&(states.len() as u16).to_le_bytes());
    let text = |out: &mut Vec<u8>, text: &str| {
        out.extend_from_slice(&(text.len() as u16).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    };
    for state in states {
        out.push(state.name.len() as u8);
        out.extend_from_slice(state.name.as_bytes());
        out.push(state.kind.code());
        text(&mut out, &state.value_type);
        match &state.key_type {
            None => out.push(0),
            Some(key_type) => {
                out.push(1);
                text(&mut out, key_type);
            }
        }
        match &state.ttl {
            None => out.push(0),
            Some(ttl) => {
                out.push(1);
                out.extend_from_slice(&ttl.ttl_ms.to_le_bytes());
                out.push(match ttl.time {
                    TtlTime::ProcessingTime => 0,
                    TtlTime::EventTime => 1,
                });
                out.push(match ttl.update {
                    TtlUpdate::OnCreateAndWrite => 0,
                    TtlUpdate::OnReadAndWrite => 1,
                });
                out.push(match ttl.visibility {
                    TtlVisibility::NeverReturnExpired => 0,
                    TtlVisibility::ReturnExpiredIfNotCleanedUp => 1,
                });
                out.push(u8::from(ttl.cleanup_on_snapshot));
                out.extend_from_slice(&(ttl.cleanup_incremental.min(u32::MAX as usize) as u32).to_le_bytes());
            }
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Why a descriptors file was not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescriptorsError {
    /// Intact, but written in a version of the format this build does not read.
    Version(u16),
    /// Damaged, or not a descriptors file.
    Corrupt(String),
}

impl DescriptorsError {
    /// The error of a restore from `file`: another version is incompatible, not corrupt (an
    /// older checkpoint would not help; a build that reads the version would).
    pub fn in_file(self, file: &str) -> StateError {
        match self {
            DescriptorsError::Version(version) => StateError::Incompatible(format!(
                "{file} holds state descriptors of version {version}; this build reads version \
                 {DESCRIPTORS_VERSION}: restore with a build that reads it"
            )),
            DescriptorsError::Corrupt(what) => StateError::Corrupt { what: format!("{file}: {what}") },
        }
    }
}

impl From<String> for DescriptorsError {
    fn from(what: String) -> DescriptorsError {
        DescriptorsError::Corrupt(what)
    }
}

impl From<&str> for DescriptorsError {
    fn from(what: &str) -> DescriptorsError {
        DescriptorsError::Corrupt(what.to_string())
    }
}

/// Decodes a descriptors file; never panics.
pub fn decode_descriptors(bytes: &[u8]) -> Result<Vec<StateDescriptor>, DescriptorsError> {
    if bytes.len() < 4 + 2 + 2 + 4 {
        return Err(format!("{} bytes, too short for a descriptors file", bytes.len()).into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if &body[..4] != DESCRIPTORS_MAGIC {
        return Err("not a descriptors file (magic)".into());
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != DESCRIPTORS_VERSION {
        return Err(DescriptorsError::Version(version));
    }
    let count = u16::from_le_bytes([body[6], body[7]]);
    let mut reader = Reader { bytes: &body[8..] };
    let mut states = Vec::new();
    for _ in 0..count {
        let name_length = usize::from(reader.u8()?);
        let name = reader.text(name_length)?;
        let kind = StateKind::of_code(reader.u8()?).ok_or("unknown state kind")?;
        let value_length = usize::from(reader.u16()?);
        let value_type = reader.text(value_length)?;
        let key_type = match reader.u8()? {
            0 => None,
            1 => {
                let length = usize::from(reader.u16()?);
                Some(reader.text(length)?)
            }
            other => return Err(format!("key type flag {other}").into()),
        };
        let ttl = match reader.u8()? {
            0 => None,
            1 => Some(TtlConfig {
                ttl_ms: u64::from_le_bytes(reader.take(8)?.try_into().expect("eight bytes")),
                time: match reader.u8()? {
                    0 => TtlTime::ProcessingTime,
                    1 => TtlTime::EventTime,
                    other => return Err(format!("TTL time {other}").into()),
                },
                update: match reader.u8()? {
                    0 => TtlUpdate::OnCreateAndWrite,
                    1 => TtlUpdate::OnReadAndWrite,
                    other => return Err(format!("TTL update {other}").into()),
                },
                visibility: match reader.u8()? {
                    0 => TtlVisibility::NeverReturnExpired,
                    1 => TtlVisibility::ReturnExpiredIfNotCleanedUp,
                    other => return Err(format!("TTL visibility {other}").into()),
                },
                cleanup_on_snapshot: match reader.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(format!("TTL cleanup flag {other}").into()),
                },
                cleanup_incremental: u32::from_le_bytes(reader.take(4)?.try_into().expect("four bytes")) as usize,
            }),
            other => return Err(format!("TTL flag {other}").into()),
        };
        states.push(StateDescriptor { name, kind, value_type, key_type, ttl });
    }
    if !reader.bytes.is_empty() {
        return Err(format!("{} bytes after the last descriptor", reader.bytes.len()).into());
    }
    Ok(states)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err(format!("needs {n} bytes, {} left", self.bytes.len()));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let bytes = self.take(2)?;
        Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    fn text(&mut self, length: usize) -> Result<String, String> {
        String::from_utf8(self.take(length)?.to_vec()).map_err(|_| "a name that is not UTF-8".to_string())
    }
}

/// Checks the states of a snapshot against the declared ones.
fn check_compatible(file: &str, restored: &[StateDescriptor], declared: &[StateDescriptor]) -> Result<(), StateError> {
    let refuse = |reason: String| Err(StateError::Incompatible(format!("{file}: {reason}")));
    for (position, state) in restored.iter().enumerate() {
        let Some(now) = declared.get(position) else {
            return refuse(format!(
                "the snapshot holds state {:?} (number {position}), which the operator does not declare",
                state.name
            ));
        };
        if now.name != state.name {
            return refuse(format!(
                "state number {position} is {:?} in the snapshot but {:?} now: declare states in the same order",
                state.name, now.name
            ));
        }
        if now.kind != state.kind {
            return refuse(format!("state {:?} was {:?} state, is declared {:?}", state.name, state.kind, now.kind));
        }
        if now.value_type != state.value_type || now.key_type != state.key_type {
            return refuse(format!(
                "state {:?} was written as {}{} and is read as {}{} (type or encoding version differs)",
                state.name,
                state.key_type.as_deref().map(|key| format!("{key} -> ")).unwrap_or_default(),
                state.value_type,
                now.key_type.as_deref().map(|key| format!("{key} -> ")).unwrap_or_default(),
                now.value_type,
            ));
        }
        if now.ttl.is_some() != state.ttl.is_some() {
            return refuse(format!(
                "state {:?} was written {} TTL and is declared {} it (its values' layout differs)",
                state.name,
                if state.ttl.is_some() { "with" } else { "without" },
                if now.ttl.is_some() { "with" } else { "without" },
            ));
        }
    }
    Ok(())
}

// ----- the primitives

/// One value per key and namespace.
#[derive(Debug)]
pub struct ValueState<T> {
    id: StateId,
    _type: PhantomData<fn() -> T>,
}

impl<T: StateCodec> ValueState<T> {
    pub fn id(&self) -> StateId {
        self.id
    }

    /// The value, removed in the same access.
    pub fn take(&self, state: &mut KeyedState) -> Result<Option<T>, StateError> {
        state.take_value(self.id)
    }
    /// The value, or `None` if never written, cleared or expired.
    #[inline]
    pub fn get(&self, state: &mut KeyedState) -> Result<Option<T>, StateError> {
        state.get_value(self.id)
    }

    #[inline]
    pub fn update(&self, state: &mut KeyedState, value: &T) -> Result<(), StateError> {
        state.put_value(self.id, value)
    }

    pub fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        state.clear_value(self.id)
    }
}

/// A list of values per key and namespace.
#[derive(Debug)]
pub struct ListState<T> {
    id: StateId,
    _type: PhantomData<fn() -> T>,
}

impl<T: StateCodec> ListState<T> {
    pub fn id(&self) -> StateId {
        self.id
    }
    /// Appends one element (without reading the list).
    pub fn add(&self, state: &mut KeyedState, value: &T) -> Result<(), StateError> {
        let key_group = state.build_key(self.id);
        state.start_written(self.id);
        value.encode(&mut state.written);
        let length = (state.written.len() as u32).to_le_bytes();
        state.written.splice(0..0, length);
        state.backend.append(key_group, &state.full_key, &state.written)
    }

    pub fn add_all(&self, state: &mut KeyedState, values: &[T]) -> Result<(), StateError> {
        values.iter().try_for_each(|value| self.add(state, value))
    }

    /// The elements, oldest first; `None` if there are none (never written, cleared, expired).
    pub fn get(&self, state: &mut KeyedState) -> Result<Option<Vec<T>>, StateError> {
        let key_group = state.build_key(self.id);
        if !state.backend.get(key_group, &state.full_key, &mut state.value)? {
            return Ok(None);
        }
        let descriptor = state.descriptor(self.id).clone();
        let error = |reason: String| value_error(&descriptor, key_group, reason);
        let mut values = Vec::new();
        match descriptor.ttl {
            None => {
                for element in list_elements(&state.value).map_err(error)? {
                    values.push(state.decode(self.id, key_group, element)?);
                }
            }
            Some(ttl) => {
                let now = state.now(&ttl);
                let mut live = Vec::new();
                let mut changed = false;
                for element in list_elements(&state.value).map_err(error)? {
                    let stamp = element.get(..STAMP_SIZE).ok_or_else(|| error("element without time stamp".into()))?;
                    let stamp = i64::from_le_bytes(stamp.try_into().expect("eight bytes"));
                    let is_expired = expired(stamp, &ttl, now);
                    if !is_expired || ttl.visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp {
                        values.push(state.decode(self.id, key_group, &element[STAMP_SIZE..])?);
                    }
                    if is_expired {
                        changed = true;
                        continue;
                    }
                    let renew = ttl.update == TtlUpdate::OnReadAndWrite && stamp != now;
                    changed |= renew;
                    live.extend_from_slice(&(element.len() as u32).to_le_bytes());
                    let now_bytes = now.to_le_bytes();
                    live.extend_from_slice(if renew { &now_bytes } else { &element[..STAMP_SIZE] });
                    live.extend_from_slice(&element[STAMP_SIZE..]);
                }
                if changed {
                    if live.is_empty() {
                        state.backend.delete(key_group, &state.full_key)?;
                    } else {
                        state.backend.put(key_group, &state.full_key, &live)?;
                    }
                }
            }
        }
        Ok((!values.is_empty()).then_some(values))
    }

    /// Appends the elements of `sources` (namespaces of the current key, in the order given) to
    /// `target`'s, and clears the sources (merging windows). With TTL, the moved elements count
    /// as written now.
    pub fn merge_namespaces(&self, state: &mut KeyedState, target: &[u8], sources: &[&[u8]]) -> Result<(), StateError> {
        let mut merged = Vec::new();
        for source in sources.iter().filter(|source| **source != target) {
            state.set_namespace(source)?;
            if let Some(values) = self.get(state)? {
                merged.extend(values);
                self.clear(state)?;
            }
        }
        state.set_namespace(target)?;
        self.add_all(state, &merged)
    }

    /// Replaces the elements (an empty slice clears the list).
    pub fn update(&self, state: &mut KeyedState, values: &[T]) -> Result<(), StateError> {
        self.clear(state)?;
        self.add_all(state, values)
    }

    pub fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        state.clear_value(self.id)
    }
}

/// A sorted map per key and namespace: one backend entry per map key.
#[derive(Debug)]
pub struct MapState<K, V> {
    id: StateId,
    _type: PhantomData<fn() -> (K, V)>,
}

impl<K: MapKey, V: StateCodec> MapState<K, V> {
    pub fn id(&self) -> StateId {
        self.id
    }
    #[inline]
    fn build(&self, state: &mut KeyedState, key: &K) -> KeyGroup {
        let key_group = state.build_key(self.id);
        key.encode_key(&mut state.full_key, true);
        key_group
    }

    pub fn get(&self, state: &mut KeyedState, key: &K) -> Result<Option<V>, StateError> {
        let key_group = self.build(state, key);
        match state.read_stamped(self.id, key_group)? {
            None => Ok(None),
            Some(offset) => state.decode(self.id, key_group, &state.value[offset..]).map(Some),
        }
    }

    pub fn put(&self, state: &mut KeyedState, key: &K, value: &V) -> Result<(), StateError> {
        let key_group = self.build(state, key);
        state.start_written(self.id);
        value.encode(&mut state.written);
        state.backend.put(key_group, &state.full_key, &state.written)
    }

    pub fn remove(&self, state: &mut KeyedState, key: &K) -> Result<(), StateError> {
        let key_group = self.build(state, key);
        state.backend.delete(key_group, &state.full_key)
    }

    pub fn contains(&self, state: &mut KeyedState, key: &K) -> Result<bool, StateError> {
        let key_group = self.build(state, key);
        Ok(state.read_stamped(self.id, key_group)?.is_some())
    }

    /// Visits the live entries in key order until `visit` returns `false`. Expired entries met on
    /// the way are removed.
    pub fn for_each(
        &self,
        state: &mut KeyedState,
        mut visit: impl FnMut(K, V) -> Result<bool, StateError>,
    ) -> Result<(), StateError> {
        let key_group = state.build_key(self.id);
        let prefix = std::mem::take(&mut state.full_key);
        let descriptor = state.descriptor(self.id).clone();
        let now = descriptor.ttl.map(|ttl| state.now(&ttl));
        let mut expired_keys = Vec::new();
        let mut renewed = Vec::new();
        let mut failure = None;
        let result = state.backend.scan_range(key_group, &prefix, &prefix, &mut |key, value| {
            let fail = |reason: String| value_error(&descriptor, key_group, reason);
            let payload = match (descriptor.ttl, now) {
                (Some(ttl), Some(now)) => {
                    let Some(stamp) = value.get(..STAMP_SIZE) else {
                        failure = Some(fail("value shorter than its TTL time stamp".into()));
                        return Ok(false);
                    };
                    let stamp = i64::from_le_bytes(stamp.try_into().expect("eight bytes"));
                    if expired(stamp, &ttl, now) {
                        expired_keys.push(key.to_vec());
                        if ttl.visibility == TtlVisibility::NeverReturnExpired {
                            return Ok(true);
                        }
                    } else if ttl.update == TtlUpdate::OnReadAndWrite && stamp != now {
                        let mut value = value.to_vec();
                        value[..STAMP_SIZE].copy_from_slice(&now.to_le_bytes());
                        renewed.push((key.to_vec(), value));
                    }
                    &value[STAMP_SIZE..]
                }
                _ => value,
            };
            let decoded = K::decode_whole(&key[prefix.len()..])
                .and_then(|map_key| V::decode(payload).map(|value| (map_key, value)));
            match decoded {
                Ok((map_key, value)) => visit(map_key, value),
                Err(error) => {
                    failure = Some(fail(error.to_string()));
                    Ok(false)
                }
            }
        });
        state.full_key = prefix;
        result?;
        if let Some(error) = failure {
            return Err(error);
        }
        for key in expired_keys {
            state.backend.delete(key_group, &key)?;
        }
        for (key, value) in renewed {
            state.backend.put(key_group, &key, &value)?;
        }
        Ok(())
    }

    /// The live entries in key order.
    pub fn entries(&self, state: &mut KeyedState) -> Result<Vec<(K, V)>, StateError> {
        let mut entries = Vec::new();
        self.for_each(state, |key, value| {
            entries.push((key, value));
            Ok(true)
        })?;
        Ok(entries)
    }

    pub fn is_empty(&self, state: &mut KeyedState) -> Result<bool, StateError> {
        let mut empty = true;
        self.for_each(state, |_, _| {
            empty = false;
            Ok(false)
        })?;
        Ok(empty)
    }

    /// Removes every entry of the current key and namespace.
    pub fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        let key_group = state.build_key(self.id);
        let prefix = state.full_key.clone();
        let mut keys = Vec::new();
        state.backend.scan_range(key_group, &prefix, &prefix, &mut |key, _| {
            keys.push(key.to_vec());
            Ok(true)
        })?;
        for key in keys {
            state.backend.delete(key_group, &key)?;
        }
        Ok(())
    }
}

/// One value per key and namespace, combined with each added value by a reduce function.
pub struct ReducingState<T, F> {
    id: StateId,
    reduce: F,
    _type: PhantomData<fn() -> T>,
}

impl<T: StateCodec + Clone, F: Fn(&T, &T) -> T> ReducingState<T, F> {
    pub fn id(&self) -> StateId {
        self.id
    }
    pub fn get(&self, state: &mut KeyedState) -> Result<Option<T>, StateError> {
        state.get_value(self.id)
    }

    /// Combines `value` into the stored one (stores it if there is none).
    #[inline]
    pub fn add(&self, state: &mut KeyedState, value: &T) -> Result<(), StateError> {
        let reduce = &self.reduce;
        state.merge_value::<T>(self.id, |old| match old {
            None => value.clone(),
            Some(old) => reduce(&old, value),
        })
    }

    pub fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        state.clear_value(self.id)
    }

    /// Reduces the values of `sources` (namespaces of the current key) into `target`'s, clearing
    /// the sources (merging windows).
    pub fn merge_namespaces(&self, state: &mut KeyedState, target: &[u8], sources: &[&[u8]]) -> Result<(), StateError> {
        let mut merged: Option<T> = None;
        for source in sources {
            state.set_namespace(source)?;
            if let Some(value) = state.get_value::<T>(self.id)? {
                merged = Some(match merged {
                    None => value,
                    Some(so_far) => (self.reduce)(&so_far, &value),
                });
                state.clear_value(self.id)?;
            }
        }
        state.set_namespace(target)?;
        if let Some(value) = merged {
            let combined = match state.get_value::<T>(self.id)? {
                None => value,
                Some(existing) => (self.reduce)(&existing, &value),
            };
            state.put_value(self.id, &combined)?;
        }
        Ok(())
    }
}

/// An accumulator per key and namespace, fed by an [`AggregateFunction`].
pub struct AggregatingState<A> {
    id: StateId,
    function: A,
}

impl<A: AggregateFunction> AggregatingState<A> {
    pub fn id(&self) -> StateId {
        self.id
    }

    pub fn function(&self) -> &A {
        &self.function
    }

    /// The result, with the accumulator removed in the same access.
    pub fn take(&self, state: &mut KeyedState) -> Result<Option<A::Out>, StateError> {
        Ok(state.take_value::<A::Acc>(self.id)?.map(|accumulator| self.function.get_result(&accumulator)))
    }
    /// The result of the accumulated values, or `None` if nothing was added.
    pub fn get(&self, state: &mut KeyedState) -> Result<Option<A::Out>, StateError> {
        Ok(state.get_value::<A::Acc>(self.id)?.map(|accumulator| self.function.get_result(&accumulator)))
    }

    #[inline]
    pub fn add(&self, state: &mut KeyedState, value: &A::In) -> Result<(), StateError> {
        let function = &self.function;
        state.merge_value::<A::Acc>(self.id, |old| {
            let mut accumulator = old.unwrap_or_else(|| function.create_accumulator());
            function.add(value, &mut accumulator);
            accumulator
        })
    }

    pub fn clear(&self, state: &mut KeyedState) -> Result<(), StateError> {
        state.clear_value(self.id)
    }

    /// Merges the accumulators of `sources` (namespaces of the current key) into `target`'s,
    /// clearing the sources (merging windows).
    pub fn merge_namespaces(&self, state: &mut KeyedState, target: &[u8], sources: &[&[u8]]) -> Result<(), StateError> {
        let mut merged: Option<A::Acc> = None;
        for source in sources {
            state.set_namespace(source)?;
            if let Some(accumulator) = state.get_value::<A::Acc>(self.id)? {
                merged = Some(match merged {
                    None => accumulator,
                    Some(so_far) => self.function.merge(so_far, accumulator),
                });
                state.clear_value(self.id)?;
            }
        }
        state.set_namespace(target)?;
        if let Some(accumulator) = merged {
            let combined = match state.get_value::<A::Acc>(self.id)? {
                None => accumulator,
                Some(existing) => self.function.merge(existing, accumulator),
            };
            state.put_value(self.id, &combined)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
