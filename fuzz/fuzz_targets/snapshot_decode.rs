//! Keyed-state snapshots read from disk: decoding never panics, and what decodes lists its
//! entries in order (key groups ascending, keys ascending within one) and re-encodes to the same
//! bytes. The format ends with the CRC-32 of the bytes before it, which random bytes almost never
//! match, so the input is also tried sealed (its CRC appended), to reach the parser behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sabot_kernel::state::snapshot::SnapshotWriter;
use sabot_kernel::state::KeyGroupsSnapshot;

fn check(bytes: Vec<u8>) {
    let Ok(snapshot) = KeyGroupsSnapshot::from_bytes(bytes.clone()) else { return };
    let entries: Vec<_> = snapshot.entries().collect();
    for pair in entries.windows(2) {
        let ((group_a, key_a, _), (group_b, key_b, _)) = (pair[0], pair[1]);
        assert!(
            (group_a, key_a) < (group_b, key_b),
            "entries out of order: {group_a:?} {key_a:?}, {group_b:?} {key_b:?}"
        );
    }
    let mut writer = SnapshotWriter::new();
    for &(group, key, value) in &entries {
        writer.add(group, key, value);
    }
    assert_eq!(writer.finish().as_bytes(), bytes, "decode then encode is the identity");
}

fuzz_target!(|data: &[u8]| {
    check(data.to_vec());
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    check(sealed);
});
