//! The TCP transport: one connection per pair of nodes, multiplexing every logical channel
//! between their subtasks, in the frames of `sabot_kernel::wire`, with credit-based flow control.
//!
//! # Connections
//! Node `i` listens; it connects to every node below it and accepts every node above it. The
//! connecting side sends `Hello { attempt, node, secret }` first; the accepting side checks the
//! shared secret (compared in constant time, never logged), the job attempt and the node index,
//! and answers with its own hello. A connection that presents anything else is closed with a
//! logged reason. Every later frame must carry the same attempt: a peer from an older attempt of
//! the job is fenced off.
//!
//! # Flow control and bounds
//! A sender may have at most [`CHANNEL_CREDITS`] elements of one remote channel that the
//! receiving node has not taken yet; the receiver grants credits back as its node takes elements
//! (in batches of half the window). So, per node: elements received and not yet taken are at most
//! `CHANNEL_CREDITS × remote input channels`, and frames queued for one peer's writer at most
//! `CHANNEL_CREDITS × channels to it` elements plus their credit and heartbeat frames. Channels
//! between subtasks of the same node go through a bounded in-process queue
//! ([`LOCAL_CAPACITY`]), as in the in-process transport.
//!
//! # Failure detection
//! Each writer sends a heartbeat after [`HEARTBEAT_INTERVAL`] without other frames; a reader that
//! hears nothing for [`HEARTBEAT_TIMEOUT`] declares the peer lost. A lost peer, a closed
//! connection or a malformed frame breaks the transport: the node's next receive fails with
//! `TransportError::PeerLost`, and the job rolls back to its last checkpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::element::Element;
use sabot_kernel::env::{ChannelId, SendRefused, Transport, TransportError};
use sabot_kernel::wire::{Frame, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Elements of one remote channel in flight or queued at the receiver, at most.
pub const CHANNEL_CREDITS: u32 = 8;
/// Elements queued between subtasks of the same node, at most.
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

/// What reader tasks hand to their node.
enum Incoming {
    Element(ChannelId, Element),
    Lost { peer: u16, reason: String },
}

/// Send credits per remote channel, shared with the readers that receive grants.
#[derive(Default)]
struct Credits {
    available: Mutex<BTreeMap<ChannelId, u32>>,
    /// Woken when credits arrive or a peer is lost.
    granted: Notify,
    /// Peers lost, with the reason: waiting for their credits is over.
    lost: Mutex<BTreeMap<u16, String>>,
}

/// How a node reaches the others: its index, the job attempt, every node's address, the secret.
#[derive(Clone)]
pub struct TcpConfig {
    pub node: u16,
    pub attempt: u64,
    pub addresses: Vec<SocketAddr>,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("TcpConfig")
            .field("node", &self.node)
            .field("attempt", &self.attempt)
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// One node's end of the TCP transport.
pub struct TcpTransport {
    plan: Arc<PhysicalPlan>,
    node: u16,
    attempt: u64,
    incoming: mpsc::UnboundedReceiver<Incoming>,
    local_sender: mpsc::Sender<Envelope>,
    local: mpsc::Receiver<Envelope>,
    /// Frames to each peer's writer (`None` for this node).
    writers: Vec<Option<mpsc::UnboundedSender<Frame>>>,
    credits: Arc<Credits>,
    /// Elements of each remote input channel taken since the last grant.
    taken: BTreeMap<ChannelId, u32>,
    /// The remote input channels that have not delivered `End` yet, by the node they come from:
    /// a peer that closes its connection once all of them ended has finished, not failed.
    open_inputs: BTreeMap<u16, std::collections::BTreeSet<ChannelId>>,
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
    /// Connects node `config.node` to every other node of `plan`: accepts on `listener` the
    /// nodes above it, connects to those below. Returns once every connection is up.
    pub async fn connect(
        plan: Arc<PhysicalPlan>,
        config: TcpConfig,
        listener: &TcpListener,
    ) -> Result<TcpTransport, TransportError> {
        let node_count = plan.node_count;
        assert_eq!(config.addresses.len(), usize::from(node_count), "one address per node");
        let me = config.node;
        let mut streams: BTreeMap<u16, (TcpStream, FrameDecoder)> = BTreeMap::new();
        for peer in 0..me {
            let stream = connect_with_retry(config.addresses[usize::from(peer)])
                .await
                .map_err(|reason| lost(peer, format!("connecting: {reason}")))?;
            let (stream, hello, decoder) =
                handshake_connect(stream, &config).await.map_err(|reason| lost(peer, reason))?;
            if hello != peer {
                return Err(lost(peer, format!("the node at its address says it is node {hello}")));
            }
            streams.insert(peer, (stream, decoder));
        }
        while streams.len() < usize::from(node_count) - 1 {
            let accepted = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept()).await;
            let (stream, from) = match accepted {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(error)) => return Err(lost(me, format!("accepting: {error}"))),
                Err(_) => {
                    let missing: Vec<u16> = (me + 1..node_count).filter(|p| !streams.contains_key(p)).collect();
                    return Err(lost(missing[0], "it did not connect in time"));
                }
            };
            match handshake_accept(stream, &config, node_count).await {
                Ok((stream, peer)) if peer > me && !streams.contains_key(&peer) => {
                    streams.insert(peer, (stream, FrameDecoder::new()));
                }
                Ok((_, peer)) => eprintln!("node {me}: refused a connection from {from}: node {peer} is not expected"),
                Err(reason) => eprintln!("node {me}: refused a connection from {from}: {reason}"),
            }
        }
        Ok(Self::start(plan, config, streams))
    }

    fn start(
        plan: Arc<PhysicalPlan>,
        config: TcpConfig,
        streams: BTreeMap<u16, (TcpStream, FrameDecoder)>,
    ) -> TcpTransport {
        let (incoming_sender, incoming) = mpsc::unbounded_channel();
        let credits = Arc::new(Credits::default());
        let mut writers: Vec<Option<mpsc::UnboundedSender<Frame>>> = vec![None; usize::from(plan.node_count)];
        let mut open_inputs: BTreeMap<u16, std::collections::BTreeSet<ChannelId>> = BTreeMap::new();
        {
            let mut available = credits.available.lock().expect("credits lock");
            for (index, spec) in plan.channels.iter().enumerate() {
                let (from, to) = (plan.node_of(spec.from), plan.node_of(spec.to));
                if from == config.node && to != config.node {
                    available.insert(ChannelId(index as u32), CHANNEL_CREDITS);
                }
                if to == config.node && from != config.node {
                    open_inputs.entry(from).or_default().insert(ChannelId(index as u32));
                }
            }
        }
        for (peer, (stream, decoder)) in streams {
            stream.set_nodelay(true).ok();
            let (reader, writer) = split(stream);
            let (frames, queue) = mpsc::unbounded_channel();
            writers[usize::from(peer)] = Some(frames);
            // Set when the reader ends: the writer then ends too, which closes the connection.
            let closed = Arc::new(Notify::new());
            let writing = WriteContext {
                attempt: config.attempt,
                peer,
                incoming: incoming_sender.clone(),
                credits: credits.clone(),
                closed: closed.clone(),
            };
            tokio::spawn(write_loop(writer, queue, writing));
            tokio::spawn(read_loop(
                reader,
                decoder,
                ReadContext {
                    closed,
                    plan: plan.clone(),
                    me: config.node,
                    peer,
                    attempt: config.attempt,
                    incoming: incoming_sender.clone(),
                    credits: credits.clone(),
                },
            ));
        }
        let (local_sender, local) = mpsc::channel(LOCAL_CAPACITY);
        TcpTransport {
            plan,
            node: config.node,
            attempt: config.attempt,
            incoming,
            local_sender,
            local,
            writers,
            credits,
            taken: BTreeMap::new(),
            open_inputs,
            local_first: false,
        }
    }

    fn node_to(&self, channel: ChannelId) -> Result<u16, TransportError> {
        let spec = self.plan.channels.get(channel.0 as usize).ok_or(TransportError::Unknown(channel))?;
        Ok(self.plan.node_of(spec.to))
    }

    /// Counts an element taken from a remote channel and grants credits back in batches.
    fn taken_from(&mut self, channel: ChannelId) {
        let spec = &self.plan.channels[channel.0 as usize];
        let sender = self.plan.node_of(spec.from);
        if sender == self.node {
            return;
        }
        let taken = self.taken.entry(channel).or_insert(0);
        *taken += 1;
        if *taken >= CHANNEL_CREDITS / 2 {
            let credits = std::mem::take(taken);
            if let Some(writer) = &self.writers[usize::from(sender)] {
                // A writer that is gone reports the loss through the readers.
                let _ = writer.send(Frame::Credit { attempt: self.attempt, channel, credits });
            }
        }
    }

    /// An element for the node; `None` for the close of a peer that finished.
    fn handle_incoming(&mut self, incoming: Incoming) -> Result<Option<Envelope>, TransportError> {
        match incoming {
            Incoming::Element(channel, element) => {
                self.taken_from(channel);
                if matches!(element, Element::End) {
                    let from = self.plan.node_of(self.plan.channels[channel.0 as usize].from);
                    if let Some(open) = self.open_inputs.get_mut(&from) {
                        open.remove(&channel);
                    }
                }
                Ok(Some((channel, element)))
            }
            Incoming::Lost { peer, reason } => match self.open_inputs.get(&peer) {
                // The peer sent the end of every channel to this node: it finished.
                Some(open) if open.is_empty() => Ok(None),
                _ => {
                    eprintln!("node {}: connection to node {peer} lost: {reason}", self.node);
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

    /// Waits until `channel` can take an element (another sender of this node may take the room
    /// first: callers retry `try_send`).
    pub fn writable(
        &self,
        channel: ChannelId,
    ) -> impl std::future::Future<Output = Result<(), TransportError>> + Send + 'static {
        let to = self.node_to(channel);
        let (node, sender, credits) = (self.node, self.local_sender.clone(), self.credits.clone());
        async move {
            let to = to?;
            if to == node {
                return sender.reserve().await.map(drop).map_err(|_| TransportError::Broken(channel));
            }
            loop {
                let granted = credits.granted.notified();
                if let Some(reason) = credits.lost.lock().expect("lost lock").get(&to).cloned() {
                    return Err(TransportError::PeerLost { peer: to, reason });
                }
                if credits.available.lock().expect("credits lock").get(&channel).copied().unwrap_or(0) > 0 {
                    return Ok(());
                }
                granted.await;
            }
        }
    }
}

impl Transport for TcpTransport {
    fn try_send(&mut self, channel: ChannelId, element: Element) -> Result<(), SendRefused> {
        let to = match self.node_to(channel) {
            Ok(to) => to,
            Err(error) => return Err(SendRefused::Failed(error)),
        };
        if to == self.node {
            return match self.local_sender.try_send((channel, element)) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full((_, element))) => Err(SendRefused::Full(element)),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(SendRefused::Failed(TransportError::Broken(channel))),
            };
        }
        {
            let mut available = self.credits.available.lock().expect("credits lock");
            let credits = available.get_mut(&channel).expect("a remote output channel of this node");
            if *credits == 0 {
                return Err(SendRefused::Full(element));
            }
            *credits -= 1;
        }
        let frame = Frame::Element { attempt: self.attempt, channel, element };
        match self.writers[usize::from(to)].as_ref().map(|writer| writer.send(frame)) {
            Some(Ok(())) => Ok(()),
            _ => Err(SendRefused::Failed(lost(to, "its connection is closed"))),
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

/// The connecting side: send our hello, check the answer; the peer's node index, and the decoder
/// holding whatever the peer sent right after its answer.
async fn handshake_connect(
    mut stream: TcpStream,
    config: &TcpConfig,
) -> Result<(TcpStream, u16, FrameDecoder), String> {
    let hello = Frame::Hello { attempt: config.attempt, node: config.node, secret: config.secret.clone() };
    write_frame(&mut stream, &hello).await?;
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 4096];
    let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut decoder, &mut buffer))
        .await
        .map_err(|_| "no answer to the hello in time".to_string())??;
    match answer {
        Frame::Hello { attempt, node, secret }
            if attempt == config.attempt && constant_time_eq(&secret, &config.secret) =>
        {
            Ok((stream, node, decoder))
        }
        Frame::Hello { attempt, .. } if attempt != config.attempt => {
            Err(format!("it is in attempt {attempt}, this node in {}", config.attempt))
        }
        Frame::Hello { .. } => Err("it answered with the wrong secret".into()),
        other => Err(format!("it answered the hello with {}", frame_name(&other))),
    }
}

/// The accepting side: check the hello, answer it; the peer's node index.
async fn handshake_accept(
    mut stream: TcpStream,
    config: &TcpConfig,
    node_count: u16,
) -> Result<(TcpStream, u16), String> {
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0; 4096];
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut stream, &mut decoder, &mut buffer))
        .await
        .map_err(|_| "no hello in time".to_string())??;
    let Frame::Hello { attempt, node, secret } = hello else {
        return Err(format!("it began with {} instead of a hello", frame_name(&hello)));
    };
    if !constant_time_eq(&secret, &config.secret) {
        return Err("it presented the wrong secret".into());
    }
    if attempt != config.attempt {
        return Err(format!("it is in attempt {attempt}, this node in {}", config.attempt));
    }
    if node >= node_count {
        return Err(format!("it says it is node {node} of {node_count}"));
    }
    if decoder.buffered() > 0 {
        return Err("data before the hello was answered".into());
    }
    let answer = Frame::Hello { attempt: config.attempt, node: config.node, secret: config.secret.clone() };
    write_frame(&mut stream, &answer).await?;
    Ok((stream, node))
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "a hello",
        Frame::Element { .. } => "an element",
        Frame::Credit { .. } => "a credit",
        Frame::Heartbeat { .. } => "a heartbeat",
    }
}

/// Marks the transport broken: wakes credit waiters and tells the node.
fn report_lost(incoming: &mpsc::UnboundedSender<Incoming>, credits: &Credits, peer: u16, reason: String) {
    credits.lost.lock().expect("lost lock").entry(peer).or_insert_with(|| reason.clone());
    credits.granted.notify_waiters();
    let _ = incoming.send(Incoming::Lost { peer, reason });
}

struct WriteContext {
    attempt: u64,
    peer: u16,
    incoming: mpsc::UnboundedSender<Incoming>,
    credits: Arc<Credits>,
    closed: Arc<Notify>,
}

async fn write_loop(mut writer: OwnedWriteHalf, mut queue: mpsc::UnboundedReceiver<Frame>, context: WriteContext) {
    let WriteContext { attempt, peer, incoming, credits, closed } = context;
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
            // The transport is gone: close the connection.
            Ok(None) => return,
            Err(_) => {
                sequence += 1;
                Frame::Heartbeat { attempt, sequence }
            }
        };
        bytes.clear();
        if let Err(error) = frame.encode(&mut bytes) {
            return report_lost(&incoming, &credits, peer, format!("encoding a frame: {error}"));
        }
        // Frames queued meanwhile go in the same write.
        while bytes.len() < READ_CHUNK {
            let Ok(frame) = queue.try_recv() else { break };
            if let Err(error) = frame.encode(&mut bytes) {
                return report_lost(&incoming, &credits, peer, format!("encoding a frame: {error}"));
            }
        }
        // The flush is a no-op on a real socket; madsim's streams send only what is flushed.
        if let Err(error) = async {
            writer.write_all(&bytes).await?;
            writer.flush().await
        }
        .await
        {
            return report_lost(&incoming, &credits, peer, format!("writing: {error}"));
        }
    }
}

struct ReadContext {
    closed: Arc<Notify>,
    plan: Arc<PhysicalPlan>,
    me: u16,
    peer: u16,
    attempt: u64,
    incoming: mpsc::UnboundedSender<Incoming>,
    credits: Arc<Credits>,
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
    report_lost(&context.incoming, &context.credits, context.peer, reason);
}

impl ReadContext {
    /// Checks one frame from the peer and hands it on.
    fn accept(&self, frame: Frame) -> Result<(), String> {
        if frame.attempt() != self.attempt {
            return Err(format!("a frame of attempt {}, this node is in {}", frame.attempt(), self.attempt));
        }
        match frame {
            Frame::Element { channel, element, .. } => {
                let spec =
                    self.plan.channels.get(channel.0 as usize).ok_or(format!("unknown channel {}", channel.0))?;
                let (from, to) = (self.plan.node_of(spec.from), self.plan.node_of(spec.to));
                if from != self.peer || to != self.me {
                    return Err(format!(
                        "channel {} does not run from node {} to node {}",
                        channel.0, self.peer, self.me
                    ));
                }
                self.incoming.send(Incoming::Element(channel, element)).map_err(|_| "the node is gone".to_string())
            }
            Frame::Credit { channel, credits, .. } => {
                let spec = self
                    .plan
                    .channels
                    .get(channel.0 as usize)
                    .ok_or(format!("credit for unknown channel {}", channel.0))?;
                if self.plan.node_of(spec.from) != self.me || self.plan.node_of(spec.to) != self.peer {
                    return Err(format!("credit for channel {}, which does not run to node {}", channel.0, self.peer));
                }
                let mut available = self.credits.available.lock().expect("credits lock");
                let entry = available.get_mut(&channel).expect("credits of every remote output channel");
                *entry = entry
                    .checked_add(credits)
                    .filter(|c| *c <= CHANNEL_CREDITS)
                    .ok_or(format!("credits for channel {} beyond its window of {CHANNEL_CREDITS}", channel.0))?;
                drop(available);
                self.credits.granted.notify_waiters();
                Ok(())
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
