//! One fixed seed per bug the simulator found, each failing before its fix (checked by reverting
//! the fix and sweeping: the seed below is the first that failed). Each bug also has a test at the
//! lowest level that shows it, named in its comment.

use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::oracle::Verdict;
use sabot_sim::swarm::{Scenario, SwarmLimits};

fn passes(seed: u64) {
    let options = RunOptions::default();
    println!("seed {seed}; replay: {}", options.replay_command(seed));
    let report = run_seed(seed, &options);
    assert!(!report.verdict.is_failure(), "{}", report.summary(&options));
    assert!(matches!(report.verdict, Verdict::ExactlyOnce | Verdict::RefusedCorrectly { .. }));
}

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
