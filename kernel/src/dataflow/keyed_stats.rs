//! Per-key statistics over the whole input, kept in every kind of keyed state: the operator of
//! the simulator's `W3` workload, which checks that each kind recovers exactly once.
//!
//! Per record `(key, value)`:
//! - `count`, a value state (`u64`): one more;
//! - `sum`, a reducing state (`i64`, checked addition: an overflow is an error): plus the value;
//! - `max`, an aggregating state: the largest value;
//! - `buckets`, a map state (`u8` → `u64`): one more for bucket `value % 16`;
//! - `multiples`, a list state (`i64`): the value, if it is a multiple of 8.
//!
//! At the end of input it emits one row per key: `key, count, sum, max, buckets` (the number
//! of distinct buckets), `bucket_checksum` (Σ bucket × its count), `multiples` (the list's
//! length) and `multiples_sum`. Each is a function of the key's records as a multiset, so the
//! rows do not depend on how inputs interleave: a run that lost or repeated a record (or any
//! state update) differs from the reference in some row.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arrow_array::{ArrayRef, Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, Field, SchemaRef};

use super::graph::{field, schema_of};
use super::window::{capture_target, int64_values, key_column, KeyColumn, KeyType};
use super::{Context, Operator, OperatorError, OperatorMetrics, OperatorSnapshot};
use crate::checkpoint::manifest::TaskSnapshot;
use crate::element::CheckpointId;
use crate::key_group::MaxParallelism;
use crate::state::keyed::{
    AggregateFunction, AggregatingState, KeyedState, ListState, MapState, ReducingState, ValueState,
};
use crate::state::{order_preserving_i64_inverse, read_u64_be, StateBackend};

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

/// The sum's reduce function: checked addition, an overflow raised in the flag it shares with
/// the operator (the operator checks the flag after each add, without reading the sum back).
type Reduce = Box<dyn Fn(&i64, &i64) -> i64 + Send>;

fn checked_sum(overflow: Arc<AtomicBool>) -> Reduce {
    Box::new(move |a: &i64, b: &i64| {
        a.checked_add(*b).unwrap_or_else(|| {
            overflow.store(true, Ordering::Relaxed);
            *a
        })
    })
}

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
    /// Raised by the sum's reduce function when the sum overflows.
    sum_overflow: Arc<AtomicBool>,
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
        let sum_overflow = Arc::new(AtomicBool::new(false));
        let sum = state.reducing_state::<i64, Reduce>("sum", checked_sum(sum_overflow.clone()), None).expect(declared);
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
            sum_overflow,
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
        if self.sum_overflow.swap(false, Ordering::Relaxed) {
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
        let values = int64_values(&batch, self.spec.value_index, "keyed-stats")?;
        match key_column(&batch, self.spec.key_index, self.spec.key_type)? {
            KeyColumn::UInt64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key, values[row])?;
                }
            }
            KeyColumn::Int64(keys) => {
                for (row, &key) in keys.iter().enumerate() {
                    self.add(key as u64, values[row])?;
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
        let target = capture_target(checkpoint, "stats", context.subtask);
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

    /// The key's statistics so far (live state), one row, or no row if the key has no record yet.
    fn query(&mut self, key: u64) -> Result<Option<RecordBatch>, OperatorError> {
        let key_group = self.state.max_parallelism().key_group_of_u64(key);
        if !self.state.key_groups().contains(key_group) {
            return Err(OperatorError::Protocol(format!(
                "key {key} is in key group {}, not held by this subtask",
                key_group.0
            )));
        }
        self.set_key(key);
        let rows = match self.count.get(&mut self.state)? {
            Some(_) => vec![self.row(key)?],
            None => Vec::new(),
        };
        Ok(Some(self.rows_batch(&rows)?))
    }

    fn metrics(&self) -> OperatorMetrics {
        OperatorMetrics { state_size_bytes: self.state.size_bytes(), ..self.metrics }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch, UInt64Array};

    use super::*;
    use crate::checkpoint::manifest::TaskSnapshot;
    use crate::dataflow::graph::{SubtaskId, VertexId};
    use crate::element::Element;
    use crate::env::MemStorage;
    use crate::key_group::KeyGroupRange;
    use crate::state::testing::Lcg;
    use crate::state::HeapBackend;
    use crate::time::Instant;

    fn spec() -> KeyedStatsSpec {
        KeyedStatsSpec { key_index: 0, key_type: KeyType::UInt64, value_index: 1 }
    }

    fn batch(rows: &[(u64, i64)]) -> RecordBatch {
        let schema =
            Arc::new(arrow_schema::Schema::new(vec![field("key", DataType::UInt64), field("value", DataType::Int64)]));
        let keys: UInt64Array = rows.iter().map(|r| r.0).collect();
        let values: Int64Array = rows.iter().map(|r| r.1).collect();
        RecordBatch::try_new(schema, vec![Arc::new(keys), Arc::new(values)]).unwrap()
    }

    /// The rows the operator must emit for `records`, computed directly.
    fn model(records: &[(u64, i64)]) -> Vec<[u64; 8]> {
        let mut by_key: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
        for &(key, value) in records {
            by_key.entry(key).or_default().push(value);
        }
        let mut rows: Vec<[u64; 8]> = by_key
            .into_iter()
            .map(|(key, values)| {
                let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
                for value in &values {
                    *buckets.entry(value.rem_euclid(16)).or_default() += 1;
                }
                let multiples: Vec<i64> = values.iter().copied().filter(|v| v % 8 == 0).collect();
                [
                    key,
                    values.len() as u64,
                    values.iter().sum::<i64>() as u64,
                    *values.iter().max().unwrap() as u64,
                    buckets.len() as u64,
                    buckets.iter().map(|(bucket, count)| *bucket as u64 * count).sum(),
                    multiples.len() as u64,
                    multiples.iter().sum::<i64>() as u64,
                ]
            })
            .collect();
        rows.sort_unstable();
        rows
    }

    fn rows_of(elements: &[Element]) -> Vec<[u64; 8]> {
        let mut rows = Vec::new();
        for element in elements {
            let Element::Batch(batch) = element else { continue };
            for row in 0..batch.num_rows() {
                let mut cells = [0_u64; 8];
                for (index, cell) in cells.iter_mut().enumerate() {
                    let column = batch.column(index).as_any();
                    *cell = match column.downcast_ref::<UInt64Array>() {
                        Some(values) => values.value(row),
                        None => column.downcast_ref::<Int64Array>().unwrap().value(row) as u64,
                    };
                }
                rows.push(cells);
            }
        }
        rows.sort_unstable();
        rows
    }

    // Goal: a sum that overflows i64 is an error naming the key (bad input), and nothing is
    // wrapped silently. Method: two records of i64::MAX for one key.
    #[test]
    fn overflowing_sum_is_an_error() {
        let max = MaxParallelism::default();
        let mut storage = MemStorage::new();
        let mut out = Vec::new();
        let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
        let mut op = KeyedStats::new(spec(), max, Box::new(HeapBackend::new(KeyGroupRange::all(max))));
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        op.on_batch(&mut context, batch(&[(3, i64::MAX)])).unwrap();
        let error = op.on_batch(&mut context, batch(&[(3, 1)])).unwrap_err();
        assert!(error.to_string().contains("key 3 overflows"), "{error}");
    }

    // Goal: each key's row is the statistics of its records, through a checkpoint restored at
    // another parallelism (state of every kind moves by key group), and a live query answers a
    // key's row so far. Method: seeded records (negative values too, hot keys) into one operator,
    // a barrier, more records; the snapshot restored into 3 operators that take the rest by key
    // group; the rows compared with a direct computation.
    #[test]
    fn rows_match_a_model_through_restore_at_another_parallelism() {
        let seed = 7;
        println!("seed {seed}");
        let mut rng = Lcg::new(seed);
        let records: Vec<(u64, i64)> = (0..3_000).map(|_| (rng.below(40), rng.below(2_000) as i64 - 1_000)).collect();
        let (before, after) = records.split_at(1_700);
        let max = MaxParallelism::default();
        let mut storage = MemStorage::new();
        let subtask = SubtaskId { vertex: VertexId(1), index: 0 };
        let mut out = Vec::new();
        let mut op = KeyedStats::new(spec(), max, Box::new(HeapBackend::new(KeyGroupRange::all(max))));
        let mut context = Context::new(Instant(0), &mut storage, subtask, &mut out);
        op.on_batch(&mut context, batch(before)).unwrap();
        let written = op.on_barrier(&mut context, CheckpointId(1)).unwrap();
        let mut files = written.files;
        for write in written.writes {
            files.extend(write.write(context.storage).unwrap());
        }
        // The live query of a key: its row over the records so far.
        let key = before[0].0;
        let answer = op.query(key).unwrap().unwrap();
        let so_far: Vec<(u64, i64)> = before.iter().copied().filter(|r| r.0 == key).collect();
        assert_eq!(rows_of(&[Element::Batch(answer)]), model(&so_far));
        assert_eq!(op.query(1_000).unwrap().unwrap().num_rows(), 0, "a key without records has no row");
        let snapshots = [TaskSnapshot { subtask, source_positions: vec![], files, pending_output: vec![] }];
        let mut rows = Vec::new();
        for index in 0..3 {
            let range = max.range_of(index, 3);
            let mut restored = KeyedStats::new(spec(), max, Box::new(HeapBackend::new(range)));
            let mut out = Vec::new();
            let mut context =
                Context::new(Instant(0), &mut storage, SubtaskId { vertex: VertexId(1), index }, &mut out);
            restored.restore(&mut context, &snapshots).unwrap();
            let mine: Vec<(u64, i64)> =
                after.iter().copied().filter(|r| range.contains(max.key_group_of_u64(r.0))).collect();
            restored.on_batch(&mut context, batch(&mine)).unwrap();
            restored.on_end(&mut context).unwrap();
            rows.extend(rows_of(&out));
        }
        rows.sort_unstable();
        assert_eq!(rows, model(&records));
    }
}
