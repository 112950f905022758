//! The abstract world: the only way the kernel and its drivers reach time, other nodes and disks.
//!
//! The kernel itself never calls a [`Clock`]: drivers read it and pass `now` into `handle_*` calls.
//! [`Storage`] is synchronous and is handed to the kernel, which calls it for checkpoint and sink
//! files; a real driver puts a local directory behind it, the simulator a faulty in-memory disk.
//! [`Transport`] moves elements between nodes; drivers own it (the kernel hands elements out through
//! `poll_transmit` and takes them in through `handle_element`).

#[cfg(any(test, feature = "testing"))]
pub mod fault_storage;
mod mem_storage;

pub use mem_storage::MemStorage;

use std::fmt;

use crate::element::Element;
use crate::time::Instant;

/// Processing time, for drivers. Monotonic within one process.
pub trait Clock {
    fn now(&self) -> Instant;
}

/// A logical channel between two subtasks: FIFO, reliable until broken.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ChannelId(pub u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    /// The channel broke (peer gone, connection reset). Never silent loss: the job must roll back.
    #[error("channel {0:?} is broken; the job must restart from its last checkpoint")]
    Broken(ChannelId),
    #[error("channel {0:?} is not known to this transport")]
    Unknown(ChannelId),
    /// The connection to another process (`peer`: its index in the job's attempt) failed
    /// (closed, silent past its heartbeat timeout, or it sent something malformed): every channel
    /// to and from its nodes is broken.
    #[error("lost peer process {peer}: {reason}; the job must restart from its last checkpoint")]
    PeerLost { peer: u16, reason: String },
}

/// Why an element was handed back by [`Transport::try_send`].
#[derive(Debug)]
pub enum SendRefused {
    /// The channel is at its bound: retry once it drained (backpressure).
    Full(Element),
    Failed(TransportError),
}

/// Moves elements between nodes: FIFO per channel, bounded, reliable until broken.
///
/// Non-blocking on purpose: drivers wait for readiness in their own way (async, or by stepping).
pub trait Transport {
    fn try_send(&mut self, channel: ChannelId, element: Element) -> Result<(), SendRefused>;
    /// The next element that arrived for this node, if any.
    fn try_recv(&mut self) -> Result<Option<(ChannelId, Element)>, TransportError>;
}

/// A failure of the storage world. Every variant names the path it concerns.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    #[error("storage path {path:?} not found")]
    NotFound { path: String },
    #[error("storage path {path:?} is invalid: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("storage is full while writing {path:?}; free space and restart from the last checkpoint")]
    Full { path: String },
    #[error("storage i/o error on {path:?}: {message}")]
    Io { path: String, message: String },
}

/// Durable files for checkpoints, manifests and sink output.
///
/// Paths are relative, `/`-separated, and name no `.` or `..` component (see [`validate_path`]).
/// Durability follows POSIX: data is durable after `sync_file`; a created, renamed or deleted name is
/// durable after `sync_dir` of its directory. `rename` atomically replaces the target.
pub trait Storage {
    /// Creates or truncates the file at `path` and writes `data` to it (not yet durable).
    fn write(&mut self, path: &str, data: &[u8]) -> Result<(), StorageError>;
    /// Makes the file's data durable.
    fn sync_file(&mut self, path: &str) -> Result<(), StorageError>;
    /// Atomically renames `from` to `to`, replacing `to` if it exists.
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError>;
    /// Makes the names in directory `dir` durable (`""` is the root).
    fn sync_dir(&mut self, dir: &str) -> Result<(), StorageError>;
    fn read(&mut self, path: &str) -> Result<Vec<u8>, StorageError>;
    /// The names (not paths) of the files directly in `dir`, sorted; empty if `dir` does not exist.
    fn list(&mut self, dir: &str) -> Result<Vec<String>, StorageError>;
    fn delete(&mut self, path: &str) -> Result<(), StorageError>;
}

/// Checks that `path` is a relative, `/`-separated path without empty, `.` or `..` components.
pub fn validate_path(path: &str) -> Result<(), StorageError> {
    let invalid = |reason| Err(StorageError::InvalidPath { path: path.to_string(), reason });
    if path.is_empty() {
        return invalid("empty");
    }
    if path.starts_with('/') {
        return invalid("absolute");
    }
    for component in path.split('/') {
        match component {
            "" => return invalid("empty component"),
            "." | ".." => return invalid("dot component"),
            _ if component.contains('\0') || component.contains('\\') => return invalid("bad character"),
            _ => {}
        }
    }
    Ok(())
}

/// The directory part of a path (`""` for a file at the root).
pub fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Writes a file so that after a crash it exists either whole or not at all: write to a temporary
/// name, sync it, rename it over `path`, sync the directory.
pub fn write_atomic(storage: &mut dyn Storage, path: &str, data: &[u8]) -> Result<(), StorageError> {
    validate_path(path)?;
    let temporary = format!("{path}.tmp");
    storage.write(&temporary, data)?;
    storage.sync_file(&temporary)?;
    storage.rename(&temporary, path)?;
    storage.sync_dir(parent_dir(path))
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "channel {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: paths that could escape the storage root or alias another file are refused.
    // Method: a table of good and bad paths.
    #[test]
    fn validate_path_refuses_escapes() {
        for good in ["a", "a/b", "checkpoints/chk-1/manifest", "x.tmp"] {
            assert_eq!(validate_path(good), Ok(()), "{good}");
        }
        for bad in ["", "/a", "a//b", "a/", "./a", "a/../b", "..", "a\\b"] {
            assert!(validate_path(bad).is_err(), "{bad}");
        }
        assert_eq!(parent_dir("a/b/c"), "a/b");
        assert_eq!(parent_dir("c"), "");
    }
}
