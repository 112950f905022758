//! Unit tests of typed keyed state: each primitive's semantics, TTL, errors, restores and queries.

use super::*;
use crate::env::MemStorage;
use crate::state::testing::Lcg;
use crate::state::{HeapBackend, KeyGroupsSnapshot, PORTABLE_EXTENSION};

fn max() -> MaxParallelism {
    MaxParallelism::new(16).unwrap()
}

fn heap_state() -> KeyedState {
    KeyedState::new(Box::new(HeapBackend::new(KeyGroupRange::all(max()))), max())
}

fn ttl(
    ttl_ms: u64,
    time: TtlTime,
    update: TtlUpdate,
    visibility: TtlVisibility,
    cleanup_on_snapshot: bool,
    cleanup_incremental: usize,
) -> TtlConfig {
    TtlConfig { ttl_ms, time, update, visibility, cleanup_on_snapshot, cleanup_incremental }
}

/// Processing-time TTL of 10 ms with the given update and visibility, no cleanup but on reads.
fn ttl_10(update: TtlUpdate, visibility: TtlVisibility) -> TtlConfig {
    ttl(10, TtlTime::ProcessingTime, update, visibility, false, 0)
}

/// Every entry of the backend under `state`, over all its key groups.
fn backend_entries(state: &mut KeyedState) -> Vec<(KeyGroup, Vec<u8>, Vec<u8>)> {
    let mut entries = Vec::new();
    for group in state.key_groups().iter() {
        state
            .backend_mut()
            .scan(group, &mut |key, value| {
                entries.push((group, key.to_vec(), value.to_vec()));
                Ok(())
            })
            .unwrap();
    }
    entries
}

fn target(checkpoint: u64, name: &str) -> CaptureTarget {
    CaptureTarget {
        checkpoint: CheckpointId(checkpoint),
        path: format!("chk-{checkpoint}/{name}"),
        shared_dir: "shared".to_string(),
    }
}

/// Captures `state` and writes the capture: the files a restore reads.
fn capture_written(state: &mut KeyedState, storage: &mut MemStorage, checkpoint: u64) -> Vec<String> {
    let capture = state.capture(&target(checkpoint, "op-0")).unwrap();
    let mut files = capture.files;
    files.extend(capture.write.write(storage).unwrap());
    files
}

fn as_of(ms: u64) -> TtlTimes {
    TtlTimes { processing_time: Instant(ms), event_time: EventTime::MIN }
}

fn at(state: &mut KeyedState, ms: u64) {
    state.set_processing_time(Instant(ms));
}

// ----- the primitives

// Goal: a value state reads absent until written, the value once written, absent once cleared,
// separately per key and per namespace. Method: a script of writes and reads on the heap backend.
#[test]
fn value_state_absent_written_cleared() {
    let mut state = heap_state();
    let count = state.value_state::<u64>("count", None).unwrap();
    state.set_current_key_u64(1);
    assert_eq!(count.get(&mut state).unwrap(), None);
    count.update(&mut state, &0).unwrap();
    assert_eq!(count.get(&mut state).unwrap(), Some(0), "zero is a value, not absence");
    count.update(&mut state, &7).unwrap();
    assert_eq!(count.get(&mut state).unwrap(), Some(7));
    state.set_namespace(b"w1").unwrap();
    assert_eq!(count.get(&mut state).unwrap(), None, "another namespace");
    count.update(&mut state, &9).unwrap();
    state.set_current_key_u64(2);
    assert_eq!(count.get(&mut state).unwrap(), None, "another key");
    state.set_current_key_u64(1);
    assert_eq!(count.get(&mut state).unwrap(), Some(7), "setting the key resets the namespace");
    count.clear(&mut state).unwrap();
    assert_eq!(count.get(&mut state).unwrap(), None);
    state.set_namespace(b"w1").unwrap();
    assert_eq!(count.get(&mut state).unwrap(), Some(9), "clearing one namespace leaves the others");
    state.set_namespace_i64(-3);
    count.update(&mut state, &3).unwrap();
    state.set_namespace(&order_preserving_i64(-3).to_be_bytes()).unwrap();
    assert_eq!(count.get(&mut state).unwrap(), Some(3), "an integer namespace is its order-preserving bytes");
    state.set_current_key_i64(-1);
    assert_eq!(count.get(&mut state).unwrap(), None);
    state.set_current_key_bytes(b"one").unwrap();
    assert_eq!(count.get(&mut state).unwrap(), None);
}

// Goal: the documented key layout, `state id | key length | key | namespace length | namespace`,
// with the value's codec encoding, is what reaches the backend.
// Method: one write, the backend's entries compared with bytes written from the module doc.
#[test]
fn key_layout_is_the_documented_one() {
    let mut state = heap_state();
    let _first = state.value_state::<u64>("first", None).unwrap();
    let second = state.value_state::<u64>("second", None).unwrap();
    state.set_current_key_u64(7);
    state.set_namespace(b"ns").unwrap();
    second.update(&mut state, &5).unwrap();
    let mut key = vec![0, 1, 0, 8];
    key.extend_from_slice(&7_u64.to_be_bytes());
    key.extend_from_slice(&[0, 2, b'n', b's']);
    let group = max().key_group_of_u64(7);
    assert_eq!(backend_entries(&mut state), vec![(group, key, 5_u64.to_le_bytes().to_vec())]);
}

// Goal: a list state keeps its elements in the order added, through add, add_all and update, and
// reads absent when empty. Method: a script of writes and reads, two namespaces.
#[test]
fn list_state_order_and_updates() {
    let mut state = heap_state();
    let list = state.list_state::<String>("names", None).unwrap();
    state.set_current_key_u64(3);
    assert_eq!(list.get(&mut state).unwrap(), None);
    list.add(&mut state, &"b".to_string()).unwrap();
    list.add(&mut state, &"a".to_string()).unwrap();
    list.add_all(&mut state, &["".to_string(), "c".to_string()]).unwrap();
    list.add_all(&mut state, &[]).unwrap();
    let names = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    assert_eq!(list.get(&mut state).unwrap(), Some(names(&["b", "a", "", "c"])));
    state.set_namespace(b"other").unwrap();
    assert_eq!(list.get(&mut state).unwrap(), None);
    list.update(&mut state, &names(&["x"])).unwrap();
    state.set_namespace(b"").unwrap();
    assert_eq!(list.get(&mut state).unwrap(), Some(names(&["b", "a", "", "c"])));
    list.update(&mut state, &names(&["z", "y"])).unwrap();
    assert_eq!(list.get(&mut state).unwrap(), Some(names(&["z", "y"])));
    list.update(&mut state, &[]).unwrap();
    assert_eq!(list.get(&mut state).unwrap(), None, "updating to no elements clears");
    list.add(&mut state, &"again".to_string()).unwrap();
    list.clear(&mut state).unwrap();
    assert_eq!(list.get(&mut state).unwrap(), None);
    state.set_namespace(b"other").unwrap();
    assert_eq!(list.get(&mut state).unwrap(), Some(names(&["x"])));
}

/// Two distinct `u64` keys in the same key group.
fn two_keys_in_one_group() -> (u64, u64) {
    let group = max().key_group_of_u64(0);
    let other = (1..).find(|&key| max().key_group_of_u64(key) == group).unwrap();
    (0, other)
}

// Goal: a map state reads, writes, removes and iterates in key order, separately per key and per
// namespace, even where one key's or namespace's bytes are a prefix of another's.
// Method: keys inserted out of order (negative numbers, strings that prefix each other), two
// keys of one key group, namespaces "a" and "ab"; entries compared with a BTreeMap.
#[test]
fn map_state_semantics_and_order() {
    let mut state = heap_state();
    let map = state.map_state::<(i32, String), u64>("index", None).unwrap();
    let (key_a, key_b) = two_keys_in_one_group();
    state.set_current_key_u64(key_a);
    state.set_namespace(b"a").unwrap();
    assert!(map.is_empty(&mut state).unwrap());
    assert_eq!(map.entries(&mut state).unwrap(), vec![]);
    let keys = [(3, "b"), (-1, "z"), (3, "a\0"), (3, ""), (i32::MIN, "x"), (3, "a"), (i32::MAX, ""), (0, "ab")];
    let mut model = std::collections::BTreeMap::new();
    for (index, (number, text)) in keys.iter().enumerate() {
        let key = (*number, text.to_string());
        map.put(&mut state, &key, &(index as u64)).unwrap();
        model.insert(key, index as u64);
    }
    let expected: Vec<((i32, String), u64)> = model.clone().into_iter().collect();
    assert_eq!(map.entries(&mut state).unwrap(), expected);
    assert!(!map.is_empty(&mut state).unwrap());
    assert_eq!(map.get(&mut state, &(3, "a".to_string())).unwrap(), Some(5));
    assert_eq!(map.get(&mut state, &(3, "c".to_string())).unwrap(), None);
    assert!(map.contains(&mut state, &(0, "ab".to_string())).unwrap());
    assert!(!map.contains(&mut state, &(0, "a".to_string())).unwrap());
    map.put(&mut state, &(3, "a".to_string()), &50).unwrap();
    model.insert((3, "a".to_string()), 50);
    map.remove(&mut state, &(3, "b".to_string())).unwrap();
    map.remove(&mut state, &(4, "absent".to_string())).unwrap();
    model.remove(&(3, "b".to_string()));
    let expected: Vec<((i32, String), u64)> = model.clone().into_iter().collect();
    assert_eq!(map.entries(&mut state).unwrap(), expected);
    // Early stop: the first three in order.
    let mut seen = Vec::new();
    map.for_each(&mut state, |key, value| {
        seen.push((key, value));
        Ok(seen.len() < 3)
    })
    .unwrap();
    assert_eq!(seen, expected[..3].to_vec());

    // Another namespace whose bytes start with "a", another key of the same group: all separate.
    state.set_namespace(b"ab").unwrap();
    assert!(map.is_empty(&mut state).unwrap());
    map.put(&mut state, &(1, "in ab".to_string()), &1).unwrap();
    state.set_current_key_u64(key_b);
    state.set_namespace(b"a").unwrap();
    assert!(map.is_empty(&mut state).unwrap());
    map.put(&mut state, &(1, "key b".to_string()), &2).unwrap();
    state.set_current_key_u64(key_a);
    state.set_namespace(b"a").unwrap();
    assert_eq!(map.entries(&mut state).unwrap(), expected);
    map.clear(&mut state).unwrap();
    assert!(map.is_empty(&mut state).unwrap());
    assert_eq!(map.get(&mut state, &(3, "a".to_string())).unwrap(), None);
    state.set_namespace(b"ab").unwrap();
    assert_eq!(map.entries(&mut state).unwrap(), vec![((1, "in ab".to_string()), 1)]);
    state.set_current_key_u64(key_b);
    state.set_namespace(b"a").unwrap();
    assert_eq!(map.entries(&mut state).unwrap(), vec![((1, "key b".to_string()), 2)]);
}

// Goal: a visit's error ends the iteration and is returned as it is.
#[test]
fn map_for_each_returns_the_visits_error() {
    let mut state = heap_state();
    let map = state.map_state::<u64, u64>("map", None).unwrap();
    state.set_current_key_u64(1);
    map.put(&mut state, &1, &1).unwrap();
    map.put(&mut state, &2, &2).unwrap();
    let mut visits = 0;
    let error = map
        .for_each(&mut state, |_, _| {
            visits += 1;
            Err(StateError::Backend("stop".to_string()))
        })
        .unwrap_err();
    assert!(matches!(&error, StateError::Backend(reason) if reason == "stop"), "{error}");
    assert_eq!(visits, 1);
}

// Goal: a reducing state combines added values, and merging namespaces reduces the sources into
// the target and clears them. Method: sums over a script of adds, with absent sources and targets.
#[test]
fn reducing_state_and_merge_namespaces() {
    let mut state = heap_state();
    let sum = state.reducing_state("sum", |a: &i64, b: &i64| a + b, None).unwrap();
    state.set_current_key_u64(5);
    assert_eq!(sum.get(&mut state).unwrap(), None);
    sum.add(&mut state, &4).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), Some(4));
    sum.add(&mut state, &-10).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), Some(-6));
    sum.clear(&mut state).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), None);

    for (namespace, value) in [(b"w1", 1_i64), (b"w2", 20), (b"w3", 300)] {
        state.set_namespace(namespace).unwrap();
        sum.add(&mut state, &value).unwrap();
    }
    // Into an absent target, with an absent source among the sources.
    sum.merge_namespaces(&mut state, b"t", &[b"w1", b"none", b"w2"]).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), Some(21), "the current namespace is the target");
    for source in [&b"w1"[..], b"w2", b"none"] {
        state.set_namespace(source).unwrap();
        assert_eq!(sum.get(&mut state).unwrap(), None, "source {source:?} is cleared");
    }
    // Into a present target.
    sum.merge_namespaces(&mut state, b"t", &[b"w3"]).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), Some(321));
    // Nothing to merge: an absent target stays absent.
    sum.merge_namespaces(&mut state, b"empty", &[b"w1", b"w2"]).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), None);
    // The target among the sources keeps its value.
    sum.merge_namespaces(&mut state, b"t", &[b"t"]).unwrap();
    assert_eq!(sum.get(&mut state).unwrap(), Some(321));
}

/// The mean of the values added: `(count, sum)`.
struct Mean;

impl AggregateFunction for Mean {
    type In = i64;
    type Acc = (u64, i64);
    type Out = f64;
    fn create_accumulator(&self) -> (u64, i64) {
        (0, 0)
    }
    fn add(&self, value: &i64, accumulator: &mut (u64, i64)) {
        accumulator.0 += 1;
        accumulator.1 += value;
    }
    fn merge(&self, a: (u64, i64), b: (u64, i64)) -> (u64, i64) {
        (a.0 + b.0, a.1 + b.1)
    }
    fn get_result(&self, accumulator: &(u64, i64)) -> f64 {
        accumulator.1 as f64 / accumulator.0 as f64
    }
}

// Goal: an aggregating state feeds its accumulator and merges accumulators of namespaces.
// Method: means over a script of adds and a merge.
#[test]
fn aggregating_state_and_merge_namespaces() {
    let mut state = heap_state();
    let mean = state.aggregating_state("mean", Mean, None).unwrap();
    state.set_current_key_bytes(b"sensor").unwrap();
    assert_eq!(mean.get(&mut state).unwrap(), None, "no accumulator until something is added");
    mean.add(&mut state, &2).unwrap();
    mean.add(&mut state, &4).unwrap();
    assert_eq!(mean.get(&mut state).unwrap(), Some(3.0));
    state.set_namespace_i64(10);
    mean.add(&mut state, &10).unwrap();
    let w10 = order_preserving_i64(10).to_be_bytes();
    mean.merge_namespaces(&mut state, b"", &[&w10]).unwrap();
    assert_eq!(mean.get(&mut state).unwrap(), Some(16.0 / 3.0));
    state.set_namespace_i64(10);
    assert_eq!(mean.get(&mut state).unwrap(), None);
    mean.merge_namespaces(&mut state, b"new", &[b""]).unwrap();
    assert_eq!(mean.get(&mut state).unwrap(), Some(16.0 / 3.0));
    mean.clear(&mut state).unwrap();
    assert_eq!(mean.get(&mut state).unwrap(), None);
}

// ----- TTL

// Goal: a value expires exactly when `stamp + ttl <= now`, on processing time and on event time
// (where time starts below every stamp). Method: reads one millisecond before and at expiry.
#[test]
fn ttl_expires_exactly_at_stamp_plus_ttl() {
    let mut state = heap_state();
    let processing = state.value_state::<u64>("processing", Some(TtlConfig::processing_time(10))).unwrap();
    let event = state.value_state::<u64>("event", Some(TtlConfig::event_time(10))).unwrap();
    state.set_current_key_u64(1);
    at(&mut state, 100);
    processing.update(&mut state, &1).unwrap();
    at(&mut state, 109);
    assert_eq!(processing.get(&mut state).unwrap(), Some(1));
    at(&mut state, 110);
    assert_eq!(processing.get(&mut state).unwrap(), None);
    assert_eq!(event.get(&mut state).unwrap(), None);

    // Written before any watermark: stamped with the lowest event time.
    event.update(&mut state, &2).unwrap();
    state.set_event_time(EventTime(i64::MIN + 9));
    assert_eq!(event.get(&mut state).unwrap(), Some(2));
    // The first real watermark expires whatever was written before any (stamp + ttl is still
    // far below it): the documented rule, applied to a stamp of "minus infinity".
    state.set_event_time(EventTime(-5));
    assert_eq!(event.get(&mut state).unwrap(), None);
    event.update(&mut state, &3).unwrap();
    at(&mut state, 1_000_000);
    state.set_event_time(EventTime(4));
    assert_eq!(event.get(&mut state).unwrap(), Some(3), "processing time does not expire event-time state");
    state.set_event_time(EventTime(5));
    assert_eq!(event.get(&mut state).unwrap(), None);
}

// Goal: OnCreateAndWrite renews a stamp on writes only; OnReadAndWrite on reads too (every read
// of every primitive). Method: a read halfway, then a read where the first stamp would expire.
#[test]
fn ttl_update_on_read_renews_only_when_configured() {
    for update in [TtlUpdate::OnCreateAndWrite, TtlUpdate::OnReadAndWrite] {
        println!("{update:?}");
        let mut state = heap_state();
        let config = Some(ttl_10(update, TtlVisibility::NeverReturnExpired));
        let value = state.value_state::<u64>("value", config).unwrap();
        let list = state.list_state::<u64>("list", config).unwrap();
        let map = state.map_state::<u64, u64>("map", config).unwrap();
        let entries = state.map_state::<u64, u64>("entries", config).unwrap();
        let sum = state.reducing_state("sum", |a: &u64, b: &u64| a + b, config).unwrap();
        state.set_current_key_u64(1);
        at(&mut state, 100);
        value.update(&mut state, &1).unwrap();
        list.add(&mut state, &1).unwrap();
        map.put(&mut state, &1, &1).unwrap();
        entries.put(&mut state, &1, &1).unwrap();
        sum.add(&mut state, &1).unwrap();
        at(&mut state, 105);
        assert_eq!(value.get(&mut state).unwrap(), Some(1));
        assert_eq!(list.get(&mut state).unwrap(), Some(vec![1]));
        assert_eq!(map.get(&mut state, &1).unwrap(), Some(1));
        assert_eq!(entries.entries(&mut state).unwrap(), vec![(1, 1)]);
        assert_eq!(sum.get(&mut state).unwrap(), Some(1));
        at(&mut state, 110);
        let renewed = update == TtlUpdate::OnReadAndWrite;
        assert_eq!(value.get(&mut state).unwrap(), renewed.then_some(1));
        assert_eq!(list.get(&mut state).unwrap(), renewed.then(|| vec![1]));
        assert_eq!(map.get(&mut state, &1).unwrap(), renewed.then_some(1));
        assert_eq!(entries.entries(&mut state).unwrap(), if renewed { vec![(1, 1)] } else { vec![] });
        assert_eq!(sum.get(&mut state).unwrap(), renewed.then_some(1));
        // A write renews under both.
        value.update(&mut state, &2).unwrap();
        at(&mut state, 119);
        assert_eq!(value.get(&mut state).unwrap(), Some(2));
    }
}

// Goal: NeverReturnExpired hides an expired value; ReturnExpiredIfNotCleanedUp returns it once,
// the read removing it. Method: the same script under both, for every primitive.
#[test]
fn ttl_visibility_returns_expired_once_or_never() {
    for visibility in [TtlVisibility::NeverReturnExpired, TtlVisibility::ReturnExpiredIfNotCleanedUp] {
        println!("{visibility:?}");
        let mut state = heap_state();
        let config = Some(ttl_10(TtlUpdate::OnCreateAndWrite, visibility));
        let value = state.value_state::<u64>("value", config).unwrap();
        let list = state.list_state::<u64>("list", config).unwrap();
        let map = state.map_state::<u64, u64>("map", config).unwrap();
        let sum = state.reducing_state("sum", |a: &u64, b: &u64| a + b, config).unwrap();
        let mean = state.aggregating_state("mean", Mean, config).unwrap();
        state.set_current_key_u64(1);
        at(&mut state, 100);
        value.update(&mut state, &1).unwrap();
        list.add(&mut state, &1).unwrap();
        map.put(&mut state, &1, &1).unwrap();
        map.put(&mut state, &2, &2).unwrap();
        sum.add(&mut state, &1).unwrap();
        mean.add(&mut state, &1).unwrap();
        at(&mut state, 110);
        let once = visibility == TtlVisibility::ReturnExpiredIfNotCleanedUp;
        assert_eq!(value.get(&mut state).unwrap(), once.then_some(1));
        assert_eq!(list.get(&mut state).unwrap(), once.then(|| vec![1]));
        assert_eq!(map.get(&mut state, &1).unwrap(), once.then_some(1));
        assert_eq!(map.entries(&mut state).unwrap(), if once { vec![(2, 2)] } else { vec![] });
        assert_eq!(sum.get(&mut state).unwrap(), once.then_some(1));
        assert_eq!(mean.get(&mut state).unwrap(), once.then_some(1.0));
        // Read once: gone.
        assert_eq!(value.get(&mut state).unwrap(), None);
        assert_eq!(list.get(&mut state).unwrap(), None);
        assert_eq!(map.get(&mut state, &1).unwrap(), None);
        assert!(map.is_empty(&mut state).unwrap());
        assert_eq!(sum.get(&mut state).unwrap(), None);
        assert_eq!(mean.get(&mut state).unwrap(), None);
        assert_eq!(backend_entries(&mut state), vec![], "reads removed every expired entry");
    }
}

// Goal: adding to an expired reducing or aggregating value starts afresh, under both visibilities.
#[test]
fn ttl_add_to_expired_value_starts_afresh() {
    for visibility in [TtlVisibility::NeverReturnExpired, TtlVisibility::ReturnExpiredIfNotCleanedUp] {
        let mut state = heap_state();
        let config = Some(ttl_10(TtlUpdate::OnCreateAndWrite, visibility));
        let sum = state.reducing_state("sum", |a: &u64, b: &u64| a + b, config).unwrap();
        let mean = state.aggregating_state("mean", Mean, config).unwrap();
        state.set_current_key_u64(1);
        at(&mut state, 100);
        sum.add(&mut state, &1).unwrap();
        mean.add(&mut state, &1).unwrap();
        at(&mut state, 110);
        sum.add(&mut state, &5).unwrap();
        mean.add(&mut state, &5).unwrap();
        assert_eq!(sum.get(&mut state).unwrap(), Some(5), "{visibility:?}");
        assert_eq!(mean.get(&mut state).unwrap(), Some(5.0), "{visibility:?}");
        at(&mut state, 119);
        assert_eq!(sum.get(&mut state).unwrap(), Some(5), "the add stamped the new value");
    }
}

// Goal: list elements expire one by one, map entries one by one.
// Method: elements and entries written at different times, read as each expires.
#[test]
fn ttl_expires_list_elements_and_map_entries_separately() {
    let mut state = heap_state();
    let config = Some(ttl_10(TtlUpdate::OnCreateAndWrite, TtlVisibility::NeverReturnExpired));
    let list = state.list_state::<u64>("list", config).unwrap();
    let map = state.map_state::<String, u64>("map", config).unwrap();
    state.set_current_key_u64(1);
    at(&mut state, 100);
    list.add(&mut state, &1).unwrap();
    map.put(&mut state, &"early".to_string(), &1).unwrap();
    at(&mut state, 105);
    list.add_all(&mut state, &[2, 3]).unwrap();
    map.put(&mut state, &"late".to_string(), &2).unwrap();
    at(&mut state, 110);
    assert_eq!(list.get(&mut state).unwrap(), Some(vec![2, 3]));
    assert_eq!(map.get(&mut state, &"early".to_string()).unwrap(), None);
    assert!(!map.contains(&mut state, &"early".to_string()).unwrap());
    assert_eq!(map.entries(&mut state).unwrap(), vec![("late".to_string(), 2)]);
    list.add(&mut state, &4).unwrap();
    at(&mut state, 115);
    assert_eq!(list.get(&mut state).unwrap(), Some(vec![4]));
    assert!(map.is_empty(&mut state).unwrap());
    at(&mut state, 120);
    assert_eq!(list.get(&mut state).unwrap(), None);
    assert_eq!(backend_entries(&mut state), vec![]);
}

// Goal: a capture of a state with `cleanup_on_snapshot` holds no expired entry (elements of a
// list included), one without it keeps them, and a restore reads the same as the state did.
// Method: entries written at two times, a capture after the first expired; the `.state` file read.
#[test]
fn ttl_cleanup_on_snapshot_leaves_no_expired_entries() {
    let mut state = heap_state();
    let cleaned = |time| Some(ttl(10, time, TtlUpdate::OnCreateAndWrite, TtlVisibility::NeverReturnExpired, true, 0));
    let kept = Some(ttl(
        10,
        TtlTime::ProcessingTime,
        TtlUpdate::OnCreateAndWrite,
        TtlVisibility::NeverReturnExpired,
        false,
        0,
    ));
    let value = state.value_state::<u64>("value", cleaned(TtlTime::ProcessingTime)).unwrap();
    let list = state.list_state::<u64>("list", cleaned(TtlTime::ProcessingTime)).unwrap();
    let map = state.map_state::<u64, u64>("map", cleaned(TtlTime::EventTime)).unwrap();
    let other = state.value_state::<u64>("other", kept).unwrap();
    state.set_event_time(EventTime(0));
    for key in 0..20 {
        state.set_current_key_u64(key);
        at(&mut state, 100 + key % 2 * 5);
        state.set_event_time(EventTime((key % 2 * 5) as i64));
        value.update(&mut state, &key).unwrap();
        list.add(&mut state, &key).unwrap();
        map.put(&mut state, &key, &key).unwrap();
        other.update(&mut state, &key).unwrap();
        at(&mut state, 105);
        list.add(&mut state, &(key + 100)).unwrap();
    }
    at(&mut state, 110);
    state.set_event_time(EventTime(10));
    let mut storage = MemStorage::new();
    let files = capture_written(&mut state, &mut storage, 1);
    let portable = files.iter().find(|file| file.ends_with(PORTABLE_EXTENSION)).unwrap();
    let snapshot = KeyGroupsSnapshot::from_bytes(storage.read(portable).unwrap()).unwrap();
    let mut counts = [0_usize; 4];
    for (_, key, _) in snapshot.entries() {
        counts[usize::from(StateId::of_key(key).unwrap().0)] += 1;
    }
    // Odd keys were written at 105 (event time 5): only they remain where cleaned.
    assert_eq!(counts, [10, 20, 10, 20], "entries per state in the snapshot");
    let mut restored = heap_state();
    let value2 = restored.value_state::<u64>("value", cleaned(TtlTime::ProcessingTime)).unwrap();
    let list2 = restored.list_state::<u64>("list", cleaned(TtlTime::ProcessingTime)).unwrap();
    let map2 = restored.map_state::<u64, u64>("map", cleaned(TtlTime::EventTime)).unwrap();
    let _ = restored.value_state::<u64>("other", kept).unwrap();
    restored.restore_files(&mut storage, &files).unwrap();
    at(&mut restored, 110);
    restored.set_event_time(EventTime(10));
    for key in 0..20 {
        restored.set_current_key_u64(key);
        let odd = key % 2 == 1;
        assert_eq!(value2.get(&mut restored).unwrap(), odd.then_some(key), "key {key}");
        assert_eq!(list2.get(&mut restored).unwrap(), Some(if odd { vec![key, key + 100] } else { vec![key + 100] }));
        assert_eq!(map2.entries(&mut restored).unwrap(), if odd { vec![(key, key)] } else { vec![] });
    }
}

/// Entries of the backend per state id.
fn entries_of(state: &mut KeyedState, id: u16) -> usize {
    backend_entries(state).iter().filter(|(_, key, _)| StateId::of_key(key) == Some(StateId(id))).count()
}

// Goal: incremental cleanup examines at most its budget per step, and in the end removes every
// expired entry (and list element) of keys nobody touches again; live entries stay.
// Method: 300 quiet keys (half expired) in a value and a list state, steps counted until none is
// left; entries and size_bytes checked after every step.
#[test]
fn ttl_incremental_cleanup_is_bounded_and_complete() {
    let mut state = heap_state();
    let config = |incremental| {
        Some(ttl(
            10,
            TtlTime::ProcessingTime,
            TtlUpdate::OnCreateAndWrite,
            TtlVisibility::NeverReturnExpired,
            false,
            incremental,
        ))
    };
    let value = state.value_state::<u64>("value", config(5)).unwrap();
    let plain = state.value_state::<u64>("plain", None).unwrap();
    let list = state.list_state::<u64>("list", config(3)).unwrap();
    let keys = 300_u64;
    for key in 0..keys {
        state.set_current_key_u64(key);
        at(&mut state, 100);
        list.add(&mut state, &key).unwrap();
        at(&mut state, if key % 2 == 0 { 100 } else { 200 });
        value.update(&mut state, &key).unwrap();
        plain.update(&mut state, &key).unwrap();
        at(&mut state, 200);
        list.add(&mut state, &key).unwrap();
    }
    // Expired now: the value of every even key, the first element of every list.
    at(&mut state, 150);
    let budget = 5 + 3;
    let size_before = state.size_bytes();
    let mut size = size_before;
    let mut steps = 0;
    let is_clean = |entries: &[(KeyGroup, Vec<u8>, Vec<u8>)]| {
        let of = |id: u16| entries.iter().filter(move |(_, key, _)| StateId::of_key(key) == Some(StateId(id)));
        of(0).count() == keys as usize / 2 && of(2).all(|(_, _, value)| value.len() == 4 + STAMP_SIZE + 8)
    };
    loop {
        let before = backend_entries(&mut state);
        state.cleanup_step().unwrap();
        steps += 1;
        let after = backend_entries(&mut state);
        let changed = before.iter().filter(|entry| !after.contains(entry)).count();
        assert!(changed <= budget, "step {steps} changed {changed} entries, budget {budget}");
        assert!(state.size_bytes() <= size, "step {steps}: size grew");
        size = state.size_bytes();
        if is_clean(&after) {
            break;
        }
        assert!(steps < 10_000, "incremental cleanup does not finish");
    }
    println!("{steps} steps");
    // Expired: 150 values (a 14-byte key, a stamp, 8 bytes) and the first element of each of the
    // 300 lists (a length, a stamp, 8 bytes); the second elements live on.
    let removed = 150 * (14 + STAMP_SIZE + 8) + 300 * (4 + STAMP_SIZE + 8);
    assert_eq!(size_before - size, removed as u64, "size_bytes went down by what was removed");
    assert!(steps >= (keys as usize * 2) / budget, "{steps} steps cannot have examined every entry");
    assert_eq!(entries_of(&mut state, 1), keys as usize, "state without TTL is untouched");
    for key in 0..keys {
        state.set_current_key_u64(key);
        assert_eq!(value.get(&mut state).unwrap(), (key % 2 == 1).then_some(key));
        assert_eq!(list.get(&mut state).unwrap(), Some(vec![key]));
    }
    assert_eq!(state.size_bytes(), size, "reads found nothing left to remove");
}

// Goal: cleanup with nothing to clean, or no state with incremental cleanup, does nothing.
#[test]
fn ttl_incremental_cleanup_without_work() {
    let mut state = heap_state();
    state.cleanup_step().unwrap();
    let value = state.value_state::<u64>("value", Some(TtlConfig::processing_time(10))).unwrap();
    state.cleanup_step().unwrap();
    state.set_current_key_u64(1);
    value.update(&mut state, &1).unwrap();
    for _ in 0..10 {
        state.cleanup_step().unwrap();
    }
    assert_eq!(value.get(&mut state).unwrap(), Some(1));
}

// ----- errors

fn is_value_error(error: &StateError, state_name: &str, key_group: KeyGroup) -> bool {
    let message = error.to_string();
    matches!(error, StateError::Value { state, key_group: group, .. } if state == state_name && *group == key_group.0)
        && message.contains(&format!("{state_name:?}"))
        && message.contains(&format!("key group {}", key_group.0))
}

// Goal: a corrupt value, written raw under a state's key, is a StateError::Value naming the state
// and the key group, for every primitive, for queries of what they frame (TTL stamps, list
// elements: a query returns values encoded, for the asker to decode) and for captures that clean
// up; never a panic.
// Method: each state written once, then its value replaced by bytes its codec refuses.
#[test]
fn corrupt_values_name_state_and_key_group() {
    let mut state = heap_state();
    let value = state.value_state::<u64>("value", None).unwrap();
    let list = state.list_state::<u64>("list", None).unwrap();
    let map = state.map_state::<u64, u64>("map", None).unwrap();
    let sum = state.reducing_state("sum", |a: &u64, b: &u64| a + b, None).unwrap();
    let mean = state.aggregating_state("mean", Mean, None).unwrap();
    let stamped = state.value_state::<u64>("stamped", Some(TtlConfig::processing_time(10))).unwrap();
    let stamped_list = state.list_state::<u64>("stamped list", Some(TtlConfig::processing_time(10))).unwrap();
    state.set_current_key_u64(42);
    let group = state.current_key_group();
    value.update(&mut state, &1).unwrap();
    list.add(&mut state, &1).unwrap();
    map.put(&mut state, &1, &1).unwrap();
    sum.add(&mut state, &1).unwrap();
    mean.add(&mut state, &1).unwrap();
    stamped.update(&mut state, &1).unwrap();
    stamped_list.add(&mut state, &1).unwrap();
    let garbage: [&[u8]; 7] =
        [&[1, 2, 3], &[9, 0, 0, 0, 1], &[1], &[1, 2], &[1, 2, 3, 4, 5, 6, 7, 8, 9], &[1, 2], &[4, 0, 0, 0, 1, 2, 3, 4]];
    for (entry, bad) in backend_entries(&mut state).into_iter().zip(garbage) {
        state.backend_mut().put(entry.0, &entry.1, bad).unwrap();
    }
    let checks: Vec<(&str, StateError)> = vec![
        ("value", value.get(&mut state).unwrap_err()),
        ("list", list.get(&mut state).unwrap_err()),
        ("map", map.get(&mut state, &1).unwrap_err()),
        ("map", map.entries(&mut state).unwrap_err()),
        ("sum", sum.get(&mut state).unwrap_err()),
        ("sum", sum.add(&mut state, &1).unwrap_err()),
        ("mean", mean.get(&mut state).unwrap_err()),
        ("mean", mean.add(&mut state, &1).unwrap_err()),
        ("stamped", stamped.get(&mut state).unwrap_err()),
        ("stamped list", stamped_list.get(&mut state).unwrap_err()),
        ("stamped", state.query("stamped", QueryKey::U64(42), b"").unwrap_err()),
        ("list", state.query("list", QueryKey::U64(42), b"").unwrap_err()),
        ("stamped", state.capture(&target(1, "op")).err().unwrap()),
    ];
    for (name, error) in checks {
        assert!(is_value_error(&error, name, group), "{name}: {error:?}");
    }
}

// Goal: a value read as another type than it was written as is a StateError::Value naming the
// state and key group. Method: a heap snapshot of a `u64` state restored raw (bypassing the
// descriptors' check) under a state of the same name declared `String`.
#[test]
fn wrong_type_read_names_state_and_key_group() {
    let mut state = heap_state();
    let count = state.value_state::<u64>("count", None).unwrap();
    state.set_current_key_u64(9);
    count.update(&mut state, &5).unwrap();
    let snapshot = state.backend_mut().snapshot().unwrap();
    let mut other = heap_state();
    let text = other.value_state::<String>("count", None).unwrap();
    other.backend_mut().restore(&snapshot).unwrap();
    other.set_current_key_u64(9);
    let error = text.get(&mut other).unwrap_err();
    assert!(is_value_error(&error, "count", max().key_group_of_u64(9)), "{error:?}");
}

// Goal: declarations are refused, with an error, when a name repeats, is empty or too long, or
// the TTL is zero.
#[test]
fn bad_declarations_are_refused() {
    let mut state = heap_state();
    state.value_state::<u64>("count", None).unwrap();
    let error = state.list_state::<String>("count", None).unwrap_err();
    assert!(matches!(error, StateError::Declaration(_)) && error.to_string().contains("\"count\""), "{error}");
    assert!(state.value_state::<u64>("", None).is_err());
    assert!(state.value_state::<u64>(&"x".repeat(256), None).is_err());
    state.value_state::<u64>(&"x".repeat(255), None).unwrap();
    assert!(state.value_state::<u64>("zero", Some(TtlConfig::processing_time(0))).is_err());
    assert_eq!(state.descriptors().len(), 2, "refused declarations leave nothing behind");
}

/// Declares the reference states: a `u64` value, a string list, a map with TTL.
fn declare_reference(state: &mut KeyedState) {
    state.value_state::<u64>("count", None).unwrap();
    state.list_state::<String>("names", None).unwrap();
    state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
}

/// A capture of the reference states holding one entry in each.
fn reference_capture() -> (MemStorage, Vec<String>) {
    let mut state = heap_state();
    let count = state.value_state::<u64>("count", None).unwrap();
    let names = state.list_state::<String>("names", None).unwrap();
    let index = state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
    state.set_current_key_u64(1);
    count.update(&mut state, &1).unwrap();
    names.add(&mut state, &"one".to_string()).unwrap();
    index.put(&mut state, &1, &"one".to_string()).unwrap();
    let mut storage = MemStorage::new();
    let files = capture_written(&mut state, &mut storage, 1);
    (storage, files)
}

fn restore_reference_into(declare: impl FnOnce(&mut KeyedState)) -> Result<KeyedState, StateError> {
    let (mut storage, files) = reference_capture();
    let mut state = heap_state();
    declare(&mut state);
    state.restore_files(&mut storage, &files).map(|()| state)
}

fn assert_refused(result: Result<KeyedState, StateError>, words: &[&str]) {
    let error = result.err().expect("the restore is refused");
    assert!(matches!(error, StateError::Incompatible(_)), "{error:?}");
    let message = error.to_string();
    for word in words {
        assert!(message.contains(word), "{message:?} does not name {word:?}");
    }
}

// Goal: a restore into states declared otherwise than the snapshot's is refused with a message
// naming the state: another type, another kind, TTL on one side only, another order, a state
// no longer declared. States declared after the snapshot's are accepted.
// Method: the same capture restored under each changed declaration.
#[test]
fn restore_refuses_incompatible_declarations() {
    restore_reference_into(declare_reference).unwrap();
    let restored = restore_reference_into(|state| {
        declare_reference(state);
        state.value_state::<u64>("new", None).unwrap();
    });
    let mut restored = restored.unwrap();
    assert_eq!(restored.query("count", QueryKey::U64(1), b"").unwrap(), Queried::Value(1_u64.to_le_bytes().to_vec()));

    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<i64>("count", None).unwrap();
            state.list_state::<String>("names", None).unwrap();
            state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
        }),
        &["\"count\"", "u64", "i64"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<u64>("count", None).unwrap();
            state.list_state::<String>("names", None).unwrap();
            state.map_state::<i64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
        }),
        &["\"index\"", "u64 -> string", "i64 -> string"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<u64>("count", None).unwrap();
            state.value_state::<String>("names", None).unwrap();
            state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
        }),
        &["\"names\"", "List", "Value"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<u64>("count", Some(TtlConfig::processing_time(10))).unwrap();
            state.list_state::<String>("names", None).unwrap();
            state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
        }),
        &["\"count\"", "without TTL"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<u64>("count", None).unwrap();
            state.list_state::<String>("names", None).unwrap();
            state.map_state::<u64, String>("index", None).unwrap();
        }),
        &["\"index\"", "with TTL"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.list_state::<String>("names", None).unwrap();
            state.value_state::<u64>("count", None).unwrap();
            state.map_state::<u64, String>("index", Some(TtlConfig::processing_time(10))).unwrap();
        }),
        &["\"count\"", "\"names\"", "order"],
    );
    assert_refused(
        restore_reference_into(|state| {
            state.value_state::<u64>("count", None).unwrap();
            state.list_state::<String>("names", None).unwrap();
        }),
        &["\"index\"", "does not declare"],
    );
}

/// The reference capture with its descriptors file changed by `change`.
fn restore_with_descriptors(change: impl FnOnce(&mut Vec<u8>)) -> Result<KeyedState, StateError> {
    let (mut storage, files) = reference_capture();
    let descriptors = files.iter().find(|file| file.ends_with(DESCRIPTORS_EXTENSION)).unwrap();
    let mut bytes = storage.read(descriptors).unwrap();
    change(&mut bytes);
    storage.write(descriptors, &bytes).unwrap();
    let mut state = heap_state();
    declare_reference(&mut state);
    state.restore_files(&mut storage, &files).map(|()| state)
}

/// Replaces the checksum at the end of a descriptors file by that of its body.
fn fix_checksum(bytes: &mut [u8]) {
    let body_length = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..body_length]);
    bytes[body_length..].copy_from_slice(&crc.to_le_bytes());
}

// Goal: a descriptors file of another version is refused as incompatible, saying which versions;
// a damaged one as corrupt, naming the file; a snapshot without descriptors is refused. None panics.
// Method: the reference capture's descriptors rewritten (version 2 with a valid checksum, a bit
// flipped, cut short, an unknown kind with a valid checksum, removed); then every truncation and
// many random corruptions (seeded) decoded.
#[test]
fn restore_refuses_other_versions_and_corrupt_descriptors() {
    assert_refused(
        restore_with_descriptors(|bytes| {
            bytes[4..6].copy_from_slice(&2_u16.to_le_bytes());
            fix_checksum(bytes);
        }),
        &["version 2", "version 1"],
    );
    let corrupt = |result: Result<KeyedState, StateError>| {
        let error = result.err().expect("refused");
        assert!(matches!(error, StateError::Corrupt { .. }), "{error:?}");
        assert!(error.to_string().contains(DESCRIPTORS_EXTENSION), "{error}");
    };
    corrupt(restore_with_descriptors(|bytes| bytes[9] ^= 4));
    corrupt(restore_with_descriptors(|bytes| bytes.truncate(bytes.len() - 5)));
    corrupt(restore_with_descriptors(|bytes| bytes.truncate(3)));
    corrupt(restore_with_descriptors(|bytes| {
        // The first state's kind, after magic, version, count and its name.
        let kind_at = 4 + 2 + 2 + 1 + "count".len();
        bytes[kind_at] = 77;
        fix_checksum(bytes);
    }));

    let (mut storage, files) = reference_capture();
    let without: Vec<String> = files.iter().filter(|file| !file.ends_with(DESCRIPTORS_EXTENSION)).cloned().collect();
    let mut state = heap_state();
    declare_reference(&mut state);
    let error = state.restore_files(&mut storage, &without).unwrap_err();
    assert!(matches!(error, StateError::Incompatible(_)), "{error:?}");

    let descriptors = files.iter().find(|file| file.ends_with(DESCRIPTORS_EXTENSION)).unwrap();
    let good = storage.read(descriptors).unwrap();
    for length in 0..good.len() {
        assert!(decode_descriptors(&good[..length]).is_err(), "cut to {length} bytes");
    }
    let seed = 5;
    println!("seed {seed}");
    let mut rng = Lcg::new(seed);
    for _ in 0..2_000 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bytes.len() as u64) as usize;
            bytes[at] = rng.below(256) as u8;
        }
        if rng.below(2) == 0 {
            fix_checksum(&mut bytes);
        }
        let _ = decode_descriptors(&bytes);
    }
}

// Goal: the descriptors file round-trips every field, TTL included.
#[test]
fn descriptors_round_trip() {
    let mut state = heap_state();
    state.value_state::<(u64, String)>("a", None).unwrap();
    let config =
        ttl(77, TtlTime::EventTime, TtlUpdate::OnReadAndWrite, TtlVisibility::ReturnExpiredIfNotCleanedUp, false, 9);
    state.map_state::<(i32, Vec<u8>), Vec<u64>>("b", Some(config)).unwrap();
    state.aggregating_state("c", Mean, Some(TtlConfig::processing_time(5))).unwrap();
    let descriptors = state.descriptors().to_vec();
    assert_eq!(decode_descriptors(&encode_descriptors(&descriptors)).unwrap(), descriptors);
}

// ----- queries

/// A state with one of each primitive, some with TTL, written for a few keys and namespaces.
struct Queryable {
    state: KeyedState,
    value: ValueState<u64>,
    list: ListState<String>,
    map: MapState<i32, u64>,
    sum: ReducingState<i64, fn(&i64, &i64) -> i64>,
    renewed: ValueState<u64>,
    once: MapState<u64, u64>,
}

fn queryable() -> Queryable {
    let mut state = heap_state();
    let value = state.value_state::<u64>("value", None).unwrap();
    let list = state.list_state::<String>("list", None).unwrap();
    let map = state.map_state::<i32, u64>("map", None).unwrap();
    let add: fn(&i64, &i64) -> i64 = |a, b| a + b;
    let sum = state.reducing_state("sum", add, None).unwrap();
    let renewed = state
        .value_state::<u64>("renewed", Some(ttl_10(TtlUpdate::OnReadAndWrite, TtlVisibility::NeverReturnExpired)))
        .unwrap();
    let once = state
        .map_state::<u64, u64>(
            "once",
            Some(ttl_10(TtlUpdate::OnReadAndWrite, TtlVisibility::ReturnExpiredIfNotCleanedUp)),
        )
        .unwrap();
    at(&mut state, 100);
    for key in 0..6_u64 {
        state.set_current_key_u64(key);
        for namespace in [&b""[..], b"w"] {
            state.set_namespace(namespace).unwrap();
            value.update(&mut state, &key).unwrap();
            list.add_all(&mut state, &[format!("{key}"), "x".to_string()]).unwrap();
            map.put(&mut state, &-(key as i32), &key).unwrap();
            map.put(&mut state, &(key as i32), &(key + 1)).unwrap();
            sum.add(&mut state, &(key as i64)).unwrap();
            renewed.update(&mut state, &key).unwrap();
            once.put(&mut state, &key, &key).unwrap();
        }
    }
    Queryable { state, value, list, map, sum, renewed, once }
}

/// What the typed API reads for every state of `key` in `namespace`, as a query encodes it.
fn typed_answers(q: &mut Queryable, key: u64, namespace: &[u8]) -> Vec<Queried> {
    let state = &mut q.state;
    state.set_current_key_u64(key);
    state.set_namespace(namespace).unwrap();
    let encode = |value: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        value(&mut out);
        out
    };
    let value = match q.value.get(state).unwrap() {
        None => Queried::Absent,
        Some(v) => Queried::Value(encode(&|out| v.encode(out))),
    };
    let list = match q.list.get(state).unwrap() {
        None => Queried::Absent,
        Some(values) => Queried::List(values.iter().map(|v| encode(&|out| v.encode(out))).collect()),
    };
    let map_entries = |entries: Vec<(Vec<u8>, Vec<u8>)>| {
        if entries.is_empty() {
            Queried::Absent
        } else {
            Queried::Map(entries)
        }
    };
    let map = map_entries(
        q.map
            .entries(state)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (encode(&|out| k.encode_key(out, true)), encode(&|out| v.encode(out))))
            .collect(),
    );
    let sum = match q.sum.get(state).unwrap() {
        None => Queried::Absent,
        Some(v) => Queried::Value(encode(&|out| v.encode(out))),
    };
    let renewed = match q.renewed.get(state).unwrap() {
        None => Queried::Absent,
        Some(v) => Queried::Value(encode(&|out| v.encode(out))),
    };
    let once = map_entries(
        q.once
            .entries(state)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (encode(&|out| k.encode_key(out, true)), encode(&|out| v.encode(out))))
            .collect(),
    );
    vec![value, list, map, sum, renewed, once]
}

const QUERYABLE_NAMES: [&str; 6] = ["value", "list", "map", "sum", "renewed", "once"];

fn query_answers(state: &mut KeyedState, key: u64, namespace: &[u8]) -> Vec<Queried> {
    QUERYABLE_NAMES.iter().map(|name| state.query(name, QueryKey::U64(key), namespace).unwrap()).collect()
}

// Goal: a live query answers what the typed API reads, changes nothing (no TTL renewal, no
// removal of expired entries) and leaves the current key and namespace as they were.
// Method: every key and namespace queried, the backend's entries compared before and after, then
// read through the typed API; at a time where TTL states have expired, too.
#[test]
fn query_agrees_with_typed_reads_and_changes_nothing() {
    let mut q = queryable();
    let keys = || (0..7_u64).flat_map(|key| [&b""[..], b"w", b"none"].map(|namespace| (key, namespace)));
    // At 105 everything is live (reads renew "renewed" and "once"); at 110 the renewed entries
    // live on; at 120 all expired, and "once" returns its entries once.
    for now in [105, 110, 120] {
        at(&mut q.state, now);
        q.state.set_current_key_u64(3);
        q.state.set_namespace(b"w").unwrap();
        let before = backend_entries(&mut q.state);
        let queried: Vec<Vec<Queried>> =
            keys().map(|(key, namespace)| query_answers(&mut q.state, key, namespace)).collect();
        assert_eq!(backend_entries(&mut q.state), before, "at {now}: queries changed the state");
        assert_eq!(q.value.get(&mut q.state).unwrap(), Some(3), "the current key and namespace are kept");
        let typed: Vec<Vec<Queried>> = keys().map(|(key, namespace)| typed_answers(&mut q, key, namespace)).collect();
        assert_eq!(queried, typed, "at {now}");
    }
    assert!(q.state.query("missing", QueryKey::U64(0), b"").is_err());

    // Queries do not renew: an entry queried halfway expires when it was due to.
    let mut q = queryable();
    at(&mut q.state, 105);
    assert_ne!(q.state.query("renewed", QueryKey::U64(1), b"").unwrap(), Queried::Absent);
    at(&mut q.state, 110);
    assert_eq!(q.state.query("renewed", QueryKey::U64(1), b"").unwrap(), Queried::Absent);
    q.state.set_current_key_u64(1);
    assert_eq!(q.renewed.get(&mut q.state).unwrap(), None);
}

// Goal: a query of a key whose group another subtask holds is an error, not a panic.
#[test]
fn query_of_a_key_held_elsewhere_is_an_error() {
    let range = max().range_of(0, 2);
    let mut state = KeyedState::new(Box::new(HeapBackend::new(range)), max());
    state.value_state::<u64>("value", None).unwrap();
    let outside = |key: &u64| !range.contains(max().key_group_of_u64(*key));
    let key = (0..).find(outside).unwrap();
    assert!(state.query("value", QueryKey::U64(key), b"").is_err());
    let key = (0..).find(|key: &i64| !range.contains(max().key_group_of_u64(*key as u64))).unwrap();
    assert!(state.query("value", QueryKey::I64(key), b"").is_err());
    let key = (0_u32..).map(|n| n.to_string()).find(|key| !range.contains(max().key_group_of_bytes(key.as_bytes())));
    assert!(state.query("value", QueryKey::Bytes(key.unwrap().as_bytes()), b"").is_err());
}

// Goal: a query of a completed checkpoint answers what the typed API read when it was taken, for
// keys of every subtask; expired entries a capture kept are hidden as NeverReturnExpired says.
// Method: a capture at two subtasks (the state split by key group), then query_snapshot of every
// key and namespace compared with the typed reads at capture time.
#[test]
fn query_snapshot_agrees_with_typed_reads_at_capture() {
    let mut q = queryable();
    at(&mut q.state, 105);
    let mut storage = MemStorage::new();
    let mut files = Vec::new();
    // Split into two subtasks through a capture, as a rescale does.
    let whole = capture_written(&mut q.state, &mut storage, 1);
    for index in 0..2 {
        let mut part = KeyedState::new(Box::new(HeapBackend::new(max().range_of(index, 2))), max());
        for descriptor in q.state.descriptors().to_vec() {
            part.declare(descriptor).unwrap();
        }
        part.restore_files(&mut storage, &whole).unwrap();
        let capture = part.capture(&target(2, &format!("op-{index}"))).unwrap();
        files.extend(capture.files);
        files.extend(capture.write.write(&mut storage).unwrap());
    }
    for now in [105_u64, 110] {
        at(&mut q.state, now);
        for key in 0..7_u64 {
            for namespace in [&b""[..], b"w"] {
                let from_snapshot: Vec<Queried> = QUERYABLE_NAMES
                    .iter()
                    .map(|name| {
                        query_snapshot(&mut storage, &files, max(), name, QueryKey::U64(key), namespace, as_of(now))
                            .unwrap()
                    })
                    .collect();
                let live = query_answers(&mut q.state, key, namespace);
                assert_eq!(from_snapshot, live, "key {key} namespace {namespace:?} at {now}");
            }
        }
    }
    let missing = query_snapshot(&mut storage, &files, max(), "nothing", QueryKey::U64(1), b"", as_of(0));
    assert!(missing.is_err());
}

// Goal: whatever bytes a backend hands back under a state's key (a damaged snapshot, another
// build's encoding), every typed access, query, capture and cleanup step either works or is a
// StateError::Value naming that state and key group: never a panic, never another error.
// Method: random byte strings (seeded, printed) written raw under each state's key (for maps also
// under random user keys), then every operation of the state's kind.
#[test]
fn random_bytes_under_state_keys_never_panic() {
    let seed = 77;
    println!("seed {seed}");
    let mut rng = Lcg::new(seed);
    let random_bytes = |rng: &mut Lcg| -> Vec<u8> {
        let length = [0, 1, 4, 7, 8, 9, 12, 13, 16, 17, 24][rng.below(11) as usize];
        (0..length).map(|_| [0_u8, 1, 4, 8, 0xff, rng.below(256) as u8][rng.below(6) as usize]).collect()
    };
    for round in 0..300 {
        let mut state = heap_state();
        let config = Some(ttl(
            10,
            TtlTime::ProcessingTime,
            TtlUpdate::OnReadAndWrite,
            TtlVisibility::ReturnExpiredIfNotCleanedUp,
            true,
            4,
        ));
        let ttl_if = |with: bool| if with { config } else { None };
        let with_ttl = round % 2 == 1;
        let value = state.value_state::<String>("value", ttl_if(with_ttl)).unwrap();
        let list = state.list_state::<String>("list", ttl_if(with_ttl)).unwrap();
        let map = state.map_state::<(String, u8), u64>("map", ttl_if(with_ttl)).unwrap();
        let sum = state.reducing_state("sum", |a: &u64, b: &u64| a.wrapping_add(*b), ttl_if(with_ttl)).unwrap();
        let mean = state.aggregating_state("mean", Mean, ttl_if(with_ttl)).unwrap();
        state.set_current_key_u64(round);
        let group = state.current_key_group();
        at(&mut state, 100 + rng.below(20));
        for id in 0..5_u16 {
            let mut key = id.to_be_bytes().to_vec();
            key.extend_from_slice(&8_u16.to_be_bytes());
            key.extend_from_slice(&round.to_be_bytes());
            key.extend_from_slice(&0_u16.to_be_bytes());
            if id == 2 {
                for _ in 0..3 {
                    let mut entry = key.clone();
                    entry.extend(random_bytes(&mut rng));
                    let bytes = random_bytes(&mut rng);
                    state.backend_mut().put(group, &entry, &bytes).unwrap();
                }
            } else {
                let bytes = random_bytes(&mut rng);
                state.backend_mut().put(group, &key, &bytes).unwrap();
            }
        }
        at(&mut state, 100 + rng.below(20));
        let names = ["value", "list", "map", "sum", "mean"];
        let check = |result: Result<(), StateError>, name: &str, what: &str| {
            if let Err(error) = result {
                assert!(is_value_error(&error, name, group), "round {round}: {what}: {error:?}");
            }
        };
        check(value.get(&mut state).map(drop), "value", "get");
        check(list.get(&mut state).map(drop), "list", "get");
        check(list.add(&mut state, &"x".to_string()), "list", "add");
        check(list.get(&mut state).map(drop), "list", "get after add");
        check(map.entries(&mut state).map(drop), "map", "entries");
        check(map.is_empty(&mut state).map(drop), "map", "is_empty");
        check(map.get(&mut state, &("a".to_string(), 1)).map(drop), "map", "get");
        check(map.contains(&mut state, &("".to_string(), 0)).map(drop), "map", "contains");
        check(sum.get(&mut state).map(drop), "sum", "get");
        check(sum.add(&mut state, &1), "sum", "add");
        check(mean.get(&mut state).map(drop), "mean", "get");
        check(mean.add(&mut state, &1), "mean", "add");
        for name in names {
            check(state.query(name, QueryKey::U64(round), b"").map(drop), name, "query");
        }
        if let Err(error) = state.cleanup_step() {
            assert!(names.iter().any(|name| is_value_error(&error, name, group)), "round {round}: cleanup: {error:?}");
        }
        if let Err(error) = state.capture(&target(1, "op")).map(drop) {
            assert!(names.iter().any(|name| is_value_error(&error, name, group)), "round {round}: capture: {error:?}");
        }
        check(map.clear(&mut state), "map", "clear");
        check(sum.merge_namespaces(&mut state, b"t", &[b""]), "sum", "merge");
        check(mean.merge_namespaces(&mut state, b"t", &[b""]), "mean", "merge");
    }
}

// Goal: a damaged `.state` file is refused with an error naming it as corrupt; never a panic.
// Method: the reference capture with one byte of its state file flipped, at every position.
#[test]
fn restore_refuses_a_damaged_state_file() {
    let (mut storage, files) = reference_capture();
    let state_file = files.iter().find(|file| file.ends_with(PORTABLE_EXTENSION)).unwrap().clone();
    let good = storage.read(&state_file).unwrap();
    for at in 0..good.len() {
        let mut bytes = good.clone();
        bytes[at] ^= 0x20;
        storage.write(&state_file, &bytes).unwrap();
        let mut state = heap_state();
        declare_reference(&mut state);
        let error = state.restore_files(&mut storage, &files).unwrap_err();
        assert!(matches!(error, StateError::Corrupt { .. }), "byte {at}: {error:?}");
    }
}
