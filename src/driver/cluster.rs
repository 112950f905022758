//! Beyond one process: `sabot coordinator` and `sabot worker`.
//!
//! Workers register with the coordinator (the job's secret, the one address they listen on for
//! peer processes, and how many nodes they run). Once the configured number registered, the
//! coordinator opens an *attempt*: it finds the latest completed checkpoint, makes the `w`-th
//! worker process `w` and numbers the nodes in registration order (each worker gets as many
//! consecutive node indices as it offered), and runs the checkpoint coordinator over their control
//! connections; the workers connect to each other, one connection per pair of workers
//! (`crate::tcp`), and run their nodes. Any failure — a worker that dies (its connection closes
//! or falls silent past the heartbeat timeout), a node that fails, a lost peer connection — ends
//! the attempt: the coordinator tells every worker to stop, workers drop their nodes and register
//! again, and the next attempt restores every subtask from the latest completed checkpoint, at
//! whatever number of workers registered (key groups and splits move with the plan). Attempt
//! numbers fence off stale peers on the data connections; control connections are new for every
//! attempt, so nothing of an older attempt reaches a newer one.
//!
//! Control messages are `sabot_kernel::wire::Control`, framed like data frames. Each side sends
//! a heartbeat after `HEARTBEAT_INTERVAL` of silence and declares the other lost after
//! `HEARTBEAT_TIMEOUT`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sabot_kernel::checkpoint::manifest::{find_latest, load, sweep_before, Manifest, TaskSnapshot};
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::time::EventTime;
use sabot_kernel::wire::{Assignment, Control, FrameDecoder, JobSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use sabot_sync::completed::Completed;

use super::{
    build_node, coordinate, AlignmentBoard, Announce, CheckpointSettings, CheckpointStats, Command, CoordinatorTask,
    DriverConfig, DriverError, Ended, NodeControl, NodeDriver, Progress, Report, StateKind, TransportKind,
};
use crate::clock::TokioClock;
use crate::fs_storage::LocalFsStorage;
use crate::tcp::{
    constant_time_eq, split, OwnedReadHalf, OwnedWriteHalf, ProcessConfig, TcpTransport, HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT,
};

/// How `sabot coordinator` runs a job.
#[derive(Clone)]
pub struct CoordinatorSettings {
    pub listen: SocketAddr,
    /// Workers an attempt waits for.
    pub workers: u16,
    /// After a failure, the attempt goes on with this many workers (at least 1) if no more
    /// registered within `REGROUP_GRACE`: the workers that remain carry the job.
    pub min_workers: u16,
    pub job: JobSpec,
    pub data_dir: PathBuf,
    pub checkpoints: CheckpointSettings,
    pub secret: Vec<u8>,
}

/// How `sabot worker` joins a job.
#[derive(Clone)]
pub struct WorkerSettings {
    pub coordinator: SocketAddr,
    /// Where this worker listens for its peer processes (any free port, when this port is 0):
    /// one listener and one connection per peer worker, whatever its number of nodes.
    pub listen: SocketAddr,
    /// Kernel nodes this worker runs, each on its own task (so on its own core, given cores).
    pub nodes: u16,
    pub data_dir: PathBuf,
    pub state: StateKind,
    pub secret: Vec<u8>,
}

/// Why a control connection ended.
type Lost = String;

/// Writes one control message.
async fn send(writer: &mut OwnedWriteHalf, message: &Control) -> Result<(), Lost> {
    let mut bytes = Vec::new();
    message.encode(&mut bytes).map_err(|error| error.to_string())?;
    writer.write_all(&bytes).await.map_err(|error| format!("writing: {error}"))?;
    // A no-op on a real socket; madsim's streams send only what is flushed.
    writer.flush().await.map_err(|error| format!("writing: {error}"))
}

/// Reads control messages; heartbeats are skipped, silence past the timeout is a loss.
struct ControlReader {
    reader: OwnedReadHalf,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
}

impl ControlReader {
    fn new(reader: OwnedReadHalf) -> ControlReader {
        ControlReader { reader, decoder: FrameDecoder::new(), buffer: vec![0; 64 * 1024] }
    }

    async fn next(&mut self, timeout: Duration) -> Result<Control, Lost> {
        loop {
            match self.decoder.next_control().map_err(|error| error.to_string())? {
                Some(Control::Heartbeat) => continue,
                Some(message) => return Ok(message),
                None => {}
            }
            let read = tokio::time::timeout(timeout, self.reader.read(&mut self.buffer))
                .await
                .map_err(|_| format!("silent for {} ms", timeout.as_millis()))?
                .map_err(|error| format!("reading: {error}"))?;
            if read == 0 {
                return Err("connection closed".into());
            }
            self.decoder.push(&self.buffer[..read]);
        }
    }
}

/// Sends what arrives on `queue`, and a heartbeat after each `HEARTBEAT_INTERVAL` of silence.
async fn write_loop(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Control>) {
    loop {
        let message = match tokio::time::timeout(HEARTBEAT_INTERVAL, queue.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) => return,
            Err(_) => Control::Heartbeat,
        };
        if send(&mut writer, &message).await.is_err() {
            return;
        }
    }
}

/// A registered worker, waiting for an attempt.
struct Registered {
    /// Where it listens for its peer processes.
    address: String,
    /// Nodes it runs (at least 1).
    nodes: u16,
    reader: ControlReader,
    writer: OwnedWriteHalf,
}

/// What a new connection to the coordinator turned out to be.
enum Incoming {
    Worker(Registered),
    /// A client's query, answered on `writer`.
    Query {
        operator: String,
        key: u64,
        writer: OwnedWriteHalf,
    },
}

/// Accepts connections for the coordinator's lifetime; each must present the secret in its
/// first message (a registration or a query) within `HANDSHAKE_TIMEOUT`, or it is refused.
async fn accept_loop(listener: TcpListener, secret: Arc<Vec<u8>>, incoming: mpsc::UnboundedSender<Incoming>) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("coordinator: accepting: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stream.set_nodelay(true).ok();
        let (secret, incoming) = (secret.clone(), incoming.clone());
        // Each handshake on its own task: a silent client delays nobody.
        tokio::spawn(async move {
            let (reader, writer) = split(stream);
            let mut reader = ControlReader::new(reader);
            let arrived = match reader.next(HANDSHAKE_TIMEOUT).await {
                Ok(Control::Register { secret: presented, address, nodes })
                    if constant_time_eq(&presented, &secret) =>
                {
                    Incoming::Worker(Registered { address, nodes, reader, writer })
                }
                Ok(Control::Query { secret: presented, operator, key }) if constant_time_eq(&presented, &secret) => {
                    Incoming::Query { operator, key, writer }
                }
                Ok(Control::Register { .. } | Control::Query { .. }) => {
                    return eprintln!("coordinator: refused {from}: it presented the wrong secret");
                }
                Ok(other) => {
                    return eprintln!("coordinator: refused {from}: it began with {other:?}");
                }
                Err(reason) => return eprintln!("coordinator: refused {from}: {reason}"),
            };
            let _ = incoming.send(arrived);
        });
    }
}

/// Answers a client on its own task (a slow client delays nobody), then closes the connection.
fn answer(mut writer: OwnedWriteHalf, rows: Result<Vec<u8>, String>) {
    tokio::spawn(async move {
        let _ = send(&mut writer, &Control::Answer { id: 0, rows }).await;
        let _ = writer.shutdown().await;
    });
}

/// Asks the coordinator at `coordinator` for the live state of `operator` for `key`.
pub async fn query(
    coordinator: SocketAddr,
    secret: &[u8],
    operator: &str,
    key: u64,
) -> Result<Vec<arrow_array::RecordBatch>, DriverError> {
    let failed = |reason: String| DriverError::Coordinator(format!("query: {reason}"));
    let stream = connect(coordinator).await.map_err(failed)?;
    let (reader, mut writer) = split(stream);
    let message = Control::Query { secret: secret.to_vec(), operator: operator.into(), key };
    send(&mut writer, &message).await.map_err(failed)?;
    match ControlReader::new(reader).next(QUERY_TIMEOUT).await.map_err(failed)? {
        Control::Answer { rows: Ok(bytes), .. } => {
            sabot_kernel::dataflow::sink::decode_ipc_file(bytes).map_err(|error| failed(format!("the rows: {error}")))
        }
        Control::Answer { rows: Err(reason), .. } => Err(failed(reason)),
        other => Err(failed(format!("the coordinator answered {other:?}"))),
    }
}

/// How long a query waits for its answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new attempt waits for replacements of lost workers before it goes on without them.
pub const REGROUP_GRACE: Duration = Duration::from_secs(2);

/// Attempts after which the coordinator gives up on a job that keeps failing.
pub const ATTEMPTS_MAX: u64 = 100;

/// Runs the job to its end through as many attempts as failures need.
pub async fn run_coordinator(settings: CoordinatorSettings) -> Result<(), DriverError> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|error| DriverError::Coordinator(format!("binding {}: {error}", settings.listen)))?;
    eprintln!(
        "coordinator: listening on {}, waiting for {} workers",
        listener.local_addr().map_err(io)?,
        settings.workers
    );
    let mut storage = LocalFsStorage::open(&settings.data_dir)
        .map_err(|error| DriverError::DataDir { path: settings.data_dir.clone(), error })?;
    let graph = super::job_graph(&settings.job)?;
    let (incoming_sender, mut incoming) = mpsc::unbounded_channel();
    let accepting = tokio::spawn(accept_loop(listener, Arc::new(settings.secret.clone()), incoming_sender));
    let result = attempts(&settings, &graph, &mut storage, &mut incoming).await;
    accepting.abort();
    result
}

/// The attempts of the job, until it completes or keeps failing.
async fn attempts(
    settings: &CoordinatorSettings,
    graph: &sabot_kernel::dataflow::JobGraph,
    storage: &mut LocalFsStorage,
    incoming: &mut mpsc::UnboundedReceiver<Incoming>,
) -> Result<(), DriverError> {
    let started = std::time::Instant::now();
    // Workers that registered while an attempt ran: the next attempt takes them first.
    let mut waiting: Vec<Registered> = Vec::new();
    let mut attempt = 0_u64;
    loop {
        attempt += 1;
        if attempt > ATTEMPTS_MAX {
            return Err(DriverError::Coordinator(format!(
                "the job failed {ATTEMPTS_MAX} attempts in a row; giving up"
            )));
        }
        let mut workers: Vec<Registered> = std::mem::take(&mut waiting);
        // The first attempt waits for every worker; later ones wait a grace period for
        // replacements, then go on with the workers that remain (at least `min_workers`).
        let grace = (attempt > 1).then(|| tokio::time::Instant::now() + REGROUP_GRACE);
        while workers.len() < usize::from(settings.workers) {
            let enough = workers.len() >= usize::from(settings.min_workers.max(1));
            let arrived = match grace {
                Some(deadline) if enough => match tokio::time::timeout(
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                    incoming.recv(),
                )
                .await
                {
                    Ok(arrived) => arrived,
                    Err(_) => break,
                },
                _ => incoming.recv().await,
            };
            match arrived.ok_or_else(|| DriverError::Coordinator("the listener stopped".into()))? {
                Incoming::Worker(worker) => workers.push(worker),
                Incoming::Query { writer, .. } => {
                    answer(writer, Err("no attempt of the job is running (waiting for workers); ask again".into()))
                }
            }
        }
        let recovery = find_latest(storage, &graph.name).map_err(|e| DriverError::Coordinator(e.to_string()))?;
        for (id, reason) in &recovery.skipped {
            eprintln!("coordinator: skipping checkpoint {}: {reason}", id.0);
        }
        let restore = recovery.manifest;
        match &restore {
            None if attempt == 1 => {
                for dir in super::clear_previous(&settings.data_dir, &graph.name)? {
                    eprintln!("coordinator: removed the previous run's {}", dir.display());
                }
            }
            None => {}
            Some(manifest) => {
                // What the previous attempt's retention would have deleted, and its orphans.
                sweep_before(storage, &graph.name, manifest).map_err(|e| DriverError::Coordinator(e.to_string()))?;
            }
        }
        let node_count: usize = workers.iter().map(|worker| usize::from(worker.nodes)).sum();
        eprintln!(
            "coordinator: [{:.3} s] attempt {attempt} with {} workers ({node_count} nodes), {}",
            started.elapsed().as_secs_f64(),
            workers.len(),
            restore.as_ref().map_or("from the start".to_string(), |m| format!("from checkpoint {}", m.checkpoint.0))
        );
        match run_attempt(settings, graph, attempt, workers, restore, incoming, &mut waiting).await? {
            true => {
                eprintln!("coordinator: [{:.3} s] the job is complete", started.elapsed().as_secs_f64());
                return Ok(());
            }
            false => {
                eprintln!("coordinator: [{:.3} s] attempt {attempt} ended", started.elapsed().as_secs_f64());
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    }
}

fn io(error: std::io::Error) -> DriverError {
    DriverError::Coordinator(error.to_string())
}

/// What a worker's connection tells the attempt besides the checkpoint coordinator's reports.
enum FromWorker {
    Failed { worker: usize, reason: String },
    Answer { id: u64, rows: Result<Vec<u8>, String> },
    Alignment { worker: usize, minima: Vec<(String, Option<i64>)> },
}

/// One attempt: `true` when the job completed, `false` when a failure ended it.
async fn run_attempt(
    settings: &CoordinatorSettings,
    graph: &sabot_kernel::dataflow::JobGraph,
    attempt: u64,
    workers: Vec<Registered>,
    restore: Option<Manifest>,
    incoming: &mut mpsc::UnboundedReceiver<Incoming>,
    waiting: &mut Vec<Registered>,
) -> Result<bool, DriverError> {
    // Worker `w` is process `w`; nodes go to workers in registration order, as many to each as it
    // offered.
    let addresses: Vec<String> = workers.iter().map(|w| w.address.clone()).collect();
    let worker_of_node: Vec<usize> = workers
        .iter()
        .enumerate()
        .flat_map(|(w, registered)| std::iter::repeat_n(w, usize::from(registered.nodes)))
        .collect();
    let node_count = u16::try_from(worker_of_node.len()).map_err(|_| {
        DriverError::Coordinator(format!("the workers offer {} nodes, at most 65535", worker_of_node.len()))
    })?;
    let node_processes: Vec<u16> = worker_of_node.iter().map(|&w| w as u16).collect();
    let plan = PhysicalPlan::new(graph.clone(), node_count);
    let (report_sender, reports) = mpsc::unbounded_channel::<Report>();
    let (from_workers_sender, mut from_workers) = mpsc::unbounded_channel::<FromWorker>();
    let mut command_senders = Vec::new();
    let mut outboxes = Vec::new();
    for (worker, registered) in workers.into_iter().enumerate() {
        let Registered { mut reader, mut writer, .. } = registered;
        let assignment = Assignment {
            attempt,
            job: settings.job.clone(),
            process: worker as u16,
            addresses: addresses.clone(),
            node_processes: node_processes.clone(),
            checkpointing: true,
            alignment_timeout_ms: settings.checkpoints.alignment_timeout_ms,
            restore: restore.as_ref().map(|m| m.checkpoint),
        };
        if let Err(reason) = send(&mut writer, &Control::Assign(assignment)).await {
            let _ = from_workers_sender.send(FromWorker::Failed { worker, reason });
        }
        let (outbox, queue) = mpsc::unbounded_channel::<Control>();
        tokio::spawn(write_loop(writer, queue));
        // Coordinator commands for this worker (for all its nodes) become control messages.
        let (commands, mut command_queue) = mpsc::unbounded_channel::<Command>();
        let forward = outbox.clone();
        tokio::spawn(async move {
            while let Some(command) = command_queue.recv().await {
                let message = match command {
                    Command::Trigger(checkpoint, kind) => Control::Trigger { checkpoint, kind },
                    Command::Complete(checkpoint) => Control::Complete { checkpoint },
                    // The attempt's end (Stop or JobDone) is sent below, once; queries go apart.
                    Command::Stop | Command::Query { .. } => continue,
                };
                if forward.send(message).is_err() {
                    return;
                }
            }
        });
        command_senders.push(commands);
        outboxes.push(outbox);
        let (reports, from_workers) = (report_sender.clone(), from_workers_sender.clone());
        tokio::spawn(async move {
            let failed = |reason: String| FromWorker::Failed { worker, reason };
            loop {
                let report = match reader.next(HEARTBEAT_TIMEOUT).await {
                    Ok(Control::Ack { checkpoint, snapshot }) => match decode_snapshot(&snapshot) {
                        Ok(snapshot) => Report::Ack(checkpoint, snapshot),
                        Err(reason) => return drop(from_workers.send(failed(reason))),
                    },
                    Ok(Control::Finished { node }) => Report::Finished(node),
                    Ok(Control::Done { node }) => Report::Done(node),
                    Ok(Control::Answer { id, rows }) => {
                        let _ = from_workers.send(FromWorker::Answer { id, rows });
                        continue;
                    }
                    Ok(Control::Alignment { minima }) => {
                        let _ = from_workers.send(FromWorker::Alignment { worker, minima });
                        continue;
                    }
                    Ok(Control::Failed { reason }) => return drop(from_workers.send(failed(reason))),
                    Ok(other) => {
                        let reason = format!("sent {other:?}, which workers do not send");
                        return drop(from_workers.send(failed(reason)));
                    }
                    Err(reason) => return drop(from_workers.send(failed(reason))),
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
        });
    }
    drop(report_sender);
    let clock = TokioClock::new();
    let mut storage = LocalFsStorage::open(&settings.data_dir)
        .map_err(|error| DriverError::DataDir { path: settings.data_dir.clone(), error })?;
    let coordinator = super::job_coordinator(graph, &settings.checkpoints, restore, &mut storage)?;
    let task = coordinate(CoordinatorTask {
        coordinator,
        reports,
        commands: command_senders.clone(),
        announce: Announce::Commands,
        storage,
        clock,
        node_count: plan.node_count,
        stats: CheckpointStats::default(),
        savepoint_at: None,
        unaligned: settings.checkpoints.unaligned,
    });
    tokio::pin!(task);
    // Queries on their way to a node, by id.
    let mut queries: BTreeMap<u64, OwnedWriteHalf> = BTreeMap::new();
    let mut alignment = AlignmentRelay::new(outboxes.len());
    let mut query_next = 1_u64;
    let completed = loop {
        tokio::select! {
            // Complete only when every node said it is done: reports that end because every
            // worker's connection is gone are a failure (found by the simulator, seed 3).
            result = &mut task => match result? {
                Ended::Complete => break true,
                ended => {
                    eprintln!("coordinator: attempt {attempt} failed: every worker stopped reporting ({ended:?})");
                    break false;
                }
            },
            Some(from_worker) = from_workers.recv() => match from_worker {
                FromWorker::Failed { worker, reason } => {
                    eprintln!("coordinator: attempt {attempt} failed: worker {worker}: {reason}");
                    break false;
                }
                FromWorker::Answer { id, rows } => {
                    if let Some(writer) = queries.remove(&id) {
                        answer(writer, rows);
                    }
                }
                FromWorker::Alignment { worker, minima } => {
                    for (to, view) in alignment.publish(worker, minima_of_wire(minima)) {
                        let _ = outboxes[to].send(Control::Alignment { minima: minima_to_wire(&view) });
                    }
                }
            },
            Some(arrived) = incoming.recv() => match arrived {
                Incoming::Worker(worker) => waiting.push(worker),
                Incoming::Query { operator, key, writer } => match plan.locate_key(&operator, key) {
                    Ok((_, node)) => {
                        let (id, worker) = (query_next, worker_of_node[usize::from(node)]);
                        query_next += 1;
                        queries.insert(id, writer);
                        let _ = outboxes[worker].send(Control::QueryNode { id, node, operator, key });
                    }
                    Err(reason) => answer(writer, Err(reason)),
                },
            },
        }
    };
    for (_, writer) in queries {
        answer(writer, Err(format!("attempt {attempt} ended before the node answered; ask again")));
    }
    let last = if completed { Control::JobDone } else { Control::Stop };
    for outbox in &outboxes {
        let _ = outbox.send(last.clone());
    }
    // Let the writers deliver the last message before the connections close.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(completed)
}

/// An acknowledgement's snapshot travels as a one-task manifest.
fn encode_snapshot(checkpoint: sabot_kernel::element::CheckpointId, snapshot: TaskSnapshot) -> Vec<u8> {
    Manifest {
        version: sabot_kernel::checkpoint::manifest::MANIFEST_VERSION,
        job: String::new(),
        checkpoint,
        savepoint: false,
        max_parallelism: 0,
        tasks: vec![snapshot],
    }
    .encode()
}

fn decode_snapshot(bytes: &[u8]) -> Result<TaskSnapshot, String> {
    let manifest = Manifest::decode(bytes).map_err(|error| format!("acknowledgement: {error}"))?;
    let [task] = <[TaskSnapshot; 1]>::try_from(manifest.tasks)
        .map_err(|tasks| format!("acknowledgement with {} tasks", tasks.len()))?;
    Ok(task)
}

/// Serves attempts of the job until the coordinator says it is complete (or is gone).
pub async fn run_worker(settings: WorkerSettings) -> Result<(), DriverError> {
    if settings.nodes == 0 {
        return Err(DriverError::Coordinator("a worker runs at least one node".into()));
    }
    let address = settings.listen;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| DriverError::NodeLost { node: u16::MAX, reason: format!("binding {address}: {error}") })?;
    let name = listener.local_addr().map_err(io)?.to_string();
    loop {
        let stream = match connect(settings.coordinator).await {
            Ok(stream) => stream,
            Err(reason) => {
                eprintln!("worker {name}: no coordinator at {}: {reason}; exiting", settings.coordinator);
                return Ok(());
            }
        };
        stream.set_nodelay(true).ok();
        let (reader, mut writer) = split(stream);
        let mut reader = ControlReader::new(reader);
        let register =
            Control::Register { secret: settings.secret.clone(), address: name.clone(), nodes: settings.nodes };
        if let Err(reason) = send(&mut writer, &register).await {
            eprintln!("worker {name}: registering: {reason}");
            continue;
        }
        // Waiting for the other workers may take long: no timeout but the connection's.
        let assignment = match reader.next(Duration::from_secs(24 * 3600)).await {
            Ok(Control::Assign(assignment)) => assignment,
            Ok(Control::JobDone) => return Ok(()),
            Ok(other) => {
                eprintln!("worker {name}: expected an assignment, got {other:?}");
                continue;
            }
            Err(reason) => {
                eprintln!("worker {name}: coordinator lost before the assignment: {reason}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match run_assignment(&settings, &listener, assignment, reader, writer).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => eprintln!("worker {name}: attempt failed: {error}"),
        }
    }
}

async fn connect(address: SocketAddr) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs this worker's nodes for one attempt, each on its own task: `true` once the job is complete.
async fn run_assignment(
    settings: &WorkerSettings,
    listener: &TcpListener,
    assignment: Assignment,
    reader: ControlReader,
    writer: OwnedWriteHalf,
) -> Result<bool, DriverError> {
    let graph = super::job_graph(&assignment.job)?;
    let plan = Arc::new(PhysicalPlan::new(graph, assignment.node_processes.len() as u16));
    let (outbox, queue) = mpsc::unbounded_channel::<Control>();
    tokio::spawn(write_loop(writer, queue));
    let fail = |error: DriverError| {
        let _ = outbox.send(Control::Failed { reason: error.to_string() });
        error
    };
    let nodes = assignment.nodes();
    if nodes.len() > usize::from(settings.nodes) {
        let reason = format!("assigned {} nodes, offered {}", nodes.len(), settings.nodes);
        return Err(fail(DriverError::Coordinator(reason)));
    }
    let mut addresses = Vec::new();
    for address in &assignment.addresses {
        let parsed = address.parse().map_err(|_| DriverError::Coordinator(format!("peer address {address:?}")));
        addresses.push(parsed.map_err(&fail)?);
    }
    let config = assignment_config(settings, &assignment, &plan, nodes[0]).map_err(&fail)?;
    let built = nodes.iter().map(|&node| build_node(&plan, node, &config)).collect::<Result<Vec<_>, _>>();
    let built = built.map_err(&fail)?;
    // Reports of the nodes become control messages.
    let (report_sender, reports) = mpsc::unbounded_channel::<Report>();
    tokio::spawn(forward_reports(reports, outbox.clone()));
    // Every node's commands: from the coordinator (through the dispatcher) and from its snapshot
    // writers.
    let mut command_senders = BTreeMap::new();
    let mut command_receivers = Vec::new();
    for &node in &nodes {
        let (sender, receiver) = mpsc::unbounded_channel::<Command>();
        command_senders.insert(node, sender);
        command_receivers.push(receiver);
    }
    let (job_done_sender, mut job_done) = tokio::sync::oneshot::channel::<bool>();
    let (stopped_sender, mut stopped) = tokio::sync::watch::channel(false);
    let alignment = AlignmentBoard::for_plan(&plan);
    if let Some(board) = &alignment {
        tokio::spawn(publish_alignment(board.clone(), outbox.clone(), stopped.clone()));
    }
    // Completed checkpoints, for every node of this worker.
    let completed = Arc::new(Completed::new());
    let dispatching =
        Dispatch { commands: command_senders.clone(), completed: completed.clone(), alignment: alignment.clone() };
    tokio::spawn(dispatch(reader, dispatching, stopped_sender, job_done_sender));
    // One connection per peer worker, shared by this worker's nodes. The attempt may end while
    // peers connect (another worker failed): stop waiting then. Commands wait in their queues.
    let tcp = ProcessConfig {
        process: assignment.process,
        attempt: assignment.attempt,
        addresses,
        node_processes: assignment.node_processes.clone(),
        secret: settings.secret.clone(),
    };
    let endpoints = tokio::select! {
        connected = TcpTransport::connect_process(plan.clone(), tcp, listener) => connected.map_err(|error| {
            let reason = format!("process {} connecting to its peers: {error}", assignment.process);
            fail(DriverError::NodeLost { node: nodes[0], reason })
        })?,
        _ = stopped.wait_for(|stopped| *stopped) => return Ok((&mut job_done).await.unwrap_or(false)),
    };
    assert_eq!(endpoints.len(), nodes.len(), "one endpoint per node of process {}", assignment.process);
    // Each node runs on its own task, and reports its failure at once (the coordinator then stops
    // the attempt, and so the other nodes).
    let mut tasks = Vec::new();
    for ((node, commands), transport) in built.into_iter().zip(command_receivers).zip(endpoints) {
        let control = NodeControl::new(report_sender.clone(), settings.data_dir.clone(), completed.clone());
        let (outbox, alignment) = (outbox.clone(), alignment.clone());
        tasks.push(tokio::spawn(async move {
            let progress = Progress::default();
            let mut driver = NodeDriver {
                node,
                transport,
                clock: TokioClock::new(),
                progress,
                commands,
                control: Some(control),
                alignment,
            };
            let result = driver.run().await;
            if driver.alignment.is_some() {
                let metrics = driver.node.metrics();
                eprintln!(
                    "worker: node {}: sources paused for watermark alignment {} times",
                    driver.node.index(),
                    metrics.source_paused_count
                );
            }
            drop(driver);
            if let Err(error) = &result {
                let _ = outbox.send(Control::Failed { reason: error.to_string() });
            }
            result
        }));
    }
    drop((report_sender, command_senders));
    let mut first_error = None;
    for task in tasks {
        let result =
            task.await.unwrap_or_else(|error| Err(DriverError::NodeLost { node: u16::MAX, reason: error.to_string() }));
        first_error = first_error.or(result.err());
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    // Stopped: by the end of the job or of the attempt.
    Ok((&mut job_done).await.unwrap_or(false))
}

/// How this worker's nodes run in one attempt: state, checkpoints, the checkpoint to restore.
fn assignment_config(
    settings: &WorkerSettings,
    assignment: &Assignment,
    plan: &PhysicalPlan,
    first_node: u16,
) -> Result<DriverConfig, DriverError> {
    let restore = match assignment.restore {
        Some(id) => {
            let mut storage = LocalFsStorage::open(&settings.data_dir)
                .map_err(|error| DriverError::DataDir { path: settings.data_dir.clone(), error })?;
            let manifest = load(&mut storage, &plan.graph.name, id).map_err(|reason| DriverError::NodeLost {
                node: first_node,
                reason: format!("checkpoint {} {reason}", id.0),
            })?;
            Some(manifest)
        }
        None => None,
    };
    Ok(DriverConfig {
        data_dir: settings.data_dir.clone(),
        state: settings.state.clone(),
        checkpoints: assignment.checkpointing.then_some(CheckpointSettings {
            interval_ms: 0,
            retained_count: 1,
            unaligned: false,
            alignment_timeout_ms: assignment.alignment_timeout_ms,
        }),
        restore,
        stop_with_savepoint_after_ms: None,
        transport: TransportKind::InProcess,
    })
}

/// Turns the reports of this worker's nodes into control messages to the coordinator.
async fn forward_reports(mut reports: mpsc::UnboundedReceiver<Report>, outbox: mpsc::UnboundedSender<Control>) {
    while let Some(report) = reports.recv().await {
        let message = match report {
            Report::Ack(checkpoint, snapshot) => {
                // BUGGIFY: a late acknowledgement (the checkpoint may time out or overlap the next).
                crate::buggify::delay(Duration::from_millis(1_000)).await;
                Control::Ack { checkpoint, snapshot: encode_snapshot(checkpoint, snapshot) }
            }
            Report::Finished(node) => Control::Finished { node },
            Report::Done(node) => Control::Done { node },
            Report::Answer(id, rows) => Control::Answer { id, rows },
        };
        if outbox.send(message).is_err() {
            return;
        }
    }
}

/// How often a worker looks whether its process's alignment minima changed (and then sends
/// them to the coordinator): the lag, beside a round trip, with which sources in other
/// processes learn of them.
const ALIGNMENT_PUBLISH_INTERVAL: Duration = Duration::from_millis(2);

/// Sends this process's alignment minima to the coordinator whenever they change, until the
/// attempt stops.
async fn publish_alignment(
    board: Arc<AlignmentBoard>,
    outbox: mpsc::UnboundedSender<Control>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut sent = None;
    let mut ticker = tokio::time::interval(ALIGNMENT_PUBLISH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.wait_for(|stopped| *stopped) => return,
        }
        let minima = board.process_minima();
        if sent.as_ref() == Some(&minima) {
            continue;
        }
        let message = Control::Alignment { minima: minima_to_wire(&minima) };
        if outbox.send(message).is_err() {
            return;
        }
        sent = Some(minima);
    }
}

/// Per alignment group, in group order, a minimum watermark (`None`: nothing holds it back).
type GroupMinima = Vec<(String, Option<EventTime>)>;

fn minima_to_wire(minima: &[(String, Option<EventTime>)]) -> Vec<(String, Option<i64>)> {
    minima.iter().map(|(group, minimum)| (group.clone(), minimum.map(|w| w.0))).collect()
}

fn minima_of_wire(minima: Vec<(String, Option<i64>)>) -> Vec<(String, Option<EventTime>)> {
    minima.into_iter().map(|(group, minimum)| (group, minimum.map(EventTime))).collect()
}

/// Watermark alignment across workers, kept by the coordinator: each worker's minima per group,
/// and what each worker was last told (per group, the minimum over the other workers).
#[derive(Debug)]
struct AlignmentRelay {
    published: Vec<BTreeMap<String, Option<EventTime>>>,
    told: Vec<Option<GroupMinima>>,
}

impl AlignmentRelay {
    fn new(workers: usize) -> AlignmentRelay {
        AlignmentRelay { published: vec![BTreeMap::new(); workers], told: vec![None; workers] }
    }

    /// Takes worker `from`'s minima; returns, for each worker whose view changed, what to tell it.
    fn publish(&mut self, from: usize, minima: Vec<(String, Option<EventTime>)>) -> Vec<(usize, GroupMinima)> {
        self.published[from] = minima.into_iter().collect();
        let groups: std::collections::BTreeSet<&String> = self.published.iter().flat_map(|p| p.keys()).collect();
        let mut messages = Vec::new();
        for worker in 0..self.published.len() {
            let view: Vec<(String, Option<EventTime>)> = groups
                .iter()
                .map(|&group| {
                    let others = self.published.iter().enumerate().filter(|(w, _)| *w != worker);
                    let minimum = others.filter_map(|(_, minima)| minima.get(group).copied().flatten()).min();
                    (group.clone(), minimum)
                })
                .collect();
            if self.told[worker].as_ref() != Some(&view) {
                self.told[worker] = Some(view.clone());
                messages.push((worker, view));
            }
        }
        messages
    }
}

/// Where a worker's control messages go: each node's commands, and the completed checkpoints
/// every node reads.
struct Dispatch {
    commands: BTreeMap<u16, mpsc::UnboundedSender<Command>>,
    completed: Arc<Completed>,
    /// With sources in alignment groups: where the other processes' minima go.
    alignment: Option<Arc<AlignmentBoard>>,
}

/// Turns control messages into commands, for every node (a query for its node only), and
/// completions into `Completed`; the end of the attempt (or of the coordinator) is Stop, then
/// `stopped`, then whether the job is done.
async fn dispatch(
    mut reader: ControlReader,
    dispatch: Dispatch,
    stopped: tokio::sync::watch::Sender<bool>,
    job_done: tokio::sync::oneshot::Sender<bool>,
) {
    let Dispatch { commands: dispatch, completed, alignment } = dispatch;
    let broadcast = |command: Command| dispatch.values().all(|sender| sender.send(command.clone()).is_ok());
    let done = loop {
        let delivered = match reader.next(HEARTBEAT_TIMEOUT).await {
            Ok(Control::Trigger { checkpoint, kind }) => broadcast(Command::Trigger(checkpoint, kind)),
            // Published before any later Stop is sent: a node takes it before it stops.
            Ok(Control::Complete { checkpoint }) => {
                completed.publish(checkpoint.0);
                true
            }
            Ok(Control::QueryNode { id, node, operator, key }) => match dispatch.get(&node) {
                Some(sender) => sender.send(Command::Query { id, operator, key }).is_ok(),
                None => {
                    eprintln!("worker: a query for node {node}, which does not run here");
                    true
                }
            },
            Ok(Control::Alignment { minima }) => {
                match &alignment {
                    Some(board) => board.set_remote(minima_of_wire(minima)),
                    None => eprintln!("worker: alignment minima for a job without alignment groups"),
                }
                true
            }
            Ok(Control::Stop) => break false,
            Ok(Control::JobDone) => break true,
            Ok(other) => {
                eprintln!("worker: unexpected {other:?} from the coordinator");
                break false;
            }
            Err(reason) => {
                eprintln!("worker: coordinator lost: {reason}");
                break false;
            }
        };
        if !delivered {
            break false;
        }
    };
    broadcast(Command::Stop);
    let _ = stopped.send(true);
    let _ = job_done.send(done);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minima(entries: &[(&str, Option<i64>)]) -> Vec<(String, Option<EventTime>)> {
        entries.iter().map(|&(group, minimum)| (group.to_string(), minimum.map(EventTime))).collect()
    }

    // Goal: the coordinator tells each worker, per group, the minimum over the other workers
    // (never its own minimum back; a worker without a minimum for a group holds nothing back),
    // and only when what that worker would be told changed.
    #[test]
    fn alignment_relay_tells_each_worker_the_others_minimum() {
        let mut relay = AlignmentRelay::new(3);
        let told = relay.publish(0, minima(&[("a", Some(100))]));
        // Workers 1 and 2 learn worker 0's 100; worker 0 hears of nobody else.
        assert_eq!(
            told,
            vec![(0, minima(&[("a", None)])), (1, minima(&[("a", Some(100))])), (2, minima(&[("a", Some(100))]))]
        );
        let told = relay.publish(1, minima(&[("a", Some(40)), ("b", None)]));
        assert_eq!(
            told,
            vec![
                (0, minima(&[("a", Some(40)), ("b", None)])),
                (1, minima(&[("a", Some(100)), ("b", None)])),
                (2, minima(&[("a", Some(40)), ("b", None)])),
            ]
        );
        // Worker 2's first minimum is above the others': no worker's view changes, nothing is sent.
        let told = relay.publish(2, minima(&[("a", Some(500))]));
        assert_eq!(told, vec![]);
        // Worker 1 moves past the others: worker 0 now waits for worker 2, worker 2 for worker 0.
        let told = relay.publish(1, minima(&[("a", Some(700)), ("b", None)]));
        assert_eq!(
            told,
            vec![(0, minima(&[("a", Some(500)), ("b", None)])), (2, minima(&[("a", Some(100)), ("b", None)]))]
        );
    }
}
