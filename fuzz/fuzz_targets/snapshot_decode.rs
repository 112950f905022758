//! Keyed-state snapshots read from disk: decoding never panics, and what decodes re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::state::snapshot::SnapshotWriter;
use sabot_kernel::state::KeyGroupsSnapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = KeyGroupsSnapshot::from_bytes(data.to_vec()) else { return };
    let mut writer = SnapshotWriter::new();
    for (group, key, value) in snapshot.entries() {
        writer.add(group, key, value);
    }
    assert_eq!(writer.finish().as_bytes(), data, "decode then encode is the identity");
});
