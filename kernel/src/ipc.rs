//! Arrow IPC files from outside (committed sink files, in-flight data, batches from peers),
//! checked before Arrow's file reader reads them.
//!
//! Arrow's reader (arrow-ipc 60) takes much of an IPC file on trust: a footer block with a
//! negative length, a message shorter than its prefix, a buffer beyond its message's body or an
//! offsets buffer whose size is not a multiple of an offset's panics it (`unwrap`s, slice bounds,
//! `Buffer::typed_data`), and a block length of terabytes is allocated before a byte of it is
//! read. Sabot promises that decoding bytes from outside never panics (STYLE.md, "Errors"), so
//! [`check_file`] checks what the reader then relies on, for the column types it knows the
//! reader's buffer layout of:
//! - the footer lies inside the file, and every record batch block too, with a message prefix;
//! - every buffer a message names lies inside its body; every field node has a length and a null
//!   count with `0 <= null count <= length`; every fixed-width buffer (values, offsets) holds a
//!   whole number of elements.
//!
//! Columns of other types (dictionaries, views, unions, run-end encoding, list views) are refused:
//! Sabot writes none, and their layouts have more traps of the same kind. Found by the
//! `ipc_file_decode` fuzz target; everything else the reader checks itself.

use arrow_ipc::{Block, FieldNode, MessageHeader};
use arrow_schema::{ArrowError, DataType, Field};

/// `ARROW1` and the footer's length, at the end of a file.
const TRAILER_SIZE: usize = 10;
/// A message's prefix: the continuation marker and the metadata length (or, in the legacy
/// format, the length alone, followed by at least four bytes of flatbuffer).
const MESSAGE_PREFIX_SIZE: usize = 8;
const CONTINUATION_MARKER: [u8; 4] = [0xff; 4];

fn invalid(what: String) -> ArrowError {
    ArrowError::IpcError(format!("malformed Arrow IPC file: {what}"))
}

/// Checks the parts of the IPC file `bytes` that Arrow's file reader trusts.
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
    let schema = footer.schema().ok_or_else(|| invalid("no schema".into()))?;
    let schema = arrow_ipc::convert::try_fb_to_schema(schema)?;
    for field in schema.fields() {
        check_type(field).map_err(|what| invalid(format!("column {:?}: {what}", field.name())))?;
    }
    if footer.dictionaries().is_some_and(|blocks| !blocks.is_empty()) {
        return Err(invalid("dictionary batches (dictionary columns are refused)".into()));
    }
    for (index, block) in footer.recordBatches().into_iter().flatten().enumerate() {
        check_block(bytes, block, schema.fields()).map_err(|what| invalid(format!("batch {index}: {what}")))?;
    }
    Ok(())
}

/// Refuses the column types whose buffer layout [`check_nodes`] does not know.
fn check_type(field: &Field) -> Result<(), String> {
    match field.data_type() {
        // Arrow's layouts take a fixed size for a size: a negative one panics them.
        DataType::FixedSizeList(_, size) | DataType::FixedSizeBinary(size) if *size < 0 => {
            Err(format!("a fixed size of {size}"))
        }
        DataType::List(child) | DataType::LargeList(child) | DataType::FixedSizeList(child, _) => check_type(child),
        DataType::Map(child, _) => check_type(child),
        DataType::Struct(children) => children.iter().try_for_each(|child| check_type(child)),
        DataType::Null
        | DataType::Boolean
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::FixedSizeBinary(_) => Ok(()),
        other if other.primitive_width().is_some() => Ok(()),
        other => Err(format!("type {other} is not read from outside")),
    }
}

fn check_block(bytes: &[u8], block: &Block, fields: &arrow_schema::Fields) -> Result<(), String> {
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
    // The reader refuses every other message itself.
    let Some(batch) = message.header_as_record_batch().filter(|_| message.header_type() == MessageHeader::RecordBatch)
    else {
        return Ok(());
    };
    if batch.length() < 0 {
        return Err(format!("{} rows", batch.length()));
    }
    let mut sizes = Vec::new();
    for buffer in batch.buffers().into_iter().flatten() {
        let (offset, length) = (buffer.offset(), buffer.length());
        let size = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(length).ok())
            .filter(|(offset, length)| offset.checked_add(*length).is_some_and(|end| end <= body_size))
            .map(|(_, length)| length)
            .ok_or_else(|| format!("a buffer of {length} bytes at {offset}, beyond the body's {body} bytes"))?;
        sizes.push(size);
    }
    let nodes: Vec<FieldNode> = batch.nodes().into_iter().flatten().copied().collect();
    let mut walk = Walk { nodes: nodes.iter(), sizes: sizes.iter() };
    for field in fields {
        if !walk.field(field)? {
            break;
        }
    }
    Ok(())
}

/// The field nodes and buffer sizes of a message, taken field by field in the order the
/// reader takes them (`RecordBatchDecoder::create_array`).
struct Walk<'a> {
    nodes: std::slice::Iter<'a, FieldNode>,
    sizes: std::slice::Iter<'a, usize>,
}

impl Walk<'_> {
    /// Checks `field`'s node and buffers; `false` when the message has no more of them (the
    /// reader reports that itself).
    fn field(&mut self, field: &Field) -> Result<bool, String> {
        let Some(node) = self.nodes.next() else { return Ok(false) };
        let (length, null_count) = (node.length(), node.null_count());
        if length < 0 || null_count < 0 || null_count > length {
            return Err(format!("column {:?}: {null_count} nulls of {length}", field.name()));
        }
        // Validity first, then the type's own buffers, each with its element size (0: any).
        let (sizes, children): (&[usize], Vec<&Field>) = match field.data_type() {
            DataType::Null => (&[], vec![]),
            DataType::Utf8 | DataType::Binary => (&[0, 4, 0], vec![]),
            DataType::LargeUtf8 | DataType::LargeBinary => (&[0, 8, 0], vec![]),
            DataType::List(child) | DataType::Map(child, _) => (&[0, 4], vec![child.as_ref()]),
            DataType::LargeList(child) => (&[0, 8], vec![child.as_ref()]),
            DataType::FixedSizeList(child, _) => (&[0], vec![child.as_ref()]),
            DataType::Struct(children) => (&[0], children.iter().map(|child| child.as_ref()).collect()),
            DataType::Boolean | DataType::FixedSizeBinary(_) => (&[0, 0], vec![]),
            other => match other.primitive_width() {
                Some(1) => (&[0, 1], vec![]),
                Some(2) => (&[0, 2], vec![]),
                Some(4) => (&[0, 4], vec![]),
                Some(8) => (&[0, 8], vec![]),
                Some(16) => (&[0, 16], vec![]),
                Some(32) => (&[0, 32], vec![]),
                _ => unreachable!("type {other} was refused before"),
            },
        };
        for &element_size in sizes {
            let Some(&size) = self.sizes.next() else { return Ok(false) };
            if element_size > 0 && size % element_size != 0 {
                return Err(format!(
                    "column {:?}: a buffer of {size} bytes of {element_size}-byte elements",
                    field.name()
                ));
            }
        }
        for child in children {
            if !self.field(child)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::sink::{decode_ipc_file, encode_ipc_file};
    use crate::dataflow::source::GeneratorSource;
    use crate::dataflow::Source;
    use crate::time::Instant;

    // Goal: well-formed files pass and read back: no batch, several, columns of every type the
    // check knows (nested, sliced, with nulls); a dictionary column is refused.
    #[test]
    fn well_formed_files_pass() {
        use arrow_array::builder::{ListBuilder, StringBuilder};
        use arrow_array::{
            ArrayRef, BooleanArray, Decimal128Array, DictionaryArray, FixedSizeBinaryArray, Float32Array, Int8Array,
            LargeStringArray, NullArray, RecordBatch, StructArray,
        };
        use std::sync::Arc;
        let batch = GeneratorSource::new("g", 10, 10, 0, 1).poll_batch(Instant(0), &[]).unwrap().into_batch().unwrap();
        for batches in [vec![], vec![batch.clone()], vec![batch.clone(), batch.clone().slice(3, 5)]] {
            let file = encode_ipc_file(&batch.schema(), &batches).unwrap();
            check_file(&file).unwrap();
            assert_eq!(decode_ipc_file(file).unwrap(), batches);
        }
        let mut lists = ListBuilder::new(StringBuilder::new());
        lists.values().append_value("a");
        lists.append(true);
        lists.append(false);
        lists.values().append_value("");
        lists.values().append_null();
        lists.append(true);
        let int8 = Arc::new(Int8Array::from(vec![Some(1), None, Some(-3)])) as ArrayRef;
        let structs = StructArray::from(vec![
            (
                Arc::new(arrow_schema::Field::new("b", arrow_schema::DataType::Boolean, true)),
                Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)])) as ArrayRef,
            ),
            (Arc::new(arrow_schema::Field::new("i", arrow_schema::DataType::Int8, true)), int8),
        ]);
        let decimals = Decimal128Array::from(vec![Some(5), None, Some(-7)]).with_precision_and_scale(10, 2).unwrap();
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("list", Arc::new(lists.finish())),
            ("struct", Arc::new(structs)),
            ("large", Arc::new(LargeStringArray::from(vec![Some("x"), None, Some("yz")]))),
            ("fixed", Arc::new(FixedSizeBinaryArray::try_from_iter([[1_u8, 2], [3, 4], [5, 6]].into_iter()).unwrap())),
            ("float", Arc::new(Float32Array::from(vec![1.5, f32::NAN, -0.0]))),
            ("decimal", Arc::new(decimals)),
            ("null", Arc::new(NullArray::new(3))),
        ];
        let rich = RecordBatch::try_from_iter(columns).unwrap();
        for rich in [rich.clone(), rich.slice(1, 2)] {
            let file = encode_ipc_file(&rich.schema(), std::slice::from_ref(&rich)).unwrap();
            check_file(&file).unwrap();
            assert_eq!(decode_ipc_file(file).unwrap(), vec![rich.clone()]);
        }
        let keys: DictionaryArray<arrow_array::types::Int32Type> = vec!["a", "b", "a"].into_iter().collect();
        let dictionary = RecordBatch::try_from_iter([("dictionary", Arc::new(keys) as ArrayRef)]).unwrap();
        let file = encode_ipc_file(&dictionary.schema(), &[dictionary]).unwrap();
        let error = check_file(&file).unwrap_err().to_string();
        assert!(error.contains("is not read from outside"), "{error}");
    }

    // Goal (regression, found by the `ipc_file_decode` fuzz target): files whose lengths and
    // offsets Arrow's reader took on trust are errors, not panics. Method: the fuzzer's
    // minimized inputs, one per panic: a buffer beyond its message's body (`slice_with_length`),
    // a footer block with a negative length (an `unwrap` in `read_block`), a message shorter
    // than its prefix (`parse_message`), an offsets buffer whose size is not a whole number of
    // offsets (`Buffer::typed_data` in Arrow's validation), and a column of a negative fixed size
    // (an `unwrap` in Arrow's layout of the type).
    #[test]
    fn malformed_files_are_errors() {
        let files: [(&str, &[u8]); 5] = [
            ("buffer beyond the body", include_bytes!("testdata/ipc-buffer-beyond-body.arrow")),
            ("negative block length", include_bytes!("testdata/ipc-negative-block-length.arrow")),
            ("message shorter than its prefix", include_bytes!("testdata/ipc-short-message.arrow")),
            ("offsets of partial elements", include_bytes!("testdata/ipc-offsets-of-partial-elements.arrow")),
            ("a negative fixed size", include_bytes!("testdata/ipc-negative-fixed-size.arrow")),
        ];
        for (what, file) in files {
            let error = check_file(file).expect_err(what);
            assert!(error.to_string().contains("malformed Arrow IPC file"), "{what}: {error}");
            assert!(decode_ipc_file(file.to_vec()).is_err(), "{what}");
        }
    }
}
