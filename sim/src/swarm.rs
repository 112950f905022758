//! Swarm options: everything a run does, drawn from its seed — the topology, the workload, the
//! checkpoint settings, the network's behaviour and the fault plan (which faults, how often, when).
//!
//! Each seed switches some faults off entirely (swarm testing): a run with few kinds of fault
//! reaches states that a run with every fault at once never does.

use std::fmt;
use std::sync::Arc;

use sabot_kernel::dataflow::event_window::WindowKind;
use sabot_kernel::dataflow::source::{GeneratorSplits, GeneratorStalls};
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::env::fault_storage::FaultConfig;
use sabot_kernel::state::testing::Lcg;
use sabot_kernel::testing::cluster::{CheckpointSettings, ClusterConfig, FaultEvent, FaultPlan, NetworkSettings};
use sabot_kernel::workload::{self, SplitWatermarkOptions, W2Options};

/// Which job a run executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// W1: filter and projection (stateless).
    W1 {
        record_count: u64,
        parallelism: u16,
        batch_size: usize,
    },
    /// W2 and its variants (late data: a bound below the generator's disorder, one source).
    W2(W2Options),
    /// W3: every kind of keyed state per key (`workload::w3_job_with`).
    W3(W2Options),
    /// W2 or W3 with watermarks made per split inside the source
    /// (`workload::w2_job_split_watermarks`): splits that stall in processing time, idleness,
    /// periodic emission, alignment.
    W2Idle(W2Options, SplitWatermarkOptions),
    W3Idle(W2Options, SplitWatermarkOptions),
    /// W4: event-time windows on timers, with allowed lateness and late records to a side
    /// output (`workload::w4_job_with`); one source, so which records are late is fixed.
    W4 {
        options: W2Options,
        kind: WindowKind,
        allowed_lateness_ms: i64,
    },
    /// W5: tumbling, sliding or session windows on processing time (`workload::w5_job_with`),
    /// counting and summing values per key. A record's window is the time on the clock of the
    /// node that runs its key's window subtask when the record arrives there, so the rows depend
    /// on timing and the oracle checks what cannot: per key, the totals of count and sum over the
    /// committed rows (`workload::w5_totals`), each record counted once per window it belongs to.
    /// The nodes' clock skew shifts each node's window boundaries against the others'; a clock
    /// jump forward fires at once every open window whose end it passes (cutting it short), and
    /// the records after it open later windows. A restart restores open windows with their
    /// timers, which fire at the next step if their end passed while the job was down; a restart
    /// from a kept checkpoint (the consistent-cut check) starts the clock again from zero, behind
    /// the restored timers, which then fire when the clock reaches them or at the end of input.
    W5 {
        options: W2Options,
        kind: WindowKind,
    },
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::W1 { .. } => "W1",
            Workload::W2(options) if options.out_of_orderness_ms < 2_000 => "W2-late",
            Workload::W2(options) if options.keys != workload::Keys::Uniform => "W2-skewed-keys",
            Workload::W2(options) if options.window_size_ms != workload::W2_WINDOW_SIZE_MS => "W2-small-windows",
            Workload::W2(_) => "W2",
            Workload::W3(_) => "W3-keyed-state",
            Workload::W2Idle(..) => "W2-idle",
            Workload::W3Idle(..) => "W3-idle",
            Workload::W4 { kind: WindowKind::Session { .. }, .. } => "W4-session-windows",
            Workload::W4 { kind: WindowKind::Sliding { .. }, .. } => "W4-sliding-windows",
            Workload::W4 { .. } => "W4-tumbling-windows",
            Workload::W5 { kind: WindowKind::Session { .. }, .. } => "W5-session-windows",
            Workload::W5 { kind: WindowKind::Sliding { .. }, .. } => "W5-sliding-windows",
            Workload::W5 { .. } => "W5-tumbling-windows",
        }
    }

    /// The W2-shaped options of every workload but W1.
    fn w2_options(&self) -> Option<W2Options> {
        match *self {
            Workload::W1 { .. } => None,
            Workload::W2(options) | Workload::W3(options) => Some(options),
            Workload::W2Idle(options, _) | Workload::W3Idle(options, _) => Some(options),
            Workload::W4 { options, .. } | Workload::W5 { options, .. } => Some(options),
        }
    }

    /// What W5's committed rows must total per key, whatever the timing; `None` for the
    /// workloads whose rows the oracle compares with a failure-free run's.
    pub fn totals(&self) -> Option<std::collections::BTreeMap<u64, (u64, i64)>> {
        match *self {
            Workload::W5 { options, kind } => Some(workload::w5_totals(options.record_count, options.keys, kind)),
            Workload::W1 { .. }
            | Workload::W2(_)
            | Workload::W3(_)
            | Workload::W2Idle(..)
            | Workload::W3Idle(..)
            | Workload::W4 { .. } => None,
        }
    }

    pub fn record_count(&self) -> u64 {
        match self {
            Workload::W1 { record_count, .. } => *record_count,
            _ => self.w2_options().expect("not W1").record_count,
        }
    }

    pub fn plan(&self, node_count: u16) -> PhysicalPlan {
        let graph = match *self {
            Workload::W1 { record_count, parallelism, batch_size } => {
                workload::w1_job(record_count, parallelism, batch_size)
            }
            Workload::W2(options) => workload::w2_job_with(options),
            Workload::W3(options) => workload::w3_job_with(options),
            Workload::W2Idle(options, watermarks) => workload::w2_job_split_watermarks(options, watermarks),
            Workload::W3Idle(options, watermarks) => workload::w3_job_split_watermarks(options, watermarks),
            Workload::W4 { options, kind, allowed_lateness_ms } => {
                workload::w4_job_with(options, kind, allowed_lateness_ms)
            }
            Workload::W5 { options, kind } => workload::w5_job_with(options, kind),
        };
        PhysicalPlan::new(graph.expect("swarm workloads are valid jobs"), node_count)
    }
}

/// One run's world, drawn from its seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub workload: Workload,
    pub node_count: u16,
    pub checkpoints: CheckpointSettings,
    pub network: NetworkSettings,
    pub faults: FaultPlan,
    pub liveness_ms: u64,
}

/// How big the swarm's runs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwarmLimits {
    pub record_count_max: u64,
    /// Replaces the drawn record count (every other choice stays as the seed draws it, and
    /// the fault plan and liveness bound follow the longer run).
    pub record_count: Option<u64>,
}

impl Default for SwarmLimits {
    fn default() -> Self {
        SwarmLimits { record_count_max: 3_000, record_count: None }
    }
}

fn pick<T: Copy>(rng: &mut Lcg, choices: &[T]) -> T {
    choices[rng.below(choices.len() as u64) as usize]
}

fn between(rng: &mut Lcg, low: u64, high: u64) -> u64 {
    low + rng.below(high - low + 1)
}

/// A rate in parts per million, or zero (the fault switched off for this seed).
fn rate(rng: &mut Lcg, max_ppm: u64) -> u32 {
    if rng.below(2) == 0 {
        0
    } else {
        between(rng, max_ppm / 20, max_ppm) as u32
    }
}

impl Scenario {
    pub fn from_seed(seed: u64, limits: SwarmLimits) -> Scenario {
        let mut rng = Lcg::new(seed);
        let workload = draw_workload(&mut rng, limits);
        let parallelism = match (workload, workload.w2_options()) {
            (Workload::W1 { parallelism, .. }, _) => parallelism,
            (_, options) => options.map_or(1, |options| options.parallelism.max(options.source_parallelism)),
        };
        let node_count = between(&mut rng, 1, u64::from(parallelism).min(3)) as u16;
        let checkpoints = CheckpointSettings {
            interval_ms: pick(&mut rng, &[2, 5, 10, 20, 50]),
            unaligned: rng.below(3) == 0,
            alignment_timeout_ms: (rng.below(4) == 0).then(|| rng.below(8)),
            timeout_ms: pick(&mut rng, &[60, 200, 10_000]),
            concurrent_max: between(&mut rng, 1, 3) as usize,
            retained_count: between(&mut rng, 1, 3) as usize,
        };
        let network = NetworkSettings {
            tick_ms: between(&mut rng, 1, 3),
            delay_ms_max: pick(&mut rng, &[0, 2, 5, 15]),
            channel_capacity: pick(&mut rng, &[1, 2, 8, 32]),
            step_ppm: pick(&mut rng, &[400_000, 800_000, 1_000_000]),
            write_delay_ms_max: pick(&mut rng, &[0, 3, 20]),
            persist_delay_ms_max: pick(&mut rng, &[0, 3, 20]),
        };
        // Roughly how long a fault-free run lasts: batches per node, stepped at the step rate.
        let batch_size = match (workload, workload.w2_options()) {
            (Workload::W1 { batch_size, .. }, _) => batch_size,
            (_, options) => options.map_or(1, |options| options.batch_size),
        } as u64;
        let batches = workload.record_count().div_ceil(batch_size);
        let steps = batches.div_ceil(u64::from(node_count)) * 1_000_000 / u64::from(network.step_ppm);
        let duration_ms = (steps * network.tick_ms).max(20);
        let faults = draw_faults(&mut rng, node_count, duration_ms);
        let mut liveness_ms = duration_ms * 40 + 20_000;
        // Drawn after everything else, so that a seed it leaves alone keeps the world it had.
        let workload = match draw_split_watermarks(&mut rng, workload) {
            Some((idle, stall_ms_total)) => {
                liveness_ms += 2 * stall_ms_total;
                idle
            }
            None => workload,
        };
        Scenario { seed, workload, node_count, checkpoints, network, faults, liveness_ms }
    }

    pub fn cluster_config(&self, trace: bool) -> ClusterConfig {
        ClusterConfig {
            seed: self.seed,
            plan: Arc::new(self.workload.plan(self.node_count)),
            checkpoints: self.checkpoints.clone(),
            network: self.network.clone(),
            faults: self.faults.clone(),
            trace,
            liveness_ms: self.liveness_ms,
        }
    }

    /// The same world without faults: the fault-free comparison run, or a restart from a cut.
    pub fn without_faults(&self) -> Scenario {
        let faults = FaultPlan { heal_at_ms: 0, ..FaultPlan::default() };
        Scenario { faults, ..self.clone() }
    }
}

fn draw_workload(rng: &mut Lcg, limits: SwarmLimits) -> Workload {
    let drawn = between(rng, limits.record_count_max / 8, limits.record_count_max).max(1);
    let record_count = limits.record_count.unwrap_or(drawn);
    let batch_size = pick(rng, &[1, 3, 7, 16, 50, 100, 333]);
    let parallelism = between(rng, 1, 4) as u16;
    let base = W2Options {
        record_count,
        source_parallelism: parallelism,
        parallelism,
        batch_size,
        out_of_orderness_ms: workload::W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: workload::W2_WINDOW_SIZE_MS,
        keys: workload::Keys::Uniform,
    };
    match rng.below(10) {
        0..=1 => Workload::W1 { record_count, parallelism, batch_size },
        // Event-time windows on timers, replacing a third of the W2-late draws: the same one
        // source and tight bound (so records are late), the kind of window and the allowed
        // lateness chosen from the record count, not by a draw, so other seeds stay as they were.
        2..=3 if record_count % 3 == 2 => {
            let options = W2Options {
                source_parallelism: 1,
                out_of_orderness_ms: 300,
                keys: workload::Keys::Skewed { hot: 8 + record_count % 13 },
                ..base
            };
            let kind = match record_count % 4 {
                0 => WindowKind::Tumbling { size_ms: 500 },
                1 => WindowKind::Sliding { size_ms: 600, slide_ms: 200 },
                _ => WindowKind::Session { gap_ms: 40 },
            };
            Workload::W4 { options, kind, allowed_lateness_ms: [0, 250][(record_count / 4 % 2) as usize] }
        }
        // Late data: with one source, which records are late does not depend on interleaving.
        2..=3 => Workload::W2(W2Options {
            source_parallelism: 1,
            out_of_orderness_ms: pick(rng, &[0, 300, 1_000]),
            window_size_ms: pick(rng, &[500, 2_000]),
            ..base
        }),
        4..=5 => Workload::W2(W2Options {
            source_parallelism: between(rng, 1, 4) as u16,
            window_size_ms: pick(rng, &[100, 1_000]),
            ..base
        }),
        // Hot keys: most records in a few key groups, so one subtask carries the load. The hot
        // key count comes from the record count, not from the generator, so the draws that
        // follow (and every other seed's world) stay as they were.
        9 => Workload::W2(W2Options { keys: workload::Keys::Skewed { hot: 1 + record_count % 8 }, ..base }),
        // Keyed state of every kind, with hot keys so that keys gather many records (and their
        // lists and maps many entries). Chosen from the record count, not by a draw, for the
        // same reason as the hot keys.
        _ if record_count % 3 == 1 => {
            Workload::W3(W2Options { keys: workload::Keys::Skewed { hot: 4 + record_count % 29 }, ..base })
        }
        // Windows on processing time, replacing half of the plain W2 draws (neither takes a draw,
        // so every other seed's world stays as it was; the regression seeds' plain W2 worlds have
        // record counts 2 mod 3): the kind of window from the record count, sizes small beside a
        // run's tens to thousands of virtual milliseconds so that windows fire while the input
        // flows, and hot keys so that windows gather records.
        _ if record_count % 3 == 0 => {
            let options = W2Options { keys: workload::Keys::Skewed { hot: 2 + record_count % 7 }, ..base };
            let kind = match record_count / 3 % 3 {
                0 => WindowKind::Tumbling { size_ms: 20 },
                1 => WindowKind::Sliding { size_ms: 30, slide_ms: 10 },
                _ => WindowKind::Session { gap_ms: 3 },
            };
            Workload::W5 { options, kind }
        }
        _ => Workload::W2(base),
    }
}

/// For some seeds, W2 or W3 with watermarks made per split inside the source, whose splits stall
/// in processing time (with the clocks' skew and jumps), with or without idleness, periodic
/// emission and alignment; and how long the stalls last in all (for the liveness bound).
///
/// The oracle compares output exactly, so these worlds keep the output independent of timing: a
/// W2 whose bound exceeds the input's event-time span (records `i` have times in `[i, i + 2 s)`),
/// where no record can be late whatever idleness and emission do; W3, whose output ignores
/// watermarks; or W2 from one source subtask of one split, whose watermarks go out after every
/// batch (idleness and alignment then change nothing but the pace).
fn draw_split_watermarks(rng: &mut Lcg, workload: Workload) -> Option<(Workload, u64)> {
    if rng.below(3) != 1 {
        return None;
    }
    let (options, w3) = match workload {
        Workload::W2(options) => (options, false),
        Workload::W3(options) => (options, true),
        Workload::W1 { .. }
        | Workload::W2Idle(..)
        | Workload::W3Idle(..)
        | Workload::W4 { .. }
        | Workload::W5 { .. } => return None,
    };
    let timing_free = w3 || options.out_of_orderness_ms >= options.record_count as i64 + 2_000;
    if !timing_free && options.source_parallelism != 1 {
        return None;
    }
    // Rare enough that a world lasts a few times longer than without stalls, not a hundred.
    let stalls = GeneratorStalls { every_records: pick(rng, &[50, 200, 1_000]), stall_ms: pick(rng, &[3, 10, 30]) };
    let count = pick(rng, &[None, None, Some(1), Some(3), Some(5)]);
    let watermarks = SplitWatermarkOptions {
        splits: GeneratorSplits { count: count.filter(|_| timing_free), stalls: Some(stalls) },
        idle_timeout_ms: pick(rng, &[None, Some(1), Some(5), Some(20)]),
        emit_interval_ms: pick(rng, &[0, 0, 3, 20]) * u64::from(timing_free),
        max_drift_ms: pick(rng, &[None, None, Some(20), Some(500)]),
    };
    let stall_ms_total = options.record_count / stalls.every_records * stalls.stall_ms;
    let idle = if w3 { Workload::W3Idle(options, watermarks) } else { Workload::W2Idle(options, watermarks) };
    Some((idle, stall_ms_total))
}

fn draw_faults(rng: &mut Lcg, node_count: u16, duration_ms: u64) -> FaultPlan {
    let heal_at_ms = duration_ms * between(rng, 30, 150) / 100;
    let mut events = Vec::new();
    let at = |rng: &mut Lcg| between(rng, 1, heal_at_ms.max(2));
    for _ in 0..pick(rng, &[0, 1, 1, 2, 3]) {
        events.push((at(rng), FaultEvent::PowerLoss));
    }
    for _ in 0..pick(rng, &[0, 0, 1, 2]) {
        let node = rng.below(u64::from(node_count)) as u16;
        events.push((at(rng), FaultEvent::NodeCrash { node }));
    }
    for _ in 0..pick(rng, &[0, 0, 1]) {
        let start = at(rng);
        events.push((start, FaultEvent::DiskFull { full: true }));
        events.push((start + between(rng, 1, 30), FaultEvent::DiskFull { full: false }));
    }
    // Durable damage, and a crash soon after it, so that recovery meets it.
    if rng.below(8) == 0 {
        let when = at(rng);
        events.push((when, FaultEvent::CorruptNewestCheckpoint));
        events.push((when + between(rng, 1, 5), FaultEvent::NodeCrash { node: 0 }));
    }
    if rng.below(8) == 0 {
        let when = at(rng);
        events.push((when, FaultEvent::CorruptPointer));
        events.push((when + between(rng, 1, 5), FaultEvent::PowerLoss));
    }
    for _ in 0..pick(rng, &[0, 0, 1, 2]) {
        let node = rng.below(u64::from(node_count) + 1) as u16;
        events.push((at(rng), FaultEvent::ClockJump { node, ms: pick(rng, &[5, 100, 5_000]) }));
    }
    events.sort_by_key(|(at, _)| *at);
    let storage = FaultConfig {
        read_error_ppm: rate(rng, 5_000),
        read_corrupt_ppm: rate(rng, 3_000),
        write_error_ppm: rate(rng, 3_000),
        misdirect_ppm: if rng.below(6) == 0 { between(rng, 100, 2_000) as u32 } else { 0 },
        sync_error_ppm: rate(rng, 3_000),
        torn_ppm: rate(rng, 1_000_000),
    };
    let clock_skew_ms = (0..=node_count).map(|_| pick(rng, &[0, 0, 3, 50, 1_000])).collect();
    let restart_delay_ms_max = pick(rng, &[0, 5, 50]);
    FaultPlan { heal_at_ms, events, storage, clock_skew_ms, restart_delay_ms_max }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "workload   {} {:?}", self.workload.name(), self.workload)?;
        writeln!(f, "topology   {} nodes", self.node_count)?;
        writeln!(f, "checkpoints {:?}", self.checkpoints)?;
        writeln!(f, "network    {:?}", self.network)?;
        writeln!(f, "faults     heal at {} ms, disk {:?}", self.faults.heal_at_ms, self.faults.storage)?;
        writeln!(
            f,
            "           clock skew {:?} ms, restart delay ≤ {} ms",
            self.faults.clock_skew_ms, self.faults.restart_delay_ms_max
        )?;
        for (at, event) in &self.faults.events {
            writeln!(f, "           at {at:>6} ms: {event:?}")?;
        }
        Ok(())
    }
}
