//! The key-by exchange: splits a batch by the key group of each row's key, column-wise.

use arrow_array::{RecordBatch, UInt32Array};

use super::window::{key_column, KeyColumn, KeyType};
use super::OperatorError;
use crate::key_group::MaxParallelism;

/// Splits batches among `parallelism` receivers by key group; buffers are reused across batches.
#[derive(Debug)]
pub struct KeyPartitioner {
    key_index: usize,
    key_type: KeyType,
    max_parallelism: MaxParallelism,
    parallelism: u16,
    /// Row indices per receiver, cleared for each batch.
    rows: Vec<Vec<u32>>,
}

impl KeyPartitioner {
    pub fn new(key_index: usize, key_type: KeyType, max_parallelism: MaxParallelism, parallelism: u16) -> Self {
        assert!(parallelism >= 1 && parallelism <= max_parallelism.get(), "parallelism {parallelism}");
        KeyPartitioner {
            key_index,
            key_type,
            max_parallelism,
            parallelism,
            rows: vec![Vec::new(); usize::from(parallelism)],
        }
    }

    /// Calls `emit(receiver, part)` for every receiver that gets rows, in receiver order.
    pub fn partition(
        &mut self,
        batch: &RecordBatch,
        mut emit: impl FnMut(usize, RecordBatch),
    ) -> Result<(), OperatorError> {
        if self.parallelism == 1 {
            emit(0, batch.clone());
            return Ok(());
        }
        self.rows.iter_mut().for_each(Vec::clear);
        let (max, parallelism) = (self.max_parallelism, self.parallelism);
        let receiver = |key: u64| usize::from(max.subtask_of(max.key_group_of_u64(key), parallelism));
        match key_column(batch, self.key_index, self.key_type)? {
            KeyColumn::UInt64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.rows[receiver(key)].push(row as u32);
                }
            }
            KeyColumn::Int64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.rows[receiver(key as u64)].push(row as u32);
                }
            }
        }
        for (index, rows) in self.rows.iter_mut().enumerate() {
            if rows.is_empty() {
                continue;
            }
            if rows.len() == batch.num_rows() {
                emit(index, batch.clone());
                continue;
            }
            let indices = UInt32Array::from(std::mem::take(rows));
            emit(index, arrow_select::take::take_record_batch(batch, &indices)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Array, UInt64Array};
    use arrow_schema::{DataType, Field, Schema};

    use super::*;

    // Goal: every row goes to exactly the subtask owning its key group, in its original order.
    // Method: partition a batch of known keys, compare with the documented assignment row by row.
    #[test]
    fn rows_go_to_owner_of_their_key_group() {
        let max = MaxParallelism::default();
        let keys: Vec<u64> = (0..1_000).map(|i| i * 7919 % 1_003).collect();
        let schema = Arc::new(Schema::new(vec![Field::new("key", DataType::UInt64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(UInt64Array::from(keys.clone()))]).unwrap();
        let mut partitioner = KeyPartitioner::new(0, KeyType::UInt64, max, 3);
        let mut received: Vec<Vec<u64>> = vec![Vec::new(); 3];
        partitioner
            .partition(&batch, |index, part| {
                let column = part.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
                received[index].extend(column.values().iter());
            })
            .unwrap();
        for (index, got) in received.iter().enumerate() {
            let expected: Vec<u64> = keys
                .iter()
                .copied()
                .filter(|&k| usize::from(max.subtask_of(max.key_group_of_u64(k), 3)) == index)
                .collect();
            assert_eq!(got, &expected, "receiver {index}");
        }
        assert_eq!(received.iter().map(Vec::len).sum::<usize>(), 1_000);
    }
}
