//! The watermark assigner: bounded out-of-orderness over a batch's event-time column.

use arrow_array::{Array, Int64Array, RecordBatch};

use super::{Context, Operator, OperatorError, OperatorMetrics};
use crate::element::Element;
use crate::time::{BoundedOutOfOrderness, EventTime};

pub struct WatermarkAssigner {
    event_time_index: usize,
    generator: BoundedOutOfOrderness,
    metrics: OperatorMetrics,
}

impl WatermarkAssigner {
    pub fn new(event_time_index: usize, bound_ms: i64) -> WatermarkAssigner {
        WatermarkAssigner {
            event_time_index,
            generator: BoundedOutOfOrderness::new(bound_ms),
            metrics: OperatorMetrics::default(),
        }
    }
}

/// The event-time column of a batch, checked to have no nulls.
pub(crate) fn event_times<'a>(
    batch: &'a RecordBatch,
    index: usize,
    operator: &str,
) -> Result<&'a [i64], OperatorError> {
    let column = batch.column(index);
    let array = column.as_any().downcast_ref::<Int64Array>().ok_or_else(|| {
        OperatorError::Malformed(format!("{operator}: event-time column is {}, not Int64", column.data_type()))
    })?;
    if array.null_count() > 0 {
        return Err(OperatorError::Malformed(format!(
            "{operator}: {} records without an event time (null)",
            array.null_count()
        )));
    }
    Ok(array.values())
}

impl Operator for WatermarkAssigner {
    fn name(&self) -> &str {
        "watermarks"
    }

    fn on_batch(&mut self, context: &mut Context<'_>, batch: RecordBatch) -> Result<(), OperatorError> {
        let rows = batch.num_rows() as u64;
        if let Some(&max) = event_times(&batch, self.event_time_index, "watermarks")?.iter().max() {
            self.generator.observe(EventTime(max));
        }
        context.emit(Element::Batch(batch));
        if let Some(watermark) = self.generator.poll_watermark() {
            context.emit(Element::Watermark(watermark));
        }
        self.metrics.records_in += rows;
        self.metrics.records_out += rows;
        Ok(())
    }

    /// Watermarks are generated here; one arriving from upstream is a plan error.
    fn on_watermark(&mut self, _context: &mut Context<'_>, watermark: EventTime) -> Result<(), OperatorError> {
        Err(OperatorError::Protocol(format!("watermarks: the stream already carries watermarks ({watermark:?})")))
    }

    fn metrics(&self) -> OperatorMetrics {
        self.metrics
    }
}
