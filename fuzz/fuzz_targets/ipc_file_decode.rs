//! Committed sink files read back: an Arrow IPC file from disk decodes or errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::dataflow::sink::decode_ipc_file;

fuzz_target!(|data: &[u8]| {
    let _ = decode_ipc_file(data.to_vec());
});
