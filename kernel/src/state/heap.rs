//! The heap state backend: one hash table per key group, values as bytes, scans sorted on demand.

use std::hash::Hasher;

use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use smallvec::SmallVec;

use super::snapshot::{KeyGroupsSnapshot, SnapshotWriter};
use super::{check_entry_size, Merge, StateBackend, StateError, Visit};
use crate::key_group::{KeyGroup, KeyGroupRange};

/// Keys up to this size live inline in the table, without a heap allocation of their own.
type KeyBytes = SmallVec<[u8; 24]>;
/// Values up to this size live inline in the table.
type ValueBytes = SmallVec<[u8; 16]>;

struct Entry {
    /// The hash of `key`, kept so that growing the table never rehashes keys.
    hash: u64,
    key: KeyBytes,
    value: ValueBytes,
}

/// Fixed, seedless multiplicative hashing (the "Fx" hash of rustc): fast and the same in every run.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    /// Whole words, then the tail zero-padded into one more word (callers hash the length too).
    fn write(&mut self, mut bytes: &[u8]) {
        while bytes.len() >= 8 {
            self.add(u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes")));
            bytes = &bytes[8..];
        }
        if !bytes.is_empty() {
            // Assembled byte by byte: a variable-length copy would be a `memcpy` call per hash.
            let tail = bytes.iter().enumerate().fold(0_u64, |word, (i, &byte)| word | u64::from(byte) << (8 * i));
            self.add(tail);
        }
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    /// The multiply leaves the high bits well mixed; the table indexes with the low ones.
    #[inline]
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}

#[inline]
fn hash_key(key: &[u8]) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write_usize(key.len());
    hasher.write(key);
    hasher.finish()
}

#[inline]
fn word(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// Byte equality by words: short state keys compare in a few loads instead of a `memcmp` call.
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let length = a.len();
    if length != b.len() {
        return false;
    }
    if length < 8 {
        return a == b;
    }
    let mut at = 0;
    while at + 8 <= length {
        if word(a, at) != word(b, at) {
            return false;
        }
        at += 8;
    }
    word(a, length - 8) == word(b, length - 8)
}

/// Keyed state in memory, for one range of key groups: one hash table per key group.
///
/// Tables keep the per-record cost of `get`/`put`/`merge` to one probe; their order never reaches
/// output, because `scan` and `snapshot` sort a group's entries by key before visiting them.
pub struct HeapBackend {
    range: KeyGroupRange,
    groups: Vec<HashTable<Entry>>,
    size_bytes: u64,
    /// Reused by `merge` for the value being computed.
    merged: Vec<u8>,
}

impl HeapBackend {
    pub fn new(range: KeyGroupRange) -> HeapBackend {
        HeapBackend {
            range,
            groups: (0..range.count()).map(|_| HashTable::new()).collect(),
            size_bytes: 0,
            merged: Vec::new(),
        }
    }

    #[inline]
    fn group_mut(&mut self, key_group: KeyGroup) -> &mut HashTable<Entry> {
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        &mut self.groups[usize::from(key_group.0 - self.range.start())]
    }

    /// A group's entries in key order. The sort key is the first 16 bytes as a big-endian number,
    /// which orders as the bytes do and settles almost every comparison without a `memcmp`.
    fn sorted_entries(table: &HashTable<Entry>) -> Vec<(u128, &Entry)> {
        let prefix = |key: &[u8]| {
            let mut bytes = [0_u8; 16];
            let length = key.len().min(16);
            bytes[..length].copy_from_slice(&key[..length]);
            u128::from_be_bytes(bytes)
        };
        let mut entries: Vec<(u128, &Entry)> = table.iter().map(|entry| (prefix(&entry.key), entry)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.key.cmp(&b.1.key)));
        entries
    }

    fn clear(&mut self) {
        self.groups.iter_mut().for_each(HashTable::clear);
        self.size_bytes = 0;
    }

    #[inline]
    fn account(&mut self, size_delta: i64) {
        self.size_bytes = self.size_bytes.checked_add_signed(size_delta).expect("state size accounting");
    }
}

impl StateBackend for HeapBackend {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    #[inline]
    fn get(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        let hash = hash_key(key);
        match self.group_mut(key_group).find(hash, |entry| bytes_eq(&entry.key, key)) {
            Some(entry) => {
                value.extend_from_slice(&entry.value);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    #[inline]
    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.merge(key_group, key, &mut |_, merged| {
            merged.extend_from_slice(value);
            Ok(())
        })
    }

    #[inline]
    fn merge(&mut self, key_group: KeyGroup, key: &[u8], merge: &mut Merge<'_>) -> Result<(), StateError> {
        let hash = hash_key(key);
        let mut merged = std::mem::take(&mut self.merged);
        merged.clear();
        let table = self.group_mut(key_group);
        let size_delta = match table.entry(hash, |entry| bytes_eq(&entry.key, key), |entry| entry.hash) {
            TableEntry::Occupied(mut occupied) => {
                let stored = &mut occupied.get_mut().value;
                merge(Some(stored), &mut merged)?;
                check_entry_size(key, &merged)?;
                let old = stored.len() as i64;
                stored.clear();
                stored.extend_from_slice(&merged);
                merged.len() as i64 - old
            }
            TableEntry::Vacant(vacant) => {
                merge(None, &mut merged)?;
                check_entry_size(key, &merged)?;
                vacant.insert(Entry { hash, key: KeyBytes::from_slice(key), value: ValueBytes::from_slice(&merged) });
                (key.len() + merged.len()) as i64
            }
        };
        self.merged = merged;
        self.account(size_delta);
        Ok(())
    }

    #[inline]
    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        let hash = hash_key(key);
        if let Ok(occupied) = self.group_mut(key_group).find_entry(hash, |entry| bytes_eq(&entry.key, key)) {
            let (removed, _) = occupied.remove();
            self.account(-((removed.key.len() + removed.value.len()) as i64));
        }
        Ok(())
    }

    fn scan(&mut self, key_group: KeyGroup, visit: &mut Visit<'_>) -> Result<(), StateError> {
        let table = self.group_mut(key_group);
        if table.is_empty() {
            return Ok(());
        }
        for (_, entry) in Self::sorted_entries(table) {
            visit(&entry.key, &entry.value)?;
        }
        Ok(())
    }

    #[inline]
    fn take(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        let hash = hash_key(key);
        let Ok(occupied) = self.group_mut(key_group).find_entry(hash, |entry| bytes_eq(&entry.key, key)) else {
            return Ok(false);
        };
        let (removed, _) = occupied.remove();
        value.extend_from_slice(&removed.value);
        self.account(-((removed.key.len() + removed.value.len()) as i64));
        Ok(true)
    }

    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError> {
        let mut writer = SnapshotWriter::new();
        for (offset, table) in self.groups.iter().enumerate() {
            let key_group = KeyGroup(self.range.start() + offset as u16);
            for (_, entry) in Self::sorted_entries(table) {
                writer.add(key_group, &entry.key, &entry.value);
            }
        }
        Ok(writer.finish())
    }

    fn restore(&mut self, snapshot: &KeyGroupsSnapshot) -> Result<(), StateError> {
        self.clear();
        for (key_group, key, value) in snapshot.entries_in(self.range) {
            self.put(key_group, key, value)?;
        }
        Ok(())
    }

    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::testing::{check_backend_against_model, Lcg};

    // Goal: the heap backend behaves as an ordered map per key group, snapshot and restore included.
    // Method: random operations checked against a BTreeMap model (seeded; the seed is printed).
    #[test]
    fn heap_backend_matches_btreemap_model() {
        for seed in 0..20_u64 {
            println!("seed {seed} (replay: this test with this seed)");
            let range = KeyGroupRange::new(3, 11);
            check_backend_against_model(&mut HeapBackend::new(range), &mut Lcg::new(seed), 2_000, || {
                Box::new(HeapBackend::new(range))
            });
        }
    }

    // Goal: size accounting follows puts, overwrites and deletes exactly.
    #[test]
    fn size_accounting() {
        let mut backend = HeapBackend::new(KeyGroupRange::new(0, 2));
        backend.put(KeyGroup(0), b"ab", b"123").unwrap();
        backend.put(KeyGroup(1), b"ab", b"1").unwrap();
        assert_eq!(backend.size_bytes(), 8);
        backend.put(KeyGroup(0), b"ab", b"1234567").unwrap();
        assert_eq!(backend.size_bytes(), 12);
        backend.delete(KeyGroup(0), b"ab").unwrap();
        backend.delete(KeyGroup(0), b"absent").unwrap();
        assert_eq!(backend.size_bytes(), 3);
    }
}
