//! The flusher task: the engine's only consumer of the ledger and only caller of the sink.
//!
//! # When it sweeps
//!
//! - every `flush_interval` (all slots);
//! - at every time-bucket boundary of the key scheme (all slots), so that usage lands in the
//!   bucket in which it was added, within the sweep's latency;
//! - `session_end_delay` after a session ends (ended sessions only; the delay coalesces bursts);
//! - on `flush_now`, on `set_enabled`, and at shutdown (all slots).
//!
//! # Attribution
//!
//! What a sweep collects was added between the previous full sweep and this one, so it is
//! charged to the bucket in which that interval *started*. Because a full sweep runs at every
//! bucket boundary, an interval never spans two buckets except for the sweep's own delay.
//!
//! # Writing
//!
//! Sweeping never waits for the sink: a write runs as a task of its own (one at a time; reads of
//! global totals likewise), whose output the flusher awaits beside its timers. A round is cut
//! into batches one slice of time per turn, and the batches built go out as soon as no write is
//! in flight, so the sink writes the first batches of a round while the flusher cuts the rest. A failed or timed-out write leaves its batches in flight,
//! re-sent unchanged (same ids) after an exponential backoff with jitter (`backoff.rs`; a
//! misconfigured sink waits the longest step at once); amounts swept meanwhile wait, merged per
//! key, for the next round. See `pending.rs` for why memory stays bounded.

use super::accounts::{AccountBook, AccountState, Budgets, ReadRequest, Registry, LOCATE_AHEAD};
use super::backoff::{Backoff, FailureLog};
use super::keys::KeyScheme;
use super::metrics;
use super::pending::{Pending, Rejection, Settlement};
use super::stats::{PollTimed, Stats, Task};
use super::{Clock, EngineError, FlushReport, ShutdownReport, SystemClock};
use crate::ledger::{Sweeper, Usage};
use crate::sink::{BatchOutcome, Sink, SinkError, Slicer};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

/// How many refused increments the shutdown report lists (all are counted in the stats).
const MAX_REPORTED_REJECTIONS: usize = 10_000;
/// While writes keep failing for the same cause, a WARN at most this often (DEBUG between).
const FAILURE_WARNING_INTERVAL: Duration = Duration::from_secs(30);
// The steps below bound the flusher's polls; `cargo bench --bench flush -- polls` measures the
// longest at a million slots and accounts (`docs/benchmarks.md`). The loops check the time
// after each step and yield once `SLICE_BUDGET` has passed (`Slicer`), so a poll is at most the
// budget plus about one step. Steps are therefore a few dozen items: tens of µs usually, 0.2-0.6
// ms where items cost the most, which is a million accounts on memory the process touches for
// the first time. A page fault there
// cost ~1.7 µs on one development machine and 6-10 µs on a fresh Firecracker guest (session 8,
// where a step of 128 swept slots with ~120 faults took 1.3-2.7 ms), and a step sized by item
// count alone cannot know which it runs on. Where items are cheaper, many steps
// share one poll.
/// Tracked accounts given new limits per step after `Engine::set_budgets` (a lookup and a
/// sequence-lock publication each).
const BUDGET_SLICE_ACCOUNTS: usize = 64;
/// Tracked accounts reviewed per step after a full sweep (a limit lookup each, and for some a
/// read wanted or the account forgotten).
const REVIEW_SLICE_ACCOUNTS: usize = 64;
/// Tracked accounts given their key in a new bucket per step (a key built and two map updates
/// each).
const REKEY_SLICE_ACCOUNTS: usize = 64;
/// New accounts the flusher starts tracking per step (7-30 µs each while a million sessions
/// open: a key built, two map inserts, a view published; the maps' growth faults in pages).
const ACCOUNTS_TRACKED_PER_STEP: usize = 8;
/// Shards of the pending map given their table per step before a sweep (at a million keys a
/// new table is ~600 KB: an allocation and the first page faults of its control bytes).
const PREPARE_SLICE_SHARDS: usize = 2;
/// Slots swept (and ended sessions collected) per step: 3-4 µs each with every slot active
/// (sweep, aggregation, the account's view published), up to ~20 µs in the first sweep after
/// start-up, whose pending tables fault in a page per key; idle slots cost a few ns each.
const SWEEP_SLICE_SLOTS: usize = 16;
/// Keys of a round cut into batches per step (~0.2 µs each at a million keys, and a shard's
/// ~4,000 entries moved at once, ~0.1 ms, when the step reaches a new shard).
const CUT_STEP_KEYS: usize = 256;
/// Increments of a write's answers applied per step, each with its account's publication on the
/// read side: 1.2–3.4 µs each at a million accounts.
const SETTLE_SLICE_KEYS: usize = 32;

pub(crate) enum Command {
    FlushNow(oneshot::Sender<Result<FlushReport, EngineError>>),
    SetEnabled(bool, oneshot::Sender<()>),
    SetFlushInterval(Duration, oneshot::Sender<()>),
    SetBudgets(Budgets, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<ShutdownReport>),
}

#[derive(Clone)]
pub(crate) struct FlusherConfig {
    pub(crate) flush_interval: Duration,
    pub(crate) session_end_delay: Duration,
    pub(crate) batch_size: usize,
    pub(crate) write_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    pub(crate) keys: KeyScheme,
    pub(crate) budgets: Budgets,
    pub(crate) clock: Arc<dyn Clock>,
}

impl Default for FlusherConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(60),
            session_end_delay: Duration::from_millis(200),
            batch_size: 500,
            write_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            keys: KeyScheme::new("shardmeter:usage"),
            budgets: Budgets::unlimited(),
            clock: Arc::new(SystemClock),
        }
    }
}

impl FlusherConfig {
    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        validate_flush_interval(self.flush_interval)?;
        let check = |ok: bool, message: String| {
            if ok {
                Ok(())
            } else {
                Err(EngineError::InvalidConfig(message))
            }
        };
        check(
            self.session_end_delay <= Duration::from_secs(60),
            format!(
                "session_end_delay must be at most 60 s, got {:?}",
                self.session_end_delay
            ),
        )?;
        check(
            (1..=100_000).contains(&self.batch_size),
            format!(
                "batch_size must be 1 to 100000 keys, got {}",
                self.batch_size
            ),
        )?;
        check(
            (Duration::from_millis(10)..=Duration::from_secs(600)).contains(&self.write_timeout),
            format!(
                "write_timeout must be 10 ms to 10 min, got {:?}",
                self.write_timeout
            ),
        )?;
        check(
            self.shutdown_timeout <= Duration::from_secs(3600),
            format!(
                "shutdown_timeout must be at most 1 h, got {:?}",
                self.shutdown_timeout
            ),
        )?;
        check(
            self.retry_initial >= Duration::from_millis(1)
                && self.retry_max >= self.retry_initial
                && self.retry_max <= Duration::from_secs(3600),
            format!(
                "retry backoff needs 1 ms <= initial <= max <= 1 h, got {:?} and {:?}",
                self.retry_initial, self.retry_max
            ),
        )?;
        self.keys.validate()?;
        Ok(())
    }
}

impl std::fmt::Debug for FlusherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlusherConfig")
            .field("flush_interval", &self.flush_interval)
            .field("session_end_delay", &self.session_end_delay)
            .field("batch_size", &self.batch_size)
            .field("write_timeout", &self.write_timeout)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("retry_initial", &self.retry_initial)
            .field("retry_max", &self.retry_max)
            .field("keys", &self.keys)
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

/// Checks a flush interval (at build time and when it is changed at run time).
pub(crate) fn validate_flush_interval(interval: Duration) -> Result<(), EngineError> {
    if (Duration::from_millis(10)..=Duration::from_secs(86_400)).contains(&interval) {
        Ok(())
    } else {
        Err(EngineError::InvalidConfig(format!(
            "flush_interval must be 10 ms to 24 h, got {interval:?}"
        )))
    }
}

type WriteResults = Vec<Result<BatchOutcome, SinkError>>;
type ReadResults = Result<Vec<Option<i64>>, SinkError>;
/// A write in flight: its results (`None` if it timed out) and how long it took.
type WriteTask = Spawned<(Option<WriteResults>, Duration)>;
/// A read in flight: what it asked for and the answers.
type ReadTask = Spawned<(ReadRequest, ReadResults)>;

struct FlushWaiter {
    reply: oneshot::Sender<Result<FlushReport, EngineError>>,
    /// `Settled::written` and `Settled::rejected` at the call.
    written_before: Tally,
    rejected_before: Tally,
    /// Increments refused while the caller waits (the first `MAX_REPORTED_REJECTIONS`).
    rejected: Vec<Rejection>,
    /// The write round that carries everything pending at the call.
    round: u64,
}

/// What the sink settled over the engine's life: the flusher's own exact totals, which the stats
/// publish (saturating at `u64::MAX`), and the refusals the shutdown report lists.
#[derive(Debug, Default)]
struct Settled {
    written: Tally,
    rejected: Tally,
    /// The first `MAX_REPORTED_REJECTIONS` increments refused.
    rejections: Vec<Rejection>,
}

/// Increments and their amount.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    keys: u64,
    amount: u128,
}

impl Tally {
    fn add(&mut self, keys: u64, amount: u128) {
        self.keys += keys;
        self.amount += amount;
    }

    fn since(self, before: Tally) -> Tally {
        Tally {
            keys: self.keys - before.keys,
            amount: self.amount - before.amount,
        }
    }
}

pub(crate) struct Flusher<S> {
    config: FlusherConfig,
    enabled: bool,
    sweeper: Sweeper,
    sink: Arc<S>,
    session_ended: Arc<Notify>,
    commands: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    /// Where sessions find their account's state; the flusher forgets unused ones there.
    registry: Arc<Registry>,
    /// Accounts whose first session just opened.
    new_accounts: mpsc::UnboundedReceiver<Arc<AccountState>>,
    /// The read side: per-account usage, published to sessions.
    book: AccountBook,
    read: Option<ReadTask>,
    usage: Vec<Usage>,
    pending: Pending,
    /// When the interval that the next sweep closes began (the last full sweep).
    interval_start: SystemTime,
    write: Option<WriteTask>,
    backoff: Backoff,
    failure_log: FailureLog,
    ended_due: Option<Instant>,
    waiters: Vec<FlushWaiter>,
    settled: Settled,
    /// Writes started (the `flushes` stat), numbering the `flush_write` spans.
    writes_started: u64,
}

/// What the engine's handles, sessions and ledger tell the flusher.
pub(crate) struct Inbox {
    pub(crate) commands: mpsc::Receiver<Command>,
    /// Woken when a session's last handle drops.
    pub(crate) session_ended: Arc<Notify>,
    /// Accounts whose first session just opened.
    pub(crate) new_accounts: mpsc::UnboundedReceiver<Arc<AccountState>>,
}

impl<S: Sink> Flusher<S> {
    pub(crate) fn new(
        config: FlusherConfig,
        enabled: bool,
        sweeper: Sweeper,
        sink: S,
        inbox: Inbox,
        stats: Arc<Stats>,
        registry: Arc<Registry>,
    ) -> Self {
        let Inbox {
            commands,
            session_ended,
            new_accounts,
        } = inbox;
        let writer = random_u64();
        let now = config.clock.now();
        stats.publish_enabled(enabled);
        let backoff = Backoff::new(config.retry_initial, config.retry_max, writer);
        Self {
            interval_start: now,
            book: AccountBook::new(config.keys.clone(), config.budgets.clone(), now),
            registry,
            new_accounts,
            read: None,
            pending: Pending::new(writer, config.batch_size),
            config,
            enabled,
            sweeper,
            sink: Arc::new(sink),
            session_ended,
            commands,
            stats,
            usage: Vec::new(),
            write: None,
            backoff,
            failure_log: FailureLog::new(FAILURE_WARNING_INTERVAL),
            ended_due: None,
            waiters: Vec::new(),
            settled: Settled::default(),
            writes_started: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut ticker = flush_ticker(self.config.flush_interval);
        loop {
            let boundary = self.next_boundary();
            let session_ended = self.session_ended.clone();
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::FlushNow(reply)) => self.flush_now(reply).await,
                    Some(Command::SetEnabled(enabled, reply)) => {
                        self.set_enabled(enabled).await;
                        let _ = reply.send(());
                    }
                    Some(Command::SetFlushInterval(interval, reply)) => {
                        self.config.flush_interval = interval;
                        ticker = flush_ticker(interval);
                        tracing::info!(?interval, "flush interval changed");
                        let _ = reply.send(());
                    }
                    Some(Command::SetBudgets(budgets, reply)) => {
                        self.book.set_budgets(budgets);
                        let mut slicer = Slicer::new();
                        while self.book.apply_budgets(BUDGET_SLICE_ACCOUNTS) {
                            slicer.pause().await;
                        }
                        let _ = reply.send(());
                    }
                    Some(Command::Shutdown(reply)) => {
                        let _ = reply.send(self.shutdown().await);
                        self.release();
                        return;
                    }
                    // Every engine handle is gone: flush what there is and stop.
                    None => {
                        let report = self.shutdown().await;
                        if !report.is_complete() {
                            tracing::error!(
                                unwritten = %report.unwritten_amount(),
                                in_doubt = %report.in_doubt_amount(),
                                "engine dropped without shutdown; amounts left unwritten"
                            );
                        }
                        self.release();
                        return;
                    }
                },
                Some(state) = self.new_accounts.recv() => {
                    // What was announced meanwhile joins the same pipelined read, for one slice
                    // of time (the rest comes next turn), so that a burst of new accounts never
                    // holds the runtime worker for long.
                    self.book.track(state);
                    let slicer = Slicer::new();
                    let mut more = true;
                    while more && !slicer.spent() {
                        for _ in 0..ACCOUNTS_TRACKED_PER_STEP {
                            let Ok(state) = self.new_accounts.try_recv() else {
                                more = false;
                                break;
                            };
                            self.book.track(state);
                        }
                    }
                    self.publish_tracked();
                    if more {
                        // More may be waiting, and the channel stays ready: without a yield
                        // the loop would come straight back here in the same poll (tokio's
                        // budget lets a task run 128 such turns, ~40 ms, before it yields).
                        self.start_read_if_due();
                        tokio::task::yield_now().await;
                    }
                }
                output = next_write(&mut self.write) => {
                    self.settle(output).await;
                }
                (request, values) = next_read(&mut self.read) => {
                    self.read = None;
                    self.book.read_done(request, values, self.config.clock.now());
                    // The next read is taken (a slice of work of its own) in a poll of its own.
                    tokio::task::yield_now().await;
                }
                _ = ticker.tick() => self.sweep_all().await,
                _ = sleep_until(boundary) => self.sweep_all().await,
                _ = session_ended.notified(), if self.ended_due.is_none() => {
                    // Never later than the periodic sweep would collect it anyway.
                    let delay = self.config.session_end_delay.min(self.config.flush_interval);
                    self.ended_due = Some(Instant::now() + delay);
                }
                _ = sleep_until(self.ended_due) => {
                    self.ended_due = None;
                    self.collect_ended().await;
                }
                _ = sleep_until(self.backoff.retry_at()), if self.write.is_none() => {
                    self.backoff.retry_now();
                }
                // Last: a slice of the open round per turn, after a yield, while the sink
                // writes the batches cut before.
                _ = tokio::task::yield_now(), if self.pending.needs_cut() => self.cut_slice(),
            }
            self.start_write_if_due();
            self.start_read_if_due();
        }
    }

    /// The next bucket boundary on tokio's clock, if the key scheme has buckets.
    fn next_boundary(&self) -> Option<Instant> {
        let end = self.config.keys.span(self.interval_start).end()?;
        let wait = end
            .duration_since(self.config.clock.now())
            .unwrap_or_default();
        Some(Instant::now() + wait)
    }

    /// Sweeps every slot, then reviews the read side (see [`Flusher::sweep`]).
    async fn sweep_all(&mut self) {
        self.sweep(true).await;
    }

    /// Sweeps every slot, in slices of [`SWEEP_SLICE_SLOTS`] with a yield to the runtime
    /// between them, so that a sweep of a million slots never holds a runtime worker for long:
    /// the gateway's audio tasks run between the slices. Then, if `review`, the read side's
    /// review of every account, in slices of [`REVIEW_SLICE_ACCOUNTS`]. The shutdown's sweep has
    /// none: the read side is freed right after, and reviewing would retire every account whose
    /// session ended (a million small frees in the flusher's polls, which the allocator may later
    /// consolidate in one poll of a third of a second, `docs/benchmarks.md`).
    #[tracing::instrument(name = "sweep", skip_all, fields(slots = self.sweeper.capacity()))]
    async fn sweep(&mut self, review: bool) {
        let started = Instant::now();
        let now = self.config.clock.now();
        let mut slicer = Slicer::new();
        // First: usage this sweep charges to the new bucket counts in the new bucket's view.
        let rolled = self.book.roll_bucket(now);
        if rolled {
            for start in (0..self.book.extent()).step_by(REKEY_SLICE_ACCOUNTS) {
                slicer.pause().await;
                self.book.rekey(start..start + REKEY_SLICE_ACCOUNTS);
            }
        }
        // The keyed map's tables, made a few per poll before the sweep begins. The map takes the
        // amounts no tracked account's entry does: before the first round, those of accounts not
        // tracked yet (at start-up, maybe all); after a new bucket began, the closing sweep's,
        // which go to the old bucket's keys. Then it expects as many keys as accounts.
        if rolled || !self.pending.has_begun_a_round() {
            self.pending.expect_keys(self.book.len());
        }
        while self.pending.prepare(PREPARE_SLICE_SHARDS) {
            slicer.pause().await;
        }
        self.collect_ended_at(now).await;
        for start in (0..self.sweeper.capacity()).step_by(SWEEP_SLICE_SLOTS) {
            slicer.pause().await;
            self.sweeper
                .sweep_slots(start..start + SWEEP_SLICE_SLOTS, &mut self.usage);
            self.absorb(now, 0);
        }
        Stats::add(&self.stats.sweeps, 1);
        self.interval_start = now;
        let extent = if review { self.book.extent() } else { 0 };
        for start in (0..extent).step_by(REVIEW_SLICE_ACCOUNTS) {
            slicer.pause().await;
            self.book
                .review(start..start + REVIEW_SLICE_ACCOUNTS, &self.registry);
        }
        self.publish_tracked();
        metrics::sweep_took(started.elapsed());
        metrics::export(&self.stats.snapshot());
    }

    async fn collect_ended(&mut self) {
        self.collect_ended_at(self.config.clock.now()).await;
    }

    /// Collects and absorbs the ended sessions, [`SWEEP_SLICE_SLOTS`] per poll: the sessions
    /// that end together (a gateway draining, a million before a shutdown) are many.
    async fn collect_ended_at(&mut self, now: SystemTime) {
        let mut slicer = Slicer::new();
        loop {
            self.usage.clear();
            let ended = self
                .sweeper
                .collect_ended_up_to(SWEEP_SLICE_SLOTS, &mut self.usage);
            Stats::add(&self.stats.sessions_ended, ended as u128);
            self.absorb(now, 0);
            if ended < SWEEP_SLICE_SLOTS {
                return;
            }
            slicer.pause().await;
        }
    }

    /// Moves collected usage from index `from` on into `pending`, keyed by the bucket the
    /// interval started in.
    fn absorb(&mut self, now: SystemTime, from: usize) {
        let keys = &self.config.keys;
        let span = keys.span(self.interval_start);
        let ttl = keys.ttl_at(&span, now);
        let mut swept = 0u128;
        let book = &mut self.book;
        let records = &self.usage[from..];
        let locate = |book: &AccountBook, at: usize| {
            let usage: &Usage = records.get(at)?;
            book.locate(&usage.account, &span)
        };
        let prefetch_locate = |book: &AccountBook, at: usize| {
            if let Some(usage) = records.get(at) {
                book.prefetch_locate(&usage.account, &span);
            }
        };
        // Each record's account is located one record ahead, while the record before it is
        // counted: the loads `locate` starts (the account's view, its key) overlap with that work.
        // What `locate` reads first is asked for `LOCATE_AHEAD` records ahead.
        let mut next_located = None;
        if self.enabled {
            (0..LOCATE_AHEAD).for_each(|at| prefetch_locate(book, at));
            next_located = locate(book, 0);
        }
        for (at, usage) in records.iter().enumerate() {
            swept += u128::from(usage.amount);
            if self.enabled {
                prefetch_locate(book, at + LOCATE_AHEAD);
                let located = std::mem::replace(&mut next_located, locate(book, at + 1));
                // A tracked account's key is built once per bucket and shared; others' (an
                // account forgotten since, a sweep closing the previous bucket) now.
                let counted = located.and_then(|located| book.swept(located, usage.amount));
                let (key, owner) = match counted {
                    Some((key, owner)) => (key.clone(), Some(owner)),
                    None => (keys.key(&usage.account, &span).into(), None),
                };
                self.pending.add(key, usage.amount, ttl, owner);
            }
        }
        self.usage.truncate(from);
        Stats::add(&self.stats.amount_swept, swept);
        if !self.enabled {
            Stats::add(&self.stats.amount_discarded, swept);
        }
        self.publish_pending();
    }

    async fn set_enabled(&mut self, enabled: bool) {
        if enabled == self.enabled {
            return;
        }
        // Switching off: what was recorded until now is still written. Switching on: what
        // was added while off is swept (and discarded) first.
        self.sweep_all().await;
        self.enabled = enabled;
        self.stats.publish_enabled(enabled);
        tracing::info!(enabled, "metering switched");
    }

    async fn flush_now(&mut self, reply: oneshot::Sender<Result<FlushReport, EngineError>>) {
        self.sweep_all().await;
        // An operator asking for a flush gets an attempt now, not after the backoff.
        if self.write.is_none() {
            self.backoff.retry_now();
        }
        self.waiters.push(FlushWaiter {
            reply,
            written_before: self.settled.written,
            rejected_before: self.settled.rejected,
            rejected: Vec::new(),
            round: self.pending.round_carrying_pending(),
        });
        self.answer_waiters(None);
    }

    /// Cuts the open round into batches for one slice of time (at least one step).
    fn cut_slice(&mut self) {
        let slicer = Slicer::new();
        self.pending.cut(CUT_STEP_KEYS);
        while self.pending.needs_cut() && !slicer.spent() {
            self.pending.cut(CUT_STEP_KEYS);
        }
        self.publish_pending();
    }

    fn start_write_if_due(&mut self) {
        if self.write.is_some() || self.backoff.retry_at().is_some() {
            return;
        }
        if !self.pending.has_batches() {
            // Nothing built to send: cut a step now rather than wait for the loop's turn (a
            // batch larger than a step is finished by the loop's cut branch).
            self.pending.cut(CUT_STEP_KEYS);
        }
        let batches = self.pending.batches_to_send();
        if batches.is_empty() {
            return;
        }
        self.writes_started += 1;
        Stats::set(&self.stats.flushes, self.writes_started.into());
        let retry = self.backoff.failures() > 0;
        if retry {
            Stats::add(&self.stats.retries, 1);
        }
        let span = write_span(
            self.writes_started,
            retry,
            batches.len(),
            self.pending.in_flight_totals(),
        );
        let sink = self.sink.clone();
        let timeout = self.config.write_timeout;
        let write = async move {
            let started = Instant::now();
            let results = tokio::time::timeout(timeout, sink.write(&batches))
                .await
                .ok();
            (results, started.elapsed())
        };
        self.write = Some(Spawned::new(
            write.instrument(span),
            &self.stats,
            Task::Write,
        ));
    }

    async fn settle(&mut self, (results, took): (Option<WriteResults>, Duration)) {
        self.write = None;
        Stats::set(&self.stats.last_flush_micros, took.as_micros());
        metrics::write_took(took);
        Stats::set(&self.stats.sink_commands, self.sink.commands_sent().into());
        let timeout = SinkError::Timeout(self.config.write_timeout);
        let results =
            results.unwrap_or_else(|| vec![Err(timeout); self.pending.batches_in_flight()]);
        let now = self.config.clock.now();
        let book = &mut self.book;
        let mut settlement = Settlement::default();
        self.pending.receive(results);
        let mut slicer = Slicer::new();
        while !self.pending.settle_some(
            SETTLE_SLICE_KEYS,
            &mut settlement,
            |increment, counted, total, upcoming| {
                book.prefetch_acknowledged(upcoming);
                book.acknowledged(counted, &increment.key, total, now);
            },
        ) {
            slicer.pause().await;
        }

        let settled = &mut self.settled;
        settled
            .written
            .add(settlement.keys_written, settlement.amount_written);
        Stats::set(&self.stats.keys_written, settled.written.keys.into());
        Stats::set(&self.stats.amount_written, settled.written.amount);
        Stats::add(
            &self.stats.batches_written,
            settlement.batches_written.into(),
        );
        Stats::add(
            &self.stats.duplicate_batches,
            settlement.duplicate_batches.into(),
        );
        if settlement.duplicate_batches > 0 {
            tracing::info!(
                batches = settlement.duplicate_batches,
                "sink had already applied re-sent batches; not counted twice"
            );
        }
        for rejection in settlement.rejections {
            tracing::error!(
                key = %rejection.key,
                amount = rejection.amount,
                reason = %rejection.reason,
                "sink refused an increment for good; amount not written"
            );
            settled.rejected.add(1, rejection.amount.into());
            for waiter in &mut self.waiters {
                if waiter.rejected.len() < MAX_REPORTED_REJECTIONS {
                    waiter.rejected.push(rejection.clone());
                }
            }
            if settled.rejections.len() < MAX_REPORTED_REJECTIONS {
                settled.rejections.push(rejection);
            }
        }
        Stats::set(&self.stats.keys_rejected, settled.rejected.keys.into());
        Stats::set(&self.stats.amount_rejected, settled.rejected.amount);

        match settlement.failure {
            Some(error) => {
                Stats::add(&self.stats.write_failures, 1);
                let now = Instant::now();
                let misconfigured = matches!(error, SinkError::Misconfigured(_));
                // Retrying soon cannot fix a configuration: retry at the longest backoff, so
                // that the amounts are written soon after an operator fixes it.
                let delay = if misconfigured {
                    Stats::add(&self.stats.config_errors, 1);
                    self.backoff.failed_for_good(now)
                } else {
                    self.backoff.failed(now)
                };
                let cause = error.to_string();
                self.stats.set_last_write_error(Some(&cause));
                // At a bounded rate, with the cause (see `FailureLog`).
                let warn_due = self.failure_log.failed(now, &cause);
                let failed_writes = self.backoff.failures();
                if warn_due && misconfigured {
                    tracing::error!(%error, failed_writes, pending = %self.pending.amount(),
                        retry_in = ?delay,
                        "flush failed: the sink's configuration is wrong; amounts stay pending \
                         and are retried until it is fixed");
                } else if warn_due {
                    tracing::warn!(%error, failed_writes, pending = %self.pending.amount(),
                        retry_in = ?delay, "flush failed; amounts stay pending");
                } else {
                    tracing::debug!(%error, retry_in = ?delay, attempt = failed_writes,
                        "flush failed again");
                }
                self.answer_waiters(Some(error));
            }
            None => {
                let failed_writes = self.backoff.succeeded();
                if failed_writes > 0 {
                    tracing::info!(failed_writes, "sink recovered");
                    self.failure_log.recovered();
                    self.stats.set_last_write_error(None);
                }
                self.answer_waiters(None);
            }
        }
        self.publish_pending();
        metrics::export(&self.stats.snapshot());
    }

    /// Answers `flush_now` callers: with the error of a failed round, or with what was written
    /// once the round carrying what was pending at their call is acknowledged. (Not once nothing
    /// is pending: under steady session churn something always is, and a caller would wait for
    /// good whenever a round takes longer than the session-end delay.)
    fn answer_waiters(&mut self, failure: Option<SinkError>) {
        let mut still_waiting = Vec::new();
        for waiter in self.waiters.drain(..) {
            let answer = match &failure {
                Some(error) => Err(EngineError::Sink(error.clone())),
                None if self.pending.round_done(waiter.round) => {
                    let written = self.settled.written.since(waiter.written_before);
                    let rejected = self.settled.rejected.since(waiter.rejected_before);
                    Ok(FlushReport {
                        keys_written: written.keys,
                        amount_written: written.amount,
                        keys_rejected: rejected.keys,
                        amount_rejected: rejected.amount,
                        rejected: waiter.rejected,
                    })
                }
                None => {
                    still_waiting.push(waiter);
                    continue;
                }
            };
            let _ = waiter.reply.send(answer);
        }
        self.waiters = still_waiting;
    }

    /// Starts reading the global totals the read side wants, unless a read is in flight.
    fn start_read_if_due(&mut self) {
        if self.read.is_some() {
            return;
        }
        let Some(request) = self.book.take_reads() else {
            return;
        };
        Stats::add(&self.stats.account_reads, request.keys.len() as u128);
        let sink = self.sink.clone();
        let timeout = self.config.write_timeout;
        let read = async move {
            let values = tokio::time::timeout(timeout, sink.read_totals(&request.keys))
                .await
                .unwrap_or(Err(SinkError::Timeout(timeout)));
            (request, values)
        };
        self.read = Some(Spawned::new(read, &self.stats, Task::Read));
    }

    fn publish_tracked(&self) {
        Stats::set(&self.stats.tracked_accounts, self.book.len() as u128);
    }

    fn publish_pending(&self) {
        Stats::set(&self.stats.pending_amount, self.pending.amount());
        Stats::set(&self.stats.pending_keys, self.pending.entries() as u128);
    }

    /// Sweeps everything once, then writes until nothing is pending or the shutdown timeout
    /// passes; adds after that sweep are not counted.
    async fn shutdown(&mut self) -> ShutdownReport {
        let deadline = Instant::now() + self.config.shutdown_timeout;
        self.sweep(false).await;
        // A backoff scheduled before the shutdown can end after its deadline (after a long
        // outage it reaches `retry_max`, 30 s by default, vs a 10 s timeout), and the shutdown
        // would then report everything unwritten without one attempt. So attempt at once, as
        // `flush_now` does, and restart the backoff from `retry_initial`, so that the deadline
        // leaves room for retries.
        // (A write in flight has no wait scheduled: a wait starts only when a write ends.)
        self.backoff.restart();
        loop {
            self.start_write_if_due();
            if self.write.is_none() && self.pending.is_empty() {
                break;
            }
            tokio::select! {
                output = next_write(&mut self.write) => {
                    self.settle(output).await;
                }
                _ = sleep_until(self.backoff.retry_at()), if self.write.is_none() => {
                    self.backoff.retry_now();
                }
                // As in `run`: a batch larger than a step is built over several slices.
                _ = tokio::task::yield_now(), if self.pending.needs_cut() => self.cut_slice(),
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(write) = self.write.take() {
            // The deadline passed with a write unanswered. Its batches went to the sink, which
            // may apply them later (fred sends what it has queued even once the write is
            // aborted): in doubt, not safe to replay.
            drop(write);
            self.pending.unanswered_in_doubt();
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.reply.send(Err(EngineError::ShutDown));
        }
        let unwritten = self.pending.unwritten();
        let in_doubt = self.pending.in_doubt();
        if !unwritten.is_empty() || !in_doubt.is_empty() {
            tracing::error!(
                unwritten_keys = unwritten.len(),
                in_doubt_batches = in_doubt.len(),
                "shutdown deadline passed with amounts unwritten (safe to replay) or in doubt \
                 (sent, outcome unknown: do not replay)"
            );
        }
        ShutdownReport {
            keys_written: self.settled.written.keys,
            amount_written: self.settled.written.amount,
            unwritten,
            in_doubt,
            rejected: self.settled.rejections.clone(),
        }
    }
}

impl<S> Flusher<S> {
    /// Ends the flusher after its shutdown: its large state (the read side's maps, a key and a
    /// view per tracked account; what `Pending` keeps for the next round; the sweeper's reading
    /// per slot, and the ledger if the engine is gone) is freed on one of tokio's blocking
    /// threads. At a million accounts and slots that is ~0.3-0.5 s of CPU, all in the task's
    /// last poll otherwise, holding a runtime worker. Nothing waits for it: the shutdown is
    /// answered, and the state is only memory (no handle, no I/O, no lock held). On a runtime
    /// that is shutting down the blocking pool runs nothing more, and the state is dropped
    /// here, as before.
    fn release(self) {
        let Self {
            book,
            pending,
            usage,
            sweeper,
            ..
        } = self;
        drop(tokio::task::spawn_blocking(move || {
            drop((book, pending, usage, sweeper));
        }));
    }
}

/// The span of one write: from send to answer, around what the sink logs meanwhile. Its totals
/// are `Pending`'s, kept as the batches are cut: summing a round's million increments here was
/// a poll of 2-4 ms, with or without a subscriber.
fn write_span(
    write: u64,
    retry: bool,
    batches: usize,
    (keys, amount): (usize, u128),
) -> tracing::Span {
    tracing::info_span!("flush_write", write, retry, batches, keys, amount)
}

/// A write or a read that the flusher runs as a task of its own. The sink's work for it
/// (encoding a million increments, taking their answers) yields between slices; polled inside
/// the flusher's task, a slice of it and the flusher's own slices added up in one poll, and a
/// yield inside the sink did not end that poll. Dropped, it is aborted; what the sink already
/// handed to its connection may still be sent (the shutdown counts such a write in doubt).
struct Spawned<T>(Option<tokio::task::JoinHandle<T>>);

impl<T: Send + 'static> Spawned<T> {
    fn new(
        future: impl Future<Output = T> + Send + 'static,
        stats: &Arc<Stats>,
        task: Task,
    ) -> Self {
        Self(Some(tokio::spawn(PollTimed::new(
            future,
            stats.clone(),
            task,
        ))))
    }

    /// The task's output (cancel-safe: a `select!` may drop this future and call it again).
    /// The caller drops `self` once it has the output.
    async fn output(&mut self) -> T {
        let Some(task) = &mut self.0 else {
            return std::future::pending().await;
        };
        match task.await {
            Ok(output) => output,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // Cancelled by a runtime shutting down (it may still poll the flusher meanwhile):
            // never answered, and the handle is not polled again.
            Err(_) => {
                self.0 = None;
                std::future::pending().await
            }
        }
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// The in-flight write's output; never ready when there is none.
async fn next_write(write: &mut Option<WriteTask>) -> (Option<WriteResults>, Duration) {
    match write {
        Some(task) => task.output().await,
        None => std::future::pending().await,
    }
}

/// The in-flight read's output; never ready when there is none.
async fn next_read(read: &mut Option<ReadTask>) -> (ReadRequest, ReadResults) {
    match read {
        Some(task) => task.output().await,
        None => std::future::pending().await,
    }
}

/// Ticks every `interval`, the first tick one interval from now.
fn flush_ticker(interval: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker
}

/// Sleeps until `at`; never wakes when there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A random writer id: `RandomState` is seeded from the OS, so no extra dependency is needed.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    hasher.finish()
}
