//! [`Storage`] on a local directory: files really fsynced, directories too.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sabot_kernel::env::{validate_path, Storage, StorageError};

/// Files under one root directory. Paths are the kernel's relative, `/`-separated paths.
#[derive(Clone, Debug)]
pub struct LocalFsStorage {
    root: PathBuf,
}

impl LocalFsStorage {
    /// Uses `root` (created if missing) as the storage root.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<LocalFsStorage> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        Ok(LocalFsStorage { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn resolve(&self, path: &str) -> Result<PathBuf, StorageError> {
        validate_path(path)?;
        Ok(self.root.join(path))
    }

    fn resolve_dir(&self, dir: &str) -> Result<PathBuf, StorageError> {
        if dir.is_empty() {
            Ok(self.root.clone())
        } else {
            self.resolve(dir)
        }
    }
}

/// Maps an I/O error to the kernel's storage errors, naming the path.
fn storage_error(path: &str, error: io::Error) -> StorageError {
    match error.kind() {
        io::ErrorKind::NotFound => StorageError::NotFound { path: path.to_string() },
        io::ErrorKind::StorageFull => StorageError::Full { path: path.to_string() },
        _ if error.raw_os_error() == Some(28) => StorageError::Full { path: path.to_string() },
        _ => StorageError::Io { path: path.to_string(), message: error.to_string() },
    }
}

impl Storage for LocalFsStorage {
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError> {
        let full = self.resolve(path)?;
        let write = || -> io::Result<()> {
            if let Some(parent) = full.parent() {
                fs::create_dir_all(parent)?;
            }
            File::create(&full)?.write_all(data)
        };
        write().map_err(|e| storage_error(path, e))
    }

    fn sync_file(&mut self, path: &str) -> Result<(), StorageError> {
        let full = self.resolve(path)?;
        File::open(&full).and_then(|file| file.sync_all()).map_err(|e| storage_error(path, e))
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        let (full_from, full_to) = (self.resolve(from)?, self.resolve(to)?);
        if let Some(parent) = full_to.parent() {
            fs::create_dir_all(parent).map_err(|e| storage_error(to, e))?;
        }
        fs::rename(&full_from, &full_to).map_err(|e| storage_error(from, e))
    }

    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError> {
        let full = self.resolve_dir(dir)?;
        File::open(&full).and_then(|file| file.sync_all()).map_err(|e| storage_error(dir, e))
    }

    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError> {
        let full = self.resolve(path)?;
        fs::read(&full).map_err(|e| storage_error(path, e))
    }

    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError> {
        let full = self.resolve_dir(dir)?;
        let entries = match fs::read_dir(&full) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(storage_error(dir, error)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| storage_error(dir, e))?;
            if entry.file_type().map_err(|e| storage_error(dir, e))?.is_file() {
                // Names that are not UTF-8 were not written by Sabot; they are not listed.
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn delete(&mut self, path: &str) -> Result<(), StorageError> {
        let full = self.resolve(path)?;
        fs::remove_file(&full).map_err(|e| storage_error(path, e))
    }
}
