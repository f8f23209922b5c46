//! Counters the flusher keeps and anyone can read: relaxed atomics, so reading is cheap.
//!
//! # Synchronization
//!
//! The flusher task is the only writer of every field (its `PollTimed` wrapper runs inside the
//! same task), so a counter is advanced with a plain `load` + `store`, not a read-modify-write:
//! no other write can come between the two. The one exception is `polls`: the flusher's write
//! and read tasks (`flusher.rs`) time their own polls, each kind in a record of its own, and a
//! record's tasks never overlap (the next is spawned after the last one's output was taken).
//! `Relaxed` is enough on both sides: a reader wants each value on its own, never ordered with
//! other memory (a snapshot is not a consistent cut), and a caller that waited for the
//! flusher's reply (`set_enabled`, `flush_now`) is ordered after the flusher's stores by the
//! reply channel itself. (The next write task is ordered after the last one's stores by the
//! task's completion, which the flusher awaited.)

use crate::sink::within_poll;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Written by the flusher task only (the poll records: by the task each one times, module
/// docs); read by [`Engine::stats`](super::Engine::stats).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Whether the flusher meters (it applies `set_enabled`, so it alone publishes the state).
    enabled: AtomicBool,
    pub(crate) config_errors: AtomicU64,
    /// Why the last write round failed; `None` once one succeeds. A lock, not an atomic: a
    /// string, written only when a round fails.
    last_write_error: Mutex<Option<String>>,
    pub(crate) sweeps: AtomicU64,
    pub(crate) sessions_ended: AtomicU64,
    pub(crate) amount_swept: AtomicU64,
    pub(crate) amount_discarded: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) batches_written: AtomicU64,
    pub(crate) duplicate_batches: AtomicU64,
    pub(crate) keys_written: AtomicU64,
    pub(crate) amount_written: AtomicU64,
    pub(crate) keys_rejected: AtomicU64,
    pub(crate) amount_rejected: AtomicU64,
    pub(crate) write_failures: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) pending_amount: AtomicU64,
    pub(crate) pending_keys: AtomicU64,
    pub(crate) sink_commands: AtomicU64,
    pub(crate) last_flush_micros: AtomicU64,
    pub(crate) account_reads: AtomicU64,
    /// The polls of the flusher task and of the write and read tasks it spawns, one record per
    /// kind of task ([`Task`]).
    polls: [PollRecord; 3],
    pub(crate) tracked_accounts: AtomicU64,
}

/// The engine's tasks whose polls are timed, each with a record of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Task {
    /// The flusher: sweeps, totals, batches, settling, the read side.
    Flusher = 0,
    /// A write of batches to the sink, one at a time.
    Write = 1,
    /// A read of global totals from the sink, one at a time.
    Read = 2,
}

/// The polls of one kind of task (one task at a time: its only writer).
#[derive(Debug, Default)]
struct PollRecord {
    /// The longest poll: wall-clock microseconds in the high half, CPU microseconds in the low
    /// half (each saturating at `u32::MAX`, 71 minutes). One atomic, so that a reader never
    /// pairs one poll's CPU time with an older, shorter wall-clock time.
    longest: AtomicU64,
    /// Polls over [`LONG_POLL`] of CPU.
    long: AtomicU64,
    /// Every poll.
    all: AtomicU64,
}

/// A point-in-time copy of the engine's counters. Amounts are in the unit of `add` (saturating).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Sweeps of all slots (periodic, bucket boundaries, `flush_now`, shutdown).
    pub sweeps: u64,
    /// Sessions whose end the flusher has collected.
    pub sessions_ended: u64,
    /// Everything collected from the ledger: every `add` that reached a sweep.
    pub amount_swept: u64,
    /// Collected while the engine was disabled, and therefore not written.
    pub amount_discarded: u64,
    /// Writes started. A write sends, pipelined, the batches built since the previous write
    /// was answered, or re-sends the ones it left unacknowledged; a round of many keys takes
    /// several, the first sent while the rest are still being built.
    pub flushes: u64,
    /// Batches the sink acknowledged.
    pub batches_written: u64,
    /// Of those, batches the sink had already applied (a retry after a lost reply).
    pub duplicate_batches: u64,
    /// Key increments acknowledged.
    pub keys_written: u64,
    /// Amount acknowledged.
    pub amount_written: u64,
    /// Increments the sink refused for good (e.g. the key holds a non-integer).
    pub keys_rejected: u64,
    /// Amount of those increments.
    pub amount_rejected: u64,
    /// Writes that failed (sink unavailable, error, timeout or misconfiguration).
    pub write_failures: u64,
    /// Of those, writes the sink failed because it is misconfigured
    /// ([`SinkError::Misconfigured`](crate::sink::SinkError::Misconfigured): a database, a
    /// password or a permission the target refuses). Retried at the longest backoff, logged
    /// at `ERROR`.
    pub config_errors: u64,
    /// Why the last write failed, while failures go on; `None` once a write succeeds (and
    /// before any failed).
    pub last_write_error: Option<String>,
    /// Writes that re-sent unacknowledged batches.
    pub retries: u64,
    /// Amount swept and not yet acknowledged.
    pub pending_amount: u64,
    /// Entries holding such an amount: one per key waiting for a batch, one per increment in a
    /// batch not yet acknowledged. A key in flight and waiting again counts twice, so this is
    /// at most twice the distinct keys, however many flushes fail.
    pub pending_keys: u64,
    /// Commands the sink sent (for Redis: `EVALSHA`/`SCRIPT LOAD` calls).
    pub sink_commands: u64,
    /// How long the last write took, from send to answer, in microseconds.
    pub last_flush_micros: u64,
    /// Global totals read for the read side (one per account: its first session in a bucket,
    /// or a full sweep that had nothing of it to write).
    pub account_reads: u64,
    /// Accounts whose usage the read side tracks: those with an open session, and those whose
    /// last session ended since the last full sweep.
    pub tracked_accounts: u64,
    /// The longest time one poll of the engine's tasks held a runtime worker, in microseconds:
    /// how long the engine could have delayed the gateway's own tasks on that worker. The
    /// tasks are the flusher and the write and read tasks it spawns, one of each at a time (a
    /// write's encoding and its answers are its own task's work, so that they are not added
    /// to the flusher's in one poll).
    pub longest_flusher_poll_micros: u64,
    /// The most CPU time one poll of those tasks used, in microseconds: the work in that
    /// poll, without the time the OS ran other threads on that worker meanwhile (which
    /// `longest_flusher_poll_micros` includes; the two maxima may come from different polls,
    /// and this one is never the larger). 0 where the platform has no per-thread CPU clock
    /// (it is read on Unix).
    pub longest_flusher_poll_cpu_micros: u64,
    /// Polls of those tasks that used more than 1 ms of CPU: how often they held a
    /// runtime worker for longer than a gateway's tasks should wait (the longest alone cannot
    /// tell one outlier from a habit).
    pub long_flusher_polls: u64,
    /// Polls of those tasks in all: `long_flusher_polls` of how many, a rate to set against
    /// what the machine alone gives polls of the same length (`docs/benchmarks.md`).
    pub flusher_polls: u64,
    /// Session slots in use (open, or ended and not yet collected).
    pub slots_in_use: u64,
    /// Amount dropped because a session's total in one shard reached `u64::MAX`.
    pub saturated_amount: u64,
}

impl Stats {
    /// Advances `counter` by `amount`, saturating. Only the counter's single writer calls it.
    pub(crate) fn add(counter: &AtomicU64, amount: u128) {
        let amount = u64::try_from(amount).unwrap_or(u64::MAX);
        // Relaxed load and store: the caller is the counter's only writer (the flusher, or for
        // a poll record its task), so nothing can come between them; readers need no ordering
        // (module docs).
        let total = counter.load(Ordering::Relaxed).saturating_add(amount);
        counter.store(total, Ordering::Relaxed);
    }

    /// Publishes `value` (a gauge, or a total the flusher keeps exactly), saturating.
    pub(crate) fn set(counter: &AtomicU64, value: u128) {
        // Relaxed: the flusher is the only writer; readers need no ordering (module docs).
        counter.store(u64::try_from(value).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Publishes whether the flusher meters.
    pub(crate) fn publish_enabled(&self, enabled: bool) {
        // Relaxed: `set_enabled`'s caller is ordered after this store by the flusher's reply
        // (a channel); other readers want the latest state only (module docs).
        self.enabled.store(enabled, Ordering::Relaxed);
    }

    /// Whether the flusher meters, as it last published.
    pub(crate) fn enabled(&self) -> bool {
        // Relaxed: see `publish_enabled`.
        self.enabled.load(Ordering::Relaxed)
    }

    /// Publishes why the last write round failed, or `None` after a success.
    pub(crate) fn set_last_write_error(&self, error: Option<&str>) {
        let mut last = self
            .last_write_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_deref() != error {
            *last = error.map(str::to_owned);
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        // Relaxed: each counter is read on its own; a snapshot is not a consistent cut.
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        // Each record's wall-clock and CPU time from one store. Per record CPU <= wall-clock, so
        // the greatest CPU time is at most the greatest wall-clock time too.
        let longest = self.polls.iter().map(|record| read(&record.longest));
        let (wall, cpu) = longest.fold((0, 0), |(wall, cpu), polls| {
            (
                u64::max(wall, polls >> 32),
                cpu.max(polls & u64::from(u32::MAX)),
            )
        });
        StatsSnapshot {
            sweeps: read(&self.sweeps),
            sessions_ended: read(&self.sessions_ended),
            amount_swept: read(&self.amount_swept),
            amount_discarded: read(&self.amount_discarded),
            flushes: read(&self.flushes),
            batches_written: read(&self.batches_written),
            duplicate_batches: read(&self.duplicate_batches),
            keys_written: read(&self.keys_written),
            amount_written: read(&self.amount_written),
            keys_rejected: read(&self.keys_rejected),
            amount_rejected: read(&self.amount_rejected),
            write_failures: read(&self.write_failures),
            config_errors: read(&self.config_errors),
            last_write_error: self
                .last_write_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            retries: read(&self.retries),
            pending_amount: read(&self.pending_amount),
            pending_keys: read(&self.pending_keys),
            sink_commands: read(&self.sink_commands),
            last_flush_micros: read(&self.last_flush_micros),
            account_reads: read(&self.account_reads),
            longest_flusher_poll_micros: wall,
            longest_flusher_poll_cpu_micros: cpu,
            long_flusher_polls: self.polls.iter().map(|record| read(&record.long)).sum(),
            flusher_polls: self.polls.iter().map(|record| read(&record.all)).sum(),
            tracked_accounts: read(&self.tracked_accounts),
            slots_in_use: 0,
            saturated_amount: 0,
        }
    }
}

/// Runs one of the engine's tasks and records its longest poll: the figure that says whether
/// the engine ever holds a runtime worker long enough to delay the gateway's audio tasks.
pub(crate) struct PollTimed<F> {
    inner: Pin<Box<F>>,
    stats: Arc<Stats>,
    task: Task,
}

impl<F: Future> PollTimed<F> {
    pub(crate) fn new(inner: F, stats: Arc<Stats>, task: Task) -> Self {
        Self {
            inner: Box::pin(inner),
            stats,
            task,
        }
    }
}

impl<F: Future> Future for PollTimed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let started = Instant::now();
        let cpu_started = thread_cpu_time();
        // The loops the poll runs share one slice budget, from its start.
        let output = within_poll(started, || self.inner.as_mut().poll(cx));
        // The CPU span nests inside the wall-clock span (read last at the start, first at the
        // end), so a poll's CPU time never exceeds its wall-clock time.
        let cpu_ended = thread_cpu_time();
        // A poll runs on one thread from start to end, so the thread's CPU clock measures it.
        let cpu = match (cpu_started, cpu_ended) {
            (Some(from), Some(to)) => to.saturating_sub(from),
            _ => Duration::ZERO,
        };
        let record = &self.stats.polls[self.task as usize];
        raise_longest_poll(&record.longest, started.elapsed(), cpu);
        Stats::add(&record.all, 1);
        if cpu > LONG_POLL {
            Stats::add(&record.long, 1);
        }
        output
    }
}

/// CPU time above which a poll of the flusher counts in [`StatsSnapshot::long_flusher_polls`]:
/// the engine's target for the longest poll (`docs/benchmarks.md`).
pub(crate) const LONG_POLL: Duration = Duration::from_millis(1);

/// Raises the longest poll's wall-clock and CPU times (packed as in `Stats`) to `wall` and
/// `cpu` where those are longer. Per poll `cpu <= wall`, so the maxima keep that order too.
fn raise_longest_poll(longest: &AtomicU64, wall: Duration, cpu: Duration) {
    let micros = |took: Duration| {
        u64::try_from(took.as_micros()).map_or(u64::from(u32::MAX), |m| m.min(u64::from(u32::MAX)))
    };
    // Relaxed load and store: the record's one task at a time is its only writer (module docs),
    // and readers want a statistic, not an ordering.
    let old = longest.load(Ordering::Relaxed);
    let new = (old >> 32).max(micros(wall)) << 32 | (old & u64::from(u32::MAX)).max(micros(cpu));
    if new != old {
        longest.store(new, Ordering::Relaxed);
    }
}

/// CPU time the calling thread has used so far, where the platform has a per-thread clock.
/// A system call (not in the vDSO) of well under a microsecond, twice per poll of the flusher,
/// whose polls are few and each do a slice of work.
#[cfg(unix)]
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` that the call only writes;
    // `CLOCK_THREAD_CPUTIME_ID` needs no other argument.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    let seconds = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    (result == 0).then(|| Duration::new(seconds, nanos))
}

#[cfg(not(unix))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A future that uses `cpu` of the thread's CPU time, then is ready.
    fn spin(cpu: Duration) -> impl Future<Output = ()> {
        std::future::poll_fn(move |_| {
            let started = thread_cpu_time().expect("a thread CPU clock");
            while thread_cpu_time().expect("a thread CPU clock") - started < cpu {}
            Poll::Ready(())
        })
    }

    #[test]
    fn polls_over_a_millisecond_of_cpu_are_counted() {
        let stats = Arc::new(Stats::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polls = [
            (1_500, Task::Flusher),
            (10, Task::Write),
            (2_000, Task::Read),
            (300, Task::Flusher),
            (1_200, Task::Write),
        ];
        for (cpu, task) in polls {
            let mut poll = PollTimed::new(spin(Duration::from_micros(cpu)), stats.clone(), task);
            assert!(Pin::new(&mut poll).poll(&mut cx).is_ready());
        }
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.long_flusher_polls, 3, "counted in every task");
        assert_eq!(snapshot.flusher_polls, 5);
        assert!(
            snapshot.longest_flusher_poll_cpu_micros >= 2_000,
            "the read task's"
        );
        assert!(snapshot.longest_flusher_poll_micros >= snapshot.longest_flusher_poll_cpu_micros);
    }

    #[test]
    fn the_loops_of_one_poll_share_its_slice_budget() {
        let stats = Arc::new(Stats::default());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // A loop that begins after the poll ran its budget yields at its first pause.
        let late_loop = std::future::poll_fn(|_| {
            std::thread::sleep(crate::sink::SLICE_BUDGET);
            Poll::Ready(crate::sink::Slicer::new().spent())
        });
        let mut poll = PollTimed::new(late_loop, stats, Task::Flusher);
        assert_eq!(Pin::new(&mut poll).poll(&mut cx), Poll::Ready(true));
    }
}
