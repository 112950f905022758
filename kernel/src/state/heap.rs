//! The heap state backend: one hash map per key group, values as bytes, scans sorted on demand.
//!
//! Hash maps keep the per-record cost of `get`/`put` low; their order never reaches output,
//! because `scan` and `snapshot` sort a group's entries by key before visiting them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use smallvec::SmallVec;

use super::snapshot::{KeyGroupsSnapshot, SnapshotWriter};
use super::{check_entry_size, StateBackend, StateError, WriteBatch, WriteOp};
use crate::key_group::{KeyGroup, KeyGroupRange};

/// Keys up to this size live inline in the map, without a heap allocation of their own.
type KeyBytes = SmallVec<[u8; 24]>;
/// Values up to this size live inline in the map.
type ValueBytes = SmallVec<[u8; 16]>;
type GroupMap = HashMap<KeyBytes, ValueBytes, BuildHasherDefault<FxHasher>>;

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
    fn write(&mut self, mut bytes: &[u8]) {
        while bytes.len() >= 8 {
            self.add(u64::from_le_bytes(
                bytes[..8].try_into().expect("eight bytes"),
            ));
            bytes = &bytes[8..];
        }
        if bytes.len() >= 4 {
            self.add(u64::from(u32::from_le_bytes(
                bytes[..4].try_into().expect("four bytes"),
            )));
            bytes = &bytes[4..];
        }
        for &byte in bytes {
            self.add(u64::from(byte));
        }
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

/// Keyed state in memory, for one range of key groups.
pub struct HeapBackend {
    range: KeyGroupRange,
    groups: Vec<GroupMap>,
    size_bytes: u64,
}

impl HeapBackend {
    pub fn new(range: KeyGroupRange) -> HeapBackend {
        HeapBackend {
            range,
            groups: (0..range.count()).map(|_| GroupMap::default()).collect(),
            size_bytes: 0,
        }
    }

    /// The number of entries held.
    pub fn entry_count(&self) -> usize {
        self.groups.iter().map(HashMap::len).sum()
    }

    #[inline]
    fn group_mut(&mut self, key_group: KeyGroup) -> &mut GroupMap {
        assert!(
            self.range.contains(key_group),
            "key group {} outside {:?}",
            key_group.0,
            self.range
        );
        &mut self.groups[usize::from(key_group.0 - self.range.start())]
    }

    fn sorted_entries(map: &GroupMap) -> Vec<(&KeyBytes, &ValueBytes)> {
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        entries
    }

    fn clear(&mut self) {
        self.groups.iter_mut().for_each(HashMap::clear);
        self.size_bytes = 0;
    }
}

impl StateBackend for HeapBackend {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    #[inline]
    fn get(
        &mut self,
        key_group: KeyGroup,
        key: &[u8],
        value: &mut Vec<u8>,
    ) -> Result<bool, StateError> {
        value.clear();
        match self.group_mut(key_group).get(key) {
            Some(stored) => {
                value.extend_from_slice(stored);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    #[inline]
    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        check_entry_size(key, value)?;
        let map = self.group_mut(key_group);
        let size_delta = match map.get_mut(key) {
            Some(stored) => {
                let old = stored.len() as i64;
                stored.clear();
                stored.extend_from_slice(value);
                value.len() as i64 - old
            }
            None => {
                map.insert(KeyBytes::from_slice(key), ValueBytes::from_slice(value));
                (key.len() + value.len()) as i64
            }
        };
        self.size_bytes = self
            .size_bytes
            .checked_add_signed(size_delta)
            .expect("state size accounting");
        Ok(())
    }

    #[inline]
    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        if let Some(old) = self.group_mut(key_group).remove(key) {
            let size = (key.len() + old.len()) as u64;
            self.size_bytes = self
                .size_bytes
                .checked_sub(size)
                .expect("state size accounting");
        }
        Ok(())
    }

    fn write_batch(&mut self, batch: &WriteBatch) -> Result<(), StateError> {
        for op in batch.iter() {
            match op {
                WriteOp::Put {
                    key_group,
                    key,
                    value,
                } => self.put(key_group, key, value)?,
                WriteOp::Delete { key_group, key } => self.delete(key_group, key)?,
            }
        }
        Ok(())
    }

    fn scan(
        &mut self,
        key_group: KeyGroup,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let map = self.group_mut(key_group);
        if map.is_empty() {
            return Ok(());
        }
        for (key, value) in Self::sorted_entries(map) {
            visit(key, value)?;
        }
        Ok(())
    }

    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError> {
        let mut writer = SnapshotWriter::new();
        for (offset, map) in self.groups.iter().enumerate() {
            let key_group = KeyGroup(self.range.start() + offset as u16);
            for (key, value) in Self::sorted_entries(map) {
                writer.add(key_group, key, value);
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
            check_backend_against_model(
                &mut HeapBackend::new(range),
                &mut Lcg::new(seed),
                2_000,
                || Box::new(HeapBackend::new(range)),
            );
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
