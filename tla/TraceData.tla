---- MODULE TraceData ----
\* An example for tla/Trace.tla: a run that restores from checkpoint 1 after a crash.
\* `sabot-sim trace-tla` writes this module with real runs' traces (tla/validate-traces.sh).

Traces == <<
[seed |-> 0, tasks |-> 2, concurrent |-> 1,
  events |-> <<
    [k |-> "start", r |-> 0, skipped |-> {}],
    [k |-> "started"],
    [k |-> "trigger", n |-> 1],
    [k |-> "ack", n |-> 1, task |-> 0, off |-> <<<<1, 128>>>>, files |-> {}],
    [k |-> "ack", n |-> 1, task |-> 1, off |-> <<>>, files |-> {1}],
    [k |-> "persisted", n |-> 1],
    [k |-> "complete", n |-> 1],
    [k |-> "trigger", n |-> 2],
    [k |-> "crash", power |-> TRUE],
    [k |-> "start", r |-> 1, skipped |-> {}],
    [k |-> "commit", file |-> 1],
    [k |-> "started"],
    [k |-> "trigger", n |-> 2],
    [k |-> "ack", n |-> 2, task |-> 0, off |-> <<<<1, 300>>>>, files |-> {}],
    [k |-> "ack", n |-> 2, task |-> 1, off |-> <<>>, files |-> {2}],
    [k |-> "persisted", n |-> 2],
    [k |-> "complete", n |-> 2],
    [k |-> "commit", file |-> 2]>>]
>>
====
