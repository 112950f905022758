//! Checkpoint duration and recovery time against state size, for both state backends.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"). Run:
//! `cargo bench --bench checkpoint`. For each size, a backend holds that many bytes of window-like
//! entries (an 18-byte key, a 16-byte value); "capture" is the portable snapshot alone (the
//! synchronous part a window pays at a barrier); "snapshot_and_fsync" adds writing it durably to
//! local disk (the asynchronous part, done by the driver); "restore" reads that file back into a
//! fresh backend, as a restarted task does.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use sabot::fs_storage::LocalFsStorage;
use sabot::rocks::RocksDbBackend;
use sabot_kernel::env::Storage;
use sabot_kernel::key_group::{KeyGroupRange, MaxParallelism};
use sabot_kernel::state::{HeapBackend, KeyGroupsSnapshot, StateBackend, StateKey};

/// Bytes of key and value per entry.
const ENTRY_SIZE: u64 = 18 + 16;
const SIZES_MB: [u64; 2] = [10, 100];

fn fill(backend: &mut dyn StateBackend, bytes: u64) {
    let max = MaxParallelism::default();
    let mut key = StateKey::new();
    for i in 0..bytes / ENTRY_SIZE {
        key.set_u64(i).push_namespace_i64((i % 7) as i64 * 10_000);
        backend.put(max.key_group_of_u64(i), key.as_bytes(), &i.to_le_bytes().repeat(2)).unwrap();
    }
}

fn checkpoint(backend: &mut dyn StateBackend, storage: &mut LocalFsStorage) -> usize {
    let snapshot = backend.snapshot().unwrap();
    storage.write("chk/state", snapshot.as_bytes()).unwrap();
    storage.sync_file("chk/state").unwrap();
    snapshot.as_bytes().len()
}

fn benches(c: &mut Criterion) {
    let all = KeyGroupRange::all(MaxParallelism::default());
    let mut group = c.benchmark_group("checkpoint");
    group.sample_size(10);
    for mb in SIZES_MB {
        let bytes = mb << 20;
        group.throughput(Throughput::Bytes(bytes));
        let dir = tempfile::tempdir().unwrap();
        let mut storage = LocalFsStorage::open(dir.path()).unwrap();

        let mut heap = HeapBackend::new(all);
        fill(&mut heap, bytes);
        // The synchronous part a task pays at a barrier: the capture; the write is asynchronous.
        group.bench_function(BenchmarkId::new("heap_capture", format!("{mb}MB")), |b| {
            b.iter(|| heap.snapshot().unwrap().as_bytes().len())
        });
        group.bench_function(BenchmarkId::new("heap_snapshot_and_fsync", format!("{mb}MB")), |b| {
            b.iter(|| checkpoint(&mut heap, &mut storage))
        });
        group.bench_function(BenchmarkId::new("heap_restore", format!("{mb}MB")), |b| {
            b.iter_batched(
                || KeyGroupsSnapshot::from_bytes(storage.read("chk/state").unwrap()).unwrap(),
                |snapshot| HeapBackend::new(all).restore(&snapshot).unwrap(),
                BatchSize::PerIteration,
            )
        });
        drop(heap);

        let mut rocks = RocksDbBackend::open(dir.path().join("db"), all).unwrap();
        fill(&mut rocks, bytes);
        group.bench_function(BenchmarkId::new("rocksdb_capture", format!("{mb}MB")), |b| {
            b.iter(|| rocks.snapshot().unwrap().as_bytes().len())
        });
        group.bench_function(BenchmarkId::new("rocksdb_snapshot_and_fsync", format!("{mb}MB")), |b| {
            b.iter(|| checkpoint(&mut rocks, &mut storage))
        });
        let restore_dir = dir.path().join("restored");
        group.bench_function(BenchmarkId::new("rocksdb_restore", format!("{mb}MB")), |b| {
            b.iter_batched(
                || {
                    let _ = std::fs::remove_dir_all(&restore_dir);
                    let snapshot = KeyGroupsSnapshot::from_bytes(storage.read("chk/state").unwrap()).unwrap();
                    (snapshot, RocksDbBackend::open(&restore_dir, all).unwrap())
                },
                |(snapshot, mut fresh)| fresh.restore(&snapshot).unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(checkpoint_benches, benches);
criterion_main!(checkpoint_benches);
