//! Arrow IPC files from outside (committed sink files, in-flight data, batches from peers),
//! checked before Arrow's file reader reads them.
//!
//! Arrow's reader (arrow-ipc 60) takes the lengths and offsets of an IPC file on trust: a footer
//! block with a negative length, a message shorter than its prefix or a buffer beyond its
//! message's body panics it (`unwrap`s and slice bounds), and a block length of terabytes is
//! allocated before a byte of it is read. Sabot promises that decoding bytes from outside never
//! panics (STYLE.md, "Errors"), so [`check_file`] checks exactly what the reader then relies on:
//! the footer lies inside the file; every block (record batch or dictionary) lies inside the file,
//! with a message prefix; every buffer a block's message names lies inside its body. Found by the
//! `ipc_file_decode` fuzz target. Everything else the reader checks itself.

use arrow_ipc::{Block, MessageHeader};
use arrow_schema::ArrowError;

/// `ARROW1` and the footer's length, at the end of a file.
const TRAILER_SIZE: usize = 10;
/// A message's prefix: the continuation marker and the metadata length (or, in the legacy
/// format, the length alone, followed by at least four bytes of flatbuffer).
const MESSAGE_PREFIX_SIZE: usize = 8;
const CONTINUATION_MARKER: [u8; 4] = [0xff; 4];

fn invalid(what: String) -> ArrowError {
    ArrowError::IpcError(format!("malformed Arrow IPC file: {what}"))
}

/// Checks the lengths and offsets of the IPC file `bytes` that Arrow's file reader trusts.
pub fn check_file(bytes: &[u8]) -> Result<(), ArrowError> {
    let trailer_start = bytes
        .len()
        .checked_sub(TRAILER_SIZE)
        .ok_or_else(|| invalid(format!("{} bytes, shorter than its trailer", bytes.len())))?;
    let trailer: [u8; TRAILER_SIZE] = bytes[trailer_start..].try_into().expect("the trailer's size");
    let footer_size = arrow_ipc::reader::read_footer_length(trailer)?;
    let footer_start = trailer_start
        .checked_sub(footer_size)
        .ok_or_else(|| invalid(format!("a footer of {footer_size} bytes in a file of {}", bytes.len())))?;
    let footer = arrow_ipc::root_as_footer(&bytes[footer_start..trailer_start])
        .map_err(|error| invalid(format!("footer: {error}")))?;
    let blocks = footer.recordBatches().into_iter().flatten().chain(footer.dictionaries().into_iter().flatten());
    for (index, block) in blocks.enumerate() {
        check_block(bytes, &block).map_err(|what| invalid(format!("block {index}: {what}")))?;
    }
    Ok(())
}

fn check_block(bytes: &[u8], block: &Block) -> Result<(), String> {
    let (offset, metadata, body) = (block.offset(), block.metaDataLength(), block.bodyLength());
    let start = usize::try_from(offset).map_err(|_| format!("offset {offset}"))?;
    let metadata_size = usize::try_from(metadata)
        .ok()
        .filter(|&size| size >= MESSAGE_PREFIX_SIZE)
        .ok_or_else(|| format!("metadata of {metadata} bytes"))?;
    let body_size = usize::try_from(body).map_err(|_| format!("body of {body} bytes"))?;
    let end = start
        .checked_add(metadata_size)
        .and_then(|end| end.checked_add(body_size))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| format!("{metadata} + {body} bytes at {offset}, beyond the file's {} bytes", bytes.len()))?;
    // As the reader parses it: the message's flatbuffer after its prefix, to the block's end.
    let message = &bytes[start..end];
    let prefix = if message[..4] == CONTINUATION_MARKER { MESSAGE_PREFIX_SIZE } else { 4 };
    let message = arrow_ipc::root_as_message(&message[prefix..]).map_err(|error| format!("message: {error}"))?;
    let batch = match message.header_type() {
        MessageHeader::RecordBatch => message.header_as_record_batch(),
        MessageHeader::DictionaryBatch => message.header_as_dictionary_batch().and_then(|dictionary| dictionary.data()),
        // The reader refuses every other message itself.
        _ => None,
    };
    for buffer in batch.and_then(|batch| batch.buffers()).into_iter().flatten() {
        let (offset, length) = (buffer.offset(), buffer.length());
        let inside = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(length).ok())
            .and_then(|(offset, length)| offset.checked_add(length))
            .is_some_and(|end| end <= body_size);
        if !inside {
            return Err(format!("a buffer of {length} bytes at {offset}, beyond the body's {body} bytes"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::sink::{decode_ipc_file, encode_ipc_file};
    use crate::dataflow::source::GeneratorSource;
    use crate::dataflow::Source;
    use crate::time::Instant;

    // Goal: a well-formed file passes, with and without batches, and is read back.
    #[test]
    fn well_formed_files_pass() {
        let batch = GeneratorSource::new("g", 10, 10, 0, 1).poll_batch(Instant(0), &[]).unwrap().into_batch().unwrap();
        for batches in [vec![], vec![batch.clone()], vec![batch.clone(), batch.clone()]] {
            let file = encode_ipc_file(&batch.schema(), &batches).unwrap();
            check_file(&file).unwrap();
            assert_eq!(decode_ipc_file(file).unwrap(), batches);
        }
    }

    // Goal (regression, found by the `ipc_file_decode` fuzz target): files whose lengths and
    // offsets Arrow's reader took on trust are errors, not panics. Method: the fuzzer's
    // minimized inputs, one per panic: a buffer beyond its message's body (`slice_with_length`),
    // a footer block with a negative length (an `unwrap` in `read_block`), and a message shorter
    // than its prefix (`parse_message`).
    #[test]
    fn malformed_files_are_errors() {
        let files: [(&str, &[u8]); 3] = [
            ("buffer beyond the body", include_bytes!("testdata/ipc-buffer-beyond-body.arrow")),
            ("negative block length", include_bytes!("testdata/ipc-negative-block-length.arrow")),
            ("message shorter than its prefix", include_bytes!("testdata/ipc-short-message.arrow")),
        ];
        for (what, file) in files {
            let error = check_file(file).expect_err(what);
            assert!(error.to_string().contains("malformed Arrow IPC file"), "{what}: {error}");
            assert!(decode_ipc_file(file.to_vec()).is_err(), "{what}");
        }
    }
}
