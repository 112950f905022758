//! The tokio driver: one kernel node per worker thread, elements moved between nodes by bounded
//! channels.
//!
//! The driver decides nothing: it reads the clock, offers elements to the kernel node
//! (`handle_element`), lets it work (`handle_step`) and moves what it hands out (`poll_transmit`)
//! to the receiving node. A full channel stops that node's sends, which stops its sources
//! (the kernel pauses sources while its outbox is full): backpressure without unbounded buffers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sabot_kernel::checkpoint::coordinator::{Action, CheckpointKind, Coordinator, CoordinatorConfig};
use sabot_kernel::checkpoint::manifest::{manifest_path, persist, Manifest, TaskSnapshot};
use sabot_kernel::dataflow::{PhysicalPlan, SubtaskId};
use sabot_kernel::element::Element;
use sabot_kernel::element::{BarrierKind, CheckpointId};
use sabot_kernel::env::Storage;
use sabot_kernel::env::{ChannelId, Clock, SendRefused, Transport, TransportError};
use sabot_kernel::key_group::KeyGroupRange;
use sabot_kernel::node::{Event, Node, NodeError, NodeMetrics, NodeOptions, Step};
use sabot_kernel::state::{HeapBackend, SnapshotWrite, StateBackend, StateError};
use sabot_kernel::time::{EventTime, Instant};
use sabot_sync::board::MinimumBoard;
use sabot_sync::channel as queue;
use sabot_sync::completed::{Completed, CompletedCursor};
use sabot_sync::handoff::{Handoff, Outcome};
use sabot_sync::signal::Notified;
use tokio::sync::mpsc;

use crate::clock::TokioClock;
use crate::fs_storage::LocalFsStorage;

pub mod cluster;

/// Elements a channel between two nodes holds before the sender waits.
pub const NODE_CHANNEL_CAPACITY: usize = 4;

type Envelope = (ChannelId, Element);

/// Where keyed state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// In memory (`HeapBackend`).
    Heap,
    /// RocksDB, one database per stateful subtask under `<data dir>/state/<job>/`.
    #[cfg(not(madsim))]
    RocksDb,
}

#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Root of storage: sink output under `output/`, RocksDB state under `state/`, checkpoints
    /// under `checkpoints/`.
    pub data_dir: PathBuf,
    pub state: StateKind,
    /// Take checkpoints, and commit output only for completed ones.
    pub checkpoints: Option<CheckpointSettings>,
    /// Start from this completed checkpoint (found with `manifest::find_latest`).
    pub restore: Option<Manifest>,
    /// With checkpoints: take a savepoint this long after the start, and stop once it completed.
    pub stop_with_savepoint_after_ms: Option<u64>,
    /// How nodes reach each other.
    pub transport: TransportKind,
}

/// How the nodes of a run reach each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    /// Bounded in-process channels.
    #[default]
    InProcess,
    /// TCP connections on loopback, in the wire format, with credit-based flow control
    /// (`crate::tcp`): what separate worker processes use, in one process (each node plays a
    /// process of its own, so every channel between nodes crosses TCP).
    TcpLoopback,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every record was processed and its output committed.
    Finished,
    /// Stopped on request after this savepoint completed; start from it to go on.
    StoppedWithSavepoint(CheckpointId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointSettings {
    pub interval_ms: u64,
    /// Completed checkpoints kept on disk.
    pub retained_count: usize,
    /// Periodic checkpoints use unaligned barriers (savepoints stay aligned).
    pub unaligned: bool,
    /// Aligned barriers waiting longer than this switch to unaligned.
    pub alignment_timeout_ms: Option<u64>,
}

/// Counters of the checkpoint coordinator, for progress reports and summaries.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    inner: Arc<Mutex<(u64, u64)>>,
}

impl CheckpointStats {
    /// Checkpoints completed and aborted in this run.
    pub fn completed_aborted(&self) -> (u64, u64) {
        *self.inner.lock().expect("stats lock")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("data directory {path}: {error}")]
    DataDir { path: PathBuf, error: std::io::Error },
    #[error("node {node} stopped: {reason}")]
    NodeLost { node: u16, reason: String },
    #[error("checkpoint coordinator: {0}")]
    Coordinator(String),
}

/// Counters of every node, refreshed as nodes run, for progress reports.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    nodes: Arc<Mutex<Vec<NodeMetrics>>>,
}

impl Progress {
    fn publish(&self, node: u16, metrics: NodeMetrics) {
        let mut nodes = self.nodes.lock().expect("progress lock");
        if nodes.len() <= usize::from(node) {
            nodes.resize(usize::from(node) + 1, NodeMetrics::default());
        }
        nodes[usize::from(node)] = metrics;
    }

    /// The sum over nodes.
    pub fn total(&self) -> NodeMetrics {
        self.nodes.lock().expect("progress lock").iter().copied().sum()
    }
}

/// Creates the state backend of one subtask.
#[cfg_attr(madsim, allow(unused_variables))]
fn open_backend(
    config: &DriverConfig,
    job: &str,
    subtask: SubtaskId,
    range: KeyGroupRange,
) -> Result<Box<dyn StateBackend>, StateError> {
    match config.state {
        StateKind::Heap => Ok(Box::new(HeapBackend::new(range))),
        #[cfg(not(madsim))]
        StateKind::RocksDb => {
            let path = config.data_dir.join("state").join(job).join(format!("{}-{}", subtask.vertex.0, subtask.index));
            // A tuning knob, also for tests that want state to reach RocksDB's files quickly.
            let cache = std::env::var("SABOT_ROCKSDB_CACHE_ENTRIES").ok().and_then(|v| v.parse().ok());
            let cache_entries_max = cache.unwrap_or(crate::rocks::CACHE_ENTRIES_MAX).max(2);
            // The block cache each subtask's RocksDB has (shared by its states), in MiB.
            let block_cache_mb: Option<usize> =
                std::env::var("SABOT_ROCKSDB_BLOCK_CACHE_MB").ok().and_then(|v| v.parse().ok());
            let block_cache_size = block_cache_mb.map_or(crate::rocks::BLOCK_CACHE_SIZE_DEFAULT, |mb| mb << 20);
            let config = crate::rocks::RocksDbConfig { cache_entries_max, block_cache_size };
            Ok(Box::new(crate::rocks::RocksDbBackend::open_empty_with(path, range, config)?))
        }
    }
}

/// Builds every node of `plan` with its storage and state.
pub fn build_nodes(plan: &Arc<PhysicalPlan>, config: &DriverConfig) -> Result<Vec<Node>, DriverError> {
    (0..plan.node_count).map(|index| build_node(plan, index, config)).collect()
}

/// Builds node `index` of `plan` with its storage and state.
pub fn build_node(plan: &Arc<PhysicalPlan>, index: u16, config: &DriverConfig) -> Result<Node, DriverError> {
    let job = plan.graph.name.clone();
    let storage = LocalFsStorage::open(&config.data_dir)
        .map_err(|error| DriverError::DataDir { path: config.data_dir.clone(), error })?;
    let mut backends = |subtask, range| open_backend(config, &job, subtask, range);
    Ok(Node::new(
        plan.clone(),
        index,
        Box::new(storage),
        &mut backends,
        NodeOptions {
            checkpointing: config.checkpoints.is_some(),
            restore: config.restore.clone().map(Arc::new),
            alignment_timeout_ms: config.checkpoints.as_ref().and_then(|c| c.alignment_timeout_ms),
        },
    )?)
}

/// The checkpoint coordinator of a job run by this driver: one checkpoint in flight at a time.
/// The checkpoint coordinator of a job's attempt. Its checkpoints are numbered after every id
/// `storage` holds (`manifest::newest_checkpoint_id`): reusing the id of a checkpoint that
/// recovery passed over would let its old manifest name this attempt's files (found by the
/// simulator).
fn job_coordinator(
    graph: &sabot_kernel::dataflow::JobGraph,
    settings: &CheckpointSettings,
    restore: Option<Manifest>,
    storage: &mut LocalFsStorage,
) -> Result<Coordinator, DriverError> {
    let newest = sabot_kernel::checkpoint::manifest::newest_checkpoint_id(storage)
        .map_err(|error| DriverError::Coordinator(format!("listing checkpoints: {error}")))?;
    let mut coordinator = Coordinator::new(
        CoordinatorConfig {
            interval_ms: settings.interval_ms,
            timeout_ms: CHECKPOINT_TIMEOUT_MS,
            concurrent_max: 1,
            retained_count: settings.retained_count,
        },
        &graph.name,
        graph.max_parallelism.get(),
        graph.subtasks(),
        restore,
    );
    if let Some(newest) = newest {
        coordinator.continue_after(newest);
    }
    Ok(coordinator)
}

/// Removes what an earlier run of `job` left in `data_dir` (output, state, checkpoints that would
/// no longer match them), so that a run with no checkpoint to resume from starts fresh. Returns
/// the directories it removed.
pub fn clear_previous(data_dir: &std::path::Path, job: &str) -> Result<Vec<PathBuf>, DriverError> {
    let mut removed = Vec::new();
    for dir in [data_dir.join("output").join(job), data_dir.join("state").join(job), data_dir.join("checkpoints")] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(dir),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(DriverError::DataDir { path: dir, error }),
        }
    }
    Ok(removed)
}

/// The job graph a job spec names (the workloads of WORKLOADS.md).
pub fn job_graph(spec: &sabot_kernel::wire::JobSpec) -> Result<sabot_kernel::dataflow::JobGraph, DriverError> {
    let batch_size = spec.batch_size as usize;
    let graph = match spec.name.as_str() {
        "w1" => sabot_kernel::workload::w1_job(spec.records, spec.parallelism, batch_size),
        "w2" => sabot_kernel::workload::w2_job(spec.records, spec.parallelism, batch_size),
        "w3" => sabot_kernel::workload::w3_job(spec.records, spec.parallelism, batch_size),
        "w2-aligned" => sabot_kernel::workload::w2_aligned_job(spec.records, spec.parallelism, batch_size),
        other => return Err(DriverError::Coordinator(format!("unknown job {other:?} (w1, w2, w2-aligned or w3)"))),
    };
    graph.map_err(|error| DriverError::Coordinator(format!("building job {}: {error}", spec.name)))
}

/// Runs `plan` to the end: one tokio task per node on a runtime with one worker per node, and,
/// with checkpoints, a coordinator task. `progress` and `stats` are refreshed while it runs.
pub async fn run(
    plan: Arc<PhysicalPlan>,
    config: DriverConfig,
    progress: Progress,
    stats: CheckpointStats,
) -> Result<RunOutcome, DriverError> {
    let nodes = build_nodes(&plan, &config)?;
    match config.transport {
        TransportKind::InProcess => {
            let transports = InProcTransport::connect(&plan);
            run_nodes(plan, config, progress, stats, nodes, transports).await
        }
        TransportKind::TcpLoopback => {
            let transports = connect_loopback(&plan).await?;
            run_nodes(plan, config, progress, stats, nodes, transports).await
        }
    }
}

/// TCP transports for every node of `plan`, connected on loopback (the job's attempt and a
/// secret of this process's own). Each node plays a process of its own, with its own listener,
/// so that every channel between nodes crosses TCP (`sabot run --transport tcp` exercises the
/// wire; a real worker process shares one connection per peer process among its nodes).
async fn connect_loopback(plan: &Arc<PhysicalPlan>) -> Result<Vec<crate::tcp::TcpTransport>, DriverError> {
    let lost = |node: u16, reason: String| DriverError::NodeLost { node, reason };
    let mut listeners = Vec::new();
    for node in 0..plan.node_count {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| lost(node, format!("binding a loopback port: {error}")))?;
        listeners.push(listener);
    }
    let addresses: Vec<std::net::SocketAddr> = listeners.iter().map(|l| l.local_addr().expect("bound")).collect();
    let secret = format!("{:x}", std::process::id()).into_bytes();
    let connecting: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(node, listener)| {
            let config = crate::tcp::ProcessConfig {
                process: node as u16,
                attempt: 1,
                addresses: addresses.clone(),
                node_processes: (0..plan.node_count).collect(),
                secret: secret.clone(),
            };
            let plan = plan.clone();
            tokio::spawn(async move { crate::tcp::TcpTransport::connect_process(plan, config, &listener).await })
        })
        .collect();
    let mut transports = Vec::new();
    for (node, handle) in connecting.into_iter().enumerate() {
        let connected = handle.await.map_err(|error| lost(node as u16, error.to_string()))?;
        let endpoints = connected.map_err(|error| lost(node as u16, error.to_string()))?;
        assert_eq!(endpoints.len(), 1, "one node per loopback process");
        transports.extend(endpoints);
    }
    Ok(transports)
}

/// Runs `nodes`, each on its transport, with the coordinator when checkpointing.
async fn run_nodes<T: AsyncTransport>(
    plan: Arc<PhysicalPlan>,
    config: DriverConfig,
    progress: Progress,
    stats: CheckpointStats,
    nodes: Vec<Node>,
    transports: Vec<T>,
) -> Result<RunOutcome, DriverError> {
    let clock = TokioClock::new();
    let (report_sender, reports) = mpsc::unbounded_channel();
    let channels: Vec<_> = (0..plan.node_count).map(|_| mpsc::unbounded_channel::<Command>()).collect();
    let command_senders: Vec<_> = channels.iter().map(|(sender, _)| sender.clone()).collect();
    let mut handles = Vec::new();
    let failures: Arc<Mutex<Vec<DriverError>>> = Arc::default();
    let alignment = AlignmentBoard::for_plan(&plan);
    let completed = Arc::new(Completed::new());
    for ((node, transport), (_, commands)) in nodes.into_iter().zip(transports).zip(channels) {
        let control = config
            .checkpoints
            .as_ref()
            .map(|_| NodeControl::new(report_sender.clone(), config.data_dir.clone(), completed.clone()));
        let mut driver = NodeDriver {
            node,
            transport,
            clock: clock.clone(),
            progress: progress.clone(),
            commands,
            control,
            alignment: alignment.clone(),
        };
        // The first failure in time is the cause; later ones (peers gone) are its consequences.
        let (failures, senders) = (failures.clone(), command_senders.clone());
        handles.push(tokio::spawn(async move {
            let result = driver.run().await;
            if let Err(error) = result {
                failures.lock().expect("failures lock").push(error);
                for sender in &senders {
                    let _ = sender.send(Command::Stop);
                }
            }
            // Only now do its channels close: a peer that finds them closed comes second.
            drop(driver);
        }));
    }
    drop(report_sender);
    let coordinator = match &config.checkpoints {
        Some(settings) => {
            let mut storage = LocalFsStorage::open(&config.data_dir)
                .map_err(|error| DriverError::DataDir { path: config.data_dir.clone(), error })?;
            let coordinator = job_coordinator(&plan.graph, settings, config.restore.clone(), &mut storage)?;
            let savepoint_at = config.stop_with_savepoint_after_ms.map(|ms| clock.now().saturating_add_ms(ms));
            let task = coordinate(CoordinatorTask {
                coordinator,
                reports,
                commands: command_senders.clone(),
                announce: Announce::Local(completed),
                storage,
                clock,
                node_count: plan.node_count,
                stats,
                savepoint_at,
                unaligned: settings.unaligned,
            });
            Some(tokio::spawn(task))
        }
        None => None,
    };
    for (index, handle) in handles.into_iter().enumerate() {
        if let Err(error) = handle.await {
            failures
                .lock()
                .expect("failures lock")
                .push(DriverError::NodeLost { node: index as u16, reason: error.to_string() });
        }
    }
    drop(command_senders);
    let first_error = std::mem::take(&mut *failures.lock().expect("failures lock")).into_iter().next();
    // Every node is gone, so the coordinator's reports ended: it returns.
    let ended = match coordinator {
        Some(coordinator) => coordinator.await.map_err(|error| DriverError::Coordinator(error.to_string()))??,
        None => Ended::Complete,
    };
    match (ended, first_error) {
        // Stopped on purpose: a node that found its peer already stopped is no failure.
        (Ended::Savepoint(savepoint), _) => Ok(RunOutcome::StoppedWithSavepoint(savepoint)),
        (_, Some(error)) => Err(error),
        (Ended::Complete, None) => Ok(RunOutcome::Finished),
        (Ended::NodesGone, None) => {
            Err(DriverError::Coordinator("every node stopped before the job was complete".into()))
        }
    }
}

/// Runs the asynchronous part of a snapshot against the job's directory.
fn write_durably(data_dir: &std::path::Path, writes: Vec<Box<dyn SnapshotWrite>>) -> Result<Vec<String>, String> {
    let mut storage = LocalFsStorage::open(data_dir).map_err(|error| format!("{}: {error}", data_dir.display()))?;
    let mut files = Vec::new();
    for write in writes {
        files.extend(write.write(&mut storage).map_err(|error| error.to_string())?);
    }
    Ok(files)
}

/// A checkpoint not complete this long after its trigger is aborted.
const CHECKPOINT_TIMEOUT_MS: u64 = 60_000;

/// What the coordinator tells a node.
#[derive(Clone, Debug)]
enum Command {
    Trigger(CheckpointId, BarrierKind),
    /// A completed checkpoint, for a worker's connection to the coordinator: nodes learn of
    /// completions through `Completed`, never through their commands.
    Complete(CheckpointId),
    /// Every node is done (or one failed): stop.
    Stop,
    /// Queryable state: answer with `Report::Answer` (the cluster's workers only).
    Query {
        id: u64,
        operator: String,
        key: u64,
    },
}

/// What a node tells the coordinator.
#[derive(Debug)]
enum Report {
    Ack(CheckpointId, TaskSnapshot),
    /// Every subtask of the node processed its end of input.
    Finished(u16),
    /// Every subtask of the node finished and its final output is committed.
    Done(u16),
    /// The answer to `Command::Query`: the rows as an Arrow IPC file, or why there are none.
    Answer(u64, Result<Vec<u8>, String>),
}

/// The checkpoint coordinator's task: runs the pure `Coordinator` against real time and disk.
/// What the coordinator's task works with.
struct CoordinatorTask {
    coordinator: Coordinator,
    reports: mpsc::UnboundedReceiver<Report>,
    commands: Vec<mpsc::UnboundedSender<Command>>,
    announce: Announce,
    storage: LocalFsStorage,
    clock: TokioClock,
    node_count: u16,
    stats: CheckpointStats,
    /// When to take the savepoint that stops the job, if one is asked for.
    savepoint_at: Option<Instant>,
    /// Periodic checkpoints use unaligned barriers.
    unaligned: bool,
}

/// How the coordinator announces a completed checkpoint.
enum Announce {
    /// To the nodes of this process, which read it from `Completed`.
    Local(Arc<Completed>),
    /// As `Command::Complete`, which the workers' connections carry to their processes.
    Commands,
}

/// The barriers of a checkpoint: savepoints are always aligned (in-flight data would tie them to
/// one parallelism).
fn barrier_kind(kind: CheckpointKind, unaligned: bool) -> BarrierKind {
    match kind {
        CheckpointKind::Checkpoint if unaligned => BarrierKind::Unaligned,
        CheckpointKind::Checkpoint | CheckpointKind::Savepoint => BarrierKind::Aligned,
    }
}

/// How the coordinator's task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Every node is done: the job is complete, its output committed.
    Complete,
    /// The savepoint that stops the job is complete.
    Savepoint(CheckpointId),
    /// Every node stopped reporting before the job was complete (they failed, or their process
    /// or connection is gone): never a completion.
    NodesGone,
}

async fn coordinate(task: CoordinatorTask) -> Result<Ended, DriverError> {
    let CoordinatorTask {
        mut coordinator,
        mut reports,
        commands,
        announce,
        mut storage,
        clock,
        node_count,
        stats,
        savepoint_at,
        unaligned,
    } = task;
    // A node that stopped early (failure) no longer listens; its failure is reported elsewhere.
    let broadcast = |command: Command| {
        for sender in &commands {
            let _ = sender.send(command.clone());
        }
    };
    let (mut finished, mut done) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    let (mut savepoint_at, mut savepoint) = (savepoint_at, None);
    loop {
        if savepoint_at.is_some_and(|at| clock.now() >= at) {
            savepoint_at = None;
            coordinator.request_savepoint();
        }
        coordinator.handle_timeout(clock.now());
        while let Some(action) = coordinator.poll_action() {
            match action {
                Action::Trigger { checkpoint, kind } => {
                    if kind == CheckpointKind::Savepoint {
                        savepoint = Some(checkpoint);
                    }
                    broadcast(Command::Trigger(checkpoint, barrier_kind(kind, unaligned)));
                }
                Action::Persist { manifest } => match persist(&mut storage, &manifest) {
                    Ok(()) => coordinator.handle_persisted(manifest.checkpoint),
                    Err(error) => {
                        eprintln!("checkpoint {} could not be made durable: {error}", manifest.checkpoint.0);
                        coordinator.handle_persist_failed(manifest.checkpoint, &error.to_string())
                    }
                }
                .map_err(|e| DriverError::Coordinator(e.to_string()))?,
                Action::NotifyComplete { checkpoint } => {
                    stats.inner.lock().expect("stats lock").0 += 1;
                    // Only now, after `persist` made it durable.
                    match &announce {
                        Announce::Local(completed) => completed.publish(checkpoint.0),
                        Announce::Commands => broadcast(Command::Complete(checkpoint)),
                    }
                    if savepoint == Some(checkpoint) && done.len() < usize::from(node_count) {
                        broadcast(Command::Stop);
                        return Ok(Ended::Savepoint(checkpoint));
                    }
                }
                Action::Abort { .. } => stats.inner.lock().expect("stats lock").1 += 1,
                Action::Discard { checkpoint, files } => {
                    // Best effort: a file left behind is garbage, not a correctness problem.
                    for file in files.iter().chain(std::iter::once(&manifest_path(checkpoint))) {
                        let _ = storage.delete(file);
                    }
                }
            }
        }
        if done.len() == usize::from(node_count) {
            broadcast(Command::Stop);
            return Ok(Ended::Complete);
        }
        let wake = coordinator.poll_timeout().into_iter().chain(savepoint_at).min();
        let wake = wake.map_or(u64::MAX / 4, |at| at.saturating_sub(clock.now()));
        tokio::select! {
            biased;
            report = reports.recv() => match report {
                Some(Report::Ack(checkpoint, snapshot)) => {
                    coordinator.handle_ack(checkpoint, snapshot).map_err(|e| DriverError::Coordinator(e.to_string()))?
                }
                Some(Report::Finished(node)) => {
                    finished.insert(node);
                    // Everything ran to its end: commit the final output now, not at the next interval.
                    if finished.len() == usize::from(node_count) {
                        coordinator.request_checkpoint();
                    }
                }
                Some(Report::Done(node)) => {
                    done.insert(node);
                }
                // Queries reach nodes only through a cluster's workers, which forward the answers.
                Some(Report::Answer(..)) => {}
                None => return Ok(Ended::NodesGone),
            },
            _ = tokio::time::sleep(Duration::from_millis(wake)) => {}
        }
    }
}

/// The [`Transport`] between nodes of one process: one bounded channel into each node, which
/// carries the elements of every logical channel that ends there (FIFO per sender, so per channel).
pub struct InProcTransport {
    plan: Arc<PhysicalPlan>,
    receiver: queue::Receiver<Envelope>,
    senders: Vec<queue::Sender<Envelope>>,
}

impl InProcTransport {
    /// One transport per node of `plan`, connected to each other.
    pub fn connect(plan: &Arc<PhysicalPlan>) -> Vec<InProcTransport> {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..plan.node_count).map(|_| queue::bounded::<Envelope>(NODE_CHANNEL_CAPACITY)).unzip();
        receivers
            .into_iter()
            .map(|receiver| InProcTransport { plan: plan.clone(), receiver, senders: senders.clone() })
            .collect()
    }

    fn sender(&self, channel: ChannelId) -> &queue::Sender<Envelope> {
        &self.senders[usize::from(self.plan.node_of(self.plan.channel(channel).to))]
    }
}

/// What a node's driver needs of a transport beyond the kernel's [`Transport`]: ways to wait.
pub trait AsyncTransport: Transport + Send + 'static {
    /// Waits for the next element for this node; an error once the transport broke.
    fn recv(&mut self) -> impl std::future::Future<Output = Result<Envelope, TransportError>> + Send;
    /// Waits until `channel` has room for an element (another sender may take it first: callers
    /// retry `try_send`).
    fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send + 'static;
}

impl AsyncTransport for InProcTransport {
    /// Never ends on its own: this transport holds a sender to its own node.
    async fn recv(&mut self) -> Result<Envelope, TransportError> {
        Ok(self.receiver.recv().await.expect("the transport holds a sender to its own node"))
    }

    fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send + 'static {
        let writable = self.sender(channel).writable();
        async move { writable.await.map_err(|queue::Closed| TransportError::Broken(channel)) }
    }
}

impl AsyncTransport for crate::tcp::TcpTransport {
    async fn recv(&mut self) -> Result<Envelope, TransportError> {
        crate::tcp::TcpTransport::recv(self).await
    }

    fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send + 'static {
        crate::tcp::TcpTransport::writable(self, channel)
    }
}

impl Transport for InProcTransport {
    fn try_send(&mut self, channel: ChannelId, element: Element) -> Result<(), SendRefused> {
        match self.sender(channel).try_send((channel, element)) {
            Ok(()) => Ok(()),
            Err(queue::TrySendError::Full((_, element))) => Err(SendRefused::Full(element)),
            Err(queue::TrySendError::Closed(_)) => Err(SendRefused::Failed(TransportError::Broken(channel))),
        }
    }

    fn try_recv(&mut self) -> Result<Option<Envelope>, TransportError> {
        match self.receiver.try_recv() {
            Ok(envelope) => Ok(Some(envelope)),
            Err(queue::TryRecvError::Empty | queue::TryRecvError::Disconnected) => Ok(None),
        }
    }
}

/// Watermark alignment between the nodes of one process, and through the coordinator between
/// processes: each node publishes the minimum watermark of each of its alignment groups here and
/// takes the minimum over the other nodes (`Node::alignment_watermarks`, `Node::handle_alignment`),
/// before every step and before it waits; a change wakes the nodes that wait. In a cluster, the
/// worker sends this process's minima to the coordinator whenever they change
/// ([`AlignmentBoard::process_minima`]), and the coordinator sends back, per group, the minimum
/// over the other workers ([`AlignmentBoard::set_remote`]), published as one more node
/// ([`REMOTE_NODE`]). (The board itself, and the wake-up, are `sabot_sync::board::MinimumBoard`,
/// which the loom models check.)
#[derive(Default)]
pub struct AlignmentBoard {
    minima: MinimumBoard<String, EventTime>,
}

/// The board's node for the other processes' minima: no node of a plan has this index (a plan
/// has at most 65,535 nodes, numbered from 0).
pub const REMOTE_NODE: u16 = u16::MAX;

impl std::fmt::Debug for AlignmentBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignmentBoard").finish_non_exhaustive()
    }
}

impl AlignmentBoard {
    /// A board for the nodes of `plan`, if any of its sources is in an alignment group.
    pub fn for_plan(plan: &PhysicalPlan) -> Option<Arc<AlignmentBoard>> {
        let aligned =
            plan.graph.vertices.iter().any(|vertex| {
                vertex.watermarks.as_ref().is_some_and(|watermarks| watermarks.strategy.alignment.is_some())
            });
        aligned.then(Arc::default)
    }

    /// Publishes `node`'s minima and tells it the other nodes' (and processes'). Whether what it
    /// knew changed, and a wake-up for any change after the exchange looked.
    fn exchange(&self, node: &mut Node) -> (bool, Notified<'_>) {
        assert_ne!(node.index(), REMOTE_NODE, "node index {REMOTE_NODE} is the other processes'");
        let exchanged = self.minima.exchange(node.index(), &node.alignment_watermarks());
        let mut learned = false;
        for (group, minimum) in exchanged.elsewhere {
            learned |= node.handle_alignment(&group, minimum);
        }
        (learned, exchanged.changed)
    }

    /// Per group, the minimum over this process's nodes (`None`: none of them holds the group
    /// back), in group order: what the worker tells the coordinator.
    pub fn process_minima(&self) -> Vec<(String, Option<EventTime>)> {
        self.minima.minima_except(REMOTE_NODE)
    }

    /// Takes the other processes' minima from the coordinator; a change wakes the nodes.
    pub fn set_remote(&self, remote: Vec<(String, Option<EventTime>)>) {
        drop(self.minima.exchange(REMOTE_NODE, &remote));
    }
}

/// The driver of one node: the loop that feeds it, steps it and moves its output.
struct NodeDriver<T> {
    node: Node,
    transport: T,
    clock: TokioClock,
    progress: Progress,
    /// Stop (always), and with checkpoints the coordinator's commands.
    commands: mpsc::UnboundedReceiver<Command>,
    /// With checkpoints: snapshot writes, completed checkpoints, and reports to the coordinator.
    control: Option<NodeControl>,
    /// With sources in alignment groups: the minima the nodes of this process share.
    alignment: Option<Arc<AlignmentBoard>>,
}

struct NodeControl {
    /// The snapshot writes handed to writer threads, by subtask, until the node takes them back
    /// (in order per subtask) and acknowledges.
    writes: Arc<Handoff<SubtaskId, CheckpointId, Result<Vec<String>, String>>>,
    /// The newest completed checkpoint of this process's job, and what this node took of it.
    completed: Arc<Completed>,
    completed_cursor: CompletedCursor,
    reports: mpsc::UnboundedSender<Report>,
    data_dir: PathBuf,
    finished_reported: bool,
    done_reported: bool,
}

impl NodeControl {
    fn new(reports: mpsc::UnboundedSender<Report>, data_dir: PathBuf, completed: Arc<Completed>) -> NodeControl {
        NodeControl {
            // The kernel's own bound on acknowledgements waiting for their writes.
            writes: Arc::new(Handoff::new(sabot_kernel::node::ACKS_WAITING_MAX)),
            completed_cursor: completed.cursor(),
            completed,
            reports,
            data_dir,
            finished_reported: false,
            done_reported: false,
        }
    }

    /// Completes once a snapshot write finished or a newer checkpoint completed. Cancel-safe.
    async fn ready(&self) {
        tokio::select! {
            biased;
            _ = self.writes.ready() => {}
            _ = self.completed_cursor.wait(&self.completed) => {}
        }
    }
}

/// Completes once the node has control input to take; never without checkpoints.
async fn control_ready(control: Option<&NodeControl>) {
    match control {
        Some(control) => control.ready().await,
        None => std::future::pending().await,
    }
}

/// How often a node reports its counters, in milliseconds.
const PROGRESS_EVERY_MS: u64 = 200;

impl<T: AsyncTransport> NodeDriver<T> {
    async fn run(&mut self) -> Result<(), DriverError> {
        let index = self.node.index();
        // An element the node handed out that its receiver had no room for yet.
        let mut held: Option<Envelope> = None;
        let mut published = self.clock.now();
        loop {
            while let Ok(command) = self.commands.try_recv() {
                if !self.obey(command)? {
                    return Ok(());
                }
            }
            self.take_control()?;
            self.take_input()?;
            if let Some(board) = &self.alignment {
                let _ = board.exchange(&mut self.node);
            }
            let step = self.node.handle_step(self.clock.now())?;
            self.forward_events();
            let sent = self.send_output(&mut held)?;
            let now = self.clock.now();
            if now.saturating_sub(published) >= PROGRESS_EVERY_MS || step == Step::Finished {
                self.progress.publish(index, self.node.metrics());
                published = now;
            }
            match (step, held.is_some()) {
                (Step::Finished, false) if self.control.is_none() => return Ok(()),
                (Step::Finished, false) => {
                    // Finished: wait for the checkpoint that commits the final output, then for Stop.
                    self.report_done_once();
                    if !self.wait_for_command().await? {
                        return Ok(());
                    }
                }
                // Work left: step again (and retry the held element then) after letting others run.
                (Step::Busy, _) => tokio::task::yield_now().await,
                // The step was idle because its output waited (sources pause while `OUTBOX_MAX`
                // elements do), and that output just left: the sources may run again, so step
                // again rather than wait for input that may never come. (Waiting here deadlocked
                // every node at once, now and then, under load.)
                (Step::Idle, false) if sent => tokio::task::yield_now().await,
                (Step::Idle | Step::Finished, true) => {
                    if !self.wait_for_room(&mut held).await? {
                        return Ok(());
                    }
                }
                (Step::Idle, false) => {
                    if !self.wait_for_input().await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Carries out a coordinator command; `false` for Stop.
    fn obey(&mut self, command: Command) -> Result<bool, DriverError> {
        let now = self.clock.now();
        match command {
            Command::Trigger(checkpoint, kind) => self.node.handle_checkpoint_trigger(now, checkpoint, kind)?,
            Command::Complete(checkpoint) => {
                unreachable!("node {}: completion of {checkpoint:?} as a command", self.node.index())
            }
            // What completed before the stop was sent commits first (a savepoint that stops the
            // job is complete when Stop comes).
            Command::Stop => {
                self.take_control()?;
                return Ok(false);
            }
            Command::Query { id, operator, key } => {
                let rows = self.node.query(&operator, key).and_then(|rows| {
                    sabot_kernel::dataflow::sink::encode_ipc_file(&rows.schema(), &[rows])
                        .map_err(|error| format!("encoding the rows: {error}"))
                });
                if let Some(control) = &self.control {
                    let _ = control.reports.send(Report::Answer(id, rows));
                }
            }
        }
        self.forward_events();
        Ok(true)
    }

    /// Sends acknowledgements to the coordinator, and starts the writes of snapshots on blocking
    /// threads (the asynchronous part: the node goes on meanwhile); other events need no one.
    fn forward_events(&mut self) {
        while let Some(event) = self.node.poll_event() {
            let Some(control) = &self.control else { continue };
            match event {
                // A coordinator that is gone stopped the job; the node learns it from Stop.
                Event::CheckpointAck { checkpoint, snapshot } => {
                    let _ = control.reports.send(Report::Ack(checkpoint, snapshot));
                }
                Event::SnapshotWrites { checkpoint, subtask, writes } => {
                    // Submitted before the writer starts: the node takes it back in order.
                    let ticket = Handoff::submit(&control.writes, subtask, checkpoint);
                    let data_dir = control.data_dir.clone();
                    // In a `--cfg madsim` build this runs as a simulated task (madsim has no
                    // threads), after a BUGGIFY point: a slow snapshot write.
                    #[cfg(madsim)]
                    tokio::spawn(async move {
                        crate::buggify::delay(Duration::from_millis(500)).await;
                        ticket.complete(write_durably(&data_dir, writes));
                    });
                    // A writer that panics drops its ticket: the node takes it as abandoned.
                    #[cfg(not(madsim))]
                    tokio::task::spawn_blocking(move || ticket.complete(write_durably(&data_dir, writes)));
                }
                Event::TaskFinished { .. } => {}
            }
        }
    }

    /// Tells the coordinator, once each, that this node finished and that it is done.
    fn report_done_once(&mut self) {
        let (index, finished, done) = (self.node.index(), self.node.is_finished(), self.node.is_done());
        if let Some(control) = self.control.as_mut() {
            if finished && !control.finished_reported {
                control.finished_reported = true;
                let _ = control.reports.send(Report::Finished(index));
            }
            if done && !control.done_reported {
                control.done_reported = true;
                let _ = control.reports.send(Report::Done(index));
            }
        }
    }

    /// Acknowledges the snapshots whose writes finished (in order per subtask), then lets the
    /// node commit the newest completed checkpoint, if it did not yet.
    fn take_control(&mut self) -> Result<(), DriverError> {
        let index = self.node.index();
        let Some(control) = &mut self.control else { return Ok(()) };
        while let Some(handed) = control.writes.take() {
            let (checkpoint, subtask) = (handed.id, handed.lane);
            let reason = match handed.outcome {
                Outcome::Done(Ok(files)) => {
                    self.node.handle_snapshot_written(checkpoint, subtask, files);
                    continue;
                }
                Outcome::Done(Err(reason)) => reason,
                Outcome::Abandoned => "its writer stopped without finishing (it panicked)".to_string(),
            };
            let reason = format!("writing the snapshot of {subtask} for checkpoint {}: {reason}", checkpoint.0);
            return Err(DriverError::NodeLost { node: index, reason });
        }
        if let Some(checkpoint) = control.completed_cursor.take(&control.completed) {
            self.node.handle_checkpoint_complete(self.clock.now(), CheckpointId(checkpoint))?;
        }
        self.forward_events();
        Ok(())
    }

    /// Finished: waits for a coordinator command (carried out) or control input (taken at the
    /// top of the loop). `false` for Stop, and when the commands ended.
    async fn wait_for_command(&mut self) -> Result<bool, DriverError> {
        let command = tokio::select! {
            biased;
            command = self.commands.recv() => Some(command),
            _ = control_ready(self.control.as_ref()) => None,
        };
        match command {
            Some(Some(command)) => self.obey(command),
            Some(None) => Ok(false),
            None => Ok(true),
        }
    }

    fn broken(&self, error: TransportError) -> DriverError {
        DriverError::NodeLost { node: self.node.index(), reason: error.to_string() }
    }

    /// Offers the node whatever has arrived, while it has room.
    fn take_input(&mut self) -> Result<(), DriverError> {
        let now = self.clock.now();
        while self.node.inbox_room() > 0 {
            match self.transport.try_recv().map_err(|e| self.broken(e))? {
                Some((channel, element)) => self.node.handle_element(now, channel, element),
                None => break,
            }
        }
        Ok(())
    }

    /// Moves the node's output into the transport until a channel is full.
    /// Whether any element left.
    fn send_output(&mut self, held: &mut Option<Envelope>) -> Result<bool, DriverError> {
        let mut sent = false;
        while let Some((channel, element)) = held.take().or_else(|| self.node.poll_transmit()) {
            match self.transport.try_send(channel, element) {
                Ok(()) => sent = true,
                Err(SendRefused::Full(element)) => {
                    *held = Some((channel, element));
                    return Ok(sent);
                }
                Err(SendRefused::Failed(error)) => return Err(self.broken(error)),
            }
        }
        Ok(sent)
    }

    /// Waits until the held element's channel has room, taking input meanwhile (so that two
    /// nodes that send to each other never wait on each other).
    /// `false` when the coordinator said stop.
    async fn wait_for_room(&mut self, held: &mut Option<Envelope>) -> Result<bool, DriverError> {
        let channel = held.as_ref().expect("an element is held").0;
        let can_take_input = self.node.inbox_room() > 0;
        let writable = self.transport.writable(channel);
        let commands = Some(&mut self.commands);
        let (writable, received, command) = tokio::select! {
            biased;
            command = next(commands) => (None, None, command),
            _ = control_ready(self.control.as_ref()) => (None, None, None),
            received = self.transport.recv(), if can_take_input => (None, Some(received), None),
            writable = writable => (Some(writable), None, None),
        };
        if !self.woken(command, received)? {
            return Ok(false);
        }
        writable.transpose().map_err(|e| self.broken(e))?;
        self.send_output(held)?;
        Ok(true)
    }

    /// Handles what a wait woke up with: a command (`false` for Stop) or a received element.
    fn woken(
        &mut self,
        command: Option<Command>,
        received: Option<Result<Envelope, TransportError>>,
    ) -> Result<bool, DriverError> {
        if let Some(command) = command {
            if !self.obey(command)? {
                return Ok(false);
            }
        }
        if let Some(received) = received {
            let (channel, element) = received.map_err(|e| self.broken(e))?;
            self.node.handle_element(self.clock.now(), channel, element);
        }
        Ok(true)
    }

    /// Waits for input, a coordinator command, or the node's next timeout.
    /// `false` when the coordinator said stop.
    async fn wait_for_input(&mut self) -> Result<bool, DriverError> {
        // The exchange's wake-up was registered before it looked, so that no change another node
        // publishes after it is missed.
        let board = self.alignment.clone();
        let aligned = match &board {
            Some(board) => match board.exchange(&mut self.node) {
                (true, _) => return Ok(true),
                (false, changed) => Some(changed),
            },
            None => None,
        };
        let timeout = self.node.poll_timeout().map(|at| at.saturating_sub(self.clock.now()));
        let sleep = tokio::time::sleep(Duration::from_millis(timeout.unwrap_or(u64::MAX / 4)));
        let commands = Some(&mut self.commands);
        let is_aligned = aligned.is_some();
        let changed = async move {
            match aligned {
                Some(notified) => notified.await,
                None => std::future::pending().await,
            }
        };
        let (received, command) = tokio::select! {
            biased;
            command = next(commands) => (None, command),
            _ = control_ready(self.control.as_ref()) => (None, None),
            received = self.transport.recv() => (Some(received), None),
            _ = sleep, if timeout.is_some() => (None, None),
            _ = changed, if is_aligned => (None, None),
        };
        self.woken(command, received)
    }
}

/// The next command from an optional channel; pending forever without one (or once it closed).
async fn next(commands: Option<&mut mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match commands {
        Some(commands) => match commands.recv().await {
            Some(command) => Some(command),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
