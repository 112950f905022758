//! Sinks that commit exactly once through two-phase commit, and the file sink built on them.
//!
//! [`TransactionalSink`] is what a user implements for their own system: write rows into an open
//! transaction, pre-commit it (durable, invisible) when a barrier closes the epoch, commit it
//! (idempotently) when the checkpoint completes, and recover after a restart. [`TwoPhaseCommitSink`]
//! runs any of them as an operator and keeps the protocol: which pre-committed transactions a
//! completed checkpoint covers, what a restored checkpoint still has to commit.
//!
//! The file sink ([`FileTransactions`]) writes output in chunks to
//! `output/<sink>/.pending/part-<vertex>-<subtask>-<sequence>.arrow`; a transaction is the epoch's
//! files, committed by renaming them into `output/<sink>/` and syncing the directories. Readers read
//! only `output/<sink>/part-*.arrow`, so nothing is visible before its commit. On recovery from
//! checkpoint n it commits n's files (a rename is idempotent: a file already moved is left as it
//! is), deletes its later pending files (their epochs never completed), and refuses to go on if it
//! finds committed files of its own beyond n (a newer checkpoint committed them and was lost:
//! replaying would repeat them).
//!
//! A job without checkpoints commits once, at end of input. With checkpoints, the end of input is
//! pre-committed as `CheckpointId::END_OF_INPUT` and committed by the job's final checkpoint.

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, SchemaRef};

use super::graph::SubtaskId;
use super::{
    read_u64_file, u64_file_bytes, write_u64_file, Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot,
};
use crate::checkpoint::manifest::{checkpoint_dir, TaskSnapshot};
use crate::element::CheckpointId;
use crate::env::{parent_dir, write_atomic, Storage, StorageError};

/// Rows per pending file: bounds the memory a sink holds before it writes.
pub const SINK_CHUNK_ROWS_MAX: usize = 64 * 1024;

/// A system that takes output in transactions: what a user implements for exactly-once output.
///
/// Transactions are named by handles (strings) that checkpoints keep. `commit` may be called again
/// for handles it already committed (after a crash between commit and its acknowledgement), and
/// must then change nothing.
pub trait TransactionalSink: Send {
    fn name(&self) -> &str;
    /// Adds rows to the open transaction; nothing is visible yet.
    fn write(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError>;
    /// Closes the open transaction: durable but not visible. Returns its handles as
    /// `pending_output`, and as `files` whatever else the checkpoint must keep for this sink.
    fn pre_commit(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError>;
    /// Makes the transactions named by `handles` visible, in order; idempotent.
    fn commit(&mut self, context: &mut Context<'_>, handles: &[String]) -> Result<(), OperatorError>;
    /// After a restart from a checkpoint whose transactions were just committed: `snapshots` are
    /// what every subtask of the sink kept for it. Drop what later, never-completed epochs left.
    fn recover(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError>;
}

impl TransactionalSink for Box<dyn TransactionalSink> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn write(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        (**self).write(context, batch)
    }
    fn pre_commit(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        (**self).pre_commit(context, checkpoint)
    }
    fn commit(&mut self, context: &mut Context<'_>, handles: &[String]) -> Result<(), OperatorError> {
        (**self).commit(context, handles)
    }
    fn recover(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        (**self).recover(context, snapshots)
    }
}

/// Makes the transactional sink of one subtask.
#[derive(Clone)]
pub struct SinkFactory(pub std::sync::Arc<dyn Fn(SubtaskId) -> Box<dyn TransactionalSink> + Send + Sync>);

impl SinkFactory {
    pub fn new(make: impl Fn(SubtaskId) -> Box<dyn TransactionalSink> + Send + Sync + 'static) -> SinkFactory {
        SinkFactory(std::sync::Arc::new(make))
    }
}

/// Runs a [`TransactionalSink`] as an operator, exactly once.
pub struct TwoPhaseCommitSink<S> {
    inner: S,
    /// Pre-committed transactions waiting for their checkpoint, oldest first.
    prepared: Vec<(CheckpointId, Vec<String>)>,
    metrics: OperatorMetrics,
}

impl<S: TransactionalSink> TwoPhaseCommitSink<S> {
    pub fn new(inner: S) -> TwoPhaseCommitSink<S> {
        TwoPhaseCommitSink { inner, prepared: Vec::new(), metrics: OperatorMetrics::default() }
    }

    fn commit_up_to(&mut self, context: &mut Context<'_>, checkpoint: CheckpointId) -> Result<(), OperatorError> {
        let ready = self.prepared.iter().take_while(|(id, _)| *id <= checkpoint).count();
        let handles: Vec<String> = self.prepared.drain(..ready).flat_map(|(_, handles)| handles).collect();
        if !handles.is_empty() {
            self.inner.commit(context, &handles)?;
        }
        if checkpoint == CheckpointId::END_OF_INPUT {
            self.metrics.records_out = self.metrics.records_in;
        }
        Ok(())
    }
}

impl<S: TransactionalSink> Operator for TwoPhaseCommitSink<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        self.metrics.records_in += batch.num_rows() as u64;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.inner.write(context, batch)
    }

    /// The sink is the end of the stream: watermarks stop here.
    fn on_watermark(
        &mut self,
        _context: &mut Context<'_>,
        _watermark: crate::time::EventTime,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    /// Without checkpoints, commits everything now; with them, the final snapshot pre-commits it.
    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        if !context.checkpointing {
            self.on_barrier(context, CheckpointId::END_OF_INPUT)?;
            self.commit_up_to(context, CheckpointId::END_OF_INPUT)?;
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        let mut snapshot = self.inner.pre_commit(context, checkpoint)?;
        self.prepared.push((checkpoint, snapshot.pending_output.clone()));
        if planted!(SinkCommitsEarly) && checkpoint != CheckpointId::END_OF_INPUT {
            self.commit_up_to(context, checkpoint)?;
        }
        // The checkpoint commits every epoch prepared up to it, also those of earlier checkpoints
        // that never completed (subsumed, or their completion not here yet): it names them all,
        // so that a restore from it commits them all.
        snapshot.pending_output = self.prepared.iter().flat_map(|(_, handles)| handles.iter().cloned()).collect();
        Ok(snapshot)
    }

    fn on_checkpoint_complete(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<(), OperatorError> {
        self.commit_up_to(context, checkpoint)
    }

    /// Commits every transaction the restored checkpoint holds (whatever subtask, at whatever
    /// parallelism, pre-committed it: committing twice changes nothing), then lets the sink recover.
    fn restore(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        let handles: Vec<String> = snapshots.iter().flat_map(|s| s.pending_output.iter().cloned()).collect();
        if !handles.is_empty() && !planted!(RecoveryForgetsCommit) {
            self.inner.commit(context, &handles)?;
        }
        self.inner.recover(context, snapshots)
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}

/// The file sink: exactly-once Arrow IPC files.
pub type FileSink = TwoPhaseCommitSink<FileTransactions>;

impl FileSink {
    pub fn new_files(name: &str, subtask: SubtaskId) -> FileSink {
        TwoPhaseCommitSink::new(FileTransactions::new(name, subtask))
    }
}

/// The file sink's transactions: an epoch's staged files.
pub struct FileTransactions {
    name: String,
    subtask: SubtaskId,
    buffered: Vec<RecordBatch>,
    buffered_rows: usize,
    /// Pending file names (in `.pending/`) of the open epoch.
    pending: Vec<String>,
    file_sequence: u64,
}

impl FileTransactions {
    pub fn new(name: &str, subtask: SubtaskId) -> FileTransactions {
        FileTransactions {
            name: name.to_string(),
            subtask,
            buffered: Vec::new(),
            buffered_rows: 0,
            pending: Vec::new(),
            file_sequence: 0,
        }
    }

    pub fn validate_name(name: &str) -> Result<(), String> {
        let good = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !name.starts_with('-');
        if good {
            Ok(())
        } else {
            Err(format!("sink name {name:?} must be 1 to 64 of [A-Za-z0-9_-], not starting with '-'"))
        }
    }

    /// The directory of a sink's committed files.
    pub fn committed_dir(name: &str) -> String {
        format!("output/{name}")
    }

    fn pending_dir(&self) -> String {
        format!("output/{}/.pending", self.name)
    }

    /// The prefix of this subtask's file names.
    fn file_prefix(&self) -> String {
        format!("part-{:05}-{:05}-", self.subtask.vertex.0, self.subtask.index)
    }

    /// The file of a checkpoint that records this sink's next file sequence number.
    fn sequence_file_name(&self) -> String {
        format!("sink-{:05}-{:05}-{}.sequence", self.subtask.vertex.0, self.subtask.index, self.name)
    }

    fn file_sequence_of(&self, file: &str) -> Option<u64> {
        file.strip_prefix(&self.file_prefix())?.strip_suffix(".arrow")?.parse().ok()
    }

    fn write_pending(&mut self, storage: &mut dyn Storage) -> Result<(), OperatorError> {
        if self.buffered.is_empty() {
            return Ok(());
        }
        let file = format!("{}{:08}.arrow", self.file_prefix(), self.file_sequence);
        self.file_sequence += 1;
        let bytes = encode_ipc_file(&self.buffered[0].schema(), &self.buffered)?;
        storage.write(&format!("{}/{file}", self.pending_dir()), &bytes)?;
        self.pending.push(file);
        self.buffered.clear();
        self.buffered_rows = 0;
        Ok(())
    }
}

impl TransactionalSink for FileTransactions {
    fn name(&self) -> &str {
        &self.name
    }

    fn write(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        self.buffered_rows += batch.num_rows();
        self.buffered.push(batch);
        if self.buffered_rows >= SINK_CHUNK_ROWS_MAX {
            self.write_pending(context.storage)?;
        }
        Ok(())
    }

    /// Writes and syncs the epoch's files, and records the next file sequence number.
    fn pre_commit(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        self.write_pending(context.storage)?;
        let pending_dir = self.pending_dir();
        let files: Vec<String> = std::mem::take(&mut self.pending);
        for file in &files {
            context.storage.sync_file(&format!("{pending_dir}/{file}"))?;
        }
        if !files.is_empty() {
            context.storage.sync_dir(&pending_dir)?;
        }
        let pending_output = files.iter().map(|file| format!("{pending_dir}/{file}")).collect();
        // The final snapshot is carried by every later checkpoint: its file is shared by them, in
        // a directory of its own that retention leaves alone. A sink restored from its final
        // snapshot writes the same file again when it ends, while the restored checkpoint names
        // it: replaced atomically, a power loss leaves it whole (with the same contents).
        if checkpoint == CheckpointId::END_OF_INPUT {
            let path = format!("{}/{}", crate::checkpoint::manifest::end_of_input_dir(), self.sequence_file_name());
            write_atomic(context.storage, &path, &u64_file_bytes(self.file_sequence))?;
            return Ok(OperatorSnapshot { files: vec![path], pending_output, writes: Vec::new() });
        }
        let dir = checkpoint_dir(checkpoint);
        let path = format!("{dir}/{}", self.sequence_file_name());
        write_u64_file(context.storage, &path, self.file_sequence)?;
        context.storage.sync_dir(&dir)?;
        Ok(OperatorSnapshot { files: vec![path], pending_output, writes: Vec::new() })
    }

    /// Commits this sink's handles among `handles` (a subtask may hold several sinks: an
    /// operator's side output beside the job's sink).
    fn commit(&mut self, context: &mut Context<'_>, handles: &[String]) -> Result<(), OperatorError> {
        let own = format!("{}/", self.pending_dir());
        let handles: Vec<String> = handles.iter().filter(|handle| handle.starts_with(&own)).cloned().collect();
        Ok(commit_files(context.storage, &Self::committed_dir(&self.name), &handles)?)
    }

    /// Restores the file sequence, checks that nothing of its own beyond the checkpoint was
    /// committed, and only then drops this subtask's later pending files (a refused restore
    /// leaves them to the newer checkpoint that can commit them).
    fn recover(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        let own = snapshots.iter().find(|s| s.subtask == self.subtask);
        let suffix = format!("/{}", self.sequence_file_name());
        let sequence_file = own.and_then(|s| s.files.iter().find(|f| f.ends_with(&suffix)));
        self.file_sequence = match sequence_file {
            Some(path) => read_u64_file(context.storage, path)?,
            None => 0,
        };
        let committed_dir = Self::committed_dir(&self.name);
        let beyond: Vec<String> = context
            .storage
            .list(&committed_dir)?
            .into_iter()
            .filter(|file| self.file_sequence_of(file).is_some_and(|sequence| sequence >= self.file_sequence))
            .collect();
        if !beyond.is_empty() {
            return Err(OperatorError::Protocol(format!(
                "{}: committed files {beyond:?} come after the checkpoint being restored (a newer checkpoint \
                 committed them and is lost); restoring would repeat their rows, so the job stops",
                self.name
            )));
        }
        for file in context.storage.list(&self.pending_dir())? {
            if self.file_sequence_of(&file).is_some() {
                context.storage.delete(&format!("{}/{file}", self.pending_dir()))?;
            }
        }
        Ok(())
    }
}

/// Moves pre-committed files (paths in a `.pending` directory) into `committed_dir`, durably.
/// A file already moved (its pending path gone, its committed name present) is not an error, so
/// that committing after a crash may repeat a commit that had partly happened.
fn commit_files(storage: &mut dyn Storage, committed_dir: &str, paths: &[String]) -> Result<(), StorageError> {
    if paths.is_empty() {
        return Ok(());
    }
    for path in paths {
        let name = path.rsplit('/').next().expect("a file name");
        match storage.rename(path, &format!("{committed_dir}/{name}")) {
            Ok(()) => {}
            Err(error @ StorageError::NotFound { .. }) => {
                if !storage.list(committed_dir)?.iter().any(|n| n == name) {
                    return Err(error);
                }
            }
            Err(error) => return Err(error),
        }
    }
    storage.sync_dir(committed_dir)?;
    storage.sync_dir(parent_dir(&paths[0]))
}

/// Encodes batches as one Arrow IPC file.
pub fn encode_ipc_file(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    // Sized up front: growing a multi-megabyte buffer by doubling copies it again and again.
    let capacity = 4096 + batches.iter().map(RecordBatch::get_array_memory_size).sum::<usize>();
    let mut writer = arrow_ipc::writer::FileWriter::try_new(Vec::with_capacity(capacity), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

/// Decodes an Arrow IPC file (bytes from outside: errors, never panics).
pub fn decode_ipc_file(bytes: Vec<u8>) -> Result<Vec<RecordBatch>, ArrowError> {
    // What Arrow's reader takes on trust (it would panic on it) is checked first.
    crate::ipc::check_file(&bytes)?;
    let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)?;
    reader.collect()
}

/// Reads every committed batch of the sink `name`, file by file in name order.
pub fn read_committed(storage: &mut dyn Storage, name: &str) -> Result<Vec<RecordBatch>, OperatorError> {
    let dir = FileTransactions::committed_dir(name);
    let mut batches = Vec::new();
    for file in storage.list(&dir)? {
        if file.starts_with("part-") && file.ends_with(".arrow") {
            let bytes = storage.read(&format!("{dir}/{file}"))?;
            batches.extend(decode_ipc_file(bytes).map_err(|e| {
                OperatorError::Malformed(format!("committed file {dir}/{file} is not a readable Arrow IPC file: {e}"))
            })?);
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStorage;
    use crate::time::Instant;

    use crate::dataflow::graph::VertexId;
    use crate::testing::w1_rows;

    fn rows_batch(rows: &[(u64, i64)]) -> RecordBatch {
        let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![
            arrow_schema::Field::new("key", arrow_schema::DataType::UInt64, false),
            arrow_schema::Field::new("ts_ms", arrow_schema::DataType::Int64, false),
        ]));
        let keys = arrow_array::UInt64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>());
        let times = arrow_array::Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        RecordBatch::try_new(schema, vec![std::sync::Arc::new(keys), std::sync::Arc::new(times)]).unwrap()
    }

    fn committed(storage: &mut MemStorage) -> Vec<(u64, i64)> {
        w1_rows(&read_committed(storage, "s").unwrap())
    }

    // Goal: two-phase commit: a barrier pre-commits its epoch (synced, invisible), completion of
    // a checkpoint commits every epoch up to it, and after a crash the restore commits the restored
    // checkpoint's output once, drops later epochs, and refuses to repeat output committed beyond
    // it, deleting nothing when it refuses.
    #[test]
    fn two_phase_commit_and_recovery() {
        let subtask = SubtaskId { vertex: VertexId(2), index: 0 };
        let mut storage = MemStorage::new();
        let mut out = Vec::new();
        let mut sink = FileSink::new_files("s", subtask);
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        sink.on_batch(&mut context, rows_batch(&[(1, 1), (2, 2)])).unwrap();
        let first = sink.on_barrier(&mut context, CheckpointId(1)).unwrap();
        assert_eq!(first.pending_output.len(), 1);
        sink.on_batch(&mut context, rows_batch(&[(3, 3)])).unwrap();
        let second = sink.on_barrier(&mut context, CheckpointId(2)).unwrap();
        sink.on_batch(&mut context, rows_batch(&[(4, 4)])).unwrap();
        sink.on_end(&mut context).unwrap();
        assert_eq!(committed(&mut storage), vec![], "nothing visible before a checkpoint completes");
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        sink.on_checkpoint_complete(&mut context, CheckpointId(1)).unwrap();
        assert_eq!(committed(&mut storage), vec![(1, 1), (2, 2)]);

        // Crash: checkpoint 2 never completed. Restore from 1, twice (a crash during recovery).
        storage.crash();
        let snapshot = TaskSnapshot {
            subtask,
            source_positions: vec![],
            files: first.files.clone(),
            pending_output: first.pending_output.clone(),
        };
        for _ in 0..2 {
            let mut restored = FileSink::new_files("s", subtask);
            let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
            restored.restore(&mut context, std::slice::from_ref(&snapshot)).unwrap();
            assert_eq!(committed(&mut storage), vec![(1, 1), (2, 2)]);
            assert_eq!(storage.list("output/s/.pending").unwrap(), Vec::<String>::new(), "later epochs dropped");
        }

        // Had checkpoint 2 committed and been lost, restoring from 1 would repeat (3, 3): refused.
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        let mut sink = FileSink::new_files("s", subtask);
        sink.restore(&mut context, std::slice::from_ref(&snapshot)).unwrap();
        sink.on_batch(&mut context, rows_batch(&[(3, 3)])).unwrap();
        sink.on_barrier(&mut context, CheckpointId(2)).unwrap();
        sink.on_checkpoint_complete(&mut context, CheckpointId(2)).unwrap();
        // Checkpoint 3's epoch is pre-committed, and only checkpoint 3 can commit it: the refused
        // restore leaves its pending file alone.
        sink.on_batch(&mut context, rows_batch(&[(4, 4)])).unwrap();
        let third = sink.on_barrier(&mut context, CheckpointId(3)).unwrap();
        let mut again = FileSink::new_files("s", subtask);
        let error = again.restore(&mut context, &[snapshot]).unwrap_err().to_string();
        assert!(error.contains("come after the checkpoint being restored"), "{error}");
        assert_eq!(third.pending_output.len(), 1);
        assert!(context.storage.read(&third.pending_output[0]).is_ok(), "a refused restore deletes nothing");
        assert!(second.files[0].ends_with(".sequence"));

        // A sink restored from its final snapshot (taken at the end of input) commits that last
        // output and knows its sequence: nothing it committed counts as beyond the checkpoint.
        let mut storage = MemStorage::new();
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        let mut sink = FileSink::new_files("s", subtask);
        sink.on_batch(&mut context, rows_batch(&[(5, 5)])).unwrap();
        let epoch = sink.on_barrier(&mut context, CheckpointId(1)).unwrap();
        sink.on_checkpoint_complete(&mut context, CheckpointId(1)).unwrap();
        sink.on_batch(&mut context, rows_batch(&[(6, 6)])).unwrap();
        sink.on_end(&mut context).unwrap();
        let last = sink.on_barrier(&mut context, CheckpointId::END_OF_INPUT).unwrap();
        assert_eq!(last.pending_output.len(), 1);
        let final_snapshot =
            TaskSnapshot { subtask, source_positions: vec![], files: last.files, pending_output: last.pending_output };
        let mut restored = FileSink::new_files("s", subtask);
        restored.restore(&mut context, std::slice::from_ref(&final_snapshot)).unwrap();
        assert_eq!(committed(&mut storage), vec![(5, 5), (6, 6)]);
        assert_eq!(epoch.files.len(), 1);
    }

    // Goal (regression, found by the simulator: `sim/tests/regressions.rs`,
    // `subsumed_epoch_output_is_kept_by_the_next_checkpoint`): when checkpoint 1 never completes
    // (a newer one subsumes it, or its completion is delayed past the next barrier), the sink's
    // epoch-1 output is committed by checkpoint 2, so checkpoint 2 must name it: a restore from
    // 2 commits both epochs. Method: two barriers, no completion, restore from the second
    // snapshot alone.
    #[test]
    fn a_checkpoint_names_every_epoch_it_commits() {
        let subtask = SubtaskId { vertex: VertexId(2), index: 0 };
        let mut storage = MemStorage::new();
        let mut out = Vec::new();
        let mut sink = FileSink::new_files("s", subtask);
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        sink.on_batch(&mut context, rows_batch(&[(1, 1)])).unwrap();
        sink.on_barrier(&mut context, CheckpointId(1)).unwrap();
        sink.on_batch(&mut context, rows_batch(&[(2, 2)])).unwrap();
        let second = sink.on_barrier(&mut context, CheckpointId(2)).unwrap();
        assert_eq!(second.pending_output.len(), 2, "both epochs: {:?}", second.pending_output);
        storage.crash();
        let snapshot = TaskSnapshot {
            subtask,
            source_positions: vec![],
            files: second.files,
            pending_output: second.pending_output,
        };
        let mut restored = FileSink::new_files("s", subtask);
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        restored.restore(&mut context, std::slice::from_ref(&snapshot)).unwrap();
        assert_eq!(committed(&mut storage), vec![(1, 1), (2, 2)]);
        // Committing what is already committed changes nothing (epoch 1 committed before the crash).
        let mut again = FileSink::new_files("s", subtask);
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out).with_checkpointing(true);
        again.restore(&mut context, &[snapshot]).unwrap();
        assert_eq!(committed(&mut storage), vec![(1, 1), (2, 2)]);
    }

    // Goal: a committed file that is not Arrow IPC (torn, overwritten) is an error naming the
    // file, never a panic and never silently skipped.
    #[test]
    fn unreadable_committed_file_is_named() {
        let mut storage = MemStorage::new();
        storage.write("output/s/part-00000-00000-00000000.arrow", b"ARROW1 but not really").unwrap();
        let error = read_committed(&mut storage, "s").unwrap_err().to_string();
        assert!(error.contains("output/s/part-00000-00000-00000000.arrow"), "{error}");
        assert!(error.contains("not a readable Arrow IPC file"), "{error}");
    }
}
