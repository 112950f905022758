//! Per-key statistics over the whole input, kept in every kind of keyed state: the operator of
//! the simulator's `W3` workload, which checks that each kind recovers exactly once.
//!
//! Per record `(key, value)`:
//! - `count`, a value state (`u64`): one more;
//! - `sum`, a reducing state (`i64`, checked addition): plus the value;
//! - `max`, an aggregating state: the largest value;
//! - `buckets`, a map state (`u8` → `u64`): one more for bucket `value % 16`;
//! - `multiples`, a list state (`i64`): the value, if it is a multiple of 8.
//!
//! At the end of input it emits one row per key: `key, count, sum, max, buckets` (the number
//! of distinct buckets), `bucket_checksum` (Σ bucket × its count), `multiples` (the list's
//! length) and `multiples_sum`. Each is a function of the key's records as a multiset, so the
//! rows do not depend on how inputs interleave: a run that lost or repeated a record (or any
//! state update) differs from the reference in some row.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, SchemaRef};

use super::graph::{field, schema_of};
use super::window::{key_column, KeyColumn, KeyType};
use super::{Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot};
use crate::checkpoint::manifest::{checkpoint_dir, shared_dir, TaskSnapshot};
use crate::element::CheckpointId;
use crate::key_group::MaxParallelism;
use crate::state::keyed::{
    AggregateFunction, AggregatingState, KeyedState, ListState, MapState, ReducingState, ValueState,
};
use crate::state::{order_preserving_i64_inverse, read_u64_be, CaptureTarget, StateBackend};

/// The largest value seen.
#[derive(Debug, Default)]
pub struct Max;

impl AggregateFunction for Max {
    type In = i64;
    type Acc = i64;
    type Out = i64;

    fn create_accumulator(&self) -> i64 {
        i64::MIN
    }

    fn add(&self, value: &i64, accumulator: &mut i64) {
        *accumulator = (*accumulator).max(*value);
    }

    fn merge(&self, a: i64, b: i64) -> i64 {
        a.max(b)
    }

    fn get_result(&self, accumulator: &i64) -> i64 {
        *accumulator
    }
}

/// The sum's reduce function: saturating, with overflow reported by the operator's check.
fn add_saturating(a: &i64, b: &i64) -> i64 {
    a.saturating_add(*b)
}

type Reduce = fn(&i64, &i64) -> i64;

/// What the operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedStatsSpec {
    pub key_index: usize,
    pub key_type: KeyType,
    pub value_index: usize,
}

pub struct KeyedStats {
    spec: KeyedStatsSpec,
    state: KeyedState,
    count: ValueState<u64>,
    sum: ReducingState<i64, Reduce>,
    max: AggregatingState<Max>,
    buckets: MapState<u8, u64>,
    multiples: ListState<i64>,
    schema: SchemaRef,
    metrics: OperatorMetrics,
}

impl KeyedStats {
    pub fn schema(key: Field) -> SchemaRef {
        schema_of(vec![
            key.with_nullable(false),
            field("count", DataType::UInt64),
            field("sum", DataType::Int64),
            field("max", DataType::Int64),
            field("buckets", DataType::UInt64),
            field("bucket_checksum", DataType::UInt64),
            field("multiples", DataType::UInt64),
            field("multiples_sum", DataType::Int64),
        ])
    }

    pub fn new(spec: KeyedStatsSpec, max_parallelism: MaxParallelism, backend: Box<dyn StateBackend>) -> KeyedStats {
        let mut state = KeyedState::new(backend, max_parallelism);
        let declared = "the operator declares its states once, in a fresh backend";
        let count = state.value_state::<u64>("count", None).expect(declared);
        let sum = state.reducing_state::<i64, Reduce>("sum", add_saturating, None).expect(declared);
        let max = state.aggregating_state("max", Max, None).expect(declared);
        let buckets = state.map_state::<u8, u64>("buckets", None).expect(declared);
        let multiples = state.list_state::<i64>("multiples", None).expect(declared);
        let key_field = match spec.key_type {
            KeyType::UInt64 => field("key", DataType::UInt64),
            KeyType::Int64 => field("key", DataType::Int64),
        };
        KeyedStats {
            spec,
            state,
            count,
            sum,
            max,
            buckets,
            multiples,
            schema: Self::schema(key_field),
            metrics: OperatorMetrics::default(),
        }
    }

    fn set_key(&mut self, key_hash: u64) {
        match self.spec.key_type {
            KeyType::UInt64 => self.state.set_current_key_u64(key_hash),
            KeyType::Int64 => self.state.set_current_key_i64(key_hash as i64),
        }
    }

    fn add(&mut self, key_hash: u64, value: i64) -> Result<(), OperatorError> {
        self.set_key(key_hash);
        let state = &mut self.state;
        let count = self.count.get(state)?.unwrap_or(0);
        self.count.update(state, &(count + 1))?;
        self.sum.add(state, &value)?;
        if self.sum.get(state)? == Some(i64::MAX) {
            return Err(OperatorError::Malformed(format!("keyed-stats: the sum of key {key_hash} overflows i64")));
        }
        self.max.add(state, &value)?;
        let bucket = value.rem_euclid(16) as u8;
        let in_bucket = self.buckets.get(state, &bucket)?.unwrap_or(0);
        self.buckets.put(state, &bucket, &(in_bucket + 1))?;
        if value % 8 == 0 {
            self.multiples.add(state, &value)?;
        }
        Ok(())
    }

    /// The row of the current key.
    fn row(&mut self, key_hash: u64) -> Result<[u64; 8], OperatorError> {
        let state = &mut self.state;
        let missing = |what: &str| -> ! { panic!("key {key_hash} has a count but no {what}") };
        let count = self.count.get(state)?.unwrap_or_else(|| missing("count"));
        let sum: i64 = self.sum.get(state)?.unwrap_or_else(|| missing("sum"));
        let max: i64 = self.max.get(state)?.unwrap_or_else(|| missing("max"));
        let buckets = self.buckets.entries(state)?;
        let checksum = buckets.iter().map(|&(bucket, count)| u64::from(bucket) * count).sum::<u64>();
        let multiples = self.multiples.get(state)?.unwrap_or_default();
        Ok([
            key_hash,
            count,
            sum as u64,
            max as u64,
            buckets.len() as u64,
            checksum,
            multiples.len() as u64,
            multiples.iter().sum::<i64>() as u64,
        ])
    }

    fn rows_batch(&self, rows: &[[u64; 8]]) -> Result<RecordBatch, OperatorError> {
        let unsigned =
            |index: usize| -> ArrayRef { Arc::new(rows.iter().map(|row| row[index]).collect::<UInt64Array>()) };
        let signed =
            |index: usize| -> ArrayRef { Arc::new(rows.iter().map(|row| row[index] as i64).collect::<Int64Array>()) };
        let key = match self.spec.key_type {
            KeyType::UInt64 => unsigned(0),
            KeyType::Int64 => signed(0),
        };
        let columns = vec![key, unsigned(1), signed(2), signed(3), unsigned(4), unsigned(5), unsigned(6), signed(7)];
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

impl Operator for KeyedStats {
    fn name(&self) -> &str {
        "keyed-stats"
    }

    fn on_batch(&mut self, _context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let column = batch.column(self.spec.value_index);
        let values = column.as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
            OperatorError::Malformed(format!("keyed-stats: value column is {}, not Int64", column.data_type()))
        })?;
        if values.null_count() > 0 {
            return Err(OperatorError::Malformed(format!("keyed-stats: {} null values", values.null_count())));
        }
        match key_column(&batch, self.spec.key_index, self.spec.key_type)? {
            KeyColumn::UInt64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key, values.value(row))?;
                }
            }
            KeyColumn::Int64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key as u64, values.value(row))?;
                }
            }
        }
        self.metrics.records_in += batch.num_rows() as u64;
        Ok(())
    }

    /// One row per key, key group by key group, keys in state order.
    fn on_end(&mut self, context: &mut Context<'_>) -> Result<(), OperatorError> {
        let mut keys = Vec::new();
        let id = self.count.id();
        for key_group in self.state.key_groups().iter() {
            self.state.for_each_key(id, key_group, &mut |key, _| {
                keys.push(read_u64_be(key)?);
                Ok(())
            })?;
        }
        let mut rows = Vec::with_capacity(keys.len());
        for stored in keys {
            let key_hash = match self.spec.key_type {
                KeyType::UInt64 => stored,
                KeyType::Int64 => order_preserving_i64_inverse(stored) as u64,
            };
            self.set_key(key_hash);
            rows.push(self.row(key_hash)?);
        }
        if !rows.is_empty() {
            context.emit(crate::element::Element::Batch(self.rows_batch(&rows)?));
            self.metrics.records_out += rows.len() as u64;
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<OperatorSnapshot, OperatorError> {
        if checkpoint == CheckpointId::END_OF_INPUT {
            // Every row was emitted at the end of input: nothing is left to restore.
            return Ok(OperatorSnapshot::default());
        }
        let subtask = context.subtask;
        let name = format!("stats-{:05}-{:05}", subtask.vertex.0, subtask.index);
        let target = CaptureTarget {
            checkpoint,
            path: format!("{}/{name}", checkpoint_dir(checkpoint)),
            shared_dir: format!("{}/{name}", shared_dir()),
        };
        let capture = self.state.capture(&target)?;
        Ok(OperatorSnapshot { files: capture.files, pending_output: Vec::new(), writes: vec![capture.write] })
    }

    fn on_checkpoint_complete(
        &mut self,
        _context: &mut Context<'_>,
        checkpoint: CheckpointId,
    ) -> Result<(), OperatorError> {
        self.state.checkpoint_complete(checkpoint);
        Ok(())
    }

    fn restore(&mut self, context: &mut Context<'_>, snapshots: &[TaskSnapshot]) -> Result<(), OperatorError> {
        let files: Vec<String> = snapshots.iter().flat_map(|s| s.files.iter().cloned()).collect();
        self.state.restore_files(context.storage, &files)?;
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        OperatorMetrics { state_size_bytes: self.state.size_bytes(), ..self.metrics }
    }
}
