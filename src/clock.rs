//! The real clock: tokio's monotonic time (madsim's virtual time in a `--cfg madsim` build).

use sabot_kernel::env::Clock;
use sabot_kernel::time::Instant;

/// Milliseconds since the clock was made, from tokio's monotonic clock.
#[derive(Clone, Debug)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> TokioClock {
        TokioClock { start: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant(self.start.elapsed().as_millis() as u64)
    }
}
