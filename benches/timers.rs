//! What timers cost: registering and firing through `TimerService`, on both backends, and how
//! many pending timers RocksDB holds in how much memory.
//!
//! Machine: the project's 2-core machine (see README "Benchmarks"), shared with other builds.
//! Run: `cargo bench --bench timers`; `cargo bench --bench timers -- --test` runs every case
//! once on few timers (CI). With `SABOT_BENCH_LARGE=1` it also registers 10,000,000 timers on
//! RocksDB and fires them all (a minute or two, under 1 GB of disk), before the other cases,
//! printing the time per timer and the process's peak resident memory (`VmHWM`);
//! `SABOT_BENCH_TIMERS` sets another count. `SABOT_BENCH_LARGE=1 cargo bench --bench timers --
//! rocksdb_large` runs it alone (the criterion cases' names do not match the filter).
//!
//! Every timer is an event-time timer of a `u64` key in an `i64` namespace (a window's end, as
//! the window operator will register them), so its key in the backend has 30 bytes. The
//! service holds `PENDING` (100,000) timers of 100,000 keys throughout, in 128 key groups:
//! - `timers/<backend>/register`: registers timers, each for a new time, later than every pending
//!   one (as windows are); what a batch registered fires untimed after it, so the count stays put;
//! - `timers/<backend>/fire`: fires the next due timer (`poll_event_timer`), the watermark one
//!   step ahead each time; the timers fired are registered again untimed;
//! - `timers/<backend>/register_and_fire`: the steady state: one registration and one timer
//!   fired per iteration.
//!
//! `<backend>` is `heap`, or `rocksdb` (the default write-back cache of 262,144 entries, which
//! holds every pending timer: RocksDB is written only when it is full) or `rocksdb_small_cache`
//! (a cache of 4,096 entries, so timers live in RocksDB's memtables and SST files and each fire
//! reads them from there).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sabot::rocks::{RocksDbBackend, RocksDbConfig};
use sabot_kernel::key_group::{KeyGroupRange, MaxParallelism};
use sabot_kernel::state::keyed::KeyedState;
use sabot_kernel::state::timers::{TimerService, TimerTime};
use sabot_kernel::state::HeapBackend;
use sabot_kernel::time::EventTime;

/// Timers pending throughout the criterion cases.
const PENDING: u64 = 100_000;
/// Timers of the large run (`SABOT_BENCH_LARGE=1`; `SABOT_BENCH_TIMERS` sets another count).
const LARGE_TIMERS: u64 = 10_000_000;

/// `cargo bench -- --test` runs each case once: few timers, so that CI is quick.
fn test_mode() -> bool {
    std::env::args().any(|arg| arg == "--test")
}

fn pending() -> u64 {
    if test_mode() {
        1_000
    } else {
        PENDING
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
    let backend = RocksDbBackend::open_empty_with(path, KeyGroupRange::all(max_parallelism()), config).unwrap();
    KeyedState::new(Box::new(backend), max_parallelism())
}

/// A timer service with a stream of timers: timer `n` belongs to key `n % keys` in the window
/// (namespace) ending at `n`, and fires at time `n`.
struct Stream {
    state: KeyedState,
    timers: TimerService,
    keys: u64,
    /// The next timer to register, and the next to fire.
    registered: u64,
    fired: u64,
}

impl Stream {
    fn new(mut state: KeyedState, pending: u64) -> Stream {
        let timers = TimerService::declare(&mut state).unwrap();
        let mut stream = Stream { state, timers, keys: pending, registered: 0, fired: 0 };
        for _ in 0..pending {
            stream.register();
        }
        stream
    }

    #[inline]
    fn register(&mut self) {
        let n = self.registered;
        self.state.set_current_key_u64(n % self.keys);
        self.state.set_namespace_i64(n as i64);
        self.timers.register_event_timer(&mut self.state, EventTime(n as i64)).unwrap();
        self.registered += 1;
    }

    #[inline]
    fn fire(&mut self) {
        let n = self.fired;
        let timer = self.timers.poll_event_timer(&mut self.state, EventTime(n as i64)).unwrap();
        let timer = timer.unwrap_or_else(|| panic!("timer {n} did not fire"));
        assert_eq!(timer.time, TimerTime::Event(EventTime(n as i64)));
        black_box(timer);
        self.fired += 1;
    }
}

fn bench_backend(c: &mut Criterion, name: &str, state: KeyedState) {
    let mut stream = Stream::new(state, pending());
    let mut group = c.benchmark_group(format!("timers/{name}"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("register", |b| {
        b.iter_custom(|iterations| {
            let start = Instant::now();
            for _ in 0..iterations {
                stream.register();
            }
            let elapsed = start.elapsed();
            (0..iterations).for_each(|_| stream.fire());
            elapsed
        })
    });
    group.bench_function("fire", |b| {
        b.iter_custom(|iterations| {
            (0..iterations).for_each(|_| stream.register());
            let start = Instant::now();
            for _ in 0..iterations {
                stream.fire();
            }
            start.elapsed()
        })
    });
    group.bench_function("register_and_fire", |b| {
        b.iter(|| {
            stream.register();
            stream.fire();
        })
    });
    group.finish();
}

/// The process's peak resident memory so far, in bytes (`VmHWM` of /proc/self/status).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap_or("VmHWM: 0 kB");
    line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// The size of the files under `dir`, in bytes.
fn dir_size_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => dir_size_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Registers `count` timers on RocksDB (default configuration) in an order unrelated to their
/// times, then fires them all, checking the order; prints times and peak memory.
fn large_run(dir: &Path) {
    let count = std::env::var("SABOT_BENCH_TIMERS").ok().and_then(|n| n.parse().ok()).unwrap_or(LARGE_TIMERS);
    let before = peak_rss_bytes();
    let mut state = rocks_state(&dir.join("large"), sabot::rocks::CACHE_ENTRIES_MAX);
    let mut timers = TimerService::declare(&mut state).unwrap();
    // Time of timer i: a permutation of 0..count (i times an odd constant, modulo a power of two
    // at or above count, skipping what falls outside), so registration order is not time order.
    let span = count.next_power_of_two();
    let times = (0..span).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) & (span - 1)).filter(|&t| t < count);
    let start = Instant::now();
    for (i, time) in times.enumerate() {
        state.set_current_key_u64(i as u64);
        state.set_namespace_i64(time as i64);
        timers.register_event_timer(&mut state, EventTime(time as i64)).unwrap();
    }
    let registered = start.elapsed();
    let after_register = peak_rss_bytes();
    let disk = dir_size_bytes(&dir.join("large"));
    let start = Instant::now();
    let mut fired = 0_u64;
    let mut last = i64::MIN;
    while let Some(timer) = timers.poll_event_timer(&mut state, EventTime::MAX).unwrap() {
        let TimerTime::Event(time) = timer.time else { unreachable!("an event-time timer") };
        assert!(time.0 >= last, "timer at {time:?} after one at {last}");
        last = time.0;
        fired += 1;
    }
    let fire = start.elapsed();
    assert_eq!(fired, count, "every timer fires once");
    let per = |elapsed: Duration| elapsed.as_nanos() as f64 / count as f64;
    let mb = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "timers/rocksdb_large: {count} timers: register {:.1} s ({:.0} ns per timer), fire {:.1} s ({:.0} ns \
         per timer); peak RSS {:.0} MB before, {:.0} MB after registering, {:.0} MB after firing; {:.0} MB \
         on disk after registering",
        registered.as_secs_f64(),
        per(registered),
        fire.as_secs_f64(),
        per(fire),
        mb(before),
        mb(after_register),
        mb(peak_rss_bytes()),
        mb(disk),
    );
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    // First: the peak memory it reports is the process's, so nothing else may have run before.
    if std::env::var("SABOT_BENCH_LARGE").is_ok_and(|v| v == "1") {
        large_run(dir.path());
    }
    bench_backend(c, "heap", heap_state());
    bench_backend(c, "rocksdb", rocks_state(&dir.path().join("cached"), sabot::rocks::CACHE_ENTRIES_MAX));
    bench_backend(c, "rocksdb_small_cache", rocks_state(&dir.path().join("small"), 4_096));
}

criterion_group!(timer_benches, benches);
criterion_main!(timer_benches);
