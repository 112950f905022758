//! Stateless, column-wise operators: filter and projection.

use std::fmt;
use std::sync::Arc;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::{ArrowError, SchemaRef};

use super::{Context, Operator, OperatorError, OperatorMetrics};
use crate::element::Element;

type PredicateFn = dyn Fn(&RecordBatch) -> Result<BooleanArray, ArrowError> + Send + Sync;

/// Maps a batch to a mask of the rows to keep (column-wise: one call per batch, not per record).
#[derive(Clone)]
pub struct Predicate(Arc<PredicateFn>);

impl Predicate {
    pub fn new(f: impl Fn(&RecordBatch) -> Result<BooleanArray, ArrowError> + Send + Sync + 'static) -> Predicate {
        Predicate(Arc::new(f))
    }
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Predicate")
    }
}

pub struct Filter {
    name: String,
    predicate: Predicate,
    metrics: OperatorMetrics,
}

impl Filter {
    pub fn new(name: &str, predicate: Predicate) -> Filter {
        Filter { name: name.to_string(), predicate, metrics: OperatorMetrics::default() }
    }
}

impl Operator for Filter {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let mask = (self.predicate.0)(&batch)?;
        if mask.len() != batch.num_rows() {
            return Err(OperatorError::Malformed(format!(
                "{}: predicate gave {} mask values for {} rows",
                self.name,
                mask.len(),
                batch.num_rows()
            )));
        }
        let kept = arrow_select::filter::filter_record_batch(&batch, &mask)?;
        self.metrics.records_in += batch.num_rows() as u64;
        self.metrics.records_out += kept.num_rows() as u64;
        if kept.num_rows() > 0 {
            context.emit(Element::Batch(kept));
        }
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}

pub struct Project {
    indices: Vec<usize>,
    schema: SchemaRef,
    metrics: OperatorMetrics,
}

impl Project {
    pub fn new(indices: Vec<usize>, schema: SchemaRef) -> Project {
        Project { indices, schema, metrics: OperatorMetrics::default() }
    }
}

impl Operator for Project {
    fn name(&self) -> &str {
        "project"
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let projected = batch.project(&self.indices)?;
        assert_eq!(projected.schema().fields(), self.schema.fields(), "projection schema");
        self.metrics.records_in += batch.num_rows() as u64;
        self.metrics.records_out += batch.num_rows() as u64;
        context.emit(Element::Batch(projected));
        Ok(())
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}
