//! The RocksDB backend held to the heap backend and to a `BTreeMap` model: same reads, same
//! snapshots byte for byte, restores across backends and across parallelisms (rescaling).

use proptest::prelude::*;
use sabot::rocks::RocksDbBackend;
use sabot_kernel::element::CheckpointId;
use sabot_kernel::env::{MemStorage, Storage, StorageError};
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use sabot_kernel::state::keyed::{KeyedState, ListState, MapState, ReducingState, TtlConfig, ValueState};
use sabot_kernel::state::testing::keyed::{check_keyed_ops_against_model, check_keyed_state_against_model};
use sabot_kernel::state::testing::timers::{check_timer_ops_against_model, check_timers_against_model};
use sabot_kernel::state::testing::{check_backend_against_model, Lcg};
use sabot_kernel::state::{CaptureTarget, HeapBackend, KeyGroupsSnapshot, StateBackend, StateId};
use sabot_kernel::time::Instant;

fn rocks(dir: &tempfile::TempDir, name: &str, range: KeyGroupRange, cache: usize) -> RocksDbBackend {
    RocksDbBackend::open_with_cache(dir.path().join(name), range, cache).expect("open rocksdb")
}

// Goal: RocksDB behaves as an ordered map per key group, through its write-back cache.
// Method: random operations (seeded, printed) against the BTreeMap model, with caches so small
// that they fill and are written out all the time, and with the default cache.
#[test]
fn rocksdb_backend_matches_model() {
    for (seed, cache) in [(1_u64, 2_usize), (2, 3), (3, 16), (4, 1 << 18)] {
        println!("seed {seed}, cache {cache} (replay: this test)");
        let dir = tempfile::tempdir().unwrap();
        let range = KeyGroupRange::new(3, 11);
        let mut fresh_count = 0;
        check_backend_against_model(&mut rocks(&dir, "main", range, cache), &mut Lcg::new(seed), 3_000, || {
            fresh_count += 1;
            Box::new(rocks(&dir, &format!("fresh-{fresh_count}"), range, cache))
        });
    }
}

/// Applies the same seeded operations to every backend given.
fn apply_random_ops(backends: &mut [&mut dyn StateBackend], seed: u64, op_count: usize) {
    let mut rng = Lcg::new(seed);
    let range = backends[0].key_groups();
    let mut value = Vec::new();
    for step in 0..op_count {
        let group = KeyGroup(range.start() + rng.below(range.count() as u64) as u16);
        let key: Vec<u8> = (0..rng.below(20)).map(|_| rng.below(4) as u8).collect();
        let op = rng.below(4);
        for backend in backends.iter_mut() {
            match op {
                0 | 1 => backend.put(group, &key, &step.to_le_bytes()).unwrap(),
                2 => backend.delete(group, &key).unwrap(),
                _ => {
                    backend.take(group, &key, &mut value).unwrap();
                }
            }
        }
    }
}

// Goal: the two backends are interchangeable: after the same operations their snapshots are the
// same bytes. Method: seeded random operations on both, snapshots compared.
#[test]
fn heap_and_rocksdb_snapshots_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let range = KeyGroupRange::all(MaxParallelism::default());
    for seed in 0..4 {
        println!("seed {seed}");
        let mut heap = HeapBackend::new(range);
        let mut rocksdb = rocks(&dir, &format!("db-{seed}"), range, 64);
        apply_random_ops(&mut [&mut heap, &mut rocksdb], seed, 5_000);
        let (a, b) = (heap.snapshot().unwrap(), rocksdb.snapshot().unwrap());
        assert!(a.entries().count() > 100, "the test writes something");
        assert_eq!(a, b, "seed {seed}");
    }
}

fn entries(snapshot: &KeyGroupsSnapshot) -> Vec<(u16, Vec<u8>, Vec<u8>)> {
    snapshot.entries().map(|(g, k, v)| (g.0, k.to_vec(), v.to_vec())).collect()
}

// Goal: state written at parallelism p restores at parallelism q, for p < q and p > q, across
// backends: every entry lands in exactly the subtask that owns its key group.
// Method: a heap snapshot of all key groups, restored into q RocksDB backends by their ranges,
// their snapshots merged back; then into p' heap backends again; all compared with the original.
#[test]
fn snapshots_rescale_across_backends() {
    let dir = tempfile::tempdir().unwrap();
    let max = MaxParallelism::default();
    let mut source = HeapBackend::new(KeyGroupRange::all(max));
    println!("seed 7");
    apply_random_ops(&mut [&mut source], 7, 4_000);
    let original = source.snapshot().unwrap();
    let mut through = original.clone();
    for (step, parallelism) in [3_u16, 5, 2, 1].into_iter().enumerate() {
        let mut parts = Vec::new();
        for index in 0..parallelism {
            let range = max.range_of(index, parallelism);
            let mut backend: Box<dyn StateBackend> = if step % 2 == 0 {
                Box::new(rocks(&dir, &format!("rescale-{step}-{index}"), range, 32))
            } else {
                Box::new(HeapBackend::new(range))
            };
            backend.restore(&through).unwrap();
            let part = backend.snapshot().unwrap();
            assert!(part.entries().all(|(group, _, _)| range.contains(group)), "p {parallelism} i {index}");
            parts.extend(entries(&part));
        }
        parts.sort();
        assert_eq!(parts, entries(&original), "after restoring at parallelism {parallelism}");
        let mut writer = sabot_kernel::state::snapshot::SnapshotWriter::new();
        for (group, key, value) in &parts {
            writer.add(KeyGroup(*group), key, value);
        }
        through = writer.finish();
    }
}

// Goal: restore replaces what a backend held, including entries the new snapshot does not have.
#[test]
fn restore_replaces_previous_state() {
    let dir = tempfile::tempdir().unwrap();
    let range = KeyGroupRange::new(0, 4);
    let mut backend = rocks(&dir, "replace", range, 8);
    backend.put(KeyGroup(1), b"old", b"1").unwrap();
    let mut other = HeapBackend::new(range);
    other.put(KeyGroup(2), b"new", b"2").unwrap();
    backend.restore(&other.snapshot().unwrap()).unwrap();
    let mut value = Vec::new();
    assert!(!backend.get(KeyGroup(1), b"old", &mut value).unwrap());
    assert!(backend.get(KeyGroup(2), b"new", &mut value).unwrap());
    assert_eq!(value, b"2");
}

/// Storage that counts the bytes written through it.
struct CountingStorage {
    inner: MemStorage,
    written: usize,
}

impl Storage for CountingStorage {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        self.written += data.len();
        self.inner.write(path, data)
    }
    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        self.inner.sync_file(path)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        self.inner.sync_dir(dir)
    }
    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        self.inner.read(path)
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(dir)
    }
    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        self.inner.delete(path)
    }
}

fn target(checkpoint: u64) -> CaptureTarget {
    CaptureTarget {
        checkpoint: CheckpointId(checkpoint),
        path: format!("checkpoints/chk-{checkpoint}/state"),
        shared_dir: "checkpoints/shared/state".to_string(),
    }
}

// Goal: RocksDB checkpoints are incremental: after a small change, a second checkpoint refers to
// the first one's SST files and writes only what is new (the change, held in the write-back
// cache, travels as the checkpoint's delta); it restores exactly, at the same
// parallelism (the files become the database) and at another (each subtask copies its key groups
// out); a damaged shared file is refused, and the heap backend refuses the native format.
// Method: the same seeded operations on RocksDB and on the heap backend (the reference).
#[test]
fn rocksdb_checkpoints_share_sst_files_and_rescale() {
    println!("seeds 11 and 12");
    let dir = tempfile::tempdir().unwrap();
    let max = MaxParallelism::default();
    let range = KeyGroupRange::all(max);
    let mut heap = HeapBackend::new(range);
    let mut db = rocks(&dir, "incremental", range, 1024);
    apply_random_ops(&mut [&mut heap, &mut db], 11, 20_000);
    let mut storage = CountingStorage { inner: MemStorage::new(), written: 0 };
    let first = db.capture(&target(1)).unwrap();
    let mut first_files = first.files;
    first_files.extend(first.write.write(&mut storage).unwrap());
    let written_first = storage.written;
    db.checkpoint_complete(CheckpointId(1));

    apply_random_ops(&mut [&mut heap, &mut db], 12, 200);
    let second = db.capture(&target(2)).unwrap();
    // Changes after the capture are not in it.
    apply_random_ops(&mut [&mut db], 13, 200);
    let mut second_files = second.files;
    second_files.extend(second.write.write(&mut storage).unwrap());
    let written_second = storage.written - written_first;
    let shared = |files: &[String]| -> Vec<String> {
        files.iter().filter(|f| f.starts_with("checkpoints/shared/")).cloned().collect()
    };
    assert!(!shared(&first_files).is_empty());
    assert!(shared(&first_files).iter().all(|f| second_files.contains(f)), "{first_files:?} {second_files:?}");
    assert!(
        written_second * 4 < written_first,
        "second checkpoint wrote {written_second} bytes, first {written_first}"
    );

    let expected = entries(&heap.snapshot().unwrap());
    for parallelism in [1_u16, 3] {
        let mut restored = Vec::new();
        for index in 0..parallelism {
            let range = max.range_of(index, parallelism);
            let mut backend = rocks(&dir, &format!("restored-{parallelism}-{index}"), range, 64);
            backend.restore_files(&mut storage, &second_files).unwrap();
            restored.extend(entries(&backend.snapshot().unwrap()));
            // The restored database goes on, and checkpoints again.
            backend.capture(&target(3)).unwrap().write.write(&mut storage).unwrap();
        }
        restored.sort();
        assert_eq!(restored, expected, "restored at parallelism {parallelism}");
    }

    let mut heap_restored = HeapBackend::new(range);
    let refused = heap_restored.restore_files(&mut storage, &second_files).unwrap_err();
    assert!(refused.to_string().contains("only the backend that wrote it"), "{refused}");

    let damaged = &shared(&second_files)[0];
    let mut bytes = storage.read(damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    storage.write(damaged, &bytes).unwrap();
    let mut backend = rocks(&dir, "from-damaged", range, 64);
    let error = backend.restore_files(&mut storage, &second_files).unwrap_err();
    assert!(error.to_string().contains(damaged.as_str()), "{error}");
}

// Goal: a subtask's local RocksDB directory starts empty whatever a killed process left: a
// database that does not open (a log without CURRENT), local checkpoints and a restore in
// progress beside it. Nothing else in the parent directory is touched.
#[test]
fn open_empty_clears_what_a_killed_process_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("1-0");
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("000004.log"), b"half a database").unwrap();
    for leftover in ["1-0.chk-7", "1-0.restoring", "1-0.discarded"] {
        std::fs::create_dir_all(dir.path().join(leftover)).unwrap();
        std::fs::write(dir.path().join(leftover).join("000009.sst"), b"x").unwrap();
    }
    std::fs::create_dir_all(dir.path().join("1-1")).unwrap();
    let range = KeyGroupRange::new(0, 4);
    assert!(RocksDbBackend::open_with_cache(&path, range, 8).is_err(), "the damaged database does not open");
    let mut backend = RocksDbBackend::open_empty(&path, range, 8).unwrap();
    let mut value = Vec::new();
    assert!(!backend.get(KeyGroup(1), b"k", &mut value).unwrap());
    let mut names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["1-0", "1-1"]);
}

// ----- declared states (column families), appends and range scans

/// The states the declared-state tests declare: (id, name, ordered).
const DECLARED: [(u16, &str, bool); 4] =
    [(0, "count", false), (1, "index", true), (2, "events", false), (3, "ttl", true)];

fn declare_all(backend: &mut dyn StateBackend) {
    for (id, name, ordered) in DECLARED {
        backend.declare_state(StateId(id), name, ordered).unwrap();
    }
}

fn declared_rocks(dir: &tempfile::TempDir, name: &str, range: KeyGroupRange, cache: usize) -> RocksDbBackend {
    let mut backend = rocks(dir, name, range, cache);
    declare_all(&mut backend);
    backend
}

/// A key of a declared state: its id, then up to 5 bytes of a small alphabet (so that keys
/// collide, share prefixes, and reach the highest byte).
fn declared_key(rng: &mut Lcg) -> Vec<u8> {
    let mut key = StateId(DECLARED[rng.below(DECLARED.len() as u64) as usize].0).prefix().to_vec();
    key.extend((0..rng.below(6)).map(|_| [0_u8, 1, 2, 255][rng.below(4) as usize]));
    key
}

/// Everything a read returned, compared between backends.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Value(Option<Vec<u8>>),
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
    Done,
}

/// One random operation on keys of the declared states, applied to `backend`; `rng` must be
/// in the same state for every backend that is compared.
fn declared_op(backend: &mut dyn StateBackend, rng: &mut Lcg, step: usize) -> Read {
    let range = backend.key_groups();
    let group = KeyGroup(range.start() + rng.below(range.count() as u64) as u16);
    let key = declared_key(rng);
    let mut value = Vec::new();
    let visit_range = |backend: &mut dyn StateBackend, prefix: &[u8], from: &[u8], stop_after: u64| {
        let mut seen = Vec::new();
        backend
            .scan_range(group, prefix, from, &mut |key, value| {
                seen.push((key.to_vec(), value.to_vec()));
                Ok(seen.len() as u64 != stop_after)
            })
            .unwrap();
        Read::Entries(seen)
    };
    match rng.below(100) {
        0..=24 => {
            let new_value: Vec<u8> = (0..rng.below(30)).map(|i| (i + step as u64) as u8).collect();
            backend.put(group, &key, &new_value).unwrap();
            Read::Done
        }
        25..=34 => {
            backend.delete(group, &key).unwrap();
            Read::Done
        }
        35..=49 => Read::Value(backend.get(group, &key, &mut value).unwrap().then_some(value)),
        50..=54 => Read::Value(backend.take(group, &key, &mut value).unwrap().then_some(value)),
        55..=61 => {
            let mut seen = None;
            backend
                .merge(group, &key, &mut |old, new| {
                    seen = Some(old.map(<[u8]>::to_vec));
                    new.extend_from_slice(old.unwrap_or_default());
                    new.push(step as u8);
                    Ok(())
                })
                .unwrap();
            Read::Value(seen.expect("merge called back"))
        }
        62..=73 => {
            let bytes: Vec<u8> = (0..1 + rng.below(5)).map(|i| (i * 3 + step as u64) as u8).collect();
            backend.append(group, &key, &bytes).unwrap();
            Read::Done
        }
        74..=77 => {
            let mut seen = Vec::new();
            backend
                .scan(group, &mut |key, value| {
                    seen.push((key.to_vec(), value.to_vec()));
                    Ok(())
                })
                .unwrap();
            Read::Entries(seen)
        }
        _ => {
            // A prefix of any length (none, part of an id, an id, more), from below, at or
            // above it, and stopping early or not.
            let prefix = &key[..rng.below(key.len() as u64 + 1) as usize];
            let from = match rng.below(3) {
                0 => Vec::new(),
                1 => declared_key(rng),
                _ => [prefix, &[rng.below(3) as u8]].concat(),
            };
            let stop_after = rng.below(6);
            visit_range(backend, prefix, &from, stop_after)
        }
    }
}

/// Entries of several backends' snapshots, merged in order.
fn merged_entries(backends: &mut [Box<dyn StateBackend>]) -> Vec<(u16, Vec<u8>, Vec<u8>)> {
    let mut all: Vec<(u16, Vec<u8>, Vec<u8>)> =
        backends.iter_mut().flat_map(|backend| entries(&backend.snapshot().unwrap())).collect();
    all.sort();
    all
}

// Goal: with declared states (a column family each, some ordered), RocksDB answers every read,
// append and range scan as the heap backend does, through write-outs of a tiny or a default
// cache and the frozen overlays of captures not yet written; its native checkpoints restore
// exactly at the same parallelism (the files become the database, its column families
// included), at another (every column family's key groups copied out), and into a backend that
// has not declared the states yet (which adopts them from the database).
// Method: the same seeded random operations on both (seed printed), every read compared;
// captures written a few operations later and restored, compared with the heap's snapshot
// at the capture.
#[test]
fn heap_and_rocksdb_agree_with_declared_states() {
    let max = MaxParallelism::new(8).unwrap();
    for (seed, cache) in [(21_u64, 2_usize), (22, 16), (23, 1 << 18)] {
        println!("seed {seed}, cache {cache} (replay: this test)");
        let dir = tempfile::tempdir().unwrap();
        let range = KeyGroupRange::all(max);
        let mut heap = HeapBackend::new(range);
        declare_all(&mut heap);
        let mut rocksdb = declared_rocks(&dir, "main", range, cache);
        let mut storage = MemStorage::new();
        let mut captures: Vec<(KeyGroupsSnapshot, sabot_kernel::state::StateCapture)> = Vec::new();
        let (mut rng, mut restored_count) = (Lcg::new(seed), 0);
        for step in 0..2_500 {
            if rng.below(100) == 0 {
                let capture = rocksdb.capture(&target(step as u64 + 1)).unwrap();
                captures.push((heap.snapshot().unwrap(), capture));
            }
            if captures.len() > 2 || (step == 2_499 && !captures.is_empty()) {
                let (expected, capture) = captures.remove(0);
                let mut files = capture.files;
                files.extend(capture.write.write(&mut storage).unwrap());
                restored_count += 1;
                let parallelism = [1_u16, 3, 2][restored_count % 3];
                let mut parts: Vec<Box<dyn StateBackend>> = (0..parallelism)
                    .map(|index| {
                        let name = format!("restored-{restored_count}-{index}");
                        let range = max.range_of(index, parallelism);
                        // Every other restore declares its states after the restore.
                        let declare_first = restored_count % 2 == 0;
                        let mut backend = rocks(&dir, &name, range, cache);
                        if declare_first {
                            declare_all(&mut backend);
                        }
                        backend.restore_files(&mut storage, &files).unwrap();
                        let names: Vec<String> = backend.states().into_iter().map(|(_, name)| name).collect();
                        assert_eq!(names, ["count", "index", "events", "ttl"], "step {step}");
                        declare_all(&mut backend);
                        Box::new(backend) as Box<dyn StateBackend>
                    })
                    .collect();
                assert_eq!(merged_entries(&mut parts), entries(&expected), "step {step}: p {parallelism}");
            }
            let mut heap_rng = rng.clone();
            let expected = declared_op(&mut heap, &mut heap_rng, step);
            let found = declared_op(&mut rocksdb, &mut rng, step);
            assert_eq!(found, expected, "step {step}");
        }
        assert!(restored_count >= 10, "{restored_count} restores");
        let (a, b) = (heap.snapshot().unwrap(), rocksdb.snapshot().unwrap());
        assert!(a.entries().count() > 100, "the test writes something");
        assert_eq!(a, b, "seed {seed}: snapshots");
    }
}

// Goal: a database's column families and their states survive closing and opening it again;
// declarations are checked against them: the same id with another name is refused, the same
// name reuses the column family. Reads from SST files fill the block cache. Declaring a state
// after entries were written without states is refused (they would be hidden in the default
// column family).
#[test]
fn declarations_are_checked_against_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let range = KeyGroupRange::new(0, 4);
    let mut backend = declared_rocks(&dir, "db", range, 2);
    for i in 0..10_u8 {
        backend.put(KeyGroup(1), &[0, 1, i], &[i]).unwrap();
    }
    let error = backend.declare_state(StateId(1), "other", false).unwrap_err();
    assert!(error.to_string().contains("\"index\""), "{error}");
    drop(backend);

    let mut reopened = rocks(&dir, "db", range, 2);
    let names: Vec<(u16, String)> = reopened.states().into_iter().map(|(id, name)| (id.0, name)).collect();
    assert_eq!(names, [(0, "count".into()), (1, "index".into()), (2, "events".into()), (3, "ttl".into())]);
    let error = reopened.declare_state(StateId(0), "sum", false).unwrap_err();
    assert!(error.to_string().contains("restored as \"count\""), "{error}");
    declare_all(&mut reopened);
    // Closing the database wrote its memtables into SST files: reads go through the block cache.
    let usage_before = reopened.block_cache_usage();
    let mut value = Vec::new();
    // The cache held at most two of them: the rest reached the state's column family.
    let found = (0..10_u8).filter(|&i| reopened.get(KeyGroup(1), &[0, 1, i], &mut value).unwrap()).count();
    assert!(found >= 8, "{found} of 10 entries survived the reopening");
    assert!(reopened.block_cache_usage() > usage_before, "reads fill the block cache");

    let mut raw = rocks(&dir, "raw", range, 8);
    raw.put(KeyGroup(0), b"anything", b"1").unwrap();
    let error = raw.declare_state(StateId(0), "count", false).unwrap_err();
    assert!(error.to_string().contains("declare states first"), "{error}");
}

// Goal: one subtask's database with several column families, checkpointed natively, restored at
// parallelisms 1, 2, 3 and 5 (then checkpointed again at 3 and restored at 2, which imports
// several databases per subtask), keeps every state: each restored subtask holds all four
// column families, and together they hold exactly the entries of every state.
// Method: seeded random operations (seed printed) on a heap reference and RocksDB.
#[test]
fn rocksdb_column_families_survive_rescaling() {
    println!("seed 31");
    let dir = tempfile::tempdir().unwrap();
    let max = MaxParallelism::new(16).unwrap();
    let mut heap = HeapBackend::new(KeyGroupRange::all(max));
    declare_all(&mut heap);
    let mut db = declared_rocks(&dir, "source", KeyGroupRange::all(max), 64);
    let mut rng = Lcg::new(31);
    for step in 0..3_000 {
        let mut heap_rng = rng.clone();
        declared_op(&mut heap, &mut heap_rng, step);
        declared_op(&mut db, &mut rng, step);
    }
    let expected = entries(&heap.snapshot().unwrap());
    let ids: std::collections::BTreeSet<u8> = expected.iter().map(|(_, key, _)| key[1]).collect();
    assert_eq!(ids.len(), DECLARED.len(), "every state holds entries");
    let mut storage = MemStorage::new();
    let capture = db.capture(&target(1)).unwrap();
    let mut files = capture.files;
    files.extend(capture.write.write(&mut storage).unwrap());

    let restore_at = |files: &[String], storage: &mut MemStorage, parallelism: u16, tag: &str| {
        let mut parts: Vec<RocksDbBackend> = Vec::new();
        for index in 0..parallelism {
            let mut backend =
                declared_rocks(&dir, &format!("{tag}-{parallelism}-{index}"), max.range_of(index, parallelism), 64);
            backend.restore_files(storage, files).unwrap();
            assert_eq!(backend.states().len(), DECLARED.len(), "{tag} p {parallelism} subtask {index}");
            parts.push(backend);
        }
        parts
    };
    for parallelism in [1_u16, 2, 3, 5] {
        let parts = restore_at(&files, &mut storage, parallelism, "first");
        let mut boxed: Vec<Box<dyn StateBackend>> = parts.into_iter().map(|b| Box::new(b) as _).collect();
        assert_eq!(merged_entries(&mut boxed), expected, "restored at parallelism {parallelism}");
    }
    let mut at_three = restore_at(&files, &mut storage, 3, "second");
    let mut files_at_three = Vec::new();
    for (index, backend) in at_three.iter_mut().enumerate() {
        let mut target = target(2);
        target.path = format!("{}-{index}", target.path);
        let capture = backend.capture(&target).unwrap();
        files_at_three.extend(capture.files);
        files_at_three.extend(capture.write.write(&mut storage).unwrap());
    }
    let parts = restore_at(&files_at_three, &mut storage, 2, "third");
    let mut boxed: Vec<Box<dyn StateBackend>> = parts.into_iter().map(|b| Box::new(b) as _).collect();
    assert_eq!(merged_entries(&mut boxed), expected, "restored from parallelism 3 at 2");
}

// ----- the typed layer (what operators use) over both backends

/// The states of the typed-layer test: one of each kind, and one with TTL (ordered, cleaned up
/// incrementally).
struct TypedStates {
    count: ValueState<u64>,
    events: ListState<u64>,
    index: MapState<u64, String>,
    sum: ReducingState<u64, fn(&u64, &u64) -> u64>,
    fresh: ValueState<u64>,
}

fn declare_typed(state: &mut KeyedState) -> TypedStates {
    let add: fn(&u64, &u64) -> u64 = |a, b| a.wrapping_add(*b);
    TypedStates {
        count: state.value_state("count", None).unwrap(),
        events: state.list_state("events", None).unwrap(),
        index: state.map_state("index", None).unwrap(),
        sum: state.reducing_state("sum", add, None).unwrap(),
        fresh: state.value_state("fresh", Some(TtlConfig::processing_time(300))).unwrap(),
    }
}

/// One random typed operation; what it read, as text.
fn typed_op(state: &mut KeyedState, states: &TypedStates, rng: &mut Lcg, step: u64) -> String {
    state.set_processing_time(Instant(step * 7));
    state.set_current_key_u64(rng.below(40));
    state.set_namespace_i64(rng.below(3) as i64);
    let value = rng.below(1_000);
    let read = match rng.below(20) {
        0 => format!("{:?}", states.count.update(state, &value)),
        1 => format!("{:?}", states.count.get(state)),
        2 => format!("{:?}", states.count.clear(state)),
        3 | 4 => format!("{:?}", states.events.add(state, &value)),
        5 => format!("{:?}", states.events.get(state)),
        6 => format!("{:?}", states.events.clear(state)),
        7 | 8 => format!("{:?}", states.index.put(state, &(value % 50), &format!("v{step}"))),
        9 => format!("{:?}", states.index.remove(state, &(value % 50))),
        10 => format!("{:?}", states.index.get(state, &(value % 50))),
        11 => format!("{:?}", states.index.entries(state)),
        12 => {
            let mut first = Vec::new();
            let result = states.index.for_each(state, |key, value| {
                first.push((key, value));
                Ok(first.len() < 3)
            });
            format!("{result:?} {first:?}")
        }
        13 => format!("{:?}", states.index.clear(state)),
        14 | 15 => format!("{:?}", states.sum.add(state, &value)),
        16 => format!("{:?}", states.sum.get(state)),
        17 => format!("{:?}", states.fresh.update(state, &value)),
        18 => format!("{:?}", states.fresh.get(state)),
        _ => format!("{:?}", state.cleanup_step()),
    };
    format!("{read} ({:?})", state.current_key_group())
}

// Goal: the typed state operators use (value, list, map, reducing, TTL) reads the same over
// RocksDB as over the heap, and a typed capture on RocksDB (native files and descriptors)
// restores into typed RocksDB state at another parallelism with every state intact.
// Method: the same seeded operations on both (seed printed), every read compared, the
// backends' snapshots compared at the end; captures restored at parallelism 3 and compared
// with the heap's snapshot at the capture.
#[test]
fn typed_state_over_rocksdb_matches_heap() {
    println!("seed 41");
    let dir = tempfile::tempdir().unwrap();
    let max = MaxParallelism::new(16).unwrap();
    let all = KeyGroupRange::all(max);
    let mut heap = KeyedState::new(Box::new(HeapBackend::new(all)), max);
    let mut rocksdb = KeyedState::new(Box::new(rocks(&dir, "typed", all, 256)), max);
    let (heap_states, rocksdb_states) = (declare_typed(&mut heap), declare_typed(&mut rocksdb));
    let mut storage = MemStorage::new();
    let mut rng = Lcg::new(41);
    for step in 0..6_000_u64 {
        if step % 1_500 == 1_499 {
            // A typed capture first removes expired TTL entries: the heap's too.
            drop(heap.capture(&target(step)).unwrap());
            let expected = entries(&heap.backend_mut().snapshot().unwrap());
            let capture = rocksdb.capture(&target(step)).unwrap();
            // The state goes on changing while the capture waits to be written.
            for later in 0..100 {
                typed_op(&mut rocksdb, &rocksdb_states, &mut Lcg::new(step + later), step + later);
            }
            let mut files = capture.files;
            files.extend(capture.write.write(&mut storage).unwrap());
            let mut restored = Vec::new();
            for index in 0..3 {
                let range = max.range_of(index, 3);
                let backend = rocks(&dir, &format!("typed-{step}-{index}"), range, 256);
                let mut state = KeyedState::new(Box::new(backend), max);
                declare_typed(&mut state);
                state.restore_files(&mut storage, &files).unwrap();
                restored.extend(entries(&state.backend_mut().snapshot().unwrap()));
            }
            restored.sort();
            assert_eq!(restored, expected, "step {step}: restored at parallelism 3");
            // Back to where the heap is: restore the capture into the state that went on.
            rocksdb.restore_files(&mut storage, &files).unwrap();
        }
        let mut heap_rng = rng.clone();
        let expected = typed_op(&mut heap, &heap_states, &mut heap_rng, step);
        let found = typed_op(&mut rocksdb, &rocksdb_states, &mut rng, step);
        assert_eq!(found, expected, "step {step}");
    }
    let (a, b) = (heap.backend_mut().snapshot().unwrap(), rocksdb.backend_mut().snapshot().unwrap());
    assert!(a.entries().count() > 100, "the test writes something");
    assert_eq!(a, b, "snapshots");
}

// Goal: typed keyed state over RocksDB agrees with the model: every primitive, TTL on both
// clocks, checkpoints (native, incremental) restored at the same and at other parallelisms,
// portable snapshots. Method: the kernel's keyed conformance suite (seeded, printed), with write-back
// caches so small that every few operations reach RocksDB, and with a large one.
#[test]
fn rocksdb_keyed_state_matches_model() {
    for (seed, cache) in [(100_u64, 2_usize), (101, 7), (102, 1 << 12)] {
        println!("cache of {cache} entries");
        let dir = tempfile::tempdir().unwrap();
        let mut opened = 0;
        let mut fresh = |range: KeyGroupRange| -> Box<dyn StateBackend> {
            opened += 1;
            Box::new(rocks(&dir, &format!("db-{opened}"), range, cache))
        };
        check_keyed_state_against_model(&mut fresh, seed, 800);
    }
}

// Goal: the backends' files restore into each other where the formats allow: portable captures
// and snapshots into either, RocksDB's native checkpoints into RocksDB only (the heap backend
// refuses them, saying so), also when one checkpoint holds both formats (subtasks of either kind).
// Method: the keyed conformance suite (seeded, printed) with fresh backends alternating between
// heap and RocksDB; a refused restore is retried with the next backend.
#[test]
fn mixed_backends_keyed_state_matches_model() {
    for seed in 200..203_u64 {
        let dir = tempfile::tempdir().unwrap();
        check_keyed_state_against_model(&mut fresh_backends(&dir, true), seed, 800);
    }
}

// Goal: timers over RocksDB fire exactly once each, in (time, key group, key, namespace) order
// and none before its time, through native checkpoints restored at the same and at other
// parallelisms and portable snapshots. Method: the kernel's timers conformance suite (seeded,
// printed) in lockstep with its model, with write-back caches so small that timers reach
// RocksDB (and their deletes its tombstones) all the time, and with a large one.
#[test]
fn rocksdb_timers_match_model() {
    for (seed, cache) in [(300_u64, 2_usize), (301, 7), (302, 1 << 12)] {
        println!("cache of {cache} entries");
        let dir = tempfile::tempdir().unwrap();
        let mut opened = 0;
        let mut fresh = |range: KeyGroupRange| -> Box<dyn StateBackend> {
            opened += 1;
            Box::new(rocks(&dir, &format!("db-{opened}"), range, cache))
        };
        check_timers_against_model(&mut fresh, seed, 800);
    }
}

// Goal: timers move between the backends where the formats allow (as keyed state does).
// Method: the timers conformance suite (seeded, printed) with fresh backends alternating
// between heap and RocksDB; a refused restore is retried with the next backend.
#[test]
fn mixed_backends_timers_match_model() {
    for seed in 400..403_u64 {
        let dir = tempfile::tempdir().unwrap();
        check_timers_against_model(&mut fresh_backends(&dir, true), seed, 800);
    }
}

/// Fresh backends for a keyed-state run: RocksDB in `dir`, or alternately heap and RocksDB.
fn fresh_backends(dir: &tempfile::TempDir, mixed: bool) -> impl FnMut(KeyGroupRange) -> Box<dyn StateBackend> + '_ {
    let mut opened = 0;
    move |range| -> Box<dyn StateBackend> {
        opened += 1;
        if mixed && opened % 2 == 0 {
            Box::new(HeapBackend::new(range))
        } else {
            Box::new(rocks(dir, &format!("db-{opened}"), range, 16))
        }
    }
}

/// Cases per proptest: `PROPTEST_CASES`, or 16 (every case opens several databases).
fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(16)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: proptest_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    // Goal: as the two tests above, for operation sequences proptest draws and shrinks.
    // Method: a setup seed, up to 200 operation words, RocksDB alone or mixed with the heap; a
    // failure prints the shrunk input (replay: check_keyed_ops_against_model with it).
    #[test]
    fn keyed_state_matches_model_on_generated_operations(
        seed in any::<u64>(),
        words in prop::collection::vec(any::<u64>(), 0..200),
        mixed in any::<bool>(),
    ) {
        println!("mixed backends: {mixed}");
        let dir = tempfile::tempdir().unwrap();
        check_keyed_ops_against_model(&mut fresh_backends(&dir, mixed), seed, &words);
    }

    // Goal: as the two timers tests above, for operation sequences proptest draws and shrinks.
    // Method: a setup seed, up to 200 operation words, RocksDB alone or mixed with the heap; a
    // failure prints the shrunk input (replay: check_timer_ops_against_model with it).
    #[test]
    fn timers_match_model_on_generated_operations(
        seed in any::<u64>(),
        words in prop::collection::vec(any::<u64>(), 0..200),
        mixed in any::<bool>(),
    ) {
        println!("mixed backends: {mixed}");
        let dir = tempfile::tempdir().unwrap();
        check_timer_ops_against_model(&mut fresh_backends(&dir, mixed), seed, &words);
    }
}
