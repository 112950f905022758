//! The kernel's single-threaded cluster harness (`testing::cluster::run`) on the faulty disk,
//! with a world decoded from the input: the harness's seed (network interleaving, delays, which
//! disk operations fail), a small job (W1 to W4 of 1 to 200 records, 1 to 3 nodes, parallelism 1
//! to 3), checkpoint and network settings, and the fault plan — when which node crashes, power
//! losses, the disk filling up and draining, damage to the newest checkpoint or the pointer,
//! clock jumps and skew, and the disk's error, corruption, misdirection and tearing rates.
//!
//! The harness has no partition fault: a partition that breaks a channel fails the attempt, as
//! a node crash does; a shorter one delays delivery, as the network's delays do.
//!
//! Judged by the simulator's exactly-once oracle (`sabot_sim::oracle::judge`) against a
//! failure-free run of the same job (`testing::run_in_memory`): the run finishes with exactly the
//! reference output, or refuses to go on after durable damage without wrong output; no invariant
//! the harness checks on the way breaks; no panic. The checkpoint the harness sampled is restarted
//! from without faults, as `sabot-sim` does: it must be a consistent cut.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sabot_kernel::dataflow::event_window::WindowKind;
use sabot_kernel::env::fault_storage::{FaultConfig, FaultDisk, FaultStorage};
use sabot_kernel::testing::cluster::{self, CheckpointSettings, FaultEvent, FaultPlan, NetworkSettings};
use sabot_kernel::testing::run_in_memory;
use sabot_kernel::workload::{self, Keys, W2Options};
use sabot_sim::oracle::{self, Failure, Row, Verdict};
use sabot_sim::swarm::{Scenario, Workload};

/// Records a job reads at most: one execution takes milliseconds.
const RECORD_COUNT_MAX: u64 = 200;
const EVENT_COUNT_MAX: usize = 6;

struct Input(Scenario);

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn pick<T: Copy>(u: &mut Unstructured<'_>, choices: &[T]) -> arbitrary::Result<T> {
    Ok(*u.choose(choices)?)
}

/// A rate in parts per million up to `max`, or zero (most often: a fault switched off).
fn rate(u: &mut Unstructured<'_>, max: u32) -> arbitrary::Result<u32> {
    Ok(if u.ratio(1, 2)? { 0 } else { u.int_in_range(0..=max)? })
}

fn workload(u: &mut Unstructured<'_>) -> arbitrary::Result<Workload> {
    let record_count = u.int_in_range(1..=RECORD_COUNT_MAX)?;
    let batch_size = pick(u, &[1, 3, 7, 16, 50])?;
    let parallelism = u.int_in_range(1..=3)?;
    let base = W2Options {
        record_count,
        source_parallelism: parallelism,
        parallelism,
        batch_size,
        out_of_orderness_ms: workload::W2_OUT_OF_ORDERNESS_MS,
        window_size_ms: workload::W2_WINDOW_SIZE_MS,
        keys: Keys::Uniform,
    };
    // As the simulator's swarm: output that does not depend on timing. Late records (a tight
    // bound) only from one source subtask, whose order of records is fixed.
    Ok(match u.int_in_range(0..=5)? {
        0 => Workload::W1 { record_count, parallelism, batch_size },
        1 => Workload::W2(W2Options {
            source_parallelism: u.int_in_range(1..=3)?,
            window_size_ms: pick(u, &[100, 1_000, 10_000])?,
            ..base
        }),
        2 => Workload::W2(W2Options {
            source_parallelism: 1,
            out_of_orderness_ms: pick(u, &[0, 30, 300])?,
            window_size_ms: pick(u, &[50, 500])?,
            keys: Keys::Skewed { hot: u.int_in_range(1..=8)? },
            ..base
        }),
        3 => Workload::W3(W2Options { keys: Keys::Skewed { hot: u.int_in_range(1..=16)? }, ..base }),
        _ => {
            let kind = match u.int_in_range(0..=2)? {
                0 => WindowKind::Tumbling { size_ms: 50 },
                1 => WindowKind::Sliding { size_ms: 60, slide_ms: 20 },
                _ => WindowKind::Session { gap_ms: 4 },
            };
            let options = W2Options {
                source_parallelism: 1,
                out_of_orderness_ms: pick(u, &[0, 30, 300])?,
                keys: Keys::Skewed { hot: u.int_in_range(1..=8)? },
                ..base
            };
            Workload::W4 { options, kind, allowed_lateness_ms: pick(u, &[0, 25])? }
        }
    })
}

fn fault_plan(u: &mut Unstructured<'_>, node_count: u16, duration_ms: u64) -> arbitrary::Result<FaultPlan> {
    let heal_at_ms = duration_ms * u.int_in_range(30..=150)? / 100;
    let mut events = Vec::new();
    for _ in 0..u.int_in_range(0..=EVENT_COUNT_MAX)? {
        let at = u.int_in_range(1..=heal_at_ms.max(2))?;
        let event = match u.int_in_range(0..=9)? {
            0..=1 => FaultEvent::PowerLoss,
            2..=4 => FaultEvent::NodeCrash { node: u.int_in_range(0..=node_count - 1)? },
            5 => {
                events.push((at + u.int_in_range(1..=30)?, FaultEvent::DiskFull { full: false }));
                FaultEvent::DiskFull { full: true }
            }
            6 => FaultEvent::CorruptNewestCheckpoint,
            7 => FaultEvent::CorruptPointer,
            _ => FaultEvent::ClockJump { node: u.int_in_range(0..=node_count)?, ms: pick(u, &[5, 100, 5_000])? },
        };
        events.push((at, event));
    }
    events.sort_by_key(|(at, _)| *at);
    let storage = FaultConfig {
        read_error_ppm: rate(u, 5_000)?,
        read_corrupt_ppm: rate(u, 3_000)?,
        write_error_ppm: rate(u, 3_000)?,
        misdirect_ppm: if u.ratio(1, 6)? { u.int_in_range(100..=2_000)? } else { 0 },
        sync_error_ppm: rate(u, 3_000)?,
        torn_ppm: rate(u, 1_000_000)?,
    };
    let clock_skew_ms = (0..=node_count).map(|_| pick(u, &[0, 0, 3, 50, 1_000])).collect::<arbitrary::Result<_>>()?;
    let restart_delay_ms_max = pick(u, &[0, 5, 50])?;
    Ok(FaultPlan { heal_at_ms, events, storage, clock_skew_ms, restart_delay_ms_max })
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Input> {
        let workload = workload(u)?;
        let parallelism = match workload {
            Workload::W1 { parallelism, .. } => parallelism,
            Workload::W2(o) | Workload::W3(o) | Workload::W4 { options: o, .. } => {
                o.parallelism.max(o.source_parallelism)
            }
            Workload::W2Idle(..) | Workload::W3Idle(..) | Workload::W5 { .. } => unreachable!("not drawn"),
        };
        let node_count = u.int_in_range(1..=parallelism)?;
        let checkpoints = CheckpointSettings {
            interval_ms: pick(u, &[2, 5, 10, 20])?,
            unaligned: u.ratio(1, 3)?,
            alignment_timeout_ms: if u.ratio(1, 4)? { Some(u.int_in_range(0..=8)?) } else { None },
            timeout_ms: pick(u, &[60, 200, 10_000])?,
            concurrent_max: u.int_in_range(1..=3)?,
            retained_count: u.int_in_range(1..=3)?,
        };
        let network = NetworkSettings {
            tick_ms: u.int_in_range(1..=3)?,
            delay_ms_max: pick(u, &[0, 2, 5, 15])?,
            channel_capacity: pick(u, &[1, 2, 8])?,
            step_ppm: pick(u, &[400_000, 800_000, 1_000_000])?,
            write_delay_ms_max: pick(u, &[0, 3, 20])?,
            persist_delay_ms_max: pick(u, &[0, 3, 20])?,
        };
        // Roughly how long a fault-free run lasts (as the swarm reckons it).
        let batch_size = match workload {
            Workload::W1 { batch_size, .. } => batch_size,
            Workload::W2(o) | Workload::W3(o) | Workload::W4 { options: o, .. } => o.batch_size,
            Workload::W2Idle(..) | Workload::W3Idle(..) | Workload::W5 { .. } => unreachable!("not drawn"),
        } as u64;
        let batches = workload.record_count().div_ceil(batch_size);
        let steps = batches.div_ceil(u64::from(node_count)) * 1_000_000 / u64::from(network.step_ppm);
        let duration_ms = (steps * network.tick_ms).max(20);
        let faults = fault_plan(u, node_count, duration_ms)?;
        let liveness_ms = duration_ms * 40 + 20_000;
        // Last: with the bytes used up, it is 0, and the world above stays what the bytes say.
        let seed = u64::arbitrary(u)?;
        Ok(Input(Scenario { seed, workload, node_count, checkpoints, network, faults, liveness_ms }))
    }
}

/// The job's output without faults and without checkpoints (`run_in_memory`).
fn reference(scenario: &Scenario) -> Vec<Row> {
    let plan = scenario.workload.plan(scenario.node_count);
    let sinks = plan.graph.file_sinks();
    let mut run = run_in_memory(plan).expect("the reference run");
    let mut batches = Vec::new();
    for sink in &sinks {
        batches.extend(run.committed(sink).expect("the reference run's output"));
    }
    oracle::rows_of(&batches).expect("the reference rows")
}

fuzz_target!(|input: Input| {
    let scenario = input.0;
    let reference = oracle::Expected::Rows(reference(&scenario));
    let run = cluster::run(&scenario.cluster_config(false), FaultStorage::new(FaultDisk::new(scenario.seed)));
    let verdict = oracle::judge(&run, &reference);
    assert!(!verdict.is_failure(), "{verdict:?}\nstats {:?}\n{scenario}", run.stats);
    // The sampled checkpoint, as a power loss right after it completed left the disk, restarted
    // from without faults: a consistent cut commits exactly the reference too.
    let config = scenario.without_faults().cluster_config(false);
    for (checkpoint, disk) in run.cut_samples {
        let restart = cluster::run(&config, FaultStorage::new(disk));
        match oracle::judge(&restart, &reference) {
            Verdict::ExactlyOnce | Verdict::RefusedCorrectly { .. } => {}
            // The damage was done before the sample: the restart's disk carries it.
            Verdict::Failed(Failure { check, .. })
                if check == "refuses only after durable damage" && run.durable_damage => {}
            Verdict::Failed(failure) => {
                panic!("restart from checkpoint {} failed: {failure:?}\n{scenario}", checkpoint.0)
            }
        }
    }
});
