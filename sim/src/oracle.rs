//! The exactly-once oracle: committed output compared with a failure-free reference run, row for
//! row, and the judgement of how a faulty run ended.
//!
//! - A run that finished must have committed exactly the reference rows: nothing lost, nothing
//!   twice (rows compared as sorted multisets: interleavings may order them differently).
//! - Where the rows depend on timing (W5, windows on processing time), a run that finished must
//!   have committed, per key, exactly the totals of `count` and `sum` that the input gives
//!   ([`Expected::Totals`]): a record lost lowers them, a record counted twice raises them.
//! - A run that refused to go on is right only if the disk was durably damaged (corruption, a
//!   misdirected write), and then what it committed must still be a part of the reference (with
//!   totals: no key's count or sum above its total; values are non-negative, so sums only grow).
//! - A run that broke an invariant on the way, did not finish within the liveness bound, or
//!   panicked, failed.

use std::collections::BTreeMap;

use arrow_array::{Array, Int64Array, RecordBatch, UInt64Array};
use sabot_kernel::dataflow::sink::read_committed;
use sabot_kernel::env::fault_storage::FaultStorage;
use sabot_kernel::testing::cluster::{ClusterRun, Outcome};

/// A committed row, column by column (every column of the workloads is an integer).
pub type Row = Vec<i128>;

/// The rows of `batches`, sorted.
pub fn rows_of(batches: &[RecordBatch]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for batch in batches {
        let mut columns: Vec<Vec<i128>> = Vec::new();
        for (index, column) in batch.columns().iter().enumerate() {
            if column.null_count() > 0 {
                return Err(format!("column {index} has nulls"));
            }
            if let Some(values) = column.as_any().downcast_ref::<UInt64Array>() {
                columns.push(values.values().iter().map(|&v| i128::from(v)).collect());
            } else if let Some(values) = column.as_any().downcast_ref::<Int64Array>() {
                columns.push(values.values().iter().map(|&v| i128::from(v)).collect());
            } else {
                return Err(format!("column {index} is {}, not an integer", column.data_type()));
            }
        }
        for row in 0..batch.num_rows() {
            rows.push(columns.iter().map(|column| column[row]).collect());
        }
    }
    rows.sort_unstable();
    Ok(rows)
}

/// The committed rows of every file sink, sorted (read without faults).
pub fn committed_rows(storage: &FaultStorage, sinks: &[String]) -> Result<Vec<Row>, String> {
    // A healed copy: the oracle reads what is there, without faults.
    let mut disk = storage.disk().clone();
    disk.heal();
    let mut batches = Vec::new();
    for sink in sinks {
        batches.extend(read_committed(&mut disk, sink).map_err(|e| e.to_string())?);
    }
    rows_of(&batches)
}

/// How `actual` differs from `expected` (both sorted): rows missing, rows extra, by count.
pub fn difference(expected: &[Row], actual: &[Row]) -> (Vec<Row>, Vec<Row>) {
    let (mut missing, mut extra) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < expected.len() || j < actual.len() {
        match (expected.get(i), actual.get(j)) {
            (Some(e), Some(a)) if e == a => {
                i += 1;
                j += 1;
            }
            (Some(e), Some(a)) if e < a => {
                missing.push(e.clone());
                i += 1;
            }
            (Some(_), Some(a)) => {
                extra.push(a.clone());
                j += 1;
            }
            (Some(e), None) => {
                missing.push(e.clone());
                i += 1;
            }
            (None, Some(a)) => {
                extra.push(a.clone());
                j += 1;
            }
            (None, None) => unreachable!("loop condition"),
        }
    }
    (missing, extra)
}

/// Per key, a window's `(count, sum)` totalled.
pub type Totals = BTreeMap<u64, (u64, i64)>;

/// What a run's committed output must be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Exactly these rows (sorted): a failure-free reference run's.
    Rows(Vec<Row>),
    /// Rows `key, window_start, window_end, count, sum` whose counts and sums total these per
    /// key (`workload::w5_totals`), in whatever windows.
    Totals(Totals),
}

/// How committed output differs from what was expected: what it lacks (a record lost) and what
/// it has beyond (a record repeated, or output that should not be there), each described.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mismatch {
    pub lacking: Option<String>,
    pub beyond: Option<String>,
}

impl Mismatch {
    fn describe(&self) -> String {
        let parts: Vec<&str> = [&self.lacking, &self.beyond].into_iter().flatten().map(String::as_str).collect();
        parts.join("; ")
    }
}

/// Per key, the totals of `count` and `sum` over window rows `key, window_start, window_end,
/// count, sum` (wide integers: doctored or repeated output must not overflow the check).
pub fn totals_of(rows: &[Row]) -> Result<BTreeMap<i128, (i128, i128)>, String> {
    let mut totals = BTreeMap::<i128, (i128, i128)>::new();
    for row in rows {
        let [key, _start, _end, count, sum] = row.as_slice() else {
            return Err(format!("a window row has {} columns, not 5 (key, start, end, count, sum)", row.len()));
        };
        let total = totals.entry(*key).or_default();
        total.0 += count;
        total.1 += sum;
    }
    Ok(totals)
}

/// How `committed` (sorted) differs from `expected`.
pub fn compare(expected: &Expected, committed: &[Row]) -> Result<Mismatch, String> {
    match expected {
        Expected::Rows(reference) => {
            let (missing, extra) = difference(reference, committed);
            Ok(Mismatch {
                lacking: (!missing.is_empty())
                    .then(|| format!("{} rows missing (first {:?})", missing.len(), missing.first())),
                beyond: (!extra.is_empty())
                    .then(|| format!("{} rows extra or repeated (first {:?})", extra.len(), extra.first())),
            })
        }
        Expected::Totals(totals) => {
            let actual = totals_of(committed)?;
            let expected: BTreeMap<i128, (i128, i128)> = totals
                .iter()
                .map(|(&key, &(count, sum))| (i128::from(key), (i128::from(count), i128::from(sum))))
                .collect();
            let keys: std::collections::BTreeSet<i128> = expected.keys().chain(actual.keys()).copied().collect();
            let (mut lacking, mut beyond) = (Vec::new(), Vec::new());
            for key in keys {
                let want = expected.get(&key).copied().unwrap_or_default();
                let got = actual.get(&key).copied().unwrap_or_default();
                let line = format!("key {key}: count {} of {}, sum {} of {}", got.0, want.0, got.1, want.1);
                if got.0 < want.0 || got.1 < want.1 {
                    lacking.push(line.clone());
                }
                if got.0 > want.0 || got.1 > want.1 {
                    beyond.push(line);
                }
            }
            let describe = |keys: &[String], what: &str| {
                (!keys.is_empty()).then(|| format!("{} keys {what} (first {})", keys.len(), keys[0]))
            };
            Ok(Mismatch {
                lacking: describe(&lacking, "below their totals"),
                beyond: describe(&beyond, "above their totals"),
            })
        }
    }
}

/// A check that failed, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub check: String,
    pub detail: String,
}

/// The oracle's judgement of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Finished with exactly the reference output.
    ExactlyOnce,
    /// Refused to go on after durable damage, with no wrong output committed.
    RefusedCorrectly {
        error: String,
    },
    Failed(Failure),
}

impl Verdict {
    pub fn is_failure(&self) -> bool {
        matches!(self, Verdict::Failed(_))
    }
}

fn failed(check: &str, detail: String) -> Verdict {
    Verdict::Failed(Failure { check: check.to_string(), detail })
}

/// Judges a run against what its output must be.
pub fn judge(run: &ClusterRun, expected: &Expected) -> Verdict {
    match committed_rows(&run.storage, &run.file_sinks) {
        Ok(committed) => judge_committed(&run.outcome, run.durable_damage, &committed, expected),
        Err(error) => failed("committed output readable", error),
    }
}

/// Judges how a run ended (`outcome`, with or without durable damage) and what it committed
/// (sorted rows).
pub fn judge_committed(outcome: &Outcome, durable_damage: bool, committed: &[Row], expected: &Expected) -> Verdict {
    let mismatch = match compare(expected, committed) {
        Ok(mismatch) => mismatch,
        Err(error) => return failed("committed output readable", error),
    };
    match outcome {
        Outcome::Violation(violation) => failed(violation.check, violation.detail.clone()),
        Outcome::Stuck { detail } => failed("liveness", detail.clone()),
        Outcome::Finished if mismatch == Mismatch::default() => Verdict::ExactlyOnce,
        Outcome::Finished => failed("exactly once", mismatch.describe()),
        Outcome::Refused { error } if !durable_damage => failed(
            "refuses only after durable damage",
            format!("the job refused to go on without durable damage to the disk: {error}"),
        ),
        Outcome::Refused { error } if mismatch.beyond.is_some() => failed(
            "no wrong output before a refusal",
            format!("refused ({error}), and committed wrong output: {}", mismatch.beyond.unwrap_or_default()),
        ),
        Outcome::Refused { error } => Verdict::RefusedCorrectly { error: error.clone() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the difference of two sorted multisets names each missing and each repeated row.
    #[test]
    fn difference_counts_missing_and_repeated_rows() {
        let row = |v: i128| vec![v];
        let expected = vec![row(1), row(2), row(2), row(3)];
        let actual = vec![row(2), row(3), row(3), row(4)];
        let (missing, extra) = difference(&expected, &actual);
        assert_eq!(missing, vec![row(1), row(2)]);
        assert_eq!(extra, vec![row(3), row(4)]);
        assert_eq!(difference(&expected, &expected), (vec![], vec![]));
    }

    // Goal: the totals check sees a record lost (a key below its total), a record counted twice
    // (above), and output for a key without records, whatever windows the rows name.
    // Method: rows of two keys against their totals, then each changed.
    #[test]
    fn totals_compare_per_key() {
        let expected = Expected::Totals(BTreeMap::from([(1, (3, 30)), (2, (1, 5))]));
        let rows = vec![vec![1, 0, 20, 2, 10], vec![1, 20, 40, 1, 20], vec![2, 0, 20, 1, 5]];
        assert_eq!(compare(&expected, &rows), Ok(Mismatch::default()));
        let lost = compare(&expected, &rows[1..]).unwrap();
        assert!(lost.lacking.is_some() && lost.beyond.is_none(), "{lost:?}");
        let twice: Vec<Row> = rows.iter().chain(&rows[2..]).cloned().collect();
        let repeated = compare(&expected, &twice).unwrap();
        assert!(repeated.lacking.is_none() && repeated.beyond.is_some(), "{repeated:?}");
        let stranger: Vec<Row> = rows.iter().cloned().chain([vec![7, 0, 20, 1, 0]]).collect();
        assert!(compare(&expected, &stranger).unwrap().beyond.unwrap().contains("key 7"));
        assert!(compare(&expected, &[vec![1, 2]]).is_err(), "a row that is not a window");
    }
}
