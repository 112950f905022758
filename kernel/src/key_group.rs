//! Keys to key groups, and key groups to parallel subtasks: a fixed, portable, documented mapping.
//!
//! State, timers and exchanges are organized by key group, so that the same key lands in the same
//! group on every machine, in every run and in every build, and rescaling moves whole groups.
//!
//! # The hash (stable: changing it breaks every snapshot and every exchange)
//! - An integer key (`UInt64`, or `Int64` as its two's-complement `u64`) hashes as
//!   `fmix64(k)`, MurmurHash3's 64-bit finalizer.
//! - A byte key (`Utf8`, `Binary`) hashes as `fmix64(fnv1a64(bytes))`, where `fnv1a64` is 64-bit
//!   FNV-1a (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`).
//! - The key group is `hash % max_parallelism`.
//! - Subtask `i` of parallelism `p` owns the contiguous range of key groups
//!   `[ceil(i * max / p), ceil((i + 1) * max / p))`; key group `g` goes to subtask `g * p / max`
//!   (Flink's assignment, so that the two agree).

use std::fmt;

/// The default number of key groups, as in Flink.
pub const MAX_PARALLELISM_DEFAULT: u16 = 128;
/// The largest number of key groups a job may have (key groups are encoded as `u16`).
pub const MAX_PARALLELISM_MAX: u16 = 32_768;

/// A key group: the unit of state partitioning and rescaling.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KeyGroup(pub u16);

/// MurmurHash3's 64-bit finalizer: a bijection that mixes every input bit into every output bit.
#[inline]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// 64-bit FNV-1a over bytes.
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[inline]
pub fn hash_u64(key: u64) -> u64 {
    fmix64(key)
}

#[inline]
pub fn hash_bytes(key: &[u8]) -> u64 {
    fmix64(fnv1a64(key))
}

/// The number of key groups of a job, validated once so that every use of it is in range.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MaxParallelism(u16);

impl MaxParallelism {
    pub fn new(count: u16) -> Option<MaxParallelism> {
        (1..=MAX_PARALLELISM_MAX).contains(&count).then_some(MaxParallelism(count))
    }

    pub fn get(self) -> u16 {
        self.0
    }

    #[inline]
    pub fn key_group_of_hash(self, hash: u64) -> KeyGroup {
        KeyGroup((hash % u64::from(self.0)) as u16)
    }

    #[inline]
    pub fn key_group_of_u64(self, key: u64) -> KeyGroup {
        self.key_group_of_hash(hash_u64(key))
    }

    #[inline]
    pub fn key_group_of_bytes(self, key: &[u8]) -> KeyGroup {
        self.key_group_of_hash(hash_bytes(key))
    }

    /// The subtask (of `parallelism`) that owns `key_group`.
    #[inline]
    pub fn subtask_of(self, key_group: KeyGroup, parallelism: u16) -> u16 {
        assert!(key_group.0 < self.0, "key group {} of {}", key_group.0, self.0);
        assert!(parallelism >= 1 && parallelism <= self.0, "parallelism {parallelism} of {}", self.0);
        (u32::from(key_group.0) * u32::from(parallelism) / u32::from(self.0)) as u16
    }

    /// The key groups subtask `index` of `parallelism` owns.
    pub fn range_of(self, index: u16, parallelism: u16) -> KeyGroupRange {
        assert!(parallelism >= 1 && parallelism <= self.0, "parallelism {parallelism} of {}", self.0);
        assert!(index < parallelism, "subtask {index} of {parallelism}");
        let max = u32::from(self.0);
        let p = u32::from(parallelism);
        let i = u32::from(index);
        let start = (i * max).div_ceil(p);
        let end = ((i + 1) * max).div_ceil(p);
        KeyGroupRange::new(start as u16, end as u16)
    }
}

impl Default for MaxParallelism {
    fn default() -> MaxParallelism {
        MaxParallelism(MAX_PARALLELISM_DEFAULT)
    }
}

/// A half-open, contiguous range of key groups `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyGroupRange {
    start: u16,
    end: u16,
}

impl KeyGroupRange {
    pub fn new(start: u16, end: u16) -> KeyGroupRange {
        assert!(start <= end, "key group range [{start}, {end})");
        KeyGroupRange { start, end }
    }

    pub fn all(max: MaxParallelism) -> KeyGroupRange {
        KeyGroupRange::new(0, max.get())
    }

    pub fn start(self) -> u16 {
        self.start
    }

    pub fn end(self) -> u16 {
        self.end
    }

    pub fn count(self) -> usize {
        usize::from(self.end - self.start)
    }

    pub fn contains(self, key_group: KeyGroup) -> bool {
        (self.start..self.end).contains(&key_group.0)
    }

    pub fn iter(self) -> impl Iterator<Item = KeyGroup> {
        (self.start..self.end).map(KeyGroup)
    }
}

impl fmt::Debug for KeyGroupRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyGroupRange[{}, {})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the hash is the documented one, bit for bit, so it can never drift.
    // Method: fixed vectors computed independently (Python, from the definitions in the module doc).
    #[test]
    fn hash_matches_fixed_vectors() {
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(42), 0x8108_7960_8e42_59cc);
        assert_eq!(fmix64(u64::MAX), 0x64b5_720b_4b82_5f21);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash_bytes(b"sabot"), 0x7485_becf_15c7_8066);
        let max = MaxParallelism::default();
        let groups: Vec<u16> = [0_u64, 1, 2, 3, 99_999].iter().map(|&k| max.key_group_of_u64(k).0).collect();
        assert_eq!(groups, vec![0, 44, 103, 78, 115]);
        assert_eq!(max.key_group_of_bytes(b"sabot").0, 102);
    }

    // Goal: ranges partition all key groups, and the assignment of a group agrees with its range.
    // Method: every parallelism from 1 to max, every group, checked both ways.
    #[test]
    fn ranges_partition_key_groups_and_agree_with_assignment() {
        for max_count in [1_u16, 7, 128, 1000] {
            let max = MaxParallelism::new(max_count).unwrap();
            for parallelism in 1..=max_count.min(130) {
                let mut next = 0;
                for index in 0..parallelism {
                    let range = max.range_of(index, parallelism);
                    assert_eq!(range.start(), next, "max {max_count} p {parallelism} i {index}");
                    assert!(range.count() >= 1, "max {max_count} p {parallelism} i {index} is empty");
                    next = range.end();
                    for group in range.iter() {
                        assert_eq!(max.subtask_of(group, parallelism), index);
                    }
                }
                assert_eq!(next, max_count);
            }
        }
    }
}
