//! The in-flight elements of an unaligned checkpoint: what the barrier overtook on each input,
//! stored with the snapshot and replayed, in order, before new input on recovery.
//!
//! # Format (integers little-endian)
//! ```text
//! magic "SBIF" | element count u32
//! per element: input u16 | kind u8 (0 batch, 1 watermark, 2 idle, 3 active)
//!              | batch: size u32, Arrow IPC file bytes | watermark: i64
//! crc32 (IEEE) of everything before it
//! ```
//! Decoding checks everything and never panics.

use crate::dataflow::sink::{decode_ipc_file, encode_ipc_file};
use crate::element::Element;
use crate::state::StateError;
use crate::time::EventTime;

const MAGIC: &[u8; 4] = b"SBIF";

/// Elements one task may record for one unaligned checkpoint.
pub const IN_FLIGHT_MAX: usize = 1 << 20;

fn corrupt(what: String) -> StateError {
    StateError::Corrupt { what: format!("in-flight data: {what}") }
}

/// Encodes recorded elements (batches, watermarks, idleness) with their input index.
pub fn encode(elements: &[(usize, Element)]) -> Result<Vec<u8>, arrow_schema::ArrowError> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&(elements.len() as u32).to_le_bytes());
    for (input, element) in elements {
        bytes.extend_from_slice(&(*input as u16).to_le_bytes());
        match element {
            Element::Batch(batch) => {
                let file = encode_ipc_file(&batch.schema(), std::slice::from_ref(batch))?;
                bytes.push(0);
                bytes.extend_from_slice(&(file.len() as u32).to_le_bytes());
                bytes.extend_from_slice(&file);
            }
            Element::Watermark(watermark) => {
                bytes.push(1);
                bytes.extend_from_slice(&watermark.0.to_le_bytes());
            }
            Element::Idle => bytes.push(2),
            Element::Active => bytes.push(3),
            Element::Barrier(_) | Element::End => unreachable!("{} is never recorded in flight", element.kind_name()),
        }
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

/// Decodes what [`encode`] wrote; bytes from disk, so every fault is an `Err`.
pub fn decode(bytes: &[u8]) -> Result<Vec<(usize, Element)>, StateError> {
    if bytes.len() < 12 || &bytes[..4] != MAGIC {
        return Err(corrupt(format!("{} bytes without the magic \"SBIF\"", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum does not match".into()));
    }
    let mut at = 4;
    let mut take = |count: usize| -> Result<&[u8], StateError> {
        let end = at + count;
        let slice = body.get(at..end).ok_or_else(|| corrupt(format!("truncated at byte {at}")))?;
        at = end;
        Ok(slice)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().expect("four bytes")) as usize;
    if count > IN_FLIGHT_MAX {
        return Err(corrupt(format!("{count} elements, more than {IN_FLIGHT_MAX}")));
    }
    let mut elements = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let input = usize::from(u16::from_le_bytes(take(2)?.try_into().expect("two bytes")));
        let element = match take(1)?[0] {
            0 => {
                let size = u32::from_le_bytes(take(4)?.try_into().expect("four bytes")) as usize;
                let mut batches = decode_ipc_file(take(size)?.to_vec()).map_err(|e| corrupt(e.to_string()))?;
                if batches.len() != 1 {
                    return Err(corrupt(format!("{} batches where one was written", batches.len())));
                }
                Element::Batch(batches.remove(0))
            }
            1 => Element::Watermark(EventTime(i64::from_le_bytes(take(8)?.try_into().expect("eight bytes")))),
            2 => Element::Idle,
            3 => Element::Active,
            kind => return Err(corrupt(format!("element kind {kind}"))),
        };
        elements.push((input, element));
    }
    if at != body.len() {
        return Err(corrupt(format!("{} bytes after the last element", body.len() - at)));
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::source::GeneratorSource;
    use crate::dataflow::Source;
    use crate::time::Instant;

    // Goal: recorded elements read back as written; damage is an error, never a panic.
    #[test]
    fn round_trip_and_damage() {
        let batch = GeneratorSource::new("g", 10, 10, 0, 1).poll_batch(Instant(0), &[]).unwrap().into_batch().unwrap();
        let elements = vec![
            (1, Element::Batch(batch.clone())),
            (0, Element::Watermark(EventTime(-5))),
            (2, Element::Idle),
            (0, Element::Active),
        ];
        let bytes = encode(&elements).unwrap();
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.len(), 4);
        assert!(matches!(&decoded[0], (1, Element::Batch(b)) if *b == batch));
        assert!(matches!(decoded[1], (0, Element::Watermark(EventTime(-5)))));
        assert!(matches!(decoded[2], (2, Element::Idle)) && matches!(decoded[3], (0, Element::Active)));
        for length in 0..bytes.len() {
            assert!(decode(&bytes[..length]).is_err(), "length {length}");
        }
        for at in (0..bytes.len()).step_by(7) {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x20;
            assert!(decode(&flipped).is_err(), "byte {at}");
        }
    }
}
