//! The TCP transport: one connection per pair of processes, multiplexing every logical channel
//! between their nodes' subtasks, in the frames of `sabot_kernel::wire`, with credit-based flow
//! control.
//!
//! A process runs several kernel nodes; [`TcpTransport::connect_process`] connects it to the
//! other processes of the job and returns one endpoint per node it runs. An endpoint is a
//! `TcpTransport`, the kernel's `env::Transport` (and the driver's `AsyncTransport`) of one node;
//! the endpoints of a process share its connections.
//!
//! # Connections
//! Each process has one listener. Process `p` connects to every process below it and accepts
//! every process above it. The connecting side sends `Hello { attempt, process, secret }` first;
//! the accepting side checks the shared secret (compared in constant time, never logged), the
//! job attempt and the process index, and answers with its own hello. A connection that presents
//! anything else is closed with a logged reason. Every later frame must carry the same attempt: a
//! peer from an older attempt of the job is fenced off.
//!
//! # Routing
//! A channel between two nodes of the same process (or within one node) goes through a bounded
//! in-process queue into the receiving node ([`LOCAL_CAPACITY`] elements, shared by the local
//! senders to that node), never through TCP. A channel between nodes of two processes goes over
//! their one connection: the connection's reader hands an element frame to the endpoint of the
//! node that consumes the channel, and a credit frame to the send credits of the process (which
//! its endpoints share, each sending only on its own channels). One writer per connection and
//! TCP's order keep every channel FIFO; so do the in-process queues (FIFO per sender).
//!
//! # Flow control and bounds
//! A sender may have at most [`CHANNEL_CREDITS`] elements of one remote channel that the
//! receiving node has not taken yet; the receiver grants credits back as its node takes elements
//! (in batches of half the window), and a reader refuses a peer that sends beyond the window. So,
//! per process, at most:
//! - elements received and not yet taken: `CHANNEL_CREDITS ×` the channels into its nodes from
//!   other processes (per node: `CHANNEL_CREDITS ×` its own such channels);
//! - frames queued for one connection's writer: `CHANNEL_CREDITS ×` the channels from this process
//!   to that peer elements, plus two credit frames per channel from that peer (a grant covers
//!   half a window); heartbeats are made by the writer when its queue is empty, never queued;
//! - elements in in-process queues: `LOCAL_CAPACITY ×` its nodes.
//!
//! # Failure detection
//! Each writer sends a heartbeat after [`HEARTBEAT_INTERVAL`] without other frames; a reader that
//! hears nothing for [`HEARTBEAT_TIMEOUT`] declares the peer process lost. A lost peer, a closed
//! connection or a malformed frame breaks the connection for every local node: a node's next
//! receive fails with `TransportError::PeerLost` (naming the peer process), and the job rolls back
//! to its last checkpoint — unless every channel from that process into the node already
//! delivered its end (the peer finished: it closes the connection once all its nodes dropped
//! their endpoints). A connection closes when every local endpoint is dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::element::Element;
use sabot_kernel::env::{ChannelId, SendRefused, Transport, TransportError};
use sabot_kernel::wire::{Frame, FrameDecoder};
use sabot_sync::channel as queue;
use sabot_sync::credits::{ReceiveCredits, SendCredits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Elements of one remote channel in flight or queued at the receiver, at most.
pub const CHANNEL_CREDITS: u32 = 8;
/// Elements queued into one node from the nodes of its own process (itself included), at most.
pub const LOCAL_CAPACITY: usize = 4;
/// A writer with nothing else to send sends a heartbeat this often.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// A reader that hears nothing this long declares its peer lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to a peer may take, retries included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take to send its hello, or to answer ours.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes a reader asks the socket for at once.
const READ_CHUNK: usize = 256 * 1024;

type Envelope = (ChannelId, Element);

/// What reader tasks hand to a node's endpoint.
enum Incoming {
    Element(ChannelId, Element),
    Lost { peer: u16, reason: String },
}

/// The flow control of one process, shared by its endpoints and its connections' readers
/// (`sabot_sync::credits`, which the loom models check).
struct Credits {
    /// Send credits per channel from a local node to another process, and the peer processes
    /// lost (waiting for their credits is over).
    send: SendCredits<ChannelId, u16>,
    /// Per channel from another process into a local node: elements received and not granted
    /// back yet (at most `CHANNEL_CREDITS`, or the sender broke the protocol).
    receive: ReceiveCredits<ChannelId>,
}

/// How a process reaches the others: its index, the job attempt, every process's address, the
/// process of every node, the secret.
#[derive(Clone)]
pub struct ProcessConfig {
    pub process: u16,
    pub attempt: u64,
    /// Where each process listens, by process index.
    pub addresses: Vec<SocketAddr>,
    /// The process that runs each node, by node index (one entry per node of the plan).
    pub node_processes: Vec<u16>,
    pub secret: Vec<u8>,
}

impl ProcessConfig {
    /// The nodes this process runs, in increasing order.
    pub fn nodes(&self) -> Vec<u16> {
        let owned = self.node_processes.iter().enumerate().filter(|(_, &process)| process == self.process);
        owned.map(|(node, _)| node as u16).collect()
    }
}

impl std::fmt::Debug for ProcessConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ProcessConfig")
            .field("process", &self.process)
            .field("attempt", &self.attempt)
            .field("addresses", &self.addresses)
            .field("node_processes", &self.node_processes)
            .finish_non_exhaustive()
    }
}

/// Where channels run: what every endpoint and reader of a process needs to route a frame.
struct Routes {
    plan: Arc<PhysicalPlan>,
    /// This process.
    process: u16,
    attempt: u64,
    node_processes: Vec<u16>,
}

impl Routes {
    fn process_of(&self, node: u16) -> u16 {
        self.node_processes[usize::from(node)]
    }

    /// The nodes a channel runs from and to, if the plan has it.
    fn ends(&self, channel: ChannelId) -> Option<(u16, u16)> {
        let spec = self.plan.channels.get(channel.0 as usize)?;
        Some((self.plan.node_of(spec.from), self.plan.node_of(spec.to)))
    }
}

/// One node's end of the TCP transport.
pub struct TcpTransport {
    routes: Arc<Routes>,
    node: u16,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    local: queue::Receiver<Envelope>,
    /// The in-process queue into each node of this process, this node's own included (`None`
    /// for the nodes of other processes): `sabot_sync::channel`, which the loom models check.
    local_senders: Vec<Option<queue::Sender<Envelope>>>,
    /// Frames to each peer process's writer (`None` for this process).
    writers: Vec<Option<mpsc::UnboundedSender<Frame>>>,
    credits: Arc<Credits>,
    /// Elements of each remote input channel taken since the last grant.
    taken: BTreeMap<ChannelId, u32>,
    /// The remote input channels that have not delivered `End` yet, by the process they come
    /// from: a peer that closes its connection once all of them ended has finished, not failed.
    open_inputs: BTreeMap<u16, BTreeSet<ChannelId>>,
    /// Whether the local queue or the remote one goes first next (fairness).
    local_first: bool,
}

fn lost(peer: u16, reason: impl Into<String>) -> TransportError {
    TransportError::PeerLost { peer, reason: reason.into() }
}

/// Byte equality that takes the same time wherever the first difference is (secrets).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write_frame(stream: &mut (impl AsyncWriteExt + Unpin), frame: &Frame) -> Result<(), String> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).map_err(|error| error.to_string())?;
    stream.write_all(&bytes).await.map_err(|error| error.to_string())?;
    // A no-op on a real socket; madsim's streams send only what is flushed.
    stream.flush().await.map_err(|error| error.to_string())
}

/// Reads frames until one whole frame is decoded.
async fn read_frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    decoder: &mut FrameDecoder,
    buffer: &mut [u8],
) -> Result<Frame, String> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|error| error.to_string())? {
            return Ok(frame);
        }
        let read = stream.read(buffer).await.map_err(|error| error.to_string())?;
        if read == 0 {
            return Err("connection closed".into());
        }
        decoder.push(&buffer[..read]);
    }
}

impl TcpTransport {
    /// Connects process `config.process` to every other process of the job: accepts on
    /// `listener` the processes above it, connects to those below. Returns once every connection
    /// is up, with one endpoint per node this process runs, in increasing node order.
    pub async fn connect_process(
        plan: Arc<PhysicalPlan>,
        config: ProcessConfig,
        listener: &TcpListener,
    ) -> Result<Vec<TcpTransport>, TransportError> {
        let process_count = u16::try_from(config.addresses.len()).expect("at most 65535 processes");
        assert_eq!(config.node_processes.len(), usize::from(plan.node_count), "a process for every node");
        assert!(config.process < process_count, "process {} of {process_count}", config.process);
        if let Some(node) = config.node_processes.iter().position(|&process| process >= process_count) {
            panic!("node {node} runs on process {} of {process_count}", config.node_processes[node]);
        }
        assert!(!config.nodes().is_empty(), "process {} runs no node", config.process);
        let me = config.process;
        let mut streams: BTreeMap<u16, (TcpStream, FrameDecoder)> = BTreeMap::new();
        for peer in 0..me {
            let stream = connect_with_retry(config.addresses[usize::from(peer)])
                .await
                .map_err(|reason| lost(peer, format!("connecting: {reason}")))?;
            let (stream, hello, decoder) =
                handshake_connect(stream, &config).await.map_err(|reason| lost(peer, reason))?;
            if hello != peer {
                return Err(lost(peer, format!("the process at its address says it is process {hello}")));
            }
            streams.insert(peer, (stream, decoder));
        }
        while streams.len() < usize::from(process_count) - 1 {
            let accepted = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
            let (stream, from) = match accepted {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(error)) => return Err(lost(me, format!("accepting: {error}"))),
                Err(_) => {
                    let missing = (me + 1..process_count).find(|p| !streams.contains_key(p));
                    return Err(lost(missing.expect("a process is missing"), "it did not connect in time"));
                }
            };
            match handshake_accept(stream, &config, process_count).await {
                Ok((stream, peer)) if peer > me && !streams.contains_key(&peer) => {
                    streams.insert(peer, (stream, FrameDecoder::new()));
                }
                Ok((_, peer)) => {
                    eprintln!("process {me}: refused a connection from {from}: process {peer} is not expected")
                }
                Err(reason) => eprintln!("process {me}: refused a connection from {from}: {reason}"),
            }
        }
        Ok(Self::start(plan, config, streams))
    }

    /// Starts a reader and a writer per connection and makes the endpoints of the local nodes.
    fn start(
        plan: Arc<PhysicalPlan>,
        config: ProcessConfig,
        streams: BTreeMap<u16, (TcpStream, FrameDecoder)>,
    ) -> Vec<TcpTransport> {
        let nodes = config.nodes();
        let node_count = usize::from(plan.node_count);
        let routes = Arc::new(Routes {
            plan,
            process: config.process,
            attempt: config.attempt,
            node_processes: config.node_processes,
        });
        let mut open_inputs: BTreeMap<u16, BTreeMap<u16, BTreeSet<ChannelId>>> = BTreeMap::new();
        let (mut outputs, mut inputs) = (Vec::new(), Vec::new());
        for index in 0..routes.plan.channels.len() {
            let channel = ChannelId(index as u32);
            let (from, to) = routes.ends(channel).expect("a channel of the plan");
            let (from_process, to_process) = (routes.process_of(from), routes.process_of(to));
            if from_process == routes.process && to_process != routes.process {
                outputs.push(channel);
            }
            if to_process == routes.process && from_process != routes.process {
                inputs.push(channel);
                open_inputs.entry(to).or_default().entry(from_process).or_default().insert(channel);
            }
        }
        let credits = Arc::new(Credits {
            send: SendCredits::new(CHANNEL_CREDITS, outputs),
            receive: ReceiveCredits::new(CHANNEL_CREDITS, inputs),
        });
        let mut incoming_senders: Vec<Option<mpsc::UnboundedSender<Incoming>>> = vec![None; node_count];
        let mut local_senders: Vec<Option<queue::Sender<Envelope>>> = vec![None; node_count];
        let mut receivers = Vec::new();
        for &node in &nodes {
            let (incoming_sender, incoming) = mpsc::unbounded_channel();
            let (local_sender, local) = queue::bounded(LOCAL_CAPACITY);
            incoming_senders[usize::from(node)] = Some(incoming_sender);
            local_senders[usize::from(node)] = Some(local_sender);
            receivers.push((node, incoming, local));
        }
        let incoming_senders = Arc::new(incoming_senders);
        let mut writers: Vec<Option<mpsc::UnboundedSender<Frame>>> = vec![None; config.addresses.len()];
        for (peer, (stream, decoder)) in streams {
            stream.set_nodelay(true).ok();
            let (reader, writer) = split(stream);
            let (frames, queue) = mpsc::unbounded_channel();
            writers[usize::from(peer)] = Some(frames);
            // Set when the reader ends: the writer then ends too, which closes the connection.
            let closed = Arc::new(Notify::new());
            let endpoints = Endpoints { peer, incoming: incoming_senders.clone(), credits: credits.clone() };
            let writing = WriteContext { attempt: config.attempt, closed: closed.clone(), endpoints };
            tokio::spawn(write_loop(writer, queue, writing));
            let endpoints = Endpoints { peer, incoming: incoming_senders.clone(), credits: credits.clone() };
            tokio::spawn(read_loop(reader, decoder, ReadContext { closed, routes: routes.clone(), endpoints }));
        }
        receivers
            .into_iter()
            .map(|(node, incoming, local)| TcpTransport {
                routes: routes.clone(),
                node,
                incoming,
                local,
                local_senders: local_senders.clone(),
                writers: writers.clone(),
                credits: credits.clone(),
                taken: BTreeMap::new(),
                open_inputs: open_inputs.remove(&node).unwrap_or_default(),
                local_first: false,
            })
            .collect()
    }

    fn node_to(&self, channel: ChannelId) -> Result<u16, TransportError> {
        self.routes.ends(channel).map(|(_, to)| to).ok_or(TransportError::Unknown(channel))
    }

    /// Counts an element taken from a channel of another process and grants credits back in
    /// batches.
    fn taken_from(&mut self, channel: ChannelId) {
        let (from, to) = self.routes.ends(channel).expect("a channel the reader checked");
        assert_eq!(to, self.node, "channel {} is taken by node {}", channel.0, self.node);
        let sender = self.routes.process_of(from);
        if sender == self.routes.process {
            return;
        }
        let taken = self.taken.entry(channel).or_insert(0);
        *taken += 1;
        assert!(*taken <= CHANNEL_CREDITS, "{} elements of channel {} taken without a grant", *taken, channel.0);
        if *taken >= CHANNEL_CREDITS / 2 {
            let credits = std::mem::take(taken);
            self.credits.receive.grant(&channel, credits);
            if let Some(writer) = &self.writers[usize::from(sender)] {
                // A writer that is gone reports the loss through the readers.
                let _ = writer.send(Frame::Credit { attempt: self.routes.attempt, channel, credits });
            }
        }
    }

    /// An element for the node; `None` for the close of a peer that finished.
    fn handle_incoming(&mut self, incoming: Incoming) -> Result<Option<Envelope>, TransportError> {
        match incoming {
            Incoming::Element(channel, element) => {
                self.taken_from(channel);
                if matches!(element, Element::End) {
                    let (from, _) = self.routes.ends(channel).expect("a channel the reader checked");
                    if let Some(open) = self.open_inputs.get_mut(&self.routes.process_of(from)) {
                        open.remove(&channel);
                    }
                }
                Ok(Some((channel, element)))
            }
            Incoming::Lost { peer, reason } => match self.open_inputs.get(&peer) {
                // The peer process sent the end of every channel to this node: it finished.
                Some(open) if open.is_empty() => Ok(None),
                _ => {
                    let (process, node) = (self.routes.process, self.node);
                    eprintln!("process {process}, node {node}: connection to process {peer} lost: {reason}");
                    Err(lost(peer, reason))
                }
            },
        }
    }

    /// Waits for the next element for this node; an error once a peer is lost.
    pub async fn recv(&mut self) -> Result<Envelope, TransportError> {
        self.local_first = !self.local_first;
        loop {
            let incoming = if self.local_first {
                tokio::select! {
                    biased;
                    Some(envelope) = self.local.recv() => return Ok(envelope),
                    Some(incoming) = self.incoming.recv() => incoming,
                }
            } else {
                tokio::select! {
                    biased;
                    Some(incoming) = self.incoming.recv() => incoming,
                    Some(envelope) = self.local.recv() => return Ok(envelope),
                }
            };
            if let Some(envelope) = self.handle_incoming(incoming)? {
                return Ok(envelope);
            }
        }
    }

    /// Waits until `channel` can take an element (another sender of this process may take the
    /// room first: callers retry `try_send`).
    pub fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send + 'static {
        let to = self.node_to(channel);
        let local = to.as_ref().ok().and_then(|&to| self.local_senders[usize::from(to)].as_ref().map(|s| s.writable()));
        let peer = to.as_ref().ok().map(|&to| self.routes.process_of(to));
        let credits = self.credits.clone();
        async move {
            to?;
            if let Some(writable) = local {
                return writable.await.map_err(|queue::Closed| TransportError::Broken(channel));
            }
            let peer = peer.expect("the channel is known");
            credits.send.writable(&channel, &peer).await.map_err(|reason| TransportError::PeerLost { peer, reason })
        }
    }
}

impl Transport for TcpTransport {
    fn try_send(&mut self, channel: ChannelId, element: Element) -> Result<(), SendRefused> {
        let to = match self.node_to(channel) {
            Ok(to) => to,
            Err(error) => return Err(SendRefused::Failed(error)),
        };
        if let Some(sender) = &self.local_senders[usize::from(to)] {
            return match sender.try_send((channel, element)) {
                Ok(()) => Ok(()),
                Err(queue::TrySendError::Full((_, element))) => Err(SendRefused::Full(element)),
                Err(queue::TrySendError::Closed(_)) => Err(SendRefused::Failed(TransportError::Broken(channel))),
            };
        }
        if !self.credits.send.try_take(&channel) {
            return Err(SendRefused::Full(element));
        }
        let peer = self.routes.process_of(to);
        let frame = Frame::Element { attempt: self.routes.attempt, channel, element };
        match self.writers[usize::from(peer)].as_ref().map(|writer| writer.send(frame)) {
            Some(Ok(())) => Ok(()),
            _ => Err(SendRefused::Failed(lost(peer, "its connection is closed"))),
        }
    }

    fn try_recv(&mut self) -> Result<Option<Envelope>, TransportError> {
        self.local_first = !self.local_first;
        if self.local_first {
            if let Ok(envelope) = self.local.try_recv() {
                return Ok(Some(envelope));
            }
        }
        while let Ok(incoming) = self.incoming.try_recv() {
            if let Some(envelope) = self.handle_incoming(incoming)? {
                return Ok(Some(envelope));
            }
        }
        Ok(self.local.try_recv().ok())
    }
}

async fn connect_with_retry(address: SocketAddr) -> Result<TcpStream, String> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(format!("{address}: {error}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The connecting side: send our hello, check the answer; the peer's process index, and the
/// decoder holding whatever the peer sent right after its answer.
async fn handshake_connect(
    mut stream: TcpStream,
    config: &ProcessConfig,
) -> Result<(TcpStream, u16, FrameDecoder), String> {
    let hello = Frame::Hello { attempt: config.attempt, process: config.process, secret: config.secret.clone() };
    write_frame(&mut stream, &hello).await?;
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 4096];
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut decoder, &mut buffer))
        .await
        .map_err(|_| "no answer to the hello in time".to_string())??;
    match answer {
        Frame::Hello { attempt, process, secret }
            if attempt == config.attempt && constant_time_eq(&secret, &config.secret) =>
        {
            Ok((stream, process, decoder))
        }
        Frame::Hello { attempt, .. } if attempt != config.attempt => {
            Err(format!("it is in attempt {attempt}, this process in {}", config.attempt))
        }
        Frame::Hello { .. } => Err("it answered with the wrong secret".into()),
        other => Err(format!("it answered the hello with {}", frame_name(&other))),
    }
}

/// The accepting side: check the hello, answer it; the peer's process index.
async fn handshake_accept(
    mut stream: TcpStream,
    config: &ProcessConfig,
    process_count: u16,
) -> Result<(TcpStream, u16), String> {
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 4096];
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut decoder, &mut buffer))
        .await
        .map_err(|_| "no hello in time".to_string())??;
    let Frame::Hello { attempt, process, secret } = hello else {
        return Err(format!("it began with {} instead of a hello", frame_name(&hello)));
    };
    if !constant_time_eq(&secret, &config.secret) {
        return Err("it presented the wrong secret".into());
    }
    if attempt != config.attempt {
        return Err(format!("it is in attempt {attempt}, this process in {}", config.attempt));
    }
    if process >= process_count {
        return Err(format!("it says it is process {process} of {process_count}"));
    }
    if decoder.buffered() > 0 {
        return Err("data before the hello was answered".into());
    }
    let answer = Frame::Hello { attempt: config.attempt, process: config.process, secret: config.secret.clone() };
    write_frame(&mut stream, &answer).await?;
    Ok((stream, process))
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "a hello",
        Frame::Element { .. } => "an element",
        Frame::Credit { .. } => "a credit",
        Frame::Heartbeat { .. } => "a heartbeat",
    }
}

/// What one connection's tasks reach of the local endpoints.
struct Endpoints {
    /// The peer process of the connection.
    peer: u16,
    /// Into each local node's endpoint, by node index (`None` for nodes of other processes).
    incoming: Arc<Vec<Option<mpsc::UnboundedSender<Incoming>>>>,
    credits: Arc<Credits>,
}

impl Endpoints {
    /// Marks the connection broken: wakes credit waiters and tells every local node (each
    /// decides whether the peer finished or failed; an endpoint already dropped hears nothing).
    fn report_lost(&self, reason: String) {
        let peer = self.peer;
        self.credits.send.lose(peer, reason.clone());
        for sender in self.incoming.iter().flatten() {
            let _ = sender.send(Incoming::Lost { peer, reason: reason.clone() });
        }
    }
}

struct WriteContext {
    attempt: u64,
    closed: Arc<Notify>,
    endpoints: Endpoints,
}

async fn write_loop(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Frame>, context: WriteContext) {
    let WriteContext { attempt, closed, endpoints } = context;
    let mut bytes = Vec::new();
    let mut sequence = 0_u64;
    loop {
        let next = tokio::select! {
            biased;
            _ = closed.notified() => return,
            next = tokio::time::timeout(HEARTBEAT_INTERVAL, queue.recv()) => next,
        };
        let frame = match next {
            Ok(Some(frame)) => frame,
            // Every local endpoint is gone: close the connection.
            Ok(None) => return,
            Err(_) => {
                sequence += 1;
                Frame::Heartbeat { attempt, sequence }
            }
        };
        bytes.clear();
        if let Err(error) = frame.encode(&mut bytes) {
            return endpoints.report_lost(format!("encoding a frame: {error}"));
        }
        // Frames queued meanwhile go in the same write.
        while bytes.len() < READ_CHUNK {
            let Ok(frame) = queue.try_recv() else { break };
            if let Err(error) = frame.encode(&mut bytes) {
                return endpoints.report_lost(format!("encoding a frame: {error}"));
            }
        }
        // The flush is a no-op on a real socket; madsim's streams send only what is flushed.
        if let Err(error) = async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        }
        .await
        {
            return endpoints.report_lost(format!("writing: {error}"));
        }
    }
}

struct ReadContext {
    closed: Arc<Notify>,
    routes: Arc<Routes>,
    endpoints: Endpoints,
}

async fn read_loop(mut reader: OwnedReadHalf, mut decoder: FrameDecoder, context: ReadContext) {
    let mut buffer = vec![0; READ_CHUNK];
    let reason = loop {
        let frame =
            match tokio::time::timeout(HEARTBEAT_TIMEOUT, read_frame(&mut reader, &mut decoder, &mut buffer)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(reason)) => break reason,
                Err(_) => break format!("no frame for {} ms", HEARTBEAT_TIMEOUT.as_millis()),
            };
        if let Err(reason) = context.accept(frame) {
            break reason;
        }
    };
    context.closed.notify_one();
    context.endpoints.report_lost(reason);
}

impl ReadContext {
    /// Checks one frame from the peer process and hands it on: an element to the endpoint of the
    /// node that consumes its channel, a credit to the process's send credits.
    fn accept(&self, frame: Frame) -> Result<(), String> {
        let (me, peer) = (self.routes.process, self.endpoints.peer);
        if frame.attempt() != self.routes.attempt {
            return Err(format!("a frame of attempt {}, this process is in {}", frame.attempt(), self.routes.attempt));
        }
        match frame {
            Frame::Element { channel, element, .. } => {
                let (from, to) = self.routes.ends(channel).ok_or(format!("unknown channel {}", channel.0))?;
                if self.routes.process_of(from) != peer || self.routes.process_of(to) != me {
                    return Err(format!(
                        "channel {} does not run from process {peer} to process {me} (it runs from node {from} to \
                         node {to})",
                        channel.0
                    ));
                }
                if self.endpoints.credits.receive.receive(&channel).is_err() {
                    return Err(format!("channel {}: an element beyond its window of {CHANNEL_CREDITS}", channel.0));
                }
                let endpoint = self.endpoints.incoming[usize::from(to)].as_ref().expect("a local node's endpoint");
                endpoint.send(Incoming::Element(channel, element)).map_err(|_| format!("node {to} is gone"))
            }
            Frame::Credit { channel, credits, .. } => {
                let (from, to) =
                    self.routes.ends(channel).ok_or(format!("credit for unknown channel {}", channel.0))?;
                if self.routes.process_of(from) != me || self.routes.process_of(to) != peer {
                    return Err(format!(
                        "credit for channel {}, which does not run from process {me} to process {peer}",
                        channel.0
                    ));
                }
                let granted = self.endpoints.credits.send.grant(&channel, credits);
                granted.map_err(|_| format!("credits for channel {} beyond its window of {CHANNEL_CREDITS}", channel.0))
            }
            Frame::Heartbeat { .. } => Ok(()),
            Frame::Hello { .. } => Err("a second hello".into()),
        }
    }
}

/// The reading half of a connection: tokio's owned half in the real world; madsim's streams have
/// no owned halves, so a `--cfg madsim` build splits them with `tokio::io::split`.
#[cfg(not(madsim))]
pub type OwnedReadHalf = tokio::net::tcp::OwnedReadHalf;
#[cfg(not(madsim))]
pub type OwnedWriteHalf = tokio::net::tcp::OwnedWriteHalf;
#[cfg(madsim)]
pub type OwnedReadHalf = tokio::io::ReadHalf<TcpStream>;
#[cfg(madsim)]
pub type OwnedWriteHalf = tokio::io::WriteHalf<TcpStream>;

/// Splits a connection into halves that two tasks own.
pub fn split(stream: TcpStream) -> (OwnedReadHalf, OwnedWriteHalf) {
    #[cfg(not(madsim))]
    return stream.into_split();
    #[cfg(madsim)]
    return tokio::io::split(stream);
}
