//! A faulty in-memory disk for the simulator (feature `testing`): [`FaultDisk`], shared by every
//! node of a simulated cluster through [`FaultStorage`] handles.
//!
//! # Fault model
//!
//! The disk keeps three views, as `MemStorage` does: what readers see now (the page cache), the
//! contents synced under each name, and what survives a power loss (synced contents under names
//! whose directory was synced). Faults, each drawn from the disk's own seeded PRNG while
//! [`FaultConfig`] enables it, and never after [`FaultDisk::heal`]:
//!
//! - **Power loss** ([`FaultDisk::crash`]): writes not yet synced are lost; a file whose name was
//!   durable but whose new contents were not synced may instead be *torn*: each 512-byte sector
//!   holds the old or the new bytes, and its length is the old or the new one. Synced data under
//!   synced names always survives.
//! - **Read errors**: a read or a listing fails with `StorageError::Io` (transient: the next try
//!   may succeed).
//! - **Read corruption**: a read of a file under `checkpoints/` returns the bytes with one bit
//!   flipped (transient: the disk's contents are intact).
//! - **Write errors**: a write, rename or delete fails with `StorageError::Io` and changes nothing.
//! - **Misdirected writes**: a write under `checkpoints/` is acknowledged, but its bytes went to
//!   unallocated space: the file holds zeros of the intended length. (Misdirection into *another*
//!   file would leave that file with a valid checksum of the wrong contents, which the kernel's
//!   checksums, not bound to paths, cannot see; the simulator does not inject it.)
//! - **Fsync errors**: `sync_file` or `sync_dir` fails with `StorageError::Io` and makes nothing
//!   durable.
//! - **Full disk**: while [`FaultDisk::set_full`] holds, every write fails with `StorageError::Full`.
//! - **Durable corruption** ([`FaultDisk::corrupt_durable`]): one bit of a file's durable and
//!   current contents flipped for good. The harness aims it only at checkpoint metadata (the
//!   pointer, the newest completed checkpoint), never at every copy: an older checkpoint stays
//!   intact, so the design promises recovery, or a clear refusal when output committed after the
//!   damaged checkpoint would otherwise repeat.
//!
//! Sink output (`output/`) is never corrupted or misdirected: it is the user's system, and its
//! format carries no checksum the kernel could check. Every fault injected is recorded
//! ([`FaultDisk::injected`]) for the run's summary and trace.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::mem_storage::{list_of, make_dir_durable, rename_entry, Data};
use super::{validate_path, Storage, StorageError};
use crate::state::testing::Lcg;

/// The size of the unit a torn write is made of.
pub const SECTOR_SIZE: usize = 512;

/// Where corruption and misdirection may strike: files the kernel checks by checksum.
const CHECKSUMMED_PREFIX: &str = "checkpoints/";

/// How often each fault strikes, in parts per million of the operations it applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultConfig {
    pub read_error_ppm: u32,
    pub read_corrupt_ppm: u32,
    pub write_error_ppm: u32,
    pub misdirect_ppm: u32,
    pub sync_error_ppm: u32,
    /// Of the files that lose unsynced contents in a power loss, how many are torn instead.
    pub torn_ppm: u32,
}

/// One fault the disk injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    ReadError {
        path: String,
    },
    ReadCorrupt {
        path: String,
        bit: u64,
    },
    WriteError {
        path: String,
    },
    Misdirected {
        path: String,
    },
    SyncError {
        path: String,
    },
    Full {
        path: String,
    },
    /// A power loss: how many files lost unsynced contents, and how many of them were torn.
    PowerLoss {
        lost: u64,
        torn: u64,
    },
    DurableCorruption {
        path: String,
        bit: u64,
    },
}

impl Fault {
    /// A short name for counting faults by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::ReadError { .. } => "read error",
            Fault::ReadCorrupt { .. } => "read corruption",
            Fault::WriteError { .. } => "write error",
            Fault::Misdirected { .. } => "misdirected write",
            Fault::SyncError { .. } => "fsync error",
            Fault::Full { .. } => "disk full",
            Fault::PowerLoss { .. } => "power loss",
            Fault::DurableCorruption { .. } => "durable corruption",
        }
    }
}

/// The disk: three views of its files, the faults it may inject, and what it injected.
#[derive(Clone, Debug)]
pub struct FaultDisk {
    current: BTreeMap<String, Data>,
    durable: BTreeMap<String, Data>,
    synced_data: BTreeMap<String, Data>,
    config: FaultConfig,
    full: bool,
    healed: bool,
    rng: Lcg,
    injected: Vec<Fault>,
    /// Faults not yet taken by [`FaultDisk::take_new_faults`] (the harness traces them).
    new_faults: usize,
}

impl FaultDisk {
    /// An empty disk that injects nothing until [`FaultDisk::set_faults`].
    pub fn new(seed: u64) -> FaultDisk {
        FaultDisk {
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            synced_data: BTreeMap::new(),
            config: FaultConfig::default(),
            full: false,
            healed: false,
            rng: Lcg::new(seed ^ 0xd15c_d15c),
            injected: Vec::new(),
            new_faults: 0,
        }
    }

    pub fn set_faults(&mut self, config: FaultConfig) {
        if !self.healed {
            self.config = config;
        }
    }

    pub fn set_full(&mut self, full: bool) {
        self.full = full && !self.healed;
    }

    /// No fault from now on: the disk only loses what a power loss loses.
    pub fn heal(&mut self) {
        self.healed = true;
        self.config = FaultConfig::default();
        self.full = false;
    }

    pub fn injected(&self) -> &[Fault] {
        &self.injected
    }

    /// The faults injected since the last call.
    pub fn take_new_faults(&mut self) -> &[Fault] {
        let new = &self.injected[self.new_faults..];
        self.new_faults = self.injected.len();
        new
    }

    fn inject(&mut self, fault: Fault) {
        self.injected.push(fault);
    }

    fn strikes(&mut self, ppm: u32) -> bool {
        ppm > 0 && !self.healed && self.rng.below(1_000_000) < u64::from(ppm)
    }

    /// A power loss: everything not durable is lost, or torn at sector granularity.
    pub fn crash(&mut self) {
        let (mut lost, mut torn) = (0, 0);
        let changed: Vec<(String, Data)> = self
            .durable
            .iter()
            .filter_map(|(path, old)| {
                let new = self.current.get(path)?;
                (new != old).then(|| (path.clone(), new.clone()))
            })
            .collect();
        for (path, new) in changed {
            lost += 1;
            if self.strikes(self.config.torn_ppm) {
                torn += 1;
                let old = self.durable[&path].clone();
                let bytes = self.tear(&old, &new);
                self.durable.insert(path, Arc::from(bytes));
            }
        }
        lost += self.current.keys().filter(|path| !self.durable.contains_key(*path)).count() as u64;
        self.current = self.durable.clone();
        self.synced_data = self.durable.clone();
        self.inject(Fault::PowerLoss { lost, torn });
    }

    /// Old and new bytes mixed sector by sector, with the old or the new length.
    fn tear(&mut self, old: &[u8], new: &[u8]) -> Vec<u8> {
        let length = if self.rng.below(2) == 0 { old.len() } else { new.len() };
        let mut bytes = vec![0_u8; length];
        for (index, sector) in bytes.chunks_mut(SECTOR_SIZE).enumerate() {
            let source = if self.rng.below(2) == 0 { old } else { new };
            let start = index * SECTOR_SIZE;
            for (offset, byte) in sector.iter_mut().enumerate() {
                *byte = source.get(start + offset).copied().unwrap_or(0);
            }
        }
        bytes
    }

    /// Flips one bit of `path` for good (durable and current contents); `false` if the file
    /// is not durable or is empty.
    pub fn corrupt_durable(&mut self, path: &str) -> bool {
        let Some(data) = self.durable.get(path).filter(|data| !data.is_empty()).cloned() else {
            return false;
        };
        let bit = self.rng.below(data.len() as u64 * 8);
        let mut bytes = data.to_vec();
        bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
        let bytes: Data = Arc::from(bytes);
        self.durable.insert(path.to_string(), bytes.clone());
        if self.current.get(path) == Some(&data) {
            self.current.insert(path.to_string(), bytes.clone());
            self.synced_data.insert(path.to_string(), bytes);
        }
        self.inject(Fault::DurableCorruption { path: path.to_string(), bit });
        true
    }

    /// What a reader sees now, without faults (for the oracle).
    pub fn peek(&self, path: &str) -> Option<&[u8]> {
        self.current.get(path).map(|data| &data[..])
    }

    /// What survives a power loss, without faults (for the oracle).
    pub fn peek_durable(&self, path: &str) -> Option<&[u8]> {
        self.durable.get(path).map(|data| &data[..])
    }

    /// The names of the files in `dir` now, without faults.
    pub fn peek_list(&self, dir: &str) -> Vec<String> {
        list_of(&self.current, dir)
    }

    /// The names of the durable files in `dir`, without faults.
    pub fn peek_list_durable(&self, dir: &str) -> Vec<String> {
        list_of(&self.durable, dir)
    }

    /// A fault-free disk holding what survives a power loss now: where a run would restart from.
    pub fn durable_copy(&self, seed: u64) -> FaultDisk {
        let mut disk = FaultDisk::new(seed);
        disk.current = self.durable.clone();
        disk.durable = self.durable.clone();
        disk.synced_data = self.durable.clone();
        disk
    }

    /// Every path durable now, for the summary's checks.
    pub fn durable_paths(&self) -> impl Iterator<Item = &String> {
        self.durable.keys()
    }

    fn not_found(path: &str) -> StorageError {
        StorageError::NotFound { path: path.to_string() }
    }

    fn io(path: &str, message: &str) -> StorageError {
        StorageError::Io { path: path.to_string(), message: format!("injected: {message}") }
    }
}

impl Storage for FaultDisk {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        validate_path(path)?;
        if self.full {
            self.inject(Fault::Full { path: path.to_string() });
            return Err(StorageError::Full { path: path.to_string() });
        }
        if self.strikes(self.config.write_error_ppm) {
            self.inject(Fault::WriteError { path: path.to_string() });
            return Err(Self::io(path, "write failed"));
        }
        let data: Data = if path.starts_with(CHECKSUMMED_PREFIX) && self.strikes(self.config.misdirect_ppm) {
            self.inject(Fault::Misdirected { path: path.to_string() });
            Arc::from(vec![0_u8; data.len()])
        } else {
            Arc::from(data)
        };
        self.current.insert(path.to_string(), data);
        self.synced_data.remove(path);
        Ok(())
    }

    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        let data = self.current.get(path).ok_or_else(|| Self::not_found(path))?.clone();
        if self.strikes(self.config.sync_error_ppm) {
            self.inject(Fault::SyncError { path: path.to_string() });
            return Err(Self::io(path, "fsync failed"));
        }
        self.synced_data.insert(path.to_string(), data.clone());
        if self.durable.contains_key(path) {
            self.durable.insert(path.to_string(), data);
        }
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        validate_path(from)?;
        validate_path(to)?;
        if !self.current.contains_key(from) {
            return Err(Self::not_found(from));
        }
        if self.strikes(self.config.write_error_ppm) {
            self.inject(Fault::WriteError { path: from.to_string() });
            return Err(Self::io(from, "rename failed"));
        }
        rename_entry(&mut self.current, &mut self.synced_data, from, to);
        Ok(())
    }

    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        if !dir.is_empty() {
            validate_path(dir)?;
        }
        if self.strikes(self.config.sync_error_ppm) {
            self.inject(Fault::SyncError { path: dir.to_string() });
            return Err(Self::io(dir, "directory fsync failed"));
        }
        make_dir_durable(&self.current, &self.synced_data, &mut self.durable, dir);
        Ok(())
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        validate_path(path)?;
        let mut bytes = self.current.get(path).map(|data| data.to_vec()).ok_or_else(|| Self::not_found(path))?;
        if self.strikes(self.config.read_error_ppm) {
            self.inject(Fault::ReadError { path: path.to_string() });
            return Err(Self::io(path, "read failed"));
        }
        if !bytes.is_empty() && path.starts_with(CHECKSUMMED_PREFIX) && self.strikes(self.config.read_corrupt_ppm) {
            let bit = self.rng.below(bytes.len() as u64 * 8);
            bytes[(bit / 8) as usize] ^= 1 << (bit % 8);
            self.inject(Fault::ReadCorrupt { path: path.to_string(), bit });
        }
        Ok(bytes)
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        if !dir.is_empty() {
            validate_path(dir)?;
        }
        if self.strikes(self.config.read_error_ppm) {
            self.inject(Fault::ReadError { path: dir.to_string() });
            return Err(Self::io(dir, "listing failed"));
        }
        Ok(list_of(&self.current, dir))
    }

    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        validate_path(path)?;
        if !self.current.contains_key(path) {
            return Err(Self::not_found(path));
        }
        if self.strikes(self.config.write_error_ppm) {
            self.inject(Fault::WriteError { path: path.to_string() });
            return Err(Self::io(path, "delete failed"));
        }
        self.current.remove(path);
        self.synced_data.remove(path);
        Ok(())
    }
}

/// A handle on a [`FaultDisk`] shared by every node of a simulated cluster.
#[derive(Clone)]
pub struct FaultStorage(pub Arc<Mutex<FaultDisk>>);

impl FaultStorage {
    pub fn new(disk: FaultDisk) -> FaultStorage {
        FaultStorage(Arc::new(Mutex::new(disk)))
    }

    pub fn disk(&self) -> std::sync::MutexGuard<'_, FaultDisk> {
        self.0.lock().expect("fault disk lock")
    }
}

impl Storage for FaultStorage {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        self.disk().write(path, data)
    }
    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        self.disk().sync_file(path)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        self.disk().rename(from, to)
    }
    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        self.disk().sync_dir(dir)
    }
    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        self.disk().read(path)
    }
    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        self.disk().list(dir)
    }
    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        self.disk().delete(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::write_atomic;

    // Goal: without faults the disk keeps exactly what POSIX makes durable, as MemStorage does.
    // Method: the same script as MemStorage's test.
    #[test]
    fn crash_keeps_only_durable_files() {
        let mut disk = FaultDisk::new(1);
        write_atomic(&mut disk, "d/whole", b"whole").unwrap();
        disk.write("d/unsynced", b"lost").unwrap();
        disk.write("d/synced-not-named", b"x").unwrap();
        disk.sync_file("d/synced-not-named").unwrap();
        disk.write("d/named-not-synced", b"y").unwrap();
        disk.sync_dir("d").unwrap();
        disk.write("d/unsynced", b"lost again").unwrap();
        disk.crash();
        assert_eq!(disk.peek_list("d"), vec!["named-not-synced", "synced-not-named", "unsynced", "whole"]);
        assert_eq!(disk.read("d/whole").unwrap(), b"whole");
        assert_eq!(disk.read("d/synced-not-named").unwrap(), b"x");
        assert_eq!(disk.read("d/named-not-synced").unwrap(), b"");
        assert_eq!(disk.read("d/unsynced").unwrap(), b"");
    }

    // Goal: a torn write mixes whole sectors of the old and the new contents, and never touches
    // synced data. Method: many power losses during rewrites of a durable file; every sector of
    // the result equals the old or the new sector; a synced file beside it is always intact.
    #[test]
    fn torn_writes_mix_whole_sectors() {
        let old: Vec<u8> = (0..4 * SECTOR_SIZE).map(|i| (i % 7) as u8 + 1).collect();
        let new: Vec<u8> = (0..3 * SECTOR_SIZE + 100).map(|i| (i % 5) as u8 + 100).collect();
        let mut torn_count = 0;
        for seed in 0..50 {
            let mut disk = FaultDisk::new(seed);
            disk.set_faults(FaultConfig { torn_ppm: 1_000_000, ..FaultConfig::default() });
            write_atomic(&mut disk, "d/f", &old).unwrap();
            write_atomic(&mut disk, "d/synced", b"kept").unwrap();
            disk.write("d/f", &new).unwrap();
            disk.crash();
            let after = disk.read("d/f").unwrap();
            assert!(after.len() == old.len() || after.len() == new.len(), "seed {seed}: length {}", after.len());
            for (index, sector) in after.chunks(SECTOR_SIZE).enumerate() {
                let range = index * SECTOR_SIZE..index * SECTOR_SIZE + sector.len();
                let from =
                    |source: &[u8]| range.clone().map(|i| source.get(i).copied().unwrap_or(0)).collect::<Vec<_>>();
                assert!(sector == from(&old) || sector == from(&new), "seed {seed}: sector {index} is neither");
            }
            torn_count += u32::from(after != old && after != new);
            assert_eq!(disk.read("d/synced").unwrap(), b"kept", "seed {seed}");
        }
        assert!(torn_count > 30, "most crashes tore the file: {torn_count} of 50");
    }

    // Goal: every fault the configuration enables strikes, is recorded, and stops after heal.
    // Method: all faults at a high rate over many operations, then heal and repeat.
    #[test]
    fn faults_strike_are_recorded_and_heal() {
        let mut disk = FaultDisk::new(7);
        let rate = 200_000;
        disk.set_faults(FaultConfig {
            read_error_ppm: rate,
            read_corrupt_ppm: rate,
            write_error_ppm: rate,
            misdirect_ppm: rate,
            sync_error_ppm: rate,
            torn_ppm: rate,
        });
        let operations = |disk: &mut FaultDisk| {
            for i in 0..200 {
                let path = format!("checkpoints/chk-1/f{i}");
                let _ = disk.write(&path, b"0123456789");
                let _ = disk.sync_file(&path);
                let _ = disk.read(&path);
            }
        };
        operations(&mut disk);
        let kinds: std::collections::BTreeSet<&str> = disk.injected().iter().map(Fault::kind).collect();
        for kind in ["read error", "read corruption", "write error", "misdirected write", "fsync error"] {
            assert!(kinds.contains(kind), "{kind} never struck: {kinds:?}");
        }
        disk.heal();
        let before = disk.injected().len();
        operations(&mut disk);
        assert_eq!(disk.injected().len(), before, "no fault after heal");
        assert!(disk.corrupt_durable("checkpoints/chk-1/f1") || disk.peek_durable("checkpoints/chk-1/f1").is_none());
    }
}
