//! Sinks: where flushed totals go.
//!
//! The flusher hands a sink [`Batch`]es of [`Increment`]s (a key, an amount, a TTL). It knows
//! nothing of how they are written; a sink knows nothing of sessions, shards or buckets.
//!
//! # The contract that makes flushes exactly-once
//!
//! - A batch is applied **exactly once per [`BatchId`]**, for at least the sink's dedup window. A
//!   sink may apply it in parts (`RedisSink` on a Cluster: one part per hash slot), each part at
//!   most once, and reports the batch settled only when every part is. The flusher retries a
//!   batch whose outcome it does not know (an error, a timeout, a dropped connection) with the
//!   same id and the same increments, until it settles; parts applied earlier are skipped, and a
//!   batch whose every part was applied before answers [`BatchOutcome::AlreadyApplied`].
//! - An error says whether the batch may have been (partly) applied
//!   ([`SinkError::may_have_applied`]): the shutdown report relies on it to tell amounts that are
//!   safe to replay from amounts in doubt.
//! - An error that retrying cannot fix until an operator changes a setting (the target refuses
//!   the sink's database, credentials or permissions) is [`SinkError::Misconfigured`]: the
//!   flusher still keeps the amounts and retries, but reports it as a configuration error.
//! - An increment the target refuses for good (a key holding a non-integer, an overflow) is a
//!   [`KeyOutcome::Rejected`] for that key alone; the others still apply.
//!
//! Sinks also answer reads of current totals ([`Sink::read_totals`]), for the engine's read side.
//!
//! [`MemorySink`] keeps totals in memory; `RedisSink` (feature `redis`) writes to Redis.

mod memory;
#[cfg(feature = "redis")]
pub mod redis;

pub use memory::MemorySink;

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a loop of the flusher or of a sink's write runs before it yields to the runtime.
/// Such a loop checks after each step of a few dozen items ([`Slicer::pause`]) and yields
/// once this much time has passed since the poll began (see [`Slicer`]): a step is a few dozen
/// items, tens of µs usually and a few tenths of a ms where the work per item is highest (a
/// million accounts, memory touched for the first time), and where it is cheaper many steps
/// share one yield. A yield per step cost a third of the engine's throughput at 100,000
/// accounts (`docs/benchmarks.md`).
pub(crate) const SLICE_BUDGET: Duration = Duration::from_micros(300);

/// Yields to the runtime between steps of a long loop once [`SLICE_BUDGET`] has passed since
/// the current poll of the task began, where that task's polls are marked ([`within_poll`]: the
/// engine's tasks), else since the loop's last yield (or its beginning). Counting from the poll's
/// start, the loops one poll runs one after another share one budget: with a budget each, a
/// poll that ran the end of one sweep and the beginning of the next (two `flush_now`s at once)
/// took 1.1 ms of CPU (`docs/benchmarks.md`). Wall-clock time: a thread the OS paused meanwhile
/// yields sooner, never later.
#[derive(Debug)]
pub(crate) struct Slicer {
    since: Instant,
}

std::thread_local! {
    /// When the marked poll running on this thread began, if one is.
    static POLL_STARTED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Runs `poll` (one poll of a task) marked as begun at `started`: the [`Slicer`]s it runs count
/// their budget from then. The mark is undone afterwards, also if `poll` panics.
pub(crate) fn within_poll<R>(started: Instant, poll: impl FnOnce() -> R) -> R {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            POLL_STARTED.set(self.0);
        }
    }
    let _restore = Restore(POLL_STARTED.replace(Some(started)));
    poll()
}

impl Slicer {
    pub(crate) fn new() -> Self {
        Self {
            since: Instant::now(),
        }
    }

    /// Whether the budget is spent: for a loop that ends its turn rather than awaits a yield.
    pub(crate) fn spent(&self) -> bool {
        self.budget_spent()
    }

    /// What [`Slicer::spent`] says (apart so that `scripts/poll-trace.sh` can mark `spent` and
    /// `pause` as step boundaries and still share this).
    fn budget_spent(&self) -> bool {
        let since = POLL_STARTED.get().unwrap_or(self.since);
        since.elapsed() >= SLICE_BUDGET
    }

    /// Called between two steps: yields if the budget is spent.
    pub(crate) async fn pause(&mut self) {
        if self.budget_spent() {
            tokio::task::yield_now().await;
            self.since = Instant::now();
        }
    }
}

/// Identifies a batch for deduplication: the writing engine's random id and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// Random per engine instance, so two engines (or two runs) never share ids.
    pub writer: u64,
    /// Increases by one per batch of that writer.
    pub sequence: u64,
}

impl std::fmt::Display for BatchId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}-{}", self.writer, self.sequence)
    }
}

/// A counter's key. Shared, not copied: the engine builds an account's key once per time
/// bucket and hands the same allocation to every flush.
pub type Key = std::sync::Arc<str>;

/// Add `amount` to `key`, and make `key` expire `ttl` from now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    /// The full key, as the engine's key scheme built it.
    pub key: Key,
    /// Always 1 to `i64::MAX`: the flusher splits larger amounts over later batches.
    pub amount: u64,
    /// Never zero.
    pub ttl: Duration,
}

/// A set of increments applied together, at most once per id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Reused unchanged by every retry of this batch.
    pub id: BatchId,
    /// At most one increment per key.
    pub increments: Vec<Increment>,
}

/// What a sink did with one batch it reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Applied now; one outcome per increment, in order.
    Applied(Vec<KeyOutcome>),
    /// This id was applied by an earlier attempt (whose reply was lost); nothing changed now.
    AlreadyApplied,
}

/// What happened to one increment of an applied batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Added; `total` is the key's new value, including every other writer's additions.
    Added {
        /// The key's value after the increment.
        total: i64,
    },
    /// Refused for good (e.g. the key holds a non-integer); retrying cannot help.
    Rejected {
        /// The target's reason, for logs and reports.
        reason: String,
    },
}

/// Why a batch was not acknowledged; the flusher retries it with the same id.
/// [`SinkError::may_have_applied`] tells whether it may have been applied all the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The target could not be reached or dropped the connection.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// No reply within the time allowed.
    #[error("sink did not answer within {0:?}")]
    Timeout(Duration),
    /// The target answered with an error for the whole batch: nothing of it was applied.
    #[error("sink error: {0}")]
    Failed(String),
    /// The batch was not sent (no connection): nothing of it was applied.
    #[error("sink unavailable, batch not sent: {0}")]
    NotSent(String),
    /// The target refuses the sink's own settings (a database that does not exist, credentials
    /// or ACL permissions it rejects, a command it does not have): nothing of the batch was
    /// applied, and retrying cannot help until an operator fixes the configuration. The
    /// flusher keeps the amounts pending and retries at its longest backoff, logging at ERROR.
    #[error("sink misconfigured, nothing applied until it is fixed: {0}")]
    Misconfigured(String),
}

impl SinkError {
    /// Whether the batch may have been applied despite the error: its attempt reached the
    /// target and the answer was lost (a timeout, a connection lost after sending). `false`
    /// when the target certainly did not apply it (not sent, or refused as a whole).
    pub fn may_have_applied(&self) -> bool {
        match self {
            Self::Unavailable(_) | Self::Timeout(_) => true,
            Self::Failed(_) | Self::NotSent(_) | Self::Misconfigured(_) => false,
        }
    }
}

/// Where the flusher writes. Implementations must keep the contract in the module docs.
pub trait Sink: Send + Sync + 'static {
    /// Writes `batches`, pipelined as the sink sees fit; returns one result per batch, in order.
    fn write(
        &self,
        batches: &[Batch],
    ) -> impl Future<Output = Vec<Result<BatchOutcome, SinkError>>> + Send;

    /// Reads the current totals of `keys`, in order: `None` for a key that does not exist (or
    /// holds no integer). The engine's read side calls it for accounts whose total it has not
    /// seen in the current bucket; writes already return totals. One result for the whole call.
    fn read_totals(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<Vec<Option<i64>>, SinkError>> + Send;

    /// Commands sent to the target so far, for sinks that speak a wire protocol (0 otherwise).
    fn commands_sent(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slicer_counts_its_budget_from_the_start_of_a_marked_poll() {
        let long_ago = Instant::now() - 2 * SLICE_BUDGET;
        // A loop that begins late in a poll has only what is left of the poll's budget.
        assert!(within_poll(long_ago, || Slicer::new().spent()));
        // A loop that began in an earlier poll has a whole budget in a new one.
        let began_earlier = Slicer { since: long_ago };
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(!within_poll(later, || began_earlier.spent()));
        // Outside a marked poll (the mark undone), from its own start.
        assert!(began_earlier.spent());
    }

    #[test]
    fn the_mark_of_a_poll_is_undone_when_the_poll_panics() {
        let later = Instant::now() + Duration::from_secs(3600);
        let panicked = std::panic::catch_unwind(|| within_poll(later, || panic!("in the poll")));
        assert!(panicked.is_err());
        assert_eq!(POLL_STARTED.get(), None);
    }
}
