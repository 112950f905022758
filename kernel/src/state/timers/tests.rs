use super::*;
use crate::element::CheckpointId;
use crate::env::MemStorage;
use crate::key_group::MaxParallelism;
use crate::state::keyed::{query_snapshot, Queried, QueryKey, TtlTimes, ValueState};
use crate::state::{CaptureTarget, HeapBackend, StateBackend};

fn heap_state(max: u16) -> KeyedState {
    let max = MaxParallelism::new(max).expect("in range");
    KeyedState::new(Box::new(HeapBackend::new(KeyGroupRange::all(max))), max)
}

/// Fires every event-time timer due at `watermark`: `(time, key, namespace)` in firing order.
fn fire_event(timers: &mut TimerService, state: &mut KeyedState, watermark: i64) -> Vec<(i64, u64, i64)> {
    let mut fired = Vec::new();
    while let Some(timer) = timers.poll_event_timer(state, EventTime(watermark)).unwrap() {
        let TimerTime::Event(time) = timer.time else { panic!("{timer:?} from the event-time timers") };
        fired.push((time.0, timer.key_u64().unwrap(), timer.namespace_i64().unwrap()));
    }
    fired
}

fn target(checkpoint: u64, name: &str) -> CaptureTarget {
    CaptureTarget {
        checkpoint: CheckpointId(checkpoint),
        path: format!("chk-{checkpoint}/{name}"),
        shared_dir: "shared".to_string(),
    }
}

/// Captures `state` and writes the capture into `storage`: the files.
fn checkpoint(state: &mut KeyedState, storage: &mut MemStorage, checkpoint: u64, name: &str) -> Vec<String> {
    let capture = state.capture(&target(checkpoint, name)).unwrap();
    let mut files = capture.files;
    files.extend(capture.write.write(storage).unwrap());
    files
}

// Goal: timers fire once each, in (time, key group, key, namespace) order, only once due, with
// their key and namespace current; a second registration is the same timer; deleted timers
// never fire. Method: a script on one subtask with the expected firing order written out.
#[test]
fn timers_fire_once_in_order_when_due() {
    let mut state = heap_state(8);
    let count: ValueState<u64> = state.value_state("count", None).unwrap();
    let mut timers = TimerService::declare(&mut state).unwrap();
    let max = state.max_parallelism();
    // Keys 1..=6 in ascending key group, then key.
    let mut keys: Vec<u64> = (1..=6).collect();
    keys.sort_by_key(|&key| (max.key_group_of_u64(key), key));
    for &key in &keys {
        state.set_current_key_u64(key);
        for namespace in [2, -1] {
            state.set_namespace_i64(namespace);
            timers.register_event_timer(&mut state, EventTime(20)).unwrap();
            timers.register_event_timer(&mut state, EventTime(10)).unwrap();
            timers.register_event_timer(&mut state, EventTime(10)).unwrap();
        }
    }
    state.set_current_key_u64(keys[0]);
    state.set_namespace_i64(-1);
    timers.delete_event_timer(&mut state, EventTime(10)).unwrap();
    timers.delete_event_timer(&mut state, EventTime(11)).unwrap();
    assert_eq!(timers.next_event_time(&mut state).unwrap(), Some(EventTime(10)));
    assert_eq!(timers.next_processing_time(&mut state).unwrap(), None);
    assert_eq!(fire_event(&mut timers, &mut state, 9), vec![]);
    assert_eq!(timers.watermark_bound(&mut state).unwrap(), EventTime(9));
    // Within a key, namespaces by their encoding: -1 before 2.
    let mut expected = Vec::new();
    for &key in &keys {
        if key != keys[0] {
            expected.push((10, key, -1));
        }
        expected.push((10, key, 2));
    }
    let mut fired = Vec::new();
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime(15)).unwrap() {
        // The timer's key and namespace are current: its state is the right one.
        let key = timer.key_u64().unwrap();
        assert_eq!(state.current_key_group(), max.key_group_of_u64(key));
        assert_eq!(timer.key_group, max.key_group_of_u64(key));
        let so_far = count.get(&mut state).unwrap().unwrap_or(0);
        count.update(&mut state, &(so_far + 1)).unwrap();
        fired.push((10, key, timer.namespace_i64().unwrap()));
    }
    assert_eq!(fired, expected);
    assert_eq!(timers.watermark_bound(&mut state).unwrap(), EventTime(19));
    let fired = fire_event(&mut timers, &mut state, 20);
    assert_eq!(fired.len(), keys.len() * 2);
    assert!(fired.iter().all(|&(time, _, _)| time == 20));
    assert_eq!(fire_event(&mut timers, &mut state, i64::MAX), vec![]);
    assert_eq!(timers.next_event_time(&mut state).unwrap(), None);
    assert_eq!(timers.watermark_bound(&mut state).unwrap(), EventTime::MAX);
    state.set_current_key_u64(keys[1]);
    state.set_namespace_i64(2);
    assert_eq!(count.get(&mut state).unwrap(), Some(1));
    // Only the counts are left: 11 entries of a 22-byte key (id, key, namespace) and a u64.
    assert_eq!(state.backend_for_timers().size_bytes(), 11 * (22 + 8));
}

// Goal: a timer registered while firing, for a time already due, fires in the same loop in its
// place in the order; one for later waits. Processing time is a separate domain.
// Method: a script; the handler of the first timer registers two more.
#[test]
fn timers_registered_while_firing_fire_in_order() {
    let mut state = heap_state(1);
    let mut timers = TimerService::declare(&mut state).unwrap();
    state.set_current_key_u64(7);
    timers.register_event_timer(&mut state, EventTime(5)).unwrap();
    timers.register_event_timer(&mut state, EventTime(8)).unwrap();
    timers.register_processing_timer(&mut state, Instant(6)).unwrap();
    let mut fired = Vec::new();
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime(10)).unwrap() {
        fired.push(timer.time);
        if timer.time == TimerTime::Event(EventTime(5)) {
            timers.register_event_timer(&mut state, EventTime(3)).unwrap();
            timers.register_event_timer(&mut state, EventTime(11)).unwrap();
        }
    }
    let event = |time| TimerTime::Event(EventTime(time));
    assert_eq!(fired, vec![event(5), event(3), event(8)]);
    assert_eq!(timers.next_event_time(&mut state).unwrap(), Some(EventTime(11)));
    assert_eq!(timers.poll_processing_timer(&mut state, Instant(5)).unwrap(), None);
    let timer = timers.poll_processing_timer(&mut state, Instant(6)).unwrap().unwrap();
    assert_eq!((timer.time, timer.key_u64()), (TimerTime::Processing(Instant(6)), Some(7)));
    assert_eq!(timer.namespace(), b"");
    assert_eq!(timers.next_processing_time(&mut state).unwrap(), None);
}

// Goal: the extremes of both clocks order and fire as times: the lowest event time is due at
// every watermark (and bounds the output watermark at the lowest), the highest only at the end.
#[test]
fn extreme_times_fire_in_order() {
    let mut state = heap_state(4);
    let mut timers = TimerService::declare(&mut state).unwrap();
    state.set_current_key_bytes(b"k").unwrap();
    for time in [i64::MAX, 0, i64::MIN, -1] {
        timers.register_event_timer(&mut state, EventTime(time)).unwrap();
    }
    assert_eq!(timers.watermark_bound(&mut state).unwrap(), EventTime::MIN);
    let mut fired = Vec::new();
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime::MIN).unwrap() {
        fired.push(timer.time);
        assert_eq!(timer.key(), b"k");
    }
    assert_eq!(fired, vec![TimerTime::Event(EventTime::MIN)]);
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime::MAX).unwrap() {
        fired.push(timer.time);
    }
    let times: Vec<TimerTime> = [i64::MIN, -1, 0, i64::MAX].iter().map(|&t| TimerTime::Event(EventTime(t))).collect();
    assert_eq!(fired, times);
    timers.register_processing_timer(&mut state, Instant(u64::MAX)).unwrap();
    timers.register_processing_timer(&mut state, Instant(0)).unwrap();
    assert_eq!(
        timers.poll_processing_timer(&mut state, Instant(0)).unwrap().unwrap().time,
        TimerTime::Processing(Instant(0))
    );
    assert_eq!(timers.next_processing_time(&mut state).unwrap(), Some(Instant(u64::MAX)));
}

// Goal: timers are part of a checkpoint and come back at another parallelism, each in the
// subtask that holds its key group, firing as before (minus what fired after the capture
// would fire again: the checkpoint's timers are the state at the barrier).
// Method: one subtask registers timers for 100 keys, is captured, fires half; two subtasks
// restore the capture and fire all; the union is exactly the registered timers.
#[test]
fn timers_survive_restore_at_another_parallelism() {
    let max = MaxParallelism::new(16).unwrap();
    let mut storage = MemStorage::new();
    let mut state = KeyedState::new(Box::new(HeapBackend::new(KeyGroupRange::all(max))), max);
    let mut timers = TimerService::declare(&mut state).unwrap();
    let mut registered = Vec::new();
    for key in 0..100_u64 {
        state.set_current_key_u64(key);
        state.set_namespace_i64(key as i64 % 3);
        timers.register_event_timer(&mut state, EventTime(key as i64 % 10)).unwrap();
        registered.push((key as i64 % 10, key, key as i64 % 3));
    }
    let files = checkpoint(&mut state, &mut storage, 1, "op-0");
    assert_eq!(fire_event(&mut timers, &mut state, 4).len(), 50);
    let mut fired = Vec::new();
    for index in 0..2 {
        let range = max.range_of(index, 2);
        let mut restored = KeyedState::new(Box::new(HeapBackend::new(range)), max);
        let mut timers = TimerService::declare(&mut restored).unwrap();
        restored.restore_files(&mut storage, &files).unwrap();
        let part = fire_event(&mut timers, &mut restored, 100);
        assert!(part.iter().all(|&(_, key, _)| range.contains(max.key_group_of_u64(key))));
        assert!(part.len() > 10, "subtask {index} fired {}", part.len());
        // In time order, then key group order.
        let order: Vec<(i64, KeyGroup)> =
            part.iter().map(|&(time, key, _)| (time, max.key_group_of_u64(key))).collect();
        assert!(order.windows(2).all(|pair| pair[0] <= pair[1]), "{order:?}");
        fired.extend(part);
    }
    fired.sort_unstable();
    registered.sort_unstable();
    assert_eq!(fired, registered);
}

// Goal: the descriptors check covers timers: a checkpoint with timers does not restore into an
// operator that declares none, nor into one that declares them at another place; user states
// cannot take the timers' names, and timers states are not queryable.
#[test]
fn timers_take_part_in_descriptor_checks() {
    let mut storage = MemStorage::new();
    let mut state = heap_state(4);
    let mut timers = TimerService::declare(&mut state).unwrap();
    let _value: ValueState<u64> = state.value_state("value", None).unwrap();
    state.set_current_key_u64(1);
    timers.register_event_timer(&mut state, EventTime(1)).unwrap();
    let files = checkpoint(&mut state, &mut storage, 1, "op");

    let mut without = heap_state(4);
    without.value_state::<u64>("value", None).unwrap();
    let refused = without.restore_files(&mut storage, &files);
    assert!(matches!(refused, Err(StateError::Incompatible(_))), "{refused:?}");

    let mut elsewhere = heap_state(4);
    elsewhere.value_state::<u64>("value", None).unwrap();
    TimerService::declare(&mut elsewhere).unwrap();
    let refused = elsewhere.restore_files(&mut storage, &files);
    assert!(matches!(refused, Err(StateError::Incompatible(_))), "{refused:?}");

    let mut same = heap_state(4);
    let mut timers = TimerService::declare(&mut same).unwrap();
    same.value_state::<u64>("value", None).unwrap();
    same.restore_files(&mut storage, &files).unwrap();
    assert_eq!(timers.next_event_time(&mut same).unwrap(), Some(EventTime(1)));

    let declared = state.value_state::<u64>("timers/mine", None);
    assert!(matches!(declared, Err(StateError::Declaration(_))), "{declared:?}");
    let twice = TimerService::declare(&mut state);
    assert!(matches!(twice, Err(StateError::Declaration(_))), "a second timer service");
    let queried = state.query(EVENT_TIMERS_STATE, QueryKey::U64(1), b"");
    assert!(matches!(queried, Err(StateError::Declaration(_))), "{queried:?}");
    // Queries of a checkpoint with timers: of the other states as ever, of the timers refused.
    let times = TtlTimes { processing_time: Instant(0), event_time: EventTime::MIN };
    let max = state.max_parallelism();
    let value = query_snapshot(&mut storage, &files, max, "value", QueryKey::U64(1), b"", times);
    assert_eq!(value.unwrap(), Queried::Absent);
    let timers = query_snapshot(&mut storage, &files, max, EVENT_TIMERS_STATE, QueryKey::U64(1), b"", times);
    assert!(matches!(timers, Err(StateError::Declaration(_))), "{timers:?}");
}

// Goal: damaged timer keys read from a backend (restored from outside) are errors, not panics,
// and a timer whose key does not parse stays in place.
// Method: timers written straight into the backend under the timers' state id.
#[test]
fn damaged_timer_keys_are_errors() {
    let mut state = heap_state(1);
    let mut timers = TimerService::declare(&mut state).unwrap();
    let id = StateId(0);
    let mut short = id.prefix().to_vec();
    short.extend_from_slice(&[0; 5]);
    state.backend_mut().put(KeyGroup(0), &short, &[]).unwrap();
    let result = timers.next_event_time(&mut state);
    assert!(matches!(result, Err(StateError::Value { .. })), "{result:?}");
    state.backend_mut().delete(KeyGroup(0), &short).unwrap();
    // A key length beyond the end of the key.
    let mut bad = id.prefix().to_vec();
    bad.extend_from_slice(&order_preserving_i64(3).to_be_bytes());
    bad.extend_from_slice(&[0, 9, 1, 0, 0]);
    state.backend_mut().put(KeyGroup(0), &bad, &[]).unwrap();
    assert_eq!(timers.next_event_time(&mut state).unwrap(), Some(EventTime(3)));
    for _ in 0..2 {
        let result = timers.poll_event_timer(&mut state, EventTime(3));
        assert!(matches!(result, Err(StateError::Corrupt { .. })), "{result:?}");
    }
}

// Goal: the service's memory does not grow with its timers: one head per key group and domain.
// Method: 20,000 timers in 8 key groups; the service's order holds at most 8 entries per domain.
#[test]
fn memory_is_per_key_group() {
    let mut state = heap_state(8);
    let mut timers = TimerService::declare(&mut state).unwrap();
    for key in 0..10_000_u64 {
        state.set_current_key_u64(key);
        state.set_namespace_i64(0);
        timers.register_event_timer(&mut state, EventTime(key as i64)).unwrap();
        timers.register_processing_timer(&mut state, Instant(key)).unwrap();
    }
    for queue in &timers.queues {
        assert_eq!(queue.order.len(), 8);
        assert_eq!(queue.heads.len(), 8);
    }
    assert_eq!(fire_event(&mut timers, &mut state, 4_999).len(), 5_000);
    assert!(timers.queues[0].order.len() <= 8);
}

// Goal: the keys a poll reads ahead stay exactly the group's first timers while timers are
// registered and deleted among them, before them and beyond them.
// Method: one key group; 10 timers, one fired (reading 8 ahead, 0 to 14, leaves 2 to 14), then
// changes at each place relative to them; the rest fire in time order, the deleted ones never.
#[test]
fn read_ahead_follows_registrations_and_deletions() {
    let mut state = heap_state(1);
    let mut timers = TimerService::declare(&mut state).unwrap();
    state.set_current_key_u64(1);
    for time in (0..20).step_by(2) {
        timers.register_event_timer(&mut state, EventTime(time)).unwrap();
    }
    let fire = |timers: &mut TimerService, state: &mut KeyedState, watermark: i64| -> Vec<i64> {
        let mut fired = Vec::new();
        while let Some(timer) = timers.poll_event_timer(state, EventTime(watermark)).unwrap() {
            let TimerTime::Event(time) = timer.time else { panic!("{timer:?} from the event-time timers") };
            fired.push(time.0);
        }
        fired
    };
    assert_eq!(fire(&mut timers, &mut state, 0), vec![0]);
    assert_eq!(timers.queues[0].ahead[0].len(), READ_AHEAD_MAX - 1);
    // Before all, among them (new, and again), beyond them.
    for time in [1, 5, 6, 16, 17] {
        timers.register_event_timer(&mut state, EventTime(time)).unwrap();
    }
    assert_eq!(timers.queues[0].ahead[0].len(), READ_AHEAD_MAX, "the read-ahead keeps its bound");
    // Deleted: among them, the first, beyond them, one that never was.
    for time in [8, 1, 18, 9] {
        timers.delete_event_timer(&mut state, EventTime(time)).unwrap();
    }
    assert_eq!(timers.next_event_time(&mut state).unwrap(), Some(EventTime(2)));
    assert_eq!(fire(&mut timers, &mut state, 100), vec![2, 4, 5, 6, 10, 12, 14, 16, 17]);
}

/// A heap backend whose deletes fail while `failing` is set.
struct FailingDeletes {
    inner: HeapBackend,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StateBackend for FailingDeletes {
    fn key_groups(&self) -> KeyGroupRange {
        self.inner.key_groups()
    }
    fn declare_state(&mut self, id: StateId, name: &str, ordered: bool) -> Result<(), StateError> {
        self.inner.declare_state(id, name, ordered)
    }
    fn get(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        self.inner.get(key_group, key, value)
    }
    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.inner.put(key_group, key, value)
    }
    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StateError::Backend("delete refused by the test".to_string()));
        }
        self.inner.delete(key_group, key)
    }
    fn scan(&mut self, key_group: KeyGroup, visit: &mut crate::state::Visit<'_>) -> Result<(), StateError> {
        self.inner.scan(key_group, visit)
    }
    fn scan_range(
        &mut self,
        key_group: KeyGroup,
        prefix: &[u8],
        from: &[u8],
        visit: &mut crate::state::VisitWhile<'_>,
    ) -> Result<(), StateError> {
        self.inner.scan_range(key_group, prefix, from, visit)
    }
    fn snapshot(&mut self) -> Result<crate::state::KeyGroupsSnapshot, StateError> {
        self.inner.snapshot()
    }
    fn restore(&mut self, snapshot: &crate::state::KeyGroupsSnapshot) -> Result<(), StateError> {
        self.inner.restore(snapshot)
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
}

// Goal: a backend's error while a timer fires or is deleted leaves the service consistent: the
// timer stays (its delete failed) and fires at the next poll, in order; no assertion trips.
// Method: a heap backend whose deletes fail on demand, around polls and a deletion.
#[test]
fn backend_errors_leave_timers_in_place() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let range = KeyGroupRange::new(0, 1);
    let backend = FailingDeletes { inner: HeapBackend::new(range), failing: failing.clone() };
    let mut state = KeyedState::new(Box::new(backend), MaxParallelism::new(1).unwrap());
    let mut timers = TimerService::declare(&mut state).unwrap();
    state.set_current_key_u64(3);
    for time in [1, 2, 3] {
        timers.register_event_timer(&mut state, EventTime(time)).unwrap();
    }
    failing.store(true, std::sync::atomic::Ordering::Relaxed);
    let refused = timers.poll_event_timer(&mut state, EventTime(10));
    assert!(matches!(refused, Err(StateError::Backend(_))), "{refused:?}");
    state.set_current_key_u64(3);
    let refused = timers.delete_event_timer(&mut state, EventTime(2));
    assert!(matches!(refused, Err(StateError::Backend(_))), "{refused:?}");
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut fired = Vec::new();
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime(10)).unwrap() {
        fired.push(timer.time);
    }
    assert_eq!(fired, [1, 2, 3].map(|time| TimerTime::Event(EventTime(time))));
}
