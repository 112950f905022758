//! The manifest of a completed checkpoint, its byte format, making it durable, and finding the
//! latest usable one after a crash.
//!
//! # Storage layout
//! ```text
//! checkpoints/_manifest-<id, 20 digits>   the manifest of checkpoint <id>
//! checkpoints/chk-<id, 20 digits>/…       files the checkpoint owns (state, in-flight elements)
//! checkpoints/_latest                     pointer: the id of the latest completed checkpoint
//! checkpoints/_passed-over-<id, 20 digits> checkpoint <id> was passed over by a recovery that
//!                                         restored an older one: never a candidate again
//! ```
//! A checkpoint is complete exactly when `_latest` names it: [`persist`] writes and syncs the
//! manifest first, then replaces the pointer atomically and syncs its directory.
//!
//! Recovery never returns to a checkpoint it passed over: restoring an older checkpoint drops
//! the newer one's sink epochs (their pending files are deleted, and their names written again),
//! so [`sweep_before`] marks every newer checkpoint passed over, durably, before any task runs,
//! and [`find_latest`] passes over marked ones (a read that failed once may succeed later).
//!
//! # Manifest format, version 1 (integers little-endian)
//! ```text
//! magic "SBCM" | version u16 = 1 | body size u32 | body | crc32 (IEEE) of everything before it
//! body: checkpoint u64 | savepoint u8 (0 or 1) | max parallelism u16 | job str | task count u32
//!       per task: vertex u16 | index u16 | split count u32 | per split: split u64 | position u64
//!                 | file count u32 | files: str… | output count u32 | output: str…
//! str: size u16 | UTF-8 bytes (a valid storage path, except the job name)
//! ```
//! The pointer is `magic "SBCP" | checkpoint u64 | crc32`. Decoding checks everything and never
//! panics; a manifest that fails is skipped for an older one by [`find_latest`].

use crate::dataflow::{SplitPosition, SubtaskId, VertexId};
use crate::element::CheckpointId;
use crate::env::{validate_path, write_atomic, Storage, StorageError};

pub const MANIFEST_VERSION: u16 = 1;
const MANIFEST_MAGIC: &[u8; 4] = b"SBCM";
const POINTER_MAGIC: &[u8; 4] = b"SBCP";
/// Where checkpoints live in storage.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// The latest-checkpoint pointer.
pub const POINTER_PATH: &str = "checkpoints/_latest";
const MANIFEST_PREFIX: &str = "_manifest-";
const PASSED_OVER_PREFIX: &str = "_passed-over-";

/// Bounds on what a manifest may hold, checked when decoding bytes from outside.
const TASK_COUNT_MAX: u32 = 1 << 16;
const FILE_COUNT_MAX: u32 = 1 << 20;

/// What one task contributed to a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSnapshot {
    pub subtask: SubtaskId,
    /// For a source: where its splits stood when it emitted the barrier.
    pub source_positions: Vec<SplitPosition>,
    /// Files this checkpoint owns (state snapshots, in-flight data); deleted when it is discarded
    /// and no retained checkpoint shares them. Each ends with the CRC-32 of its other bytes.
    pub files: Vec<String>,
    /// For a sink: the pre-committed output of the epoch, committed when the checkpoint completes
    /// (or on recovery). Never deleted by discarding.
    pub pending_output: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u16,
    pub job: String,
    pub checkpoint: CheckpointId,
    pub savepoint: bool,
    pub max_parallelism: u16,
    /// By subtask, ascending.
    pub tasks: Vec<TaskSnapshot>,
}

/// Why bytes are not a manifest (or pointer). Names what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt checkpoint metadata: {0}")]
pub struct CorruptManifest(pub String);

/// The directory of checkpoint `id`.
pub fn checkpoint_dir(id: CheckpointId) -> String {
    format!("{CHECKPOINTS_DIR}/chk-{:020}", id.0)
}

/// Where the manifest of checkpoint `id` lives.
/// The directory of files that several checkpoints share (incremental state), each deleted once
/// no retained checkpoint refers to it.
pub fn shared_dir() -> String {
    format!("{CHECKPOINTS_DIR}/shared")
}

/// The directory of what tasks keep at their end of input (their final snapshots): files that
/// every checkpoint after a task finished carries, each deleted once no retained checkpoint
/// refers to it.
pub fn end_of_input_dir() -> String {
    format!("{CHECKPOINTS_DIR}/end-of-input")
}

pub fn manifest_path(id: CheckpointId) -> String {
    format!("{CHECKPOINTS_DIR}/{MANIFEST_PREFIX}{:020}", id.0)
}

/// The mark of a checkpoint a recovery passed over for an older one (see the module doc).
pub fn passed_over_path(id: CheckpointId) -> String {
    format!("{CHECKPOINTS_DIR}/{PASSED_OVER_PREFIX}{:020}", id.0)
}

/// The checkpoint ids of the names in the checkpoints directory that start with `prefix`.
fn ids_named(names: &[String], prefix: &str) -> Vec<CheckpointId> {
    names.iter().filter_map(|name| name.strip_prefix(prefix)?.parse().ok().map(CheckpointId)).collect()
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        let size = u16::try_from(s.len()).expect("manifest strings are checked to fit u16");
        self.u16(size);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn strs(&mut self, strings: &[String]) {
        self.u32(strings.len() as u32);
        strings.iter().for_each(|s| self.str(s));
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], CorruptManifest> {
        let end = self.at.checked_add(count).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| CorruptManifest(format!("truncated in {what} at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u8(&mut self, what: &str) -> Result<u8, CorruptManifest> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, CorruptManifest> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("two bytes")))
    }
    fn u32(&mut self, what: &str) -> Result<u32, CorruptManifest> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("four bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64, CorruptManifest> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("eight bytes")))
    }
    fn flag(&mut self, what: &str) -> Result<bool, CorruptManifest> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(CorruptManifest(format!("{what} is {other}, not 0 or 1"))),
        }
    }
    fn str(&mut self, what: &str) -> Result<String, CorruptManifest> {
        let size = usize::from(self.u16(what)?);
        let bytes = self.take(size, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CorruptManifest(format!("{what} is not UTF-8")))
    }
    fn paths(&mut self, what: &str) -> Result<Vec<String>, CorruptManifest> {
        let count = self.u32(what)?;
        if count > FILE_COUNT_MAX {
            return Err(CorruptManifest(format!("{count} {what}, more than {FILE_COUNT_MAX}")));
        }
        (0..count)
            .map(|_| {
                let path = self.str(what)?;
                validate_path(&path).map_err(|e| CorruptManifest(format!("{what}: {e}")))?;
                Ok(path)
            })
            .collect()
    }
}

impl Manifest {
    /// The manifest's bytes. Panics on strings too long for the format (they are built by Sabot).
    pub fn encode(&self) -> Vec<u8> {
        assert_eq!(self.version, MANIFEST_VERSION, "encoding a manifest of another version");
        let mut body = Writer(Vec::new());
        body.u64(self.checkpoint.0);
        body.u8(u8::from(self.savepoint));
        body.u16(self.max_parallelism);
        body.str(&self.job);
        body.u32(self.tasks.len() as u32);
        for task in &self.tasks {
            body.u16(task.subtask.vertex.0);
            body.u16(task.subtask.index);
            body.u32(task.source_positions.len() as u32);
            for position in &task.source_positions {
                body.u64(position.split);
                body.u64(position.position);
            }
            body.strs(&task.files);
            body.strs(&task.pending_output);
        }
        let mut out = Writer(Vec::with_capacity(body.0.len() + 14));
        out.0.extend_from_slice(MANIFEST_MAGIC);
        out.u16(MANIFEST_VERSION);
        out.u32(u32::try_from(body.0.len()).expect("manifest under 4 GiB"));
        out.0.extend_from_slice(&body.0);
        let crc = crc32fast::hash(&out.0);
        out.u32(crc);
        out.0
    }

    /// Decodes bytes read from storage; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, CorruptManifest> {
        if bytes.len() < 14 {
            return Err(CorruptManifest(format!("{} bytes, shorter than a manifest's frame", bytes.len())));
        }
        let (framed, crc_bytes) = bytes.split_at(bytes.len() - 4);
        let crc = u32::from_le_bytes(crc_bytes.try_into().expect("four bytes"));
        if crc32fast::hash(framed) != crc {
            return Err(CorruptManifest("checksum does not match the contents".into()));
        }
        let mut reader = Reader { bytes: framed, at: 0 };
        if reader.take(4, "magic")? != MANIFEST_MAGIC {
            return Err(CorruptManifest("no manifest magic \"SBCM\"".into()));
        }
        let version = reader.u16("version")?;
        if version != MANIFEST_VERSION {
            return Err(CorruptManifest(format!("format version {version}; this build reads {MANIFEST_VERSION}")));
        }
        let body_size = reader.u32("body size")? as usize;
        if body_size != framed.len() - reader.at {
            return Err(CorruptManifest(format!("body size {body_size} does not match the file")));
        }
        let checkpoint = CheckpointId(reader.u64("checkpoint")?);
        let savepoint = reader.flag("savepoint flag")?;
        let max_parallelism = reader.u16("max parallelism")?;
        let job = reader.str("job name")?;
        let task_count = reader.u32("task count")?;
        if task_count > TASK_COUNT_MAX {
            return Err(CorruptManifest(format!("{task_count} tasks, more than {TASK_COUNT_MAX}")));
        }
        let mut tasks = Vec::new();
        for _ in 0..task_count {
            let subtask = SubtaskId { vertex: VertexId(reader.u16("vertex")?), index: reader.u16("index")? };
            let position_count = reader.u32("split count")?;
            if position_count > FILE_COUNT_MAX {
                return Err(CorruptManifest(format!("{position_count} splits, more than {FILE_COUNT_MAX}")));
            }
            let source_positions = (0..position_count)
                .map(|_| Ok(SplitPosition { split: reader.u64("split")?, position: reader.u64("position")? }))
                .collect::<Result<Vec<_>, CorruptManifest>>()?;
            let files = reader.paths("files")?;
            let pending_output = reader.paths("pending output")?;
            if tasks.last().is_some_and(|last: &TaskSnapshot| last.subtask >= subtask) {
                return Err(CorruptManifest(format!("tasks out of order at {subtask}")));
            }
            tasks.push(TaskSnapshot { subtask, source_positions, files, pending_output });
        }
        if reader.at != framed.len() {
            return Err(CorruptManifest(format!("{} bytes after the last task", framed.len() - reader.at)));
        }
        Ok(Manifest { version, job, checkpoint, savepoint, max_parallelism, tasks })
    }
}

fn encode_pointer(id: CheckpointId) -> Vec<u8> {
    let mut bytes = POINTER_MAGIC.to_vec();
    bytes.extend_from_slice(&id.0.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Decodes the latest-checkpoint pointer (bytes from storage: never panics).
pub fn decode_pointer(bytes: &[u8]) -> Result<CheckpointId, CorruptManifest> {
    if bytes.len() != 16 || &bytes[..4] != POINTER_MAGIC {
        return Err(CorruptManifest(format!("latest-checkpoint pointer of {} bytes is malformed", bytes.len())));
    }
    let crc = u32::from_le_bytes(bytes[12..].try_into().expect("four bytes"));
    if crc32fast::hash(&bytes[..12]) != crc {
        return Err(CorruptManifest("latest-checkpoint pointer checksum does not match".into()));
    }
    Ok(CheckpointId(u64::from_le_bytes(bytes[4..12].try_into().expect("eight bytes"))))
}

/// Makes `manifest` durable and its checkpoint the latest: manifest written and synced, its
/// directory synced, then the pointer replaced atomically and the checkpoints directory synced.
/// When this returns `Ok`, the checkpoint is complete; on `Err` it is not (the pointer still names
/// the previous one, or, if the crash hit the final directory sync, possibly this one: both are
/// complete checkpoints).
pub fn persist(storage: &mut dyn Storage, manifest: &Manifest) -> Result<(), StorageError> {
    let path = manifest_path(manifest.checkpoint);
    storage.write(&path, &manifest.encode())?;
    storage.sync_file(&path)?;
    storage.sync_dir(CHECKPOINTS_DIR)?;
    write_atomic(storage, POINTER_PATH, &encode_pointer(manifest.checkpoint))
}

/// The outcome of looking for the checkpoint to restore from.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The latest usable completed checkpoint; `None` when there has never been one.
    pub manifest: Option<Manifest>,
    /// Checkpoints passed over, newest first, each with the reason (for the log).
    pub skipped: Vec<(CheckpointId, String)>,
    /// Why the latest-checkpoint pointer could not be used, if it could not.
    pub pointer_problem: Option<String>,
}

impl Recovery {
    /// The highest checkpoint id recovery saw: the restored one, or a newer one it passed over.
    /// The next attempt's checkpoints must come after it ([`Coordinator::continue_after`]): a
    /// passed-over manifest stays on disk, and reusing its id would let its old manifest name
    /// the new attempt's files (a mix of two cuts that each pass their checksums).
    ///
    /// [`Coordinator::continue_after`]: crate::checkpoint::coordinator::Coordinator::continue_after
    pub fn checkpoint_id_max(&self) -> Option<CheckpointId> {
        let restored = self.manifest.as_ref().map(|m| m.checkpoint);
        restored.into_iter().chain(self.skipped.iter().map(|(id, _)| *id)).max()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecoveryError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no usable checkpoint of job {job:?}: {}; refusing to start rather than lose or repeat output", describe(.skipped, .pointer_problem))]
    NoUsableCheckpoint { job: String, skipped: Vec<(CheckpointId, String)>, pointer_problem: Option<String> },
    #[error(
        "job {job:?} cannot restore checkpoint {}: newer checkpoint {} committed output it does not name ({file}), \
         so restoring it would repeat that output; the newer checkpoint could not be read (see the checkpoints \
         recovery passed over) and is the only one that can go on: nothing was changed, retry once it reads again",
        .restored.0, .newer.0
    )]
    NewerOutputCommitted { job: String, restored: CheckpointId, newer: CheckpointId, file: String },
}

fn describe(skipped: &[(CheckpointId, String)], pointer_problem: &Option<String>) -> String {
    let checkpoints = skipped.iter().map(|(id, reason)| format!("checkpoint {} {reason}", id.0));
    pointer_problem
        .iter()
        .map(|p| format!("the pointer is unusable ({p})"))
        .chain(checkpoints)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `bytes` end with the CRC-32 (IEEE, little-endian) of the bytes before it: the convention
/// every file a checkpoint owns follows (state snapshots, operator metadata), so that recovery can
/// check them all without knowing their formats.
pub fn ends_with_its_checksum(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && {
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        crc32fast::hash(body).to_le_bytes() == crc
    }
}

/// Loads checkpoint `id` of `job` if it is intact (manifest, and every file it names); the `Err`
/// says what is wrong with it.
pub fn load(storage: &mut dyn Storage, job: &str, id: CheckpointId) -> Result<Manifest, String> {
    check_candidate(storage, job, id)
}

/// Checks one candidate: its manifest decodes, belongs to `job`, and every file it names exists
/// and is intact.
fn check_candidate(storage: &mut dyn Storage, job: &str, id: CheckpointId) -> Result<Manifest, String> {
    let bytes = storage.read(&manifest_path(id)).map_err(|e| format!("has no readable manifest ({e})"))?;
    let manifest = Manifest::decode(&bytes).map_err(|e| format!("has a {e}"))?;
    if manifest.checkpoint != id {
        return Err(format!("holds the manifest of checkpoint {}", manifest.checkpoint.0));
    }
    if manifest.job != job {
        return Err(format!("belongs to job {:?}", manifest.job));
    }
    let shared = format!("{}/", shared_dir());
    let mut listed: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for file in manifest.tasks.iter().flat_map(|t| t.files.iter()) {
        let (dir, name) = file.rsplit_once('/').unwrap_or(("", file));
        if !listed.contains_key(dir) {
            let names = storage.list(dir).map_err(|e| format!("cannot list {dir:?} ({e})"))?;
            listed.insert(dir.to_string(), names.into_iter().collect());
        }
        if !listed[dir].contains(name) {
            return Err(format!("misses its file {file:?}"));
        }
        // Shared files are in formats of their own (RocksDB's SST files): the state file that
        // names them holds their sizes and checksums, which the restore checks as it reads them.
        if file.starts_with(&shared) {
            continue;
        }
        let bytes = storage.read(file).map_err(|e| format!("cannot read its file {file:?} ({e})"))?;
        if !ends_with_its_checksum(&bytes) {
            return Err(format!("has a damaged file {file:?} (its checksum does not match)"));
        }
    }
    Ok(manifest)
}

/// Prepares storage for a restore from `restored`. First it marks every checkpoint of `job`
/// newer than `restored` passed over, durably: the restore drops their sink epochs, so no later
/// recovery may return to them (they stay on disk for inspection, and a savepoint among them can
/// still be loaded by id). Left unmarked are newer checkpoints whose manifest does not read (a
/// failed read may succeed later). A newer checkpoint that committed output `restored` does not
/// name refuses the restore ([`RecoveryError::NewerOutputCommitted`]) before anything is written
/// or deleted: restoring would repeat that output, and the restore's sinks would drop the newer
/// checkpoint's still-pending files, which only it can commit when a later recovery reads it.
/// Then it deletes what retention would have deleted had the previous process lived on: the
/// periodic checkpoints of `job` older than `restored` (their manifests, marks and the files no
/// other remaining checkpoint names), and the files in the shared directories of the remaining
/// checkpoints that none of them names (uploads of checkpoints that never completed). Savepoints,
/// other jobs' checkpoints and unreadable manifests are left alone. Call it before any task runs.
/// Returns what it deleted.
pub fn sweep_before(storage: &mut dyn Storage, job: &str, restored: &Manifest) -> Result<Vec<String>, RecoveryError> {
    let names = storage.list(CHECKPOINTS_DIR)?;
    let marked = ids_named(&names, PASSED_OVER_PREFIX);
    let mut remaining = vec![restored.clone()];
    let mut discarded = Vec::new();
    let mut to_mark = Vec::new();
    for id in ids_named(&names, MANIFEST_PREFIX) {
        if id == restored.checkpoint {
            continue;
        }
        let Ok(manifest) =
            storage.read(&manifest_path(id)).map_err(|_| ()).and_then(|b| Manifest::decode(&b).map_err(|_| ()))
        else {
            continue;
        };
        if id > restored.checkpoint && manifest.job == job && !marked.contains(&id) {
            if let Some(file) = output_committed_beyond(storage, &manifest, restored)? {
                return Err(RecoveryError::NewerOutputCommitted {
                    job: job.to_string(),
                    restored: restored.checkpoint,
                    newer: id,
                    file,
                });
            }
            to_mark.push(id);
        }
        if manifest.job == job && !manifest.savepoint && id < restored.checkpoint {
            discarded.push(manifest);
        } else {
            remaining.push(manifest);
        }
    }
    for id in &to_mark {
        let path = passed_over_path(*id);
        storage.write(&path, format!("passed over for checkpoint {}\n", restored.checkpoint.0).as_bytes())?;
        storage.sync_file(&path)?;
    }
    if !to_mark.is_empty() {
        storage.sync_dir(CHECKPOINTS_DIR)?;
    }
    let named: std::collections::BTreeSet<&String> =
        remaining.iter().flat_map(|m| m.tasks.iter()).flat_map(|t| t.files.iter()).collect();
    let mut deleted = Vec::new();
    for manifest in &discarded {
        for file in manifest.tasks.iter().flat_map(|t| t.files.iter()).filter(|f| !named.contains(f)) {
            if storage.delete(file).is_ok() {
                deleted.push(file.clone());
            }
        }
        let path = manifest_path(manifest.checkpoint);
        storage.delete(&path)?;
        deleted.push(path);
        if marked.contains(&manifest.checkpoint) {
            let mark = passed_over_path(manifest.checkpoint);
            storage.delete(&mark)?;
            deleted.push(mark);
        }
    }
    let shared = format!("{}/", shared_dir());
    let dirs: std::collections::BTreeSet<&str> =
        named.iter().filter(|f| f.starts_with(&shared)).map(|f| crate::env::parent_dir(f)).collect();
    for dir in dirs {
        for name in storage.list(dir)? {
            let path = format!("{dir}/{name}");
            if !named.contains(&path) {
                storage.delete(&path)?;
                deleted.push(path);
            }
        }
    }
    Ok(deleted)
}

/// A committed file of output that `newer` names for commit and `restored` does not: file sink
/// handles `<dir>/.pending/<file>` whose `<dir>/<file>` exists (other sinks' handles are not
/// files, and count as not committed).
fn output_committed_beyond(
    storage: &mut dyn Storage,
    newer: &Manifest,
    restored: &Manifest,
) -> Result<Option<String>, StorageError> {
    let named: std::collections::BTreeSet<&String> = restored.tasks.iter().flat_map(|t| &t.pending_output).collect();
    let mut listed: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for handle in newer.tasks.iter().flat_map(|t| &t.pending_output).filter(|h| !named.contains(h)) {
        let Some((pending, file)) = handle.rsplit_once('/') else { continue };
        let Some(dir) = pending.strip_suffix("/.pending") else { continue };
        if !listed.contains_key(dir) {
            listed.insert(dir.to_string(), storage.list(dir)?);
        }
        if listed[dir].iter().any(|name| name == file) {
            return Ok(Some(format!("{dir}/{file}")));
        }
    }
    Ok(None)
}

/// The highest checkpoint id storage holds a manifest of, or that the pointer names (whether
/// or not it is usable): a new attempt numbers its checkpoints after it
/// ([`Coordinator::continue_after`]), whichever checkpoint or savepoint it restored, so that no
/// manifest left on disk can ever name a later attempt's files.
///
/// [`Coordinator::continue_after`]: crate::checkpoint::coordinator::Coordinator::continue_after
pub fn newest_checkpoint_id(storage: &mut dyn Storage) -> Result<Option<CheckpointId>, StorageError> {
    let listed = storage
        .list(CHECKPOINTS_DIR)?
        .iter()
        .filter_map(|name| name.strip_prefix(MANIFEST_PREFIX)?.parse().ok().map(CheckpointId))
        .max();
    let pointed = match storage.read(POINTER_PATH) {
        Ok(bytes) => decode_pointer(&bytes).ok(),
        Err(StorageError::NotFound { .. }) => None,
        Err(error) => return Err(error),
    };
    Ok(listed.max(pointed).filter(|id| *id < CheckpointId::END_OF_INPUT))
}

/// Finds the latest completed checkpoint of `job` that is intact, passing over corrupt or partial
/// ones, and ones an earlier recovery passed over ([`sweep_before`] marked them). Checkpoints
/// newer than the pointer never completed and are passed over, and so are all of them when there
/// is no pointer: [`persist`] writes it atomically and nothing deletes it, so without it no
/// checkpoint ever completed (the manifest of the first was durable, its pointer was not), and
/// the job starts fresh. If the pointer itself is unreadable, every checkpoint with a valid
/// manifest is a candidate. With checkpoints but none usable the job must not start.
pub fn find_latest(storage: &mut dyn Storage, job: &str) -> Result<Recovery, RecoveryError> {
    let names = storage.list(CHECKPOINTS_DIR)?;
    let mut ids = ids_named(&names, MANIFEST_PREFIX);
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let marked = ids_named(&names, PASSED_OVER_PREFIX);
    let (latest, pointer_problem) = match storage.read(POINTER_PATH) {
        Ok(bytes) => match decode_pointer(&bytes) {
            Ok(id) => (Some(id), None),
            Err(error) => (None, Some(error.to_string())),
        },
        Err(StorageError::NotFound { .. }) => (None, None),
        Err(error) => return Err(error.into()),
    };
    let mut skipped = Vec::new();
    if let Some(latest) = latest.filter(|latest| !ids.contains(latest)) {
        skipped.push((latest, "is named by the latest-checkpoint pointer but has no manifest".into()));
    }
    let no_pointer = latest.is_none() && pointer_problem.is_none();
    for id in ids {
        if latest.is_some_and(|latest| id > latest) {
            skipped.push((id, "is newer than the latest-checkpoint pointer: it never completed".into()));
            continue;
        }
        if no_pointer {
            skipped.push((id, "never completed: no latest-checkpoint pointer was ever written".into()));
            continue;
        }
        if marked.contains(&id) {
            skipped.push((id, "was passed over by an earlier recovery, which restored an older checkpoint".into()));
            continue;
        }
        match check_candidate(storage, job, id) {
            Ok(manifest) => return Ok(Recovery { manifest: Some(manifest), skipped, pointer_problem }),
            Err(reason) => skipped.push((id, reason)),
        }
    }
    if no_pointer {
        return Ok(Recovery { manifest: None, skipped, pointer_problem });
    }
    Err(RecoveryError::NoUsableCheckpoint { job: job.to_string(), skipped, pointer_problem })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStorage;

    fn manifest(id: u64, files: &[&str]) -> Manifest {
        let subtask = |vertex, index| SubtaskId { vertex: VertexId(vertex), index };
        Manifest {
            version: MANIFEST_VERSION,
            job: "w2".into(),
            checkpoint: CheckpointId(id),
            savepoint: id % 2 == 0,
            max_parallelism: 128,
            tasks: vec![
                TaskSnapshot {
                    subtask: subtask(0, 0),
                    source_positions: vec![SplitPosition { split: 3 << 32 | 1, position: id * 100 }],
                    files: vec![],
                    pending_output: vec![],
                },
                TaskSnapshot {
                    subtask: subtask(1, 0),
                    source_positions: vec![],
                    files: files.iter().map(|f| f.to_string()).collect(),
                    pending_output: vec!["output/w2/.pending/part-1".into()],
                },
            ],
        }
    }

    /// Writes a checkpoint with its files as a completed one.
    fn complete(storage: &mut MemStorage, id: u64) -> Manifest {
        let file = format!("{}/state-1-0", checkpoint_dir(CheckpointId(id)));
        // As a task does before it acknowledges: its files are durable.
        let mut bytes = b"state".to_vec();
        bytes.extend_from_slice(&crc32fast::hash(b"state").to_le_bytes());
        storage.write(&file, &bytes).unwrap();
        storage.sync_file(&file).unwrap();
        storage.sync_dir(&checkpoint_dir(CheckpointId(id))).unwrap();
        let manifest = manifest(id, &[&file]);
        persist(storage, &manifest).unwrap();
        manifest
    }

    // Goal: a manifest reads back as written; every bit flip and truncation is caught, never a panic.
    #[test]
    fn manifest_round_trip_and_corruption() {
        let original = manifest(7, &["checkpoints/chk-00000000000000000007/a", "shared/sst-1"]);
        let bytes = original.encode();
        assert_eq!(Manifest::decode(&bytes), Ok(original));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(Manifest::decode(&flipped).is_err(), "bit {bit}");
        }
        for length in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..length]).is_err(), "length {length}");
        }
    }

    // Goal: recovery takes the latest complete checkpoint; passes over a corrupt manifest, a
    // missing state file and a checkpoint newer than the pointer, saying why; starts fresh with
    // no checkpoint; refuses to start when checkpoints exist but none is usable.
    #[test]
    fn find_latest_skips_what_is_unusable() {
        let mut storage = MemStorage::new();
        assert_eq!(
            find_latest(&mut storage, "w2"),
            Ok(Recovery { manifest: None, skipped: vec![], pointer_problem: None })
        );
        let first = complete(&mut storage, 1);
        let second = complete(&mut storage, 2);
        assert_eq!(find_latest(&mut storage, "w2").unwrap().manifest, Some(second.clone()));
        // Checkpoint 3: manifest durable, pointer not yet moved (crash in between): not complete.
        storage.write(&manifest_path(CheckpointId(3)), &manifest(3, &[]).encode()).unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(second));
        assert!(recovery.skipped[0].1.contains("never completed"), "{:?}", recovery.skipped);
        // Checkpoint 2's state file lost: fall back to 1.
        storage.delete(&format!("{}/state-1-0", checkpoint_dir(CheckpointId(2)))).unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(first));
        assert!(recovery.skipped.iter().any(|(id, why)| id.0 == 2 && why.contains("misses its file")));
        // Checkpoint 1's manifest corrupted too: nothing usable, and the error says why for each.
        let path = manifest_path(CheckpointId(1));
        let mut bytes = storage.read(&path).unwrap();
        bytes[20] ^= 0x10;
        storage.write(&path, &bytes).unwrap();
        let error = find_latest(&mut storage, "w2").unwrap_err().to_string();
        assert!(error.contains("refusing to start"), "{error}");
        assert!(error.contains("checkpoint 2 misses its file"), "{error}");
        assert!(error.contains("checkpoint 1 has a corrupt checkpoint metadata: checksum"), "{error}");
    }

    // Goal (regression, found by the simulator: `sim/tests/regressions.rs`,
    // `checkpoint_ids_never_repeat_after_a_passed_over_checkpoint`): when recovery passes over
    // the newest checkpoint (a read failed, or its file is damaged), the next attempt's
    // checkpoint ids start after it. Reusing its id let its old manifest, which the pointer still
    // names, be restored later with some of its files rewritten by the new attempt: two cuts
    // mixed, each file intact. Method: checkpoint 3 passed over; a coordinator continuing after
    // the recovery triggers checkpoint 4 first.
    #[test]
    fn checkpoint_ids_continue_after_a_passed_over_checkpoint() {
        use crate::checkpoint::coordinator::{Action, Coordinator, CoordinatorConfig};
        let mut storage = MemStorage::new();
        complete(&mut storage, 2);
        complete(&mut storage, 3);
        let file = format!("{}/state-1-0", checkpoint_dir(CheckpointId(3)));
        storage.write(&file, b"damaged").unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest.as_ref().map(|m| m.checkpoint), Some(CheckpointId(2)));
        assert_eq!(recovery.checkpoint_id_max(), Some(CheckpointId(3)));
        let config = CoordinatorConfig { interval_ms: 1, timeout_ms: 100, concurrent_max: 1, retained_count: 1 };
        let tasks = recovery.manifest.as_ref().unwrap().tasks.iter().map(|t| t.subtask);
        let mut coordinator = Coordinator::new(config, "w2", 128, tasks, recovery.manifest.clone());
        coordinator.continue_after(recovery.checkpoint_id_max().unwrap());
        coordinator.handle_timeout(crate::time::Instant(0));
        assert!(
            matches!(coordinator.poll_action(), Some(Action::Trigger { checkpoint: CheckpointId(4), .. })),
            "the first checkpoint after recovery is 4"
        );
        assert_eq!(
            Recovery { manifest: None, skipped: vec![], pointer_problem: None }.checkpoint_id_max(),
            None,
            "a job that never checkpointed starts at 1"
        );
    }

    // Goal: the drivers' floor for new checkpoint ids covers every manifest on disk, usable or
    // not, and a pointer that names a checkpoint without a manifest; none when nothing is there.
    #[test]
    fn newest_checkpoint_id_covers_every_manifest_and_the_pointer() {
        let mut storage = MemStorage::new();
        assert_eq!(newest_checkpoint_id(&mut storage).unwrap(), None);
        complete(&mut storage, 2);
        complete(&mut storage, 5);
        storage.write(&manifest_path(CheckpointId(5)), b"damaged").unwrap();
        assert_eq!(newest_checkpoint_id(&mut storage).unwrap(), Some(CheckpointId(5)));
        storage.write(POINTER_PATH, &encode_pointer(CheckpointId(9))).unwrap();
        assert_eq!(newest_checkpoint_id(&mut storage).unwrap(), Some(CheckpointId(9)));
        storage.write(POINTER_PATH, b"garbage").unwrap();
        assert_eq!(newest_checkpoint_id(&mut storage).unwrap(), Some(CheckpointId(5)));
    }

    // Goal: a damaged pointer does not hide intact checkpoints; persisting survives a crash.
    #[test]
    fn damaged_pointer_falls_back_to_scanning() {
        let mut storage = MemStorage::new();
        complete(&mut storage, 4);
        let latest = complete(&mut storage, 5);
        storage.crash();
        assert_eq!(find_latest(&mut storage, "w2").unwrap().manifest, Some(latest.clone()));
        storage.write(POINTER_PATH, b"garbage").unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(latest));
        assert!(recovery.pointer_problem.is_some());
        let error = find_latest(&mut storage, "other-job").unwrap_err().to_string();
        assert!(error.contains("belongs to job \"w2\""), "{error}");
    }

    // Goal: after a restart, what the previous process's retention would have deleted goes:
    // older periodic checkpoints and their unshared files, and shared files nothing names; a
    // savepoint, a newer checkpoint and the files they name stay.
    #[test]
    fn sweep_before_deletes_what_retention_would_have() {
        let mut storage = MemStorage::new();
        let shared = |n: &str| format!("{}/w/{n}.sst", shared_dir());
        let checkpoint = |id: u64, savepoint: bool, files: Vec<String>| Manifest {
            version: MANIFEST_VERSION,
            job: "job".into(),
            checkpoint: CheckpointId(id),
            savepoint,
            max_parallelism: 128,
            tasks: vec![TaskSnapshot {
                subtask: SubtaskId { vertex: VertexId(1), index: 0 },
                source_positions: vec![],
                files,
                pending_output: vec![],
            }],
        };
        let manifests = [
            checkpoint(1, true, vec![shared("a"), "checkpoints/chk-1/s".into()]),
            checkpoint(2, false, vec![shared("a"), shared("b"), "checkpoints/chk-2/s".into()]),
            checkpoint(3, false, vec![shared("b"), shared("c"), "checkpoints/chk-3/s".into()]),
            checkpoint(4, false, vec![shared("c"), shared("d"), "checkpoints/chk-4/s".into()]),
        ];
        for manifest in &manifests {
            for file in &manifest.tasks[0].files {
                storage.write(file, b"x").unwrap();
            }
            storage.write(&manifest_path(manifest.checkpoint), &manifest.encode()).unwrap();
        }
        storage.write(&shared("orphan"), b"x").unwrap();
        let mut deleted = sweep_before(&mut storage, "job", &manifests[2]).unwrap();
        deleted.sort();
        let mut expected = vec!["checkpoints/chk-2/s".to_string(), manifest_path(CheckpointId(2)), shared("orphan")];
        expected.sort();
        assert_eq!(deleted, expected);
        for kept in [shared("a"), shared("b"), shared("c"), shared("d"), manifest_path(CheckpointId(4))] {
            assert!(storage.read(&kept).is_ok(), "{kept} stays");
        }
        assert!(storage.read(&passed_over_path(CheckpointId(4))).is_ok(), "the newer checkpoint is passed over");
    }

    // Goal (regression, found by the `cluster` fuzz target: `sim/tests/regressions.rs`,
    // `a_first_checkpoint_that_never_completed_is_passed_over`): the first checkpoint's manifest
    // was durable but writing the pointer failed; the checkpoint was aborted and its files
    // deleted, and every restart refused to start ('misses its file') though no checkpoint had
    // ever completed and nothing was damaged. Method: a manifest without a pointer, its file
    // gone or intact: the job starts fresh either way, saying why it passes over the checkpoint,
    // and numbers its checkpoints after it; a pointer that does not read still makes every
    // manifest a candidate.
    #[test]
    fn without_a_pointer_no_checkpoint_completed() {
        let mut storage = MemStorage::new();
        let file = format!("{}/state-1-0", checkpoint_dir(CheckpointId(1)));
        let first = manifest(1, &[&file]);
        let mut state = b"state".to_vec();
        state.extend_from_slice(&crc32fast::hash(b"state").to_le_bytes());
        storage.write(&file, &state).unwrap();
        storage.write(&manifest_path(CheckpointId(1)), &first.encode()).unwrap();
        for file_present in [true, false] {
            if !file_present {
                storage.delete(&file).unwrap();
            }
            let recovery = find_latest(&mut storage, "w2").unwrap();
            assert_eq!(recovery.manifest, None, "file present: {file_present}");
            assert_eq!(recovery.skipped.len(), 1);
            assert!(recovery.skipped[0].1.contains("no latest-checkpoint pointer"), "{:?}", recovery.skipped);
            assert_eq!(recovery.checkpoint_id_max(), Some(CheckpointId(1)));
        }
        storage.write(&file, &state).unwrap();
        storage.write(POINTER_PATH, b"garbage").unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(first));
        assert!(recovery.pointer_problem.is_some());
    }

    // Goal (regression, found by the simulator: `sim/tests/regressions.rs`,
    // `recovery_never_returns_to_a_passed_over_checkpoint`): a recovery passed over the newest
    // checkpoint (a read of one of its files failed) and restored an older one, whose sinks
    // dropped the newer one's epochs (pending files deleted); that attempt failed too, and the
    // next recovery read the newer checkpoint without error and restored it: its output was gone,
    // and every restart failed on the missing file (had the older attempt run on, it would have
    // written new output under the same names: wrong rows committed). Method: checkpoint 3's
    // file damaged, recovery restores 2 and sweeps; the file readable again, recovery still
    // restores 2 and says why it passes over 3, which stays loadable by id; a checkpoint whose
    // output is committed is not passed over for good; a sweep from a later checkpoint deletes 3
    // with its mark.
    #[test]
    fn recovery_never_returns_to_a_passed_over_checkpoint() {
        let mut storage = MemStorage::new();
        let restored = complete(&mut storage, 2);
        complete(&mut storage, 3);
        let file = format!("{}/state-1-0", checkpoint_dir(CheckpointId(3)));
        let intact = storage.read(&file).unwrap();
        storage.write(&file, b"damaged").unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(restored.clone()));
        sweep_before(&mut storage, "w2", &restored).unwrap();
        storage.crash();
        assert!(storage.read(&passed_over_path(CheckpointId(3))).is_ok(), "the mark is durable");
        // The read that failed succeeds now: recovery still does not return to checkpoint 3.
        storage.write(&file, &intact).unwrap();
        let recovery = find_latest(&mut storage, "w2").unwrap();
        assert_eq!(recovery.manifest, Some(restored.clone()));
        assert!(
            recovery.skipped.iter().any(|(id, why)| id.0 == 3 && why.contains("passed over by an earlier recovery")),
            "{:?}",
            recovery.skipped
        );
        assert_eq!(recovery.checkpoint_id_max(), Some(CheckpointId(3)));
        assert_eq!(load(&mut storage, "w2", CheckpointId(3)).map(|m| m.checkpoint), Ok(CheckpointId(3)));
        // Checkpoint 4's output is partly committed (the process died while committing it), and a
        // read of its file fails: the restore from 2 is refused before anything changes (the
        // restore's sinks would drop 4's pending file), so 4 stays a candidate for the next
        // recovery, which commits the rest of its output.
        let mut fourth = manifest(4, &[&file]);
        fourth.tasks[1].pending_output = vec!["output/w2/.pending/part-4".into(), "output/w2/.pending/part-5".into()];
        persist(&mut storage, &fourth).unwrap();
        storage.write("output/w2/part-4", b"rows").unwrap();
        storage.write("output/w2/.pending/part-5", b"rows").unwrap();
        storage.write(&file, b"damaged").unwrap();
        assert_eq!(find_latest(&mut storage, "w2").unwrap().manifest, Some(restored.clone()));
        let listed = |storage: &mut MemStorage| {
            [CHECKPOINTS_DIR, "output/w2", "output/w2/.pending"].map(|dir| storage.list(dir).unwrap())
        };
        let before = listed(&mut storage);
        let error = sweep_before(&mut storage, "w2", &restored).unwrap_err();
        assert_eq!(
            error,
            RecoveryError::NewerOutputCommitted {
                job: "w2".into(),
                restored: CheckpointId(2),
                newer: CheckpointId(4),
                file: "output/w2/part-4".into(),
            }
        );
        assert!(error.to_string().contains("retry once it reads again"), "{error}");
        assert_eq!(listed(&mut storage), before, "a refused sweep marks and deletes nothing");
        storage.write(&file, &intact).unwrap();
        assert_eq!(find_latest(&mut storage, "w2").unwrap().manifest, Some(fourth));
        // A sweep from a later checkpoint (2 is a savepoint, and stays) deletes 3 with its mark.
        let later = complete(&mut storage, 5);
        assert_eq!(find_latest(&mut storage, "w2").unwrap().manifest, Some(later.clone()));
        let deleted = sweep_before(&mut storage, "w2", &later).unwrap();
        assert!(deleted.contains(&passed_over_path(CheckpointId(3))), "{deleted:?}");
        assert!(deleted.contains(&manifest_path(CheckpointId(3))), "{deleted:?}");
        assert!(storage.read(&manifest_path(CheckpointId(2))).is_ok(), "the savepoint stays");
    }
}
