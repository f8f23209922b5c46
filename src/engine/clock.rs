//! Wall-clock time for bucketing usage (days, hours): injectable so tests need not wait.

use std::time::SystemTime;

/// A source of wall-clock time. The engine reads it to name time buckets and to find the next
/// bucket boundary; its timers still run on tokio's clock.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
