//! Beyond one process: `sabot coordinator` and `sabot worker`.
//!
//! Workers register with the coordinator (the job's secret, and the address their node listens
//! on for peers). Once the configured number registered, the coordinator opens an *attempt*: it
//! finds the latest completed checkpoint, assigns node `i` to the `i`-th worker, and runs the
//! checkpoint coordinator over their control connections; the workers connect to each other
//! (`crate::tcp`) and run their nodes. Any failure — a worker that dies (its connection closes
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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sabot_kernel::checkpoint::manifest::{find_latest, load, sweep_before, Manifest, TaskSnapshot};
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::wire::{Assignment, Control, FrameDecoder, JobSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{
    build_node, coordinate, CheckpointSettings, CheckpointStats, Command, CoordinatorTask, DriverConfig, DriverError,
    NodeControl, NodeDriver, Progress, Report, StateKind, TransportKind,
};
use crate::clock::TokioClock;
use crate::fs_storage::LocalFsStorage;
use crate::tcp::{constant_time_eq, TcpConfig, TcpTransport, HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT};

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
    /// Where this worker's node listens for its peers.
    pub listen: SocketAddr,
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
    writer.write_all(&bytes).await.map_err(|error| format!("writing: {error}"))
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

/// A registered worker of the attempt being formed.
struct Registered {
    address: String,
    reader: ControlReader,
    writer: OwnedWriteHalf,
}

/// Accepts connections until one registers with the right secret.
async fn accept_worker(listener: &TcpListener, secret: &[u8]) -> Result<Registered, DriverError> {
    loop {
        let (stream, from) = listener.accept().await.map_err(|error| DriverError::Coordinator(error.to_string()))?;
        stream.set_nodelay(true).ok();
        let (reader, writer) = stream.into_split();
        let mut reader = ControlReader::new(reader);
        match reader.next(HANDSHAKE_TIMEOUT).await {
            Ok(Control::Register { secret: presented, address }) if constant_time_eq(&presented, secret) => {
                return Ok(Registered { address, reader, writer });
            }
            Ok(Control::Register { .. }) => eprintln!("coordinator: refused {from}: it presented the wrong secret"),
            Ok(other) => eprintln!("coordinator: refused {from}: it began with {other:?} instead of registering"),
            Err(reason) => eprintln!("coordinator: refused {from}: {reason}"),
        }
    }
}

/// How long a new attempt waits for replacements of lost workers before it goes on without them.
pub const REGROUP_GRACE: Duration = Duration::from_secs(2);

/// Attempts after which the coordinator gives up on a job that keeps failing.
pub const ATTEMPTS_MAX: u64 = 100;

/// What ends an attempt early.
enum Failure {
    Worker { node: u16, reason: String },
}

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
    let started = std::time::Instant::now();
    let mut attempt = 0_u64;
    loop {
        attempt += 1;
        if attempt > ATTEMPTS_MAX {
            return Err(DriverError::Coordinator(format!(
                "the job failed {ATTEMPTS_MAX} attempts in a row; giving up"
            )));
        }
        let mut workers = Vec::new();
        // The first attempt waits for every worker; later ones wait a grace period for
        // replacements, then go on with the workers that remain (at least `min_workers`).
        let grace = (attempt > 1).then(|| tokio::time::Instant::now() + REGROUP_GRACE);
        while workers.len() < usize::from(settings.workers) {
            let enough = workers.len() >= usize::from(settings.min_workers.max(1));
            match grace {
                Some(deadline) if enough => {
                    match tokio::time::timeout_at(deadline, accept_worker(&listener, &settings.secret)).await {
                        Ok(worker) => workers.push(worker?),
                        Err(_) => break,
                    }
                }
                _ => workers.push(accept_worker(&listener, &settings.secret).await?),
            }
        }
        let recovery = find_latest(&mut storage, &graph.name).map_err(|e| DriverError::Coordinator(e.to_string()))?;
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
                sweep_before(&mut storage, &graph.name, manifest)
                    .map_err(|e| DriverError::Coordinator(e.to_string()))?;
            }
        }
        eprintln!(
            "coordinator: [{:.3} s] attempt {attempt} with {} workers, {}",
            started.elapsed().as_secs_f64(),
            workers.len(),
            restore.as_ref().map_or("from the start".to_string(), |m| format!("from checkpoint {}", m.checkpoint.0))
        );
        match run_attempt(&settings, &graph, attempt, workers, restore).await? {
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

/// One attempt: `true` when the job completed, `false` when a failure ended it.
async fn run_attempt(
    settings: &CoordinatorSettings,
    graph: &sabot_kernel::dataflow::JobGraph,
    attempt: u64,
    workers: Vec<Registered>,
    restore: Option<Manifest>,
) -> Result<bool, DriverError> {
    let node_count = workers.len() as u16;
    let plan = PhysicalPlan::new(graph.clone(), node_count);
    let addresses: Vec<String> = workers.iter().map(|w| w.address.clone()).collect();
    let (report_sender, reports) = mpsc::unbounded_channel::<Report>();
    let (failure_sender, mut failures) = mpsc::unbounded_channel::<Failure>();
    let mut command_senders = Vec::new();
    let mut outboxes = Vec::new();
    for (node, worker) in workers.into_iter().enumerate() {
        let node = node as u16;
        let Registered { mut reader, mut writer, .. } = worker;
        let assignment = Assignment {
            attempt,
            job: settings.job.clone(),
            node,
            addresses: addresses.clone(),
            checkpointing: true,
            alignment_timeout_ms: settings.checkpoints.alignment_timeout_ms,
            restore: restore.as_ref().map(|m| m.checkpoint),
        };
        if let Err(reason) = send(&mut writer, &Control::Assign(assignment)).await {
            let _ = failure_sender.send(Failure::Worker { node, reason });
        }
        let (outbox, queue) = mpsc::unbounded_channel::<Control>();
        tokio::spawn(write_loop(writer, queue));
        // Coordinator commands for this worker become control messages.
        let (commands, mut command_queue) = mpsc::unbounded_channel::<Command>();
        let forward = outbox.clone();
        tokio::spawn(async move {
            while let Some(command) = command_queue.recv().await {
                let message = match command {
                    Command::Trigger(checkpoint, kind) => Control::Trigger { checkpoint, kind },
                    Command::Complete(checkpoint) => Control::Complete { checkpoint },
                    // The attempt's end (Stop or JobDone) is sent below, once.
                    Command::Stop | Command::Written(..) => continue,
                };
                if forward.send(message).is_err() {
                    return;
                }
            }
        });
        command_senders.push(commands);
        outboxes.push(outbox);
        let (reports, failures) = (report_sender.clone(), failure_sender.clone());
        tokio::spawn(async move {
            loop {
                let report = match reader.next(HEARTBEAT_TIMEOUT).await {
                    Ok(Control::Ack { checkpoint, snapshot }) => match decode_snapshot(&snapshot) {
                        Ok(snapshot) => Report::Ack(checkpoint, snapshot),
                        Err(reason) => {
                            let _ = failures.send(Failure::Worker { node, reason });
                            return;
                        }
                    },
                    Ok(Control::Finished { .. }) => Report::Finished(node),
                    Ok(Control::Done { .. }) => Report::Done(node),
                    Ok(Control::Failed { reason }) => {
                        let _ = failures.send(Failure::Worker { node, reason });
                        return;
                    }
                    Ok(other) => {
                        let reason = format!("sent {other:?}, which workers do not send");
                        let _ = failures.send(Failure::Worker { node, reason });
                        return;
                    }
                    Err(reason) => {
                        let _ = failures.send(Failure::Worker { node, reason });
                        return;
                    }
                };
                if reports.send(report).is_err() {
                    return;
                }
            }
        });
    }
    drop(report_sender);
    let clock = TokioClock::new();
    let coordinator = super::job_coordinator(graph, &settings.checkpoints, restore);
    let storage = LocalFsStorage::open(&settings.data_dir)
        .map_err(|error| DriverError::DataDir { path: settings.data_dir.clone(), error })?;
    let task = coordinate(CoordinatorTask {
        coordinator,
        reports,
        commands: command_senders.clone(),
        storage,
        clock,
        node_count: plan.node_count,
        stats: CheckpointStats::default(),
        savepoint_at: None,
        unaligned: settings.checkpoints.unaligned,
    });
    let completed = tokio::select! {
        result = task => {
            result?;
            true
        }
        Some(Failure::Worker { node, reason }) = failures.recv() => {
            eprintln!("coordinator: attempt {attempt} failed: node {node}: {reason}");
            false
        }
    };
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
    let listener = TcpListener::bind(settings.listen).await.map_err(|error| DriverError::NodeLost {
        node: u16::MAX,
        reason: format!("binding {}: {error}", settings.listen),
    })?;
    let address = listener.local_addr().map_err(io)?.to_string();
    loop {
        let stream = match connect(settings.coordinator).await {
            Ok(stream) => stream,
            Err(reason) => {
                eprintln!("worker {address}: no coordinator at {}: {reason}; exiting", settings.coordinator);
                return Ok(());
            }
        };
        stream.set_nodelay(true).ok();
        let (reader, mut writer) = stream.into_split();
        let mut reader = ControlReader::new(reader);
        let register = Control::Register { secret: settings.secret.clone(), address: address.clone() };
        if let Err(reason) = send(&mut writer, &register).await {
            eprintln!("worker {address}: registering: {reason}");
            continue;
        }
        // Waiting for the other workers may take long: no timeout but the connection's.
        let assignment = match reader.next(Duration::from_secs(24 * 3600)).await {
            Ok(Control::Assign(assignment)) => assignment,
            Ok(Control::JobDone) => return Ok(()),
            Ok(other) => {
                eprintln!("worker {address}: expected an assignment, got {other:?}");
                continue;
            }
            Err(reason) => {
                eprintln!("worker {address}: coordinator lost before the assignment: {reason}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match run_assignment(&settings, &listener, assignment, reader, writer).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => eprintln!("worker {address}: attempt failed: {error}"),
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

/// Runs this worker's node for one attempt: `true` once the job is complete.
async fn run_assignment(
    settings: &WorkerSettings,
    listener: &TcpListener,
    assignment: Assignment,
    mut reader: ControlReader,
    writer: OwnedWriteHalf,
) -> Result<bool, DriverError> {
    let node_index = assignment.node;
    let graph = super::job_graph(&assignment.job)?;
    let node_count = assignment.addresses.len() as u16;
    let plan = Arc::new(PhysicalPlan::new(graph, node_count));
    let mut addresses = Vec::new();
    for address in &assignment.addresses {
        let parsed = address.parse().map_err(|_| DriverError::Coordinator(format!("peer address {address:?}")))?;
        addresses.push(parsed);
    }
    let restore = match assignment.restore {
        Some(id) => {
            let mut storage = LocalFsStorage::open(&settings.data_dir)
                .map_err(|error| DriverError::DataDir { path: settings.data_dir.clone(), error })?;
            let manifest = load(&mut storage, &plan.graph.name, id).map_err(|reason| DriverError::NodeLost {
                node: node_index,
                reason: format!("checkpoint {} {reason}", id.0),
            })?;
            Some(manifest)
        }
        None => None,
    };
    let config = DriverConfig {
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
    };
    let (outbox, queue) = mpsc::unbounded_channel::<Control>();
    tokio::spawn(write_loop(writer, queue));
    let fail = |outbox: &mpsc::UnboundedSender<Control>, error: DriverError| {
        let _ = outbox.send(Control::Failed { reason: error.to_string() });
        error
    };
    let (command_sender, commands) = mpsc::unbounded_channel::<Command>();
    let (report_sender, mut reports) = mpsc::unbounded_channel::<Report>();
    // Reports of the node become control messages.
    let forward = outbox.clone();
    tokio::spawn(async move {
        while let Some(report) = reports.recv().await {
            let message = match report {
                Report::Ack(checkpoint, snapshot) => {
                    Control::Ack { checkpoint, snapshot: encode_snapshot(checkpoint, snapshot) }
                }
                Report::Finished(node) => Control::Finished { node },
                Report::Done(node) => Control::Done { node },
            };
            if forward.send(message).is_err() {
                return;
            }
        }
    });
    // Control messages become commands; the end of the attempt (or of the coordinator) is Stop.
    let (job_done_sender, mut job_done) = tokio::sync::oneshot::channel::<bool>();
    let commands_in = command_sender.clone();
    tokio::spawn(async move {
        let done = loop {
            let command = match reader.next(HEARTBEAT_TIMEOUT).await {
                Ok(Control::Trigger { checkpoint, kind }) => Command::Trigger(checkpoint, kind),
                Ok(Control::Complete { checkpoint }) => Command::Complete(checkpoint),
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
            if commands_in.send(command).is_err() {
                break false;
            }
        };
        let _ = commands_in.send(Command::Stop);
        let _ = job_done_sender.send(done);
    });
    let node = build_node(&plan, node_index, &config).map_err(|error| fail(&outbox, error))?;
    let tcp = TcpConfig { node: node_index, attempt: assignment.attempt, addresses, secret: settings.secret.clone() };
    // The attempt may end while peers connect (another worker failed): stop waiting for them then.
    let transport = tokio::select! {
        connected = TcpTransport::connect(plan.clone(), tcp, listener) => connected
            .map_err(|error| fail(&outbox, DriverError::NodeLost { node: node_index, reason: error.to_string() }))?,
        done = &mut job_done => return Ok(done.unwrap_or(false)),
    };
    let control = NodeControl {
        commands_own: command_sender,
        reports: report_sender,
        data_dir: settings.data_dir.clone(),
        finished_reported: false,
        done_reported: false,
    };
    let mut driver = NodeDriver {
        node,
        transport,
        clock: TokioClock::new(),
        progress: Progress::default(),
        commands,
        control: Some(control),
    };
    let result = driver.run().await;
    drop(driver);
    if let Err(error) = result {
        let _ = outbox.send(Control::Failed { reason: error.to_string() });
        return Err(error);
    }
    // Stopped: by the end of the job or of the attempt.
    Ok((&mut job_done).await.unwrap_or(false))
}
