----------------------------- MODULE Checkpoint -----------------------------
(***************************************************************************)
(* Sabot's checkpoint protocol (shared/DESIGN.md section 4,                *)
(* kernel/src/checkpoint/mod.rs), as Flink users know it.                  *)
(*                                                                         *)
(* The job: SourceCount sources (Source in kernel/src/dataflow/source.rs), *)
(* each reading RecordCount records at offsets 1..RecordCount, each with   *)
(* a FIFO channel into one task "T" with as many inputs. T is a chain, as  *)
(* the kernel runs chains: an input gate with barrier alignment            *)
(* (checkpoint/align.rs, Aligner), a keyed operator whose state is a count *)
(* per key (the key of a record is its source), and a two-phase-commit     *)
(* sink (dataflow/sink.rs, TwoPhaseCommitSink). Processing record i of     *)
(* source s emits the output <<s, i, v>> with v the key's count after it:  *)
(* in a failure-free run v = i, so a committed value that differs from i   *)
(* is state that was restored wrongly.                                     *)
(*                                                                         *)
(* The coordinator (checkpoint/coordinator.rs, Coordinator) triggers       *)
(* checkpoints, collects acknowledgements and has the manifest made        *)
(* durable (checkpoint/manifest.rs, persist: write, sync, then replace the *)
(* _latest pointer atomically) before it announces completion.             *)
(*                                                                         *)
(* Storage keeps what was synced and loses the rest on a crash. A crash    *)
(* may strike between any two steps; the job then restarts from the       *)
(* checkpoint the pointer names (manifest.rs, find_latest; node.rs,        *)
(* restore).                                                               *)
(*                                                                         *)
(* Bug selects a known-bad variant (tla/README.md lists them); "none" is   *)
(* the protocol as it should be. It differs from the code in one point:    *)
(* a sink's snapshot names every transaction it pre-committed and has not  *)
(* committed (SnapTxns); the code names only its own epoch's, which is the *)
(* variant "sink_own_epoch_only" and loses output (tla/README.md).         *)
(***************************************************************************)
EXTENDS Integers, Sequences, FiniteSets

CONSTANTS
    SourceCount,      \* sources, each one input of T
    RecordCount,      \* records per source
    CheckpointMax,    \* checkpoint ids are 1..CheckpointMax
    ConcurrentMax,    \* CoordinatorConfig.concurrent_max
    CrashMax,         \* crashes (each followed by a restore) at most
    AbortMax,         \* coordinator aborts (timeout, persist failed) at most
    BarrierKinds,     \* subset of {"aligned", "unaligned"} the coordinator picks from
    AlignTimeout,     \* TRUE: an aligned barrier may switch to unaligned (alignment timeout)
    Watermarks,       \* TRUE: sources emit watermarks
    Bug               \* "none", or the name of a known-bad variant

Sources == 1..SourceCount
Offsets == 0..RecordCount
Ids == 1..CheckpointMax
Kinds == {"aligned", "unaligned"}
Bugs == {"none", "commit_before_complete", "no_alignment", "restore_forgets_txn",
         "announce_before_durable", "offset_after_barrier", "no_inflight",
         "sink_own_epoch_only", "watermark_kept_across_restore"}

ASSUME /\ SourceCount \in 1..3 /\ RecordCount \in 1..5
       /\ CheckpointMax \in 1..8 /\ ConcurrentMax \in 1..CheckpointMax
       /\ CrashMax \in 0..3 /\ AbortMax \in 0..3
       /\ BarrierKinds \subseteq Kinds /\ BarrierKinds # {}
       /\ AlignTimeout \in BOOLEAN /\ Watermarks \in BOOLEAN
       /\ Bug \in Bugs

VARIABLES
    \* Sources (Source::positions; Node::handle_checkpoint_trigger).
    offset,        \* offset[s]: records source s emitted (its position)
    triggers,      \* triggers[s]: <<id, kind>> triggers source s has not acted on yet
    \* Channels (env::Transport: FIFO, lost on a crash).
    chan,          \* chan[s]: elements from source s to T, oldest first
    \* Task T: input gate and aligner (align.rs), keyed state, sink (sink.rs).
    count,         \* count[s]: keyed state, records of key s processed
    wmIn,          \* wmIn[s]: the gate's watermark of input s
    wmBack,        \* a watermark went back on some input (InputGate refuses it)
    alCur,         \* Aligner.current: the checkpoint aligning, 0 if none
    alTaken,       \* Current.snapshot_taken
    alIn,          \* Aligner.inputs[s]: "open" or "barrier"
    alFin,         \* Aligner.finished: barriers of this id and older are stale, 0 if none
    snapOpen,      \* the unaligned snapshot collecting in-flight elements (UnalignedSnapshot), id 0 if none
    writing,       \* snapshots captured, being written (Event::SnapshotWrites), not yet acknowledged
    txnOpen,       \* outputs of the open transaction (FileTransactions.buffered/pending: not synced)
    prepared,      \* TwoPhaseCommitSink.prepared: handles pre-committed, not yet committed
    notified,      \* completions announced to T, not yet acted on (Command::Complete)
    sinkCovered,   \* state counts of the checkpoint T's sink last committed up to or restored
    \* Coordinator (coordinator.rs), lost on a crash.
    ckNext,        \* Coordinator.checkpoint_next
    status,        \* status[n]: "none", "pending", "persisting", "written", "synced", "completed", "aborted"
    ackSrc,        \* ackSrc[n]: sources that acknowledged n
    ackOff,        \* ackOff[n][s]: the offset source s acknowledged n with
    ackT,          \* ackT[n]: T's snapshot for n, id 0 if T has not acknowledged
    trigOff,       \* the offsets when the coordinator last triggered (see Trigger)
    aborts,        \* coordinator aborts so far
    \* Storage.
    mf,            \* mf[n]: the manifest file of checkpoint n (att = -1: none)
    mfSynced,      \* mfSynced[n]: that file is synced
    latest,        \* checkpoints/_latest: the id it names, 0 if none (atomic, durable)
    txnData,       \* txnData[h]: outputs of the pre-committed transaction h (synced, invisible)
    committed,     \* handles of committed transactions: their outputs are visible
    \* The environment and history.
    attempt,       \* job attempts so far minus one (a crash starts the next)
    crashes,       \* crashes so far
    completedHist  \* <<attempt, n>> for every checkpoint whose pointer replacement happened

vars == <<offset, triggers, chan, count, wmIn, wmBack, alCur, alTaken, alIn, alFin,
          snapOpen, writing, txnOpen, prepared, notified, sinkCovered, ckNext, status, ackSrc,
          ackOff, ackT, trigOff, aborts, mf, mfSynced, latest, txnData, committed, attempt,
          crashes, completedHist>>

srcVars == <<offset, triggers>>
taskVars == <<count, wmIn, wmBack, alCur, alTaken, alIn, alFin, snapOpen, writing>>
sinkVars == <<txnOpen, prepared, notified, sinkCovered>>
coordVars == <<ckNext, status, ackSrc, ackOff, ackT, trigOff, aborts>>
storeVars == <<mf, mfSynced, latest, txnData, committed>>
envVars == <<attempt, crashes, completedHist>>

-----------------------------------------------------------------------------
(* Values. *)

Zeros == [s \in Sources |-> 0]
NoInFlight == [s \in Sources |-> <<>>]
AllOpen == [s \in Sources |-> "open"]
\* A transaction handle: the attempt and the epoch (checkpoint id) that pre-committed it. In the
\* file sink it is the epoch's file names, which never repeat (file sequence numbers).
Handles == (0..CrashMax) \X Ids
\* A task snapshot (TaskSnapshot): keyed state, in-flight elements per input (inflight.rs), and
\* the sink's transactions to commit when the checkpoint completes (pending_output).
NoSnap == [id |-> 0, state |-> Zeros, inflight |-> NoInFlight, txns |-> {}]
\* A manifest (manifest.rs, Manifest): source offsets and T's snapshot; att = -1 means no file.
NoManifest == [att |-> -1, off |-> Zeros, state |-> Zeros, inflight |-> NoInFlight, txns |-> {}]
Active == {"pending", "persisting", "written", "synced"}
InFlightCount == Cardinality({n \in Ids : status[n] \in Active})
Min(S) == CHOOSE x \in S : \A y \in S : x <= y

\* Positions of records (not watermarks) in a sequence of elements.
RecPos(seq) == {j \in 1..Len(seq) : seq[j][1] = "R"}
\* The outputs visible to readers of the sink.
CommittedOut == UNION {txnData[h] : h \in committed}
CommittedKeys == {<<o[1], o[2]>> : o \in CommittedOut}

-----------------------------------------------------------------------------
Init ==
    /\ offset = Zeros
    /\ triggers = [s \in Sources |-> {}]
    /\ chan = [s \in Sources |-> <<>>]
    /\ count = Zeros
    /\ wmIn = Zeros
    /\ wmBack = FALSE
    /\ alCur = 0
    /\ alTaken = FALSE
    /\ alIn = AllOpen
    /\ alFin = 0
    /\ snapOpen = NoSnap
    /\ writing = {}
    /\ txnOpen = {}
    /\ prepared = {}
    /\ notified = {}
    /\ sinkCovered = Zeros
    /\ ckNext = 1
    /\ status = [n \in Ids |-> "none"]
    /\ ackSrc = [n \in Ids |-> {}]
    /\ ackOff = [n \in Ids |-> Zeros]
    /\ ackT = [n \in Ids |-> NoSnap]
    /\ trigOff = Zeros
    /\ aborts = 0
    /\ mf = [n \in Ids |-> NoManifest]
    /\ mfSynced = [n \in Ids |-> FALSE]
    /\ latest = 0
    /\ txnData = [h \in Handles |-> {}]
    /\ committed = {}
    /\ attempt = 0
    /\ crashes = 0
    /\ completedHist = {}

-----------------------------------------------------------------------------
(* The coordinator. *)

\* Coordinator::handle_timeout triggers on an interval. The model triggers only when a source
\* moved since the last trigger, or when the job is quiet and output is still uncommitted: the
\* same protocol, with finitely many ids. (With a trigger on every interval, liveness would need
\* unboundedly many.)
Quiet ==
    /\ InFlightCount = 0 /\ notified = {} /\ writing = {}
    /\ \A s \in Sources : chan[s] = <<>> /\ triggers[s] = {}
Uncommitted == txnOpen # {} \/ prepared # {}
Trigger ==
    /\ ckNext \in Ids
    /\ InFlightCount < ConcurrentMax
    /\ offset # trigOff \/ (Quiet /\ Uncommitted)
    /\ \E kind \in BarrierKinds :
          triggers' = [s \in Sources |-> triggers[s] \union {<<ckNext, kind>>}]
    /\ status' = [status EXCEPT ![ckNext] = "pending"]
    /\ ckNext' = ckNext + 1
    /\ trigOff' = offset
    /\ UNCHANGED <<offset, chan, ackSrc, ackOff, ackT, aborts>>
    /\ UNCHANGED <<taskVars, sinkVars, storeVars, envVars>>

\* Coordinator::handle_ack: status'/ackSrc'/ackT' of checkpoint n after an acknowledgement.
AllAcked(src, t) == src = Sources /\ t.id # 0
AckSource(n, s, off) ==
    IF status[n] = "pending"
    THEN /\ ackSrc' = [ackSrc EXCEPT ![n] = @ \union {s}]
         /\ ackOff' = [ackOff EXCEPT ![n][s] = off]
         /\ status' = [status EXCEPT ![n] =
                         (IF AllAcked(ackSrc'[n], ackT[n]) THEN "persisting" ELSE "pending")]
    ELSE UNCHANGED <<ackSrc, ackOff, status>>   \* aborted or subsumed: ignored

AckTask(snap) ==
    LET n == snap.id IN
    IF status[n] = "pending"
    THEN /\ ackT' = [ackT EXCEPT ![n] = snap]
         /\ status' = [status EXCEPT ![n] =
                         (IF AllAcked(ackSrc[n], snap) THEN "persisting" ELSE "pending")]
    ELSE UNCHANGED <<ackT, status>>

Manifest(n) ==
    [att |-> attempt, off |-> ackOff[n], state |-> ackT[n].state,
     inflight |-> ackT[n].inflight, txns |-> ackT[n].txns]

\* Completion of n: older pending checkpoints are subsumed; n gets newStatus.
Complete(n, newStatus) ==
    status' = [m \in Ids |-> (IF m = n THEN newStatus
                              ELSE IF m < n /\ status[m] \in Active THEN "aborted"
                              ELSE status[m])]

\* manifest::persist, step 1: the manifest written (not yet synced).
PersistWrite(n) ==
    /\ status[n] = "persisting"
    /\ mf' = [mf EXCEPT ![n] = Manifest(n)]
    /\ mfSynced' = [mfSynced EXCEPT ![n] = FALSE]
    /\ IF Bug = "announce_before_durable"
       THEN Complete(n, "written") /\ notified' = notified \union {n}
       ELSE status' = [status EXCEPT ![n] = "written"] /\ UNCHANGED notified
    /\ UNCHANGED <<srcVars, chan, taskVars, txnOpen, prepared, sinkCovered>>
    /\ UNCHANGED <<ckNext, ackSrc, ackOff, ackT, trigOff, aborts, latest, txnData, committed, envVars>>

\* Step 2: the manifest file and its directory synced.
PersistSync(n) ==
    /\ status[n] = "written"
    /\ mfSynced' = [mfSynced EXCEPT ![n] = TRUE]
    /\ status' = [status EXCEPT ![n] = "synced"]
    /\ UNCHANGED <<srcVars, chan, taskVars, sinkVars>>
    /\ UNCHANGED <<ckNext, ackSrc, ackOff, ackT, trigOff, aborts, mf, latest, txnData, committed, envVars>>

\* Step 3: the pointer replaced atomically (write_atomic) and its directory synced; persist
\* returns, Coordinator::handle_persisted completes n and the driver announces it
\* (Action::NotifyComplete). A crash between the rename and the announcement is a crash after
\* this step, before T acts on `notified`.
PersistPointer(n) ==
    /\ status[n] = "synced"
    /\ latest' = n
    /\ completedHist' = completedHist \union {<<attempt, n>>}
    /\ Complete(n, "completed")
    /\ IF Bug = "announce_before_durable"
       THEN UNCHANGED notified
       ELSE notified' = notified \union {n}
    /\ UNCHANGED <<srcVars, chan, taskVars, txnOpen, prepared, sinkCovered>>
    /\ UNCHANGED <<ckNext, ackSrc, ackOff, ackT, trigOff, aborts, mf, mfSynced, txnData, committed>>
    /\ UNCHANGED <<attempt, crashes>>

\* A timeout (handle_timeout) or a failed persist (handle_persist_failed) aborts n. Sinks are
\* not told (the driver only counts aborts): T keeps what it pre-committed for n.
Abort(n) ==
    /\ aborts < AbortMax
    /\ status[n] \in Active
    /\ Bug = "announce_before_durable" => n \notin notified
    /\ status' = [status EXCEPT ![n] = "aborted"]
    /\ aborts' = aborts + 1
    /\ UNCHANGED <<srcVars, chan, taskVars, sinkVars, storeVars, envVars>>
    /\ UNCHANGED <<ckNext, ackSrc, ackOff, ackT, trigOff>>

-----------------------------------------------------------------------------
(* Sources. *)

\* The source reads record offset+1 and emits it; its chain's watermark assigner
\* (dataflow/watermark.rs) follows the batch with a watermark. Event time is the offset, so the
\* watermark is the offset read.
SourceRead(s) ==
    /\ offset[s] < RecordCount
    /\ chan' = [chan EXCEPT ![s] =
                 (IF Watermarks THEN Append(Append(@, <<"R", offset[s] + 1>>), <<"W", offset[s] + 1>>)
                  ELSE Append(@, <<"R", offset[s] + 1>>))]
    /\ offset' = [offset EXCEPT ![s] = @ + 1]
    /\ UNCHANGED <<triggers, taskVars, sinkVars, coordVars, storeVars, envVars>>

\* Node::handle_checkpoint_trigger at a source: record the offset, emit Barrier(n) and
\* acknowledge at once (a source writes no files). Triggers reach a source in id order.
\* Bug "offset_after_barrier": the offset is taken after the barrier and one more record.
SourceBarrier(s) ==
    /\ triggers[s] # {}
    /\ LET t == CHOOSE t \in triggers[s] : \A u \in triggers[s] : t[1] <= u[1]
           n == t[1]
           late == Bug = "offset_after_barrier" /\ offset[s] < RecordCount
           off == IF late THEN offset[s] + 1 ELSE offset[s]
       IN /\ triggers' = [triggers EXCEPT ![s] = @ \ {t}]
          /\ chan' = [chan EXCEPT ![s] =
                        (IF late THEN Append(Append(@, <<"B", n, t[2]>>), <<"R", offset[s] + 1>>)
                         ELSE Append(@, <<"B", n, t[2]>>))]
          /\ offset' = [offset EXCEPT ![s] = off]
          /\ AckSource(n, s, off)
    /\ UNCHANGED <<taskVars, sinkVars, ckNext, ackT, trigOff, aborts, storeVars, envVars>>

-----------------------------------------------------------------------------
(* Task T: the input gate, the aligner, the keyed operator and the sink. *)

\* Aligner::is_held: aligned, and input s delivered the barrier: its elements wait. The model
\* leaves them in the channel (Flink blocks the channel; Sabot moves them to InputGate.held and
\* re-delivers them in order on Release, which is the same to the operator).
Held(s) == alCur # 0 /\ ~alTaken /\ alIn[s] = "barrier"
\* Aligner::is_in_flight: unaligned, and input s has not delivered the barrier yet.
InFlight(s) == alCur # 0 /\ alTaken /\ alIn[s] = "open"

\* The sink's pre-commit of epoch n (TwoPhaseCommitSink::on_barrier, FileTransactions::pre_commit):
\* the open transaction becomes the synced, invisible transaction <<attempt, n>>.
Handle(n) == <<attempt, n>>
PreCommit(n) ==
    /\ txnData' = [txnData EXCEPT ![Handle(n)] = txnOpen]
    /\ txnOpen' = {}
    /\ IF Bug = "commit_before_complete"
       THEN committed' = committed \union {Handle(n)} /\ prepared' = prepared
       ELSE prepared' = prepared \union {Handle(n)} /\ UNCHANGED committed
\* What the snapshot of n names for the sink to commit: every transaction pre-committed and not
\* yet committed, this epoch's included (as Flink's TwoPhaseCommitSinkFunction keeps
\* pendingCommitTransactions in its state). Bug "sink_own_epoch_only": this epoch's only.
SnapTxns(n) ==
    IF Bug = "sink_own_epoch_only" THEN {Handle(n)} ELSE prepared \union {Handle(n)}
\* Operator::on_barrier along the chain: the operator's state and the sink's transactions.
Capture(n) == [id |-> n, state |-> count, inflight |-> NoInFlight, txns |-> SnapTxns(n)]

\* Aligner::on_barrier, and what node.rs (apply_alignment) does with its actions.
OnBarrier(s, n, kind) ==
    IF alFin >= n \/ alCur > n
    THEN UNCHANGED <<taskVars, txnOpen, prepared, txnData, committed>>   \* stale: ignored
    ELSE
    LET fresh == alCur # n                    \* a new checkpoint starts (aborting alCur, if any)
        in0 == IF fresh THEN AllOpen ELSE alIn
        in1 == [in0 EXCEPT ![s] = "barrier"]
        taken == IF fresh THEN kind = "unaligned" ELSE alTaken
        snapAtStart == fresh /\ kind = "unaligned"  \* unaligned: snapshot at the first barrier
        open == IF snapAtStart THEN Capture(n) ELSE IF fresh THEN NoSnap ELSE snapOpen
        done == \A x \in Sources : in1[x] = "barrier"
    IN /\ IF done
          THEN \* aligned: Snapshot + Release; unaligned: InFlightComplete. Then finish(n).
               /\ alCur' = 0 /\ alFin' = n /\ alIn' = AllOpen /\ alTaken' = FALSE
               /\ snapOpen' = NoSnap
               /\ writing' = writing \union {(IF taken THEN open ELSE Capture(n))}
          ELSE /\ alCur' = n /\ alIn' = in1 /\ alTaken' = taken /\ snapOpen' = open
               /\ alFin' = (IF fresh /\ alCur # 0 THEN alCur ELSE alFin)   \* Abort of alCur
               /\ UNCHANGED writing
       /\ IF snapAtStart \/ (done /\ ~taken)
          THEN PreCommit(n)
          ELSE UNCHANGED <<txnOpen, prepared, txnData, committed>>
       /\ UNCHANGED <<count, wmIn, wmBack>>

\* The operator processes a record or watermark; overtaken by an unaligned barrier, the element
\* is also stored with the snapshot (Bug "no_inflight": it is not).
OnElement(s, e) ==
    /\ IF e[1] = "R"
       THEN /\ count' = [count EXCEPT ![s] = @ + 1]
            /\ txnOpen' = txnOpen \union {<<s, e[2], count[s] + 1>>}
            /\ UNCHANGED <<wmIn, wmBack>>
       ELSE /\ wmBack' = (wmBack \/ e[2] < wmIn[s])
            /\ wmIn' = [wmIn EXCEPT ![s] = e[2]]
            /\ UNCHANGED <<count, txnOpen>>
    /\ IF InFlight(s) /\ Bug # "no_inflight"
       THEN snapOpen' = [snapOpen EXCEPT !.inflight[s] = Append(@, e)]
       ELSE UNCHANGED snapOpen
    /\ UNCHANGED <<alCur, alTaken, alIn, alFin, writing, prepared, txnData, committed>>

\* Node::deliver: T takes the next element of input s, unless the aligner holds that input
\* (Bug "no_alignment": it never holds).
Deliver(s) ==
    /\ chan[s] # <<>>
    /\ ~Held(s) \/ Bug = "no_alignment"
    /\ chan' = [chan EXCEPT ![s] = Tail(@)]
    /\ LET e == Head(chan[s]) IN
       IF e[1] = "B" THEN OnBarrier(s, e[2], e[3]) ELSE OnElement(s, e)
    /\ UNCHANGED <<srcVars, notified, sinkCovered, coordVars, mf, mfSynced, latest, envVars>>

\* Aligner::handle_timeout: an aligned checkpoint waited too long and goes on unaligned.
AlignTimeoutSwitch ==
    /\ AlignTimeout
    /\ alCur # 0 /\ ~alTaken
    /\ alTaken' = TRUE
    /\ snapOpen' = Capture(alCur)
    /\ PreCommit(alCur)
    /\ UNCHANGED <<srcVars, chan, count, wmIn, wmBack, alCur, alIn, alFin, writing>>
    /\ UNCHANGED <<notified, sinkCovered, coordVars, mf, mfSynced, latest, envVars>>

\* The snapshot's files are written and synced (handle_snapshot_written); T acknowledges and the
\* coordinator takes the acknowledgement (Event::CheckpointAck, Coordinator::handle_ack).
SnapshotWritten ==
    \E w \in writing :
       /\ writing' = writing \ {w}
       /\ AckTask(w)
       /\ UNCHANGED <<srcVars, chan, count, wmIn, wmBack, alCur, alTaken, alIn, alFin, snapOpen>>
       /\ UNCHANGED <<sinkVars, ckNext, ackSrc, ackOff, trigOff, aborts, storeVars, envVars>>

\* Node::handle_checkpoint_complete: the sink commits every transaction up to n
\* (TwoPhaseCommitSink::commit_up_to). Completions arrive in the order announced.
SinkCommit ==
    /\ notified # {}
    /\ LET n == Min(notified)
           ready == {h \in prepared : h[2] <= n}
       IN /\ committed' = committed \union ready
          /\ prepared' = prepared \ ready
          /\ notified' = notified \ {n}
          /\ sinkCovered' = (IF ackT[n].id = n THEN ackT[n].state ELSE sinkCovered)
    /\ UNCHANGED <<srcVars, chan, taskVars, txnOpen, coordVars, mf, mfSynced, latest, txnData, envVars>>

-----------------------------------------------------------------------------
(* Crash and restore. *)

\* Replaying the restored in-flight elements of input s into the operator and the sink, before
\* any new input (Node::replay_in_flight).
ReplayOut(m, s) ==
    LET seq == m.inflight[s]
        rp == RecPos(seq)
    IN {<<s, seq[j][2], m.state[s] + Cardinality({k \in rp : k <= j})>> : j \in rp}
ReplayWm(m, s) ==
    LET wms == {m.inflight[s][j][2] : j \in (1..Len(m.inflight[s])) \ RecPos(m.inflight[s])}
    IN IF wms = {} THEN 0 ELSE CHOOSE w \in wms : \A v \in wms : v <= w

\* Everything not durable is lost: processes, channels, the coordinator, unsynced files. The
\* next attempt starts from the checkpoint _latest names (find_latest) or from scratch: sources
\* seek to its offsets, T restores its state and replays its in-flight elements, and the sink
\* commits the transactions the checkpoint names (TwoPhaseCommitSink::restore; idempotent, so a
\* crash during a restore is a crash before it) and drops the rest (FileTransactions::recover).
\* Bug "restore_forgets_txn": the restore does not commit them.
CrashRestore ==
    /\ crashes < CrashMax
    /\ LET m == IF latest = 0 THEN NoManifest ELSE mf[latest] IN
       /\ offset' = m.off
       /\ count' = [s \in Sources |-> m.state[s] + Cardinality(RecPos(m.inflight[s]))]
       /\ wmIn' = (IF Bug = "watermark_kept_across_restore" THEN wmIn   \* the gate survives the crash
                    ELSE [s \in Sources |-> ReplayWm(m, s)])
       /\ txnOpen' = UNION {ReplayOut(m, s) : s \in Sources}
       /\ committed' = (IF Bug = "restore_forgets_txn" THEN committed ELSE committed \union m.txns)
       /\ sinkCovered' = m.state
    /\ mf' = [n \in Ids |-> (IF mfSynced[n] THEN mf[n] ELSE NoManifest)]
    /\ triggers' = [s \in Sources |-> {}]
    /\ chan' = [s \in Sources |-> <<>>]
    /\ alCur' = 0 /\ alTaken' = FALSE /\ alIn' = AllOpen /\ alFin' = 0
    /\ snapOpen' = NoSnap /\ writing' = {}
    /\ prepared' = {} /\ notified' = {}
    /\ ckNext' = latest + 1
    /\ trigOff' = offset'
    /\ status' = [n \in Ids |-> "none"]
    /\ ackSrc' = [n \in Ids |-> {}]
    /\ ackOff' = [n \in Ids |-> Zeros]
    /\ ackT' = [n \in Ids |-> NoSnap]
    /\ attempt' = attempt + 1
    /\ crashes' = crashes + 1
    /\ UNCHANGED <<wmBack, aborts, mfSynced, latest, txnData, completedHist>>

-----------------------------------------------------------------------------
\* Every step but a fault: what fairness makes happen.
Progress ==
    \/ Trigger
    \/ \E n \in Ids : PersistWrite(n) \/ PersistSync(n) \/ PersistPointer(n)
    \/ \E s \in Sources : SourceRead(s) \/ SourceBarrier(s) \/ Deliver(s)
    \/ AlignTimeoutSwitch
    \/ SnapshotWritten
    \/ SinkCommit

Fault ==
    \/ \E n \in Ids : Abort(n)
    \/ CrashRestore

Next == Progress \/ Fault

\* Finitely many faults (CrashMax, AbortMax); every other step that stays possible happens.
Spec == Init /\ [][Next]_vars /\ WF_vars(Progress)

-----------------------------------------------------------------------------
(* Invariants. *)

TypeOK ==
    /\ offset \in [Sources -> Offsets]
    /\ count \in [Sources -> Offsets]
    /\ alCur \in 0..CheckpointMax /\ alFin \in 0..CheckpointMax
    /\ alIn \in [Sources -> {"open", "barrier"}]
    /\ ckNext \in 1..(CheckpointMax + 1)
    /\ latest \in 0..CheckpointMax
    /\ committed \subseteq Handles /\ prepared \subseteq Handles
    /\ notified \subseteq Ids
    /\ attempt \in 0..CrashMax

\* A manifest's cut is consistent: for every input, T's state counts exactly the records before
\* the source's offset that its in-flight elements do not hold, and the in-flight elements hold
\* exactly the rest (Chandy-Lamport: state plus channel state).
ConsistentCut(m) ==
    \A s \in Sources :
       LET rp == RecPos(m.inflight[s]) IN
       /\ m.state[s] + Cardinality(rp) = m.off[s]
       /\ {m.inflight[s][j][2] : j \in rp} = (m.state[s] + 1)..m.off[s]
InvConsistentCut == \A n \in Ids : mf[n].att # -1 => ConsistentCut(mf[n])

\* The pointer names a manifest that survives a crash.
InvPointerDurable == latest # 0 => (mfSynced[latest] /\ mf[latest].att # -1)

\* Exactly once: no record's output is committed twice ...
InvNoDuplicates ==
    /\ \A h1, h2 \in committed :
          h1 # h2 => {<<o[1], o[2]>> : o \in txnData[h1]} \cap {<<o[1], o[2]>> : o \in txnData[h2]} = {}
    /\ \A o1, o2 \in CommittedOut : <<o1[1], o1[2]>> = <<o2[1], o2[2]>> => o1 = o2
\* ... every committed value is the failure-free one ...
InvCommittedValues == \A o \in CommittedOut : o[3] = o[2]
\* ... and none is lost: once T's sink committed up to (or restored) a checkpoint, the output of
\* every record that checkpoint's state counts is committed.
InvNoLoss == \A s \in Sources : \A i \in 1..sinkCovered[s] : <<s, i>> \in CommittedKeys

\* ... and no record read is forgotten: each record a source has read in this attempt is still in
\* its channel, or its output is in the open transaction, in a pre-committed one that a later
\* completion or restore still commits, or committed. (After a restore, the records before the
\* restored offsets must be committed or replayed.)
InvRecordsAccounted ==
    \A s \in Sources : \A i \in 1..offset[s] :
       \/ \E j \in 1..Len(chan[s]) : chan[s][j] = <<"R", i>>
       \/ \E o \in txnOpen : o[1] = s /\ o[2] = i
       \/ \E h \in prepared : \E o \in txnData[h] : o[1] = s /\ o[2] = i
       \/ <<s, i>> \in CommittedKeys

AllCommittedNow == \A s \in Sources : \A i \in 1..RecordCount : <<s, i>> \in CommittedKeys

\* Nothing is visible before a checkpoint covering it completed (its pointer was replaced).
InvNothingVisibleEarly ==
    \A h \in committed : \E c \in completedHist : c[1] = h[1] /\ c[2] >= h[2]

\* Watermarks never go back on any input of T.
InvWatermarksMonotone == ~wmBack

-----------------------------------------------------------------------------
(* Witnesses: states a good configuration must reach, stated as invariants that must FAIL, so *)
(* that a model that never restores, never subsumes or never times out cannot pass unnoticed.  *)

\* A restore from a checkpoint that holds in-flight records (an unaligned one).
WitnessNoRestoreWithInFlight ==
    ~(attempt > 0 /\ latest # 0 /\ \E s \in Sources : RecPos(mf[latest].inflight[s]) # {})
\* All output committed after a crash.
WitnessNoCommitAfterCrash == ~(crashes > 0 /\ AllCommittedNow)
\* A checkpoint subsumed or aborted while another completed.
WitnessNoSubsumption == ~(\E n, m \in Ids : status[n] = "aborted" /\ status[m] = "completed")
\* An aligned checkpoint that timed out into an unaligned one, with an input still open.
WitnessNoTimeoutSwitch == ~(alCur # 0 /\ alTaken /\ \E s \in Sources : InFlight(s) /\ chan[s] # <<>>)

-----------------------------------------------------------------------------
(* Liveness: with finitely many crashes and aborts, every record's output is committed. *)

AllCommitted == AllCommittedNow
EventuallyAllCommitted == <>AllCommitted

=============================================================================
