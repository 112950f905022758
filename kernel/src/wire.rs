//! The wire format between processes: length-prefixed frames on one connection per pair of
//! processes, multiplexing the logical channels between subtasks.
//!
//! Pure and synchronous: the driver's TCP transport feeds received bytes into a [`FrameDecoder`]
//! and writes what [`Frame::encode`] gives. Bytes come from the network, so decoding checks all of
//! it and returns a [`WireError`] naming what is wrong; it never panics, and it never allocates a
//! size a peer claims before that many bytes arrived (a length above [`FRAME_SIZE_MAX`] is refused
//! as soon as its four bytes are in).
//!
//! # Format, version 3 (integers little-endian)
//! ```text
//! frame     := length u32 (of what follows, at most FRAME_SIZE_MAX) | version u8 = 3 | kind u8
//!              | attempt u64 | payload
//! kind 0 Hello:     process u16 | secret length u16 | secret bytes
//! kind 1 Element:   channel u32 | element
//! kind 2 Credit:    channel u32 | credits u32
//! kind 3 Heartbeat: sequence u64
//! element   := 0 batch: Arrow IPC file bytes (the rest of the frame) | 1 watermark: i64
//!              | 2 barrier: checkpoint u64, kind u8 (0 aligned, 1 unaligned) | 3 idle | 4 active | 5 end
//! ```
//! The attempt number fences off a peer with a stale view: every frame carries the job attempt
//! its sender belongs to, and a receiver drops the connection on any other.

use crate::dataflow::sink::{decode_ipc_file, encode_ipc_file};
use crate::element::{Barrier, BarrierKind, CheckpointId, Element};
use crate::env::ChannelId;
use crate::time::EventTime;

/// The version this build speaks.
/// Version 3: a worker registers one data address and its node count; an assignment names each
/// process's address and the process of each node.
pub const WIRE_VERSION: u8 = 3;
/// The largest frame accepted (after the length field), in bytes: a batch of 64 MiB.
pub const FRAME_SIZE_MAX: usize = 64 << 20;
/// The longest shared secret a hello may carry, in bytes.
pub const SECRET_SIZE_MAX: usize = 1024;
/// Version, kind and attempt.
const HEADER_SIZE: usize = 1 + 1 + 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {size} bytes is larger than the limit of {FRAME_SIZE_MAX}")]
    Oversized { size: usize },
    #[error("wire version {0}, this build speaks {WIRE_VERSION}")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// One message between two processes.
#[derive(Clone, Debug)]
pub enum Frame {
    /// The first frame on a connection, from the side that connected; the answer of the side
    /// that accepted. `process` is the sender's process index in the job's attempt.
    Hello {
        attempt: u64,
        process: u16,
        secret: Vec<u8>,
    },
    Element {
        attempt: u64,
        channel: ChannelId,
        element: Element,
    },
    /// The receiver of `channel` has room for `credits` more elements.
    Credit {
        attempt: u64,
        channel: ChannelId,
        credits: u32,
    },
    Heartbeat {
        attempt: u64,
        sequence: u64,
    },
}

impl Frame {
    pub fn attempt(&self) -> u64 {
        match self {
            Frame::Hello { attempt, .. }
            | Frame::Element { attempt, .. }
            | Frame::Credit { attempt, .. }
            | Frame::Heartbeat { attempt, .. } => *attempt,
        }
    }

    /// Appends the frame, length first, to `out`. A batch that Arrow cannot encode, or a frame
    /// above the limit, is an error (nothing is appended).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(WIRE_VERSION);
        let (kind, attempt) = match self {
            Frame::Hello { attempt, .. } => (0, attempt),
            Frame::Element { attempt, .. } => (1, attempt),
            Frame::Credit { attempt, .. } => (2, attempt),
            Frame::Heartbeat { attempt, .. } => (3, attempt),
        };
        out.push(kind);
        out.extend_from_slice(&attempt.to_le_bytes());
        let result = match self {
            Frame::Hello { process, secret, .. } => {
                if secret.len() > SECRET_SIZE_MAX {
                    Err(malformed(format!("secret of {} bytes", secret.len())))
                } else {
                    out.extend_from_slice(&process.to_le_bytes());
                    out.extend_from_slice(&(secret.len() as u16).to_le_bytes());
                    out.extend_from_slice(secret);
                    Ok(())
                }
            }
            Frame::Element { channel, element, .. } => {
                out.extend_from_slice(&channel.0.to_le_bytes());
                encode_element(element, out)
            }
            Frame::Credit { channel, credits, .. } => {
                out.extend_from_slice(&channel.0.to_le_bytes());
                out.extend_from_slice(&credits.to_le_bytes());
                Ok(())
            }
            Frame::Heartbeat { sequence, .. } => {
                out.extend_from_slice(&sequence.to_le_bytes());
                Ok(())
            }
        };
        finish_frame(out, start, result)
    }

    /// Decodes one frame's body (what follows the length field).
    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        let mut reader = Reader { bytes: body };
        let version = reader.u8("version")?;
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        if body.len() < HEADER_SIZE {
            return Err(malformed(format!("frame of {} bytes, shorter than its header", body.len())));
        }
        let kind = reader.u8("kind")?;
        let attempt = reader.u64("attempt")?;
        let frame = match kind {
            0 => {
                let process = reader.u16("process")?;
                let length = usize::from(reader.u16("secret length")?);
                if length > SECRET_SIZE_MAX {
                    return Err(malformed(format!("secret of {length} bytes")));
                }
                Frame::Hello { attempt, process, secret: reader.take(length, "secret")?.to_vec() }
            }
            1 => {
                let channel = ChannelId(reader.u32("channel")?);
                let element = decode_element(&mut reader)?;
                Frame::Element { attempt, channel, element }
            }
            2 => Frame::Credit { attempt, channel: ChannelId(reader.u32("channel")?), credits: reader.u32("credits")? },
            3 => Frame::Heartbeat { attempt, sequence: reader.u64("sequence")? },
            kind => return Err(malformed(format!("frame kind {kind}"))),
        };
        if !reader.bytes.is_empty() {
            return Err(malformed(format!("{} bytes after the frame", reader.bytes.len())));
        }
        Ok(frame)
    }
}

fn encode_element(element: &Element, out: &mut Vec<u8>) -> Result<(), WireError> {
    match element {
        Element::Batch(batch) => {
            out.push(0);
            let file = encode_ipc_file(&batch.schema(), std::slice::from_ref(batch))
                .map_err(|error| malformed(format!("encoding a batch: {error}")))?;
            out.extend_from_slice(&file);
        }
        Element::Watermark(watermark) => {
            out.push(1);
            out.extend_from_slice(&watermark.0.to_le_bytes());
        }
        Element::Barrier(barrier) => {
            out.push(2);
            out.extend_from_slice(&barrier.checkpoint.0.to_le_bytes());
            out.push(match barrier.kind {
                BarrierKind::Aligned => 0,
                BarrierKind::Unaligned => 1,
            });
        }
        Element::Idle => out.push(3),
        Element::Active => out.push(4),
        Element::End => out.push(5),
    }
    Ok(())
}

fn decode_element(reader: &mut Reader<'_>) -> Result<Element, WireError> {
    Ok(match reader.u8("element kind")? {
        0 => {
            let bytes = std::mem::take(&mut reader.bytes);
            let mut batches = decode_ipc_file(bytes.to_vec()).map_err(|e| malformed(format!("batch: {e}")))?;
            if batches.len() != 1 {
                return Err(malformed(format!("{} batches in one element", batches.len())));
            }
            Element::Batch(batches.remove(0))
        }
        1 => Element::Watermark(EventTime(reader.u64("watermark")? as i64)),
        2 => {
            let checkpoint = CheckpointId(reader.u64("checkpoint")?);
            let kind = match reader.u8("barrier kind")? {
                0 => BarrierKind::Aligned,
                1 => BarrierKind::Unaligned,
                kind => return Err(malformed(format!("barrier kind {kind}"))),
            };
            Element::Barrier(Barrier { checkpoint, kind })
        }
        3 => Element::Idle,
        4 => Element::Active,
        5 => Element::End,
        kind => return Err(malformed(format!("element kind {kind}"))),
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < count {
            return Err(malformed(format!("truncated in {what}")));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("eight bytes")))
    }
}

/// Cuts a byte stream into frames. Holds at most one partial frame.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Where the unread bytes of `buffer` start.
    at: usize,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Takes bytes as they arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 && self.at == self.buffer.len() {
            self.buffer.clear();
            self.at = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame, `None` until its last byte arrived. After an error the connection
    /// must be closed: the stream cannot be resynchronized.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        self.next_with(Frame::decode)
    }

    /// The next whole control message (the coordinator's connections), as [`Self::next_frame`].
    pub fn next_control(&mut self) -> Result<Option<Control>, WireError> {
        self.next_with(Control::decode)
    }

    fn next_with<T>(&mut self, decode: impl FnOnce(&[u8]) -> Result<T, WireError>) -> Result<Option<T>, WireError> {
        let unread = &self.buffer[self.at..];
        let Some(length) = unread.get(..4) else { return Ok(None) };
        let size = u32::from_le_bytes(length.try_into().expect("four bytes")) as usize;
        if size > FRAME_SIZE_MAX {
            return Err(WireError::Oversized { size });
        }
        if size < 2 {
            return Err(malformed(format!("frame of {size} bytes, shorter than its header")));
        }
        let Some(body) = unread.get(4..4 + size) else { return Ok(None) };
        let frame = decode(body)?;
        self.at += 4 + size;
        // Keep the buffer from growing with consumed bytes.
        if self.at > (1 << 20) && self.at * 2 > self.buffer.len() {
            self.buffer.drain(..self.at);
            self.at = 0;
        }
        Ok(Some(frame))
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.at
    }
}

/// What a job runs: a workload of `crate::workload` and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    /// `w2` (the keyed window of WORKLOADS.md).
    pub name: String,
    pub records: u64,
    pub parallelism: u16,
    pub batch_size: u32,
}

/// A worker's part of one attempt of the job. The worker is process `process` of the attempt;
/// the job has `node_processes.len()` nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub attempt: u64,
    pub job: JobSpec,
    /// This worker's index among the attempt's processes.
    pub process: u16,
    /// Every process's data address (`host:port`), by process index.
    pub addresses: Vec<String>,
    /// The process that runs each node, by node index (every process runs at least one).
    pub node_processes: Vec<u16>,
    /// Take checkpoints (the coordinator triggers them).
    pub checkpointing: bool,
    pub alignment_timeout_ms: Option<u64>,
    /// Restore from this completed checkpoint of the data directory.
    pub restore: Option<CheckpointId>,
}

impl Assignment {
    /// The nodes this worker runs, in increasing order.
    pub fn nodes(&self) -> Vec<u16> {
        let owned = self.node_processes.iter().enumerate().filter(|(_, &process)| process == self.process);
        owned.map(|(node, _)| node as u16).collect()
    }
}

/// Messages between the coordinator process and its workers, framed like [`Frame`]s (kinds
/// from 16 on) on their own connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// A worker offers itself: the job's secret, where it listens for its peer processes, and
    /// how many nodes it runs (at least 1).
    Register {
        secret: Vec<u8>,
        address: String,
        nodes: u16,
    },
    Assign(Assignment),
    Trigger {
        checkpoint: CheckpointId,
        kind: BarrierKind,
    },
    Complete {
        checkpoint: CheckpointId,
    },
    /// The attempt is over (done, failed elsewhere, or stopped): drop the node.
    Stop,
    /// A subtask's acknowledgement: its snapshot, as a one-task manifest's bytes.
    Ack {
        checkpoint: CheckpointId,
        snapshot: Vec<u8>,
    },
    /// Every subtask of the worker's node processed its end of input.
    Finished {
        node: u16,
    },
    /// ... and its final output is committed.
    Done {
        node: u16,
    },
    /// The worker's node failed.
    Failed {
        reason: String,
    },
    Heartbeat,
    /// The job is complete: the worker exits.
    JobDone,
    /// A client asks the coordinator for the live state of `operator` for `key` (the key as
    /// the key-group hash takes it: a `u64`, or an `i64`'s two's complement).
    Query {
        secret: Vec<u8>,
        operator: String,
        key: u64,
    },
    /// The coordinator asks the worker running `node` (which holds the key's group).
    QueryNode {
        id: u64,
        node: u16,
        operator: String,
        key: u64,
    },
    /// The answer to a query (`id` 0 towards a client): the rows as an Arrow IPC stream, or why
    /// there are none.
    Answer {
        id: u64,
        rows: Result<Vec<u8>, String>,
    },
    /// Watermark alignment between processes, per alignment group (at most
    /// [`ALIGNMENT_GROUPS_MAX`], each named once): from a worker, the minimum watermark of the
    /// group's splits on its nodes; from the coordinator, the minimum over the other workers.
    /// `None`: no split of the group holds the others back there (none started, or all ended).
    Alignment {
        minima: Vec<(String, Option<i64>)>,
    },
}

/// The most alignment groups one [`Control::Alignment`] carries.
pub const ALIGNMENT_GROUPS_MAX: usize = 1024;

fn put_string(out: &mut Vec<u8>, s: &str) -> Result<(), WireError> {
    let length = u32::try_from(s.len()).map_err(|_| malformed("string over 4 GiB"))?;
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_strings(out: &mut Vec<u8>, strings: &[String]) -> Result<(), WireError> {
    if strings.len() > NODE_COUNT_MAX {
        return Err(malformed(format!("{} strings, at most {NODE_COUNT_MAX}", strings.len())));
    }
    out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    strings.iter().try_for_each(|s| put_string(out, s))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), WireError> {
    let length = u32::try_from(bytes.len()).map_err(|_| malformed("bytes over 4 GiB"))?;
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

impl Reader<'_> {
    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, WireError> {
        let length = self.u32(what)? as usize;
        Ok(self.take(length, what)?.to_vec())
    }

    fn string(&mut self, what: &str) -> Result<String, WireError> {
        String::from_utf8(self.bytes(what)?).map_err(|_| malformed(format!("{what} is not UTF-8")))
    }

    /// A count (at most `NODE_COUNT_MAX`, checked before anything is read) and as many strings.
    fn strings(&mut self, what: &str) -> Result<Vec<String>, WireError> {
        let count = self.u32(what)? as usize;
        if count > NODE_COUNT_MAX {
            return Err(malformed(format!("{count} of {what}")));
        }
        (0..count).map(|_| self.string(what)).collect()
    }

    fn option_u64(&mut self, what: &str) -> Result<Option<u64>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.u64(what)?)),
            flag => Err(malformed(format!("{what}: option flag {flag}"))),
        }
    }
}

fn put_option_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        None => out.push(0),
        Some(value) => {
            out.push(1);
            out.extend_from_slice(&value.to_le_bytes());
        }
    }
}

/// Writes the length of the frame begun at `start` (its body written, with `result`), or
/// removes the frame if writing it failed or it is above the limit.
fn finish_frame(out: &mut Vec<u8>, start: usize, result: Result<(), WireError>) -> Result<(), WireError> {
    let size = out.len() - start - 4;
    let result = match result {
        Ok(()) if size > FRAME_SIZE_MAX => Err(WireError::Oversized { size }),
        other => other,
    };
    match result {
        Ok(()) => {
            out[start..start + 4].copy_from_slice(&(size as u32).to_le_bytes());
            Ok(())
        }
        Err(error) => {
            out.truncate(start);
            Err(error)
        }
    }
}

/// Nodes an assignment may name, at most.
const NODE_COUNT_MAX: usize = 4096;

impl Control {
    /// Appends the message, length first, to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(WIRE_VERSION);
        let result = self.encode_body(out);
        finish_frame(out, start, result)
    }

    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Control::Register { secret, address, nodes } => {
                if secret.len() > SECRET_SIZE_MAX {
                    return Err(malformed(format!("secret of {} bytes", secret.len())));
                }
                out.push(16);
                put_bytes(out, secret)?;
                put_string(out, address)?;
                out.extend_from_slice(&nodes.to_le_bytes());
            }
            Control::Assign(assignment) => {
                out.push(17);
                out.extend_from_slice(&assignment.attempt.to_le_bytes());
                put_string(out, &assignment.job.name)?;
                out.extend_from_slice(&assignment.job.records.to_le_bytes());
                out.extend_from_slice(&assignment.job.parallelism.to_le_bytes());
                out.extend_from_slice(&assignment.job.batch_size.to_le_bytes());
                out.extend_from_slice(&assignment.process.to_le_bytes());
                put_strings(out, &assignment.addresses)?;
                if assignment.node_processes.len() > NODE_COUNT_MAX {
                    return Err(malformed(format!(
                        "{} nodes, at most {NODE_COUNT_MAX}",
                        assignment.node_processes.len()
                    )));
                }
                out.extend_from_slice(&(assignment.node_processes.len() as u32).to_le_bytes());
                for process in &assignment.node_processes {
                    out.extend_from_slice(&process.to_le_bytes());
                }
                out.push(u8::from(assignment.checkpointing));
                put_option_u64(out, assignment.alignment_timeout_ms);
                put_option_u64(out, assignment.restore.map(|c| c.0));
            }
            Control::Trigger { checkpoint, kind } => {
                out.push(18);
                out.extend_from_slice(&checkpoint.0.to_le_bytes());
                out.push(match kind {
                    BarrierKind::Aligned => 0,
                    BarrierKind::Unaligned => 1,
                });
            }
            Control::Complete { checkpoint } => {
                out.push(19);
                out.extend_from_slice(&checkpoint.0.to_le_bytes());
            }
            Control::Stop => out.push(20),
            Control::Ack { checkpoint, snapshot } => {
                out.push(21);
                out.extend_from_slice(&checkpoint.0.to_le_bytes());
                put_bytes(out, snapshot)?;
            }
            Control::Finished { node } => {
                out.push(22);
                out.extend_from_slice(&node.to_le_bytes());
            }
            Control::Done { node } => {
                out.push(23);
                out.extend_from_slice(&node.to_le_bytes());
            }
            Control::Failed { reason } => {
                out.push(24);
                put_string(out, reason)?;
            }
            Control::Heartbeat => out.push(25),
            Control::JobDone => out.push(26),
            Control::Query { secret, operator, key } => {
                if secret.len() > SECRET_SIZE_MAX {
                    return Err(malformed(format!("secret of {} bytes", secret.len())));
                }
                out.push(27);
                put_bytes(out, secret)?;
                put_string(out, operator)?;
                out.extend_from_slice(&key.to_le_bytes());
            }
            Control::QueryNode { id, node, operator, key } => {
                out.push(28);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&node.to_le_bytes());
                put_string(out, operator)?;
                out.extend_from_slice(&key.to_le_bytes());
            }
            Control::Alignment { minima } => {
                if minima.len() > ALIGNMENT_GROUPS_MAX {
                    return Err(malformed(format!("{} alignment groups", minima.len())));
                }
                if let Some((group, _)) = minima
                    .iter()
                    .enumerate()
                    .find_map(|(i, (g, _))| minima[..i].iter().any(|(seen, _)| seen == g).then_some((g, ())))
                {
                    return Err(malformed(format!("alignment group {group:?} twice")));
                }
                out.push(30);
                out.extend_from_slice(&(minima.len() as u32).to_le_bytes());
                for (group, minimum) in minima {
                    put_string(out, group)?;
                    put_option_u64(out, minimum.map(|minimum| minimum as u64));
                }
            }
            Control::Answer { id, rows } => {
                out.push(29);
                out.extend_from_slice(&id.to_le_bytes());
                match rows {
                    Ok(rows) => {
                        out.push(0);
                        put_bytes(out, rows)?;
                    }
                    Err(reason) => {
                        out.push(1);
                        put_string(out, reason)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Decodes one message's body (what follows the length field); never panics.
    pub fn decode(body: &[u8]) -> Result<Control, WireError> {
        let mut reader = Reader { bytes: body };
        let version = reader.u8("version")?;
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        let control = match reader.u8("kind")? {
            16 => {
                let secret = reader.bytes("secret")?;
                if secret.len() > SECRET_SIZE_MAX {
                    return Err(malformed(format!("secret of {} bytes", secret.len())));
                }
                let address = reader.string("address")?;
                let nodes = reader.u16("node count")?;
                if nodes == 0 {
                    return Err(malformed("a registration of 0 nodes"));
                }
                Control::Register { secret, address, nodes }
            }
            17 => {
                let attempt = reader.u64("attempt")?;
                let job = JobSpec {
                    name: reader.string("job name")?,
                    records: reader.u64("records")?,
                    parallelism: reader.u16("parallelism")?,
                    batch_size: reader.u32("batch size")?,
                };
                let process = reader.u16("process")?;
                let addresses = reader.strings("address")?;
                if usize::from(process) >= addresses.len() {
                    return Err(malformed(format!("process {process} of {}", addresses.len())));
                }
                let node_count = reader.u32("node count")? as usize;
                if node_count == 0 || node_count > NODE_COUNT_MAX {
                    return Err(malformed(format!("an assignment of {node_count} nodes")));
                }
                let node_processes = (0..node_count).map(|_| reader.u16("process")).collect::<Result<Vec<_>, _>>()?;
                let mut owned = vec![false; addresses.len()];
                for &owner in &node_processes {
                    let slot = owned
                        .get_mut(usize::from(owner))
                        .ok_or_else(|| malformed(format!("a node of process {owner} of {}", addresses.len())))?;
                    *slot = true;
                }
                if let Some(idle) = owned.iter().position(|owns| !owns) {
                    return Err(malformed(format!("process {idle} runs no node")));
                }
                let checkpointing = match reader.u8("checkpointing")? {
                    0 => false,
                    1 => true,
                    flag => return Err(malformed(format!("checkpointing flag {flag}"))),
                };
                let alignment_timeout_ms = reader.option_u64("alignment timeout")?;
                let restore = reader.option_u64("restore")?.map(CheckpointId);
                Control::Assign(Assignment {
                    attempt,
                    job,
                    process,
                    addresses,
                    node_processes,
                    checkpointing,
                    alignment_timeout_ms,
                    restore,
                })
            }
            18 => {
                let checkpoint = CheckpointId(reader.u64("checkpoint")?);
                let kind = match reader.u8("barrier kind")? {
                    0 => BarrierKind::Aligned,
                    1 => BarrierKind::Unaligned,
                    kind => return Err(malformed(format!("barrier kind {kind}"))),
                };
                Control::Trigger { checkpoint, kind }
            }
            19 => Control::Complete { checkpoint: CheckpointId(reader.u64("checkpoint")?) },
            20 => Control::Stop,
            21 => Control::Ack {
                checkpoint: CheckpointId(reader.u64("checkpoint")?),
                snapshot: reader.bytes("snapshot")?,
            },
            22 => Control::Finished { node: reader.u16("node")? },
            23 => Control::Done { node: reader.u16("node")? },
            24 => Control::Failed { reason: reader.string("reason")? },
            25 => Control::Heartbeat,
            26 => Control::JobDone,
            27 => {
                let secret = reader.bytes("secret")?;
                if secret.len() > SECRET_SIZE_MAX {
                    return Err(malformed(format!("secret of {} bytes", secret.len())));
                }
                Control::Query { secret, operator: reader.string("operator")?, key: reader.u64("key")? }
            }
            28 => Control::QueryNode {
                id: reader.u64("query id")?,
                node: reader.u16("node")?,
                operator: reader.string("operator")?,
                key: reader.u64("key")?,
            },
            29 => {
                let id = reader.u64("query id")?;
                let rows = match reader.u8("answer kind")? {
                    0 => Ok(reader.bytes("rows")?),
                    1 => Err(reader.string("reason")?),
                    kind => return Err(malformed(format!("answer kind {kind}"))),
                };
                Control::Answer { id, rows }
            }
            30 => {
                let count = reader.u32("alignment group count")? as usize;
                if count > ALIGNMENT_GROUPS_MAX {
                    return Err(malformed(format!("{count} alignment groups")));
                }
                let mut minima: Vec<(String, Option<i64>)> = Vec::with_capacity(count);
                for _ in 0..count {
                    let group = reader.string("alignment group")?;
                    if minima.iter().any(|(seen, _)| *seen == group) {
                        return Err(malformed(format!("alignment group {group:?} twice")));
                    }
                    let minimum = reader.option_u64("alignment minimum")?.map(|bits| bits as i64);
                    minima.push((group, minimum));
                }
                Control::Alignment { minima }
            }
            kind => return Err(malformed(format!("control kind {kind}"))),
        };
        if !reader.bytes.is_empty() {
            return Err(malformed(format!("{} bytes after the message", reader.bytes.len())));
        }
        Ok(control)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::source::GeneratorSource;
    use crate::dataflow::Source;
    use crate::time::Instant;

    fn frames() -> Vec<Frame> {
        let batch = GeneratorSource::new("g", 100, 50, 0, 1).poll_batch(Instant(0), &[]).unwrap().into_batch().unwrap();
        let channel = ChannelId(7);
        vec![
            Frame::Hello { attempt: 3, process: 2, secret: b"s3cret".to_vec() },
            Frame::Element { attempt: 3, channel, element: Element::Batch(batch) },
            Frame::Element { attempt: 3, channel, element: Element::Watermark(EventTime(-9)) },
            Frame::Element {
                attempt: 3,
                channel,
                element: Element::Barrier(Barrier { checkpoint: CheckpointId(5), kind: BarrierKind::Unaligned }),
            },
            Frame::Element { attempt: 3, channel, element: Element::Idle },
            Frame::Element { attempt: 3, channel, element: Element::Active },
            Frame::Element { attempt: 3, channel, element: Element::End },
            Frame::Credit { attempt: 3, channel, credits: 8 },
            Frame::Heartbeat { attempt: 3, sequence: u64::MAX },
        ]
    }

    /// A comparable rendering (batches compare by value through Debug of their columns).
    fn render(frame: &Frame) -> String {
        format!("{frame:?}")
    }

    // Goal: every frame kind reads back as written, also when the bytes arrive one at a time.
    #[test]
    fn frames_round_trip_in_any_chunking() {
        let mut bytes = Vec::new();
        for frame in frames() {
            frame.encode(&mut bytes).unwrap();
        }
        for chunk in [1, 3, 64, bytes.len()] {
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            for piece in bytes.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    decoded.push(render(&frame));
                }
            }
            assert_eq!(decoded, frames().iter().map(render).collect::<Vec<_>>(), "chunks of {chunk}");
            assert_eq!(decoder.buffered(), 0);
        }
    }

    // Goal: hostile frames are errors that name the fault, never panics: a wrong version, an
    // oversized length (refused before its body arrives, so nothing of that size is allocated),
    // a length shorter than the header, unknown kinds, trailing bytes, and every truncation and
    // single-byte change of valid frames.
    #[test]
    fn hostile_frames_are_refused() {
        let mut hello = Vec::new();
        frames()[0].encode(&mut hello).unwrap();
        let mut wrong_version = hello.clone();
        wrong_version[4] = 9;
        let mut decoder = FrameDecoder::new();
        decoder.push(&wrong_version);
        assert_eq!(decoder.next_frame().unwrap_err(), WireError::Version(9));

        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_le_bytes());
        assert_eq!(decoder.next_frame().unwrap_err(), WireError::Oversized { size: u32::MAX as usize });

        let mut decoder = FrameDecoder::new();
        decoder.push(&3_u32.to_le_bytes());
        decoder.push(&[WIRE_VERSION, 1, 0]);
        assert!(matches!(decoder.next_frame(), Err(WireError::Malformed(m)) if m.contains("shorter than its header")));

        let mut unknown_kind = hello.clone();
        unknown_kind[5] = 77;
        assert!(matches!(Frame::decode(&unknown_kind[4..]), Err(WireError::Malformed(m)) if m.contains("kind 77")));

        let mut trailing = hello.clone();
        trailing.push(0);
        let size = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&size.to_le_bytes());
        assert!(matches!(Frame::decode(&trailing[4..]), Err(WireError::Malformed(m)) if m.contains("after the frame")));

        let long_secret = Frame::Hello { attempt: 1, process: 0, secret: vec![0; SECRET_SIZE_MAX + 1] };
        assert!(long_secret.encode(&mut Vec::new()).is_err());

        for frame in frames() {
            let mut bytes = Vec::new();
            frame.encode(&mut bytes).unwrap();
            let body = &bytes[4..];
            for cut in 0..body.len() {
                // Truncated bodies are errors or, for batches, may not decode: never a panic.
                if let Ok(decoded) = Frame::decode(&body[..cut]) {
                    panic!("{frame:?} cut at {cut} decoded as {decoded:?}");
                }
            }
            for at in 0..body.len().min(400) {
                let mut changed = body.to_vec();
                changed[at] ^= 0x41;
                let _ = Frame::decode(&changed);
            }
        }
    }

    // Goal: every control message reads back as written; truncations and byte changes are
    // errors or other valid messages, never panics.
    #[test]
    fn control_messages_round_trip() {
        let assignment = Assignment {
            attempt: 4,
            job: JobSpec { name: "w2".into(), records: 1_000, parallelism: 3, batch_size: 100 },
            process: 1,
            addresses: vec!["127.0.0.1:4000".into(), "127.0.0.1:4001".into()],
            node_processes: vec![0, 1, 1],
            checkpointing: true,
            alignment_timeout_ms: Some(50),
            restore: Some(CheckpointId(9)),
        };
        let messages = vec![
            Control::Register { secret: b"s".to_vec(), address: "127.0.0.1:1".into(), nodes: 4 },
            Control::Assign(assignment),
            Control::Trigger { checkpoint: CheckpointId(3), kind: BarrierKind::Aligned },
            Control::Complete { checkpoint: CheckpointId(3) },
            Control::Stop,
            Control::Ack { checkpoint: CheckpointId(3), snapshot: vec![1, 2, 3] },
            Control::Finished { node: 2 },
            Control::Done { node: 2 },
            Control::Failed { reason: "disk full".into() },
            Control::Heartbeat,
            Control::JobDone,
            Control::Query { secret: b"s".to_vec(), operator: "window".into(), key: u64::MAX },
            Control::QueryNode { id: 7, node: 2, operator: "window".into(), key: 42 },
            Control::Answer { id: 7, rows: Ok(vec![1, 2, 3]) },
            Control::Answer { id: 0, rows: Err("the job is restarting".into()) },
            Control::Alignment { minima: vec![("w2".into(), Some(-5)), ("other".into(), None)] },
            Control::Alignment { minima: vec![] },
        ];
        let mut bytes = Vec::new();
        for message in &messages {
            message.encode(&mut bytes).unwrap();
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        for message in &messages {
            assert_eq!(decoder.next_control().unwrap().as_ref(), Some(message));
        }
        for message in &messages {
            let mut bytes = Vec::new();
            message.encode(&mut bytes).unwrap();
            let body = &bytes[4..];
            for cut in 0..body.len() {
                assert!(Control::decode(&body[..cut]).is_err(), "{message:?} cut at {cut}");
            }
            for at in 0..body.len() {
                let mut changed = body.to_vec();
                changed[at] ^= 0x41;
                let _ = Control::decode(&changed);
            }
        }
    }

    // Goal: counts are checked before anything is read or allocated, and an assignment names
    // only processes that exist, each running a node.
    #[test]
    fn control_counts_are_bounded() {
        // An assignment's head up to its addresses: attempt, job, process 0.
        let head = || {
            let mut body = vec![WIRE_VERSION, 17];
            body.extend_from_slice(&1_u64.to_le_bytes());
            put_string(&mut body, "w2").unwrap();
            body.extend_from_slice(&1_u64.to_le_bytes());
            body.extend_from_slice(&1_u16.to_le_bytes());
            body.extend_from_slice(&1_u32.to_le_bytes());
            body.extend_from_slice(&0_u16.to_le_bytes());
            body
        };
        let mut body = head();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Control::decode(&body), Err(WireError::Malformed(m)) if m.contains("4294967295 of address")));

        let mut body = head();
        put_strings(&mut body, &["a".into()]).unwrap();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Control::decode(&body), Err(WireError::Malformed(m)) if m.contains("4294967295 nodes")));

        let mut body = vec![WIRE_VERSION, 16];
        put_bytes(&mut body, b"s").unwrap();
        put_string(&mut body, "a").unwrap();
        body.extend_from_slice(&0_u16.to_le_bytes());
        assert!(matches!(Control::decode(&body), Err(WireError::Malformed(m)) if m.contains("0 nodes")));

        let assignment = |process, node_processes| {
            let mut bytes = Vec::new();
            let assignment = Control::Assign(Assignment {
                attempt: 1,
                job: JobSpec { name: "w2".into(), records: 1, parallelism: 1, batch_size: 1 },
                process,
                addresses: vec!["a".into(), "b".into()],
                node_processes,
                checkpointing: false,
                alignment_timeout_ms: None,
                restore: None,
            });
            assignment.encode(&mut bytes).unwrap();
            Control::decode(&bytes[4..])
        };
        assert!(matches!(assignment(0, vec![0, 2]), Err(WireError::Malformed(m)) if m.contains("process 2 of 2")));
        assert!(matches!(assignment(2, vec![0, 1]), Err(WireError::Malformed(m)) if m.contains("process 2 of 2")));
        assert!(
            matches!(assignment(0, vec![0, 0]), Err(WireError::Malformed(m)) if m.contains("process 1 runs no node"))
        );
        let Ok(Control::Assign(valid)) = assignment(1, vec![1, 0, 1]) else { panic!("a valid assignment") };
        assert_eq!(valid.nodes(), vec![0, 2]);
    }
}
