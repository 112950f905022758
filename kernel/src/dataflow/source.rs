//! Sources: the replayable workload generator.

use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch, UInt64Array};
use arrow_schema::{DataType, SchemaRef};
use smallvec::SmallVec;

use super::graph::{field, schema_of};
use super::{OperatorError, OperatorMetrics, Source, SourcePoll, SplitPosition, SplitRun, SplitStatus};
use crate::time::Instant;
use crate::workload;

/// One split of the generator: the record indices `start + k * stride`, of which `read` were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progression {
    start: u64,
    stride: u64,
    read: u64,
    /// With stalls: the split has no records available until then (not checkpointed: a
    /// restored split starts without a stall).
    stalled_until: Option<Instant>,
}

impl Progression {
    fn next_index(&self) -> u64 {
        self.start + self.read * self.stride
    }

    /// Split ids: the stride in the high half, the start in the low half.
    fn id(&self) -> u64 {
        self.stride << 32 | self.start
    }

    fn is_available(&self, now: Instant) -> bool {
        self.stalled_until.is_none_or(|until| now >= until)
    }
}

/// Pauses in a generator's splits, in processing time: a split whose start is `s` has no records
/// available for `stall_ms` after every `every_records << (s % 3)` records it produced, so that
/// splits go quiet at different moments (what idleness detection is for). The records, and so the
/// output of a job, stay the same; only when they can be read changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorStalls {
    pub every_records: u64,
    pub stall_ms: u64,
}

/// How a generator's records are split, and how its splits behave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GeneratorSplits {
    /// The number of splits (default: one per subtask); split `n` is read by subtask
    /// `n mod parallelism`, as after a restore, so subtasks may read different numbers of
    /// splits (and so read each of them more slowly).
    pub count: Option<u32>,
    pub stalls: Option<GeneratorStalls>,
}

impl GeneratorStalls {
    fn period(&self, progression: &Progression) -> u64 {
        self.every_records.max(1) << (progression.start % 3)
    }
}

/// Generates records `i` of the workload. Subtask `j` of `p` starts with the split
/// `i ≡ j (mod p)`; after rescaling a subtask may hold several splits and emits their records in
/// ascending `i`, so that its event times stay as ordered as the generator's (disorder < 2 s).
///
/// Interleaving the subtasks (rather than giving each a contiguous block) keeps their event times
/// close together, so that the minimum watermark over them advances for all at once.
#[derive(Debug)]
pub struct GeneratorSource {
    name: String,
    batch_size: usize,
    record_count: u64,
    keys: workload::Keys,
    stalls: Option<GeneratorStalls>,
    splits: Vec<Progression>,
    schema: SchemaRef,
    metrics: OperatorMetrics,
}

impl GeneratorSource {
    pub const EVENT_TIME_COLUMN: &'static str = "ts_ms";
    pub const BATCH_SIZE_MAX: usize = 1 << 20;

    pub fn schema() -> SchemaRef {
        schema_of(vec![
            field("key", DataType::UInt64),
            field("value", DataType::Int64),
            field(Self::EVENT_TIME_COLUMN, DataType::Int64),
        ])
    }

    pub fn new(name: &str, record_count: u64, batch_size: usize, subtask_index: u64, parallelism: u64) -> Self {
        assert!(subtask_index < parallelism, "subtask {subtask_index} of {parallelism}");
        assert!((1..=Self::BATCH_SIZE_MAX).contains(&batch_size), "batch size {batch_size}");
        GeneratorSource {
            name: name.to_string(),
            batch_size,
            record_count,
            keys: workload::Keys::Uniform,
            stalls: None,
            splits: vec![Progression { start: subtask_index, stride: parallelism, read: 0, stalled_until: None }],
            schema: Self::schema(),
            metrics: OperatorMetrics::default(),
        }
    }

    /// The same records with their keys drawn as `keys` says (the simulator's skewed variant).
    pub fn with_keys(mut self, keys: workload::Keys) -> Self {
        self.keys = keys;
        self
    }

    /// The same records, in `splits.count` splits (the subtask reads its share), pausing as
    /// `splits.stalls` says.
    pub fn with_splits(mut self, splits: GeneratorSplits, subtask_index: u64, parallelism: u64) -> Self {
        self.stalls = splits.stalls;
        if let Some(count) = splits.count {
            assert!(count > 0, "{}: a generator of no splits", self.name);
            let count = u64::from(count);
            self.splits = (subtask_index..count)
                .step_by(parallelism as usize)
                .map(|start| Progression { start, stride: count, read: 0, stalled_until: None })
                .collect();
        }
        self
    }

    /// Whether split `s` has records to read now and is not paused.
    fn is_readable(&self, s: usize, paused: &[u64]) -> bool {
        let progression = &self.splits[s];
        progression.next_index() < self.record_count
            && progression.stalled_until.is_none()
            && !paused.contains(&progression.id())
    }

    /// The readable split with the lowest next record index.
    fn next_split(&self, paused: &[u64]) -> Option<usize> {
        (0..self.splits.len()).filter(|&s| self.is_readable(s, paused)).min_by_key(|&s| self.splits[s].next_index())
    }
}

impl Source for GeneratorSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll_batch(&mut self, now: Instant, paused: &[u64]) -> Result<SourcePoll, OperatorError> {
        for progression in self.splits.iter_mut().filter(|p| p.is_available(now)) {
            progression.stalled_until = None;
        }
        if self.splits.iter().all(|p| p.next_index() >= self.record_count) {
            return Ok(SourcePoll::End);
        }
        let mut keys = Vec::with_capacity(self.batch_size);
        let mut values = Vec::with_capacity(self.batch_size);
        let mut times = Vec::with_capacity(self.batch_size);
        let mut runs: SmallVec<[SplitRun; 2]> = SmallVec::new();
        while keys.len() < self.batch_size {
            let Some(split) = self.next_split(paused) else { break };
            // Run on in this split until another one has the lower next index (or it ends).
            let limit = (0..self.splits.len())
                .filter(|&s| s != split && self.is_readable(s, paused))
                .map(|s| self.splits[s].next_index())
                .min()
                .unwrap_or(self.record_count)
                .min(self.record_count);
            let stalls = self.stalls;
            let progression = &mut self.splits[split];
            let mut i = progression.next_index();
            let mut count =
                (limit.saturating_sub(i).div_ceil(progression.stride)).min((self.batch_size - keys.len()) as u64);
            if let Some(stalls) = stalls {
                let period = stalls.period(progression);
                count = count.min(period - progression.read % period);
            }
            assert!(count > 0, "{}: split {:#x} chosen with no record to read", self.name, progression.id());
            for _ in 0..count {
                let record = workload::record_with(i, self.keys);
                keys.push(record.key);
                values.push(record.value);
                times.push(record.ts_ms);
                i += progression.stride;
            }
            progression.read += count;
            if let Some(stalls) = stalls {
                if progression.read % stalls.period(progression) == 0 && i < self.record_count {
                    progression.stalled_until = Some(now.saturating_add_ms(stalls.stall_ms));
                }
            }
            let id = progression.id();
            match runs.last_mut() {
                Some(run) if run.split == id => run.rows += count as u32,
                _ => runs.push(SplitRun { split: id, rows: count as u32 }),
            }
        }
        if keys.is_empty() {
            return Ok(SourcePoll::Pending);
        }
        self.metrics.records_out += keys.len() as u64;
        let columns: Vec<Arc<dyn arrow_array::Array>> = vec![
            Arc::new(UInt64Array::from(keys)),
            Arc::new(Int64Array::from(values)),
            Arc::new(Int64Array::from(times)),
        ];
        Ok(SourcePoll::Batch { batch: RecordBatch::try_new(self.schema.clone(), columns)?, runs })
    }

    fn split_statuses(&self, now: Instant, out: &mut Vec<SplitStatus>) {
        out.extend(self.splits.iter().map(|p| {
            let ended = p.next_index() >= self.record_count;
            SplitStatus { split: p.id(), available: !ended && p.is_available(now), ended }
        }));
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.splits.iter().filter(|p| p.next_index() < self.record_count).filter_map(|p| p.stalled_until).min()
    }

    fn positions(&self) -> Vec<SplitPosition> {
        self.splits.iter().map(|p| SplitPosition { split: p.id(), position: p.read }).collect()
    }

    fn restore(&mut self, positions: &[SplitPosition]) -> Result<(), OperatorError> {
        let mut splits = Vec::new();
        for position in positions {
            let (stride, start) = (position.split >> 32, position.split & u64::from(u32::MAX));
            if stride == 0 || start >= stride {
                return Err(OperatorError::Protocol(format!(
                    "{}: split {:#x} is not a generator split",
                    self.name, position.split
                )));
            }
            splits.push(Progression { start, stride, read: position.position, stalled_until: None });
        }
        self.splits = splits;
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next batch of a source without stalls or paused splits.
    fn next_batch(source: &mut GeneratorSource) -> Option<RecordBatch> {
        match source.poll_batch(Instant(0), &[]).unwrap() {
            SourcePoll::Batch { batch, runs } => {
                assert_eq!(runs.iter().map(|r| r.rows as usize).sum::<usize>(), batch.num_rows());
                Some(batch)
            }
            SourcePoll::Pending => panic!("nothing is paused or stalled"),
            SourcePoll::End => None,
        }
    }

    fn drain(source: &mut GeneratorSource) -> Vec<(u64, i64, i64)> {
        let mut all = Vec::new();
        while let Some(batch) = next_batch(source) {
            all.extend(rows(&batch));
        }
        all
    }

    // Goal: the subtasks of a parallel generator together produce every record once, and their
    // split positions restored at another parallelism produce exactly the records not read yet,
    // each subtask in ascending record order. Method: compare with the generator function.
    #[test]
    fn splits_partition_records_and_restore_at_other_parallelism() {
        let total = 1_003;
        let mut seen = Vec::new();
        let mut positions = Vec::new();
        for index in 0..3 {
            let mut source = GeneratorSource::new("gen", total, 100, index, 3);
            // Read part of the input, as far as a checkpoint would.
            for _ in 0..index + 1 {
                let batch = next_batch(&mut source).unwrap();
                seen.extend(rows(&batch));
            }
            positions.extend(source.positions());
        }
        positions.sort();
        for (new_parallelism, index) in [(2, 0), (2, 1)] {
            let mut source = GeneratorSource::new("gen", total, 64, index, new_parallelism);
            let mine: Vec<SplitPosition> =
                positions.iter().enumerate().filter(|(n, _)| n % 2 == index as usize).map(|(_, p)| *p).collect();
            source.restore(&mine).unwrap();
            let restored = drain(&mut source);
            let times: Vec<i64> = restored.iter().map(|r| r.2).collect();
            assert!(times.windows(2).all(|w| w[1] > w[0] - 2_000), "disorder stays under 2 s");
            seen.extend(restored);
        }
        let mut expected: Vec<(u64, i64, i64)> =
            (0..total).map(workload::record).map(|r| (r.key, r.value, r.ts_ms)).collect();
        seen.sort_unstable();
        expected.sort_unstable();
        assert_eq!(seen, expected);
        assert!(GeneratorSource::new("gen", 10, 10, 0, 1).restore(&[SplitPosition { split: 5, position: 0 }]).is_err());
    }

    // Goal: a generator of several splits with stalls produces every record once, reads no
    // split while it stalls or while it is paused, says which split each run of rows came from,
    // reports each split's status, and asks to be polled when a stall ends. Method: three splits
    // stalling every 5, 10 and 20 records for 10 ms, one of them paused for a while, drained on a
    // clock that jumps to the source's timeout whenever it has nothing; compared with the
    // generator function.
    #[test]
    fn stalled_and_paused_splits_are_not_read() {
        let total = 300;
        let stalls = GeneratorStalls { every_records: 5, stall_ms: 10 };
        let splits = GeneratorSplits { count: Some(3), stalls: Some(stalls) };
        let mut source = GeneratorSource::new("gen", total, 8, 0, 1).with_splits(splits, 0, 1);
        let ids: Vec<u64> = source.positions().iter().map(|p| p.split).collect();
        assert_eq!(ids, [3 << 32, 3 << 32 | 1, 3 << 32 | 2]);
        let (mut now, mut seen, mut statuses) = (Instant(0), Vec::new(), Vec::new());
        loop {
            // Split 1 is paused for the first 100 ms.
            let paused: &[u64] = if now < Instant(100) { &ids[1..2] } else { &[] };
            match source.poll_batch(now, paused).unwrap() {
                SourcePoll::Batch { batch, runs } => {
                    let mut row = 0;
                    for run in &runs {
                        assert!(!paused.contains(&run.split), "paused split {:#x} read at {now:?}", run.split);
                        let stride = run.split >> 32;
                        for &(key, value, ts_ms) in rows(&batch)[row..row + run.rows as usize].iter() {
                            let record = workload::Record { key, value, ts_ms };
                            let index = (0..total).find(|&i| workload::record(i) == record).unwrap();
                            assert_eq!(index % stride, run.split & 0xffff_ffff, "record {index} from its split");
                        }
                        row += run.rows as usize;
                    }
                    assert_eq!(row, batch.num_rows());
                    seen.extend(rows(&batch));
                }
                SourcePoll::Pending => {
                    statuses.clear();
                    source.split_statuses(now, &mut statuses);
                    let open = statuses.iter().filter(|s| !s.ended);
                    assert!(open.clone().all(|s| !s.available || paused.contains(&s.split)), "{statuses:?}");
                    now = source.poll_timeout().unwrap_or(Instant(100)).max(Instant(now.0 + 1));
                }
                SourcePoll::End => break,
            }
        }
        statuses.clear();
        source.split_statuses(now, &mut statuses);
        assert!(statuses.iter().all(|s| s.ended && !s.available));
        let mut expected: Vec<(u64, i64, i64)> =
            (0..total).map(workload::record).map(|r| (r.key, r.value, r.ts_ms)).collect();
        seen.sort_unstable();
        expected.sort_unstable();
        assert_eq!(seen, expected);
        assert!(now > Instant(100), "the stalls took time: {now:?}");
    }

    fn rows(batch: &RecordBatch) -> Vec<(u64, i64, i64)> {
        let keys = batch.column(0).as_any().downcast_ref::<UInt64Array>().unwrap();
        let values = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        let times = batch.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        (0..batch.num_rows()).map(|row| (keys.value(row), values.value(row), times.value(row))).collect()
    }
}
