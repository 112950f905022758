//! The simulator finds every planted bug: each one switched on, a sweep finds a failing seed.

use sabot_kernel::testing::planted::PlantedBug;
use sabot_sim::kernel_level::RunOptions;
use sabot_sim::sweep::{sweep, SweepOptions};

/// The sweep must find each bug within this many seeds (the bound).
const SEEDS_MAX: u64 = 1_000;

// Goal: each planted bug (sink commits early, barriers not aligned, recovery forgets the commit,
// snapshots without fsync, source offset after the barrier, completion announced before it is
// durable, an idle source forgetting its watermark) makes some seed fail, well within SEEDS_MAX seeds, and the failure says which check
// caught it. Method: a sweep per bug that stops at its first failure; the seeds it took are
// printed (`sabot-sim sweep --seeds 0..1000 --planted <bug> --stop-at-first-failure` replays it).
#[test]
fn every_planted_bug_is_found() {
    for bug in PlantedBug::ALL {
        let options = SweepOptions {
            seeds: 0..SEEDS_MAX,
            jobs: 1,
            run: RunOptions { planted: vec![bug], ..RunOptions::default() },
            determinism: false,
            progress: false,
            stop_at_first_failure: true,
        };
        let result = sweep(&options);
        let first =
            result.failures.first().unwrap_or_else(|| panic!("{}: no failing seed in 0..{SEEDS_MAX}", bug.name()));
        println!(
            "{:<28} found at seed {} ({} seeds) by '{}': {}\n    replay: {}",
            bug.name(),
            first.seed,
            first.seed + 1,
            first.failure.check,
            first.failure.detail.chars().take(140).collect::<String>(),
            first.replay
        );
    }
}
