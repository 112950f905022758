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

use sabot_kernel::dataflow::{PhysicalPlan, SubtaskId};
use sabot_kernel::element::Element;
use sabot_kernel::env::{ChannelId, Clock, SendRefused, Transport, TransportError};
use sabot_kernel::key_group::KeyGroupRange;
use sabot_kernel::node::{Node, NodeError, NodeMetrics, NodeOptions, Step};
use sabot_kernel::state::{HeapBackend, StateBackend, StateError};
use tokio::sync::mpsc;

use crate::clock::TokioClock;
use crate::fs_storage::LocalFsStorage;

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
    /// Root of storage: sink output under `output/`, RocksDB state under `state/`.
    pub data_dir: PathBuf,
    pub state: StateKind,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("data directory {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("node {node} stopped: {reason}")]
    NodeLost { node: u16, reason: String },
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
        self.nodes
            .lock()
            .expect("progress lock")
            .iter()
            .copied()
            .sum()
    }
}

/// Creates the state backend of one subtask.
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
            let path = config
                .data_dir
                .join("state")
                .join(job)
                .join(format!("{}-{}", subtask.vertex.0, subtask.index));
            Ok(Box::new(crate::rocks::RocksDbBackend::open(path, range)?))
        }
    }
}

/// Builds every node of `plan` with its storage and state.
pub fn build_nodes(
    plan: &Arc<PhysicalPlan>,
    config: &DriverConfig,
) -> Result<Vec<Node>, DriverError> {
    let job = plan.graph.name.clone();
    (0..plan.node_count)
        .map(|index| {
            let storage =
                LocalFsStorage::open(&config.data_dir).map_err(|error| DriverError::DataDir {
                    path: config.data_dir.clone(),
                    error,
                })?;
            let mut backends = |subtask, range| open_backend(config, &job, subtask, range);
            Ok(Node::new(
                plan.clone(),
                index,
                Box::new(storage),
                &mut backends,
                NodeOptions::default(),
            )?)
        })
        .collect()
}

/// Runs `plan` to the end: one tokio task per node on a runtime with one worker per node.
/// `progress` is refreshed while it runs.
pub async fn run(
    plan: Arc<PhysicalPlan>,
    config: DriverConfig,
    progress: Progress,
) -> Result<(), DriverError> {
    let nodes = build_nodes(&plan, &config)?;
    let clock = TokioClock::new();
    let mut handles = Vec::new();
    for (node, transport) in nodes.into_iter().zip(InProcTransport::connect(&plan)) {
        let driver = NodeDriver {
            node,
            transport,
            clock: clock.clone(),
            progress: progress.clone(),
        };
        handles.push(tokio::spawn(driver.run()));
    }
    let mut first_error = None;
    for (index, handle) in handles.into_iter().enumerate() {
        let result = handle
            .await
            .map_err(|error| DriverError::NodeLost {
                node: index as u16,
                reason: error.to_string(),
            })
            .and_then(|result| result);
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The [`Transport`] between nodes of one process: one bounded channel into each node, which
/// carries the elements of every logical channel that ends there (FIFO per sender, so per channel).
pub struct InProcTransport {
    plan: Arc<PhysicalPlan>,
    receiver: mpsc::Receiver<Envelope>,
    senders: Vec<mpsc::Sender<Envelope>>,
}

impl InProcTransport {
    /// One transport per node of `plan`, connected to each other.
    pub fn connect(plan: &Arc<PhysicalPlan>) -> Vec<InProcTransport> {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..plan.node_count)
            .map(|_| mpsc::channel::<Envelope>(NODE_CHANNEL_CAPACITY))
            .unzip();
        receivers
            .into_iter()
            .map(|receiver| InProcTransport {
                plan: plan.clone(),
                receiver,
                senders: senders.clone(),
            })
            .collect()
    }

    fn sender(&self, channel: ChannelId) -> &mpsc::Sender<Envelope> {
        &self.senders[usize::from(self.plan.node_of(self.plan.channel(channel).to))]
    }

    /// Waits for the next element for this node. Never ends on its own: this transport holds a
    /// sender to its own node.
    async fn recv(&mut self) -> Option<Envelope> {
        self.receiver.recv().await
    }

    /// Waits until `channel` has room for an element (another sender may take it first: callers
    /// retry `try_send`).
    fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + 'static {
        let sender = self.sender(channel).clone();
        async move {
            sender
                .reserve()
                .await
                .map(drop)
                .map_err(|_| TransportError::Broken(channel))
        }
    }
}

impl Transport for InProcTransport {
    fn try_send(&mut self, channel: ChannelId, element: Element) -> Result<(), SendRefused> {
        match self.sender(channel).try_send((channel, element)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full((_, element))) => Err(SendRefused::Full(element)),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(SendRefused::Failed(TransportError::Broken(channel)))
            }
        }
    }

    fn try_recv(&mut self) -> Result<Option<Envelope>, TransportError> {
        match self.receiver.try_recv() {
            Ok(envelope) => Ok(Some(envelope)),
            Err(mpsc::error::TryRecvError::Empty | mpsc::error::TryRecvError::Disconnected) => {
                Ok(None)
            }
        }
    }
}

/// The driver of one node: the loop that feeds it, steps it and moves its output.
struct NodeDriver {
    node: Node,
    transport: InProcTransport,
    clock: TokioClock,
    progress: Progress,
}

/// How often a node reports its counters, in milliseconds.
const PROGRESS_EVERY_MS: u64 = 200;

impl NodeDriver {
    async fn run(mut self) -> Result<(), DriverError> {
        let index = self.node.index();
        // An element the node handed out that its receiver had no room for yet.
        let mut held: Option<Envelope> = None;
        let mut published = self.clock.now();
        loop {
            self.take_input()?;
            let step = self.node.handle_step(self.clock.now())?;
            while self.node.poll_event().is_some() {}
            self.send_output(&mut held)?;
            let now = self.clock.now();
            if now.saturating_sub(published) >= PROGRESS_EVERY_MS || step == Step::Finished {
                self.progress.publish(index, self.node.metrics());
                published = now;
            }
            match (step, held.is_some()) {
                (Step::Finished, false) => return Ok(()),
                // Work left: step again (and retry the held element then) after letting others run.
                (Step::Busy, _) => tokio::task::yield_now().await,
                (Step::Idle | Step::Finished, true) => self.wait_for_room(&mut held).await?,
                (Step::Idle, false) => self.wait_for_input().await,
            }
        }
    }

    fn broken(&self, error: TransportError) -> DriverError {
        DriverError::NodeLost {
            node: self.node.index(),
            reason: error.to_string(),
        }
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
    fn send_output(&mut self, held: &mut Option<Envelope>) -> Result<(), DriverError> {
        while let Some((channel, element)) = held.take().or_else(|| self.node.poll_transmit()) {
            match self.transport.try_send(channel, element) {
                Ok(()) => {}
                Err(SendRefused::Full(element)) => {
                    *held = Some((channel, element));
                    return Ok(());
                }
                Err(SendRefused::Failed(error)) => return Err(self.broken(error)),
            }
        }
        Ok(())
    }

    /// Waits until the held element's channel has room, taking input meanwhile (so that two
    /// nodes that send to each other never wait on each other).
    async fn wait_for_room(&mut self, held: &mut Option<Envelope>) -> Result<(), DriverError> {
        let channel = held.as_ref().expect("an element is held").0;
        let can_take_input = self.node.inbox_room() > 0;
        let writable = self.transport.writable(channel);
        let (writable, received) = tokio::select! {
            biased;
            received = self.transport.recv(), if can_take_input => (None, received),
            writable = writable => (Some(writable), None),
        };
        if let Some((channel, element)) = received {
            self.node.handle_element(self.clock.now(), channel, element);
        }
        writable.transpose().map_err(|e| self.broken(e))?;
        self.send_output(held)
    }

    /// Waits for input, or for the node's next timeout.
    async fn wait_for_input(&mut self) {
        let timeout = self
            .node
            .poll_timeout()
            .map(|at| at.saturating_sub(self.clock.now()));
        let sleep = tokio::time::sleep(Duration::from_millis(timeout.unwrap_or(u64::MAX / 4)));
        tokio::select! {
            biased;
            received = self.transport.recv() => {
                if let Some((channel, element)) = received {
                    self.node.handle_element(self.clock.now(), channel, element);
                }
            }
            _ = sleep, if timeout.is_some() => {}
        }
    }
}
