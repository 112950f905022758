//! Bytes from a peer: data frames and control messages decode or error, never panic, and a
//! claimed length above the limit is refused before its body arrives. The input is cut into
//! two pushes at a point taken from its first byte, as a connection may deliver it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::wire::{Control, Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut frames = FrameDecoder::new();
    frames.push(&data[..cut]);
    frames.push(&data[cut..]);
    while let Ok(Some(_)) = frames.next_frame() {}
    let mut controls = FrameDecoder::new();
    controls.push(data);
    while let Ok(Some(_)) = controls.next_control() {}
    let _ = Frame::decode(data);
    let _ = Control::decode(data);
});
