//! Checkpoint duration and recovery time against state size, for both state backends.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench checkpoint` (10 MB and 100 MB of state), or choose the sizes:
//! `SABOT_BENCH_STATE_MB=10,100,1000,4000 cargo bench --bench checkpoint` (the heap backend runs
//! up to 1000 MB; RocksDB at every size). A backend holds that many bytes of window-like entries
//! (an 18-byte key, a 16-byte value), then, before each checkpoint, 1,000 entries change:
//! - `capture`: the synchronous part a task pays at a barrier (heap: freezing its tables;
//!   RocksDB: writing its cache out and taking a RocksDB checkpoint of hard links);
//! - `write_incremental`: the asynchronous part after those changes (heap: encoding and writing
//!   the whole state; RocksDB: uploading only the new SST files);
//! - `write_full`: the asynchronous part into empty storage (RocksDB's first checkpoint);
//! - `restore`: a fresh backend restoring the checkpoint from storage, as a restarted task does;
//! - `restore_half`: a backend of half the key groups restoring from it (rescaling to 2).

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sabot::fs_storage::LocalFsStorage;
use sabot::rocks::RocksDbBackend;
use sabot_kernel::element::CheckpointId;
use sabot_kernel::key_group::{KeyGroupRange, MaxParallelism};
use sabot_kernel::state::{CaptureTarget, HeapBackend, StateBackend, StateKey};

/// Bytes of key and value per entry.
const ENTRY_SIZE: u64 = 18 + 16;
const SIZES_MB_DEFAULT: [u64; 2] = [10, 100];
/// The largest state the heap backend is measured with (its per-entry overhead is large).
const HEAP_SIZE_MB_MAX: u64 = 1000;
/// Entries that change between two checkpoints.
const CHANGED_PER_CHECKPOINT: u64 = 1_000;

fn sizes_mb() -> Vec<u64> {
    match std::env::var("SABOT_BENCH_STATE_MB") {
        Ok(list) => list.split(',').map(|s| s.trim().parse().expect("SABOT_BENCH_STATE_MB: sizes in MB")).collect(),
        Err(_) => SIZES_MB_DEFAULT.to_vec(),
    }
}

fn put_entries(backend: &mut dyn StateBackend, range: std::ops::Range<u64>, salt: u64) {
    let max = MaxParallelism::default();
    let mut key = StateKey::new();
    for i in range {
        key.set_u64(i).push_namespace_i64((i % 7) as i64 * 10_000);
        backend.put(max.key_group_of_u64(i), key.as_bytes(), &(i ^ salt).to_le_bytes().repeat(2)).unwrap();
    }
}

/// Changes `CHANGED_PER_CHECKPOINT` entries spread over the state (the `round`-th change).
fn change(backend: &mut dyn StateBackend, entries: u64, round: u64) {
    let stride = (entries / CHANGED_PER_CHECKPOINT).max(1);
    let max = MaxParallelism::default();
    let mut key = StateKey::new();
    for n in 0..CHANGED_PER_CHECKPOINT.min(entries) {
        let i = (n * stride + round) % entries;
        key.set_u64(i).push_namespace_i64((i % 7) as i64 * 10_000);
        backend.put(max.key_group_of_u64(i), key.as_bytes(), &round.to_le_bytes().repeat(2)).unwrap();
    }
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

fn fresh_dir(path: &Path) -> &Path {
    let _ = std::fs::remove_dir_all(path);
    path
}

/// Measures one backend at one size; `open` makes a backend of a range at a path; a `durable`
/// one reopens with the entries it held.
fn bench_backend(
    c: &mut Criterion,
    name: &str,
    durable: bool,
    mb: u64,
    dir: &Path,
    open: &dyn Fn(&Path, KeyGroupRange) -> Box<dyn StateBackend>,
) {
    let all = KeyGroupRange::all(MaxParallelism::default());
    let entries = (mb << 20) / ENTRY_SIZE;
    let mut group = c.benchmark_group(format!("checkpoint_{name}"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(mb << 20));
    let mut backend = open(&dir.join("db"), all);
    put_entries(backend.as_mut(), 0..entries, 0);
    let mut checkpoints = Checkpoints { next: 0 };
    let mut round = 0;
    let mut storage = LocalFsStorage::open(dir.join("storage")).unwrap();

    group.bench_function(BenchmarkId::new("capture", format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                change(backend.as_mut(), entries, round);
                let target = checkpoints.target();
                let start = Instant::now();
                let capture = backend.capture(&target).unwrap();
                total += start.elapsed();
                drop(capture);
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("write_full", format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for i in 0..iterations {
                let mut empty = LocalFsStorage::open(fresh_dir(&dir.join(format!("full-{i}")))).unwrap();
                if durable {
                    // A newly opened database shares nothing yet: its first checkpoint uploads all.
                    drop(std::mem::replace(&mut backend, open(&dir.join("spare"), all)));
                    backend = open(&dir.join("db"), all);
                }
                let capture = backend.capture(&checkpoints.target()).unwrap();
                let start = Instant::now();
                capture.write.write(&mut empty).unwrap();
                total += start.elapsed();
                let _ = std::fs::remove_dir_all(dir.join(format!("full-{i}")));
            }
            total
        })
    });
    if durable {
        // The uploads above went to other storage: forget them (a backend has one storage).
        drop(std::mem::replace(&mut backend, open(&dir.join("spare"), all)));
        backend = open(&dir.join("db"), all);
    }
    let mut files = Vec::new();
    group.bench_function(BenchmarkId::new("write_incremental", format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                round += 1;
                change(backend.as_mut(), entries, round);
                let target = checkpoints.target();
                let capture = backend.capture(&target).unwrap();
                files = capture.files;
                let start = Instant::now();
                files.extend(capture.write.write(&mut storage).unwrap());
                total += start.elapsed();
                backend.checkpoint_complete(target.checkpoint);
            }
            total
        })
    });
    let restored = dir.join("restored");
    group.bench_function(BenchmarkId::new("restore", format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut fresh = open(fresh_dir(&restored), all);
                let start = Instant::now();
                fresh.restore_files(&mut storage, &files).unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    let half = MaxParallelism::default().range_of(0, 2);
    group.bench_function(BenchmarkId::new("restore_half", format!("{mb}MB")), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut fresh = open(fresh_dir(&restored), half);
                let start = Instant::now();
                fresh.restore_files(&mut storage, &files).unwrap();
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    for mb in sizes_mb() {
        let dir = tempfile::tempdir().unwrap();
        if mb <= HEAP_SIZE_MB_MAX {
            bench_backend(c, "heap", false, mb, dir.path(), &|_, range| Box::new(HeapBackend::new(range)));
        }
        let dir = tempfile::tempdir().unwrap();
        bench_backend(c, "rocksdb", true, mb, dir.path(), &|path, range| {
            Box::new(RocksDbBackend::open(path, range).unwrap())
        });
    }
}

criterion_group!(checkpoint_benches, benches);
criterion_main!(checkpoint_benches);
