//! The protocol trace the TLA+ trace validation reads (tla/validate-traces.sh runs TLC on it).

use sabot_kernel::testing::cluster::ProtocolEvent;
use sabot_sim::kernel_level::{run_seed, RunOptions};
use sabot_sim::trace_tla::{module, TraceCounts};

// Goal: a traced run keeps its protocol events, with a crash and a restore where the seed's faults
// strike, and they render as the module tla/Trace.tla extends. Method: seed 0, whose faults crash the job
// and restore it (`sabot-sim trace-tla --seed 0 --out DIR` writes its trace).
#[test]
fn traced_run_keeps_protocol_events() {
    let report = run_seed(0, &RunOptions { trace: true, ..RunOptions::default() });
    let counts = TraceCounts::of(&report.protocol);
    println!("seed 0: {counts:?}");
    assert!(counts.crashes > 0 && counts.restores > 0, "{counts:?}");
    assert!(matches!(report.protocol.first(), Some(ProtocolEvent::Start { restored: None, .. })));
    let tla = module(std::slice::from_ref(&report));
    assert!(tla.starts_with("---- MODULE TraceData ----") && tla.contains("[k |-> \"complete\", n |-> 1]"));
    let untraced = run_seed(0, &RunOptions::default());
    assert!(untraced.protocol.is_empty());
    assert_eq!(untraced.trace_hash, report.trace_hash, "tracing changes nothing in the run");
}
