//! One fixed seed per bug the simulator found, each failing before its fix (checked by reverting
//! the fix and sweeping: the seed below is the first that failed), and one fixed world per bug the
//! `cluster` fuzz target found (the scenario its input drew, failing before the fix). Each bug also
//! has a test at the lowest level that shows it, named in its comment.

use sabot_kernel::dataflow::event_window::WindowKind;
use sabot_kernel::env::fault_storage::FaultConfig;
use sabot_kernel::testing::cluster::{CheckpointSettings, FaultEvent, FaultPlan, NetworkSettings};
use sabot_kernel::workload::{Keys, W2Options};
use sabot_sim::kernel_level::{run_scenario, run_seed, RunOptions};
use sabot_sim::oracle::Verdict;
use sabot_sim::swarm::{Scenario, SwarmLimits, Workload};

fn passes(seed: u64) {
    let options = RunOptions::default();
    println!("seed {seed}; replay: {}", options.replay_command(seed));
    let report = run_seed(seed, &options);
    assert!(!report.verdict.is_failure(), "{}", report.summary(&options));
    assert!(matches!(report.verdict, Verdict::ExactlyOnce | Verdict::RefusedCorrectly { .. }));
}

/// A world the `cluster` fuzz target drew (its debug form, as the fuzz target's trace prints it),
/// which must pass, still being the world the bug was found in (`found` is in its trace).
fn passes_world(scenario: Scenario, found: &str) {
    let options = RunOptions { trace: true, ..RunOptions::default() };
    println!("{scenario:?}");
    let report = run_scenario(scenario, &options);
    assert_eq!(report.verdict, Verdict::ExactlyOnce, "{}", report.summary(&options));
    assert!(
        report.trace.iter().any(|line| line.contains(found)),
        "the world is no longer the one the bug was found in ({found:?} not in the trace): {:?}",
        report.trace
    );
}

fn checkpoints(interval_ms: u64, timeout_ms: u64, concurrent_max: usize) -> CheckpointSettings {
    let (unaligned, alignment_timeout_ms, retained_count) = (true, None, 1);
    CheckpointSettings { interval_ms, unaligned, alignment_timeout_ms, timeout_ms, concurrent_max, retained_count }
}

fn network(tick_ms: u64, delay_ms_max: u64, channel_capacity: usize) -> NetworkSettings {
    let (step_ppm, write_delay_ms_max, persist_delay_ms_max) = (400_000, 0, 0);
    NetworkSettings { tick_ms, delay_ms_max, channel_capacity, step_ppm, write_delay_ms_max, persist_delay_ms_max }
}

/// The disk faults of the fuzz target's worlds with disk trouble.
const FAULTY_DISK: FaultConfig = FaultConfig {
    read_error_ppm: 522,
    read_corrupt_ppm: 2_514,
    write_error_ppm: 2_514,
    misdirect_ppm: 0,
    sync_error_ppm: 2_514,
    torn_ppm: 777_199,
};

// Goal: after a restore the input watermark climbs again from below the window's restored one;
// the window panicked ('watermark … after …'). Lower level: window.rs
// `restored_window_takes_a_lower_watermark`.
#[test]
fn restored_window_takes_a_lower_watermark() {
    passes(0);
}

// Goal: a checkpoint commits every epoch prepared up to it but named only its own; with an
// earlier checkpoint subsumed, its epoch's output was committed without any completed checkpoint
// naming it, and a crash before the commit lost it. Lower level: sink.rs
// `a_checkpoint_names_every_epoch_it_commits`.
#[test]
fn subsumed_epoch_output_is_kept_by_the_next_checkpoint() {
    passes(41);
}

// Goal: recovery passed over the newest checkpoint and the next attempt reused its id; its old
// manifest, still named by the pointer, later restored a mix of two cuts (rows lost). Lower
// level: manifest.rs `checkpoint_ids_continue_after_a_passed_over_checkpoint`.
#[test]
fn checkpoint_ids_never_repeat_after_a_passed_over_checkpoint() {
    passes(1_162);
}

// Goal: an unaligned checkpoint's replayed in-flight watermarks sat above the ones the restarted
// generators send again, and every restart from it failed with 'watermark went back' (the job
// could never recover from a correct checkpoint).
#[test]
fn unaligned_restore_takes_watermarks_again() {
    passes(26);
}

// Goal: a finished task whose barrier came before the coordinator's trigger acknowledged the
// checkpoint twice. Lower level: node.rs `trigger_after_the_barrier_acknowledges_once`.
#[test]
fn trigger_after_the_barrier_acknowledges_once() {
    passes(1_983);
}

// Goal: aborting a checkpoint deleted the final-snapshot files that later checkpoints carry; the
// next checkpoint completed naming a missing file and no recovery could use it. Lower level:
// coordinator.rs `aborted_checkpoint_keeps_the_final_snapshot`.
#[test]
fn aborted_checkpoint_keeps_the_final_snapshot() {
    passes(253);
}

// Goal: a recovery passed over the newest checkpoint (a read of one of its files failed) and
// restored an older one, whose sinks dropped the newer one's pending output; that attempt failed
// too, the next recovery read the newer checkpoint and restored it, and every restart failed on
// its missing output ('storage path … not found'). Lower level: manifest.rs
// `recovery_never_returns_to_a_passed_over_checkpoint`.
#[test]
fn recovery_never_returns_to_a_passed_over_checkpoint() {
    passes(9_242);
}

// Goal: a task restored from its final snapshot ran to its end again and wrote the same
// final-snapshot file after its next checkpoint had completed without it; retention then discarded
// the restored checkpoint together with that file, and every later checkpoint completed naming a
// file that was gone: a restart from the last of them (as a power loss right after it would leave
// the disk) could use none of them. Found by the `cluster` fuzz target; the scenario is the one
// its input drew (a power loss at 26 ms restores checkpoint 4, in which subtask 0.0 had finished).
// Lower level: coordinator.rs `retention_keeps_the_final_snapshot`.
#[test]
fn retention_keeps_the_final_snapshot_a_restored_task_writes_again() {
    let scenario = Scenario {
        seed: 0,
        workload: Workload::W1 { record_count: 102, parallelism: 2, batch_size: 1 },
        node_count: 2,
        checkpoints: checkpoints(2, 200, 1),
        network: network(3, 0, 2),
        faults: FaultPlan {
            heal_at_ms: 163,
            events: vec![
                (26, FaultEvent::PowerLoss),
                (26, FaultEvent::ClockJump { node: 2, ms: 100 }),
                (93, FaultEvent::NodeCrash { node: 1 }),
            ],
            storage: FaultConfig { misdirect_ppm: 100, ..FaultConfig::default() },
            clock_skew_ms: vec![0, 0, 0],
            restart_delay_ms_max: 0,
        },
        liveness_ms: 35_240,
    };
    passes_world(scenario, "start attempt 2 from Some(4)");
}

// Goal: the first checkpoint's manifest was durable but writing the pointer failed; the aborted
// checkpoint's files were deleted, and every restart refused to start ('misses its file'),
// though no checkpoint had completed and nothing was damaged. Found by the `cluster` fuzz target;
// the scenario is the one its input drew. Lower level: manifest.rs
// `without_a_pointer_no_checkpoint_completed`.
#[test]
fn a_first_checkpoint_that_never_completed_is_passed_over() {
    let options = W2Options {
        record_count: 146,
        source_parallelism: 1,
        parallelism: 3,
        batch_size: 3,
        out_of_orderness_ms: 0,
        window_size_ms: 10_000,
        keys: Keys::Skewed { hot: 1 },
    };
    let full = |at, full| (at, FaultEvent::DiskFull { full });
    let scenario = Scenario {
        seed: 18_446_409_615_207_825_407,
        workload: Workload::W4 { options, kind: WindowKind::Tumbling { size_ms: 50 }, allowed_lateness_ms: 25 },
        node_count: 1,
        checkpoints: checkpoints(20, 60, 1),
        network: network(1, 15, 1),
        faults: FaultPlan {
            heal_at_ms: 52,
            events: vec![
                (48, FaultEvent::NodeCrash { node: 0 }),
                full(48, true),
                full(48, true),
                full(64, false),
                full(64, false),
            ],
            storage: FAULTY_DISK,
            clock_skew_ms: vec![0, 0],
            restart_delay_ms_max: 0,
        },
        liveness_ms: 24_880,
    };
    passes_world(scenario, "persist of checkpoint 1 failed");
}

// Goal: persisting the first checkpoint failed when syncing the directory after the pointer's
// rename, so the pointer named it; the abort deleted its files, and every restart refused to
// start ('misses its file'), though nothing was damaged. Found by the `cluster` fuzz target.
// Lower level: coordinator.rs
// `a_failed_persist_keeps_the_files_until_a_newer_checkpoint_is_durable`.
#[test]
fn a_checkpoint_whose_persist_failed_keeps_its_files() {
    let options = W2Options {
        record_count: 168,
        source_parallelism: 3,
        parallelism: 3,
        batch_size: 1,
        out_of_orderness_ms: 5_000,
        window_size_ms: 10_000,
        keys: Keys::Skewed { hot: 16 },
    };
    let full = |at, full| (at, FaultEvent::DiskFull { full });
    let scenario = Scenario {
        seed: 12_876_550_765_182_713_855,
        workload: Workload::W3(options),
        node_count: 1,
        checkpoints: checkpoints(20, 60, 2),
        network: network(1, 15, 1),
        faults: FaultPlan {
            heal_at_ms: 180,
            events: vec![
                full(76, true),
                full(76, true),
                full(76, true),
                full(92, false),
                full(92, false),
                full(92, false),
            ],
            storage: FAULTY_DISK,
            clock_skew_ms: vec![0, 0],
            restart_delay_ms_max: 0,
        },
        liveness_ms: 36_800,
    };
    passes_world(scenario, "persist of checkpoint 1 failed: storage i/o error on \"checkpoints\"");
}

/// FNV-1a (64 bits) of a text.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

// Goal: the seeds above still mean the worlds they were found in. New swarm choices (such as the
// worlds with watermarks made in the source, `W2-idle`) are drawn after every earlier draw, so a
// seed they leave alone keeps its world, and these seeds take none of them. Method: each seed's
// scenario as text (topology, workload, checkpoints, network, faults), against the FNV-1a hash of
// its text when it was fixed, and its liveness bound.
#[test]
fn regression_seeds_keep_their_worlds() {
    let worlds = [
        (0, 0x47c0_9951_8219_bb10, 157_400),
        (41, 0xadc4_7734_8e71_e570, 282_600),
        (1_162, 0x4bbe_5a1c_9303_ea4d, 26_960),
        (26, 0x2a33_1495_9cb4_cd2b, 78_440),
        (1_983, 0x9261_3791_348a_d3ad, 20_800),
        (253, 0xd9fc_2039_41a0_1ec9, 38_840),
        (9_242, 0x7af9_eea7_42d6_cdbe, 60_080),
    ];
    for (seed, hash, liveness_ms) in worlds {
        let scenario = Scenario::from_seed(seed, SwarmLimits::default());
        let text = scenario.to_string();
        assert_eq!(fnv(&text), hash, "seed {seed} now draws another world:\n{text}");
        assert_eq!(scenario.liveness_ms, liveness_ms, "seed {seed}");
    }
}
