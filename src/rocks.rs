//! Keyed state in RocksDB: a local directory per operator subtask.
//!
//! Key layout: `key group (u16 big-endian) | state key`, where the state key is the kernel's
//! `key length | key | namespace` (`sabot_kernel::state`). A key group is therefore one contiguous
//! range, scanned with an upper bound at the next group's prefix. Writes skip RocksDB's write-ahead
//! log: state is made durable by checkpoints, not by the log (as in Flink).

use std::path::{Path, PathBuf};

use rocksdb::{DBCompressionType, Options, ReadOptions, WriteOptions, DB};
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange};
use sabot_kernel::state::snapshot::SnapshotWriter;
use sabot_kernel::state::{
    check_entry_size, KeyGroupsSnapshot, StateBackend, StateError, WriteBatch, WriteOp,
};

pub struct RocksDbBackend {
    db: DB,
    path: PathBuf,
    range: KeyGroupRange,
    write_options: WriteOptions,
    /// Reused buffer for `key group | state key`.
    key: Vec<u8>,
}

fn backend_error(path: &Path, error: rocksdb::Error) -> StateError {
    StateError::Backend(format!("rocksdb at {}: {error}", path.display()))
}

fn prefix(key_group: KeyGroup) -> [u8; 2] {
    key_group.0.to_be_bytes()
}

impl RocksDbBackend {
    /// Opens (creating it if missing) the database at `path` for the key groups in `range`.
    pub fn open(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
    ) -> Result<RocksDbBackend, StateError> {
        let path = path.into();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_compression_type(DBCompressionType::None);
        options.set_write_buffer_size(64 << 20);
        let db = DB::open(&options, &path).map_err(|e| backend_error(&path, e))?;
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(true);
        Ok(RocksDbBackend {
            db,
            path,
            range,
            write_options,
            key: Vec::with_capacity(64),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn full_key(&mut self, key_group: KeyGroup, key: &[u8]) -> &[u8] {
        assert!(
            self.range.contains(key_group),
            "key group {} outside {:?}",
            key_group.0,
            self.range
        );
        self.key.clear();
        self.key.extend_from_slice(&prefix(key_group));
        self.key.extend_from_slice(key);
        &self.key
    }

    fn error(&self, error: rocksdb::Error) -> StateError {
        backend_error(&self.path, error)
    }

    /// Visits `key_group`'s entries in key order, with the group prefix stripped.
    fn visit_group(
        &self,
        key_group: KeyGroup,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        let mut read_options = ReadOptions::default();
        read_options
            .set_iterate_upper_bound((u32::from(key_group.0) + 1).to_be_bytes()[2..].to_vec());
        // The upper bound of the last possible group (0xffff) has no u16 successor: use 3 bytes.
        if key_group.0 == u16::MAX {
            read_options.set_iterate_upper_bound(vec![0xff, 0xff, 0xff]);
        }
        let mut iterator = self.db.raw_iterator_opt(read_options);
        iterator.seek(prefix(key_group));
        while iterator.valid() {
            let (key, value) = (
                iterator.key().expect("valid"),
                iterator.value().expect("valid"),
            );
            assert_eq!(
                key[..2],
                prefix(key_group),
                "rocksdb iterator left key group {}",
                key_group.0
            );
            visit(&key[2..], value)?;
            iterator.next();
        }
        iterator.status().map_err(|e| self.error(e))
    }
}

impl StateBackend for RocksDbBackend {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn get(
        &mut self,
        key_group: KeyGroup,
        key: &[u8],
        value: &mut Vec<u8>,
    ) -> Result<bool, StateError> {
        value.clear();
        self.full_key(key_group, key);
        match self
            .db
            .get_pinned(&self.key)
            .map_err(|e| backend_error(&self.path, e))?
        {
            Some(stored) => {
                value.extend_from_slice(&stored);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        check_entry_size(key, value)?;
        self.full_key(key_group, key);
        self.db
            .put_opt(&self.key, value, &self.write_options)
            .map_err(|e| backend_error(&self.path, e))
    }

    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        self.full_key(key_group, key);
        self.db
            .delete_opt(&self.key, &self.write_options)
            .map_err(|e| backend_error(&self.path, e))
    }

    fn write_batch(&mut self, batch: &WriteBatch) -> Result<(), StateError> {
        let mut rocks_batch = rocksdb::WriteBatch::default();
        for op in batch.iter() {
            match op {
                WriteOp::Put {
                    key_group,
                    key,
                    value,
                } => {
                    check_entry_size(key, value)?;
                    rocks_batch.put(self.full_key(key_group, key), value);
                }
                WriteOp::Delete { key_group, key } => {
                    rocks_batch.delete(self.full_key(key_group, key))
                }
            }
        }
        self.db
            .write_opt(rocks_batch, &self.write_options)
            .map_err(|e| self.error(e))
    }

    fn scan(
        &mut self,
        key_group: KeyGroup,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        assert!(
            self.range.contains(key_group),
            "key group {} outside {:?}",
            key_group.0,
            self.range
        );
        self.visit_group(key_group, visit)
    }

    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError> {
        let mut writer = SnapshotWriter::new();
        for key_group in self.range.iter() {
            self.visit_group(key_group, &mut |key, value| {
                writer.add(key_group, key, value);
                Ok(())
            })?;
        }
        Ok(writer.finish())
    }

    fn restore(&mut self, snapshot: &KeyGroupsSnapshot) -> Result<(), StateError> {
        let mut batch = rocksdb::WriteBatch::default();
        // Everything of this backend's groups goes: [start, end) as two-byte prefixes.
        let end = u32::from(self.range.end());
        let end_key = if end > u32::from(u16::MAX) {
            vec![0xff, 0xff, 0xff]
        } else {
            (end as u16).to_be_bytes().to_vec()
        };
        batch.delete_range(prefix(KeyGroup(self.range.start())).to_vec(), end_key);
        for (key_group, key, value) in snapshot.entries_in(self.range) {
            check_entry_size(key, value)?;
            batch.put(self.full_key(key_group, key), value);
        }
        self.db
            .write_opt(batch, &self.write_options)
            .map_err(|e| self.error(e))
    }

    fn size_bytes(&self) -> u64 {
        let property = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        property("rocksdb.estimate-live-data-size") + property("rocksdb.cur-size-all-mem-tables")
    }
}
