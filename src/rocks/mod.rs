//! Keyed state in RocksDB: a local directory per operator subtask.
//!
//! Key layout: `key group (u16 big-endian) | state key`, where the state key is the kernel's
//! `key length | key | namespace` (`sabot_kernel::state`). A key group is therefore one contiguous
//! range, scanned with an upper bound at the next group's prefix. Writes skip RocksDB's write-ahead
//! log: state is made durable by checkpoints, not by the log (as in Flink).
//!
//! A bounded write-back cache sits in front of RocksDB: reads fill it, writes go to it, and it is
//! written to RocksDB as one write batch when it is full (`CACHE_ENTRIES_MAX` entries by
//! default), and before every scan, snapshot or restore. State that lives briefly (a window's entries, created and deleted
//! within one cache generation) never costs a RocksDB write at all: a delete of an entry RocksDB
//! never held writes no tombstone.
//!
//! Checkpoints are RocksDB's own (see [`native`]): incremental, sharing SST files between
//! checkpoints. A capture freezes the cache as an overlay (reads look into it; it reaches
//! RocksDB with the next write-out) and its changes travel as the checkpoint's delta. A restore takes native checkpoints of any subtasks, and portable `.state` files.

mod native;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{BlockBasedOptions, DBCompressionType, Options, ReadOptions, WriteOptions, DB};
use sabot_kernel::env::Storage;
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange};
use sabot_kernel::state::snapshot::SnapshotWriter;
use sabot_kernel::state::{
    check_entry_size, read_portable, CaptureTarget, FxHasher, KeyGroupsSnapshot, Merge, StateBackend, StateCapture,
    StateError, Visit,
};
use smallvec::SmallVec;

pub use native::NATIVE_EXTENSION;
use native::{KnownSsts, NativeCheckpoint, RocksCapture};

/// The size of one memtable, in bytes.
const WRITE_BUFFER_SIZE: usize = 8 << 20;

/// Entries the write-back cache holds before it is written to RocksDB and emptied.
pub const CACHE_ENTRIES_MAX: usize = 256 * 1024;

/// A cached entry: the current value (`None`: absent), and what RocksDB must be told.
#[derive(Debug)]
struct Cached {
    value: Option<SmallVec<[u8; 16]>>,
    /// The value differs from what RocksDB (under the frozen caches) holds.
    dirty: bool,
    /// RocksDB may hold a value for the key (so removing it needs a tombstone).
    in_db: bool,
    /// A frozen cache holds the key: a delete must stay in the cache to shadow it, though
    /// RocksDB needs no tombstone unless `in_db`.
    shadows: bool,
}

type CacheKey = SmallVec<[u8; 32]>;
type Cache = HashMap<CacheKey, Cached, BuildHasherDefault<FxHasher>>;

pub struct RocksDbBackend {
    /// Always open, except while a restore replaces the database's files.
    db: Option<Arc<DB>>,
    options: Options,
    /// Caches that captures froze, oldest first, not yet written to RocksDB: reads look into
    /// them (newest first) after the cache; the next write-out writes them, then the cache.
    frozen: Vec<Arc<Cache>>,
    /// RocksDB checkpoints of captures that may not be taken yet: nothing is written to RocksDB
    /// before they are.
    pending: Vec<Arc<native::Pending>>,
    /// Unique to this opening of the database: names the shared copies of its new SST files.
    instance: String,
    known: KnownSsts,
    cache: Cache,
    cache_entries_max: usize,
    path: PathBuf,
    range: KeyGroupRange,
    write_options: WriteOptions,
    /// Reused buffer for `key group | state key`.
    key: Vec<u8>,
    /// Reused buffer for the value `merge` computes.
    merged: Vec<u8>,
}

fn backend_error(path: &Path, error: rocksdb::Error) -> StateError {
    StateError::Backend(format!("rocksdb at {}: {error}", path.display()))
}

fn prefix(key_group: KeyGroup) -> [u8; 2] {
    key_group.0.to_be_bytes()
}

/// The exclusive upper bound of the keys of groups below `end`: two bytes, or three past 0xffff.
fn group_bound(end: u32) -> Vec<u8> {
    if end > u32::from(u16::MAX) {
        vec![0xff, 0xff, 0xff]
    } else {
        (end as u16).to_be_bytes().to_vec()
    }
}

/// How long opening a database waits for another holder of its lock to let go (a killed
/// process whose exit the kernel is still completing, or a checkpoint writer of this process).
const LOCK_WAIT_MS: u64 = 5_000;

/// Opens the database at `path`, retrying while its lock is held.
fn open_waiting_for_lock(options: &Options, path: &Path) -> Result<DB, StateError> {
    let started = std::time::Instant::now();
    loop {
        match DB::open(options, path) {
            Ok(db) => return Ok(db),
            Err(error)
                if error.to_string().contains("lock file")
                    && started.elapsed() < std::time::Duration::from_millis(LOCK_WAIT_MS) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => return Err(backend_error(path, error)),
        }
    }
}

/// Removes the directory `path` (if present) so that a kill meanwhile leaves it whole or absent:
/// renamed away first, then removed.
fn discard_dir(path: &Path) -> std::io::Result<()> {
    let discarded = path.with_extension("discarded");
    remove_dir_if_present(&discarded)?;
    match std::fs::rename(path, &discarded) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
        Ok(()) => remove_dir_if_present(&discarded),
    }
}

fn remove_dir_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Frozen caches kept as overlays at most; a capture beyond writes them out first.
const FROZEN_MAX: usize = 8;

/// Entries an import writes per batch.
const IMPORT_BATCH_ENTRIES: usize = 64 * 1024;

/// An id no other opening of a database shares: process id, time and a counter.
fn instance_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}-{}", nanos, std::process::id(), OPENED.fetch_add(1, Ordering::Relaxed))
}

impl RocksDbBackend {
    /// Opens (creating it if missing) the database at `path` for the key groups in `range`.
    pub fn open(path: impl Into<PathBuf>, range: KeyGroupRange) -> Result<RocksDbBackend, StateError> {
        Self::open_with_cache(path, range, CACHE_ENTRIES_MAX)
    }

    /// A backend with no entries in a new database at `path`, whatever the directory held: a
    /// job's local state is scratch (it comes from checkpoints), and a process killed while
    /// RocksDB created or restored a database may leave one that does not open. The old
    /// directory is renamed away before it is removed, so a kill meanwhile leaves it whole or
    /// absent.
    pub fn open_empty(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
        cache_entries_max: usize,
    ) -> Result<RocksDbBackend, StateError> {
        let path = path.into();
        let clear = |error: std::io::Error| StateError::Backend(format!("clearing {}: {error}", path.display()));
        discard_dir(&path).map_err(clear)?;
        // What a killed process left beside it: local checkpoints (hard links that keep old
        // SST files alive), imports, a restore in progress.
        if let (Some(parent), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
            if let Ok(entries) = std::fs::read_dir(parent) {
                for entry in entries.flatten() {
                    let leftover = entry.file_name().to_str().is_some_and(|n| n.starts_with(&format!("{name}.")));
                    if leftover {
                        remove_dir_if_present(&entry.path()).map_err(clear)?;
                    }
                }
            }
        }
        Self::open_with_cache(path, range, cache_entries_max)
    }

    /// As [`RocksDbBackend::open`], with a write-back cache of `cache_entries_max` entries (at least 2).
    pub fn open_with_cache(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
        cache_entries_max: usize,
    ) -> Result<RocksDbBackend, StateError> {
        assert!(cache_entries_max >= 2, "cache of {cache_entries_max} entries");
        let path = path.into();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_compression_type(DBCompressionType::None);
        // Small memtables keep the skip list shallow and in cache; most state is short-lived
        // (a window's entries die when it fires), so most of it never leaves the memtable.
        options.set_write_buffer_size(WRITE_BUFFER_SIZE);
        options.set_max_write_buffer_number(4);
        // Most reads look for an entry that is not there yet (a key's first record in a window):
        // bloom filters in memtables and files answer those without a search.
        options.set_memtable_whole_key_filtering(true);
        options.set_memtable_prefix_bloom_ratio(0.1);
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        options.set_block_based_table_factory(&table);
        let db = open_waiting_for_lock(&options, &path)?;
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(true);
        Ok(RocksDbBackend {
            db: Some(Arc::new(db)),
            options,
            frozen: Vec::new(),
            pending: Vec::new(),
            instance: instance_id(),
            known: Arc::new(Mutex::new(BTreeMap::new())),
            cache: HashMap::default(),
            cache_entries_max,
            path,
            range,
            write_options,
            key: Vec::with_capacity(64),
            merged: Vec::with_capacity(64),
        })
    }

    fn full_key(&mut self, key_group: KeyGroup, key: &[u8]) -> &[u8] {
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        self.key.clear();
        self.key.extend_from_slice(&prefix(key_group));
        self.key.extend_from_slice(key);
        &self.key
    }

    fn error(&self, error: rocksdb::Error) -> StateError {
        backend_error(&self.path, error)
    }

    fn db(&self) -> &DB {
        self.db.as_ref().expect("the database is open outside a restore")
    }

    /// Makes sure the latest capture's RocksDB part is done (normally its writer did it long
    /// ago; otherwise this does it, or waits for the writer doing it); from then on the backend
    /// may write to RocksDB again.
    fn settle(&mut self) -> Result<(), StateError> {
        for pending in std::mem::take(&mut self.pending) {
            pending
                .settle()
                .map_err(|reason| StateError::Backend(format!("rocksdb at {}: {reason}", self.path.display())))?;
        }
        Ok(())
    }

    /// Closes the database, empties its directory, fills it with `checkpoint`'s files (or
    /// nothing), and opens it again, as a new instance.
    fn reopen_from(
        &mut self,
        storage: &mut dyn Storage,
        checkpoint: Option<&NativeCheckpoint>,
    ) -> Result<(), StateError> {
        self.settle()?;
        self.cache.clear();
        self.frozen.clear();
        let db = self.db.take().expect("the database is open");
        // Writers hold the database only until their RocksDB part is done, which `settle` awaited.
        assert_eq!(Arc::strong_count(&db), 1, "a checkpoint writer still holds the database");
        drop(db);
        // The directory is always a whole database or absent, also if the process is killed
        // meanwhile: the old one is renamed away before it is removed, the new one is built
        // beside it and renamed into place.
        let io = |error: std::io::Error| StateError::Backend(format!("restoring {}: {error}", self.path.display()));
        let staging = self.path.with_extension("restoring");
        discard_dir(&self.path).map_err(io)?;
        if let Some(checkpoint) = checkpoint {
            remove_dir_if_present(&staging).map_err(io)?;
            checkpoint.materialize(storage, &staging)?;
            std::fs::rename(&staging, &self.path).map_err(io)?;
        }
        self.db = Some(Arc::new(open_waiting_for_lock(&self.options, &self.path)?));
        self.instance = instance_id();
        let known = checkpoint.map(NativeCheckpoint::shared).unwrap_or_default();
        self.known = Arc::new(Mutex::new(known));
        Ok(())
    }

    /// Writes a native checkpoint's delta (what its cache held) over RocksDB, for this backend's
    /// key groups.
    fn apply_delta(&mut self, checkpoint: &NativeCheckpoint) -> Result<(), StateError> {
        let mut batch = rocksdb::WriteBatch::default();
        for (key, value) in &checkpoint.delta {
            let key_group = KeyGroup(u16::from_be_bytes([key[0], key[1]]));
            if !self.range.contains(key_group) || !checkpoint.range.contains(key_group) {
                continue;
            }
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        self.db().write_opt(batch, &self.write_options).map_err(|e| self.error(e))
    }

    /// Copies the entries of this backend's key groups out of another subtask's native checkpoint.
    fn import(
        &mut self,
        storage: &mut dyn Storage,
        checkpoint: &NativeCheckpoint,
        index: usize,
    ) -> Result<(), StateError> {
        let dir = self.path.with_extension(format!("import-{index}"));
        let io = |error: std::io::Error| StateError::Backend(format!("importing into {}: {error}", dir.display()));
        remove_dir_if_present(&dir).map_err(io)?;
        checkpoint.materialize(storage, &dir)?;
        let result = self.import_from(&dir, checkpoint.range);
        std::fs::remove_dir_all(&dir).map_err(io)?;
        result
    }

    fn import_from(&mut self, dir: &Path, range: KeyGroupRange) -> Result<(), StateError> {
        let source = DB::open_for_read_only(&self.options, dir, false).map_err(|e| backend_error(dir, e))?;
        let (start, end) = (self.range.start().max(range.start()), self.range.end().min(range.end()));
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(group_bound(u32::from(end)));
        let mut iterator = source.raw_iterator_opt(read_options);
        iterator.seek(prefix(KeyGroup(start)));
        let mut batch = rocksdb::WriteBatch::default();
        while iterator.valid() {
            batch.put(iterator.key().expect("valid"), iterator.value().expect("valid"));
            if batch.len() >= IMPORT_BATCH_ENTRIES {
                self.db().write_opt(std::mem::take(&mut batch), &self.write_options).map_err(|e| self.error(e))?;
            }
            iterator.next();
        }
        iterator.status().map_err(|e| backend_error(dir, e))?;
        self.db().write_opt(batch, &self.write_options).map_err(|e| self.error(e))
    }

    /// Visits `key_group`'s entries in key order, with the group prefix stripped.
    fn visit_group(&self, key_group: KeyGroup, visit: &mut Visit<'_>) -> Result<(), StateError> {
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(group_bound(u32::from(key_group.0) + 1));
        let mut iterator = self.db().raw_iterator_opt(read_options);
        iterator.seek(prefix(key_group));
        while iterator.valid() {
            let (key, value) = (iterator.key().expect("valid"), iterator.value().expect("valid"));
            assert_eq!(key[..2], prefix(key_group), "rocksdb iterator left key group {}", key_group.0);
            visit(&key[2..], value)?;
            iterator.next();
        }
        iterator.status().map_err(|e| self.error(e))
    }
}

/// A cached entry that differs from RocksDB: its full key, and its value (`None`: deleted).
type CachedChange<'a> = (&'a [u8], Option<&'a [u8]>);

impl RocksDbBackend {
    /// The dirty cache entries (of `key_group`, or all), sorted by full key.
    fn cached_sorted(&self, key_group: Option<KeyGroup>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .cache
            .iter()
            .filter(|(key, cached)| cached.dirty && key_group.is_none_or(|group| key[..2] == prefix(group)))
            .map(|(key, cached)| (key.to_vec(), cached.value.as_ref().map(|v| v.to_vec())))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        entries
    }

    /// Visits `key_group`'s entries in key order: RocksDB's, overridden by the dirty `cached` ones
    /// (sorted, all of this key group).
    fn visit_merged(
        &self,
        key_group: KeyGroup,
        cached: &[(Vec<u8>, Option<Vec<u8>>)],
        visit: &mut Visit<'_>,
    ) -> Result<(), StateError> {
        let mut changes =
            cached.iter().map(|(key, value)| -> CachedChange<'_> { (&key[2..], value.as_deref()) }).peekable();
        self.visit_group(key_group, &mut |key, value| {
            while let Some(&(cached_key, cached_value)) = changes.peek().filter(|(k, _)| *k <= key) {
                changes.next();
                if let Some(cached_value) = cached_value {
                    visit(cached_key, cached_value)?;
                }
                if cached_key == key {
                    return Ok(());
                }
            }
            visit(key, value)
        })?;
        for (key, value) in changes {
            if let Some(value) = value {
                visit(key, value)?;
            }
        }
        Ok(())
    }

    /// The cached entry of the key in `self.key`, read from RocksDB on a miss.
    fn cached(&mut self) -> Result<&mut Cached, StateError> {
        if !self.cache.contains_key(self.key.as_slice()) {
            self.make_room()?;
            let frozen = self.frozen.iter().rev().find_map(|frozen| frozen.get(self.key.as_slice()));
            let cached = match frozen {
                // Taken over from the frozen cache; the live entry shadows it from now on.
                Some(frozen) => {
                    Cached { value: frozen.value.clone(), dirty: frozen.dirty, in_db: frozen.in_db, shadows: true }
                }
                None => {
                    let stored = self.db().get_pinned(&self.key).map_err(|e| backend_error(&self.path, e))?;
                    let value = stored.map(|stored| SmallVec::from_slice(&stored));
                    let in_db = value.is_some();
                    Cached { value, dirty: false, in_db, shadows: false }
                }
            };
            self.cache.insert(CacheKey::from_slice(&self.key), cached);
        }
        Ok(self.cache.get_mut(self.key.as_slice()).expect("inserted above"))
    }

    /// Sets the value of the key in `self.key` in the cache (`None`: delete).
    fn write_cached(&mut self, value: Option<&[u8]>) -> Result<(), StateError> {
        if !self.cache.contains_key(self.key.as_slice()) {
            self.make_room()?;
        }
        let entry = self.cache.entry(CacheKey::from_slice(&self.key)).or_insert(Cached {
            value: None,
            dirty: false,
            // Not read: RocksDB may hold it.
            in_db: true,
            // Not read: a frozen cache may hold it.
            shadows: true,
        });
        entry.value = value.map(SmallVec::from_slice);
        entry.dirty = entry.value.is_some() || entry.in_db || entry.shadows;
        Ok(())
    }

    /// Keeps the cache under its bound: first drops what RocksDB already agrees with and holds no
    /// value (absent keys), then, if the cache is still half full, writes it out.
    fn make_room(&mut self) -> Result<(), StateError> {
        if self.cache.len() < self.cache_entries_max {
            return Ok(());
        }
        let keep = |cached: &Cached| cached.dirty || cached.value.is_some();
        if self.cache.values().filter(|cached| keep(cached)).count() >= self.cache_entries_max / 2 {
            return self.flush();
        }
        // Rebuilt rather than `retain`ed: erasing in place leaves tombstones that every later
        // lookup of an absent key (the common case) would have to probe past.
        let old = std::mem::replace(
            &mut self.cache,
            Cache::with_capacity_and_hasher(self.cache_entries_max, Default::default()),
        );
        self.cache.extend(old.into_iter().filter(|(_, cached)| keep(cached)));
        Ok(())
    }

    /// Writes every dirty cached entry (frozen caches first, the newest entry of each key) to
    /// RocksDB in one batch and empties the caches. A delete of a key RocksDB never held writes
    /// nothing: state that lived only in caches never costs a RocksDB write.
    fn flush(&mut self) -> Result<(), StateError> {
        self.settle()?;
        let mut batch = rocksdb::WriteBatch::default();
        let frozen = std::mem::take(&mut self.frozen);
        let caches: Vec<&Cache> = frozen.iter().map(Arc::as_ref).chain(std::iter::once(&self.cache)).collect();
        for (index, cache) in caches.iter().enumerate() {
            for (key, cached) in cache.iter().filter(|(_, cached)| cached.dirty) {
                if caches[index + 1..].iter().any(|newer| newer.contains_key(key)) {
                    continue;
                }
                match &cached.value {
                    Some(value) => batch.put(key, value),
                    None if cached.in_db => batch.delete(key),
                    None => {}
                }
            }
        }
        drop(caches);
        self.cache.clear();
        self.db().write_opt(batch, &self.write_options).map_err(|e| self.error(e))
    }
}

impl StateBackend for RocksDbBackend {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn get(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        self.full_key(key_group, key);
        match &self.cached()?.value {
            Some(stored) => {
                value.extend_from_slice(stored);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn put(&mut self, key_group: KeyGroup, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        check_entry_size(key, value)?;
        self.full_key(key_group, key);
        self.write_cached(Some(value))
    }

    fn merge(&mut self, key_group: KeyGroup, key: &[u8], merge: &mut Merge<'_>) -> Result<(), StateError> {
        self.full_key(key_group, key);
        let mut merged = std::mem::take(&mut self.merged);
        merged.clear();
        let cached = self.cached()?;
        let result = merge(cached.value.as_deref(), &mut merged).and_then(|()| check_entry_size(key, &merged));
        if result.is_ok() {
            cached.value = Some(SmallVec::from_slice(&merged));
            cached.dirty = true;
        }
        self.merged = merged;
        result
    }

    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        self.full_key(key_group, key);
        self.write_cached(None)
    }

    fn take(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        self.full_key(key_group, key);
        let cached = self.cached()?;
        let Some(stored) = cached.value.take() else {
            return Ok(false);
        };
        value.extend_from_slice(&stored);
        cached.dirty = cached.in_db || cached.shadows;
        Ok(true)
    }

    fn scan(&mut self, key_group: KeyGroup, visit: &mut Visit<'_>) -> Result<(), StateError> {
        if !self.frozen.is_empty() {
            self.flush()?;
        }
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        let cached = self.cached_sorted(Some(key_group));
        self.visit_merged(key_group, &cached, visit)
    }

    /// Merges RocksDB's entries with the cache's, without writing the cache out (frozen caches
    /// are written out first).
    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError> {
        if !self.frozen.is_empty() {
            self.flush()?;
        }
        let cached = self.cached_sorted(None);
        let mut writer = SnapshotWriter::new();
        let mut from = 0;
        for key_group in self.range.iter() {
            let to = from + cached[from..].partition_point(|(key, _)| key[..2] == prefix(key_group));
            self.visit_merged(key_group, &cached[from..to], &mut |key, value| {
                writer.add(key_group, key, value);
                Ok(())
            })?;
            from = to;
        }
        assert_eq!(from, cached.len(), "cached entries outside the key groups");
        Ok(writer.finish())
    }

    fn restore(&mut self, snapshot: &KeyGroupsSnapshot) -> Result<(), StateError> {
        self.settle()?;
        self.cache.clear();
        self.frozen.clear();
        let mut batch = rocksdb::WriteBatch::default();
        // Everything of this backend's groups goes: [start, end) as two-byte prefixes.
        batch.delete_range(prefix(KeyGroup(self.range.start())).to_vec(), group_bound(u32::from(self.range.end())));
        for (key_group, key, value) in snapshot.entries_in(self.range) {
            check_entry_size(key, value)?;
            batch.put(self.full_key(key_group, key), value);
        }
        self.db().write_opt(batch, &self.write_options).map_err(|e| self.error(e))
    }

    /// Freezes the write-back cache (a move, whatever the state's size): it becomes the newest
    /// frozen overlay, and the asynchronous part takes a RocksDB checkpoint (before anything is
    /// written to RocksDB again), uploads the SST files storage does not have yet, and stores the
    /// overlays' changes as the checkpoint's delta. A backend's checkpoints all go to one
    /// storage: it remembers which SST files that storage holds.
    fn capture(&mut self, target: &CaptureTarget) -> Result<StateCapture, StateError> {
        if self.frozen.len() >= FROZEN_MAX {
            // Many checkpoints and no write-out between: the caches are small, write them out.
            self.flush()?;
        }
        let capacity = self.cache.len();
        let live = Cache::with_capacity_and_hasher(capacity, Default::default());
        self.frozen.push(Arc::new(std::mem::replace(&mut self.cache, live)));
        let local = PathBuf::from(format!("{}.chk-{}", self.path.display(), target.checkpoint.0));
        let db = self.db.clone().expect("the database is open");
        let pending = Arc::new(native::Pending::new(db, local.clone()));
        self.pending.push(pending.clone());
        let metadata_path = format!("{}{NATIVE_EXTENSION}", target.path);
        let write = Box::new(RocksCapture {
            pending,
            frozen: self.frozen.clone(),
            local,
            metadata_path: metadata_path.clone(),
            shared_prefix: format!("{}/{}-", target.shared_dir, self.instance),
            range: self.range,
            known: self.known.clone(),
        });
        Ok(StateCapture { files: vec![metadata_path], write })
    }

    /// Restores native checkpoints and portable files. One native checkpoint of exactly this
    /// backend's key groups becomes the database as it is (its files are shared again from
    /// now on); otherwise (rescaling) the entries of this backend's groups are copied out of each.
    fn restore_files(&mut self, storage: &mut dyn Storage, files: &[String]) -> Result<(), StateError> {
        let mut natives = Vec::new();
        for file in files.iter().filter(|f| f.ends_with(NATIVE_EXTENSION)) {
            let checkpoint = NativeCheckpoint::decode(&storage.read(file)?)
                .map_err(|error| StateError::Corrupt { what: format!("{file}: {error}") })?;
            let overlaps =
                checkpoint.range.start().max(self.range.start()) < checkpoint.range.end().min(self.range.end());
            if overlaps {
                natives.push(checkpoint);
            }
        }
        let portable = read_portable(storage, files, self.range)?;
        match natives.as_slice() {
            [only] if only.range == self.range && portable.entries().next().is_none() => {
                self.reopen_from(storage, Some(only))?;
                self.apply_delta(only)
            }
            _ => {
                self.reopen_from(storage, None)?;
                self.restore(&portable)?;
                for (index, checkpoint) in natives.iter().enumerate() {
                    self.import(storage, checkpoint, index)?;
                    self.apply_delta(checkpoint)?;
                }
                Ok(())
            }
        }
    }

    /// RocksDB's estimate of its live data and memtables, plus the cache's dirty values.
    fn size_bytes(&self) -> u64 {
        let property = |name: &str| self.db().property_int_value(name).ok().flatten().unwrap_or(0);
        let cached: usize =
            self.cache.iter().filter_map(|(key, c)| c.value.as_ref().map(|v| key.len() + v.len())).sum();
        property("rocksdb.estimate-live-data-size") + property("rocksdb.cur-size-all-mem-tables") + cached as u64
    }
}
