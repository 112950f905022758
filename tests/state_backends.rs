//! The RocksDB backend held to the heap backend and to a `BTreeMap` model: same reads, same
//! snapshots byte for byte, restores across backends and across parallelisms (rescaling).

use proptest::prelude::*;
use sabot::rocks::RocksDbBackend;
use sabot_kernel::element::CheckpointId;
use sabot_kernel::env::{MemStorage, Storage, StorageError};
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use sabot_kernel::state::testing::keyed::{check_keyed_ops_against_model, check_keyed_state_against_model};
use sabot_kernel::state::testing::{check_backend_against_model, Lcg};
use sabot_kernel::state::{CaptureTarget, HeapBackend, KeyGroupsSnapshot, StateBackend};

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
}
