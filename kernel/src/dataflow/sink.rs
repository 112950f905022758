//! The file sink: output as Arrow IPC files, made visible only when committed.
//!
//! Output of the current transaction is written, in chunks, to `output/<sink>/.pending/`; commit
//! syncs each pending file, renames it into `output/<sink>/` and syncs that directory. Readers of
//! the committed output read only `output/<sink>/part-*.arrow`, so nothing is visible before its
//! commit. This job commits once, at end of input; with checkpoints (DESIGN.md §4) each completed
//! checkpoint commits the transaction its barrier closed.

use arrow_array::RecordBatch;
use arrow_schema::{ArrowError, SchemaRef};

use super::graph::SubtaskId;
use super::{Context, Operator, OperatorError, OperatorMetrics};
use crate::env::{Storage, StorageError};

/// Rows per pending file: bounds the memory a sink holds before it writes.
pub const SINK_CHUNK_ROWS_MAX: usize = 64 * 1024;

pub struct FileSink {
    name: String,
    subtask: SubtaskId,
    buffered: Vec<RecordBatch>,
    buffered_rows: usize,
    /// Pending file names (in `.pending/`) of the open transaction.
    pending: Vec<String>,
    file_sequence: u64,
    metrics: OperatorMetrics,
}

impl FileSink {
    pub fn new(name: &str, subtask: SubtaskId) -> FileSink {
        FileSink {
            name: name.to_string(),
            subtask,
            buffered: Vec::new(),
            buffered_rows: 0,
            pending: Vec::new(),
            file_sequence: 0,
            metrics: OperatorMetrics::default(),
        }
    }

    pub fn validate_name(name: &str) -> Result<(), String> {
        let good = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !name.starts_with('-');
        if good {
            Ok(())
        } else {
            Err(format!(
                "sink name {name:?} must be 1 to 64 of [A-Za-z0-9_-], not starting with '-'"
            ))
        }
    }

    /// The directory of a sink's committed files.
    pub fn committed_dir(name: &str) -> String {
        format!("output/{name}")
    }

    fn pending_dir(&self) -> String {
        format!("output/{}/.pending", self.name)
    }

    fn write_pending(&mut self, storage: &mut dyn Storage) -> Result<(), OperatorError> {
        if self.buffered.is_empty() {
            return Ok(());
        }
        let file = format!(
            "part-{:05}-{:05}-{:08}.arrow",
            self.subtask.vertex.0, self.subtask.index, self.file_sequence
        );
        self.file_sequence += 1;
        let bytes = encode_ipc_file(&self.buffered[0].schema(), &self.buffered)?;
        storage.write(&format!("{}/{file}", self.pending_dir()), &bytes)?;
        self.pending.push(file);
        self.buffered.clear();
        self.buffered_rows = 0;
        Ok(())
    }

    /// Makes every pending file of the open transaction durable and visible.
    fn commit(&mut self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        let committed = Self::committed_dir(&self.name);
        let pending_dir = self.pending_dir();
        for file in &self.pending {
            storage.sync_file(&format!("{pending_dir}/{file}"))?;
        }
        for file in &self.pending {
            storage.rename(
                &format!("{pending_dir}/{file}"),
                &format!("{committed}/{file}"),
            )?;
        }
        storage.sync_dir(&committed)?;
        storage.sync_dir(&pending_dir)?;
        self.pending.clear();
        Ok(())
    }
}

impl Operator for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_batch(
        &mut self,
        context: &mut Context<'_>,
        batch: RecordBatch,
    ) -> Result<(), OperatorError> {
        let rows = batch.num_rows();
        self.metrics.records_in += rows as u64;
        if rows == 0 {
            return Ok(());
        }
        self.buffered.push(batch);
        self.buffered_rows += rows;
        if self.buffered_rows >= SINK_CHUNK_ROWS_MAX {
            self.write_pending(context.storage)?;
        }
        Ok(())
    }

    /// The sink is the end of the stream: watermarks stop here.
    fn on_watermark(
        &mut self,
        _context: &mut Context<'_>,
        _watermark: crate::time::EventTime,
    ) -> Result<(), OperatorError> {
        Ok(())
    }

    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        self.write_pending(context.storage)?;
        self.commit(context.storage)?;
        self.metrics.records_out = self.metrics.records_in;
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}

/// Encodes batches as one Arrow IPC file.
pub fn encode_ipc_file(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>, ArrowError> {
    // Sized up front: growing a multi-megabyte buffer by doubling copies it again and again.
    let capacity = 4096
        + batches
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum::<usize>();
    let mut writer = arrow_ipc::writer::FileWriter::try_new(Vec::with_capacity(capacity), schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    writer.into_inner()
}

/// Decodes an Arrow IPC file (bytes from outside: errors, never panics).
pub fn decode_ipc_file(bytes: Vec<u8>) -> Result<Vec<RecordBatch>, ArrowError> {
    let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None)?;
    reader.collect()
}

/// Reads every committed batch of the sink `name`, file by file in name order.
pub fn read_committed(
    storage: &mut dyn Storage,
    name: &str,
) -> Result<Vec<RecordBatch>, OperatorError> {
    let dir = FileSink::committed_dir(name);
    let mut batches = Vec::new();
    for file in storage.list(&dir)? {
        if file.starts_with("part-") && file.ends_with(".arrow") {
            let bytes = storage.read(&format!("{dir}/{file}"))?;
            batches.extend(decode_ipc_file(bytes).map_err(|e| {
                OperatorError::Malformed(format!(
                    "committed file {dir}/{file} is not a readable Arrow IPC file: {e}"
                ))
            })?);
        }
    }
    Ok(batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStorage;

    // Goal: a committed file that is not Arrow IPC (torn, overwritten) is an error naming the
    // file, never a panic and never silently skipped.
    #[test]
    fn unreadable_committed_file_is_named() {
        let mut storage = MemStorage::new();
        storage
            .write(
                "output/s/part-00000-00000-00000000.arrow",
                b"ARROW1 but not really",
            )
            .unwrap();
        let error = read_committed(&mut storage, "s").unwrap_err().to_string();
        assert!(
            error.contains("output/s/part-00000-00000-00000000.arrow"),
            "{error}"
        );
        assert!(error.contains("not a readable Arrow IPC file"), "{error}");
    }
}
