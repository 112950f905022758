//! Time as the kernel sees it: event time carried by records, processing time passed in by the driver.
//!
//! The kernel never reads a clock. The driver reads its `env::Clock` and passes the reading into every
//! `handle_*` call as an [`Instant`]; event time comes from a column of the records themselves.

use std::fmt;

pub mod watermarks;

/// An event time in milliseconds, as carried in a record's event-time column (Arrow `Int64`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventTime(pub i64);

impl EventTime {
    /// Below every event time: the watermark of a stream that has promised nothing yet.
    pub const MIN: EventTime = EventTime(i64::MIN);
    /// Above every event time: the watermark that closes a finite stream.
    pub const MAX: EventTime = EventTime(i64::MAX);
}

impl fmt::Debug for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EventTime::MIN => write!(f, "EventTime(MIN)"),
            EventTime::MAX => write!(f, "EventTime(MAX)"),
            EventTime(ms) => write!(f, "EventTime({ms}ms)"),
        }
    }
}

/// A processing-time reading in milliseconds since the driver's own epoch (monotonic, not wall time).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Instant(pub u64);

impl Instant {
    pub fn saturating_add_ms(self, ms: u64) -> Instant {
        Instant(self.0.saturating_add(ms))
    }

    pub fn saturating_sub(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Bounded out-of-orderness: the watermark trails the highest event time seen by a fixed bound.
///
/// A watermark `W` promises that no record with event time `< W` follows. With bound `d`, the
/// generator emits `max_seen - d`, so a record may arrive up to `d` ms behind the newest one.
#[derive(Clone, Debug)]
pub struct BoundedOutOfOrderness {
    bound_ms: i64,
    event_time_max: EventTime,
    watermark_emitted: EventTime,
}

impl BoundedOutOfOrderness {
    pub fn new(bound_ms: i64) -> BoundedOutOfOrderness {
        assert!(bound_ms >= 0, "out-of-orderness bound {bound_ms} ms must not be negative");
        BoundedOutOfOrderness { bound_ms, event_time_max: EventTime::MIN, watermark_emitted: EventTime::MIN }
    }

    pub fn bound_ms(&self) -> i64 {
        self.bound_ms
    }

    /// Feeds the highest event time of a batch.
    pub fn observe(&mut self, event_time_max: EventTime) {
        self.event_time_max = self.event_time_max.max(event_time_max);
    }

    /// The watermark to emit now, if it advanced since the last one emitted.
    pub fn poll_watermark(&mut self) -> Option<EventTime> {
        if self.event_time_max == EventTime::MIN {
            return None;
        }
        let watermark = EventTime(self.event_time_max.0.saturating_sub(self.bound_ms));
        if watermark > self.watermark_emitted {
            self.watermark_emitted = watermark;
            Some(watermark)
        } else {
            None
        }
    }

    pub fn watermark_emitted(&self) -> EventTime {
        self.watermark_emitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the generator trails the maximum by the bound and never goes back.
    // Method: feed a disordered sequence and compare each emission with max-so-far minus the bound.
    #[test]
    fn bounded_out_of_orderness_trails_max_and_is_monotonic() {
        let mut generator = BoundedOutOfOrderness::new(5);
        assert_eq!(generator.poll_watermark(), None);
        let mut max = i64::MIN;
        let mut last = EventTime::MIN;
        for ts in [10, 3, 12, 11, 30, 2, 29, 31] {
            generator.observe(EventTime(ts));
            max = max.max(ts);
            if let Some(wm) = generator.poll_watermark() {
                assert_eq!(wm, EventTime(max - 5));
                assert!(wm > last);
                last = wm;
            }
            assert_eq!(generator.watermark_emitted(), EventTime(max - 5));
        }
        assert_eq!(last, EventTime(26));
    }
}
