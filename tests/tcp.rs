//! The TCP transport against hostile and broken peers (a test plays process 1 with a raw
//! socket), and between processes of several nodes (one connection per pair of processes).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sabot::tcp::{ProcessConfig, TcpTransport, CHANNEL_CREDITS, LOCAL_CAPACITY};
use sabot_kernel::dataflow::PhysicalPlan;
use sabot_kernel::element::Element;
use sabot_kernel::env::{ChannelId, SendRefused, Transport, TransportError};
use sabot_kernel::time::EventTime;
use sabot_kernel::wire::{Frame, WIRE_VERSION};
use sabot_kernel::workload::w2_job;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &[u8] = b"the job's secret";

fn plan() -> Arc<PhysicalPlan> {
    Arc::new(PhysicalPlan::new(w2_job(1_000, 2, 100).unwrap(), 2))
}

/// Node 0 is process 0 and node 1 process 1, listening at `addresses`.
fn two_processes(process: u16, attempt: u64, addresses: Vec<std::net::SocketAddr>) -> ProcessConfig {
    ProcessConfig { process, attempt, addresses, node_processes: vec![0, 1], secret: SECRET.to_vec() }
}

/// The one endpoint of a process of one node.
fn only(endpoints: Result<Vec<TcpTransport>, TransportError>) -> TcpTransport {
    let mut endpoints = endpoints.expect("the process connected");
    assert_eq!(endpoints.len(), 1, "one node, one endpoint");
    endpoints.pop().unwrap()
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).unwrap();
    bytes
}

/// Sends `bytes` as process 1 and checks that process 0 closes the connection without a hello back.
async fn refused(address: std::net::SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    // A peer that sent this much and no more (a truncated frame ends at the close).
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    // The node closes the socket: the read ends (0 bytes or a reset), with nothing sent back.
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the node kept the connection open");
    assert!(answer.is_empty(), "the node answered a refused connection: {answer:?}");
}

/// A channel of `plan` from node `from` to node `to`.
fn channel_between(plan: &PhysicalPlan, from: u16, to: u16) -> ChannelId {
    let index = plan
        .channels
        .iter()
        .position(|spec| plan.node_of(spec.from) == from && plan.node_of(spec.to) == to)
        .expect("a channel between the nodes");
    ChannelId(index as u32)
}

// Goal: connections that present a wrong secret, a wrong wire version, an oversized length, a
// truncated hello, another attempt or something other than a hello are closed with a logged
// reason, and do not stop the process from accepting its real peer; after the handshake, a frame
// on a channel that does not run between the two breaks the transport with a reason, never a
// panic. Method: process 0 (node 0) is a real TcpTransport; process 1 is this test with raw sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused() {
    let plan = plan();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = two_processes(0, 7, vec![address, address]);
    let node0 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect_process(plan, config, &listener).await })
    };

    let hello = |attempt, secret: &[u8]| frame_bytes(&Frame::Hello { attempt, process: 1, secret: secret.to_vec() });
    refused(address, &hello(7, b"wrong secret")).await;
    let mut wrong_version = hello(7, SECRET);
    wrong_version[4] = WIRE_VERSION + 1;
    refused(address, &wrong_version).await;
    refused(address, &(u32::MAX).to_le_bytes()).await;
    let truncated = hello(7, SECRET);
    refused(address, &truncated[..truncated.len() - 3]).await;
    refused(address, &hello(6, SECRET)).await;
    refused(address, &frame_bytes(&Frame::Heartbeat { attempt: 7, sequence: 1 })).await;
    refused(address, &frame_bytes(&Frame::Hello { attempt: 7, process: 2, secret: SECRET.to_vec() })).await;

    // The real process 1: its hello is answered, and the transport comes up.
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&hello(7, SECRET)).await.unwrap();
    let mut answer = vec![0; 4];
    stream.read_exact(&mut answer).await.unwrap();
    let mut body = vec![0; u32::from_le_bytes(answer[..4].try_into().unwrap()) as usize];
    stream.read_exact(&mut body).await.unwrap();
    assert!(matches!(Frame::decode(&body).unwrap(), Frame::Hello { attempt: 7, process: 0, .. }));
    let mut node0 = only(node0.await.unwrap());

    // A frame on a channel that does not run from process 1 to process 0 breaks the connection.
    let wrong_way = channel_between(&plan, 0, 1);
    let element = Frame::Element { attempt: 7, channel: wrong_way, element: Element::Watermark(EventTime(1)) };
    stream.write_all(&frame_bytes(&element)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    let TransportError::PeerLost { peer: 1, reason } = &error else { panic!("{error:?}") };
    assert!(reason.contains("does not run from process 1 to process 0"), "{reason}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.unwrap();
}

// Goal: credits bound what a sender has in flight: with no credit back, the channel refuses the
// element after CHANNEL_CREDITS (backpressure, nothing buffered beyond it); a grant reopens it,
// and a grant beyond the window breaks the connection. A frame of another attempt is refused
// too (a stale peer is fenced off). Method: process 1 (node 1) is a real TcpTransport, process 0
// this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_bound_the_sender() {
    let plan = plan();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let node1_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node1_address = node1_listener.local_addr().unwrap();
    let config = two_processes(1, 3, vec![address, node1_address]);
    let node1 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect_process(plan, config, &node1_listener).await })
    };
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut header = vec![0; 4];
    stream.read_exact(&mut header).await.unwrap();
    let mut body = vec![0; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
    stream.read_exact(&mut body).await.unwrap();
    assert!(matches!(Frame::decode(&body).unwrap(), Frame::Hello { attempt: 3, process: 1, .. }));
    stream.write_all(&frame_bytes(&Frame::Hello { attempt: 3, process: 0, secret: SECRET.to_vec() })).await.unwrap();
    let mut node1 = only(node1.await.unwrap());

    let channel = channel_between(&plan, 1, 0);
    for i in 0..CHANNEL_CREDITS {
        node1.try_send(channel, Element::Watermark(EventTime(i64::from(i)))).expect("within the credit window");
    }
    let refused = node1.try_send(channel, Element::Watermark(EventTime(99)));
    assert!(matches!(refused, Err(SendRefused::Full(_))), "the window is used up");
    stream.write_all(&frame_bytes(&Frame::Credit { attempt: 3, channel, credits: 2 })).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), node1.writable(channel)).await.unwrap().unwrap();
    node1.try_send(channel, Element::Watermark(EventTime(100))).expect("credit granted");

    stream.write_all(&frame_bytes(&Frame::Credit { attempt: 3, channel, credits: CHANNEL_CREDITS })).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node1.recv()).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("beyond its window"), "{error}");
}

/// Process 0 (node 0) in `attempt`, connected to this test playing process 1 on the stream.
async fn connected_node0(plan: &Arc<PhysicalPlan>, attempt: u64) -> (TcpTransport, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = two_processes(0, attempt, vec![address, address]);
    let node0 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect_process(plan, config, &listener).await })
    };
    let mut stream = TcpStream::connect(address).await.unwrap();
    let hello = Frame::Hello { attempt, process: 1, secret: SECRET.to_vec() };
    stream.write_all(&frame_bytes(&hello)).await.unwrap();
    (only(node0.await.unwrap()), stream)
}

// Goal: a peer from another attempt of the job is fenced off after the handshake too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_attempt_frames_break_the_connection() {
    let plan = plan();
    let (mut node0, mut stream) = connected_node0(&plan, 5).await;
    let channel = channel_between(&plan, 1, 0);
    let stale = Frame::Element { attempt: 4, channel, element: Element::End };
    stream.write_all(&frame_bytes(&stale)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("attempt 4"), "{error}");
}

// Goal: an element on a channel the plan does not have, and elements beyond a channel's credit
// window (a sender that ignores flow control), break the connection with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_channels_and_overruns_break_the_connection() {
    let plan = plan();
    let (mut node0, mut stream) = connected_node0(&plan, 2).await;
    let unknown = ChannelId(plan.channels.len() as u32);
    let element = Frame::Element { attempt: 2, channel: unknown, element: Element::End };
    stream.write_all(&frame_bytes(&element)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    assert!(matches!(&error, TransportError::PeerLost { peer: 1, .. }), "{error:?}");
    assert!(error.to_string().contains(&format!("unknown channel {}", unknown.0)), "{error}");

    let (mut node0, mut stream) = connected_node0(&plan, 2).await;
    let channel = channel_between(&plan, 1, 0);
    for i in 0..=CHANNEL_CREDITS {
        let element = Frame::Element { attempt: 2, channel, element: Element::Watermark(EventTime(i64::from(i))) };
        stream.write_all(&frame_bytes(&element)).await.unwrap();
    }
    // The node takes nothing (so grants nothing) until its process closed the connection: the
    // element beyond the window was refused. Then the window's elements arrive, and the reason.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.unwrap();
    for i in 0..CHANNEL_CREDITS {
        let (_, element) = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap();
        assert!(matches!(element, Element::Watermark(EventTime(t)) if t == i64::from(i)), "{element:?}");
    }
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("beyond its window"), "{error}");
}

/// The next element for `endpoint`, within five seconds.
async fn recv(endpoint: &mut TcpTransport) -> (ChannelId, Element) {
    let received = tokio::time::timeout(Duration::from_secs(5), endpoint.recv()).await;
    received.expect("an element in time").expect("the transport works")
}

/// A listener in front of `target` that counts the connections it accepts and relays them.
async fn counting_proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (address, count)
}

// Goal: two processes of two nodes each talk over exactly one connection (both directions, every
// channel between their nodes), nodes of one process over in-process queues; credits bound what
// is in flight on a remote channel, which stays FIFO; when one process goes away, every node of
// the other learns it. Method: two groups of two endpoints in this test process, each group one
// "process" with its own listener behind a proxy that counts the connections it accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_one_connection() {
    let plan = Arc::new(PhysicalPlan::new(w2_job(1_000, 4, 100).unwrap(), 4));
    let node_processes = vec![0, 0, 1, 1];
    let listeners = [TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap()];
    let mut addresses = Vec::new();
    let mut counts = Vec::new();
    for listener in &listeners {
        let (address, count) = counting_proxy(listener.local_addr().unwrap()).await;
        addresses.push(address);
        counts.push(count);
    }
    let connecting: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(process, listener)| {
            let config = ProcessConfig {
                process: process as u16,
                attempt: 1,
                addresses: addresses.clone(),
                node_processes: node_processes.clone(),
                secret: SECRET.to_vec(),
            };
            let plan = plan.clone();
            tokio::spawn(async move { TcpTransport::connect_process(plan, config, &listener).await })
        })
        .collect();
    let mut endpoints = Vec::new();
    for handle in connecting {
        let group = handle.await.unwrap().expect("the process connected");
        assert_eq!(group.len(), 2, "one endpoint per node of the process");
        endpoints.extend(group);
    }
    // Process 1 connected to process 0, once; nobody connected to process 1.
    assert_eq!(counts[0].load(Ordering::SeqCst), 1, "connections accepted by process 0");
    assert_eq!(counts[1].load(Ordering::SeqCst), 0, "connections accepted by process 1");
    let [mut e0, mut e1, mut e2, mut e3] = <[TcpTransport; 4]>::try_from(endpoints).ok().unwrap();

    // From process 1 to process 0: at most CHANNEL_CREDITS in flight, in order, window after window.
    let remote = channel_between(&plan, 2, 0);
    let total = 5 * CHANNEL_CREDITS;
    let (mut sent, mut received) = (0_u32, 0_u32);
    while received < total {
        while sent < total {
            match e2.try_send(remote, Element::Watermark(EventTime(i64::from(sent)))) {
                Ok(()) => sent += 1,
                Err(SendRefused::Full(_)) => break,
                Err(SendRefused::Failed(error)) => panic!("{error}"),
            }
        }
        assert!(sent - received <= CHANNEL_CREDITS, "{sent} sent, {received} received");
        if received == 0 {
            assert_eq!(sent, CHANNEL_CREDITS, "the first window, before any grant");
        }
        if sent == received {
            tokio::time::timeout(Duration::from_secs(5), e2.writable(remote)).await.unwrap().unwrap();
            continue;
        }
        let (channel, element) = recv(&mut e0).await;
        assert_eq!(channel, remote);
        assert!(matches!(element, Element::Watermark(EventTime(t)) if t == i64::from(received)), "{element:?}");
        received += 1;
    }

    // The other way, on the same connection, to the right node of process 1.
    let back = channel_between(&plan, 0, 3);
    e0.try_send(back, Element::Watermark(EventTime(7))).unwrap();
    let (channel, element) = recv(&mut e3).await;
    assert_eq!(channel, back);
    assert!(matches!(element, Element::Watermark(EventTime(7))), "{element:?}");

    // Between the nodes of process 0: a bounded in-process queue.
    let local = channel_between(&plan, 0, 1);
    for i in 0..LOCAL_CAPACITY {
        e0.try_send(local, Element::Watermark(EventTime(i as i64))).expect("room in the local queue");
    }
    assert!(matches!(e0.try_send(local, Element::Watermark(EventTime(99))), Err(SendRefused::Full(_))));
    for i in 0..LOCAL_CAPACITY {
        let (channel, element) = recv(&mut e1).await;
        assert_eq!(channel, local);
        assert!(matches!(element, Element::Watermark(EventTime(t)) if t == i as i64), "{element:?}");
    }
    assert_eq!(counts[0].load(Ordering::SeqCst) + counts[1].load(Ordering::SeqCst), 1, "still one connection");

    // Process 1 goes away with channels into both nodes of process 0 open: both learn it.
    drop((e2, e3));
    for endpoint in [&mut e0, &mut e1] {
        let error = tokio::time::timeout(Duration::from_secs(5), endpoint.recv()).await.unwrap().unwrap_err();
        assert!(matches!(&error, TransportError::PeerLost { peer: 1, .. }), "{error:?}");
    }
}
