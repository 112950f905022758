//! The seed corpora of the byte-parsing fuzz targets (`fuzz/corpus/<target>/seed-*`): valid
//! encodings of each format, made here by the encoders, so that a fuzzer starts from inputs
//! that pass the magic bytes and the checksums and mutates them from there.
//!
//! `fuzz_seeds_decode` checks that every checked-in seed still decodes as its target reads it
//! (a format change makes a seed stale); `SABOT_FUZZ_SEEDS_WRITE=1 cargo test -p sabot-kernel
//! --lib fuzz_seeds` writes them anew. A seed the targets read sealed (their CRC-32 appended by
//! the target) is stored without its CRC.

use std::path::PathBuf;

use crate::checkpoint::inflight;
use crate::checkpoint::manifest::{decode_pointer, Manifest, TaskSnapshot, MANIFEST_VERSION};
use crate::dataflow::sink::{decode_ipc_file, encode_ipc_file};
use crate::dataflow::source::GeneratorSource;
use crate::dataflow::{Source, SplitPosition, SubtaskId, VertexId};
use crate::element::{Barrier, BarrierKind, CheckpointId, Element};
use crate::env::ChannelId;
use crate::key_group::{KeyGroup, KeyGroupRange};
use crate::state::keyed::{decode_descriptors, encode_descriptors, StateDescriptor, StateKind};
use crate::state::keyed::{TtlConfig, TtlTime, TtlUpdate, TtlVisibility};
use crate::state::{HeapBackend, KeyGroupsSnapshot, StateBackend};
use crate::time::{EventTime, Instant};
use crate::wire::{Assignment, Control, Frame, FrameDecoder, JobSpec};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn unsealed(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len() - 4].to_vec()
}

fn sealed(bytes: &[u8]) -> Vec<u8> {
    [bytes, &crc32fast::hash(bytes).to_le_bytes()].concat()
}

fn batch() -> arrow_array::RecordBatch {
    let mut source = GeneratorSource::new("g", 8, 8, 0, 1);
    source.poll_batch(Instant(0), &[]).expect("a generator batch").into_batch().expect("a batch")
}

fn manifest() -> Manifest {
    let subtask = |vertex, index| SubtaskId { vertex: VertexId(vertex), index };
    Manifest {
        version: MANIFEST_VERSION,
        job: "w2".into(),
        checkpoint: CheckpointId(7),
        savepoint: false,
        max_parallelism: 128,
        tasks: vec![
            TaskSnapshot {
                subtask: subtask(0, 0),
                source_positions: vec![SplitPosition { split: 1, position: 700 }],
                files: vec![],
                pending_output: vec![],
            },
            TaskSnapshot {
                subtask: subtask(2, 1),
                source_positions: vec![],
                files: vec!["checkpoints/chk-00000000000000000007/window-00002-00001.state".into()],
                pending_output: vec!["output/w2/.pending/part-7-1.arrow".into()],
            },
        ],
    }
}

fn snapshot() -> KeyGroupsSnapshot {
    let mut backend = HeapBackend::new(KeyGroupRange::new(0, 4));
    backend.put(KeyGroup(1), b"\x00\x01\x00\x01k", b"value").unwrap();
    backend.put(KeyGroup(1), b"\x00\x01\x00\x02kk", b"").unwrap();
    backend.put(KeyGroup(3), b"\x00\x02", b"\x00\x00\x00\x00\x00\x00\x00\x07").unwrap();
    backend.snapshot().unwrap()
}

fn descriptors() -> Vec<u8> {
    let ttl = TtlConfig {
        ttl_ms: 1_000,
        time: TtlTime::EventTime,
        update: TtlUpdate::OnReadAndWrite,
        visibility: TtlVisibility::ReturnExpiredIfNotCleanedUp,
        cleanup_on_snapshot: true,
        cleanup_incremental: 10,
    };
    encode_descriptors(&[
        StateDescriptor {
            name: "count".into(),
            kind: StateKind::Value,
            value_type: "u64".into(),
            key_type: None,
            ttl: None,
        },
        StateDescriptor {
            name: "seen".into(),
            kind: StateKind::Map,
            value_type: "option<tuple2<i64,string>>".into(),
            key_type: Some("tuple2<string,i64>".into()),
            ttl: Some(ttl),
        },
    ])
}

fn frames() -> Vec<u8> {
    let mut out = Vec::new();
    let frames = [
        Frame::Hello { attempt: 1, process: 0, secret: b"secret".to_vec() },
        Frame::Element { attempt: 1, channel: ChannelId(3), element: Element::Watermark(EventTime(-5)) },
        Frame::Element { attempt: 1, channel: ChannelId(3), element: Element::Batch(batch()) },
        Frame::Element {
            attempt: 1,
            channel: ChannelId(3),
            element: Element::Barrier(Barrier { checkpoint: CheckpointId(2), kind: BarrierKind::Unaligned }),
        },
        Frame::Credit { attempt: 1, channel: ChannelId(3), credits: 8 },
        Frame::Heartbeat { attempt: 1, sequence: 9 },
        Frame::Element { attempt: 1, channel: ChannelId(3), element: Element::End },
    ];
    frames.iter().for_each(|frame| frame.encode(&mut out).unwrap());
    out
}

fn controls() -> Vec<u8> {
    let mut out = Vec::new();
    let assignment = Assignment {
        attempt: 2,
        job: JobSpec { name: "w2".into(), records: 1_000, parallelism: 2, batch_size: 100 },
        process: 1,
        addresses: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
        node_processes: vec![0, 1],
        checkpointing: true,
        alignment_timeout_ms: Some(20),
        restore: Some(CheckpointId(4)),
    };
    let controls = [
        Control::Register { secret: b"secret".to_vec(), address: "127.0.0.1:7001".into(), nodes: 1 },
        Control::Assign(assignment),
        Control::Trigger { checkpoint: CheckpointId(5), kind: BarrierKind::Aligned },
        Control::Ack { checkpoint: CheckpointId(5), snapshot: manifest().encode() },
        Control::Answer { id: 3, rows: Err("no such key".into()) },
        Control::Stop,
    ];
    controls.iter().for_each(|control| control.encode(&mut out).unwrap());
    out
}

/// Every seed: target, name (after `seed-`), bytes.
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let manifest = manifest().encode();
    let in_flight = inflight::encode(&[
        (0, Element::Batch(batch())),
        (1, Element::Watermark(EventTime(12))),
        (1, Element::Idle),
        (0, Element::Active),
    ])
    .unwrap();
    let snapshot = snapshot().into_bytes();
    vec![
        ("ipc_file_decode", "generator-batch", encode_ipc_file(&batch().schema(), &[batch()]).unwrap()),
        ("manifest_decode", "manifest", manifest.clone()),
        // The body alone: the target frames it as a manifest.
        ("manifest_decode", "manifest-body", unsealed(&manifest)[10..].to_vec()),
        ("manifest_decode", "in-flight-unsealed", unsealed(&in_flight)),
        ("manifest_decode", "pointer", sealed(&[&b"SBCP"[..], &7_u64.to_le_bytes()].concat())),
        ("snapshot_decode", "snapshot-unsealed", unsealed(&snapshot)),
        ("keyed_state_decode", "descriptors-unsealed", unsealed(&descriptors())),
        ("wire_decode", "frames", frames()),
        ("wire_decode", "controls", controls()),
    ]
}

/// Whether `bytes` decode as `target` reads them (as they are, sealed, or framed).
fn decodes(target: &str, bytes: &[u8]) -> bool {
    let plain_or_sealed = |decode: &dyn Fn(&[u8]) -> bool| decode(bytes) || decode(&sealed(bytes));
    match target {
        "ipc_file_decode" => decode_ipc_file(bytes.to_vec()).is_ok_and(|batches| !batches.is_empty()),
        "manifest_decode" => {
            let mut framed = b"SBCM".to_vec();
            framed.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
            framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            framed.extend_from_slice(bytes);
            Manifest::decode(&sealed(&framed)).is_ok()
                || plain_or_sealed(&|b| Manifest::decode(b).is_ok())
                || plain_or_sealed(&|b| inflight::decode(b).is_ok())
                || plain_or_sealed(&|b| decode_pointer(b).is_ok())
        }
        "snapshot_decode" => plain_or_sealed(&|b| KeyGroupsSnapshot::from_bytes(b.to_vec()).is_ok()),
        "keyed_state_decode" => plain_or_sealed(&|b| decode_descriptors(b).is_ok()),
        "wire_decode" => {
            let mut decoder = FrameDecoder::new();
            decoder.push(bytes);
            let mut controls = FrameDecoder::new();
            controls.push(bytes);
            matches!(decoder.next_frame(), Ok(Some(_))) || matches!(controls.next_control(), Ok(Some(_)))
        }
        other => unreachable!("no seeds for target {other}"),
    }
}

// Goal: the checked-in seed corpora of the byte-parsing fuzz targets are valid encodings of
// today's formats, so that the fuzzers start past magic bytes and checksums. Method: every
// seed this module makes exists under its target's corpus and every checked-in seed decodes
// as its target reads it; with SABOT_FUZZ_SEEDS_WRITE=1 the seeds are written first.
#[test]
fn fuzz_seeds_decode() {
    let write = std::env::var_os("SABOT_FUZZ_SEEDS_WRITE").is_some();
    let seeds = seeds();
    for (target, name, bytes) in &seeds {
        assert!(decodes(target, bytes), "seed {name} of {target} does not decode");
        let path = corpus_dir(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        assert!(
            path.exists(),
            "{} is missing: run SABOT_FUZZ_SEEDS_WRITE=1 cargo test -p sabot-kernel --lib fuzz_seeds",
            path.display()
        );
    }
    let targets: std::collections::BTreeSet<&str> = seeds.iter().map(|(target, _, _)| *target).collect();
    for target in targets {
        for entry in std::fs::read_dir(corpus_dir(target)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("seed-") {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    decodes(target, &bytes),
                    "{} no longer decodes: run SABOT_FUZZ_SEEDS_WRITE=1 cargo test -p sabot-kernel --lib fuzz_seeds",
                    path.display()
                );
            }
        }
    }
}
