//! Bytes from a peer: data frames and control messages decode or error, never panic, and a
//! claimed length above the limit is refused before its body arrives. The input is cut into
//! two pushes at a point taken from its first byte, as a connection may deliver it. What
//! decodes encodes back: to the same bytes, except a batch (Arrow may lay it out otherwise),
//! which decodes back to the same batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::element::Element;
use sabot_kernel::wire::{Control, Frame, FrameDecoder, FRAME_SIZE_MAX};

fn same_element(a: &Element, b: &Element) -> bool {
    match (a, b) {
        (Element::Batch(a), Element::Batch(b)) => a == b,
        (Element::Watermark(a), Element::Watermark(b)) => a == b,
        (Element::Barrier(a), Element::Barrier(b)) => a == b,
        (Element::Idle, Element::Idle) | (Element::Active, Element::Active) | (Element::End, Element::End) => true,
        _ => false,
    }
}

fn same_frame(a: &Frame, b: &Frame) -> bool {
    match (a, b) {
        (Frame::Element { attempt, channel, element }, Frame::Element { attempt: a2, channel: c2, element: e2 }) => {
            attempt == a2 && channel == c2 && same_element(element, e2)
        }
        // Every other frame is compared by its bytes.
        _ => format!("{a:?}") == format!("{b:?}"),
    }
}

/// A frame decoded from `body` encodes back to `length | body`, or, holding a batch, to bytes
/// that decode to the same frame.
fn check_frame(body: &[u8], frame: &Frame) {
    let mut again = Vec::new();
    let is_batch = matches!(frame, Frame::Element { element: Element::Batch(_), .. });
    if is_batch {
        // Arrow may refuse to write back what it read (the error is the caller's to report).
        if frame.encode(&mut again).is_err() {
            assert!(again.is_empty(), "a frame that failed to encode left {} bytes", again.len());
            return;
        }
        let decoded = Frame::decode(&again[4..]).expect("an encoded frame decodes");
        assert!(same_frame(frame, &decoded), "{frame:?} came back as {decoded:?}");
    } else {
        frame.encode(&mut again).expect("a decoded frame encodes");
        assert_eq!(again[4..], *body, "{frame:?} does not encode back to its bytes");
        assert_eq!(again[..4], (body.len() as u32).to_le_bytes());
    }
}

fn check_control(body: &[u8], control: &Control) {
    let mut again = Vec::new();
    control.encode(&mut again).expect("a decoded control message encodes");
    assert_eq!(again[4..], *body, "{control:?} does not encode back to its bytes");
    assert_eq!(Control::decode(&again[4..]).as_ref(), Ok(control));
}

/// Runs a decoder over the stream: every frame it returns is checked against its bytes.
fn check_stream(data: &[u8], cut: usize, controls: bool) {
    let mut decoder = FrameDecoder::new();
    decoder.push(&data[..cut]);
    let mut at = 0;
    let mut pushed_all = false;
    loop {
        let unread = decoder.buffered();
        let result = if controls {
            decoder.next_control().map(|c| c.map(|c| (None, Some(c))))
        } else {
            decoder.next_frame().map(|f| f.map(|f| (Some(f), None)))
        };
        match result {
            Ok(Some((frame, control))) => {
                let size = u32::from_le_bytes(data[at..at + 4].try_into().expect("a length")) as usize;
                let body = &data[at + 4..at + 4 + size];
                assert!(size <= FRAME_SIZE_MAX);
                assert_eq!(decoder.buffered(), unread - 4 - size, "a frame consumes its bytes");
                frame.iter().for_each(|frame| check_frame(body, frame));
                control.iter().for_each(|control| check_control(body, control));
                at += 4 + size;
            }
            Ok(None) if !pushed_all => {
                decoder.push(&data[cut..]);
                pushed_all = true;
            }
            Ok(None) => {
                assert_eq!(decoder.buffered(), data.len() - at, "unread bytes wait for more");
                break;
            }
            Err(_) => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    check_stream(data, cut, false);
    check_stream(data, data.len(), true);
    if let Ok(frame) = Frame::decode(data) {
        check_frame(data, &frame);
    }
    if let Ok(control) = Control::decode(data) {
        check_control(data, &control);
    }
});
