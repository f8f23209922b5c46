//! The Redis sink: batches are applied at most once by a Lua script, one call per hash slot
//! on Redis Cluster, with [fred](https://docs.rs/fred/10.1.0).
//!
//! # Usage
//!
//! A gateway that has no Redis client yet lets the sink make one, for one Redis or a Cluster:
//!
//! ```no_run
//! use shardmeter::sink::redis::RedisSink;
//! use shardmeter::{Engine, KeyScheme};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! // Fails on a URL that does not parse, credentials Redis refuses or a database it does not
//! // have; a Redis that is down is not an error here: writes report `SinkError::NotSent`
//! // (naming the address and the cause) until it is back.
//! let sink = RedisSink::connect("redis://127.0.0.1:6379").await?;
//! // A Cluster: one reachable node is enough, more are tried in turn.
//! let clustered = RedisSink::connect("redis-cluster://10.0.0.1:6379?node=10.0.0.2:6379").await?;
//! let engine = Engine::builder()
//!     .keys(KeyScheme::daily_utc("fair_use:dg_budget"))
//!     .sink(sink)
//!     .build()?;
//! # Ok(())
//! # }
//! ```
//!
//! One that already has a fred client (clustered or not) passes it to [`RedisSink::new`] (or
//! to [`RedisSinkBuilder::build`]); see there. Settings: [`RedisSink::builder`].
//!
//! # Lanes and calls
//!
//! A [`Sink::write`] call regroups the increments of all its batches by **lane**: on a Cluster
//! the lane is the key's hash slot (`fred::util::redis_keyslot`), on one Redis it is the
//! batch's sequence modulo 2,048 (a key's slot does not matter there, and a batch of 500 keys is
//! a good size for one script). Each (writer, lane) of the write becomes one `EVALSHA` whose
//! keys are all declared in `KEYS` and, on a Cluster, all lie in that slot, so Redis never
//! answers `CROSSSLOT`, whatever the keys look like: the reference deployment's plain keys
//! (`fair_use:dg_budget:uid-42:20261129`, spread over all 16,384 slots) as well as hash-tagged
//! ones. A call goes out as soon as no later batch of the write can add to it: on one Redis
//! when the write's last batch of its lane is planned (with one batch per lane, the usual case
//! up to 2,048 batches per write, each batch's call goes out right after it is planned, and Redis
//! runs it while the sink plans the next); on a Cluster, where any later key may share a slot,
//! once every key is planned. Calls travel in fred pipelines of about 1,024 keys, each sent by a
//! task of its own as it fills (so that no single poll copies or frees a whole round's
//! commands); fred routes each call to the node that owns its slot, follows `MOVED`/`ASK` while
//! slots move, and the nodes work concurrently. A key's value and its amount and TTL are made
//! once, when it is planned, and move into the call's arguments. A pipeline's replies are read
//! as soon as it has them all, while Redis runs the later pipelines. Planning and reading
//! replies check every 32 keys (inside a batch or a call too) and after each pipeline whether
//! to yield to the runtime: once 0.3 ms have passed since the poll began (in the engine's write
//! task; called on its own, since the loop's last yield).
//!
//! # Exactly-once
//!
//! Redis keeps one **dedup record** per writer and lane: a string holding the highest batch
//! sequence applied in that lane, `<prefix>:{<lane tag>}:<writer>`, for example
//! `shardmeter:dedup:{8411}:00c0ffee00c0ffee`. The lane tag is a short number chosen so that
//! the record lies in the lane's hash slot. A call passes the highest sequence of its batches;
//! the script swaps it into the record (`SET … GET EX`, one command) and
//!
//! - if the record held a lower sequence (or none), applies every increment of the call:
//!   `INCRBY` per key, and returns the new totals;
//! - if it held this sequence or a higher one, the call was applied before (by an attempt
//!   whose reply was lost): it restores the record, changes nothing, and the batch is
//!   [`BatchOutcome::AlreadyApplied`].
//!
//! A script runs atomically, so a record and the increments it covers are written together or
//! not at all. Why one number per (writer, lane) is enough rests on the engine's contract:
//! batch sequences of a writer increase; a write re-sends every batch of the writer that is not
//! settled yet, unchanged; a write carries new batches only when every batch sent before is
//! settled. So a call for a lane carries either new batches, all above the record, or a
//! re-send whose lane contents are a subset of an earlier call that was applied as a whole or
//! not at all. Within one write each (writer, lane) is one call, so a later pipelined call
//! never advances the record over an earlier one that failed. A process restart is a new
//! writer id, with records of its own.
//!
//! On a Cluster a batch spans many slots. A batch is settled ([`BatchOutcome::Applied`] or
//! [`BatchOutcome::AlreadyApplied`]) only when all of its calls were; if some failed, the
//! batch is an error, the flusher re-sends it, and the lanes already applied are skipped. So
//! a batch is applied **exactly once, lane by lane**: for a moment some of its slots may hold
//! their share while others do not yet. The totals of lanes applied by an earlier attempt are
//! read back with a `GET`.
//!
//! The dedup window is a record's lifetime after its last write: 24 hours unless set with
//! [`RedisSinkBuilder::dedup_window`]. If a batch is retried after its record expired (a
//! flusher that kept retrying for longer than the window, or a record evicted under memory
//! pressure), **its amounts are counted a second time**. Keep the window far longer than the
//! longest retry, and run Redis with `maxmemory-policy noeviction` (the default).
//!
//! The dedup state is bounded by writers × lanes, whatever the uptime: at most 2,048 records per
//! writer on one Redis, at most 16,384 (one per slot written) on a Cluster, and a dead writer's
//! records expire after the window. See `docs/benchmarks.md` for the bytes measured.
//!
//! An increment that Redis refuses (the key holds a non-integer or a hash, or the sum would
//! overflow) is run with `redis.pcall`: that key is left unchanged and reported as
//! [`KeyOutcome::Rejected`], the other keys are applied.
//!
//! # Misconfiguration
//!
//! A setting Redis refuses for good is [`SinkError::Misconfigured`] (at [`RedisSink::connect`]:
//! [`RedisSinkError::Misconfigured`] or [`RedisSinkError::Auth`]): a database index it does not
//! have, credentials refused at a reconnect (`WRONGPASS`), an ACL that forbids `EVALSHA`,
//! `SCRIPT LOAD` or one of the keys (`NOPERM`). An ACL that allows `EVALSHA` but forbids a
//! command the script runs after its first write (`INCRBY`, `EXPIRE`, `GET`) would otherwise
//! leave part of a call applied and report the rest as rejected keys, amounts lost: on Redis 7
//! and later the script checks those commands with `redis.acl_check_cmd` (on the call's first
//! key; Redis itself checks every declared key against the user's key patterns before the
//! script runs) and refuses the whole call before it writes anything. Nothing is applied, so the
//! engine keeps the amounts and writes them once the setting is fixed (Redis 6.2 has no such
//! check: there, give the sink's user every command it runs). The three checks cost
//! about 0.2 µs each in Redis, a quarter of an `INCRBY` run by a script (measured in one Lua
//! loop on the 2-core development machine): nothing at 500 keys per call, up to a tenth of the
//! server time of a call of ~6 keys (a Cluster's calls at 100k accounts; redis-benchmark of such
//! calls on a busy machine: 51k calls/s without the checks, 46k with them, medians of 6 runs).
//!
//! # Commands per account
//!
//! Per call: one `EVALSHA` on the wire; inside it one `SET` (the record) and one `INCRBY` per
//! key. `EXPIRE` runs only when `INCRBY` created the key (its total equals the amount): a
//! key's TTL targets a fixed instant (end of its bucket plus a margin), so setting it once is
//! enough. To give a key back a TTL that someone removed (`PERSIST`, or a `SET` without one),
//! each key is also sent with "set the TTL anyway" in about one write out of 16 it appears in
//! (a hash of the key and of the sink's write count decides). A `GET` reads a total too large
//! for a Lua number to carry exactly (2^53 and beyond).
//!
//! So a flush costs `1 + 2/k + 1/16` server calls per account, `k` being the keys per call: on
//! one Redis `k` is the batch size (500 by default: 1.07); on a Cluster it is the accounts per
//! slot (100,000 accounts over 16,384 slots: about 6, so 1.39). The script is loaded lazily:
//! when Redis answers `NOSCRIPT` (first use, a restart, a promoted replica, `SCRIPT FLUSH`),
//! the sink loads it on every primary and sends the affected calls again.
//!
//! [`Sink::commands_sent`] counts the `EVALSHA` and `SCRIPT LOAD` commands this sink issued.
//! The commands the script runs do not travel on the wire but do appear in Redis' own
//! `INFO commandstats`, and fred's transparent re-sends (next section) are not counted here.
//!
//! # Connection loss, timeouts, failover and re-sends
//!
//! When a connection drops, or the pipeline gets no complete reply within the command timeout,
//! the outcome of its calls is unknown: Redis may have run some before the replies were lost.
//! The sink answers [`SinkError::Unavailable`] or [`SinkError::Timeout`], and the flusher
//! retries with the same ids; calls that had been applied find their record.
//!
//! fred itself re-sends a command that was in flight when its connection closed, once it has
//! reconnected (or, on a Cluster, once it has found the slot's new owner after a failover or a
//! `MOVED`). For a plain `INCRBY` pipeline or a `MULTI`/`EXEC` that re-send double-counts (the
//! caller even sees `Ok`); for this script it is harmless: the second run finds the record.
//! The sink sets two attempts per command whatever the client's own setting. A command that
//! timed out is not re-sent by fred; one already written may still run when a stalled Redis
//! resumes — again harmless.
//!
//! While the client is not connected (Redis down, reconnecting), [`Sink::write`] answers
//! [`SinkError::Unavailable`] at once, without queueing commands: the flusher keeps the amounts
//! pending and retries with backoff, and a shutdown is not held up by a dead Redis.
//!
//! Redis replicates asynchronously: a primary killed right after it answered may take writes
//! its replica never received with it. Those amounts are lost, never doubled; what the sink
//! cannot know is reported as unknown and retried.
//!
//! # Totals
//!
//! [`KeyOutcome::Added::total`] is the key's value right after the increment, including every
//! other writer's additions: a free, fresh view of an account's usage across gateways.

use super::{Batch, BatchId, BatchOutcome, Increment, KeyOutcome, Sink, SinkError, Slicer};
use fred::bytes::{Bytes, BytesMut};
use fred::clients::{Client, Pipeline, WithOptions};
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, LuaInterface};
use fred::types::config::{Config, Options, ReconnectPolicy};
use fred::types::scripts::Script;
use fred::types::{Builder, ClusterHash, CustomCommand, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The script that applies one (writer, lane) call; its reply format is described at its top.
const APPLY_LUA: &str = include_str!("redis_apply.lua");

/// Default prefix of the dedup records.
pub const DEFAULT_MARKER_PREFIX: &str = "shardmeter:dedup";
/// Default dedup window (a record's lifetime after its last write): 24 hours.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Default time allowed for one write's replies. Below the engine's default write timeout
/// (5 s), so the sink, not the flusher, reports which batches timed out.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Attempts per command: one transparent re-send after a reconnect (see the module docs).
const MAX_COMMAND_ATTEMPTS: u32 = 2;
/// How long a diagnosis of why the client cannot connect is reused (see `RedisSink::diagnose`).
const DIAGNOSIS_EVERY: Duration = Duration::from_secs(5);
/// The longest a diagnosis may take.
const MAX_DIAGNOSIS_TIME: Duration = Duration::from_secs(1);
/// Reconnect backoff of a client made by [`RedisSink::connect`]: 100 ms doubling to 5 s,
/// forever (a gateway outlives a Redis outage).
const RECONNECT_MIN_DELAY_MS: u32 = 100;
const RECONNECT_MAX_DELAY_MS: u32 = 5_000;
/// The longest time-to-live sent to Redis, in seconds (about 35 million years). Redis refuses
/// an `EXPIRE` whose deadline does not fit in 64-bit milliseconds; this keeps far from that.
const MAX_TTL_SECS: u64 = 1 << 50;
/// Hash slots of a Redis Cluster.
const SLOTS: u16 = 16_384;
/// Lanes on one Redis: batch sequences modulo this. With more lanes than batches in a write
/// (up to a million keys in batches of 500), each batch is a call of its own that leaves as
/// soon as it is planned. With 256, a write of a million keys held every call open until its
/// last 256 batches: ~140 MB of arguments growing at once, and plan steps of 1–4 ms at that
/// size (`docs/benchmarks.md`). The dedup state stays small: 2,048 records × 88 B per writer.
const SINGLE_NODE_LANES: u64 = 2_048;
/// A key is sent with "set the TTL anyway" in about one write out of this many.
const TTL_REFRESH_EVERY: u64 = 16;
/// How Redis' replies begin when it refuses the sink's own settings, which no retry fixes until an
/// operator changes them: the URL's database, credentials refused at a reconnect, an ACL that
/// forbids a command or key the sink needs (also as the script's own check reports it), a
/// command the server does not have. Not `NOAUTH` (the server began to require a password the
/// URL may not have needed: an outage an operator ends on the server side, reported as such),
/// nor `LOADING`, `READONLY`, `OOM`, `BUSY`, `CLUSTERDOWN`, `MASTERDOWN`: they pass.
const MISCONFIGURATION_REPLIES: [&str; 6] = [
    "ERR DB index is out of range",
    "ERR invalid DB index",
    "WRONGPASS",
    "NOPERM",
    "ERR unknown command",
    "ERR The user executing the script can't run",
];

/// Whether a Redis error reply says the sink's settings are wrong (see
/// [`MISCONFIGURATION_REPLIES`]).
fn is_misconfiguration(error: &FredError) -> bool {
    MISCONFIGURATION_REPLIES
        .iter()
        .any(|reply| error.details().starts_with(reply))
}
/// Keys planned, read or answered between two checks of whether to yield to the runtime
/// ([`Slicer`]), so that a write of a million keys never holds the caller's worker for
/// long: ~1.2 µs per key planned when the round is a million keys (a key's slot, its call's
/// lookup, three values made; the keys no longer fit in the caches), and up to ~20 µs in the
/// first write after start-up on a guest whose page faults are slow (the flusher's step sizes
/// say more): a step is then at most ~0.6 ms, and usually ~40 µs.
const SLICE_KEYS: usize = 32;
/// Keys per pipeline: each is sent by a task of its own (see [`Pipelines`]).
const PIPELINE_KEYS: usize = 1_024;

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
    /// given. The message names the address and Redis' reply.
    #[error("Redis refused authentication: {0}")]
    Auth(String),
    /// Redis answered, and refuses a setting of the URL for good: a database index it does not
    /// have (`ERR DB index is out of range`), or a command the sink needs (`NOPERM`, unknown
    /// command). The message names the address and Redis' reply.
    #[error("Redis refuses the sink's settings: {0}")]
    Misconfigured(String),
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
    /// The prefix of the dedup records (default `shardmeter:dedup`). Not empty, no braces. Keep
    /// it outside the counters' prefix, so that a `SCAN` of the counters finds counters only.
    pub fn marker_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.marker_prefix = prefix.into();
        self
    }

    /// How long a dedup record lives after its last write, so how long a retry is recognised
    /// (default 24 h, at least 1 s, rounded up to whole seconds). See the module's
    /// *Exactly-once* section.
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

        let address = address_of(&client);
        match first_connection(&client, timeout).await {
            Ok(()) => {}
            Err(error) if *error.kind() == ErrorKind::Auth => {
                stop(&client);
                return Err(RedisSinkError::Auth(format!(
                    "{address}: {}",
                    error.details()
                )));
            }
            Err(error) if is_misconfiguration(&error) => {
                stop(&client);
                return Err(RedisSinkError::Misconfigured(format!(
                    "{address}: {}",
                    error.details()
                )));
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
            return invalid("the dedup record prefix is empty".into());
        }
        if self.marker_prefix.contains(['{', '}']) {
            return invalid(format!(
                "the dedup record prefix {:?} contains a brace; braces are reserved for the hash tag",
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

/// Where `client` connects: `host:port`, comma-separated for several.
fn address_of(client: &Client) -> String {
    client
        .client_config()
        .server
        .hosts()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Ends the connection task of a client made by `connect` (it would reconnect forever). In the
/// background: `QUIT` stops the reconnect loop at once, but its own reply may never come (no
/// connection) and would hold the caller for the command timeout.
fn stop(client: &Client) {
    let client = client.clone();
    tokio::spawn(async move { client.quit().await });
}

/// Writes batches to Redis or Redis Cluster, one script call per (writer, lane), each applied
/// at most once. See the [module docs](self).
pub struct RedisSink {
    /// The client with this sink's per-command timeout and attempts.
    client: WithOptions<Client>,
    script: Script,
    marker_prefix: String,
    dedup_window: Duration,
    dedup_window_secs: i64,
    command_timeout: Duration,
    commands_sent: AtomicU64,
    /// Writes so far: picks the keys whose TTL is set anyway (see the module docs).
    writes: AtomicU64,
    /// The client was made by `connect`: close it when the sink is dropped.
    owns_client: bool,
    /// Where the client connects (`host:port`, comma-separated for several), for error messages.
    address: String,
    /// Why a connection to Redis fails, as a connection of the sink's own found out, and when:
    /// fred's reconnect loop keeps the cause (refused, `NOAUTH`, `WRONGPASS`, a DNS failure...) in
    /// its debug log only. See `diagnose`.
    diagnosis: Mutex<Option<(Instant, Diagnosis)>>,
}

impl std::fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSink")
            .field("client", &self.client.id())
            .field("clustered", &self.client.is_clustered())
            .field("script", &self.script.sha1())
            .field("marker_prefix", &self.marker_prefix)
            .field("dedup_window", &self.dedup_window)
            .field("command_timeout", &self.command_timeout)
            .field("commands_sent", &self.commands_sent())
            .finish()
    }
}

impl RedisSink {
    /// Settings: dedup record prefix, dedup window, command timeout.
    pub fn builder() -> RedisSinkBuilder {
        RedisSinkBuilder::default()
    }

    /// A sink with default settings writing through `client`, a fred client the gateway already
    /// has (connected, with a reconnect policy; clustered or not). See
    /// [`RedisSinkBuilder::build`] for an example.
    pub fn new(client: Client) -> Self {
        Self::assemble(RedisSinkBuilder::default(), client, false)
    }

    /// Parses `url` (`redis://[[user]:password@]host[:port][/db]`, or
    /// `redis-cluster://host:port?node=host2:port2` for a Cluster; `rediss://` needs a TLS
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
    ///   has none;
    /// - [`RedisSinkError::Misconfigured`] if Redis refuses another setting of the URL for good,
    ///   such as a database index it does not have (`redis://host/99`).
    ///
    /// Both name the address and Redis' reply. A Redis that cannot be reached is **not** an
    /// error: a gateway must start while Redis is down. The sink is returned, a warning is
    /// logged, the client keeps reconnecting in the background, and writes answer
    /// [`SinkError::NotSent`], naming the address and the cause (`Connection refused`...),
    /// until it is connected. If Redis, once reached, refuses the settings, writes answer
    /// [`SinkError::Misconfigured`] instead.
    pub async fn connect(url: &str) -> Result<Self, RedisSinkError> {
        RedisSinkBuilder::default().connect(url).await
    }

    fn assemble(settings: RedisSinkBuilder, client: Client, owns_client: bool) -> Self {
        // Computed here, once per process, rather than in the first write's first poll (a few
        // milliseconds of the flusher's time).
        lane_tags();
        let options = Options {
            timeout: Some(settings.command_timeout),
            max_attempts: Some(MAX_COMMAND_ATTEMPTS),
            ..Options::default()
        };
        Self {
            address: address_of(&client),
            diagnosis: Mutex::new(None),
            client: client.with_options(&options),
            script: Script::from_lua(APPLY_LUA),
            marker_prefix: settings.marker_prefix,
            dedup_window: settings.dedup_window,
            // `validate` keeps it below 2^50 and the default is 86,400.
            dedup_window_secs: whole_seconds(settings.dedup_window) as i64,
            command_timeout: settings.command_timeout,
            commands_sent: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            owns_client,
        }
    }

    /// The fred client this sink writes through (for reads such as budget checks).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// How long a dedup record lives after its last write.
    pub fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    /// How long a write may wait for its replies.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// The dedup record that guards `key` of batch `id`: `<prefix>:{<lane tag>}:<writer>`,
    /// where the lane is `key`'s hash slot on a Cluster and `id.sequence % 2048` on one Redis.
    pub fn dedup_record_key(&self, id: BatchId, key: &str) -> String {
        record_key(&self.marker_prefix, id.writer, self.lane(id, key))
    }

    /// Loads the script into Redis' script cache now (optional: writes load it when Redis
    /// answers `NOSCRIPT`). On a cluster it is loaded on every primary.
    pub async fn load_script(&self) -> Result<(), SinkError> {
        self.load_script_on_primaries()
            .await
            .map_err(|error| self.sink_error(&error))
    }

    /// [`load_script`](Self::load_script) with fred's error, whose reply `write` classifies.
    async fn load_script_on_primaries(&self) -> Result<(), FredError> {
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent.fetch_add(1, Ordering::Relaxed);
        self.client
            .script_load_cluster::<Value, _>(APPLY_LUA)
            .await
            .map(drop)
    }

    fn lane(&self, id: BatchId, key: &str) -> u16 {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        lane(self.client.is_clustered(), id.sequence, slot)
    }

    /// Regroups `batches` into one call per (writer, lane) and sends each call as soon as no
    /// later batch of the write can add to it, in pipelines of about [`PIPELINE_KEYS`] keys
    /// ([`Pipelines`]). On one Redis a batch's lane is its sequence's, so the last batch of each
    /// (writer, lane) is known before any key is read: that batch's call goes out when it is
    /// planned, and Redis runs it while the rest is planned. On a Cluster a lane is a key's hash
    /// slot, which any later key may share: the calls go out once every key is planned. Either
    /// way each (writer, lane) is one call per write, which the dedup record relies on (module
    /// docs). Yields every [`SLICE_KEYS`] keys (inside a batch too: one may hold 100,000) and
    /// after each pipeline. A batch id seen earlier in the same write is left out (see
    /// `Sink::write`). Returns the calls in the order queued, and the pipelines that carry them
    /// (the last one not sent yet), whose replies come in as Redis answers.
    async fn plan_and_send(
        &self,
        batches: &[Batch],
        first_of: &[usize],
        write: u64,
    ) -> (Vec<CallPlan>, Pipelines) {
        let clustered = self.client.is_clustered();
        let closes = if clustered {
            vec![false; batches.len()]
        } else {
            last_of_their_lane(batches, first_of)
        };
        let mut slicer = Slicer::new();
        let mut pipelines = Pipelines::new(&self.client);
        let mut sent: Vec<CallPlan> = Vec::new();
        // Calls still open; a sent one is left behind empty.
        let mut open: Vec<OpenCall> = Vec::new();
        let mut by_lane: HashMap<(u64, u16), usize> = HashMap::new();
        let mut key_text = KeyText::default();
        let mut planned = 0;
        for (b, batch) in batches.iter().enumerate() {
            if first_of[b] != b {
                continue;
            }
            let writer = batch.id.writer;
            // One Redis: the whole batch is in its sequence's lane, one lookup for all its keys.
            let batch_call = match (clustered, batch.increments.is_empty()) {
                (false, false) => {
                    let lane = lane(false, batch.id.sequence, 0);
                    let keys = batch.increments.len();
                    Some(OpenCall::find(&mut open, &mut by_lane, writer, lane, keys))
                }
                _ => None,
            };
            for (i, increment) in batch.increments.iter().enumerate() {
                if planned >= SLICE_KEYS {
                    planned = 0;
                    slicer.pause().await;
                }
                planned += 1;
                let slot = fred::util::redis_keyslot(increment.key.as_bytes());
                let c = match batch_call {
                    Some(c) => c,
                    None => OpenCall::find(&mut open, &mut by_lane, writer, slot, 0),
                };
                let call = &mut open[c];
                call.plan.sequence = call.plan.sequence.max(batch.id.sequence);
                call.plan.parts.push((b, i));
                push_increment(call, &mut key_text, increment, slot, write);
            }
            if closes[b] {
                // One Redis: the batch's lane, whatever the slots.
                let lane = lane(false, batch.id.sequence, 0);
                if let Some(c) = by_lane.remove(&(writer, lane)) {
                    let call = std::mem::take(&mut open[c]);
                    let q = self.queue(call, &mut pipelines, &mut sent);
                    if q {
                        planned = 0;
                        slicer.pause().await;
                    }
                }
            }
        }
        // A Cluster's calls (on one Redis every call went out with its last batch).
        for call in open {
            if call.plan.parts.is_empty() {
                continue;
            }
            if self.queue(call, &mut pipelines, &mut sent) {
                slicer.pause().await;
            }
        }
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        (sent, pipelines)
    }

    /// Sends the calls `which` (indices into `calls`, planned by `plan_and_send` for write
    /// number `write`) again, their arguments rebuilt from `batches`, in that order. Yields as
    /// `plan_and_send` does.
    async fn resend(
        &self,
        batches: &[Batch],
        calls: &[CallPlan],
        which: &[usize],
        write: u64,
    ) -> Pipelines {
        let mut slicer = Slicer::new();
        let mut pipelines = Pipelines::new(&self.client);
        let mut sent = Vec::with_capacity(which.len());
        let mut key_text = KeyText::default();
        let mut rebuilt = 0;
        for &c in which {
            let plan = &calls[c];
            let mut call = OpenCall::new(plan.writer, plan.lane, plan.parts.len());
            call.plan.sequence = plan.sequence;
            call.plan.parts.clone_from(&plan.parts);
            for &(b, i) in &plan.parts {
                if rebuilt >= SLICE_KEYS {
                    rebuilt = 0;
                    slicer.pause().await;
                }
                rebuilt += 1;
                let increment = &batches[b].increments[i];
                let slot = fred::util::redis_keyslot(increment.key.as_bytes());
                push_increment(&mut call, &mut key_text, increment, slot, write);
            }
            if self.queue(call, &mut pipelines, &mut sent) {
                rebuilt = 0;
                slicer.pause().await;
            }
        }
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        pipelines
    }

    /// Turns `call` into its `EVALSHA` and queues it in `pipelines`; its plan goes to `sent`.
    /// Returns whether a pipeline was sent (the caller then checks whether to yield). The key
    /// and argument values move into the command: fred frees them once it has written them.
    fn queue(&self, call: OpenCall, pipelines: &mut Pipelines, sent: &mut Vec<CallPlan>) -> bool {
        let OpenCall {
            plan,
            keys: mut args,
            mut pairs,
        } = call;
        let keys = args.len() - CALL_HEADER;
        // EVALSHA sha numkeys record key... sequence record-ttl (amount ttl)...
        args[0] = Value::from(self.script.sha1().clone());
        // The record is a key too.
        args[1] = Value::Integer(keys as i64 + 1);
        args[2] = Value::from(record_key(&self.marker_prefix, plan.writer, plan.lane));
        args.reserve_exact(CALL_TRAILER + pairs.len());
        args.push(Value::from(plan.sequence.to_string()));
        args.push(Value::Integer(self.dedup_window_secs));
        args.append(&mut pairs);
        // Routed to the owner of the lane's slot, where the record and every key lie (fred's
        // `evalsha` has no pipeline form, so it goes as a custom command).
        let command = CustomCommand::new_static("EVALSHA", ClusterHash::Custom(plan.lane), false);
        sent.push(plan);
        pipelines.push(command, args, keys)
    }

    /// Why nothing could be sent: where the client connects and why it cannot, as
    /// [`SinkError::Misconfigured`] when Redis refuses the sink's settings (a database it does not
    /// have, credentials it rejects), else [`SinkError::NotSent`]. The text does not change while
    /// the cause does not, so the flusher's log can tell a new cause apart.
    async fn not_connected(&self) -> SinkError {
        let diagnosis = self.diagnose().await;
        let message = format!(
            "not connected to Redis at {}: {}",
            self.address, diagnosis.cause
        );
        if diagnosis.misconfigured {
            SinkError::Misconfigured(message)
        } else {
            SinkError::NotSent(message)
        }
    }

    /// Connects once, on a connection of the sink's own with the client's settings and no
    /// retries, to learn why the client cannot; at most every [`DIAGNOSIS_EVERY`], the answer
    /// reused in between. Bounded by [`MAX_DIAGNOSIS_TIME`], so a write that calls it still
    /// answers well within the engine's write timeout.
    async fn diagnose(&self) -> Diagnosis {
        if let Some((at, diagnosis)) = &*lock(&self.diagnosis) {
            if at.elapsed() < DIAGNOSIS_EVERY {
                return diagnosis.clone();
            }
        }
        let limit = self.command_timeout.min(MAX_DIAGNOSIS_TIME);
        let mut config = self.client.client_config();
        // Answer with the first failure, not keep trying (`connect` turns this off for the
        // sink's own client).
        config.fail_fast = true;
        let probe = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = limit;
                connection.internal_command_timeout = limit;
                connection.max_command_attempts = 1;
            })
            .build();
        let transient = |cause: String| Diagnosis {
            cause,
            misconfigured: false,
        };
        let diagnosis = match probe {
            Err(error) => transient(format!("cannot set up a client: {error}")),
            Ok(probe) => {
                let diagnosis = match tokio::time::timeout(limit, probe.init()).await {
                    Ok(Ok(_)) => transient("reconnecting (a new connection succeeds)".to_owned()),
                    Ok(Err(error)) => Diagnosis {
                        cause: error.to_string(),
                        misconfigured: is_misconfiguration(&error),
                    },
                    Err(_) => transient(format!("no connection within {limit:?}")),
                };
                stop(&probe);
                diagnosis
            }
        };
        *lock(&self.diagnosis) = Some((Instant::now(), diagnosis.clone()));
        diagnosis
    }

    fn sink_error(&self, error: &FredError) -> SinkError {
        if is_misconfiguration(error) {
            // The command did not run (refused before it started, or by the script's own
            // permission check before it wrote anything).
            return SinkError::Misconfigured(format!(
                "Redis at {} refuses the sink's settings: {}",
                self.address,
                error.details()
            ));
        }
        match error.kind() {
            ErrorKind::Timeout => SinkError::Timeout(self.command_timeout),
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Backpressure => {
                SinkError::Unavailable(error.to_string())
            }
            // Redis answered with an error for the whole command (OOM, READONLY, LOADING,
            // CLUSTERDOWN...): the script did not run, a retry may succeed later.
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

/// Queues `commands` in `pipeline` and sends it: one reply per command, in order.
async fn send_pipeline(
    pipeline: Pipeline<WithOptions<Client>>,
    commands: Vec<(CustomCommand, Vec<Value>)>,
) -> Vec<Result<Value, FredError>> {
    let sent = commands.len();
    for (command, args) in commands {
        // Queued in memory; an error here is one of the whole pipeline.
        if let Err(error) = pipeline.custom::<(), Value>(command, args).await {
            return vec![Err(error); sent];
        }
    }
    let replies = pipeline.try_all::<Value>().await;
    match whole_pipeline(&replies, sent) {
        Ok(()) => replies,
        // Every call's outcome is unknown.
        Err(error) => vec![Err(error); sent],
    }
}

/// fred answers a pipeline that failed as a whole (timeout, lost connection) with one error
/// instead of one reply per command: that error, if `replies` is not one per command sent.
fn whole_pipeline(replies: &[Result<Value, FredError>], sent: usize) -> Result<(), FredError> {
    if replies.len() == sent {
        return Ok(());
    }
    Err(match replies.last() {
        Some(Err(error)) => error.clone(),
        _ => FredError::new(ErrorKind::Unknown, "pipeline answered with a wrong count"),
    })
}

/// Locks `cell`; a panic under this lock cannot leave the value half-written.
fn lock<T>(cell: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    cell.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Values at the head of a call's arguments before its keys: script, key count, record.
const CALL_HEADER: usize = 3;
/// Arguments between a call's keys and its pairs: the sequence and the record's TTL.
const CALL_TRAILER: usize = 2;

/// A call as planned: which increments it carries, to match its reply and to rebuild it.
#[derive(Default)]
struct CallPlan {
    writer: u64,
    /// The lane: on a Cluster the hash slot of the record and of every key.
    lane: u16,
    /// The highest batch sequence among `parts`.
    sequence: u64,
    /// (batch index, increment index) of each key, in the order sent.
    parts: Vec<(usize, usize)>,
}

/// A call being planned: the increments of one writer in one lane, over the batches of a write.
#[derive(Default)]
struct OpenCall {
    plan: CallPlan,
    /// [`CALL_HEADER`] places, filled when the call is sent, then one value per key: these
    /// become the call's arguments without being copied again.
    keys: Vec<Value>,
    /// Amount and TTL per key.
    pairs: Vec<Value>,
}

impl OpenCall {
    /// The index in `open` of the call of (`writer`, `lane`); if there is none, a new call
    /// with room for `keys` keys (0 where the count is not known: a Cluster's slot lanes).
    fn find(
        open: &mut Vec<OpenCall>,
        by_lane: &mut HashMap<(u64, u16), usize>,
        writer: u64,
        lane: u16,
        keys: usize,
    ) -> usize {
        *by_lane.entry((writer, lane)).or_insert_with(|| {
            open.push(OpenCall::new(writer, lane, keys));
            open.len() - 1
        })
    }

    /// A call with room for `keys` keys: its arguments' one allocation is made here, with room
    /// for the pairs that `queue` appends, so it is neither grown nor copied whole (~80 KB for
    /// a batch of 500, copied in one step: a poll's worth where its pages were new).
    fn new(writer: u64, lane: u16, keys: usize) -> Self {
        let mut args = Vec::with_capacity(CALL_HEADER + keys + CALL_TRAILER + 2 * keys);
        args.resize(CALL_HEADER, Value::Null);
        Self {
            plan: CallPlan {
                writer,
                lane,
                ..CallPlan::default()
            },
            keys: args,
            pairs: Vec::with_capacity(2 * keys),
        }
    }
}

/// Adds `increment` (its key in hash slot `slot`) to a call's keys and arguments, for the
/// sink's write number `write`.
fn push_increment(
    call: &mut OpenCall,
    key_text: &mut KeyText,
    increment: &Increment,
    slot: u16,
    write: u64,
) {
    let OpenCall { keys, pairs, .. } = call;
    keys.push(Value::Bytes(key_text.share(&increment.key)));
    // Above i64::MAX (outside the contract) the amount goes as text, and Redis rejects that key
    // ("value is not an integer or out of range"): no panic, no wrap-around.
    pairs.push(match i64::try_from(increment.amount) {
        Ok(amount) => Value::Integer(amount),
        Err(_) => Value::from(increment.amount.to_string()),
    });
    // `whole_seconds` is at most 2^50; negative asks the script to set it anyway.
    let ttl = whole_seconds(increment.ttl) as i64;
    let refresh = spread(u64::from(slot) << 32 ^ write) % TTL_REFRESH_EVERY == 0;
    pairs.push(Value::Integer(if refresh { -ttl } else { ttl }));
}

/// Bytes of key text allocated at once: one allocation holds the text of about a thousand keys.
const KEY_TEXT_CHUNK: usize = 32 * 1024;

/// The text of a write's keys, in chunks: each key's value is a slice of a chunk, which costs a
/// reference count, not an allocation. With an allocation per key (a million per write of a
/// million keys, freed by fred once written) glibc's fast bins filled up, and the next large free
/// on that thread merged them all at once: flusher polls of 4–9 ms (`docs/benchmarks.md`).
#[derive(Default)]
struct KeyText(BytesMut);

impl KeyText {
    /// `key`'s text as a slice of the current chunk (a new one when it has no room left).
    fn share(&mut self, key: &str) -> Bytes {
        if self.0.capacity() - self.0.len() < key.len() {
            self.0 = BytesMut::with_capacity(KEY_TEXT_CHUNK.max(key.len()));
        }
        self.0.extend_from_slice(key.as_bytes());
        self.0.split().freeze()
    }
}

/// On one Redis, for each batch: whether it is the last of its (writer, lane) in the write,
/// among the batches sent (the first of each id, with increments). Its call is then complete.
fn last_of_their_lane(batches: &[Batch], first_of: &[usize]) -> Vec<bool> {
    let mut seen: HashMap<(u64, u16), ()> = HashMap::new();
    let mut last = vec![false; batches.len()];
    for (b, batch) in batches.iter().enumerate().rev() {
        if first_of[b] != b || batch.increments.is_empty() {
            continue;
        }
        let lane = lane(false, batch.id.sequence, 0);
        last[b] = seen.insert((batch.id.writer, lane), ()).is_none();
    }
    last
}

/// The calls of a write, sent in pipelines of about [`PIPELINE_KEYS`] keys as they fill, each
/// pipeline by a task of its own: fred copies a pipeline's commands when it sends them and
/// frees them afterwards, work that for a whole round in one pipeline would be one poll of
/// tens of milliseconds for the caller. The calls are independent (one per (writer, lane) in a
/// write), so their order across pipelines does not matter, and each pipeline's replies are
/// read as soon as they are in ([`Pipelines::next`]), while Redis runs the later ones.
struct Pipelines {
    client: WithOptions<Client>,
    /// Each answers the position of its first call among those queued, and its replies.
    tasks: tokio::task::JoinSet<(usize, Vec<Result<Value, FredError>>)>,
    /// Per pipeline sent, for a task that panics: its id, first call and number of calls.
    launched: Vec<(tokio::task::Id, usize, usize)>,
    filling: Vec<(CustomCommand, Vec<Value>)>,
    filling_keys: usize,
    /// Calls queued so far, sent or filling.
    queued: usize,
}

impl Pipelines {
    fn new(client: &WithOptions<Client>) -> Self {
        Self {
            client: client.clone(),
            tasks: tokio::task::JoinSet::new(),
            launched: Vec::new(),
            filling: Vec::new(),
            filling_keys: 0,
            queued: 0,
        }
    }

    /// Queues a command of `keys` keys; sends the pipeline once it holds [`PIPELINE_KEYS`].
    /// Returns whether it sent one.
    fn push(&mut self, command: CustomCommand, args: Vec<Value>, keys: usize) -> bool {
        self.filling.push((command, args));
        self.queued += 1;
        self.filling_keys += keys;
        if self.filling_keys < PIPELINE_KEYS {
            return false;
        }
        self.send_filling();
        true
    }

    fn send_filling(&mut self) {
        self.filling_keys = 0;
        let commands = std::mem::take(&mut self.filling);
        let (first, size) = (self.queued - commands.len(), commands.len());
        let pipeline = Pipeline::from(self.client.clone());
        let task = self
            .tasks
            .spawn(async move { (first, send_pipeline(pipeline, commands).await) });
        self.launched.push((task.id(), first, size));
    }

    /// Sends what is left, then answers the replies of the next pipeline to finish: the
    /// position of its first call among those queued, and one reply per call, in order.
    /// `None` once every pipeline has answered.
    async fn next(&mut self) -> Option<(usize, Vec<Result<Value, FredError>>)> {
        if !self.filling.is_empty() {
            self.send_filling();
        }
        loop {
            match self.tasks.join_next_with_id().await? {
                Ok((_, answer)) => return Some(answer),
                Err(ended) => {
                    // A task that panicked: its calls may have been sent, so they are answered
                    // as a lost connection (outcome unknown).
                    let Some(&(_, first, size)) =
                        self.launched.iter().find(|(task, ..)| *task == ended.id())
                    else {
                        continue;
                    };
                    let error = FredError::new(ErrorKind::IO, "the task sending a pipeline ended");
                    return Some((first, vec![Err(error); size]));
                }
            }
        }
    }
}

impl Sink for RedisSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        if !self.client.is_connected() {
            // Nothing is sent: the batches are certainly not applied (see `SinkError::NotSent`).
            let error = self.not_connected().await;
            return batches.iter().map(|_| Err(error.clone())).collect();
        }
        // A batch id given twice in one write (outside the engine's contract) is sent once;
        // the later copies are duplicates of the first.
        let first_of: Vec<usize> = {
            let mut seen: HashMap<BatchId, usize> = HashMap::new();
            (0..batches.len())
                .map(|b| *seen.entry(batches[b].id).or_insert(b))
                .collect()
        };
        // Relaxed: only spreads the TTL refreshes over writes; no ordering needed.
        let write = self.writes.fetch_add(1, Ordering::Relaxed);
        let (calls, mut pipelines) = self.plan_and_send(batches, &first_of, write).await;

        // Each batch's outcome slots are made when its first reply arrives, in the sliced loop.
        let mut settled: Vec<Settling> = batches
            .iter()
            .map(|batch| Settling {
                outcomes: Vec::new(),
                applied_now: batch.increments.is_empty(),
                error: None,
            })
            .collect();
        let mut reading = Reading {
            batches,
            settled: &mut settled,
            slicer: Slicer::new(),
            keys_read: 0,
        };
        // Calls that found the script missing: nothing of them ran.
        let mut missing: Vec<usize> = Vec::new();
        while let Some((first, replies)) = pipelines.next().await {
            for (c, reply) in (first..).zip(replies) {
                match reply {
                    Err(error) if error.details().starts_with("NOSCRIPT") => missing.push(c),
                    reply => reading.read(self, &calls[c], reply).await,
                }
            }
        }
        if !missing.is_empty() {
            // Load the script (on every primary) and send these calls again.
            match self.load_script_on_primaries().await {
                Ok(()) => {
                    let mut again = self.resend(batches, &calls, &missing, write).await;
                    while let Some((first, replies)) = again.next().await {
                        for (m, reply) in (first..).zip(replies) {
                            reading.read(self, &calls[missing[m]], reply).await;
                        }
                    }
                }
                Err(error) => {
                    for c in missing {
                        reading.read(self, &calls[c], Err(error.clone())).await;
                    }
                }
            }
        }
        let mut slicer = reading.slicer;

        let mut results: Vec<Result<BatchOutcome, SinkError>> = Vec::with_capacity(batches.len());
        let mut finished_keys = 0;
        for (batch, settling) in batches.iter().zip(settled) {
            if finished_keys >= SLICE_KEYS {
                finished_keys = 0;
                slicer.pause().await;
            }
            finished_keys += batch.increments.len();
            results.push(settling.finish(batch.increments.len()));
        }
        for (b, &first) in first_of.iter().enumerate() {
            if first != b {
                results[b] = results[first].clone().map(|_| BatchOutcome::AlreadyApplied);
            }
        }
        results
    }

    /// One pipeline of `GET`s; on a Cluster fred routes each to its key's node.
    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        if !self.client.is_connected() {
            return Err(self.not_connected().await);
        }
        let pipeline = Pipeline::from(self.client.clone());
        let mut slicer = Slicer::new();
        for (queued, key) in keys.iter().enumerate() {
            if queued % SLICE_KEYS == 0 {
                slicer.pause().await;
            }
            // Queued in memory; an error here is one of the whole pipeline.
            if let Err(error) = pipeline.get::<(), _>(key.as_str()).await {
                return Err(self.sink_error(&error));
            }
        }
        // Relaxed: a statistic, read without ordering against anything else.
        self.commands_sent
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        let replies = pipeline.try_all::<Value>().await;
        whole_pipeline(&replies, keys.len()).map_err(|error| self.sink_error(&error))?;
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

/// Why the client cannot connect, as the sink's own probe found out.
#[derive(Debug, Clone)]
struct Diagnosis {
    cause: String,
    /// Redis refuses the sink's settings (see [`MISCONFIGURATION_REPLIES`]).
    misconfigured: bool,
}

/// A write's replies being read into its batches' outcomes, a call at a time.
struct Reading<'a> {
    batches: &'a [Batch],
    settled: &'a mut [Settling],
    slicer: Slicer,
    /// Keys answered since the last check of the slice budget. On one Redis a call carries every
    /// batch of its lane in the write (thousands of keys when a write carries a round of a
    /// million), so the slices end inside calls.
    keys_read: usize,
}

impl Reading<'_> {
    /// Reads `call`'s reply into the outcomes of its batches.
    async fn read(&mut self, sink: &RedisSink, call: &CallPlan, reply: Result<Value, FredError>) {
        let parsed = reply
            .map_err(|error| sink.sink_error(&error))
            .and_then(|value| parse_reply(value, call.parts.len()));
        match parsed {
            Ok((applied_now, outcomes)) => {
                for (&(b, i), outcome) in call.parts.iter().zip(outcomes) {
                    if self.keys_read >= SLICE_KEYS {
                        self.keys_read = 0;
                        self.slicer.pause().await;
                    }
                    self.keys_read += 1;
                    let settling = &mut self.settled[b];
                    if settling.outcomes.is_empty() {
                        settling.outcomes = vec![None; self.batches[b].increments.len()];
                    }
                    settling.outcomes[i] = Some(outcome);
                    settling.applied_now |= applied_now;
                }
            }
            Err(error) => {
                for &(b, _) in &call.parts {
                    self.settled[b].error.get_or_insert_with(|| error.clone());
                }
            }
        }
    }
}

/// What the calls of a write said about one batch.
struct Settling {
    /// One per increment once a reply for the batch arrived; empty before.
    outcomes: Vec<Option<KeyOutcome>>,
    /// Some lane of the batch was applied now (or it has no increments).
    applied_now: bool,
    error: Option<SinkError>,
}

impl Settling {
    /// The batch's result; `keys` is its number of increments.
    fn finish(self, keys: usize) -> Result<BatchOutcome, SinkError> {
        if let Some(error) = self.error {
            // Some lanes applied, another failed: whatever the failure says, the batch is no
            // longer certainly unapplied (a shutdown must not call it safe to replay).
            if self.outcomes.iter().any(Option::is_some) && !error.may_have_applied() {
                return Err(SinkError::Unavailable(format!(
                    "batch partly applied, the rest failed: {error}"
                )));
            }
            return Err(error);
        }
        if !self.applied_now {
            return Ok(BatchOutcome::AlreadyApplied);
        }
        if self.outcomes.len() != keys {
            return Err(SinkError::Failed("a key of the batch got no reply".into()));
        }
        self.outcomes
            .into_iter()
            .map(|outcome| {
                outcome.ok_or_else(|| SinkError::Failed("a key of the batch got no reply".into()))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(BatchOutcome::Applied)
    }
}

/// Reads a call's reply (format at the top of `redis_apply.lua`): whether it was applied now,
/// and one outcome per key.
fn parse_reply(reply: Value, keys: usize) -> Result<(bool, Vec<KeyOutcome>), SinkError> {
    let unexpected = |what: &dyn std::fmt::Debug| {
        SinkError::Failed(format!("unexpected script reply: {what:?}"))
    };
    let Value::Array(items) = reply else {
        return Err(unexpected(&reply));
    };
    let applied_now = match items.first() {
        Some(Value::Integer(1)) if items.len() == keys + 1 => true,
        Some(Value::Integer(0)) if items.len() == keys + 1 => false,
        _ => return Err(unexpected(&items)),
    };
    let outcomes = items
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
                    .map(|total| KeyOutcome::Added { total })
                    .ok_or_else(|| unexpected(&exact)),
                _ => Err(unexpected(&exact)),
            },
            other => Err(unexpected(&other)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((applied_now, outcomes))
}

/// The lane of a key in hash slot `slot` of a batch with `sequence`: the slot on a Cluster,
/// the sequence modulo [`SINGLE_NODE_LANES`] (2,048) on one Redis.
fn lane(clustered: bool, sequence: u64, slot: u16) -> u16 {
    if clustered {
        slot
    } else {
        // Below 2,048: the cast keeps the value.
        (sequence % SINGLE_NODE_LANES) as u16
    }
}

/// `<prefix>:{<tag>}:<writer as 16 hex digits>`, in hash slot `lane`.
fn record_key(prefix: &str, writer: u64, lane: u16) -> String {
    format!(
        "{prefix}:{{{}}}:{writer:016x}",
        lane_tags()[usize::from(lane)]
    )
}

/// For each hash slot, the smallest number whose decimal text hashes to it: the record's hash
/// tag. Computed once (about 200,000 CRC16s of six bytes, a few milliseconds).
fn lane_tags() -> &'static [u32] {
    static TAGS: OnceLock<Box<[u32]>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n = 0u32;
        while missing > 0 {
            let slot = usize::from(fred::util::redis_keyslot(n.to_string().as_bytes()));
            if tags[slot] == u32::MAX {
                tags[slot] = n;
                missing -= 1;
            }
            n += 1;
        }
        tags.into_boxed_slice()
    })
}

/// A 64-bit mix (splitmix64's finaliser): spreads the TTL refreshes over writes.
fn spread(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `duration` in whole seconds, rounded up, between 1 and `MAX_TTL_SECS`.
fn whole_seconds(duration: Duration) -> u64 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    seconds.clamp(1, MAX_TTL_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_texts_are_slices_of_shared_chunks() {
        let mut text = KeyText::default();
        let first = text.share("fair_use:dg_budget:uid-1:20261130");
        let second = text.share("fair_use:dg_budget:uid-2:20261130");
        assert_eq!(&first[..], b"fair_use:dg_budget:uid-1:20261130");
        assert_eq!(&second[..], b"fair_use:dg_budget:uid-2:20261130");
        // One allocation: the second key's text follows the first's.
        assert_eq!(second.as_ptr(), first[first.len()..].as_ptr());
        // A key longer than a chunk gets a chunk of its own; the next key a new one after it.
        let long = "k".repeat(KEY_TEXT_CHUNK + 1);
        let third = text.share(&long);
        assert_eq!(&third[..], long.as_bytes());
        let fourth = text.share("after");
        assert_eq!(&fourth[..], b"after");
        assert_ne!(fourth.as_ptr(), third[third.len()..].as_ptr());
    }

    #[test]
    fn every_lane_has_a_tag_in_its_own_slot() {
        let tags = lane_tags();
        assert_eq!(tags.len(), 16_384);
        for (slot, tag) in tags.iter().enumerate() {
            let key = record_key("shardmeter:dedup", 0xc0ffee, slot as u16);
            assert_eq!(
                usize::from(fred::util::redis_keyslot(key.as_bytes())),
                slot,
                "{key}"
            );
            assert!(*tag < 1_000_000, "tags stay short: {tag}");
        }
        // The format is pinned: readers and operators look for these keys.
        assert_eq!(
            record_key("shardmeter:dedup", 0x00c0_ffee_00c0_ffee, 0),
            format!("shardmeter:dedup:{{{}}}:00c0ffee00c0ffee", tags[0])
        );
        // Checked with an independent CRC16 (XMODEM): "3560" is the first number in slot 0.
        assert_eq!(fred::util::redis_keyslot(b"3560"), 0);
        assert_eq!(tags[0], 3560);
    }

    #[test]
    fn lanes_are_slots_on_a_cluster_and_sequences_on_one_redis() {
        assert_eq!(lane(true, 7, 12_345), 12_345);
        assert_eq!(lane(false, 7, 12_345), 7);
        assert_eq!(lane(false, 2_048 + 7, 12_345), 7);
        assert_eq!(lane(false, u64::MAX, 0), 2_047);
    }

    #[test]
    fn a_batch_closes_its_call_when_no_later_batch_shares_its_lane() {
        let batch = |writer: u64, sequence: u64, keys: usize| Batch {
            id: BatchId { writer, sequence },
            increments: (0..keys)
                .map(|i| Increment {
                    key: format!("k{i}").into(),
                    amount: 1,
                    ttl: Duration::from_secs(60),
                })
                .collect(),
        };
        let batches = [
            batch(7, 1, 2),
            batch(7, 2_049, 2), // lane 1 again
            batch(8, 1, 2),     // lane 1 of another writer
            batch(7, 3, 0),     // no keys: no call
            batch(7, 2, 1),
            batch(7, 4_097, 1), // lane 1 again
            batch(7, 2, 1),     // the same id again: left out
        ];
        let first_of = [0, 1, 2, 3, 4, 5, 4];
        assert_eq!(
            last_of_their_lane(&batches, &first_of),
            vec![false, false, true, false, true, true, false]
        );
    }

    #[test]
    fn ttl_refreshes_reach_every_key_about_once_in_sixteen_writes() {
        // Over 1,600 writes, every slot is picked, and about 100 times.
        for slot in [0u64, 1, 777, 16_383] {
            let picked = (0..1_600u64)
                .filter(|write| spread(slot << 32 ^ write) % TTL_REFRESH_EVERY == 0)
                .count();
            assert!((60..=140).contains(&picked), "slot {slot}: {picked}");
        }
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
        let reply = Value::Array(vec![
            Value::Integer(1),
            Value::Integer(5),
            Value::String("WRONGTYPE nope".into()),
        ]);
        assert_eq!(
            parse_reply(reply, 2),
            Ok((
                true,
                vec![
                    KeyOutcome::Added { total: 5 },
                    KeyOutcome::Rejected {
                        reason: "WRONGTYPE nope".into()
                    },
                ]
            ))
        );
        let before = Value::Array(vec![
            Value::Integer(0),
            Value::Array(vec![Value::String("12".into())]),
            Value::Array(vec![Value::String(i64::MAX.to_string().into())]),
        ]);
        assert_eq!(
            parse_reply(before, 2),
            Ok((
                false,
                vec![
                    KeyOutcome::Added { total: 12 },
                    KeyOutcome::Added { total: i64::MAX },
                ]
            ))
        );
        for bad in [
            Value::Integer(1),
            Value::Array(vec![Value::Integer(1), Value::Integer(5)]),
            Value::Array(vec![
                Value::Integer(2),
                Value::Integer(5),
                Value::Integer(5),
            ]),
            Value::Array(vec![Value::Integer(0)]),
            Value::Array(vec![
                Value::Integer(1),
                Value::Array(vec![Value::String("twelve".into())]),
                Value::Integer(5),
            ]),
        ] {
            assert!(matches!(parse_reply(bad, 2), Err(SinkError::Failed(_))));
        }
    }
}
