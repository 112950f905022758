//! An in-memory [`Storage`] for tests and the single-threaded harness.
//!
//! It keeps the durable and the volatile view apart, as a disk with a page cache does: `crash`
//! forgets what was not synced. It injects no other fault; the simulator's faulty disk does that.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{parent_dir, validate_path, Storage, StorageError};

/// File contents are shared between the views, so that syncing copies no bytes.
pub(super) type Data = Arc<[u8]>;

#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    /// What a reader sees now.
    current: BTreeMap<String, Data>,
    /// What survives a crash: file contents synced, under the names whose directory was synced.
    durable: BTreeMap<String, Data>,
    /// Synced contents, by the name they were synced under (the inode, in effect).
    synced_data: BTreeMap<String, Data>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Loses everything not made durable, as a power cut would.
    pub fn crash(&mut self) {
        self.current = self.durable.clone();
        self.synced_data = self.durable.clone();
    }

    /// The total size of all files, in bytes.
    pub fn size(&self) -> usize {
        self.current.values().map(|data| data.len()).sum()
    }

    fn not_found(path: &str) -> StorageError {
        StorageError::NotFound { path: path.to_string() }
    }
}

/// The names of the files directly in `dir`. The paths under `dir/` are one range of the map: no
/// scan of the whole disk.
pub(super) fn list_of(files: &BTreeMap<String, Data>, dir: &str) -> Vec<String> {
    let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
    files
        .range::<str, _>((std::ops::Bound::Included(prefix.as_str()), std::ops::Bound::Unbounded))
        .map(|(path, _)| path)
        .take_while(|path| path.starts_with(&prefix))
        .filter(|path| parent_dir(path) == dir)
        .map(|path| path.rsplit('/').next().unwrap_or(path).to_string())
        .collect()
}

/// Renames `from` (which exists) to `to`: its contents, and its synced contents (the inode's).
pub(super) fn rename_entry(
    current: &mut BTreeMap<String, Data>,
    synced_data: &mut BTreeMap<String, Data>,
    from: &str,
    to: &str,
) {
    let data = current.remove(from).expect("the caller checked that it exists");
    current.insert(to.to_string(), data);
    match synced_data.remove(from) {
        Some(synced) => synced_data.insert(to.to_string(), synced),
        None => synced_data.remove(to),
    };
}

/// A directory sync: the directory's names become durable, each with the contents last synced
/// under it.
pub(super) fn make_dir_durable(
    current: &BTreeMap<String, Data>,
    synced_data: &BTreeMap<String, Data>,
    durable: &mut BTreeMap<String, Data>,
    dir: &str,
) {
    durable.retain(|path, _| parent_dir(path) != dir);
    for path in current.keys().filter(|path| parent_dir(path) == dir) {
        let synced = synced_data.get(path).cloned().unwrap_or_else(|| Arc::from(&[][..]));
        durable.insert(path.clone(), synced);
    }
}

impl Storage for MemStorage {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        validate_path(path)?;
        self.current.insert(path.to_string(), Arc::from(data));
        self.synced_data.remove(path);
        Ok(())
    }

    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        let data = self.current.get(path).ok_or_else(|| Self::not_found(path))?;
        self.synced_data.insert(path.to_string(), data.clone());
        if self.durable.contains_key(path) {
            self.durable.insert(path.to_string(), data.clone());
        }
        Ok(())
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        validate_path(from)?;
        validate_path(to)?;
        if !self.current.contains_key(from) {
            return Err(Self::not_found(from));
        }
        rename_entry(&mut self.current, &mut self.synced_data, from, to);
        Ok(())
    }

    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        if !dir.is_empty() {
            validate_path(dir)?;
        }
        make_dir_durable(&self.current, &self.synced_data, &mut self.durable, dir);
        Ok(())
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        validate_path(path)?;
        self.current.get(path).map(|data| data.to_vec()).ok_or_else(|| Self::not_found(path))
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        if !dir.is_empty() {
            validate_path(dir)?;
        }
        Ok(list_of(&self.current, dir))
    }

    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        validate_path(path)?;
        self.current.remove(path).ok_or_else(|| Self::not_found(path))?;
        self.synced_data.remove(path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::write_atomic;

    // Goal: a crash keeps exactly what the POSIX rules make durable.
    // Method: write files with and without each sync, crash, and check what is left.
    #[test]
    fn crash_keeps_only_durable_files() {
        let mut storage = MemStorage::new();
        write_atomic(&mut storage, "d/whole", b"whole").unwrap();
        storage.write("d/unsynced", b"lost").unwrap();
        storage.write("d/synced-not-named", b"x").unwrap();
        storage.sync_file("d/synced-not-named").unwrap();
        storage.write("d/named-not-synced", b"y").unwrap();
        storage.sync_dir("d").unwrap(); // names durable; "named-not-synced" has no synced data
        storage.write("d/unsynced", b"lost again").unwrap();
        storage.crash();
        assert_eq!(storage.list("d").unwrap(), vec!["named-not-synced", "synced-not-named", "unsynced", "whole"]);
        assert_eq!(storage.read("d/whole").unwrap(), b"whole");
        assert_eq!(storage.read("d/synced-not-named").unwrap(), b"x");
        assert_eq!(storage.read("d/named-not-synced").unwrap(), b"");
        assert_eq!(storage.read("d/unsynced").unwrap(), b"");
        assert!(storage.list("d").unwrap().iter().all(|name| !name.ends_with(".tmp")));
    }

    // Goal: an atomic write replaces a file whole, and reads of missing files are errors, not empties.
    #[test]
    fn atomic_replace_and_missing_file() {
        let mut storage = MemStorage::new();
        write_atomic(&mut storage, "pointer", b"1").unwrap();
        write_atomic(&mut storage, "pointer", b"2").unwrap();
        storage.crash();
        assert_eq!(storage.read("pointer").unwrap(), b"2");
        assert_eq!(storage.read("nope"), Err(StorageError::NotFound { path: "nope".into() }));
        assert_eq!(storage.list("").unwrap(), vec!["pointer"]);
    }
}
