//! Keyed state: the synchronous [`StateBackend`] interface, its key layout and its portable snapshots.
//!
//! # Key layout
//! Every entry belongs to one key group and is addressed by the bytes `key | namespace`, encoded by
//! [`StateKey`]: `key length (u16, big-endian) | key bytes | namespace bytes`. Integer keys and
//! namespaces are big-endian with the sign bit flipped for signed values, so byte order is numeric
//! order. Backends that store all groups in one ordered space (RocksDB) prefix the key group as
//! `u16` big-endian, so one key group is one contiguous range: `key group | key | namespace`.
//!
//! Scans visit a key group's entries in ascending byte order of the encoded key, in every backend.

pub mod codec;
mod heap;
pub mod keyed;
pub mod map_key;
pub mod snapshot;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod timers;

pub use heap::{FxHasher, HeapBackend};
pub use snapshot::KeyGroupsSnapshot;

use crate::element::CheckpointId;
use crate::env::{Storage, StorageError};
use crate::key_group::{KeyGroup, KeyGroupRange};

/// The longest encoded state key (key and namespace) a backend accepts, in bytes.
pub const STATE_KEY_SIZE_MAX: usize = 64 * 1024;
/// The longest state value a backend accepts, in bytes.
pub const STATE_VALUE_SIZE_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state backend failed: {0}")]
    Backend(String),
    #[error("state snapshot is corrupt ({what}); restore from an older checkpoint")]
    Corrupt { what: String },
    #[error("state key of {size} bytes is larger than the limit of {STATE_KEY_SIZE_MAX} bytes")]
    KeyTooLarge { size: usize },
    #[error("state value of {size} bytes is larger than the limit of {STATE_VALUE_SIZE_MAX} bytes")]
    ValueTooLarge { size: usize },
    #[error("state {state:?} in key group {key_group}: {reason}")]
    Value { state: String, key_group: u16, reason: String },
    #[error("state declaration refused: {0}")]
    Declaration(String),
    #[error("snapshot refused, its state is incompatible: {0}")]
    Incompatible(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The asynchronous part of a snapshot: writes files to `Storage` off the task's thread, each one
/// durable (written, synced, its directory synced) before `write` returns. It returns the files
/// the checkpoint refers to beyond those named when it was captured (a RocksDB checkpoint learns
/// its SST files only once it is taken).
pub trait SnapshotWrite: Send {
    fn write(self: Box<Self>, storage: &mut dyn Storage) -> Result<Vec<String>, StateError>;
}

/// A [`SnapshotWrite`] of bytes already captured.
pub struct FileWrite {
    pub path: String,
    pub bytes: Vec<u8>,
}

impl FileWrite {
    pub fn boxed(path: String, bytes: Vec<u8>) -> Box<dyn SnapshotWrite> {
        Box::new(FileWrite { path, bytes })
    }
}

impl SnapshotWrite for FileWrite {
    fn write(self: Box<Self>, storage: &mut dyn Storage) -> Result<Vec<String>, StateError> {
        write_durably(storage, &self.path, &self.bytes)?;
        Ok(Vec::new())
    }
}

/// Writes a file, syncs it and syncs its directory.
pub fn write_durably(storage: &mut dyn Storage, path: &str, bytes: &[u8]) -> Result<(), StorageError> {
    storage.write(path, bytes)?;
    if !planted!(SnapshotWithoutFsync) {
        storage.sync_file(path)?;
    }
    storage.sync_dir(crate::env::parent_dir(path))
}

/// Where a checkpoint's state goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureTarget {
    pub checkpoint: CheckpointId,
    /// The path of this state's own files in the checkpoint, without an extension
    /// (`checkpoints/chk-7/window-00001-00000`): backends add theirs.
    pub path: String,
    /// A directory for files that later checkpoints of the same state may share (RocksDB's SST
    /// files); the coordinator deletes each once no retained checkpoint refers to it.
    pub shared_dir: String,
}

/// What [`StateBackend::capture`] took: the files the checkpoint refers to (as far as known now)
/// and the asynchronous part that writes what storage does not hold yet.
pub struct StateCapture {
    pub files: Vec<String>,
    pub write: Box<dyn SnapshotWrite>,
}

/// The extension of a state file in the portable format ([`snapshot`]).
pub const PORTABLE_EXTENSION: &str = ".state";

/// Visits one entry `(key, value)` of a scan.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StateError> + 'a;
/// Visits one entry `(key, value)` of a range scan; `false` stops the scan.
pub type VisitWhile<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StateError> + 'a;
/// Visits one key of a range scan of keys; `false` stops the scan.
pub type VisitKeysWhile<'a> = dyn FnMut(&[u8]) -> Result<bool, StateError> + 'a;

/// The id of a declared state (column family) of a backend: the first two bytes (big-endian) of
/// every key of that state ([`StateKey`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateId(pub u16);

impl StateId {
    /// The id a key belongs to, if it is long enough to carry one.
    #[inline]
    pub fn of_key(key: &[u8]) -> Option<StateId> {
        Some(StateId(u16::from_be_bytes([*key.first()?, *key.get(1)?])))
    }

    pub fn prefix(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}
/// Computes a new value from the stored one (`None`: absent) into the buffer given.
pub type Merge<'a> = dyn FnMut(Option<&[u8]>, &mut Vec<u8>) -> Result<(), StateError> + 'a;

/// Keyed state storage for one operator subtask: the entries of a range of key groups.
///
/// Every call names a key group inside [`StateBackend::key_groups`]; naming another one is a bug
/// in the caller and panics. Reads see every earlier write of the same backend.
pub trait StateBackend: Send {
    /// The key groups this backend holds.
    fn key_groups(&self) -> KeyGroupRange;
    /// Declares state `id`, named `name` (a RocksDB column family; the heap keeps one index per
    /// state that asks for `ordered` range scans). Once a backend has declared states, every key
    /// starts with the id of one of them; a backend without declared states takes any key.
    /// Declaring an id again with the same name is a no-op; with another name it is an error.
    fn declare_state(&mut self, _id: StateId, _name: &str, _ordered: bool) -> Result<(), StateError> {
        Ok(())
    }
    /// Copies the value of `key` into `value` (cleared first); `false` if there is none.
    fn get(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError>;
    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError>;
    /// Read-modify-write in one call: `merge(old, new)` gets the stored value (`None` if absent) and
    /// writes the value to store into `new` (empty when called). Backends that can find the entry
    /// once for both (the heap) do so; the default is a `get` and a `put`.
    fn merge(&mut self, key_group: KeyGroup, key: &[u8], merge: &mut Merge<'_>) -> Result<(), StateError> {
        let mut old = Vec::new();
        let found = self.get(key_group, key, &mut old)?;
        let mut new = Vec::new();
        merge(found.then_some(old.as_slice()), &mut new)?;
        self.put(key_group, key, &new)
    }
    /// Removes `key`; removing an absent key is not an error.
    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError>;
    /// Applies every operation of `batch`, in order. The default puts and deletes one by one.
    fn write_batch(&mut self, batch: &WriteBatch) -> Result<(), StateError> {
        for op in batch.iter() {
            match op {
                WriteOp::Put { key_group, key, value } => self.put(key_group, key, value)?,
                WriteOp::Delete { key_group, key } => self.delete(key_group, key)?,
            }
        }
        Ok(())
    }
    /// Appends `bytes` to the value of `key` (absent: an empty value). Backends that can extend the
    /// stored value in place (the heap, RocksDB's cache) do so; the default is a `merge`.
    fn append(&mut self, key_group: KeyGroup, key: &[u8], bytes: &[u8]) -> Result<(), StateError> {
        self.merge(key_group, key, &mut |old, new| {
            new.extend_from_slice(old.unwrap_or_default());
            new.extend_from_slice(bytes);
            Ok(())
        })
    }
    /// Visits the entries of `key_group` in ascending key order.
    fn scan(&mut self, key_group: KeyGroup, visit: &mut Visit<'_>) -> Result<(), StateError>;
    /// Visits the entries of `key_group` whose key starts with `prefix` and is not below `from`,
    /// in ascending key order, until `visit` returns `false`. Fast (no visit of other entries)
    /// for the keys of states declared `ordered`; the default scans the whole group.
    fn scan_range(
        &mut self,
        key_group: KeyGroup,
        prefix: &[u8],
        from: &[u8],
        visit: &mut VisitWhile<'_>,
    ) -> Result<(), StateError> {
        let mut going = true;
        self.scan(key_group, &mut |key, value| {
            if going && key.starts_with(prefix) && key >= from {
                going = visit(key, value)?;
            }
            Ok(())
        })
    }
    /// As [`StateBackend::scan_range`], visiting only the keys: backends that keep the keys of
    /// `ordered` states apart from their values (the heap's ordered index) read no value. The
    /// default is a `scan_range`.
    fn scan_range_keys(
        &mut self,
        key_group: KeyGroup,
        prefix: &[u8],
        from: &[u8],
        visit: &mut VisitKeysWhile<'_>,
    ) -> Result<(), StateError> {
        self.scan_range(key_group, prefix, from, &mut |key, _| visit(key))
    }
    /// Removes `key` and copies its value into `value` (cleared first); `false` if there was none.
    /// The default is a `get` and a `delete`.
    fn take(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        let found = self.get(key_group, key, value)?;
        if found {
            self.delete(key_group, key)?;
        }
        Ok(found)
    }
    /// A self-contained copy of every entry, in the portable format of [`snapshot`].
    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError>;
    /// Replaces all entries by those of `snapshot` that fall into this backend's key groups.
    fn restore(&mut self, snapshot: &KeyGroupsSnapshot) -> Result<(), StateError>;
    /// The synchronous part of a checkpoint: takes the entries as they are now and returns the
    /// asynchronous part that writes them, while the backend goes on changing. The default is a
    /// portable [`StateBackend::snapshot`] (a copy of everything, now) in `<path>.state`.
    fn capture(&mut self, target: &CaptureTarget) -> Result<StateCapture, StateError> {
        let path = format!("{}{PORTABLE_EXTENSION}", target.path);
        let bytes = self.snapshot()?.into_bytes();
        Ok(StateCapture { files: vec![path.clone()], write: FileWrite::boxed(path, bytes) })
    }
    /// Checkpoint `checkpoint` completed: files it captured are safe to share from now on.
    fn checkpoint_complete(&mut self, _checkpoint: CheckpointId) {}
    /// Replaces all entries by those of this backend's key groups found in `files`: what captures
    /// of any subtask of the same state wrote (any parallelism). Files it does not know are
    /// ignored. The default reads portable `.state` files.
    fn restore_files(&mut self, storage: &mut dyn Storage, files: &[String]) -> Result<(), StateError> {
        // Backend-specific formats are `.state-<backend>`: only that backend reads them.
        if let Some(file) = files.iter().find(|file| file.contains(&format!("{PORTABLE_EXTENSION}-"))) {
            return Err(StateError::Backend(format!(
                "{file} holds state in a format only the backend that wrote it restores: \
                 restore with that backend"
            )));
        }
        let snapshot = read_portable(storage, files, self.key_groups())?;
        self.restore(&snapshot)
    }
    /// The size of the live entries, in bytes (an estimate where the backend cannot know exactly).
    fn size_bytes(&self) -> u64;
}

/// The entries of `range` from the portable `.state` files among `files` (taken by subtasks of
/// ascending key-group ranges, in order), as one snapshot.
pub fn read_portable(
    storage: &mut dyn Storage,
    files: &[String],
    range: KeyGroupRange,
) -> Result<KeyGroupsSnapshot, StateError> {
    let mut parts = Vec::new();
    for file in files.iter().filter(|f| f.ends_with(PORTABLE_EXTENSION)) {
        parts.push(KeyGroupsSnapshot::from_bytes(storage.read(file)?)?);
    }
    // Ranges are disjoint: order the parts by the first group of this range each holds.
    let first = |part: &KeyGroupsSnapshot| part.entries_in(range).next().map(|(group, _, _)| group);
    parts.sort_by_key(first);
    let mut writer = snapshot::SnapshotWriter::new();
    let mut group_last: Option<KeyGroup> = None;
    for part in &parts {
        if let (Some(first), Some(last)) = (first(part), group_last) {
            if first <= last {
                let what = format!("two state files both hold key group {}", first.0);
                return Err(StateError::Corrupt { what });
            }
        }
        for (key_group, key, value) in part.entries_in(range) {
            writer.add(key_group, key, value);
            group_last = Some(key_group);
        }
    }
    Ok(writer.finish())
}

/// Checks a key and value against the limits every backend enforces.
pub fn check_entry_size(key: &[u8], value: &[u8]) -> Result<(), StateError> {
    if key.len() > STATE_KEY_SIZE_MAX {
        return Err(StateError::KeyTooLarge { size: key.len() });
    }
    if value.len() > STATE_VALUE_SIZE_MAX {
        return Err(StateError::ValueTooLarge { size: value.len() });
    }
    Ok(())
}

/// One operation of a [`WriteBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOp<'a> {
    Put { key_group: KeyGroup, key: &'a [u8], value: &'a [u8] },
    Delete { key_group: KeyGroup, key: &'a [u8] },
}

/// Writes collected to be applied together; one flat buffer, reused across batches.
#[derive(Clone, Debug, Default)]
pub struct WriteBatch {
    bytes: Vec<u8>,
    /// `(key group, key end, value end)`; a delete has `value end == key end` and `is_put == false`.
    ops: Vec<(KeyGroup, u32, u32, bool)>,
}

impl WriteBatch {
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    pub fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len() as u32;
        self.bytes.extend_from_slice(value);
        self.ops.push((key_group, key_end, self.bytes.len() as u32, true));
    }

    pub fn delete(&mut self, key_group: KeyGroup, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len() as u32;
        self.ops.push((key_group, key_end, key_end, false));
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ops.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = WriteOp<'_>> {
        let mut start = 0_usize;
        self.ops.iter().map(move |&(key_group, key_end, value_end, is_put)| {
            let key = &self.bytes[start..key_end as usize];
            let value = &self.bytes[key_end as usize..value_end as usize];
            start = value_end as usize;
            if is_put {
                WriteOp::Put { key_group, key, value }
            } else {
                WriteOp::Delete { key_group, key }
            }
        })
    }
}

/// Encodes state keys (`key length | key | namespace`) into a reused buffer.
#[derive(Clone, Debug, Default)]
pub struct StateKey {
    bytes: Vec<u8>,
}

impl StateKey {
    pub fn new() -> StateKey {
        StateKey { bytes: Vec::with_capacity(32) }
    }

    /// Starts a key that is an unsigned integer.
    #[inline]
    pub fn set_u64(&mut self, key: u64) -> &mut StateKey {
        self.bytes.clear();
        self.bytes.extend_from_slice(&8_u16.to_be_bytes());
        self.bytes.extend_from_slice(&key.to_be_bytes());
        self
    }

    /// Starts a key that is a signed integer (sign bit flipped, so byte order is numeric order).
    #[inline]
    pub fn set_i64(&mut self, key: i64) -> &mut StateKey {
        self.set_u64(order_preserving_i64(key))
    }

    /// Starts a key that is a byte string.
    pub fn set_bytes(&mut self, key: &[u8]) -> Result<&mut StateKey, StateError> {
        let length = u16::try_from(key.len()).map_err(|_| StateError::KeyTooLarge { size: key.len() })?;
        self.bytes.clear();
        self.bytes.extend_from_slice(&length.to_be_bytes());
        self.bytes.extend_from_slice(key);
        Ok(self)
    }

    /// Appends a signed integer to the namespace.
    #[inline]
    pub fn push_namespace_i64(&mut self, namespace: i64) -> &mut StateKey {
        self.bytes.extend_from_slice(&order_preserving_i64(namespace).to_be_bytes());
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[inline]
pub fn order_preserving_i64(value: i64) -> u64 {
    (value as u64) ^ (1 << 63)
}

#[inline]
pub fn order_preserving_i64_inverse(value: u64) -> i64 {
    (value ^ (1 << 63)) as i64
}

/// Splits an encoded state key into its key bytes and namespace bytes.
pub fn split_state_key(encoded: &[u8]) -> Result<(&[u8], &[u8]), StateError> {
    let corrupt = |what: &str| StateError::Corrupt { what: format!("state key: {what}") };
    let length = encoded.get(..2).ok_or_else(|| corrupt("shorter than its length prefix"))?;
    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
    let rest = &encoded[2..];
    if rest.len() < length {
        return Err(corrupt("key length beyond the end"));
    }
    Ok(rest.split_at(length))
}

/// Reads an 8-byte big-endian integer at the front of `bytes`.
pub fn read_u64_be(bytes: &[u8]) -> Result<u64, StateError> {
    let array: [u8; 8] = bytes
        .get(..8)
        .and_then(|slice| slice.try_into().ok())
        .ok_or_else(|| StateError::Corrupt { what: format!("expected 8 bytes, found {}", bytes.len()) })?;
    Ok(u64::from_be_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: encoded keys sort as their values do, and split back into their parts.
    // Method: encode ordered pairs of (key, namespace) and compare byte order with value order.
    #[test]
    fn state_key_encoding_preserves_order_and_splits() {
        let values = [i64::MIN, -10_000, -1, 0, 1, 9_999, i64::MAX];
        let mut previous: Option<Vec<u8>> = None;
        for &key in &values {
            for &namespace in &values {
                let mut encoded = StateKey::new();
                encoded.set_i64(key).push_namespace_i64(namespace);
                let bytes = encoded.as_bytes().to_vec();
                let (key_bytes, namespace_bytes) = split_state_key(&bytes).unwrap();
                assert_eq!(order_preserving_i64_inverse(read_u64_be(key_bytes).unwrap()), key);
                assert_eq!(order_preserving_i64_inverse(read_u64_be(namespace_bytes).unwrap()), namespace);
                if let Some(previous) = previous {
                    assert!(previous < bytes, "{key} {namespace}");
                }
                previous = Some(bytes);
            }
        }
        assert!(split_state_key(&[0]).is_err());
        assert!(split_state_key(&[0, 9, 1]).is_err());
    }

    // Goal: a write batch hands back exactly the operations put in, in order.
    #[test]
    fn write_batch_round_trips() {
        let mut batch = WriteBatch::new();
        batch.put(KeyGroup(3), b"k1", b"v1");
        batch.delete(KeyGroup(4), b"k2");
        batch.put(KeyGroup(5), b"", b"");
        let ops: Vec<WriteOp<'_>> = batch.iter().collect();
        assert_eq!(
            ops,
            vec![
                WriteOp::Put { key_group: KeyGroup(3), key: b"k1", value: b"v1" },
                WriteOp::Delete { key_group: KeyGroup(4), key: b"k2" },
                WriteOp::Put { key_group: KeyGroup(5), key: b"", value: b"" },
            ]
        );
        batch.clear();
        assert!(batch.is_empty());
    }
}
