//! Native RocksDB checkpoints: RocksDB's own files, SST files shared between checkpoints.
//!
//! A capture freezes the backend's write-back cache (a move, whatever the state's size); from then
//! on the backend writes nothing to RocksDB until the asynchronous part has asked RocksDB for a
//! checkpoint (memtables flushed, live files hard-linked into a local directory). That
//! checkpoint plus the frozen cache's changes (the *delta*) is exactly the state at the barrier.
//! The frozen cache stays an overlay that reads look into, and reaches RocksDB only with the
//! backend's next write-out: state that lives briefly still never costs a RocksDB write.
//! The asynchronous part then uploads the SST files that storage does not hold yet into the
//! state's shared directory, and writes one metadata file (`<path>.state-rocksdb`) that holds
//! RocksDB's small files (`CURRENT`, `MANIFEST-*`, `OPTIONS-*`) inline, names each SST file's
//! shared copy with its size and CRC-32, and holds the delta. A RocksDB checkpoint holds every
//! column family (its `MANIFEST` and `OPTIONS` files name them, so a restore opens all of them).
//! The delta's keys are the write-back cache's, `key group | state key`, whose state key starts
//! with its state's id when the backend declares states. SST files are immutable and their
//! numbers never repeat within one database, so one local file always has one shared copy:
//! `<shared dir>/<instance>-<number>.sst`, where the instance is unique to each opening of a
//! database (restored files keep the names they had).
//!
//! # Metadata format, version 1 (integers little-endian)
//! ```text
//! magic "SBRK" | version u16 = 1 | key groups: start u16, end u16 | file count u32
//! per file: name (u16 length, UTF-8) | kind u8
//!     kind 0 (inline): length u32 | bytes
//!     kind 1 (shared SST): shared path (u16 length, UTF-8) | size u64 | crc32 u32
//! delta count u32
//! per entry, full keys strictly ascending: key (u32 length) | present u8 | [value (u32 length)]
//! crc32 (IEEE) of every byte before it, u32
//! ```
//! Decoding checks all of it and names what is wrong; it never panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::DB;
use sabot_sync::settle::Settle;

use sabot_kernel::env::Storage;
use sabot_kernel::key_group::KeyGroupRange;
use sabot_kernel::state::{write_durably, SnapshotWrite, StateError, STATE_KEY_SIZE_MAX, STATE_VALUE_SIZE_MAX};

/// The extension of a native checkpoint's metadata file.
pub const NATIVE_EXTENSION: &str = ".state-rocksdb";

const MAGIC: &[u8; 4] = b"SBRK";
const VERSION: u16 = 1;
/// Names and paths longer than this are refused (they come from RocksDB and from us).
const NAME_SIZE_MAX: usize = 4096;

/// Where an SST file of a checkpoint lives in storage, and how to know it is whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedSst {
    pub path: String,
    pub size: u64,
    pub crc: u32,
}

/// One file of a native checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NativeFile {
    Inline { name: String, bytes: Vec<u8> },
    Shared { name: String, sst: SharedSst },
}

/// The metadata of one subtask's native checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeCheckpoint {
    pub range: KeyGroupRange,
    pub files: Vec<NativeFile>,
    /// Entries the backend's write-back cache held and RocksDB did not, at the capture: applied
    /// over the database on restore (`None`: a delete). Full keys (`key group | state key`), ascending.
    pub delta: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn corrupt(what: impl Into<String>) -> StateError {
    StateError::Corrupt { what: format!("rocksdb checkpoint metadata: {}", what.into()) }
}

fn put_str(bytes: &mut Vec<u8>, s: &str) {
    assert!(s.len() <= NAME_SIZE_MAX, "name of {} bytes in a rocksdb checkpoint", s.len());
    bytes.extend_from_slice(&(s.len() as u16).to_le_bytes());
    bytes.extend_from_slice(s.as_bytes());
}

impl NativeCheckpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.range.start().to_le_bytes());
        bytes.extend_from_slice(&self.range.end().to_le_bytes());
        bytes.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for file in &self.files {
            match file {
                NativeFile::Inline { name, bytes: data } => {
                    put_str(&mut bytes, name);
                    bytes.push(0);
                    let length = u32::try_from(data.len()).expect("an inline rocksdb file under 4 GiB");
                    bytes.extend_from_slice(&length.to_le_bytes());
                    bytes.extend_from_slice(data);
                }
                NativeFile::Shared { name, sst } => {
                    put_str(&mut bytes, name);
                    bytes.push(1);
                    put_str(&mut bytes, &sst.path);
                    bytes.extend_from_slice(&sst.size.to_le_bytes());
                    bytes.extend_from_slice(&sst.crc.to_le_bytes());
                }
            }
        }
        bytes.extend_from_slice(&(self.delta.len() as u32).to_le_bytes());
        for (key, value) in &self.delta {
            bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
            bytes.extend_from_slice(key);
            match value {
                Some(value) => {
                    bytes.push(1);
                    bytes.extend_from_slice(&(value.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(value);
                }
                None => bytes.push(0),
            }
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<NativeCheckpoint, StateError> {
        let body_size = bytes.len().checked_sub(4).ok_or_else(|| corrupt("shorter than its checksum"))?;
        let (body, crc) = bytes.split_at(body_size);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let mut reader = Reader { bytes: body };
        if reader.take(4, "magic")? != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let version = reader.u16("version")?;
        if version != VERSION {
            return Err(corrupt(format!("version {version}, this build reads {VERSION}")));
        }
        let (start, end) = (reader.u16("range start")?, reader.u16("range end")?);
        if start > end {
            return Err(corrupt(format!("key-group range {start}..{end}")));
        }
        let count = reader.u32("file count")?;
        let mut files = Vec::new();
        for _ in 0..count {
            let name = reader.str("file name")?;
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(corrupt(format!("file name {name:?}")));
            }
            files.push(match reader.u8("file kind")? {
                0 => {
                    let length = reader.u32("inline length")? as usize;
                    NativeFile::Inline { name, bytes: reader.take(length, "inline bytes")?.to_vec() }
                }
                1 => {
                    let path = reader.str("shared path")?;
                    let (size, crc) = (reader.u64("sst size")?, reader.u32("sst crc")?);
                    NativeFile::Shared { name, sst: SharedSst { path, size, crc } }
                }
                kind => return Err(corrupt(format!("file kind {kind}"))),
            });
        }
        let delta_count = reader.u32("delta count")?;
        let mut delta: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for _ in 0..delta_count {
            let key_size = reader.u32("delta key size")? as usize;
            let key = reader.take(key_size, "delta key")?.to_vec();
            if key.len() < 2 || key.len() - 2 > STATE_KEY_SIZE_MAX {
                return Err(corrupt(format!("delta key of {} bytes", key.len())));
            }
            if delta.last().is_some_and(|(last, _)| *last >= key) {
                return Err(corrupt("delta keys out of order"));
            }
            let value = match reader.u8("delta flag")? {
                0 => None,
                1 => {
                    let size = reader.u32("delta value size")? as usize;
                    if size > STATE_VALUE_SIZE_MAX {
                        return Err(corrupt(format!("delta value of {size} bytes")));
                    }
                    Some(reader.take(size, "delta value")?.to_vec())
                }
                flag => return Err(corrupt(format!("delta flag {flag}"))),
            };
            delta.push((key, value));
        }
        if !reader.bytes.is_empty() {
            return Err(corrupt(format!("{} bytes after the delta", reader.bytes.len())));
        }
        Ok(NativeCheckpoint { range: KeyGroupRange::new(start, end), files, delta })
    }

    /// Writes every file into the empty directory `dir`, checking each shared SST's size and CRC.
    pub fn materialize(&self, storage: &mut dyn Storage, dir: &Path) -> Result<(), StateError> {
        let io = |error: std::io::Error| StateError::Backend(format!("restoring into {}: {error}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        for file in &self.files {
            match file {
                NativeFile::Inline { name, bytes } => std::fs::write(dir.join(name), bytes).map_err(io)?,
                NativeFile::Shared { name, sst } => {
                    let bytes = storage.read(&sst.path)?;
                    let damage = if bytes.len() as u64 != sst.size {
                        Some(format!("{} bytes, expected {}", bytes.len(), sst.size))
                    } else if crc32fast::hash(&bytes) != sst.crc {
                        Some("its checksum does not match".to_string())
                    } else {
                        None
                    };
                    if let Some(damage) = damage {
                        let what = format!("shared state file {} is damaged ({damage})", sst.path);
                        return Err(StateError::Corrupt { what });
                    }
                    std::fs::write(dir.join(name), bytes).map_err(io)?;
                }
            }
        }
        Ok(())
    }

    /// The shared SST files by local name.
    pub fn shared(&self) -> BTreeMap<String, SharedSst> {
        self.files
            .iter()
            .filter_map(|file| match file {
                NativeFile::Shared { name, sst } => Some((name.clone(), sst.clone())),
                NativeFile::Inline { .. } => None,
            })
            .collect()
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], StateError> {
        if self.bytes.len() < count {
            return Err(corrupt(format!("truncated in {what}")));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self, what: &str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("eight bytes")))
    }

    fn str(&mut self, what: &str) -> Result<String, StateError> {
        let length = usize::from(self.u16(what)?);
        let bytes = self.take(length, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
    }
}

/// Shared copies known to be whole in storage, by local SST name: uploaded by a capture of this
/// database, or restored. Shared with the asynchronous writers, which add what they upload.
pub type KnownSsts = Arc<Mutex<BTreeMap<String, SharedSst>>>;

/// The RocksDB part of a capture: the frozen cache goes into RocksDB, then RocksDB takes its
/// checkpoint (memtables flushed, live files hard-linked into a local directory). Until it is
/// done the backend must not write to RocksDB: the checkpoint would see writes from after its
/// barrier. Whoever needs it first does it — the asynchronous writer, or the backend itself when
/// it must write (a full cache, a scan, the next capture) before the writer ran — and the other
/// waits for it or finds it done, so neither can wait for the other forever
/// (`sabot_sync::settle::Settle`, which the loom models check).
pub struct Pending {
    /// The database and where its checkpoint goes, until someone took the checkpoint.
    work: Settle<(Arc<DB>, PathBuf), Result<(), String>>,
}

impl Pending {
    pub fn new(db: Arc<DB>, local: PathBuf) -> Pending {
        Pending { work: Settle::new((db, local)) }
    }

    /// Does the RocksDB part unless it is done; its result either way.
    pub fn settle(&self) -> Result<(), String> {
        self.work.settle(|(db, local)| checkpoint(&db, &local))
    }
}

fn checkpoint(db: &DB, local: &Path) -> Result<(), String> {
    super::remove_dir_if_present(local).map_err(|error| format!("{}: {error}", local.display()))?;
    Checkpoint::new(db)
        .and_then(|c| c.create_checkpoint(local))
        .map_err(|error| format!("rocksdb checkpoint in {}: {error}", local.display()))
}

/// What the asynchronous part of a native checkpoint needs.
pub struct RocksCapture {
    pub pending: Arc<Pending>,
    /// The caches frozen and not yet written to RocksDB at the capture, oldest first: their
    /// dirty entries (the newest of each key) are the delta.
    pub frozen: Vec<Arc<super::cache::Cache>>,
    pub local: PathBuf,
    pub metadata_path: String,
    pub shared_prefix: String,
    pub range: KeyGroupRange,
    pub known: KnownSsts,
}

impl SnapshotWrite for RocksCapture {
    fn write(self: Box<Self>, storage: &mut dyn Storage) -> Result<Vec<String>, StateError> {
        self.pending.settle().map_err(StateError::Backend)?;
        let io = |error: std::io::Error| StateError::Backend(format!("{}: {error}", self.local.display()));
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.local).map_err(io)? {
            let name = entry.map_err(io)?.file_name().into_string();
            names.push(name.map_err(|name| StateError::Backend(format!("rocksdb file name {name:?}")))?);
        }
        names.sort();
        let read = |name: &str| {
            let path = self.local.join(name);
            std::fs::read(&path).map_err(|error| StateError::Backend(format!("reading {}: {error}", path.display())))
        };
        let mut files = Vec::with_capacity(names.len());
        let mut shared = Vec::new();
        for name in names {
            if !name.ends_with(".sst") {
                files.push(NativeFile::Inline { bytes: read(&name)?, name });
                continue;
            }
            // One local file has one shared copy: reuse it if storage has it.
            let known = self.known.lock().expect("known ssts lock").get(&name).cloned();
            let sst = match known {
                Some(sst) => sst,
                None => {
                    let bytes = read(&name)?;
                    let path = format!("{}{name}", self.shared_prefix);
                    write_durably(storage, &path, &bytes)?;
                    let sst = SharedSst { path, size: bytes.len() as u64, crc: crc32fast::hash(&bytes) };
                    self.known.lock().expect("known ssts lock").insert(name.clone(), sst.clone());
                    sst
                }
            };
            shared.push(sst.path.clone());
            files.push(NativeFile::Shared { name, sst });
        }
        let live: std::collections::BTreeSet<&str> = files
            .iter()
            .filter_map(|f| match f {
                NativeFile::Shared { name, .. } => Some(name.as_str()),
                NativeFile::Inline { .. } => None,
            })
            .collect();
        // A file RocksDB dropped never comes back (file numbers do not repeat): forget those
        // numbered below this checkpoint's newest. Higher ones may be a newer checkpoint's, whose
        // writer runs at the same time; forgetting them would upload them again over themselves.
        let newest = live.iter().filter_map(|name| sst_number(name)).max();
        self.known
            .lock()
            .expect("known ssts lock")
            .retain(|name, _| live.contains(name.as_str()) || sst_number(name) > newest);
        // The newest entry of each key, ascending.
        let mut delta: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for (index, frozen) in self.frozen.iter().enumerate() {
            for (key, cached) in frozen.dirty() {
                if self.frozen[index + 1..].iter().any(|newer| newer.contains(key)) {
                    continue;
                }
                delta.push((key.to_vec(), cached.value.as_ref().map(|v| v.to_vec())));
            }
        }
        delta.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let metadata = NativeCheckpoint { range: self.range, files, delta };
        write_durably(storage, &self.metadata_path, &metadata.encode())?;
        Ok(shared)
    }
}

/// The number of an SST file name (`000123.sst`).
fn sst_number(name: &str) -> Option<u64> {
    name.strip_suffix(".sst")?.parse().ok()
}

impl Drop for RocksCapture {
    fn drop(&mut self) {
        // Never written: the backend must still be free to write to RocksDB.
        let _ = self.pending.settle();
        // Hard links only: removing them frees nothing RocksDB still uses.
        let _ = std::fs::remove_dir_all(&self.local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: metadata round-trips, and every truncation or bit flip is an error, never a panic.
    #[test]
    fn metadata_round_trips_and_detects_damage() {
        let checkpoint = NativeCheckpoint {
            range: KeyGroupRange::new(3, 9),
            files: vec![
                NativeFile::Inline { name: "CURRENT".into(), bytes: b"MANIFEST-000005\n".to_vec() },
                NativeFile::Shared {
                    name: "000012.sst".into(),
                    sst: SharedSst { path: "checkpoints/shared/w/abc-000012.sst".into(), size: 1234, crc: 99 },
                },
            ],
            delta: vec![(vec![0, 3, 1], Some(b"v".to_vec())), (vec![0, 3, 2], None)],
        };
        let bytes = checkpoint.encode();
        assert_eq!(NativeCheckpoint::decode(&bytes).unwrap(), checkpoint);
        for cut in 0..bytes.len() {
            assert!(NativeCheckpoint::decode(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(NativeCheckpoint::decode(&flipped).is_err(), "bit {bit} flipped");
        }
    }

    // Goal: SST file numbers parse as RocksDB names them; other files have none.
    #[test]
    fn sst_numbers() {
        assert_eq!(sst_number("000123.sst"), Some(123));
        assert_eq!(sst_number("MANIFEST-000005"), None);
        assert_eq!(sst_number("x.sst"), None);
    }
}
