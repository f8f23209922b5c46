//! After failed write rounds: when the flusher may write again ([`Backoff`]) and when it says so
//! again ([`FailureLog`]). Small values whose methods are pure functions of the instant passed
//! in, so both are tested without a runtime.

use std::time::Duration;
use tokio::time::Instant;

/// Exponential backoff with jitter over consecutive failed write rounds.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// Write rounds failed since the last one that succeeded.
    failures: u32,
    /// `failures` when the current schedule started: 0, or its value when `restart` was called
    /// (the shutdown restarts from `initial`, so that its deadline leaves room for retries).
    schedule_start: u32,
    /// No write before this instant; `None`: a write may start now.
    retry_at: Option<Instant>,
    /// xorshift64 state of the jitter, never zero: enough to spread retries of many gateways.
    jitter: u64,
}

impl Backoff {
    /// A schedule from `initial` doubling to `max` (`initial <= max <= 1 h`, checked by the
    /// engine's configuration, so that a deadline never overflows an `Instant`), with jitter
    /// seeded from `seed`.
    pub(crate) fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        Self {
            initial,
            max,
            failures: 0,
            schedule_start: 0,
            retry_at: None,
            jitter: seed | 1,
        }
    }

    /// A write round failed at `now`. The next may start after the returned delay: a random
    /// delay in the upper half of `initial * 2^(n - 1)`, capped at `max`, `n` counting the
    /// failures since the schedule started.
    pub(crate) fn failed(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        let exponent = (self.failures - self.schedule_start)
            .saturating_sub(1)
            .min(20);
        let ceiling = self.initial.saturating_mul(1 << exponent).min(self.max);
        self.wait(now, ceiling)
    }

    /// A write round failed at `now` for a reason that retrying soon cannot fix (the sink is
    /// misconfigured): the next may start after a random delay in the upper half of `max`.
    pub(crate) fn failed_for_good(&mut self, now: Instant) -> Duration {
        self.failures += 1;
        self.wait(now, self.max)
    }

    fn wait(&mut self, now: Instant, ceiling: Duration) -> Duration {
        self.jitter ^= self.jitter << 13;
        self.jitter ^= self.jitter >> 7;
        self.jitter ^= self.jitter << 17;
        let fraction = (self.jitter % 1024) as u32;
        let delay = ceiling / 2 + ceiling / 2 * fraction / 1024;
        self.retry_at = Some(now + delay);
        delay
    }

    /// A write round succeeded: the schedule starts over. Returns how many rounds failed
    /// before it.
    pub(crate) fn succeeded(&mut self) -> u32 {
        let failed = self.failures;
        *self = Self::new(self.initial, self.max, self.jitter);
        failed
    }

    /// Write rounds failed since the last one that succeeded.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// When the current wait ends; `None` when a write may start now.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Ends the current wait: a write may start now (the wait is over, or an operator asks for
    /// a flush).
    pub(crate) fn retry_now(&mut self) {
        self.retry_at = None;
    }

    /// Ends the current wait and restarts the schedule from `initial`, keeping the count of
    /// failures: a shutdown's deadline must leave room for retries after a long outage.
    pub(crate) fn restart(&mut self) {
        self.retry_at = None;
        self.schedule_start = self.failures;
    }
}

/// While write rounds keep failing, which failures are worth a `WARN` (an `ERROR` for a
/// configuration error): the first, each change of cause (a timeout becomes `NOAUTH`...), and
/// the same cause again once `interval` has passed since it was last said. An outage stays
/// visible, with its cause, without flooding the log.
#[derive(Debug)]
pub(crate) struct FailureLog {
    interval: Duration,
    /// When a failure was last said, and its cause.
    said: Option<(Instant, String)>,
}

impl FailureLog {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            said: None,
        }
    }

    /// A round failed at `now` with `cause`: whether to say so now (then it counts as said).
    pub(crate) fn failed(&mut self, now: Instant, cause: &str) -> bool {
        let due = self.said.as_ref().is_none_or(|(at, said)| {
            said != cause || now.saturating_duration_since(*at) >= self.interval
        });
        if due {
            self.said = Some((now, cause.to_owned()));
        }
        due
    }

    /// A round succeeded: the next failure is said at once.
    pub(crate) fn recovered(&mut self) {
        self.said = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn schedule() -> (Backoff, Instant) {
        (
            Backoff::new(100 * MS, 1_000 * MS, 0x5eed),
            Instant::from_std(std::time::Instant::now()),
        )
    }

    /// The delay is in the upper half of its ceiling, and the wait ends that long after `now`.
    fn assert_within(backoff: &Backoff, now: Instant, delay: Duration, ceiling: Duration) {
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "{delay:?} vs {ceiling:?}"
        );
        assert_eq!(backoff.retry_at(), Some(now + delay));
    }

    #[test]
    fn delays_double_up_to_the_max_with_jitter_in_the_upper_half() {
        let (mut backoff, mut now) = schedule();
        assert_eq!(backoff.retry_at(), None);
        for ceiling in [100, 200, 400, 800, 1_000, 1_000, 1_000] {
            let delay = backoff.failed(now);
            assert_within(&backoff, now, delay, ceiling * MS);
            now += delay;
        }
        assert_eq!(backoff.failures(), 7);
    }

    #[test]
    fn jitter_spreads_delays() {
        let (mut backoff, now) = schedule();
        for _ in 0..5 {
            backoff.failed(now);
        }
        // At the ceiling, 20 delays are not all equal.
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff.failed(now)).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn a_success_starts_the_schedule_over() {
        let (mut backoff, now) = schedule();
        for _ in 0..4 {
            backoff.failed(now);
        }
        assert_eq!(backoff.succeeded(), 4);
        assert_eq!(backoff.failures(), 0);
        assert_eq!(backoff.retry_at(), None);
        assert_eq!(backoff.succeeded(), 0);
        let delay = backoff.failed(now);
        assert_within(&backoff, now, delay, 100 * MS);
    }

    #[test]
    fn a_restart_keeps_the_count_and_starts_from_initial() {
        let (mut backoff, now) = schedule();
        for _ in 0..6 {
            backoff.failed(now);
        }
        backoff.restart();
        assert_eq!(backoff.retry_at(), None, "a write may start at once");
        let delay = backoff.failed(now);
        assert_within(&backoff, now, delay, 100 * MS);
        assert_eq!(backoff.failures(), 7);
        let delay = backoff.failed(now);
        assert_within(&backoff, now, delay, 200 * MS);
    }

    #[test]
    fn a_failure_for_good_waits_as_long_as_the_schedule_allows() {
        let (mut backoff, now) = schedule();
        let delay = backoff.failed_for_good(now);
        assert_within(&backoff, now, delay, 1_000 * MS);
        assert_eq!(backoff.failures(), 1);
        // An ordinary failure after it continues the doubling from where the count is.
        let delay = backoff.failed(now);
        assert_within(&backoff, now, delay, 200 * MS);
    }

    #[test]
    fn retry_now_ends_the_wait_only() {
        let (mut backoff, now) = schedule();
        backoff.failed(now);
        backoff.failed(now);
        backoff.retry_now();
        assert_eq!(backoff.retry_at(), None);
        let delay = backoff.failed(now);
        assert_within(&backoff, now, delay, 400 * MS);
    }

    #[test]
    fn failures_are_said_first_on_a_new_cause_and_again_after_the_interval() {
        let (_, start) = schedule();
        let mut log = FailureLog::new(Duration::from_secs(30));
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert!(log.failed(at(0), "timeout"), "the first failure");
        assert!(!log.failed(at(1), "timeout"), "the same cause soon after");
        assert!(!log.failed(at(29), "timeout"));
        assert!(
            log.failed(at(30), "timeout"),
            "the same cause, interval passed"
        );
        assert!(!log.failed(at(31), "timeout"));
        assert!(log.failed(at(32), "NOAUTH"), "a new cause");
        assert!(log.failed(at(33), "timeout"), "the old cause is new again");
        log.recovered();
        assert!(
            log.failed(at(34), "timeout"),
            "the first failure after a recovery"
        );
        assert!(!log.failed(at(35), "timeout"));
    }

    #[test]
    fn many_failures_never_overflow() {
        let (mut backoff, now) = schedule();
        for _ in 0..10_000 {
            let delay = backoff.failed(now);
            assert!(delay <= 1_000 * MS);
        }
        // The longest the engine's configuration allows.
        let hour = Duration::from_secs(3600);
        let mut longest = Backoff::new(hour, hour, 1);
        for _ in 0..40 {
            assert!(longest.failed(now) <= hour);
        }
    }
}
