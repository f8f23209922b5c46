//! The engine a gateway embeds: a [`Ledger`] plus one tokio flusher task
//! that sweeps it and writes per-key totals to a [`Sink`].
//!
//! ```
//! use shardmeter::{Engine, KeyScheme, MemorySink};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), shardmeter::EngineError> {
//! let sink = MemorySink::new();
//! let engine = Engine::builder()
//!     .flush_interval(Duration::from_secs(60))
//!     .keys(KeyScheme::new("usage"))
//!     .sink(sink.clone())
//!     .build()?;
//!
//! let session = engine.open_session("uid-42")?; // per websocket
//! session.add(20); // per audio chunk: the ledger's hot path
//! drop(session); // session end: its remainder is flushed now, not in 60 s
//!
//! let report = engine.shutdown().await?; // drains and flushes everything
//! assert!(report.is_complete());
//! assert_eq!(sink.total("usage:uid-42"), Some(20));
//! # Ok(())
//! # }
//! ```
//!
//! How the flusher schedules sweeps, attributes usage to time buckets, retries and shuts down is
//! described in the `flusher` module and in `docs/operations.md`.

mod accounts;
mod backoff;
mod blocks;
mod clock;
mod flusher;
mod keys;
mod metrics;
mod names;
mod pending;
mod prefetch;
mod session;
mod stats;

pub use accounts::{AccountUsage, BudgetStatus, Budgets};
pub use clock::{Clock, SystemClock};
pub use keys::{Bucket, BucketLabel, KeyScheme, KeySchemeError, Ttl};
pub use pending::Rejection;
pub use session::Session;
pub use stats::StatsSnapshot;

use crate::ledger::{validate_account, Ledger, LedgerError};
use crate::sink::{Batch, Sink, SinkError};
use accounts::Registry;
use flusher::{validate_flush_interval, Command, Flusher, FlusherConfig, Inbox};
use stats::{PollTimed, Stats, Task};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// Errors of the engine and its configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A builder setting is out of range.
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The key scheme is invalid.
    #[error(transparent)]
    KeyScheme(#[from] KeySchemeError),
    /// The ledger refused (full, bad account id, bad ledger setting).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// [`EngineBuilder::build`] was called outside a tokio runtime.
    #[error("the engine must be built inside a tokio runtime (it spawns its flusher task)")]
    NoRuntime,
    /// [`Engine::shutdown`] has run: no new sessions, no more flushes.
    #[error("the engine has been shut down")]
    ShutDown,
    /// A flush reached the sink and failed; the amounts stay pending and are retried.
    #[error("flush failed, amounts stay pending: {0}")]
    Sink(#[from] SinkError),
}

/// What [`Engine::flush_now`] wrote, and what the sink refused, while the flush ran (from the
/// call to its answer; other rounds settled meanwhile included).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Key increments acknowledged.
    pub keys_written: u64,
    /// Amount acknowledged.
    pub amount_written: u128,
    /// Increments the sink refused for good (e.g. the key holds a non-integer): not written,
    /// and not retried.
    pub keys_rejected: u64,
    /// Amount of those increments.
    pub amount_rejected: u128,
    /// Those increments, the first 10,000.
    pub rejected: Vec<Rejection>,
}

/// What [`Engine::shutdown`] could and could not write.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Key increments acknowledged over the engine's life.
    pub keys_written: u64,
    /// Amount acknowledged over the engine's life.
    pub amount_written: u128,
    /// Per key, the amount unacknowledged at the deadline that certainly did not reach the
    /// sink (never sent, or refused as a whole), sorted by key: **safe to replay**.
    pub unwritten: Vec<(String, u128)>,
    /// Batches sent at least once whose outcome is unknown at the deadline (a timeout, a
    /// connection lost after sending, a write still unanswered): the sink may have applied them, or may still apply
    /// them (a frozen Redis that resumes). **Do not replay them**; check each batch id with
    /// the sink's dedup record first. Together with `unwritten`, nothing else that was added
    /// before the final sweep is missing.
    pub in_doubt: Vec<Batch>,
    /// Increments the sink refused for good over the engine's life (the first 10,000).
    pub rejected: Vec<Rejection>,
}

impl ShutdownReport {
    /// `true` when everything was written and nothing was refused.
    pub fn is_complete(&self) -> bool {
        self.unwritten.is_empty() && self.in_doubt.is_empty() && self.rejected.is_empty()
    }

    /// Total amount certainly not written (safe to replay).
    pub fn unwritten_amount(&self) -> u128 {
        self.unwritten.iter().map(|(_, amount)| amount).sum()
    }

    /// Total amount of the batches in doubt.
    pub fn in_doubt_amount(&self) -> u128 {
        self.in_doubt
            .iter()
            .flat_map(|batch| &batch.increments)
            .map(|increment| u128::from(increment.amount))
            .sum()
    }
}

/// The embedded metering engine. Cheap to clone; all clones drive one flusher.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<EngineShared>,
}

struct EngineShared {
    ledger: Ledger,
    registry: Arc<Registry>,
    commands: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    shut_down: AtomicBool,
}

/// Marks an [`EngineBuilder`] that has no sink yet: `build` needs one.
#[derive(Debug, Clone, Copy)]
pub struct NoSink;

/// Settings of an [`Engine`]; see [`Engine::builder`].
pub struct EngineBuilder<S> {
    ledger: crate::ledger::LedgerBuilder,
    config: FlusherConfig,
    enabled: bool,
    sink: S,
}

impl Engine {
    /// Starts an engine configuration: flush every 60 s, session ends within 200 ms, batches of
    /// 500 keys, key scheme `KeyScheme::new("shardmeter:usage")`, 65,536 session slots.
    pub fn builder() -> EngineBuilder<NoSink> {
        EngineBuilder {
            ledger: Ledger::builder(),
            config: FlusherConfig::default(),
            enabled: true,
            sink: NoSink,
        }
    }

    /// Opens a session for `account` (see [`Ledger::open_session`]). The first session of an
    /// account not tracked yet also starts tracking its usage: one read of its total in the
    /// sink, in the background (see [`Session::synced`]).
    pub fn open_session(&self, account: &str) -> Result<Session, EngineError> {
        // Relaxed: a courtesy check; a session opened during shutdown is still swept by it.
        if self.shared.shut_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShutDown);
        }
        // Before the registry hashes the id or copies it: a rejected id costs nothing.
        validate_account(account)?;
        let ledger = &self.shared.ledger;
        let (session, state) = self
            .shared
            .registry
            .open(account, |account| ledger.open_session_shared(account))?;
        Ok(Session::new(session, state))
    }

    /// Charges `amount` to `account` once, without a session (an offline upload): flushed like
    /// a session's remainder, within the session-end delay.
    pub fn record(&self, account: &str, amount: u64) -> Result<(), EngineError> {
        self.open_session(account)?.add(amount);
        Ok(())
    }

    /// Sweeps now and waits until everything pending at the call (what this sweep collects
    /// included) is written, or the first write fails (the amounts then stay pending and are
    /// retried with backoff). Amounts collected while it waits are not necessarily waited for.
    /// The report also lists what the sink refused for good meanwhile.
    ///
    /// # Errors
    ///
    /// [`EngineError::Sink`] with the failed round's error: for a Redis that cannot be reached,
    /// [`SinkError::NotSent`] naming its address and the cause; for one that refuses the sink's
    /// settings (a database, password or permission), [`SinkError::Misconfigured`], which no
    /// retry fixes until someone changes the setting. [`EngineError::ShutDown`] after shutdown.
    pub async fn flush_now(&self) -> Result<FlushReport, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::FlushNow(reply)).await?;
        answer.await.map_err(|_| EngineError::ShutDown)?
    }

    /// The usage of `account` in the current bucket, all processes included, as this engine
    /// knows it; `None` for an account it does not track (no session open, none ended since the
    /// last full sweep). Reads published state; never asks the sink.
    pub fn usage(&self, account: &str) -> Option<AccountUsage> {
        Some(self.shared.registry.get(account)?.usage())
    }

    /// `account` against its budget (the deployment's `get_dg_budget_status`); `None` when the
    /// engine does not track it or it has no limit.
    pub fn status(&self, account: &str) -> Option<BudgetStatus> {
        self.shared.registry.get(account)?.status()
    }

    /// Whether `account` has used its budget (the deployment's `is_dg_budget_exhausted`);
    /// `false` for an account the engine does not track. Per chunk, ask the session instead
    /// ([`Session::is_exhausted`]): this one looks the account up by name.
    pub fn is_exhausted(&self, account: &str) -> bool {
        self.shared
            .registry
            .get(account)
            .is_some_and(|state| state.is_exhausted())
    }

    /// Replaces the budget limits at run time; every tracked account is re-evaluated before
    /// this returns (sessions see the new verdict at once).
    pub async fn set_budgets(&self, budgets: Budgets) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetBudgets(budgets, reply)).await?;
        answer.await.map_err(|_| EngineError::ShutDown)
    }

    /// Changes the flush interval at run time (10 ms to 24 h); the next periodic sweep comes one
    /// new interval from now. Sessions and pending amounts are untouched.
    pub async fn set_flush_interval(&self, interval: Duration) -> Result<(), EngineError> {
        validate_flush_interval(interval)?;
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetFlushInterval(interval, reply))
            .await?;
        answer.await.map_err(|_| EngineError::ShutDown)
    }

    /// Switches metering on or off at run time (the fair-use-off switch). Switching off first
    /// writes what was recorded so far; while off, usage is swept and discarded, and an idle
    /// engine sends nothing to the sink. Calls are applied in the order the flusher receives
    /// them; when this returns, [`is_enabled`](Self::is_enabled) says `enabled` unless a later
    /// call was applied since.
    pub async fn set_enabled(&self, enabled: bool) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::SetEnabled(enabled, reply)).await?;
        answer.await.map_err(|_| EngineError::ShutDown)
    }

    /// Whether usage is being recorded: the state the flusher applied last.
    pub fn is_enabled(&self) -> bool {
        self.shared.stats.enabled()
    }

    /// The engine's counters.
    pub fn stats(&self) -> StatsSnapshot {
        let mut snapshot = self.shared.stats.snapshot();
        snapshot.slots_in_use = self.shared.ledger.slots_in_use() as u64;
        snapshot.saturated_amount = self.shared.ledger.saturated_amount();
        snapshot
    }

    /// The ledger, for embedding code that wants it directly (e.g. to share with other code).
    pub fn ledger(&self) -> &Ledger {
        &self.shared.ledger
    }

    /// Stops the flusher: sweeps everything (open sessions included), writes it with retries
    /// until the shutdown timeout, and reports what could not be written. Adds made after the
    /// final sweep are not counted. A second call returns [`EngineError::ShutDown`].
    pub async fn shutdown(&self) -> Result<ShutdownReport, EngineError> {
        // Relaxed: `swap` makes exactly one caller run the shutdown; it orders nothing else.
        if self.shared.shut_down.swap(true, Ordering::Relaxed) {
            return Err(EngineError::ShutDown);
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Shutdown(reply)).await?;
        answer.await.map_err(|_| EngineError::ShutDown)
    }

    async fn send(&self, command: Command) -> Result<(), EngineError> {
        self.shared
            .commands
            .send(command)
            .await
            .map_err(|_| EngineError::ShutDown)
    }
}

impl<S> EngineBuilder<S> {
    /// How often all sessions are swept and flushed (10 ms to 24 h; default 60 s).
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.config.flush_interval = interval;
        self
    }

    /// How long to wait after a session ends before flushing, so that bursts of ends share one
    /// write (0 to 60 s, and never longer than the flush interval; default 200 ms).
    pub fn session_end_delay(mut self, delay: Duration) -> Self {
        self.config.session_end_delay = delay;
        self
    }

    /// Most keys per batch (1 to 100,000; default 500). All batches of a flush are pipelined.
    pub fn batch_size(mut self, keys: usize) -> Self {
        self.config.batch_size = keys;
        self
    }

    /// How long one write round may take before it counts as failed (10 ms to 10 min; default
    /// 5 s). A timed-out round is retried with the same batch ids, so it cannot double count.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// How long [`Engine::shutdown`] keeps retrying before it reports what is unwritten
    /// (default 10 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Backoff after a failed write: starts at `initial`, doubles up to `max`, with jitter
    /// (defaults 100 ms and 30 s; 1 ms <= initial <= max <= 1 h). A misconfigured sink
    /// ([`SinkError::Misconfigured`]) waits in the upper half of `max` from its first failure.
    pub fn retry_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.config.retry_initial = initial;
        self.config.retry_max = max;
        self
    }

    /// How keys are named and when they expire.
    pub fn keys(mut self, scheme: KeyScheme) -> Self {
        self.config.keys = scheme;
        self
    }

    /// Budget limits per account per bucket (default: none). Change them at run time with
    /// [`Engine::set_budgets`].
    pub fn budgets(mut self, budgets: Budgets) -> Self {
        self.config.budgets = budgets;
        self
    }

    /// The wall clock used for time buckets (tests inject one).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.config.clock = Arc::new(clock);
        self
    }

    /// Start with metering off (see [`Engine::set_enabled`]).
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Session slots (see [`crate::ledger::LedgerBuilder::capacity`]).
    pub fn capacity(mut self, slots: usize) -> Self {
        self.ledger = self.ledger.capacity(slots);
        self
    }

    /// Shards for registered workers (see [`crate::ledger::LedgerBuilder::worker_shards`]).
    pub fn worker_shards(mut self, shards: usize) -> Self {
        self.ledger = self.ledger.worker_shards(shards);
        self
    }

    /// Shards for other threads (see [`crate::ledger::LedgerBuilder::striped_shards`]).
    pub fn striped_shards(mut self, shards: usize) -> Self {
        self.ledger = self.ledger.striped_shards(shards);
        self
    }

    /// Where totals are written.
    pub fn sink<T: Sink>(self, sink: T) -> EngineBuilder<T> {
        EngineBuilder {
            ledger: self.ledger,
            config: self.config,
            enabled: self.enabled,
            sink,
        }
    }
}

impl<S: Sink> EngineBuilder<S> {
    /// Validates the settings, allocates the ledger and spawns the flusher on the current
    /// tokio runtime.
    pub fn build(self) -> Result<Engine, EngineError> {
        self.config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EngineError::NoRuntime)?;
        let session_ended = Arc::new(Notify::new());
        let hook = session_ended.clone();
        let (ledger, sweeper) = self
            .ledger
            .on_session_end(move || hook.notify_one())
            .build()?;
        let stats = Arc::new(Stats::default());
        let (registry, new_accounts) = Registry::new();
        let registry = Arc::new(registry);
        let (commands, receiver) = mpsc::channel(64);
        let flusher = Flusher::new(
            self.config,
            self.enabled,
            sweeper,
            self.sink,
            Inbox {
                commands: receiver,
                session_ended,
                new_accounts,
            },
            stats.clone(),
            registry.clone(),
        );
        runtime.spawn(PollTimed::new(flusher.run(), stats.clone(), Task::Flusher));
        Ok(Engine {
            shared: Arc::new(EngineShared {
                ledger,
                registry,
                commands,
                stats,
                shut_down: AtomicBool::new(false),
            }),
        })
    }
}

/// The last [`Engine`] handle is gone. Without [`Engine::shutdown`] the flusher still runs a
/// shutdown, but only if the runtime lives on: a `#[tokio::main]` that returns right after the
/// drop stops the runtime first, and nothing reaches the sink. Say so, loudly, while there is
/// still a thread to say it on.
impl Drop for EngineShared {
    fn drop(&mut self) {
        // Relaxed: read on the thread that dropped the last handle, after every other handle's
        // drop; `shutdown` set it on some handle, and the Arc's release/acquire orders that.
        if self.shut_down.load(Ordering::Relaxed) {
            return;
        }
        let stats = self.stats.snapshot();
        tracing::error!(
            pending_amount = stats.pending_amount,
            slots_in_use = self.ledger.slots_in_use(),
            "Engine dropped without `shutdown().await`: the pending amount and the usage of \
             open sessions are lost if the runtime stops now; call `engine.shutdown().await` \
             before the runtime ends"
        );
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("ledger", &self.shared.ledger)
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl<S> std::fmt::Debug for EngineBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("ledger", &self.ledger)
            .field("config", &self.config)
            .field("enabled", &self.enabled)
            .finish()
    }
}
