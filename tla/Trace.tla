------------------------------- MODULE Trace -------------------------------
(***************************************************************************)
(* Trace validation: is a simulator run a behaviour of the checkpoint      *)
(* protocol? (tla/README.md, "Trace validation")                          *)
(*                                                                         *)
(* This is a PROJECTION of the protocol of Checkpoint.tla onto what the    *)
(* harness (kernel/src/testing/cluster.rs, ProtocolEvent) can observe of   *)
(* a real job: the coordinator (trigger, acknowledgements with source      *)
(* offsets, persist, completion, abort, subsumption), the sinks'           *)
(* two-phase commit (which files a checkpoint names, which files become    *)
(* visible) and recovery (crash, restore from a checkpoint). It does not   *)
(* INSTANCE Checkpoint: the simulator's jobs have many tasks, batches,     *)
(* windows and hundreds of checkpoints, which the full model's data        *)
(* abstraction (one task, per-record outputs) cannot follow. The           *)
(* conditions are Checkpoint.tla's action guards and invariants restated   *)
(* for the projection; each is named where it rejects.                     *)
(*                                                                         *)
(* Each trace is a sequence of events; the state machine steps i        *)
(* through it, and an event whose protocol condition fails sets err to the *)
(* condition's name. A trace is accepted if err stays "ok" to the end:     *)
(* TLC checks TraceAccepted for every trace of Traces (the initial state  *)
(* picks the trace; each trace has exactly one behaviour).                 *)
(***************************************************************************)
\* TraceData defines Traces == << [seed |-> s, tasks |-> k, concurrent |-> c, events |-> << e1, ... >>], ... >>
\* `sabot-sim trace-tla` writes it; tla/TraceData.tla is a small example. (A definition, not a
\* CONSTANT substituted in the cfg: TLC re-evaluates a substituted constant at every use, which
\* made checking six times slower.)
EXTENDS Integers, Sequences, FiniteSets, TraceData

VARIABLES
    t,           \* which trace
    i,           \* the next event
    err,         \* "ok", or the name of the condition an event broke
    phase,       \* "down", "restoring" (Start seen, Started not yet), "running"
    status,      \* status[n]: "none", "pending", "persisting", "persisted", "completed", "aborted", "lost"
    acked,       \* acked[n]: tasks whose acknowledgement of n the coordinator took
    off,         \* off[n]: <<split, position>> pairs the sources acknowledged n with
    named,       \* named[n]: sink files the snapshots of n name for commit (pending_output)
    persisted,   \* checkpoints whose manifest and pointer were made durable
    maybe,       \* checkpoints whose persist failed part way (maybe durable)
    completed,   \* checkpoints announced complete (any attempt)
    restoredAll, \* checkpoints some attempt restored from
    restored,    \* the checkpoint this attempt restored from, 0 if none
    base,        \* offsets of the newest checkpoint completed or restored in this attempt
    committed,   \* sink files visible
    damaged,     \* checkpoint metadata was damaged on purpose (corruption, misdirected write)
    idMax        \* the highest checkpoint id triggered in this attempt or seen by its recovery

vars == <<t, i, err, phase, status, acked, off, named, persisted, maybe, completed,
          restoredAll, restored, base, committed, damaged, idMax>>
coordVars == <<status, acked, off, named>>
storeVars == <<persisted, maybe, completed, restoredAll, restored, base, committed, damaged, idMax>>

E == Traces[t].events
Max(S) == CHOOSE x \in S : \A y \in S : x >= y
\* Every checkpoint id a trace names.
IdsOf(tr) ==
    LET evs == {Traces[tr].events[j] : j \in DOMAIN Traces[tr].events}
    IN {e.n : e \in {x \in evs : x.k \in {"trigger", "ack", "persisted", "pfailed", "complete", "abort"}}}
       \union UNION {{e.r} \union e.skipped : e \in {x \in evs : x.k = "start"}}
IdMax(tr) == Max(IdsOf(tr) \union {0})
Ids == 1..IdMax(t)
InFlight == {n \in DOMAIN status : status[n] \in {"pending", "persisting"}}
\* Offsets a at least offsets b, split by split (splits in both).
Geq(a, b) == \A p \in b : \A q \in a : q[1] = p[1] => q[2] >= p[2]

Init ==
    /\ t \in DOMAIN Traces
    /\ i = 1
    /\ err = "ok"
    /\ phase = "down"
    /\ status = [n \in Ids |-> "none"]
    /\ acked = [n \in Ids |-> {}]
    /\ off = [n \in Ids |-> {}]
    /\ named = [n \in Ids |-> {}]
    /\ persisted = {} /\ maybe = {} /\ completed = {} /\ restoredAll = {}
    /\ restored = 0 /\ base = {} /\ committed = {} /\ damaged = FALSE /\ idMax = 0

Reject(name) == err' = name /\ UNCHANGED <<phase, coordVars, storeVars>>

-----------------------------------------------------------------------------
(* Recovery (Checkpoint.tla CrashRestore; manifest::find_latest, Node::restore,  *)
(* TwoPhaseCommitSink::restore).                                           *)

\* A crash, a task's failure or a power loss: the attempt and the coordinator's state are lost.
\* Storage keeps what was synced: persist syncs the manifest and the pointer.
Crash ==
    /\ phase' = "down"
    /\ status' = [n \in DOMAIN status |-> (IF status[n] \in {"pending", "persisting", "persisted"} THEN "lost" ELSE status[n])]
    /\ err' = "ok"
    /\ UNCHANGED <<acked, off, named, storeVars>>

\* Recovery restores from the newest durable completed checkpoint (the pointer's), passing over
\* a newer one only when it says so (a newer manifest the pointer does not name, or damage).
Start(e) ==
    LET r == e.r IN
    IF phase # "down" THEN Reject("StartOnlyAfterCrash")
    ELSE IF r # 0 /\ r \notin persisted \union maybe THEN Reject("RestoreOnlyDurable")
    ELSE IF \E p \in persisted : p > r /\ p \notin e.skipped THEN Reject("RestoreNewestDurable")
    ELSE IF \E p \in persisted \cap e.skipped : ~damaged THEN Reject("SkipDurableOnlyAfterDamage")
    ELSE /\ err' = "ok"
         /\ phase' = "restoring"
         /\ restored' = r
         /\ restoredAll' = (restoredAll \union {r}) \ {0}
         /\ base' = (IF r = 0 THEN {} ELSE off[r])
         /\ idMax' = Max({r} \union e.skipped)   \* Coordinator::new, continue_after
         /\ UNCHANGED <<coordVars, persisted, maybe, completed, committed, damaged>>

\* The restore is done: every file the restored checkpoint names is visible (the sink commits
\* them before it recovers; Checkpoint.tla InvNoLoss, InvRecordsAccounted).
Started ==
    IF phase # "restoring" THEN Reject("StartedOnlyAfterStart")
    ELSE IF restored # 0 /\ ~(named[restored] \subseteq committed) THEN Reject("RestoreCommitsNamed")
    ELSE err' = "ok" /\ phase' = "running" /\ UNCHANGED <<coordVars, storeVars>>

Damage == err' = "ok" /\ damaged' = TRUE /\ UNCHANGED <<phase, coordVars, persisted, maybe, completed,
                                                      restoredAll, restored, base, committed, idMax>>

-----------------------------------------------------------------------------
(* The coordinator (Checkpoint.tla Trigger, AckSource/AckTask, PersistWrite/Sync/Pointer, Abort). *)

Trigger(e) ==
    LET n == e.n IN
    IF phase # "running" THEN Reject("TriggerOnlyWhileRunning")
    ELSE IF n <= idMax THEN Reject("IdsIncrease")
    ELSE IF n \in persisted THEN Reject("IdNeverReusesDurable")
    ELSE IF Cardinality(InFlight) >= Traces[t].concurrent THEN Reject("ConcurrentMax")
    ELSE /\ err' = "ok"
         /\ status' = [status EXCEPT ![n] = "pending"]
         \* An id a lost attempt used (never durable) is used again: a new checkpoint.
         /\ acked' = [acked EXCEPT ![n] = {}]
         /\ off' = [off EXCEPT ![n] = {}]
         /\ named' = [named EXCEPT ![n] = {}]
         /\ maybe' = maybe \ {n}
         /\ idMax' = n
         /\ UNCHANGED <<phase, persisted, completed, restoredAll, restored, base, committed, damaged>>

\* Taken only while n is pending (acks of aborted, subsumed or lost checkpoints are ignored);
\* a source's offsets never go back behind the checkpoint this attempt continues from.
Ack(e) ==
    LET n == e.n
        pairs == {e.off[j] : j \in DOMAIN e.off}
    IN
    IF phase # "running" THEN Reject("AckOnlyWhileRunning")
    ELSE IF status[n] # "pending" THEN err' = "ok" /\ UNCHANGED <<phase, coordVars, storeVars>>
    ELSE IF e.task \in acked[n] THEN Reject("AckOnce")
    ELSE IF ~Geq(pairs, base) THEN Reject("OffsetsNotBehindRestored")
    ELSE /\ err' = "ok"
         /\ acked' = [acked EXCEPT ![n] = @ \union {e.task}]
         /\ off' = [off EXCEPT ![n] = @ \union pairs]
         /\ named' = [named EXCEPT ![n] = @ \union e.files]
         /\ status' = [status EXCEPT ![n] =
                         (IF Cardinality(acked'[n]) = Traces[t].tasks THEN "persisting" ELSE "pending")]
         /\ UNCHANGED <<phase, storeVars>>

\* manifest::persist: only once every task acknowledged.
Persisted(e) ==
    LET n == e.n IN
    IF status[n] # "persisting" THEN Reject("PersistOnlyAllAcked")
    ELSE /\ err' = "ok"
         /\ status' = [status EXCEPT ![n] = "persisted"]
         /\ persisted' = persisted \union {n}
         /\ UNCHANGED <<phase, acked, off, named, maybe, completed, restoredAll, restored, base, committed,
                        damaged, idMax>>

PersistFailed(e) ==
    LET n == e.n IN
    IF status[n] # "persisting" THEN Reject("PersistOnlyAllAcked")
    ELSE /\ err' = "ok"
         /\ maybe' = maybe \union {n}
         /\ UNCHANGED <<phase, coordVars, persisted, completed, restoredAll, restored, base, committed,
                        damaged, idMax>>

\* Announced only once durable (Checkpoint.tla InvNothingVisibleEarly, announce_before_durable);
\* older pending checkpoints are subsumed; completed checkpoints' offsets never go back.
Complete(e) ==
    LET n == e.n IN
    IF phase # "running" THEN Reject("CompleteOnlyWhileRunning")
    ELSE IF ~(n \in persisted /\ status[n] = "persisted") THEN Reject("AnnounceOnlyDurable")
    ELSE IF ~Geq(off[n], base) THEN Reject("CompletedOffsetsMonotone")
    ELSE /\ err' = "ok"
         /\ status' = [m \in DOMAIN status |-> (IF m = n THEN "completed"
                                      ELSE IF m < n /\ status[m] \in {"pending", "persisting"} THEN "aborted"
                                      ELSE status[m])]
         /\ completed' = completed \union {n}
         /\ base' = off[n]
         /\ UNCHANGED <<phase, acked, off, named, persisted, maybe, restoredAll, restored, committed, damaged,
                        idMax>>

Abort(e) ==
    LET n == e.n IN
    IF status[n] \notin {"pending", "persisting"} THEN Reject("AbortOnlyInFlight")
    ELSE /\ err' = "ok"
         /\ status' = [status EXCEPT ![n] = "aborted"]
         /\ UNCHANGED <<phase, acked, off, named, storeVars>>

-----------------------------------------------------------------------------
(* The sinks (Checkpoint.tla SinkCommit, PreCommit; TwoPhaseCommitSink).    *)

\* A file becomes visible only if a checkpoint announced complete, or restored from, names it
\* (Checkpoint.tla InvNothingVisibleEarly, commit_before_complete), and only once.
Commit(e) ==
    IF phase = "down" THEN Reject("CommitOnlyByAnAttempt")
    ELSE IF e.file \in committed THEN Reject("CommitOnce")
    ELSE IF ~\E c \in completed \union restoredAll : e.file \in named[c] THEN Reject("CommitOnlyCompleted")
    ELSE /\ err' = "ok"
         /\ committed' = committed \union {e.file}
         /\ UNCHANGED <<phase, coordVars, persisted, maybe, completed, restoredAll, restored, base, damaged,
                        idMax>>

-----------------------------------------------------------------------------
Step(e) ==
    CASE e.k = "start" -> Start(e)
      [] e.k = "started" -> Started
      [] e.k = "trigger" -> Trigger(e)
      [] e.k = "ack" -> Ack(e)
      [] e.k = "persisted" -> Persisted(e)
      [] e.k = "pfailed" -> PersistFailed(e)
      [] e.k = "complete" -> Complete(e)
      [] e.k = "abort" -> Abort(e)
      [] e.k = "commit" -> Commit(e)
      [] e.k = "crash" -> Crash
      [] e.k = "damage" -> Damage

Next ==
    \/ /\ err = "ok" /\ i <= Len(E)
       /\ Step(E[i])
       /\ i' = i + 1 /\ UNCHANGED t
    \/ /\ err # "ok" \/ i > Len(E)
       /\ UNCHANGED vars

Spec == Init /\ [][Next]_vars

\* The trace is a behaviour of the protocol (projection): no event broke a condition.
TraceAccepted == err = "ok"

=============================================================================
