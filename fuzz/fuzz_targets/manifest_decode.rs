//! Checkpoint metadata read back from disk: manifests and the latest-checkpoint pointer
//! (`checkpoint::manifest`), the in-flight elements of unaligned checkpoints
//! (`checkpoint::inflight`) and operators' `u64` metadata files (`dataflow::read_u64_file`).
//! Decoding never panics; a manifest that decodes encodes back to the same bytes; in-flight
//! elements encode back to the same bytes when they hold no batch (Arrow may lay a batch out
//! otherwise) and always decode back to the same elements; a pointer or `u64` file that decodes
//! holds the value its bytes say.
//!
//! Every format ends with the CRC-32 of the bytes before it, which random bytes almost never
//! match: each decoder also gets the input sealed (its CRC appended), and a manifest also the
//! input framed as a manifest body (magic, version, size, CRC), so that the fuzzer reaches the
//! parsers behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::checkpoint::inflight;
use sabot_kernel::checkpoint::manifest::{decode_pointer, Manifest, MANIFEST_VERSION};
use sabot_kernel::dataflow::read_u64_file;
use sabot_kernel::element::{CheckpointId, Element};
use sabot_kernel::env::{MemStorage, Storage};

fn sealed(bytes: &[u8]) -> Vec<u8> {
    let mut sealed = bytes.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
    sealed
}

fn check_manifest(bytes: &[u8]) {
    if let Ok(manifest) = Manifest::decode(bytes) {
        assert_eq!(manifest.encode(), bytes, "manifest does not encode back to its bytes: {manifest:?}");
    }
}

fn check_pointer(bytes: &[u8]) {
    if let Ok(id) = decode_pointer(bytes) {
        assert_eq!(bytes.len(), 16, "a pointer is 16 bytes");
        assert_eq!(&bytes[..4], b"SBCP");
        assert_eq!(bytes[4..12], id.0.to_le_bytes(), "the pointer's id");
        assert_eq!(bytes[12..], crc32fast::hash(&bytes[..12]).to_le_bytes(), "the pointer's checksum");
    }
}

fn same_element(a: &Element, b: &Element) -> bool {
    match (a, b) {
        (Element::Batch(a), Element::Batch(b)) => a == b,
        (Element::Watermark(a), Element::Watermark(b)) => a == b,
        (Element::Barrier(a), Element::Barrier(b)) => a == b,
        (Element::Idle, Element::Idle) | (Element::Active, Element::Active) | (Element::End, Element::End) => true,
        _ => false,
    }
}

fn check_in_flight(bytes: &[u8]) {
    let Ok(elements) = inflight::decode(bytes) else { return };
    for (input, element) in &elements {
        assert!(*input <= usize::from(u16::MAX), "input {input}");
        assert!(!matches!(element, Element::Barrier(_) | Element::End), "{} in flight", element.kind_name());
    }
    // Arrow may refuse to write back what it read (the error is the caller's to report).
    let Ok(again) = inflight::encode(&elements) else { return };
    if !elements.iter().any(|(_, element)| matches!(element, Element::Batch(_))) {
        assert_eq!(again, bytes, "in-flight elements without batches encode back to their bytes");
    }
    let decoded = inflight::decode(&again).expect("encoded in-flight elements decode");
    assert_eq!(decoded.len(), elements.len(), "in-flight elements after a round trip");
    for ((input, element), (input_again, element_again)) in elements.iter().zip(&decoded) {
        assert_eq!(input, input_again);
        assert!(same_element(element, element_again), "{element:?} came back as {element_again:?}");
    }
}

fn check_u64_file(bytes: &[u8]) {
    let mut storage = MemStorage::new();
    storage.write("checkpoints/chk-1/source-1-0", bytes).expect("an in-memory write");
    if let Ok(value) = read_u64_file(&mut storage, "checkpoints/chk-1/source-1-0") {
        assert_eq!(bytes, sealed(&value.to_le_bytes()), "a u64 file is the value and its checksum");
    }
}

fuzz_target!(|data: &[u8]| {
    let sealed_data = sealed(data);
    for bytes in [data, &sealed_data] {
        check_manifest(bytes);
        check_pointer(bytes);
        check_in_flight(bytes);
        check_u64_file(bytes);
    }
    // The input as a manifest's body, framed as `Manifest::encode` frames it.
    let mut framed = b"SBCM".to_vec();
    framed.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
    framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    framed.extend_from_slice(data);
    check_manifest(&sealed(&framed));
    // The first eight bytes as a pointer's id: a sealed pointer decodes to it.
    if let Some(id) = data.get(..8) {
        let pointer = sealed(&[&b"SBCP"[..], id].concat());
        let id = CheckpointId(u64::from_le_bytes(id.try_into().expect("eight bytes")));
        assert_eq!(decode_pointer(&pointer), Ok(id), "a well-formed pointer");
    }
});
