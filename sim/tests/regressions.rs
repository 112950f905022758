//! One fixed seed per bug the simulator found, each failing before its fix (checked by reverting
//! the fix and sweeping: the seed below is the first that failed). Each bug also has a test at the
//! lowest level that shows it, named in its comment.

use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::oracle::Verdict;

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
