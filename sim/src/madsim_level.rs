//! The simulator's second level: the real driver of the root package (`sabot coordinator` and
//! `sabot worker`, their TCP transport, heartbeats and attempts) compiled with `--cfg madsim`, so
//! that tokio is madsim's deterministic executor, the clock is virtual, and the network is
//! madsim's (latency and packet loss chosen by the seed — loss is retransmitted with backoff, so it
//! shows as stalls that may outlast the heartbeat timeout — links and nodes clogged: partitions
//! and silent peers).
//! Processes are madsim nodes, killed and restarted by the fault plan.
//!
//! What this level does not model: the disk. Every node writes the one shared data directory on
//! the real file system, and a killed node loses nothing it wrote (the kernel-level harness
//! injects disk faults). What it checks: after the faults, everything is healed and the job must
//! finish within `LIVENESS_BOUND` of virtual time, and its committed output must equal the
//! failure-free reference (`w2_reference`) exactly.
//!
//! Replay: `RUSTFLAGS="--cfg madsim" cargo test -p sabot-sim --test madsim` runs the fixed seeds;
//! a failure names its seed, and `run(seed)` replays it bit for bit (same seed, same binary).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle, Runtime};
use sabot::driver::cluster::{run_coordinator, run_worker, CoordinatorSettings, WorkerSettings};
use sabot::driver::{CheckpointSettings, StateKind};
use sabot::fs_storage::LocalFsStorage;
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::testing::{w2_reference, window_rows};
use sabot_kernel::wire::JobSpec;
use sabot_kernel::workload::W2_WINDOW_SIZE_MS;

/// After the last fault is healed, the job must complete within this much virtual time.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(600);

const COORDINATOR_PORT: u16 = 7100;
const WORKER_PORT: u16 = 7200;
const SECRET: &[u8] = b"simulated secret";

/// A small deterministic generator (splitmix64): the plan is a function of the seed alone.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One fault of the plan, at a virtual time after the start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of a worker process; it restarts (a new process) after `down`.
    KillWorker { worker: usize, down: Duration },
    /// The coordinator process dies and restarts after `down` (it resumes from the latest
    /// completed checkpoint; the workers register again).
    KillCoordinator { down: Duration },
    /// Nothing passes between two processes (both directions) for `span`: a partition.
    Partition { a: Process, b: Process, span: Duration },
    /// A process receives nothing for `span` (its peers see it silent; it sees them silent).
    Isolate { process: Process, span: Duration },
}

/// A process of the simulated cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    Coordinator,
    Worker(usize),
}

/// What a seed chooses: the topology, the job, checkpoints, the network and the faults.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub workers: usize,
    pub nodes_per_worker: u16,
    pub parallelism: u16,
    pub records: u64,
    pub batch_size: u32,
    pub checkpoint_interval_ms: u64,
    pub unaligned: bool,
    pub alignment_timeout_ms: Option<u64>,
    pub latency: std::ops::Range<Duration>,
    /// Chance that a packet is lost: madsim's TCP retransmits it with exponential backoff (up to
    /// 10 s), so loss shows as stalls, and a stall past the heartbeat timeout as a lost peer
    /// (our failure detector resets the connection by ending the attempt).
    pub packet_loss_rate: f64,
    /// The driver's BUGGIFY points may fire (slow snapshot writes, late acknowledgements).
    pub buggify: bool,
    /// Faults by virtual time from the start, ascending.
    pub faults: Vec<(Duration, Fault)>,
}

impl Plan {
    /// The swarm options of `seed`.
    pub fn of_seed(seed: u64) -> Plan {
        let mut random = SplitMix(seed);
        let workers = random.between(1, 3) as usize;
        let nodes_per_worker = random.between(1, 2) as u16;
        let parallelism = random.between(1, 4) as u16;
        let records = random.between(20, 120) * 1_000;
        let batch_size = [256, 1000, 4096][random.between(0, 2) as usize];
        let checkpoint_interval_ms = random.between(20, 400);
        let unaligned = random.chance(30);
        let alignment_timeout_ms = random.chance(30).then(|| random.between(1, 50));
        let latency_max = random.between(2, 30);
        let latency = Duration::from_millis(1)..Duration::from_millis(latency_max);
        let buggify = random.chance(50);
        let packet_loss_rate = if random.chance(50) { 0.0 } else { random.between(1, 50) as f64 / 1_000.0 };
        let mut faults = Vec::new();
        let mut at = Duration::ZERO;
        for index in 0..random.between(0, 6) {
            // Dense enough to strike while the job runs (it takes 0.05 to a few virtual seconds).
            at += Duration::from_millis(if index == 0 { random.between(0, 60) } else { random.between(5, 400) });
            let process = |random: &mut SplitMix| match random.between(0, workers as u64) {
                0 => Process::Coordinator,
                w => Process::Worker(w as usize - 1),
            };
            let fault = match random.between(0, 9) {
                0..=4 => Fault::KillWorker {
                    worker: random.between(0, workers as u64 - 1) as usize,
                    down: Duration::from_millis(random.between(0, 1_500)),
                },
                5 => Fault::KillCoordinator { down: Duration::from_millis(random.between(0, 1_500)) },
                6..=7 => {
                    let a = process(&mut random);
                    let b = loop {
                        let b = process(&mut random);
                        if b != a || workers == 0 {
                            break b;
                        }
                    };
                    // Short ones pass unnoticed; long ones outlast the heartbeat timeout (3 s).
                    Fault::Partition { a, b, span: Duration::from_millis(random.between(50, 6_000)) }
                }
                _ => Fault::Isolate {
                    process: process(&mut random),
                    span: Duration::from_millis(random.between(50, 6_000)),
                },
            };
            faults.push((at, fault));
        }
        Plan {
            seed,
            workers,
            nodes_per_worker,
            parallelism,
            records,
            batch_size,
            checkpoint_interval_ms,
            unaligned,
            alignment_timeout_ms,
            latency,
            buggify,
            packet_loss_rate,
            faults,
        }
    }
}

/// What a run saw.
#[derive(Debug)]
pub struct Outcome {
    pub plan: Plan,
    /// Virtual time from the start to the job's completion.
    pub finished_after: Duration,
    /// Committed rows, equal to the reference's.
    pub rows: usize,
    /// Fault events carried out before the job completed (kills, restarts, clogs, heals).
    pub events: Vec<String>,
}

fn coordinator_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))
}

fn worker_ip(worker: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1 + worker as u8))
}

/// Runs the plan of `seed` in a fresh madsim world over a fresh data directory below `scratch`;
/// `Err` says what the oracle found (a panic inside the world is a bug too, and propagates).
pub fn run(seed: u64, scratch: &Path) -> Result<Outcome, String> {
    let plan = Plan::of_seed(seed);
    let data_dir = scratch.join(format!("seed-{seed}"));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir).map_err(|e| format!("clearing {}: {e}", data_dir.display()))?;
    }
    let mut config = madsim::Config::default();
    config.net.send_latency = plan.latency.clone();
    config.net.packet_loss_rate = plan.packet_loss_rate;
    let world = World { plan: plan.clone(), data_dir: data_dir.clone() };
    // A fresh thread for every run: std's hash maps take their keys from per-thread state (seeded
    // inside the world through madsim's getrandom), so a run must not inherit a previous one's.
    let (finished_after, events) =
        std::thread::spawn(move || Runtime::with_seed_and_config(seed, config).block_on(world.run()))
            .join()
            .map_err(|panic| format!("the world panicked: {}", panic_message(&panic)))??;
    let mut storage = LocalFsStorage::open(&data_dir).map_err(|e| e.to_string())?;
    let committed = read_committed(&mut storage, "w2").map_err(|e| format!("reading the output: {e}"))?;
    // A row committed twice fails (panics) inside window_rows, naming the row.
    let rows = window_rows(&committed);
    let expected = w2_reference(plan.records, W2_WINDOW_SIZE_MS);
    if rows != expected {
        let missing = expected.keys().filter(|k| !rows.contains_key(k)).count();
        let extra = rows.keys().filter(|k| !expected.contains_key(k)).count();
        let differ = rows.iter().filter(|(k, v)| expected.get(k).is_some_and(|e| e != *v)).count();
        return Err(format!(
            "the committed output differs from the failure-free run's: {missing} rows missing, {extra} extra, \
             {differ} with other values (of {})",
            expected.len()
        ));
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(Outcome { plan, finished_after, rows: rows.len(), events })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message.to_string(),
        (_, Some(message)) => message.clone(),
        _ => "(no message)".into(),
    }
}

struct World {
    plan: Plan,
    data_dir: PathBuf,
}

impl World {
    async fn run(self) -> Result<(Duration, Vec<String>), String> {
        let handle = Handle::current();
        let plan = self.plan;
        if plan.buggify {
            madsim::buggify::enable();
        }
        let done = Arc::new(AtomicBool::new(false));
        let failure: Arc<Mutex<Option<String>>> = Arc::default();
        let coordinator_address = SocketAddr::new(coordinator_ip(), COORDINATOR_PORT);
        let settings = CoordinatorSettings {
            listen: coordinator_address,
            workers: plan.workers as u16,
            // Go on with the workers that remain while one is down for long.
            min_workers: 1,
            job: JobSpec {
                name: "w2".into(),
                records: plan.records,
                parallelism: plan.parallelism,
                batch_size: plan.batch_size,
            },
            data_dir: self.data_dir.clone(),
            checkpoints: CheckpointSettings {
                interval_ms: plan.checkpoint_interval_ms,
                retained_count: 3,
                unaligned: plan.unaligned,
                alignment_timeout_ms: plan.alignment_timeout_ms,
            },
            secret: SECRET.to_vec(),
        };
        let coordinator = {
            let (done, failure) = (done.clone(), failure.clone());
            handle
                .create_node()
                .name("coordinator")
                .ip(coordinator_ip())
                .init(move || {
                    let (settings, done, failure) = (settings.clone(), done.clone(), failure.clone());
                    async move {
                        match run_coordinator(settings).await {
                            Ok(()) => done.store(true, Ordering::SeqCst),
                            Err(error) => *failure.lock().expect("failure lock") = Some(error.to_string()),
                        }
                    }
                })
                .build()
        };
        let workers: Vec<NodeHandle> = (0..plan.workers)
            .map(|worker| {
                let settings = WorkerSettings {
                    coordinator: coordinator_address,
                    listen: SocketAddr::new(worker_ip(worker), WORKER_PORT),
                    nodes: plan.nodes_per_worker,
                    data_dir: self.data_dir.clone(),
                    state: StateKind::Heap,
                    secret: SECRET.to_vec(),
                };
                let done = done.clone();
                handle
                    .create_node()
                    .name(format!("worker-{worker}"))
                    .ip(worker_ip(worker))
                    .init(move || {
                        let (settings, done) = (settings.clone(), done.clone());
                        async move {
                            // A worker gives up on a coordinator that is gone; a restarted one
                            // needs it back, so it offers itself again until the job is done.
                            while !done.load(Ordering::SeqCst) {
                                let _ = run_worker(settings.clone()).await;
                                madsim::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    })
                    .build()
            })
            .collect();
        let id_of = |process: Process| match process {
            Process::Coordinator => coordinator.id(),
            Process::Worker(worker) => workers[worker].id(),
        };
        let net = NetSim::current();
        let started = madsim::time::Instant::now();
        // Faults, each healed after its span; restarts and heals are events too.
        let mut events: Vec<(Duration, Event)> = Vec::new();
        for (at, fault) in &plan.faults {
            match *fault {
                Fault::KillWorker { worker, down } => {
                    events.push((*at, Event::Kill(Process::Worker(worker))));
                    events.push((*at + down, Event::Restart(Process::Worker(worker))));
                }
                Fault::KillCoordinator { down } => {
                    events.push((*at, Event::Kill(Process::Coordinator)));
                    events.push((*at + down, Event::Restart(Process::Coordinator)));
                }
                Fault::Partition { a, b, span } if a != b => {
                    events.push((*at, Event::Clog(a, b)));
                    events.push((*at + span, Event::Unclog(a, b)));
                }
                Fault::Partition { .. } => {}
                Fault::Isolate { process, span } => {
                    events.push((*at, Event::Isolate(process)));
                    events.push((*at + span, Event::Rejoin(process)));
                }
            }
        }
        // Stable: events at one instant keep the plan's order.
        events.sort_by_key(|(at, _)| *at);
        let mut down = std::collections::BTreeSet::new();
        let mut trace = Vec::new();
        for (at, event) in events {
            while !done.load(Ordering::SeqCst) && started.elapsed() < at {
                madsim::time::sleep((at - started.elapsed()).min(Duration::from_millis(5))).await;
            }
            if done.load(Ordering::SeqCst) {
                break;
            }
            trace.push(format!("[{:.3} s] {event:?}", started.elapsed().as_secs_f64()));
            match event {
                Event::Kill(process) => {
                    handle.kill(id_of(process));
                    down.insert(format!("{process:?}"));
                }
                Event::Restart(process) => {
                    if down.remove(&format!("{process:?}")) {
                        handle.restart(id_of(process));
                    }
                }
                Event::Clog(a, b) => {
                    net.clog_link(id_of(a), id_of(b));
                    net.clog_link(id_of(b), id_of(a));
                }
                Event::Unclog(a, b) => {
                    net.unclog_link(id_of(a), id_of(b));
                    net.unclog_link(id_of(b), id_of(a));
                }
                Event::Isolate(process) => net.clog_node(id_of(process)),
                Event::Rejoin(process) => net.unclog_node(id_of(process)),
            }
        }
        // Heal everything that is still broken, then the job must finish in bounded time.
        let healed = started.elapsed();
        for process in std::iter::once(Process::Coordinator).chain((0..plan.workers).map(Process::Worker)) {
            net.unclog_node(id_of(process));
            for other in std::iter::once(Process::Coordinator).chain((0..plan.workers).map(Process::Worker)) {
                net.unclog_link(id_of(process), id_of(other));
            }
            if down.remove(&format!("{process:?}")) {
                handle.restart(id_of(process));
            }
        }
        loop {
            if done.load(Ordering::SeqCst) {
                return Ok((started.elapsed(), trace));
            }
            if let Some(error) = failure.lock().expect("failure lock").take() {
                return Err(format!("the coordinator failed: {error}"));
            }
            if started.elapsed() > healed + LIVENESS_BOUND {
                return Err(format!(
                    "liveness: the job did not finish within {} s of virtual time after the last heal",
                    LIVENESS_BOUND.as_secs()
                ));
            }
            madsim::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Event {
    Kill(Process),
    Restart(Process),
    Clog(Process, Process),
    Unclog(Process, Process),
    Isolate(Process),
    Rejoin(Process),
}
