//! Keyed state in RocksDB: a local directory per operator subtask.
//!
//! # Column families and key layout
//! Each declared state ([`StateBackend::declare_state`]) has its own column family, named
//! `state:<id>:<name>` ([`columns`]): the id is part of the name, so a database describes its
//! states by itself, and a restore knows them before (or without) their declarations. A state
//! key `id (u16 BE) | rest` is stored in its state's column family as `key group (u16 BE) | rest`,
//! which with the typed layer's keys is `key group | key | namespace | user key`
//! (`sabot_kernel::state::keyed`). A backend that declares no states stores every key in the
//! default column family as `key group | state key`. The two never mix: declaring a state once
//! entries were written without one is refused, and so is a database holding both. Either way
//! a key group is one contiguous range per column family, scanned with an upper bound at the
//! next group's prefix; a scan of a key group visits the column families in id order, so that
//! it sees the state keys (id included) in ascending order, as every backend must.
//!
//! All column families share one LRU block cache ([`RocksDbConfig::block_cache_size`], 64 MiB by
//! default; the driver reads `SABOT_ROCKSDB_BLOCK_CACHE_MB`) and one memtable budget; SST files
//! carry bloom filters. Writes skip RocksDB's write-ahead log: state is made durable by
//! checkpoints, not by the log (as in Flink).
//!
//! # The write-back cache, and when RocksDB is written
//! A bounded write-back cache sits in front of RocksDB: reads fill it, writes go to it (an
//! append extends the cached value in place), and it keeps the keys of its dirty entries in
//! order, so that a scan or range scan merges them with RocksDB's iterator without writing
//! anything. RocksDB is written, as one write batch routed to the column families, only when
//! (a) the cache is full (`CACHE_ENTRIES_MAX` entries by default) and more than half of it must
//! be kept, (b) a capture finds `FROZEN_MAX` frozen caches, and (c) a restore replaces the
//! state. There is no write per record and no write per step: the kernel has no end-of-step
//! hook, and none is needed, since a write-out happens at most once per half a cache of new
//! entries. State that lives briefly (a window's entries, created and deleted within one cache
//! generation) never costs a RocksDB write at all: a delete of an entry RocksDB never held
//! writes no tombstone.
//!
//! # Checkpoints
//! Checkpoints are RocksDB's own (see [`native`]): incremental, sharing SST files between
//! checkpoints, and holding every column family (a RocksDB checkpoint's manifest lists them).
//! A capture freezes the cache as an overlay (reads and scans look into it; it reaches RocksDB
//! with the next write-out) and its changes travel as the checkpoint's delta. A restore takes
//! native checkpoints of any subtasks (each opened with all its column families; rescaling
//! copies every column family's key groups), and portable `.state` files, whose keys go to
//! their state's column family. A restore clears the backend's key groups with range
//! tombstones only in column families that hold entries there: a tombstone slows every read
//! and scan over its range until compaction drops it.

mod cache;
mod columns;
mod native;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{
    BlockBasedOptions, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options, ReadOptions, WriteOptions, DB,
};
use sabot_kernel::env::Storage;
use sabot_kernel::key_group::{KeyGroup, KeyGroupRange};
use sabot_kernel::state::snapshot::SnapshotWriter;
use sabot_kernel::state::{
    check_entry_size, read_portable, CaptureTarget, KeyGroupsSnapshot, Merge, StateBackend, StateCapture, StateError,
    StateId, Visit, VisitWhile, STATE_VALUE_SIZE_MAX,
};

use cache::{Cache, CacheValue, Cached};
use columns::{column_name, column_range, parse_column_name, prefix_end, ColumnRange, DEFAULT_COLUMN};
pub use native::NATIVE_EXTENSION;
use native::{KnownSsts, NativeCheckpoint, RocksCapture};

/// The size of one memtable, in bytes.
const WRITE_BUFFER_SIZE: usize = 8 << 20;
/// The memtables of all column families together, in bytes: beyond, RocksDB flushes the largest.
const DB_WRITE_BUFFER_SIZE: usize = 64 << 20;

/// Entries the write-back cache holds before it is written to RocksDB and emptied.
pub const CACHE_ENTRIES_MAX: usize = 256 * 1024;
/// The size of the block cache that the column families of a backend share, in bytes.
pub const BLOCK_CACHE_SIZE_DEFAULT: usize = 64 << 20;

/// How a backend is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RocksDbConfig {
    /// Entries the write-back cache holds before it is written out (at least 2).
    pub cache_entries_max: usize,
    /// The size of the LRU block cache of the backend's column families, in bytes.
    pub block_cache_size: usize,
}

impl Default for RocksDbConfig {
    fn default() -> RocksDbConfig {
        RocksDbConfig { cache_entries_max: CACHE_ENTRIES_MAX, block_cache_size: BLOCK_CACHE_SIZE_DEFAULT }
    }
}

/// A state the database holds: its name and column family, and whether it was declared (or
/// only found in a restored database).
#[derive(Clone, Debug)]
struct StateColumn {
    name: String,
    column: String,
    declared: bool,
}

pub struct RocksDbBackend {
    /// Always open, except while a restore replaces the database's files.
    db: Option<Arc<DB>>,
    /// The options of the database and of every column family.
    options: Options,
    block_cache: rocksdb::Cache,
    /// The states and their column families, by id. Empty: every key goes to the default one.
    states: BTreeMap<StateId, StateColumn>,
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
    /// Reused buffer for the cache key `key group | state key`.
    key: Vec<u8>,
    /// Reused buffer for a key as its column family stores it.
    stored: Vec<u8>,
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

/// Opens a database at `path` with `open`, retrying while its lock is held.
fn open_waiting_for_lock(path: &Path, open: impl Fn() -> Result<DB, rocksdb::Error>) -> Result<DB, StateError> {
    let started = std::time::Instant::now();
    loop {
        match open() {
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

/// The column families of the database at `path`: only the default one if there is none yet.
fn existing_columns(options: &Options, path: &Path) -> Result<Vec<String>, StateError> {
    match DB::list_cf(options, path) {
        Ok(columns) => Ok(columns),
        Err(_) if !path.join("CURRENT").exists() => Ok(vec![DEFAULT_COLUMN.to_string()]),
        Err(error) => Err(backend_error(path, error)),
    }
}

fn descriptors(columns: &[String], options: &Options) -> Vec<ColumnFamilyDescriptor> {
    columns.iter().map(|column| ColumnFamilyDescriptor::new(column, options.clone())).collect()
}

/// Opens (creating it if missing) the database at `path` with all its column families, and makes
/// `states` match it: states found only in an earlier database are forgotten, declared states
/// get a column family if the database has none, and the database's other states are adopted.
/// Refuses a database that holds a declared state's id under another name.
fn open_database(
    options: &Options,
    path: &Path,
    states: &mut BTreeMap<StateId, StateColumn>,
) -> Result<DB, StateError> {
    let columns = existing_columns(options, path)?;
    let mut db =
        open_waiting_for_lock(path, || DB::open_cf_descriptors(options, path, descriptors(&columns, options)))?;
    states.retain(|_, state| state.declared);
    for column in &columns {
        let parsed = parse_column_name(column).map_err(|reason| {
            StateError::Backend(format!("rocksdb at {}: {reason}: not a sabot state database", path.display()))
        })?;
        let Some((id, name)) = parsed else { continue };
        match states.get(&id) {
            Some(state) if state.column == *column => {}
            Some(state) => {
                return Err(StateError::Declaration(format!(
                    "the database at {} holds state {} as {name:?}, but it is declared as {:?}",
                    path.display(),
                    id.0,
                    state.name
                )))
            }
            None => {
                states.insert(id, StateColumn { name: name.to_string(), column: column.clone(), declared: false });
            }
        }
    }
    for state in states.values().filter(|state| !columns.contains(&state.column)) {
        db.create_cf(&state.column, options).map_err(|error| backend_error(path, error))?;
    }
    check_layout(&db, path, states)?;
    Ok(db)
}

/// Refuses a database that holds entries both with and without states.
fn check_layout(db: &DB, path: &Path, states: &BTreeMap<StateId, StateColumn>) -> Result<(), StateError> {
    if states.is_empty() {
        return Ok(());
    }
    let default = db.cf_handle(DEFAULT_COLUMN).expect("the default column family is open");
    let mut iterator = db.raw_iterator_cf(default);
    iterator.seek_to_first();
    iterator.status().map_err(|error| backend_error(path, error))?;
    if iterator.valid() {
        let names: Vec<&str> = states.values().map(|state| state.name.as_str()).collect();
        return Err(StateError::Incompatible(format!(
            "the database at {} holds entries without a declared state beside states {names:?}: \
             restore state written with the same state declarations",
            path.display()
        )));
    }
    Ok(())
}

/// The options of the database and of each of its column families: all share `block_cache`.
fn database_options(block_cache: &rocksdb::Cache) -> Options {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.set_compression_type(DBCompressionType::None);
    // Small memtables keep the skip list shallow and in cache; most state is short-lived
    // (a window's entries die when it fires), so most of it never leaves the memtable.
    options.set_write_buffer_size(WRITE_BUFFER_SIZE);
    options.set_max_write_buffer_number(4);
    options.set_db_write_buffer_size(DB_WRITE_BUFFER_SIZE);
    // Most reads look for an entry that is not there yet (a key's first record in a window):
    // bloom filters in memtables and files answer those without a search.
    options.set_memtable_whole_key_filtering(true);
    options.set_memtable_prefix_bloom_ratio(0.1);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(block_cache);
    table.set_bloom_filter(10.0, false);
    options.set_block_based_table_factory(&table);
    options
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

/// Entries an import or a restore writes per batch.
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
        Self::open_with(path, range, RocksDbConfig::default())
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
        Self::open_empty_with(path, range, RocksDbConfig { cache_entries_max, ..RocksDbConfig::default() })
    }

    /// As [`RocksDbBackend::open_empty`], set up by `config`.
    pub fn open_empty_with(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
        config: RocksDbConfig,
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
        Self::open_with(path, range, config)
    }

    /// As [`RocksDbBackend::open`], with a write-back cache of `cache_entries_max` entries (at least 2).
    pub fn open_with_cache(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
        cache_entries_max: usize,
    ) -> Result<RocksDbBackend, StateError> {
        Self::open_with(path, range, RocksDbConfig { cache_entries_max, ..RocksDbConfig::default() })
    }

    /// Opens (creating it if missing) the database at `path` for the key groups in `range`, with
    /// all its column families: the states they hold are the backend's from now on.
    pub fn open_with(
        path: impl Into<PathBuf>,
        range: KeyGroupRange,
        config: RocksDbConfig,
    ) -> Result<RocksDbBackend, StateError> {
        let cache_entries_max = config.cache_entries_max;
        assert!(cache_entries_max >= 2, "cache of {cache_entries_max} entries");
        let path = path.into();
        let block_cache = rocksdb::Cache::new_lru_cache(config.block_cache_size);
        let options = database_options(&block_cache);
        let mut states = BTreeMap::new();
        let db = open_database(&options, &path, &mut states)?;
        let mut write_options = WriteOptions::default();
        write_options.disable_wal(true);
        Ok(RocksDbBackend {
            db: Some(Arc::new(db)),
            options,
            block_cache,
            states,
            frozen: Vec::new(),
            pending: Vec::new(),
            instance: instance_id(),
            known: Arc::new(Mutex::new(BTreeMap::new())),
            cache: Cache::default(),
            cache_entries_max,
            path,
            range,
            write_options,
            key: Vec::with_capacity(64),
            stored: Vec::with_capacity(64),
            merged: Vec::with_capacity(64),
        })
    }

    /// The bytes the block cache holds now.
    pub fn block_cache_usage(&self) -> usize {
        self.block_cache.get_usage()
    }

    /// The states the database holds, by id, with their names: declared or restored.
    pub fn states(&self) -> Vec<(StateId, String)> {
        self.states.iter().map(|(id, state)| (*id, state.name.clone())).collect()
    }

    /// Builds the cache key `key group | state key` in `self.key`. A key of no known state, once
    /// there are states, is a bug in the caller.
    #[inline]
    fn full_key(&mut self, key_group: KeyGroup, key: &[u8]) -> &[u8] {
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        if !self.states.is_empty() {
            let known = StateId::of_key(key).is_some_and(|id| self.states.contains_key(&id));
            assert!(known, "state key {key:?} starts with no declared state's id ({:?})", self.states());
        }
        self.key.clear();
        self.key.extend_from_slice(&prefix(key_group));
        self.key.extend_from_slice(key);
        &self.key
    }

    /// Checks that a state key read from outside (a snapshot, a checkpoint's delta) belongs to a
    /// known state, as [`RocksDbBackend::full_key`] asserts for keys from the caller.
    fn check_state_key(&self, key: &[u8], source: &str) -> Result<(), StateError> {
        if self.states.is_empty() || StateId::of_key(key).is_some_and(|id| self.states.contains_key(&id)) {
            return Ok(());
        }
        Err(StateError::Incompatible(format!(
            "{source} holds key {key:?}, of no state this backend declares ({:?}): declare every state before \
             restoring",
            self.states()
        )))
    }

    /// The column family of the entry with cache key `key`, and (in `stored`) its key there.
    fn locate(&self, key: &[u8], stored: &mut Vec<u8>) -> &ColumnFamily {
        stored.clear();
        let column = if self.states.is_empty() {
            stored.extend_from_slice(key);
            DEFAULT_COLUMN
        } else {
            stored.extend_from_slice(&key[..2]);
            stored.extend_from_slice(&key[4..]);
            let id = StateId(u16::from_be_bytes([key[2], key[3]]));
            &self.states.get(&id).expect("a key of a known state").column
        };
        self.column(column)
    }

    fn column(&self, name: &str) -> &ColumnFamily {
        self.db().cf_handle(name).expect("the column family of every known state is open")
    }

    /// The column families in key order, each with the prefix of the state keys it holds.
    fn columns_in_order(&self) -> Vec<(Option<[u8; 2]>, &ColumnFamily)> {
        if self.states.is_empty() {
            return vec![(None, self.column(DEFAULT_COLUMN))];
        }
        self.states.iter().map(|(id, state)| (Some(id.prefix()), self.column(&state.column))).collect()
    }

    /// Every column family, the default one included.
    fn all_columns(&self) -> Vec<&ColumnFamily> {
        let mut columns = vec![self.column(DEFAULT_COLUMN)];
        columns.extend(self.states.values().map(|state| self.column(&state.column)));
        columns
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

    /// Creates the column family of state `id` and records the state.
    fn create_column(&mut self, id: StateId, name: &str, declared: bool) -> Result<(), StateError> {
        self.settle()?;
        let column = column_name(id, name);
        let db = Arc::get_mut(self.db.as_mut().expect("the database is open"))
            .expect("no checkpoint holds the database once its RocksDB part is settled");
        db.create_cf(&column, &self.options).map_err(|error| backend_error(&self.path, error))?;
        self.states.insert(id, StateColumn { name: name.to_string(), column, declared });
        Ok(())
    }

    /// Whether `column` holds an entry with a key in `[from, to)`.
    fn holds_any(&self, column: &ColumnFamily, from: &[u8], to: &[u8]) -> Result<bool, StateError> {
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(to);
        let mut iterator = self.db().raw_iterator_cf_opt(column, read_options);
        iterator.seek(from);
        iterator.status().map_err(|error| self.error(error))?;
        Ok(iterator.valid())
    }

    /// Whether entries were written without declared states (which declaring one would hide).
    fn holds_undeclared_entries(&self) -> Result<bool, StateError> {
        if !self.frozen.is_empty() || self.cache.iter().any(|(_, cached)| cached.dirty || cached.value.is_some()) {
            return Ok(true);
        }
        self.holds_any(self.column(DEFAULT_COLUMN), &[], &[0xff, 0xff, 0xff])
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
        self.db = Some(Arc::new(open_database(&self.options, &self.path, &mut self.states)?));
        self.instance = instance_id();
        let known = checkpoint.map(NativeCheckpoint::shared).unwrap_or_default();
        self.known = Arc::new(Mutex::new(known));
        Ok(())
    }

    /// Writes a native checkpoint's delta (what its cache held) over RocksDB, for this backend's
    /// key groups.
    fn apply_delta(&mut self, checkpoint: &NativeCheckpoint) -> Result<(), StateError> {
        let mut batch = rocksdb::WriteBatch::default();
        let mut stored = Vec::new();
        for (key, value) in &checkpoint.delta {
            let key_group = KeyGroup(u16::from_be_bytes([key[0], key[1]]));
            if !self.range.contains(key_group) || !checkpoint.range.contains(key_group) {
                continue;
            }
            self.check_state_key(&key[2..], "a rocksdb checkpoint's delta")?;
            let column = self.locate(key, &mut stored);
            match value {
                Some(value) => batch.put_cf(column, &stored, value),
                None => batch.delete_cf(column, &stored),
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

    /// Copies this backend's key groups of every column family of the database in `dir` (opened
    /// read-only), adopting the states it holds that this backend does not know yet.
    fn import_from(&mut self, dir: &Path, range: KeyGroupRange) -> Result<(), StateError> {
        let columns = DB::list_cf(&self.options, dir).map_err(|e| backend_error(dir, e))?;
        let source = DB::open_cf_descriptors_read_only(&self.options, dir, descriptors(&columns, &self.options), false)
            .map_err(|e| backend_error(dir, e))?;
        let (start, end) = (self.range.start().max(range.start()), self.range.end().min(range.end()));
        for column in &columns {
            let parsed = parse_column_name(column).map_err(|reason| StateError::Corrupt {
                what: format!("rocksdb checkpoint in {}: {reason}", dir.display()),
            })?;
            if let Some((id, name)) = parsed {
                match self.states.get(&id) {
                    Some(state) if state.column == *column => {}
                    Some(state) => {
                        return Err(StateError::Declaration(format!(
                            "the checkpoint in {} holds state {} as {name:?}, but it is declared as {:?}",
                            dir.display(),
                            id.0,
                            state.name
                        )))
                    }
                    None => self.create_column(id, name, false)?,
                }
            }
            let from = source.cf_handle(column).expect("opened with every column family");
            self.copy_groups(&source, from, column, start, end).map_err(|e| backend_error(dir, e))?;
        }
        Ok(())
    }

    /// Copies the key groups `[start, end)` of column family `from` of `source` into this
    /// database's column family of the same name, in batches.
    fn copy_groups(
        &self,
        source: &DB,
        from: &ColumnFamily,
        column: &str,
        start: u16,
        end: u16,
    ) -> Result<(), rocksdb::Error> {
        let to = self.column(column);
        let mut read_options = ReadOptions::default();
        read_options.set_iterate_upper_bound(group_bound(u32::from(end)));
        // A one-off pass: keep the block cache for the state that is read.
        read_options.fill_cache(false);
        let mut iterator = source.raw_iterator_cf_opt(from, read_options);
        iterator.seek(prefix(KeyGroup(start)));
        let mut batch = rocksdb::WriteBatch::default();
        while iterator.valid() {
            batch.put_cf(to, iterator.key().expect("valid"), iterator.value().expect("valid"));
            if batch.len() >= IMPORT_BATCH_ENTRIES {
                self.db().write_opt(std::mem::take(&mut batch), &self.write_options)?;
            }
            iterator.next();
        }
        iterator.status()?;
        self.db().write_opt(batch, &self.write_options)
    }
}

/// A cached entry that differs from RocksDB: its state key, and its value (`None`: deleted).
type CachedChange<'a> = (&'a [u8], Option<&'a [u8]>);

fn as_change<'a>((key, cached): (&'a [u8], &'a Cached)) -> CachedChange<'a> {
    (&key[2..], cached.value.as_deref())
}

/// The changes of one cache in a range, in key order.
type Changes<'a> = std::iter::Peekable<Box<dyn Iterator<Item = CachedChange<'a>> + 'a>>;

/// The changes of several caches in a range, merged in key order as they are read (a scan that
/// stops early reads only what it visits): where caches share a key, the newest one's change.
struct MergedChanges<'a> {
    /// Oldest first; the live cache last.
    sources: Vec<Changes<'a>>,
}

impl<'a> Iterator for MergedChanges<'a> {
    type Item = CachedChange<'a>;

    fn next(&mut self) -> Option<CachedChange<'a>> {
        if let [only] = self.sources.as_mut_slice() {
            return only.next();
        }
        let key: &'a [u8] = self.sources.iter_mut().filter_map(|source| source.peek().map(|change| change.0)).min()?;
        let mut newest = None;
        for source in &mut self.sources {
            if let Some(change) = source.next_if(|change| change.0 == key) {
                newest = Some(change);
            }
        }
        newest
    }
}

impl RocksDbBackend {
    /// The dirty cached entries of `key_group` whose state keys are in `[from, to)` (`to`:
    /// `None` is the end of the group), in key order, read as the caller goes; a frozen cache's
    /// entry only where no newer cache holds the key.
    fn cached_changes(&self, key_group: KeyGroup, from: &[u8], to: Option<&[u8]>) -> MergedChanges<'_> {
        let lower = [&prefix(key_group), from].concat();
        let upper = match to {
            Some(to) => [&prefix(key_group), to].concat(),
            None => group_bound(u32::from(key_group.0) + 1),
        };
        if lower >= upper {
            return MergedChanges { sources: Vec::new() };
        }
        // A newer cache's entry of a key is dirty wherever an older one's is: it took that over.
        let sources = self
            .frozen
            .iter()
            .map(Arc::as_ref)
            .chain(std::iter::once(&self.cache))
            .map(|cache| {
                let range = (Bound::Included(lower.as_slice()), Bound::Excluded(upper.as_slice()));
                let changes: Box<dyn Iterator<Item = CachedChange<'_>> + '_> =
                    Box::new(cache.dirty_in(range.0, range.1).map(as_change));
                changes.peekable()
            })
            .collect();
        MergedChanges { sources }
    }

    /// Visits the entries of `key_group` with state keys in `[from, to)` (`to`: `None` is the end
    /// of the group) in ascending order, until `visit` returns `false`: RocksDB's (column family
    /// by column family, in id order), overridden by the caches' changes.
    fn visit_range(
        &self,
        key_group: KeyGroup,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut VisitWhile<'_>,
    ) -> Result<(), StateError> {
        let mut changes = self.cached_changes(key_group, from, to).peekable();
        let mut key = Vec::with_capacity(64);
        for (id, column) in self.columns_in_order() {
            let column_prefix: &[u8] = match &id {
                Some(id) => id,
                None => &[],
            };
            let (rest_from, rest_to) = match column_range(column_prefix, from, to) {
                ColumnRange::Rests { from, to } => (from, to),
                ColumnRange::Skip => continue,
                ColumnRange::Stop => break,
            };
            let mut read_options = ReadOptions::default();
            read_options.set_iterate_upper_bound(match rest_to {
                Some(rest_to) => [&prefix(key_group), rest_to].concat(),
                None => group_bound(u32::from(key_group.0) + 1),
            });
            let mut iterator = self.db().raw_iterator_cf_opt(column, read_options);
            iterator.seek([&prefix(key_group), rest_from].concat());
            while iterator.valid() {
                let (stored, value) = (iterator.key().expect("valid"), iterator.value().expect("valid"));
                assert_eq!(stored[..2], prefix(key_group), "rocksdb iterator left key group {}", key_group.0);
                key.clear();
                key.extend_from_slice(column_prefix);
                key.extend_from_slice(&stored[2..]);
                let mut shadowed = false;
                while let Some(&(cached_key, cached_value)) = changes.peek().filter(|(k, _)| *k <= key.as_slice()) {
                    changes.next();
                    if let Some(cached_value) = cached_value {
                        if !visit(cached_key, cached_value)? {
                            return Ok(());
                        }
                    }
                    shadowed = cached_key == key.as_slice();
                }
                if !shadowed && !visit(&key, value)? {
                    return Ok(());
                }
                iterator.next();
            }
            iterator.status().map_err(|e| self.error(e))?;
        }
        for (key, value) in changes {
            if let Some(value) = value {
                if !visit(key, value)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The cached entry of the key in `self.key`, read from a frozen cache or RocksDB on a miss.
    fn slot(&mut self) -> Result<cache::Slot<'_>, StateError> {
        if !self.cache.contains(&self.key) {
            self.make_room()?;
            let cached = self.load()?;
            self.cache.insert(&self.key, cached);
        }
        Ok(self.cache.slot(&self.key).expect("cached above"))
    }

    /// The entry of the key in `self.key` below the cache: a frozen cache's, or RocksDB's.
    fn load(&mut self) -> Result<Cached, StateError> {
        if let Some(frozen) = self.frozen.iter().rev().find_map(|frozen| frozen.get(&self.key)) {
            // Taken over from the frozen cache; the live entry shadows it from now on.
            return Ok(Cached::loaded(frozen.value.clone(), frozen.dirty, frozen.in_db, true));
        }
        let mut stored = std::mem::take(&mut self.stored);
        let column = self.locate(&self.key, &mut stored);
        let found = self.db().get_pinned_cf(column, &stored).map_err(|e| self.error(e))?;
        let value = found.map(|found| CacheValue::from_slice(&found));
        self.stored = stored;
        let in_db = value.is_some();
        Ok(Cached::loaded(value, false, in_db, false))
    }

    /// Sets the value of the key in `self.key` in the cache (`None`: delete), without reading it.
    fn write_cached(&mut self, value: Option<&[u8]>) -> Result<(), StateError> {
        if !self.cache.contains(&self.key) {
            self.make_room()?;
        }
        self.cache.slot_or_insert(&self.key, Cached::unread()).set(value);
        Ok(())
    }

    /// Keeps the cache under its bound: first drops what RocksDB already agrees with and holds no
    /// value (absent keys), then, if the cache is still half full, writes it out.
    fn make_room(&mut self) -> Result<(), StateError> {
        if self.cache.len() < self.cache_entries_max {
            return Ok(());
        }
        let keep = |cached: &Cached| cached.dirty || cached.value.is_some();
        if self.cache.iter().filter(|(_, cached)| keep(cached)).count() >= self.cache_entries_max / 2 {
            return self.flush();
        }
        self.cache.keep_only(keep, self.cache_entries_max);
        Ok(())
    }

    /// Writes every dirty cached entry (frozen caches first, the newest entry of each key) to
    /// RocksDB in one batch, each to its column family, and empties the caches. A delete of a
    /// key RocksDB never held writes nothing: state that lived only in caches never costs a
    /// RocksDB write.
    fn flush(&mut self) -> Result<(), StateError> {
        self.settle()?;
        let mut batch = rocksdb::WriteBatch::default();
        let frozen = std::mem::take(&mut self.frozen);
        let caches: Vec<&Cache> = frozen.iter().map(Arc::as_ref).chain(std::iter::once(&self.cache)).collect();
        let mut stored = Vec::new();
        for (index, cache) in caches.iter().enumerate() {
            for (key, cached) in cache.dirty() {
                if caches[index + 1..].iter().any(|newer| newer.contains(key)) {
                    continue;
                }
                match &cached.value {
                    Some(value) => batch.put_cf(self.locate(key, &mut stored), &stored, value),
                    None if cached.in_db => batch.delete_cf(self.locate(key, &mut stored), &stored),
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

    /// Creates the state's column family, or reuses the one a restored database holds.
    fn declare_state(&mut self, id: StateId, name: &str, _ordered: bool) -> Result<(), StateError> {
        if let Some(state) = self.states.get_mut(&id) {
            if state.name != name {
                let how = if state.declared { "declared" } else { "restored" };
                return Err(StateError::Declaration(format!(
                    "state id {} is {how} as {:?}, not {name:?}",
                    id.0, state.name
                )));
            }
            state.declared = true;
            return Ok(());
        }
        if self.states.is_empty() {
            if self.holds_undeclared_entries()? {
                // They live in the default column family, where keys of states are not looked for.
                return Err(StateError::Declaration(format!(
                    "state {name:?} declared after entries were written without declared states: declare \
                     states first"
                )));
            }
            // Only absent entries are cached: they say nothing about the state's column family.
            self.cache.clear();
        }
        self.create_column(id, name, true)
    }

    fn get(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        self.full_key(key_group, key);
        match self.slot()?.value() {
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
        let mut slot = self.slot()?;
        let result = merge(slot.value(), &mut merged).and_then(|()| check_entry_size(key, &merged));
        if result.is_ok() {
            slot.set(Some(&merged));
        }
        self.merged = merged;
        result
    }

    fn delete(&mut self, key_group: KeyGroup, key: &[u8]) -> Result<(), StateError> {
        self.full_key(key_group, key);
        self.write_cached(None)
    }

    /// Extends the cached value in place (reading RocksDB only if the key is not cached).
    fn append(&mut self, key_group: KeyGroup, key: &[u8], bytes: &[u8]) -> Result<(), StateError> {
        check_entry_size(key, bytes)?;
        self.full_key(key_group, key);
        let mut slot = self.slot()?;
        let size = slot.value().map_or(0, <[u8]>::len) + bytes.len();
        if size > STATE_VALUE_SIZE_MAX {
            return Err(StateError::ValueTooLarge { size });
        }
        slot.append(bytes);
        Ok(())
    }

    fn take(&mut self, key_group: KeyGroup, key: &[u8], value: &mut Vec<u8>) -> Result<bool, StateError> {
        value.clear();
        self.full_key(key_group, key);
        let Some(stored) = self.slot()?.take() else {
            return Ok(false);
        };
        value.extend_from_slice(&stored);
        Ok(true)
    }

    fn scan(&mut self, key_group: KeyGroup, visit: &mut Visit<'_>) -> Result<(), StateError> {
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        self.visit_range(key_group, &[], None, &mut |key, value| {
            visit(key, value)?;
            Ok(true)
        })
    }

    /// Iterates only the column family and key range asked for (RocksDB iterator bounds), merged
    /// with the caches' changes in that range.
    fn scan_range(
        &mut self,
        key_group: KeyGroup,
        prefix: &[u8],
        from: &[u8],
        visit: &mut VisitWhile<'_>,
    ) -> Result<(), StateError> {
        assert!(self.range.contains(key_group), "key group {} outside {:?}", key_group.0, self.range);
        let to = prefix_end(prefix);
        let from = if from > prefix { from } else { prefix };
        if to.as_deref().is_some_and(|to| from >= to) {
            return Ok(());
        }
        self.visit_range(key_group, from, to.as_deref(), visit)
    }

    /// Merges RocksDB's entries with the caches' (nothing is written out).
    fn snapshot(&mut self) -> Result<KeyGroupsSnapshot, StateError> {
        let mut writer = SnapshotWriter::new();
        for key_group in self.range.iter() {
            self.visit_range(key_group, &[], None, &mut |key, value| {
                writer.add(key_group, key, value);
                Ok(true)
            })?;
        }
        Ok(writer.finish())
    }

    /// Replaces this backend's key groups in every column family; each entry goes to its
    /// state's column family.
    fn restore(&mut self, snapshot: &KeyGroupsSnapshot) -> Result<(), StateError> {
        self.settle()?;
        self.cache.clear();
        self.frozen.clear();
        let mut batch = rocksdb::WriteBatch::default();
        // Everything of this backend's groups goes: [start, end) as two-byte prefixes. Only where
        // there is something: a range tombstone slows every later read and scan over it until
        // compaction drops it, and a restore mostly starts from an empty database.
        let (start, end) = (prefix(KeyGroup(self.range.start())), group_bound(u32::from(self.range.end())));
        for column in self.all_columns() {
            if self.holds_any(column, &start, &end)? {
                batch.delete_range_cf(column, start.as_slice(), end.as_slice());
            }
        }
        let mut stored = Vec::new();
        for (key_group, key, value) in snapshot.entries_in(self.range) {
            check_entry_size(key, value)?;
            self.check_state_key(key, "the snapshot")?;
            self.full_key(key_group, key);
            batch.put_cf(self.locate(&self.key, &mut stored), &stored, value);
            if batch.len() >= IMPORT_BATCH_ENTRIES {
                self.db().write_opt(std::mem::take(&mut batch), &self.write_options).map_err(|e| self.error(e))?;
            }
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
        let live = Cache::with_capacity(self.cache.len());
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
    /// now on); otherwise (rescaling) the entries of this backend's groups are copied out of each,
    /// column family by column family. Either way the states the checkpoints hold are the
    /// backend's afterwards, beside the declared ones.
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
                self.apply_delta(only)?;
            }
            _ => {
                self.reopen_from(storage, None)?;
                self.restore(&portable)?;
                for (index, checkpoint) in natives.iter().enumerate() {
                    self.import(storage, checkpoint, index)?;
                    self.apply_delta(checkpoint)?;
                }
            }
        }
        check_layout(self.db(), &self.path, &self.states)
    }

    /// RocksDB's estimate of its live data and memtables (all column families), plus the cache's
    /// values.
    fn size_bytes(&self) -> u64 {
        let property = |column: &ColumnFamily, name: &str| {
            self.db().property_int_value_cf(column, name).ok().flatten().unwrap_or(0)
        };
        let stored: u64 = self
            .all_columns()
            .into_iter()
            .map(|column| {
                property(column, "rocksdb.estimate-live-data-size")
                    + property(column, "rocksdb.cur-size-all-mem-tables")
            })
            .sum();
        let cached: usize =
            self.cache.iter().filter_map(|(key, cached)| cached.value.as_ref().map(|v| key.len() + v.len())).sum();
        stored + cached as u64
    }
}
