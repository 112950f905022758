//! The exactly-once oracle: committed output compared with a failure-free reference run, row for
//! row, and the judgement of how a faulty run ended.
//!
//! - A run that finished must have committed exactly the reference rows: nothing lost, nothing
//!   twice (rows compared as sorted multisets: interleavings may order them differently).
//! - A run that refused to go on is right only if the disk was durably damaged (corruption, a
//!   misdirected write), and then what it committed must still be a part of the reference.
//! - A run that broke an invariant on the way, did not finish within the liveness bound, or
//!   panicked, failed.

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

fn describe_difference(missing: &[Row], extra: &[Row]) -> String {
    format!(
        "{} rows missing (first {:?}), {} rows extra or repeated (first {:?})",
        missing.len(),
        missing.first(),
        extra.len(),
        extra.first()
    )
}

/// Judges a run against the reference rows.
pub fn judge(run: &ClusterRun, reference: &[Row]) -> Verdict {
    let committed = match committed_rows(&run.storage, &run.file_sinks) {
        Ok(rows) => rows,
        Err(error) => return failed("committed output readable", error),
    };
    let (missing, extra) = difference(reference, &committed);
    match &run.outcome {
        Outcome::Violation(violation) => failed(violation.check, violation.detail.clone()),
        Outcome::Stuck { detail } => failed("liveness", detail.clone()),
        Outcome::Finished if missing.is_empty() && extra.is_empty() => Verdict::ExactlyOnce,
        Outcome::Finished => failed("exactly once", describe_difference(&missing, &extra)),
        Outcome::Refused { error } if !run.durable_damage => failed(
            "refuses only after durable damage",
            format!("the job refused to go on without durable damage to the disk: {error}"),
        ),
        Outcome::Refused { error } if !extra.is_empty() => failed(
            "no wrong output before a refusal",
            format!("refused ({error}), and committed wrong output: {}", describe_difference(&[], &extra)),
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
}
