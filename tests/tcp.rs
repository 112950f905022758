//! The TCP transport against hostile and broken peers: a test plays node 1 with a raw socket.

use std::sync::Arc;
use std::time::Duration;

use sabot::tcp::{TcpConfig, TcpTransport, CHANNEL_CREDITS};
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

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).unwrap();
    bytes
}

/// Sends `bytes` as node 1 and checks that node 0 closes the connection without a hello back.
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
// reason, and do not stop the node from accepting its real peer; after the handshake, a frame
// for an unknown channel or from another attempt breaks the transport with a reason, never a
// panic. Method: node 0 is a real TcpTransport; node 1 is this test with raw sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused() {
    let plan = plan();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = TcpConfig { node: 0, attempt: 7, addresses: vec![address, address], secret: SECRET.to_vec() };
    let node0 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect(plan, config, &listener).await })
    };

    let hello = |attempt, secret: &[u8]| frame_bytes(&Frame::Hello { attempt, node: 1, secret: secret.to_vec() });
    refused(address, &hello(7, b"wrong secret")).await;
    let mut wrong_version = hello(7, SECRET);
    wrong_version[4] = WIRE_VERSION + 1;
    refused(address, &wrong_version).await;
    refused(address, &(u32::MAX).to_le_bytes()).await;
    let truncated = hello(7, SECRET);
    refused(address, &truncated[..truncated.len() - 3]).await;
    refused(address, &hello(6, SECRET)).await;
    refused(address, &frame_bytes(&Frame::Heartbeat { attempt: 7, sequence: 1 })).await;

    // The real node 1: its hello is answered, and the transport comes up.
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&hello(7, SECRET)).await.unwrap();
    let mut answer = vec![0; 4];
    stream.read_exact(&mut answer).await.unwrap();
    let mut body = vec![0; u32::from_le_bytes(answer[..4].try_into().unwrap()) as usize];
    stream.read_exact(&mut body).await.unwrap();
    assert!(matches!(Frame::decode(&body).unwrap(), Frame::Hello { attempt: 7, node: 0, .. }));
    let mut node0 = node0.await.unwrap().expect("node 0 connected to its real peer");

    // A frame on a channel that does not run from node 1 to node 0 breaks the connection.
    let wrong_way = channel_between(&plan, 0, 1);
    let element = Frame::Element { attempt: 7, channel: wrong_way, element: Element::Watermark(EventTime(1)) };
    stream.write_all(&frame_bytes(&element)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    let TransportError::PeerLost { peer: 1, reason } = &error else { panic!("{error:?}") };
    assert!(reason.contains("does not run from node 1 to node 0"), "{reason}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await.unwrap();
}

// Goal: credits bound what a sender has in flight: with no credit back, the channel refuses the
// element after CHANNEL_CREDITS (backpressure, nothing buffered beyond it); a grant reopens it,
// and a grant beyond the window breaks the connection. A frame of another attempt is refused
// too (a stale peer is fenced off). Method: node 1 is a real TcpTransport, node 0 this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_bound_the_sender() {
    let plan = plan();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let node1_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node1_address = node1_listener.local_addr().unwrap();
    let config = TcpConfig { node: 1, attempt: 3, addresses: vec![address, node1_address], secret: SECRET.to_vec() };
    let node1 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect(plan, config, &node1_listener).await })
    };
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut header = vec![0; 4];
    stream.read_exact(&mut header).await.unwrap();
    let mut body = vec![0; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
    stream.read_exact(&mut body).await.unwrap();
    assert!(matches!(Frame::decode(&body).unwrap(), Frame::Hello { attempt: 3, node: 1, .. }));
    stream.write_all(&frame_bytes(&Frame::Hello { attempt: 3, node: 0, secret: SECRET.to_vec() })).await.unwrap();
    let mut node1 = node1.await.unwrap().expect("node 1 connected");

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

// Goal: a peer from another attempt of the job is fenced off after the handshake too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_attempt_frames_break_the_connection() {
    let plan = plan();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let config = TcpConfig { node: 0, attempt: 5, addresses: vec![address, address], secret: SECRET.to_vec() };
    let node0 = {
        let plan = plan.clone();
        tokio::spawn(async move { TcpTransport::connect(plan, config, &listener).await })
    };
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(&frame_bytes(&Frame::Hello { attempt: 5, node: 1, secret: SECRET.to_vec() })).await.unwrap();
    let mut node0 = node0.await.unwrap().expect("node 0 connected");
    let channel = channel_between(&plan, 1, 0);
    let stale = Frame::Element { attempt: 4, channel, element: Element::End };
    stream.write_all(&frame_bytes(&stale)).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), node0.recv()).await.unwrap().unwrap_err();
    assert!(error.to_string().contains("attempt 4"), "{error}");
}
