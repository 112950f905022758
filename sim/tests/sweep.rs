//! The CI sweep of the kernel-level simulator, and its determinism.

use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::sweep::{sweep, SweepOptions};

/// Seeds of the CI sweep: small workloads (`SwarmLimits::default()`), a few seconds in debug.
const CI_SEEDS: std::ops::Range<u64> = 0..240;

// Goal: across a swarm of worlds (topologies, workloads, checkpoint settings, network
// behaviour, crashes, power losses, disk faults, clock skew, sources whose splits stall, go idle
// and are paused by alignment), every run is exactly once, or refuses correctly after durable
// damage; none breaks an invariant, panics or hangs.
// Method: the seeds of CI_SEEDS on two threads; each failure prints the command that replays it.
#[test]
fn ci_sweep_finds_no_failure() {
    let options = SweepOptions {
        seeds: CI_SEEDS,
        jobs: 2,
        run: RunOptions::default(),
        determinism: false,
        progress: false,
        stop_at_first_failure: false,
    };
    let result = sweep(&options);
    println!(
        "{} seeds in {:.1} s: {:.0} seeds/min per core, {:.1} virtual s per wall s, {} refused correctly",
        result.seeds_run,
        result.wall.as_secs_f64(),
        result.seeds_per_minute_per_core(),
        result.virtual_seconds_per_wall_second(),
        result.refused_correctly
    );
    println!(
        "watermarks in sources: {} seeds, {} with a source gone idle, {} with splits paused by alignment",
        result.split_watermark_seeds, result.seeds_with_idle_sources, result.seeds_with_paused_splits
    );
    assert_eq!(result.seeds_run, CI_SEEDS.end - CI_SEEDS.start);
    assert!(result.failures.is_empty(), "failing seeds:\n{}", result.failure_table());
    // The worlds with watermarks made in sources really go idle and pause splits.
    assert!(result.seeds_with_idle_sources > 10 && result.seeds_with_paused_splits > 5, "{result:?}");
}

// Goal: a seed is a complete description of a run: run twice, it gives the same trace hash
// (and the same verdict); other seeds give other hashes. Method: a few seeds, each twice.
#[test]
fn a_seed_replays_bit_for_bit() {
    let options = RunOptions::default();
    let mut hashes = Vec::new();
    for seed in [0, 7, 42, 1_000_003] {
        println!("seed {seed} (replay: {})", options.replay_command(seed));
        let first = run_seed(seed, &options);
        let second = run_seed(seed, &options);
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed}");
        assert_eq!(first.verdict, second.verdict, "seed {seed}");
        assert_eq!(first.stats, second.stats, "seed {seed}");
        hashes.push(first.trace_hash);
    }
    hashes.sort_unstable();
    hashes.dedup();
    assert_eq!(hashes.len(), 4, "different seeds, different runs");
}

// Goal: the swarm really injects what it claims: over the CI seeds, every kind of plan fault
// and of disk fault strikes, runs restore from checkpoints, and unaligned snapshots store
// in-flight data. Method: sum the reports of a slice of the seeds.
#[test]
fn the_swarm_injects_every_fault() {
    let options = RunOptions::default();
    let mut disk = std::collections::BTreeSet::new();
    let mut plan = std::collections::BTreeSet::new();
    let (mut restored, mut in_flight, mut cuts) = (0, 0, 0);
    for seed in 0..120 {
        let report = run_seed(seed, &options);
        disk.extend(report.disk_faults.keys().copied());
        plan.extend(
            report
                .plan_faults
                .iter()
                .map(|(_, event)| format!("{event:?}").split([' ', '{']).next().unwrap().to_string()),
        );
        restored += report.stats.restored_from_checkpoint;
        in_flight += report.stats.in_flight_acks;
        cuts += report.cuts_checked.len();
    }
    println!(
        "disk faults {disk:?}, plan faults {plan:?}, {restored} restores, {in_flight} in-flight acks, {cuts} cuts"
    );
    for kind in
        ["read error", "read corruption", "write error", "misdirected write", "fsync error", "disk full", "power loss"]
    {
        assert!(disk.contains(kind), "{kind} never injected: {disk:?}");
    }
    for kind in ["PowerLoss", "NodeCrash", "DiskFull", "CorruptNewestCheckpoint", "CorruptPointer", "ClockJump"] {
        assert!(plan.contains(kind), "{kind} never happened: {plan:?}");
    }
    assert!(
        restored > 50 && in_flight > 10 && cuts > 50,
        "{restored} restores, {in_flight} in-flight acks, {cuts} cuts"
    );
}
