//! The RocksDB backend held to the heap backend and to a `BTreeMap` model: same reads, same
//! snapshots byte for byte, restores across backends and across parallelisms (rescaling).

use sabot::rocks::RocksDbBackend;
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange, MaxParallelism};
use sabot_kernel::state::testing::{check_backend_against_model, Lcg};
use sabot_kernel::state::{HeapBackend, KeyGroupsSnapshot, StateBackend};

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
