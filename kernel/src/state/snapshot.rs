//! The portable snapshot of keyed state: the same bytes from every backend, readable by every backend.
//!
//! Because the format is the same for the heap and the RocksDB backend, a snapshot taken by one
//! restores into the other, and a restore can take any sub-range of key groups (rescaling).
//!
//! # Format, version 1 (all integers little-endian)
//! ```text
//! magic "SBKG" | version u16 = 1 | group count u32
//! per group, key groups strictly ascending, none empty:
//!     key group u16 | entry count u32
//!     per entry, keys strictly ascending (byte order): key size u32 | value size u32 | key | value
//! crc32 (IEEE) of every byte before it, u32
//! ```
//! Decoding checks all of it and returns [`StateError::Corrupt`] naming what is wrong; it never panics.

use super::{StateError, STATE_KEY_SIZE_MAX, STATE_VALUE_SIZE_MAX};
use crate::key_group::{KeyGroup, KeyGroupRange};

const MAGIC: &[u8; 4] = b"SBKG";
const VERSION: u16 = 1;
const HEADER_SIZE: usize = 4 + 2 + 4;
const CRC_SIZE: usize = 4;

/// A validated snapshot of the entries of some key groups.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyGroupsSnapshot {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for KeyGroupsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyGroupsSnapshot({} bytes)", self.bytes.len())
    }
}

impl KeyGroupsSnapshot {
    /// Validates bytes read from outside (a file, the network).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<KeyGroupsSnapshot, StateError> {
        validate(&bytes)?;
        Ok(KeyGroupsSnapshot { bytes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Every entry, by key group then key, ascending.
    pub fn entries(&self) -> impl Iterator<Item = (KeyGroup, &[u8], &[u8])> + '_ {
        let mut reader = Reader { bytes: &self.bytes[..self.bytes.len() - CRC_SIZE], at: HEADER_SIZE };
        let mut groups_left = read_u32_at(&self.bytes, 6);
        let mut current = (KeyGroup(0), 0_u32);
        std::iter::from_fn(move || loop {
            if current.1 > 0 {
                current.1 -= 1;
                let (key, value) = reader.entry().expect("validated snapshot");
                return Some((current.0, key, value));
            }
            if groups_left == 0 {
                return None;
            }
            groups_left -= 1;
            current = reader.group_header().expect("validated snapshot");
        })
    }

    /// The entries of the key groups in `range` only.
    pub fn entries_in(&self, range: KeyGroupRange) -> impl Iterator<Item = (KeyGroup, &[u8], &[u8])> + '_ {
        self.entries().filter(move |(group, _, _)| range.contains(*group))
    }
}

/// Builds a snapshot; callers add groups ascending and keys ascending within a group.
#[derive(Debug)]
pub struct SnapshotWriter {
    bytes: Vec<u8>,
    group_count: u32,
    /// The open group: its id, where its entry count sits, how many entries it has, the last key.
    group: Option<(KeyGroup, usize, u32)>,
    key_last: Vec<u8>,
}

impl Default for SnapshotWriter {
    fn default() -> Self {
        SnapshotWriter::new()
    }
}

impl SnapshotWriter {
    pub fn new() -> SnapshotWriter {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&0_u32.to_le_bytes());
        SnapshotWriter { bytes, group_count: 0, group: None, key_last: Vec::new() }
    }

    /// Adds an entry; key groups must come ascending, and keys ascending within one group.
    pub fn add(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) {
        assert!(key.len() <= STATE_KEY_SIZE_MAX, "state key of {} bytes in snapshot", key.len());
        assert!(value.len() <= STATE_VALUE_SIZE_MAX, "state value of {} bytes in snapshot", value.len());
        match self.group {
            Some((open, _, _)) if open == key_group => {
                assert!(self.key_last.as_slice() < key, "snapshot keys out of order in key group {}", key_group.0);
            }
            Some((open, _, _)) => {
                assert!(open < key_group, "snapshot key group {} after {}", key_group.0, open.0);
                self.close_group();
                self.open_group(key_group);
            }
            None => self.open_group(key_group),
        }
        self.bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        self.key_last.clear();
        self.key_last.extend_from_slice(key);
        if let Some((_, _, count)) = &mut self.group {
            *count += 1;
        }
    }

    fn open_group(&mut self, key_group: KeyGroup) {
        self.bytes.extend_from_slice(&key_group.0.to_le_bytes());
        let count_at = self.bytes.len();
        self.bytes.extend_from_slice(&0_u32.to_le_bytes());
        self.group = Some((key_group, count_at, 0));
        self.group_count += 1;
    }

    fn close_group(&mut self) {
        if let Some((_, count_at, count)) = self.group.take() {
            self.bytes[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        }
    }

    pub fn finish(mut self) -> KeyGroupsSnapshot {
        self.close_group();
        self.bytes[6..10].copy_from_slice(&self.group_count.to_le_bytes());
        let crc = crc32fast::hash(&self.bytes);
        self.bytes.extend_from_slice(&crc.to_le_bytes());
        debug_assert!(validate(&self.bytes).is_ok());
        KeyGroupsSnapshot { bytes: self.bytes }
    }
}

fn read_u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], StateError> {
        let end =
            self.at.checked_add(count).filter(|&end| end <= self.bytes.len()).ok_or_else(|| StateError::Corrupt {
                what: format!("snapshot truncated in {what} at byte {}", self.at),
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u16(&mut self, what: &str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self, what: &str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }

    fn group_header(&mut self) -> Result<(KeyGroup, u32), StateError> {
        let group = KeyGroup(self.u16("key group")?);
        let count = self.u32("entry count")?;
        Ok((group, count))
    }

    fn entry(&mut self) -> Result<(&'a [u8], &'a [u8]), StateError> {
        let key_size = self.u32("key size")? as usize;
        let value_size = self.u32("value size")? as usize;
        if key_size > STATE_KEY_SIZE_MAX || value_size > STATE_VALUE_SIZE_MAX {
            return Err(StateError::Corrupt {
                what: format!("snapshot entry of key size {key_size} and value size {value_size} is over the limits"),
            });
        }
        Ok((self.take(key_size, "key")?, self.take(value_size, "value")?))
    }
}

fn validate(bytes: &[u8]) -> Result<(), StateError> {
    let corrupt = |what: String| Err(StateError::Corrupt { what });
    if bytes.len() < HEADER_SIZE + CRC_SIZE {
        return corrupt(format!("snapshot of {} bytes is shorter than its header", bytes.len()));
    }
    if &bytes[..4] != MAGIC {
        return corrupt("snapshot does not start with the magic bytes \"SBKG\"".to_string());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return corrupt(format!("snapshot format version {version}, this build reads version {VERSION}"));
    }
    let body = &bytes[..bytes.len() - CRC_SIZE];
    let crc_stored = read_u32_at(bytes, bytes.len() - CRC_SIZE);
    let crc = crc32fast::hash(body);
    if crc != crc_stored {
        return corrupt(format!("snapshot checksum {crc_stored:#010x} does not match its contents ({crc:#010x})"));
    }
    let mut reader = Reader { bytes: body, at: HEADER_SIZE };
    let mut group_previous: Option<KeyGroup> = None;
    for _ in 0..read_u32_at(bytes, 6) {
        let (group, count) = reader.group_header()?;
        if group_previous.is_some_and(|previous| previous >= group) {
            return corrupt(format!("snapshot key group {} is not ascending", group.0));
        }
        group_previous = Some(group);
        if count == 0 {
            return corrupt(format!("snapshot key group {} has no entries (writers omit empty groups)", group.0));
        }
        let mut key_previous: Option<&[u8]> = None;
        for _ in 0..count {
            let (key, _) = reader.entry()?;
            if key_previous.is_some_and(|previous| previous >= key) {
                return corrupt(format!("snapshot keys of key group {} are not ascending", group.0));
            }
            key_previous = Some(key);
        }
    }
    if reader.at != body.len() {
        return corrupt(format!("snapshot has {} bytes after its last group", body.len() - reader.at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KeyGroupsSnapshot {
        let mut writer = SnapshotWriter::new();
        writer.add(KeyGroup(1), b"a", b"1");
        writer.add(KeyGroup(1), b"b", b"");
        writer.add(KeyGroup(7), b"", b"22");
        writer.add(KeyGroup(9), b"z", b"333");
        writer.finish()
    }

    // Goal: what is written reads back, all of it or by range.
    #[test]
    fn round_trip_and_range() {
        let snapshot = KeyGroupsSnapshot::from_bytes(sample().into_bytes()).unwrap();
        let all: Vec<(u16, Vec<u8>, Vec<u8>)> =
            snapshot.entries().map(|(g, k, v)| (g.0, k.to_vec(), v.to_vec())).collect();
        assert_eq!(
            all,
            vec![
                (1, b"a".to_vec(), b"1".to_vec()),
                (1, b"b".to_vec(), vec![]),
                (7, vec![], b"22".to_vec()),
                (9, b"z".to_vec(), b"333".to_vec())
            ]
        );
        let groups: Vec<u16> = snapshot.entries_in(KeyGroupRange::new(2, 9)).map(|(g, _, _)| g.0).collect();
        assert_eq!(groups, vec![7]);
        let empty = SnapshotWriter::new().finish();
        assert_eq!(KeyGroupsSnapshot::from_bytes(empty.into_bytes()).unwrap().entries().count(), 0);
    }

    // Goal: every single-bit flip and every truncation is reported as corruption, never a panic.
    // Method: exhaustive over the bits and lengths of a small snapshot.
    #[test]
    fn corruption_is_detected() {
        let bytes = sample().into_bytes();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(KeyGroupsSnapshot::from_bytes(flipped), Err(StateError::Corrupt { .. })), "bit {bit}");
        }
        for length in 0..bytes.len() {
            assert!(KeyGroupsSnapshot::from_bytes(bytes[..length].to_vec()).is_err(), "length {length}");
        }
    }

    // Goal: structure errors are caught even when the checksum is right (a writer bug, or a forged file).
    #[test]
    fn unordered_keys_with_good_checksum_are_corrupt() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&1_u32.to_le_bytes());
        bytes.extend_from_slice(&3_u16.to_le_bytes());
        bytes.extend_from_slice(&2_u32.to_le_bytes());
        for key in [b"b", b"a"] {
            bytes.extend_from_slice(&1_u32.to_le_bytes());
            bytes.extend_from_slice(&0_u32.to_le_bytes());
            bytes.extend_from_slice(key);
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let error = KeyGroupsSnapshot::from_bytes(bytes).unwrap_err();
        assert!(error.to_string().contains("not ascending"), "{error}");
    }
}
