//! The Redis sink: every [`Batch`] is one `EVALSHA` of a Lua script that applies it at most
//! once, with [fred](https://docs.rs/fred/10.1.0).
//!
//! # Usage
//!
//! A gateway that has no Redis client yet lets the sink make one:
//!
//! ```no_run
//! use shardmeter::sink::redis::RedisSink;
//! use shardmeter::{Engine, KeyScheme};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Fails on a URL that does not parse or credentials Redis refuses; a Redis that is down
//! // is not an error here: writes report `SinkError::Unavailable` until it is back.
//! let sink = RedisSink::connect("redis://127.0.0.1:6379").await?;
//! let engine = Engine::builder()
//!     .keys(KeyScheme::daily_utc("fair_use:dg_budget"))
//!     .sink(sink)
//!     .build()?;
//! # Ok(())
//! # }
//! ```
//!
//! One that already has a fred client passes it to [`RedisSink::new`] (or to
//! [`RedisSinkBuilder::build`]); see there. Settings: [`RedisSink::builder`].
//!
//! # Exactly-once
//!
//! The script first runs `SET <marker> 1 NX EX <dedup window>`. If the marker already exists,
//! the batch was applied by an earlier attempt whose reply was lost: the script changes nothing
//! and the sink answers [`BatchOutcome::AlreadyApplied`]. Otherwise it runs, for each increment,
//! `INCRBY key amount` and then `EXPIRE key ttl`, and returns the new totals. A script runs
//! atomically in Redis, so the marker and the increments are written together or not at all:
//! a batch is applied once however many times it is sent, **within the dedup window**.
//!
//! The dedup window is the marker's lifetime: 24 hours unless set with
//! [`RedisSinkBuilder::dedup_window`]. If a batch is retried after its marker expired (a
//! flusher that kept retrying for longer than the window, or a marker evicted under memory
//! pressure), nothing remembers that it was applied, and **its amounts are counted a second
//! time**. Keep the window far longer than the longest retry, and run this Redis with
//! `maxmemory-policy noeviction` (the default), so markers are not evicted before they expire.
//!
//! An increment that Redis refuses (the key holds a non-integer or a hash, or the sum would
//! overflow) is run with `redis.pcall`: that key is left unchanged and reported as
//! [`KeyOutcome::Rejected`], the other keys of the batch are applied.
//!
//! The marker is `<marker prefix>:{<hash tag>}:<batch id>`, for example
//! `shardmeter:batch:{uid-42}:00c0ffee00c0ffee-17`, where the hash tag is that of the batch's first
//! key (see *Redis Cluster* below). One marker per batch lives for the dedup window: with a
//! flush every 60 s, a gateway keeps at least 1,440 × (its batches per flush) markers (more with
//! session-end flushes), about 100 bytes each.
//!
//! # Commands per batch
//!
//! One `EVALSHA` on the wire; inside it, one `SET` and two commands per key (`INCRBY`,
//! `EXPIRE`), plus a `GET` for a total too large for a Lua number to carry exactly (2^53 and
//! beyond). The script is loaded lazily: when Redis answers `NOSCRIPT` (first use, a restart, a
//! failover, `SCRIPT FLUSH`), the sink sends one `SCRIPT LOAD` and the affected batches again.
//! All batches of one [`Sink::write`] call are sent at once and pipelined on the connection.
//!
//! [`Sink::commands_sent`] counts the `EVALSHA` and `SCRIPT LOAD` commands this sink issued. The
//! commands the script runs (`SET`, `INCRBY`, `EXPIRE`) do not travel on the wire but do appear in
//! Redis' own `INFO commandstats`, and fred's transparent re-sends (next section) are not
//! counted here.
//!
//! # Connection loss, timeouts and re-sends
//!
//! When a connection drops, or a command gets no reply within the command timeout, the batch's
//! outcome is unknown: Redis may have run the script before the reply was lost. The sink answers
//! [`SinkError::Unavailable`] or [`SinkError::Timeout`], and the flusher retries the batch later
//! with the same id. If it had been applied, the retry finds its marker.
//!
//! fred itself re-sends a command that was in flight when its connection closed, once it has
//! reconnected (up to its `max_command_attempts`). For a plain `INCRBY` pipeline or a
//! `MULTI`/`EXEC` that re-send double-counts (the caller even sees `Ok`); for this script it is
//! harmless: the second run finds the marker and the caller sees `AlreadyApplied`. The sink sets
//! two attempts per command (one transparent re-send after a reconnect), whatever the client's
//! own setting: a retry is safe, but a third attempt rarely fits in the command timeout, and a
//! command that itself breaks the connection must not loop. A command that timed out is not
//! re-sent by fred; one already written may still run when a stalled Redis resumes — again
//! harmless.
//!
//! While the client is not connected (Redis down, reconnecting), [`Sink::write`] answers
//! [`SinkError::Unavailable`] at once, without queueing commands: the flusher keeps the amounts
//! pending and retries with backoff, and a shutdown is not held up by a dead Redis.
//!
//! # Redis Cluster
//!
//! A script may only touch keys of one hash slot. Engine keys carry the account as a hash tag
//! (`fair_use:dg_budget:{uid-42}:20261129`) and the marker carries the tag of the batch's first
//! key, so a batch whose keys share one tag works on Cluster as on a single node. A batch that
//! mixes hash slots cannot run as one script: on a clustered client the sink detects it before
//! sending and answers [`SinkError::Failed`] (the flusher keeps retrying it, so the amounts are
//! not lost, but they are not written either). The engine's batches mix accounts, so on
//! Cluster nearly every batch would be refused today: splitting batches by slot
//! (`fred::util::redis_keyslot`) is future work, and single-node Redis (or single-slot batches)
//! is what this sink supports now.
//!
//! # Totals
//!
//! [`KeyOutcome::Added::total`] is the key's value right after the increment, including every
//! other writer's additions: a free, fresh view of an account's usage across gateways.

use super::{Batch, BatchId, BatchOutcome, KeyOutcome, Sink, SinkError};
use fred::clients::{Client, WithOptions};
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, LuaInterface};
use fred::types::config::{Config, Options, ReconnectPolicy};
use fred::types::scripts::Script;
use fred::types::{Builder, Key, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

/// The script that applies one batch; its reply format is described at its top.
const APPLY_BATCH_LUA: &str = include_str!("redis_apply_batch.lua");

/// Default prefix of marker keys.
pub const DEFAULT_MARKER_PREFIX: &str = "shardmeter:batch";
/// Default dedup window (marker lifetime): 24 hours.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Default time allowed for one command's reply. Below the engine's default write timeout
/// (5 s), so the sink, not the flusher, reports which batches timed out.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Attempts per command: one transparent re-send after a reconnect (see the module docs).
const MAX_COMMAND_ATTEMPTS: u32 = 2;
/// Reconnect backoff of a client made by [`RedisSink::connect`]: 100 ms doubling to 5 s,
/// forever (a gateway outlives a Redis outage).
const RECONNECT_MIN_DELAY_MS: u32 = 100;
const RECONNECT_MAX_DELAY_MS: u32 = 5_000;
/// The longest time-to-live sent to Redis, in seconds (about 35 million years). Redis refuses
/// an `EXPIRE` whose deadline does not fit in 64-bit milliseconds; this keeps far from that.
const MAX_TTL_SECS: u64 = 1 << 50;
/// Lua numbers are doubles; totals of this magnitude and beyond come back as strings.
const LUA_EXACT_LIMIT: i64 = 1 << 53;

/// Why a [`RedisSink`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisSinkError {
    /// The URL does not parse as a Redis URL. The message never repeats the URL (it may hold a
    /// password).
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(String),
    /// A builder setting is out of range.
    #[error("invalid RedisSink setting: {0}")]
    InvalidConfig(String),
    /// Redis refused the credentials (`WRONGPASS`), or requires some (`NOAUTH`) and none were
    /// given.
    #[error("Redis refused authentication: {0}")]
    Auth(String),
    /// The client could not be set up (for example a TLS setting it does not support).
    #[error("cannot set up the Redis client: {0}")]
    Client(String),
}

/// Settings of a [`RedisSink`]; start with [`RedisSink::builder`].
#[derive(Debug, Clone)]
pub struct RedisSinkBuilder {
    marker_prefix: String,
    dedup_window: Duration,
    command_timeout: Duration,
}

impl Default for RedisSinkBuilder {
    fn default() -> Self {
        Self {
            marker_prefix: DEFAULT_MARKER_PREFIX.to_owned(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
}

impl RedisSinkBuilder {
    /// The prefix of marker keys (default `shardmeter:batch`). Not empty, no braces.
    pub fn marker_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.marker_prefix = prefix.into();
        self
    }

    /// How long a batch's marker lives, so how long a retry of it is recognised (default 24 h,
    /// at least 1 s, rounded up to whole seconds). See the module's *Exactly-once* section.
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }

    /// How long to wait for one command's reply before answering [`SinkError::Timeout`]
    /// (default 3 s). Applies to this sink's commands whatever the client's own default is.
    /// A client made by [`connect`](Self::connect) also uses it to connect.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// A sink writing through `client`, a fred client the gateway already has. The sink does
    /// not connect or close it; give it a reconnect policy, or the sink answers
    /// [`SinkError::Unavailable`] for good once its connection is lost.
    ///
    /// ```no_run
    /// use fred::prelude::*;
    /// use shardmeter::sink::redis::RedisSink;
    /// use std::time::Duration;
    ///
    /// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
    /// let config = Config::from_url("redis://127.0.0.1:6379")?;
    /// let client = Builder::from_config(config)
    ///     .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
    ///     .build()?;
    /// client.init().await?; // the gateway's own client, also used for its budget reads
    ///
    /// let sink = RedisSink::builder()
    ///     .dedup_window(Duration::from_secs(6 * 3600))
    ///     .build(client.clone())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn build(self, client: Client) -> Result<RedisSink, RedisSinkError> {
        self.validate()?;
        Ok(RedisSink::assemble(self, client, false))
    }

    /// Parses `url`, makes a client and connects it; see [`RedisSink::connect`].
    pub async fn connect(self, url: &str) -> Result<RedisSink, RedisSinkError> {
        self.validate()?;
        let tls = check_scheme(url)?;
        let mut config = Config::from_url(url)
            .map_err(|e| RedisSinkError::InvalidUrl(e.details().to_owned()))?;
        if tls && !config.uses_tls() {
            // fred would connect in clear text, with only a log line to say so.
            return Err(RedisSinkError::InvalidUrl(
                "a TLS URL needs a TLS feature of fred (`enable-rustls` or `enable-native-tls`)"
                    .into(),
            ));
        }
        // Keep trying when Redis is down at start-up (see `RedisSink::connect`).
        config.fail_fast = false;
        let timeout = self.command_timeout;
        let client = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = timeout;
                connection.internal_command_timeout = timeout;
                connection.max_command_attempts = MAX_COMMAND_ATTEMPTS;
                // A connection whose replies stop (a network black hole, no RST) is closed and
                // reconnected instead of timing out every command until TCP gives up.
                connection.unresponsive.max_timeout = Some(timeout.saturating_mul(2));
                connection.unresponsive.interval =
                    (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
            })
            .with_performance_config(|performance| performance.default_command_timeout = timeout)
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_MIN_DELAY_MS,
                RECONNECT_MAX_DELAY_MS,
                2,
            ))
            .build()
            .map_err(|e| RedisSinkError::Client(e.to_string()))?;

        match first_connection(&client, timeout).await {
            Ok(()) => {}
            Err(error) if *error.kind() == ErrorKind::Auth => {
                stop(&client);
                return Err(RedisSinkError::Auth(error.details().to_owned()));
            }
            Err(error) if matches!(error.kind(), ErrorKind::Config | ErrorKind::Url) => {
                stop(&client);
                return Err(RedisSinkError::Client(error.to_string()));
            }
            Err(error) => tracing::warn!(
                %error,
                "Redis is not reachable; the sink will keep reconnecting and report writes as \
                 unavailable until it is"
            ),
        }
        Ok(RedisSink::assemble(self, client, true))
    }

    fn validate(&self) -> Result<(), RedisSinkError> {
        let invalid = |message: String| Err(RedisSinkError::InvalidConfig(message));
        if self.marker_prefix.is_empty() {
            return invalid("the marker prefix is empty".into());
        }
        if self.marker_prefix.contains(['{', '}']) {
            return invalid(format!(
                "the marker prefix {:?} contains a brace; braces are reserved for the hash tag",
                self.marker_prefix
            ));
        }
        if self.dedup_window < Duration::from_secs(1) {
            return invalid(format!(
                "the dedup window must be at least 1 s, got {:?}",
                self.dedup_window
            ));
        }
        if whole_seconds(self.dedup_window) >= MAX_TTL_SECS {
            return invalid(format!(
                "the dedup window {:?} is too long",
                self.dedup_window
            ));
        }
        if self.command_timeout.is_zero() {
            return invalid("the command timeout must not be zero".into());
        }
        Ok(())
    }
}

/// Checks that `url` names a scheme fred speaks (`redis`, `rediss`, `valkey`, `valkeys`, each
/// optionally with `-cluster` or `-sentinel`); fred itself accepts any scheme. Returns whether
/// the scheme asks for TLS. The error names the scheme only: the URL may hold a password.
fn check_scheme(url: &str) -> Result<bool, RedisSinkError> {
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    let base = scheme.as_deref().map(|s| {
        s.strip_suffix("-cluster")
            .or_else(|| s.strip_suffix("-sentinel"))
            .unwrap_or(s)
    });
    match base {
        Some("redis" | "valkey") => Ok(false),
        Some("rediss" | "valkeys") => Ok(true),
        _ => Err(RedisSinkError::InvalidUrl(format!(
            "expected redis://, rediss://, redis-cluster:// or redis-sentinel://, got {}",
            scheme.map_or_else(|| "no scheme".to_owned(), |s| format!("{s}://"))
        ))),
    }
}

/// Waits for the first connection attempt of a client made by `connect`: `Ok` once connected
/// and answering, the error of a failed attempt, or `Ok` after `timeout` without news (the
/// client keeps trying in the background).
async fn first_connection(client: &Client, timeout: Duration) -> Result<(), FredError> {
    use tokio::sync::broadcast::error::RecvError;

    // Subscribe before connecting, so the first failure is not missed.
    let mut errors = client.error_rx();
    // The handle of fred's connection task is not needed: `stop` (or the sink's drop) ends it.
    drop(client.connect());
    let outcome = tokio::time::timeout(timeout, async {
        loop {
            tokio::select! {
                connected = client.wait_for_connect() => return connected,
                event = errors.recv() => match event {
                    Ok((error, _server)) => return Err(error),
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => {
                        return Err(FredError::new(ErrorKind::Canceled, "client closed"))
                    }
                },
            }
        }
    })
    .await;
    match outcome {
        Ok(Err(error)) => return Err(error),
        // No verdict in time: a slow network. Check again below in case it just connected.
        Err(_elapsed) if !client.is_connected() => return Ok(()),
        Ok(Ok(())) | Err(_) => {}
    }
    // Connected. A Redis with `requirepass` accepts connections without credentials and
    // answers NOAUTH to every command: find out now rather than at the first flush.
    match client.ping::<Value>(None).await {
        Err(error) if *error.kind() == ErrorKind::Auth => Err(error),
        _ => Ok(()),
    }
}

/// Ends the connection task of a client made by `connect` (it would reconnect forever). In the
/// background: `QUIT` stops the reconnect loop at once, but its own reply may never come (no
/// connection) and would hold the caller for the command timeout.
fn stop(client: &Client) {
    let client = client.clone();
    tokio::spawn(async move { client.quit().await });
}

/// Writes batches to Redis, each as one `EVALSHA` of a script that applies it at most once. See
/// the [module docs](self).
pub struct RedisSink {
    /// The client with this sink's per-command timeout and attempts.
    client: WithOptions<Client>,
    script: Script,
    marker_prefix: String,
    dedup_window: Duration,
    dedup_window_secs: i64,
    command_timeout: Duration,
    commands_sent: AtomicU64,
    /// The client was made by `connect`: close it when the sink is dropped.
    owns_client: bool,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("client", &self.client.id())
            .field("script", &self.script.sha1())
            .field("marker_prefix", &self.marker_prefix)
            .field("dedup_window", &self.dedup_window)
            .field("command_timeout", &self.command_timeout)
            .field("commands_sent", &self.commands_sent())
            .finish()
    }
}

impl RedisSink {
    /// Settings: marker prefix, dedup window, command timeout.
    pub fn builder() -> RedisSinkBuilder {
        RedisSinkBuilder::default()
    }

    /// A sink with default settings writing through `client`, a fred client the gateway already
    /// has (connected, with a reconnect policy). See [`RedisSinkBuilder::build`] for an example.
    pub fn new(client: Client) -> Self {
        Self::assemble(RedisSinkBuilder::default(), client, false)
    }

    /// Parses `url` (`redis://[[user]:password@]host[:port][/db]`, `rediss://` needs a TLS
    /// feature of fred), makes a client and connects it, with default settings.
    ///
    /// The client times out commands after the command timeout, re-sends a command at most
    /// once after a reconnect (safe here: see the module docs), and reconnects forever with an
    /// exponential backoff from 100 ms to 5 s.
    ///
    /// # Errors
    ///
    /// - [`RedisSinkError::InvalidUrl`] if `url` does not parse;
    /// - [`RedisSinkError::Auth`] if Redis refuses the credentials, or wants some and the URL
    ///   has none.
    ///
    /// A Redis that cannot be reached is **not** an error: a gateway must start while Redis is
    /// down. The sink is returned, a warning is logged, the client keeps reconnecting in the
    /// background, and writes answer [`SinkError::Unavailable`] until it is connected.
    pub async fn connect(url: &str) -> Result<Self, RedisSinkError> {
        RedisSinkBuilder::default().connect(url).await
    }

    fn assemble(settings: RedisSinkBuilder, client: Client, owns_client: bool) -> Self {
        let options = Options {
            timeout: Some(settings.command_timeout),
            max_attempts: Some(MAX_COMMAND_ATTEMPTS),
            ..Options::default()
        };
        Self {
            client: client.with_options(&options),
            script: Script::from_lua(APPLY_BATCH_LUA),
            marker_prefix: settings.marker_prefix,
            dedup_window: settings.dedup_window,
            // `validate` keeps it below 2^50 and the default is 86,400.
            dedup_window_secs: whole_seconds(settings.dedup_window) as i64,
            command_timeout: settings.command_timeout,
            commands_sent: AtomicU64::new(0),
            owns_client,
        }
    }

    /// The fred client this sink writes through (for reads such as budget checks).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// How long a batch's marker lives.
    pub fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    /// How long a command may wait for its reply.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The key whose presence marks `batch` as applied, or `None` for a batch without
    /// increments (nothing is sent for those).
    pub fn marker_key(&self, batch: &Batch) -> Option<String> {
        let first = batch.increments.first()?;
        Some(marker_key(&self.marker_prefix, &first.key, batch.id))
    }

    /// Loads the script into Redis' script cache now (optional: writes load it when Redis
    /// answers `NOSCRIPT`). On a cluster it is loaded on every primary.
    pub async fn load_script(&self) -> Result<(), SinkError> {
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent.fetch_add(1, Ordering::Relaxed);
        self.client
            .script_load_cluster::<Value, _>(APPLY_BATCH_LUA)
            .await
            .map(drop)
            .map_err(|error| self.sink_error(&error))
    }

    /// The keys and arguments of a batch's `EVALSHA` (see `redis_apply_batch.lua`).
    fn prepare(&self, batch: &Batch, first_key: &str) -> Result<(Vec<Key>, Vec<Value>), SinkError> {
        let marker = marker_key(&self.marker_prefix, first_key, batch.id);
        if self.client.is_clustered() {
            if let Some(key) = key_outside_slot_of(&marker, batch) {
                return Err(SinkError::Failed(format!(
                    "batch {} mixes Redis Cluster hash slots: key {key:?} is not in the slot of \
                     its marker {marker:?}; RedisSink needs every key of a batch in one slot",
                    batch.id
                )));
            }
        }
        let mut keys = Vec::with_capacity(batch.increments.len() + 1);
        let mut args = Vec::with_capacity(2 * batch.increments.len() + 1);
        keys.push(Key::from(marker));
        args.push(Value::Integer(self.dedup_window_secs));
        for increment in &batch.increments {
            keys.push(Key::from(increment.key.as_str()));
            // Above i64::MAX (outside the contract) the amount goes as text, and Redis rejects
            // that key ("value is not an integer or out of range"): no panic, no wrap-around.
            args.push(match i64::try_from(increment.amount) {
                Ok(amount) => Value::Integer(amount),
                Err(_) => Value::from(increment.amount.to_string()),
            });
            // `whole_seconds` is at most 2^50.
            args.push(Value::Integer(whole_seconds(increment.ttl) as i64));
        }
        Ok((keys, args))
    }

    /// Sends one batch's `EVALSHA`.
    async fn send(&self, batch: &Batch) -> Reply {
        let Some(first) = batch.increments.first() else {
            return Reply::Empty;
        };
        if !self.client.is_connected() {
            return Reply::Failed(SinkError::NotSent(format!(
                "not connected to Redis (client state: {:?})",
                self.client.state()
            )));
        }
        let (keys, args) = match self.prepare(batch, &first.key) {
            Ok(call) => call,
            Err(error) => return Reply::Failed(error),
        };
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent.fetch_add(1, Ordering::Relaxed);
        match self
            .client
            .evalsha::<Value, _, _, _>(self.script.sha1().clone(), keys, args)
            .await
        {
            Ok(value) => Reply::Ran(value),
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                Reply::NoScript(error.details().to_owned())
            }
            Err(error) => Reply::Failed(self.sink_error(&error)),
        }
    }

    fn sink_error(&self, error: &FredError) -> SinkError {
        match error.kind() {
            ErrorKind::Timeout => SinkError::Timeout(self.command_timeout),
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Backpressure => {
                SinkError::Unavailable(error.to_string())
            }
            // Redis answered with an error for the whole command (OOM, READONLY, LOADING...):
            // the script did not run, a retry may succeed later.
            _ => SinkError::Failed(error.to_string()),
        }
    }
}

impl Drop for RedisSink {
    fn drop(&mut self) {
        // A client made by `connect` reconnects forever unless told to quit; nobody else can.
        if !self.owns_client {
            return;
        }
        // Outside a runtime context nothing can be spawned; the task then ends with its runtime.
        if tokio::runtime::Handle::try_current().is_ok() {
            stop(&self.client);
        }
    }
}

/// What became of one batch's `EVALSHA`.
enum Reply {
    /// The batch had no increments: nothing was sent.
    Empty,
    /// The script ran; its reply.
    Ran(Value),
    /// Redis did not have the script (first use, restart, failover, `SCRIPT FLUSH`): nothing ran.
    NoScript(String),
    /// Not sent, or sent with an unknown outcome.
    Failed(SinkError),
}

impl Sink for RedisSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        let mut replies = join_all(batches.iter().map(|batch| self.send(batch))).await;

        let missing: Vec<usize> = (0..replies.len())
            .filter(|&i| matches!(replies[i], Reply::NoScript(_)))
            .collect();
        if !missing.is_empty() {
            // Nothing ran for these batches: load the script once, send them again.
            match self.load_script().await {
                Ok(()) => {
                    let again = join_all(missing.iter().map(|&i| self.send(&batches[i]))).await;
                    for (i, reply) in missing.into_iter().zip(again) {
                        replies[i] = reply;
                    }
                }
                Err(error) => {
                    for i in missing {
                        replies[i] = Reply::Failed(error.clone());
                    }
                }
            }
        }

        replies
            .into_iter()
            .zip(batches)
            .map(|(reply, batch)| match reply {
                Reply::Empty => Ok(BatchOutcome::Applied(Vec::new())),
                Reply::Ran(value) => parse_reply(value, batch),
                // Still missing right after a load: someone flushes scripts in a loop.
                Reply::NoScript(message) => Err(SinkError::Failed(message)),
                Reply::Failed(error) => Err(error),
            })
            .collect()
    }

    /// Pipelined `GET`s (fred sends concurrent commands back to back on one connection; on a
    /// cluster each goes to its key's node).
    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        if !self.client.is_connected() {
            return Err(SinkError::NotSent(format!(
                "not connected to Redis (client state: {:?})",
                self.client.state()
            )));
        }
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let replies = join_all(keys.iter().map(|key| self.client.get::<Value, _>(key))).await;
        replies
            .into_iter()
            .map(|reply| match reply {
                Ok(Value::Integer(total)) => Ok(Some(total)),
                Ok(value) => Ok(value.as_string().and_then(|text| text.parse().ok())),
                Err(error) => Err(self.sink_error(&error)),
            })
            .collect()
    }

    fn commands_sent(&self) -> u64 {
        // Relaxed: a statistic.
        self.commands_sent.load(Ordering::Relaxed)
    }
}

/// Reads the script's reply (format at the top of `redis_apply_batch.lua`).
fn parse_reply(reply: Value, batch: &Batch) -> Result<BatchOutcome, SinkError> {
    let unexpected = |what: &dyn std::fmt::Debug| {
        SinkError::Failed(format!("unexpected reply to batch {}: {what:?}", batch.id))
    };
    let Value::Array(items) = reply else {
        return Err(unexpected(&reply));
    };
    match items.first() {
        Some(Value::Integer(0)) if items.len() == 1 => return Ok(BatchOutcome::AlreadyApplied),
        Some(Value::Integer(1)) if items.len() == batch.increments.len() + 1 => {}
        _ => return Err(unexpected(&items)),
    }
    items
        .into_iter()
        .skip(1)
        .map(|item| match item {
            Value::Integer(total) => Ok(KeyOutcome::Added { total }),
            Value::String(reason) => Ok(KeyOutcome::Rejected {
                reason: reason.to_string(),
            }),
            Value::Bytes(reason) => Ok(KeyOutcome::Rejected {
                reason: String::from_utf8_lossy(&reason).into_owned(),
            }),
            Value::Array(exact) => match exact.as_slice() {
                [total] => total
                    .as_string()
                    .and_then(|text| text.parse::<i64>().ok())
                    .filter(|total| total.unsigned_abs() >= LUA_EXACT_LIMIT.unsigned_abs())
                    .map(|total| KeyOutcome::Added { total })
                    .ok_or_else(|| unexpected(&exact)),
                _ => Err(unexpected(&exact)),
            },
            other => Err(unexpected(&other)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(BatchOutcome::Applied)
}

/// The marker of batch `id` whose first key is `first_key`: `<prefix>:{<tag>}:<id>`, in the hash
/// slot of `first_key`.
fn marker_key(prefix: &str, first_key: &str, id: BatchId) -> String {
    match hash_tag(first_key) {
        Some(tag) => format!("{prefix}:{{{tag}}}:{id}"),
        // No tag: the whole key decides its slot, so it becomes the marker's tag...
        None if !first_key.contains('}') => format!("{prefix}:{{{first_key}}}:{id}"),
        // ...unless it holds a `}`, which would end the tag early. Only a Cluster cares, and
        // there `prepare` reports the batch as crossing slots.
        None => format!("{prefix}:{id}"),
    }
}

/// The hash tag of `key` by Redis Cluster's rule: the text between the first `{` and the first
/// `}` after it, if not empty.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The first key of `batch` that is not in the hash slot of `marker`.
fn key_outside_slot_of<'a>(marker: &str, batch: &'a Batch) -> Option<&'a str> {
    let slot = fred::util::redis_keyslot(marker.as_bytes());
    batch
        .increments
        .iter()
        .map(|increment| increment.key.as_str())
        .find(|key| fred::util::redis_keyslot(key.as_bytes()) != slot)
}

/// `duration` in whole seconds, rounded up, between 1 and `MAX_TTL_SECS`.
fn whole_seconds(duration: Duration) -> u64 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    seconds.clamp(1, MAX_TTL_SECS)
}

/// Polls all `futures` together and returns their outputs in order: the batches' commands all
/// reach fred before any reply is awaited, so they are pipelined on the connection. (The crate
/// has no `futures` dependency; a write holds at most a few hundred batches, so polling all of
/// them on each wake-up is cheap.)
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut slots: Vec<Slot<F>> = futures
        .into_iter()
        .map(|future| Slot::Pending(Box::pin(future)))
        .collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for slot in &mut slots {
            if let Slot::Pending(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(output) => *slot = Slot::Done(output),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    slots
        .into_iter()
        .filter_map(|slot| match slot {
            Slot::Done(output) => Some(output),
            Slot::Pending(_) => None,
        })
        .collect()
}

enum Slot<F: Future> {
    Pending(Pin<Box<F>>),
    Done(F::Output),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Increment;

    fn batch(keys: &[&str]) -> Batch {
        Batch {
            id: BatchId {
                writer: 0xc0ffee,
                sequence: 7,
            },
            increments: keys
                .iter()
                .map(|key| Increment {
                    key: (*key).to_owned(),
                    amount: 1,
                    ttl: Duration::from_secs(60),
                })
                .collect(),
        }
    }

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(
            hash_tag("fair_use:dg_budget:{uid-42}:20261129"),
            Some("uid-42")
        );
        assert_eq!(hash_tag("a{b}{c}"), Some("b"));
        assert_eq!(hash_tag("a{{b}c"), Some("{b"));
        assert_eq!(hash_tag("a{}b{c}"), None);
        assert_eq!(hash_tag("a{b"), None);
        assert_eq!(hash_tag("plain"), None);
    }

    #[test]
    fn markers_share_the_slot_of_the_first_key() {
        let id = BatchId {
            writer: 1,
            sequence: 2,
        };
        for key in [
            "usage:{uid-42}:20261129",
            "usage:{%7B%20x}",
            "no-tag",
            "a{{b}c",
            "a{b",
        ] {
            let marker = marker_key("shardmeter:batch", key, id);
            assert_eq!(
                fred::util::redis_keyslot(marker.as_bytes()),
                fred::util::redis_keyslot(key.as_bytes()),
                "{key} vs {marker}"
            );
        }
        assert_eq!(
            marker_key("m", "usage:{uid-42}:20261129", id),
            "m:{uid-42}:0000000000000001-2"
        );
        // A `}` without a tag cannot be carried over: the marker is untagged.
        assert_eq!(marker_key("m", "a}b", id), "m:0000000000000001-2");
    }

    #[test]
    fn batches_that_cross_slots_are_detected() {
        let same = batch(&["u:{a}:1", "u:{a}:2", "v:{a}"]);
        assert_eq!(key_outside_slot_of("m:{a}:1", &same), None);
        let mixed = batch(&["u:{a}:1", "u:{b}:1"]);
        assert_eq!(key_outside_slot_of("m:{a}:1", &mixed), Some("u:{b}:1"));
    }

    #[test]
    fn ttls_are_whole_seconds_rounded_up_and_bounded() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(86_400)), 86_400);
        assert_eq!(whole_seconds(Duration::MAX), MAX_TTL_SECS);
    }

    #[test]
    fn replies_are_parsed_strictly() {
        let two = batch(&["k:{a}:1", "k:{a}:2"]);
        let reply = Value::Array(vec![
            Value::Integer(1),
            Value::Integer(5),
            Value::String("WRONGTYPE nope".into()),
        ]);
        assert_eq!(
            parse_reply(reply, &two),
            Ok(BatchOutcome::Applied(vec![
                KeyOutcome::Added { total: 5 },
                KeyOutcome::Rejected {
                    reason: "WRONGTYPE nope".into()
                },
            ]))
        );
        let duplicate = Value::Array(vec![Value::Integer(0)]);
        assert_eq!(
            parse_reply(duplicate, &two),
            Ok(BatchOutcome::AlreadyApplied)
        );
        let big = Value::Array(vec![
            Value::Integer(1),
            Value::Array(vec![Value::String(i64::MAX.to_string().into())]),
            Value::Integer(1),
        ]);
        assert_eq!(
            parse_reply(big, &two),
            Ok(BatchOutcome::Applied(vec![
                KeyOutcome::Added { total: i64::MAX },
                KeyOutcome::Added { total: 1 },
            ]))
        );
        for bad in [
            Value::Integer(1),
            Value::Array(vec![Value::Integer(1), Value::Integer(5)]),
            Value::Array(vec![
                Value::Integer(2),
                Value::Integer(5),
                Value::Integer(5),
            ]),
            Value::Array(vec![Value::Integer(0), Value::Integer(5)]),
            Value::Array(vec![
                Value::Integer(1),
                Value::Array(vec![Value::String("12".into())]),
                Value::Integer(5),
            ]),
        ] {
            assert!(matches!(parse_reply(bad, &two), Err(SinkError::Failed(_))));
        }
    }
}
