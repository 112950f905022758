//! W5, windows on processing time, in the simulator: its seeds with faults pass the per-key
//! totals oracle, and the oracle rejects output with a record lost or counted twice.

use sabot_kernel::env::fault_storage::{FaultDisk, FaultStorage};
use sabot_kernel::testing::cluster::{self, FaultEvent, Outcome};
use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::oracle::{self, Expected, Row, Verdict};
use sabot_sim::swarm::{Scenario, SwarmLimits, Workload};

/// FNV-1a (64 bits) of a text.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// W5 seeds with crashes and restores from checkpoints, one per kind of window, each with the
/// FNV-1a hash of its scenario's text when it was pinned (so that it keeps its world).
const SEEDS: [(u64, &str, u64); 3] = [
    (676, "W5-tumbling-windows", 0x8dd6_5c1d_fb04_15f2),
    (430, "W5-sliding-windows", 0x5a96_72e0_5fac_6d24),
    (7, "W5-session-windows", 0xe2eb_c20a_743d_bc5e),
];

/// The scenario of `seed`, its fault run's committed rows (sorted) and its outcome, and the
/// totals its output must meet.
fn fault_run(seed: u64) -> (Scenario, Vec<Row>, Outcome, Expected, usize) {
    let scenario = Scenario::from_seed(seed, SwarmLimits::default());
    let run = cluster::run(&scenario.cluster_config(false), FaultStorage::new(FaultDisk::new(seed)));
    let committed = oracle::committed_rows(&run.storage, &run.file_sinks).unwrap();
    let files = run.storage.disk().peek_list("output/w5").iter().filter(|f| f.ends_with(".arrow")).count();
    let expected = Expected::Totals(scenario.workload.totals().expect("a W5 seed"));
    (scenario, committed, run.outcome, expected, files)
}

// Goal: windows on processing time come through crashes, power losses and clock jumps exactly
// once: per key, the committed counts and sums total what the input gives, in the run with
// faults and in the restart from a kept checkpoint; and windows fire while the input flows,
// not only at its end. Method: a pinned seed per kind of window (its world checked by hash),
// each with a crash or power loss and restores from checkpoints; the output committed in more
// files than there are window subtasks (a file per subtask and checkpoint that had rows).
#[test]
fn w5_seeds_with_crashes_pass_the_totals_oracle() {
    let options = RunOptions::default();
    for (seed, name, hash) in SEEDS {
        println!("seed {seed}; replay: {}", options.replay_command(seed));
        let scenario = Scenario::from_seed(seed, SwarmLimits::default());
        assert_eq!(fnv(&scenario.to_string()), hash, "seed {seed} now draws another world:\n{scenario}");
        assert_eq!(scenario.workload.name(), name, "seed {seed}");
        let report = run_seed(seed, &options);
        assert_eq!(report.verdict, Verdict::ExactlyOnce, "{}", report.summary(&options));
        let crashes = report
            .plan_faults
            .iter()
            .filter(|(_, event)| matches!(event, FaultEvent::PowerLoss | FaultEvent::NodeCrash { .. }))
            .count();
        assert!(crashes > 0 && report.stats.restored_from_checkpoint > 0, "{}", report.summary(&options));
        assert!(!report.cuts_checked.is_empty(), "seed {seed}: a restart from a kept checkpoint was checked");
        let (_, _, _, _, files) = fault_run(seed);
        let Workload::W5 { options: w5, .. } = scenario.workload else { unreachable!("{name}") };
        println!(
            "seed {seed}: {} restores, {crashes} crashes, {} committed files",
            report.stats.restored_from_checkpoint, files
        );
        assert!(files > usize::from(w5.parallelism), "seed {seed}: {files} committed files");
    }
}

// Goal: the totals oracle rejects output with a record lost or counted twice, whatever windows
// the rows name, and accepts rows that only moved between windows (timing may do that). Method:
// the committed rows of a W5 run with faults, judged as they are, with a row removed, with a
// row repeated, and with a row's window moved; and, as after a refusal on durable damage, the
// repeated row is wrong output and the removed one is not.
#[test]
fn totals_oracle_rejects_doctored_output() {
    let (seed, _, _) = SEEDS[0];
    let (_, committed, outcome, expected, _) = fault_run(seed);
    assert_eq!(outcome, Outcome::Finished);
    let judge = |rows: &[Row]| {
        let mut rows = rows.to_vec();
        rows.sort_unstable();
        oracle::judge_committed(&Outcome::Finished, false, &rows, &expected)
    };
    assert_eq!(judge(&committed), Verdict::ExactlyOnce);
    let removed: Vec<Row> = committed[1..].to_vec();
    let repeated: Vec<Row> = committed.iter().chain(&committed[..1]).cloned().collect();
    let mut moved = committed.clone();
    moved[0][1] -= 1_000;
    moved[0][2] -= 1_000;
    assert_eq!(judge(&moved), Verdict::ExactlyOnce, "rows may name other windows");
    for (doctored, what) in [(&removed, "below their totals"), (&repeated, "above their totals")] {
        match judge(doctored) {
            Verdict::Failed(failure) => {
                assert_eq!(failure.check, "exactly once");
                assert!(failure.detail.contains(what), "{}", failure.detail);
            }
            other => panic!("doctored output ({what}) judged {other:?}"),
        }
    }
    let refused = Outcome::Refused { error: "a damaged checkpoint".into() };
    let mut sorted = repeated.clone();
    sorted.sort_unstable();
    let verdict = oracle::judge_committed(&refused, true, &sorted, &expected);
    assert!(matches!(&verdict, Verdict::Failed(f) if f.check == "no wrong output before a refusal"), "{verdict:?}");
    let verdict = oracle::judge_committed(&refused, true, &removed, &expected);
    assert!(matches!(verdict, Verdict::RefusedCorrectly { .. }), "{verdict:?}");
}
