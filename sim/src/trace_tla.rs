//! Trace validation against the TLA+ model: runs' checkpoint-protocol events
//! ([`ProtocolEvent`]) written as the constant `Traces` of `tla/Trace.tla` (tla/README.md,
//! "Trace validation"), for TLC to check that each run is a behaviour of the protocol.

use std::fmt::Write as _;

use sabot_kernel::element::CheckpointId;
use sabot_kernel::testing::cluster::ProtocolEvent;

use crate::kernel_level::Report;

/// TLC's integers are 32-bit: every number in a trace must fit.
const TLA_INT_MAX: u64 = i32::MAX as u64;

/// What a trace holds, for the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceCounts {
    pub events: usize,
    /// Attempts lost to a crash, a power loss or a task's failure.
    pub crashes: usize,
    /// Attempts that restored from a checkpoint.
    pub restores: usize,
    pub commits: usize,
    pub completions: usize,
}

impl TraceCounts {
    pub fn of(events: &[ProtocolEvent]) -> TraceCounts {
        let mut counts = TraceCounts { events: events.len(), ..TraceCounts::default() };
        for event in events {
            match event {
                ProtocolEvent::Crash { .. } => counts.crashes += 1,
                ProtocolEvent::Start { restored: Some(_), .. } => counts.restores += 1,
                ProtocolEvent::Commit { .. } => counts.commits += 1,
                ProtocolEvent::Complete { .. } => counts.completions += 1,
                ProtocolEvent::Start { restored: None, .. }
                | ProtocolEvent::Started
                | ProtocolEvent::Trigger { .. }
                | ProtocolEvent::Ack { .. }
                | ProtocolEvent::Persisted { .. }
                | ProtocolEvent::PersistFailed { .. }
                | ProtocolEvent::Abort { .. }
                | ProtocolEvent::Damage => {}
            }
        }
        counts
    }
}

fn int(value: u64, what: &str) -> u64 {
    assert!(value <= TLA_INT_MAX, "{what} {value} does not fit TLC's integers");
    value
}

fn id(checkpoint: CheckpointId) -> u64 {
    int(checkpoint.0, "checkpoint id")
}

fn set(values: impl Iterator<Item = u64>) -> String {
    let items: Vec<String> = values.map(|v| v.to_string()).collect();
    format!("{{{}}}", items.join(", "))
}

/// One event as a TLA+ record (the fields `tla/Trace.tla` reads for its kind).
pub fn event_tla(event: &ProtocolEvent) -> String {
    let simple = |kind: &str, checkpoint: CheckpointId| format!("[k |-> \"{kind}\", n |-> {}]", id(checkpoint));
    match event {
        ProtocolEvent::Start { restored, skipped } => format!(
            "[k |-> \"start\", r |-> {}, skipped |-> {}]",
            restored.map_or(0, id),
            set(skipped.iter().map(|c| id(*c)))
        ),
        ProtocolEvent::Started => "[k |-> \"started\"]".into(),
        ProtocolEvent::Trigger { checkpoint } => simple("trigger", *checkpoint),
        ProtocolEvent::Ack { checkpoint, task, offsets, files } => {
            let pairs: Vec<String> = offsets
                .iter()
                .map(|(split, position)| {
                    format!("<<{}, {}>>", int(u64::from(*split), "split"), int(*position, "offset"))
                })
                .collect();
            format!(
                "[k |-> \"ack\", n |-> {}, task |-> {}, off |-> <<{}>>, files |-> {}]",
                id(*checkpoint),
                int(u64::from(*task), "task"),
                pairs.join(", "),
                set(files.iter().map(|f| u64::from(*f)))
            )
        }
        ProtocolEvent::Persisted { checkpoint } => simple("persisted", *checkpoint),
        ProtocolEvent::PersistFailed { checkpoint } => simple("pfailed", *checkpoint),
        ProtocolEvent::Complete { checkpoint } => simple("complete", *checkpoint),
        ProtocolEvent::Abort { checkpoint } => simple("abort", *checkpoint),
        ProtocolEvent::Commit { file } => format!("[k |-> \"commit\", file |-> {file}]"),
        ProtocolEvent::Crash { power } => {
            format!("[k |-> \"crash\", power |-> {}]", if *power { "TRUE" } else { "FALSE" })
        }
        ProtocolEvent::Damage => "[k |-> \"damage\"]".into(),
    }
}

/// One run as an element of `Traces`.
pub fn trace_tla(report: &Report) -> String {
    let mut out = format!(
        "[seed |-> {}, tasks |-> {}, concurrent |-> {},\n  events |-> <<",
        int(report.seed, "seed"),
        report.task_count,
        report.scenario.checkpoints.concurrent_max
    );
    for (index, event) in report.protocol.iter().enumerate() {
        let separator = if index == 0 { "\n    " } else { ",\n    " };
        let _ = write!(out, "{separator}{}", event_tla(event));
    }
    out.push_str(">>]");
    out
}

/// The module `TraceData` (which `tla/Trace.tla` extends), holding the given runs' traces.
pub fn module(reports: &[Report]) -> String {
    let traces: Vec<String> = reports.iter().map(trace_tla).collect();
    let seeds: Vec<String> = reports.iter().map(|r| r.seed.to_string()).collect();
    format!(
        "---- MODULE TraceData ----\n\\* Generated by `sabot-sim trace-tla` (seeds {}).\n\nTraces == <<\n{}\n>>\n====\n",
        seeds.join(", "),
        traces.join(",\n")
    )
}
