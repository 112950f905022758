//! What operators pay for keyed state, through the typed layer (`KeyedState`), on both backends.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"), shared with other builds.
//! Run: `cargo bench --bench state` (1, 10 and 100 MB of state for the snapshots), with
//! `SABOT_BENCH_LARGE=1` also 1 GB (minutes more, and a few GB of memory and of disk);
//! `cargo bench --bench state -- --test` runs every case once on small state (CI).
//! - `value/<backend>/{get,update}`: a `ValueState<u64>` of 100,000 keys (`SABOT_BENCH_KEYS`
//!   sets another count), read or written key after key (the current key set each time, as an
//!   operator does per record):
//!   - `heap`: the heap backend;
//!   - `rocksdb`: RocksDB with the default write-back cache, which holds every key (the hot
//!     path: no RocksDB call at all);
//!   - `rocksdb_blocks`: RocksDB with a write-back cache of 4,096 entries, so that every read
//!     misses it and reads RocksDB, whose SST blocks are all in the block cache, and updates
//!     are written out to RocksDB in a batch whenever the cache is full (the batch's cost
//!     included).
//!   - after each RocksDB case the bench prints per-operation percentiles (p50, p90, p99),
//!     measured one operation at a time (outside criterion).
//! - `map_iteration/<backend>`: `MapState<u64, u64>::for_each` over one key's 1,000 entries
//!   (100 keys have such maps; throughput in entries): `rocksdb_cached` has them all in the
//!   write-back cache (written, not yet written out), `rocksdb_captured` in a cache a capture
//!   froze (an overlay until the next write-out), `rocksdb_stored` in RocksDB's SST files
//!   (written out through a cache of 1,024 entries).
//! - `snapshot/<kind>/<size>`: a typed capture and its write into local-disk storage in a
//!   temporary directory, against state size (entries of 114 bytes: a `u64` key, a 100-byte
//!   value): `heap` (the portable format, all of it every time), `rocksdb_full` (a native
//!   checkpoint of a database opened anew, so every SST file is uploaded) and
//!   `rocksdb_incremental` (a native checkpoint after 1,000 changes, uploading only new files).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use sabot::fs_storage::LocalFsStorage;
use sabot::rocks::{RocksDbBackend, RocksDbConfig};
use sabot_kernel::element::CheckpointId;
use sabot_kernel::key_group::{KeyGroupRange, MaxParallelism};
use sabot_kernel::state::keyed::{KeyedState, MapState, ValueState};
use sabot_kernel::state::{CaptureTarget, HeapBackend};

/// Keys of the value-state benchmarks (`SABOT_BENCH_KEYS` chooses another count).
const VALUE_KEYS: u64 = 100_000;

fn value_keys() -> u64 {
    std::env::var("SABOT_BENCH_KEYS").ok().and_then(|keys| keys.parse().ok()).unwrap_or(VALUE_KEYS)
}
/// Entries of the map of the map-iteration benchmarks.
const MAP_ENTRIES: u64 = 1_000;
/// Bytes of one entry of the snapshot benchmarks: a 14-byte state key, a 100-byte value.
const SNAPSHOT_ENTRY_SIZE: u64 = 114;
/// Entries that change between two incremental checkpoints.
const CHANGED_PER_CHECKPOINT: u64 = 1_000;

/// `cargo bench -- --test` runs each case once: small state, so that CI is quick.
fn test_mode() -> bool {
    std::env::args().any(|arg| arg == "--test")
}

fn scale(full: u64, test: u64) -> u64 {
    if test_mode() {
        test
    } else {
        full
    }
}

fn max_parallelism() -> MaxParallelism {
    MaxParallelism::default()
}

fn heap_state() -> KeyedState {
    KeyedState::new(Box::new(HeapBackend::new(KeyGroupRange::all(max_parallelism()))), max_parallelism())
}

fn rocks_state(path: &Path, cache_entries_max: usize) -> KeyedState {
    let config = RocksDbConfig { cache_entries_max, ..RocksDbConfig::default() };
    let backend = RocksDbBackend::open_with(path, KeyGroupRange::all(max_parallelism()), config).unwrap();
    KeyedState::new(Box::new(backend), max_parallelism())
}

struct Checkpoints {
    next: u64,
}

impl Checkpoints {
    fn target(&mut self) -> CaptureTarget {
        self.next += 1;
        CaptureTarget {
            checkpoint: CheckpointId(self.next),
            path: format!("checkpoints/chk-{}/state", self.next),
            shared_dir: "checkpoints/shared/state".to_string(),
        }
    }
}

/// Moves what RocksDB holds from its memtables into SST files: the RocksDB checkpoint of a
/// capture (dropped unwritten) flushes them.
fn flush_memtables(state: &mut KeyedState, checkpoints: &mut Checkpoints) {
    drop(state.capture(&checkpoints.target()).unwrap());
}

/// Writes every entry of a RocksDB-backed state, the write-back cache's too, into RocksDB's SST
/// files (a restore writes them out), so that a database opened anew holds all of them.
fn write_out_to_files(state: &mut KeyedState, checkpoints: &mut Checkpoints) {
    let snapshot = state.backend_mut().snapshot().unwrap();
    state.backend_mut().restore(&snapshot).unwrap();
    flush_memtables(state, checkpoints);
}

/// Per-operation percentiles of `op`, timed one operation at a time (outside criterion).
fn print_percentiles(name: &str, mut op: impl FnMut(u64)) {
    if test_mode() {
        return;
    }
    let mut nanos: Vec<u64> = (0..value_keys().max(100_000))
        .map(|i| {
            let start = Instant::now();
            op(i);
            start.elapsed().as_nanos() as u64
        })
        .collect();
    nanos.sort_unstable();
    let at = |p: f64| nanos[((nanos.len() - 1) as f64 * p) as usize];
    println!("{name}: per operation p50 {} ns, p90 {} ns, p99 {} ns", at(0.5), at(0.9), at(0.99));
}

/// How a value benchmark treats its state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ValueCase {
    Heap,
    /// RocksDB, everything in the write-back cache.
    RocksDbCached,
    /// RocksDB, the entries in SST files (its memtables flushed after loading).
    RocksDbFiles,
}

/// `get` and `update` of a `ValueState<u64>` of `keys` keys on `state`.
fn bench_value(c: &mut Criterion, name: &str, mut state: KeyedState, case: ValueCase) {
    let rocks = case != ValueCase::Heap;
    let keys = scale(value_keys(), 1_000);
    let count: ValueState<u64> = state.value_state("count", None).unwrap();
    for key in 0..keys {
        state.set_current_key_u64(key);
        count.update(&mut state, &key).unwrap();
    }
    if case == ValueCase::RocksDbFiles {
        flush_memtables(&mut state, &mut Checkpoints { next: 0 });
    }
    let mut group = c.benchmark_group(format!("value/{name}"));
    let mut key = 0;
    group.bench_function("get", |b| {
        b.iter(|| {
            key = if key + 1 == keys { 0 } else { key + 1 };
            state.set_current_key_u64(key);
            black_box(count.get(&mut state).unwrap())
        })
    });
    if rocks {
        print_percentiles(&format!("value/{name}/get"), |i| {
            state.set_current_key_u64(i % keys);
            black_box(count.get(&mut state).unwrap());
        });
    }
    group.bench_function("update", |b| {
        b.iter(|| {
            key = if key + 1 == keys { 0 } else { key + 1 };
            state.set_current_key_u64(key);
            count.update(&mut state, &black_box(key)).unwrap()
        })
    });
    if rocks {
        print_percentiles(&format!("value/{name}/update"), |i| {
            state.set_current_key_u64(i % keys);
            count.update(&mut state, &i).unwrap();
        });
    }
    group.finish();
}

/// Iteration of one key's map of `MAP_ENTRIES` entries.
fn bench_map(c: &mut Criterion, name: &str, mut state: KeyedState, flush: bool) {
    let entries = scale(MAP_ENTRIES, 100);
    let map: MapState<u64, u64> = state.map_state("map", None).unwrap();
    // Other keys' maps around it, as in a real state.
    for key in 0..100 {
        state.set_current_key_u64(key);
        for entry in 0..entries {
            map.put(&mut state, &entry, &(entry * key)).unwrap();
        }
    }
    if flush {
        flush_memtables(&mut state, &mut Checkpoints { next: 0 });
    }
    let mut group = c.benchmark_group("map_iteration");
    group.throughput(Throughput::Elements(entries));
    state.set_current_key_u64(42);
    group.bench_function(name, |b| {
        b.iter(|| {
            let mut sum = 0_u64;
            map.for_each(&mut state, |key, value| {
                sum = sum.wrapping_add(key ^ value);
                Ok(true)
            })
            .unwrap();
            black_box(sum)
        })
    });
    group.finish();
}

fn sizes_mb() -> Vec<u64> {
    if test_mode() {
        return vec![1];
    }
    let mut sizes = vec![1, 10, 100];
    if std::env::var("SABOT_BENCH_LARGE").is_ok_and(|v| v == "1") {
        sizes.push(1024);
    }
    sizes
}

fn snapshot_value(key: u64, round: u64) -> Vec<u8> {
    // 96 bytes (100 encoded, with its length): a hash-like pattern, so nothing compresses it away.
    (0..96_u64).map(|i| (key.wrapping_mul(0x9e37_79b9).wrapping_add(i * 31 + round) >> 3) as u8).collect()
}

/// A typed state of `mb` MB of `ValueState<Vec<u8>>` entries.
fn fill(state: &mut KeyedState, mb: u64) -> (ValueState<Vec<u8>>, u64) {
    let values: ValueState<Vec<u8>> = state.value_state("values", None).unwrap();
    let entries = (mb << 20) / SNAPSHOT_ENTRY_SIZE;
    for key in 0..entries {
        state.set_current_key_u64(key);
        values.update(state, &snapshot_value(key, 0)).unwrap();
    }
    (values, entries)
}

fn fresh_dir(path: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&path);
    path
}

/// Captures `state` and writes the capture into `storage`; the time of both.
fn timed_snapshot(state: &mut KeyedState, target: &CaptureTarget, storage: &mut LocalFsStorage) -> Duration {
    let start = Instant::now();
    let capture = state.capture(target).unwrap();
    capture.write.write(storage).unwrap();
    start.elapsed()
}

fn bench_snapshot_heap(c: &mut Criterion, mb: u64, dir: &Path) {
    let mut state = heap_state();
    fill(&mut state, mb);
    let mut group = c.benchmark_group("snapshot/heap");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(mb << 20));
    let mut checkpoints = Checkpoints { next: 0 };
    group.bench_function(BenchmarkId::from_parameter(format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut storage = LocalFsStorage::open(fresh_dir(dir.join("heap-storage"))).unwrap();
                total += timed_snapshot(&mut state, &checkpoints.target(), &mut storage);
            }
            total
        })
    });
    group.finish();
}

fn bench_snapshot_rocks(c: &mut Criterion, mb: u64, dir: &Path) {
    let db = dir.join("db");
    let mut checkpoints = Checkpoints { next: 0 };
    let mut state = rocks_state(&fresh_dir(db.clone()), rocksdb_cache());
    let (values, entries) = fill(&mut state, mb);
    // Everything in RocksDB, so that a database opened anew holds all of it.
    write_out_to_files(&mut state, &mut checkpoints);
    let mut group = c.benchmark_group("snapshot/rocksdb_full");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(mb << 20));
    group.bench_function(BenchmarkId::from_parameter(format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                // A newly opened database shares nothing yet: its first checkpoint uploads all.
                drop(std::mem::replace(&mut state, heap_state()));
                state = rocks_state(&db, rocksdb_cache());
                state.value_state::<Vec<u8>>("values", None).unwrap();
                let mut storage = LocalFsStorage::open(fresh_dir(dir.join("full-storage"))).unwrap();
                total += timed_snapshot(&mut state, &checkpoints.target(), &mut storage);
            }
            total
        })
    });
    group.finish();
    let mut group = c.benchmark_group("snapshot/rocksdb_incremental");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(mb << 20));
    let mut storage = LocalFsStorage::open(fresh_dir(dir.join("incremental-storage"))).unwrap();
    let mut round = 0;
    group.bench_function(BenchmarkId::from_parameter(format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                let stride = (entries / CHANGED_PER_CHECKPOINT).max(1);
                for n in 0..CHANGED_PER_CHECKPOINT.min(entries) {
                    state.set_current_key_u64((n * stride + round) % entries);
                    values.update(&mut state, &snapshot_value(n, round)).unwrap();
                }
                let target = checkpoints.target();
                total += timed_snapshot(&mut state, &target, &mut storage);
                state.checkpoint_complete(target.checkpoint);
            }
            total
        })
    });
    group.finish();
}

/// The write-back cache of the snapshot benchmarks: the default (small in test mode).
fn rocksdb_cache() -> usize {
    scale(sabot::rocks::CACHE_ENTRIES_MAX as u64, 1_024) as usize
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    bench_value(c, "heap", heap_state(), ValueCase::Heap);
    let cached = rocks_state(&dir.path().join("value"), sabot::rocks::CACHE_ENTRIES_MAX);
    bench_value(c, "rocksdb", cached, ValueCase::RocksDbCached);
    bench_value(c, "rocksdb_blocks", rocks_state(&dir.path().join("value-blocks"), 4_096), ValueCase::RocksDbFiles);
    bench_map(c, "heap", heap_state(), false);
    bench_map(c, "rocksdb_cached", rocks_state(&dir.path().join("map"), sabot::rocks::CACHE_ENTRIES_MAX), false);
    // The same after a capture: the cache is a frozen overlay now.
    let captured = rocks_state(&dir.path().join("map-captured"), sabot::rocks::CACHE_ENTRIES_MAX);
    bench_map(c, "rocksdb_captured", captured, true);
    // A write-back cache of 1,024 entries: the maps reach RocksDB as they are written.
    bench_map(c, "rocksdb_stored", rocks_state(&dir.path().join("map-stored"), 1_024), true);
    for mb in sizes_mb() {
        let dir = tempfile::tempdir().unwrap();
        bench_snapshot_heap(c, mb, dir.path());
        let dir = tempfile::tempdir().unwrap();
        bench_snapshot_rocks(c, mb, dir.path());
    }
}

criterion_group!(state_benches, benches);
criterion_main!(state_benches);
