//! A small realtime speech gateway metered with shardmeter: the shape of the reference
//! deployment (`docs/reference-deployment.md`), runnable, and meant to be copied.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example gateway -- 127.0.0.1:8080
//! ```
//!
//! - `GET /listen?uid=<user>&sample_rate=16000` upgrades to a WebSocket. Every binary frame is
//!   a chunk of 16-bit mono PCM; its duration, `bytes * 1000 / (sample_rate * 2)` ms, is charged
//!   to the user with `session.add(ms)`. The sub-millisecond remainder of each chunk is carried
//!   to the next one, so a session is charged `floor(total bytes * 1000 / (sample_rate * 2))`
//!   ms: nothing is lost to per-chunk rounding, and less than 1 ms per session is never charged.
//!   `sample_rate` defaults to 16000; `encoding` (if given) must be `linear16` and `channels`
//!   (if given) 1. A text frame `{"type":"CloseStream"}` ends the stream; other text frames
//!   (e.g. `{"type":"KeepAlive"}`) are ignored. Closing the socket, or losing the connection,
//!   ends the session: its remainder is flushed within the engine's session-end delay.
//! - Idle connections end. The gateway pings every stream every third of `GATEWAY_IDLE_SECS`
//!   (default 30 s); a stream from which nothing arrives for `GATEWAY_IDLE_SECS` (no audio, no
//!   text, not even the pong a WebSocket client sends by itself) is closed with code 1008 and
//!   its session ends, within `4/3 × GATEWAY_IDLE_SECS` of the last thing it sent. A client that
//!   vanished without a FIN no longer holds its slot; a live client with a paused microphone
//!   answers the pings and stays (it costs nothing).
//! - Messages have a size limit: `GATEWAY_MAX_MESSAGE_BYTES`, default 131,072 (128 KiB: 4.1 s of
//!   audio at 16 kHz, 0.34 s at 192 kHz; realtime clients send 20 to 250 ms per message). A
//!   bigger frame, or a fragmented message that grows bigger, is refused before it is read
//!   into memory: the client gets close code 1009 ("message too big") with the limit as the
//!   reason, and nothing of that message is charged (what came before it is). The gateway then
//!   closes its half of the connection and reads and discards what the client still sends (at
//!   most 2 s), so the client reads the close frame rather than a TCP reset.
//! - Budgets are the engine's (`GATEWAY_DAILY_LIMIT_MS`, default 1,800,000 ms a day): no Redis
//!   read per check. Before upgrading, the session is opened and the engine's view of the user is
//!   awaited (for a user it does not track yet, one `GET`, pipelined with other users
//!   connecting at the same moment, at most 250 ms): an exhausted user gets `429`. A Redis error
//!   or a slow answer lets the stream through (fail open: Redis trouble never blocks audio).
//!   While streaming, a user who crosses the limit (through this stream, or through this user's
//!   streams on other gateway processes, seen at the next flush) is closed with code 1008,
//!   "daily audio budget used up".
//! - `GET /usage/<uid>` returns the user's day as JSON, answered by the engine, not by Redis:
//!   limit, used, remaining, exhausted, when the budget resets (the next UTC midnight), and the
//!   two parts of `used`: `global_ms` (all gateway processes, as of `global_age_ms` ago; `null`
//!   while unknown, e.g. Redis down) and `pending_ms` (this process's, not yet written). A user
//!   the engine does not track (no open stream) answers `tracked: false` with `used_ms: null`.
//! - `GET /metrics` exposes the engine's counters and timings (flush rounds, failures, retries,
//!   pending, written, rejected, duplicates caught, sweep and write durations, the flusher's
//!   longest poll) in Prometheus text format, through the `metrics` facade and its Prometheus
//!   exporter.
//! - Bad input (no uid, a sample rate that is not an integer from 8000 to 192000, another
//!   encoding) gets `400` with a one-line reason; a plain GET of `/listen` gets `426`.
//! - Logs go to stderr through `tracing-subscriber`, filtered by `RUST_LOG` (default `info`): the
//!   engine's flush failures (`WARN`), recoveries, increments Redis refused (`ERROR`), why the
//!   Redis connection fails (`WARN` from fred's error channel: refused, `WRONGPASS`, `NOAUTH`...),
//!   and streams closed for idling or for size.
//! - SIGINT (Ctrl-C) or SIGTERM shuts down gracefully: the gateway stops accepting connections,
//!   closes every open stream with code 1001 ("going away") and waits up to 5 s for them, then
//!   `engine.shutdown()` writes every session's usage, and the report (written, unwritten,
//!   rejected) is printed. The exit status is 1 when some usage could not be written.
//!
//! Settings come from the environment: `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! `GATEWAY_ADDR` or the first argument (default `127.0.0.1:0`: a free port, printed),
//! `GATEWAY_FLUSH_SECS` (default 60), `GATEWAY_KEY_PREFIX` (default `fair_use:dg_budget`),
//! `GATEWAY_DAILY_LIMIT_MS` (default 1800000), `GATEWAY_IDLE_SECS` (default 30) and
//! `GATEWAY_MAX_MESSAGE_BYTES` (default 131072).
//!
//! What to adapt: [`admit`] is the one place a stream is let in (budget check, session opened);
//! [`meter`] is the one loop per connection, where every reason to end a session is a `select!`
//! arm; [`usage`] answers the usage endpoint.
//!
//! The server is [`Gateway::start`]; `tests/gateway.rs` includes this file as a module and starts
//! it in-process.

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use shardmeter::sink::redis::RedisSink;
use shardmeter::{Budgets, Engine, KeyScheme, Session, ShutdownReport, StatsSnapshot};
use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The default daily audio budget per user, in milliseconds (30 minutes).
pub(crate) const DAILY_LIMIT_MS: u64 = 1_800_000;
/// Sample rates accepted, in Hz.
const SAMPLE_RATES: RangeInclusive<u32> = 8_000..=192_000;
/// How long admission waits for the engine's view of a new user before letting audio through.
const BUDGET_READ_TIMEOUT: Duration = Duration::from_millis(250);
/// How long shutdown waits for open streams to close after asking them to.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long a stream's closing handshake may take: the client's answer to the gateway's close
/// frame, or the rest of a refused message read and discarded.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one write to a client (a ping) may take before the connection is given up.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The default size limit of one message (one audio chunk), in bytes.
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Size limits `GATEWAY_MAX_MESSAGE_BYTES` may set.
const MAX_MESSAGE_BYTES: RangeInclusive<usize> = 1024..=16 * 1024 * 1024;

/// Where the gateway listens, where it writes, how often it flushes, when it closes streams.
#[derive(Debug, Clone)]
pub(crate) struct GatewayConfig {
    /// Redis for the counters and the budget reads.
    pub(crate) redis_url: String,
    /// Address to listen on (port 0: any free port).
    pub(crate) listen: SocketAddr,
    /// Counter keys are the engine's daily keys under this prefix.
    pub(crate) key_prefix: String,
    /// How often open sessions' usage is flushed.
    pub(crate) flush_interval: Duration,
    /// Audio each user may send per UTC day, in milliseconds.
    pub(crate) daily_limit_ms: u64,
    /// Limits every stream gets.
    pub(crate) limits: StreamLimits,
}

/// What a stream may do before the gateway closes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    /// A stream from which nothing arrives for this long is closed; pings go out every third of
    /// it.
    pub(crate) idle_timeout: Duration,
    /// The largest message accepted, in bytes; a bigger one closes the stream with code 1009.
    pub(crate) max_message_bytes: usize,
}

/// A setting from the environment, if set and not empty.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `name` as seconds within `range`, or `default` when it is not set.
fn env_seconds(name: &str, default: f64, range: RangeInclusive<f64>) -> Result<Duration, String> {
    let Some(text) = env_var(name) else {
        return Ok(Duration::from_secs_f64(default));
    };
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|secs| range.contains(secs))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!(
                "{name}={text:?}: want seconds, {} to {}",
                range.start(),
                range.end()
            )
        })
}

impl GatewayConfig {
    /// From `REDIS_URL`, `GATEWAY_ADDR` (or `listen_arg`), `GATEWAY_FLUSH_SECS`,
    /// `GATEWAY_KEY_PREFIX`, `GATEWAY_IDLE_SECS` and `GATEWAY_MAX_MESSAGE_BYTES`.
    pub(crate) fn from_env(listen_arg: Option<String>) -> Result<Self, String> {
        let listen = listen_arg
            .or_else(|| env_var("GATEWAY_ADDR"))
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let max_message_bytes = match env_var("GATEWAY_MAX_MESSAGE_BYTES") {
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|bytes| MAX_MESSAGE_BYTES.contains(bytes))
                .ok_or_else(|| {
                    format!(
                        "GATEWAY_MAX_MESSAGE_BYTES={text:?}: want bytes, {} to {}",
                        MAX_MESSAGE_BYTES.start(),
                        MAX_MESSAGE_BYTES.end()
                    )
                })?,
            None => DEFAULT_MAX_MESSAGE_BYTES,
        };
        Ok(Self {
            redis_url: env_var("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            listen: listen
                .parse()
                .map_err(|_| format!("listen address {listen:?} is not host:port"))?,
            key_prefix: env_var("GATEWAY_KEY_PREFIX")
                .unwrap_or_else(|| "fair_use:dg_budget".into()),
            flush_interval: env_seconds("GATEWAY_FLUSH_SECS", 60.0, 0.01..=86_400.0)?,
            daily_limit_ms: match env_var("GATEWAY_DAILY_LIMIT_MS") {
                Some(text) => text.trim().parse().map_err(|_| {
                    format!("GATEWAY_DAILY_LIMIT_MS={text:?}: want a whole number of ms")
                })?,
                None => DAILY_LIMIT_MS,
            },
            limits: StreamLimits {
                // At least 0.3 s, so that pings go out at most every 0.1 s.
                idle_timeout: env_seconds("GATEWAY_IDLE_SECS", 30.0, 0.3..=86_400.0)?,
                max_message_bytes,
            },
        })
    }
}

/// A running gateway: the HTTP server task and the metering engine.
#[derive(Debug)]
pub(crate) struct Gateway {
    addr: SocketAddr,
    state: AppState,
    closing: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    redis: Client,
}

#[derive(Debug, Clone)]
struct AppState {
    engine: Engine,
    keys: KeyScheme,
    daily_limit_ms: u64,
    metrics: &'static PrometheusHandle,
    limits: StreamLimits,
    /// Streams admitted and not yet closed (a gauge).
    open_streams: Arc<AtomicUsize>,
    closing: watch::Receiver<bool>,
}

impl Gateway {
    /// Connects to Redis (a Redis that is down is not an error: the client keeps reconnecting,
    /// the engine keeps usage pending, budget checks fail open), builds the engine and starts
    /// serving. Must run inside a tokio runtime, ideally one whose workers are registered with
    /// [`shardmeter::register_worker_thread`].
    pub(crate) async fn start(config: GatewayConfig) -> Result<Self, String> {
        let mut redis_config = Config::from_url(&config.redis_url)
            .map_err(|e| format!("REDIS_URL: {}", e.details()))?;
        redis_config.fail_fast = false;
        let redis = Builder::from_config(redis_config)
            .with_connection_config(|c| c.connection_timeout = Duration::from_secs(2))
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build()
            .map_err(|e| format!("Redis client: {e}"))?;
        // Why a connection fails (refused, `WRONGPASS`, `NOAUTH`, a timeout) reaches only fred's
        // error channel; the engine's flush warnings just say Redis is not there. Log it.
        redis.on_error(|(error, server)| async move {
            match server {
                Some(server) => tracing::warn!(%error, %server, "Redis connection error"),
                None => tracing::warn!(%error, "Redis connection error"),
            }
            Ok(())
        });
        redis.connect();
        match tokio::time::timeout(Duration::from_secs(2), redis.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "Redis not reachable yet; retrying"),
            Err(_) => tracing::warn!("Redis not reachable yet; retrying in the background"),
        }

        let keys = KeyScheme::daily_utc(config.key_prefix.clone());
        let engine = Engine::builder()
            .flush_interval(config.flush_interval)
            .keys(keys.clone())
            .budgets(Budgets::per_bucket(config.daily_limit_ms))
            .sink(RedisSink::new(redis.clone()))
            .build()
            .map_err(|e| format!("engine: {e}"))?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (closing, closing_rx) = watch::channel(false);
        let state = AppState {
            engine,
            keys,
            daily_limit_ms: config.daily_limit_ms,
            metrics: prometheus(),
            limits: config.limits,
            open_streams: Arc::new(AtomicUsize::new(0)),
            closing: closing_rx.clone(),
        };
        let mut stop = closing_rx;
        let server = axum::serve(listener, router(state.clone()))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|closing| *closing).await;
            })
            .into_future();
        Ok(Self {
            addr,
            state,
            closing,
            server: tokio::spawn(server),
            redis,
        })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// WebSocket streams admitted and not yet closed.
    pub(crate) fn open_streams(&self) -> usize {
        // Relaxed: a gauge for display and tests; it orders nothing.
        self.state.open_streams.load(Ordering::Relaxed)
    }

    /// The engine's counters (slots in use, amounts pending, written, refused).
    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.state.engine.stats()
    }

    /// Graceful shutdown: stops accepting, closes open streams (each gets a close frame, code
    /// 1001, and its session ends), waits up to 5 s for them, then shuts the engine down: every
    /// session's usage is flushed, and the report says what could not be written.
    pub(crate) async fn shutdown(self) -> Result<ShutdownReport, String> {
        // The listener stops accepting and every stream's `meter` loop sees it.
        let _ = self.closing.send(true);
        let deadline = Instant::now() + CLOSE_GRACE;
        while self.open_streams() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.open_streams() > 0 {
            tracing::warn!(
                open = self.open_streams(),
                "streams still closing after {CLOSE_GRACE:?}; their sessions are flushed anyway"
            );
        }
        match tokio::time::timeout(CLOSE_GRACE, self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "server ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "server task failed"),
            Err(_) => tracing::warn!("HTTP connections still open after {CLOSE_GRACE:?}"),
        }
        let report = self
            .state
            .engine
            .shutdown()
            .await
            .map_err(|e| e.to_string());
        // Bounded: QUIT waits for a connection that a Redis refusing us never gives.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.redis.quit()).await;
        report
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/listen", get(listen))
        .route("/usage/{uid}", get(usage))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// The process's Prometheus recorder: the engine reports through the `metrics` facade (feature
/// `metrics`), this exporter renders what it reported. Installed once per process.
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows only its own");
        }
        handle
    })
}

/// `GET /metrics`: the engine's counters in Prometheus text format.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// A `400` with a reason.
fn bad_request(reason: String) -> Response {
    (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response()
}

fn valid_uid(uid: Option<&String>) -> Result<&str, String> {
    let uid = uid.map(|u| u.trim()).unwrap_or_default();
    if uid.is_empty() {
        return Err("missing uid: use /listen?uid=<user id>&sample_rate=16000".into());
    }
    if uid.len() > shardmeter::ledger::MAX_ACCOUNT_BYTES || uid.chars().any(char::is_control) {
        return Err(format!(
            "bad uid: at most {} bytes, no control characters",
            shardmeter::ledger::MAX_ACCOUNT_BYTES
        ));
    }
    Ok(uid)
}

fn valid_sample_rate(value: Option<&String>) -> Result<u32, String> {
    let Some(text) = value else {
        return Ok(16_000);
    };
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|rate| SAMPLE_RATES.contains(rate))
        .ok_or_else(|| {
            format!(
                "bad sample_rate {text:?}: want an integer from {} to {} (Hz)",
                SAMPLE_RATES.start(),
                SAMPLE_RATES.end()
            )
        })
}

/// The server side of the WebSocket opening handshake (RFC 6455 §4.2, HTTP/1.1): the `101`
/// answer and the connection it hands over.
///
/// Done here rather than with axum's `WebSocketUpgrade` because axum's `WebSocket` hides the
/// connection: after refusing an oversized message the gateway must go on reading (and
/// discarding) the rest of it, or closing a socket with unread bytes makes the kernel send a TCP
/// reset, which can destroy the close frame before the client reads it.
fn accept_upgrade(request: &mut Request) -> Result<(OnUpgrade, Response), NotUpgradable> {
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(NotUpgradable::NotWebSocket);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|version| version != "13")
    {
        return Err(NotUpgradable::Version);
    }
    let accept = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|key| HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok())
        .ok_or(NotUpgradable::NoKey)?;
    let on_upgrade = request
        .extensions_mut()
        .remove::<OnUpgrade>()
        .ok_or(NotUpgradable::NotHttp1)?;
    let switching = (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
        ],
    )
        .into_response();
    Ok((on_upgrade, switching))
}

/// Why a request to `/listen` cannot become a WebSocket.
#[derive(Debug)]
enum NotUpgradable {
    /// No `Connection: upgrade` and `Upgrade: websocket` (a plain GET, say).
    NotWebSocket,
    /// A `Sec-WebSocket-Version` other than 13.
    Version,
    /// No `Sec-WebSocket-Key`.
    NoKey,
    /// The connection cannot be taken over (not HTTP/1.1).
    NotHttp1,
}

impl IntoResponse for NotUpgradable {
    fn into_response(self) -> Response {
        match self {
            Self::NotWebSocket => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket")],
                "this endpoint takes a WebSocket upgrade\n",
            )
                .into_response(),
            Self::Version => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::SEC_WEBSOCKET_VERSION, "13")],
                "only WebSocket version 13 is spoken here\n",
            )
                .into_response(),
            Self::NoKey => bad_request("missing Sec-WebSocket-Key".into()),
            Self::NotHttp1 => {
                bad_request("this connection cannot be upgraded: use HTTP/1.1".into())
            }
        }
    }
}

async fn listen(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    mut request: Request,
) -> Response {
    let uid = match valid_uid(params.get("uid")) {
        Ok(uid) => uid.to_owned(),
        Err(reason) => return bad_request(reason),
    };
    let sample_rate = match valid_sample_rate(params.get("sample_rate")) {
        Ok(rate) => rate,
        Err(reason) => return bad_request(reason),
    };
    if let Some(encoding) = params.get("encoding").filter(|e| *e != "linear16") {
        return bad_request(format!(
            "bad encoding {encoding:?}: only linear16 (16-bit PCM) is accepted"
        ));
    }
    if let Some(channels) = params.get("channels").filter(|c| c.trim() != "1") {
        return bad_request(format!(
            "bad channels {channels:?}: only mono (1) is accepted"
        ));
    }
    let (on_upgrade, switching) = match accept_upgrade(&mut request) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return refusal.into_response(),
    };
    let session = match admit(&state, &uid).await {
        Ok(session) => session,
        Err(refusal) => return refusal,
    };
    // Relaxed: a gauge.
    state.open_streams.fetch_add(1, Ordering::Relaxed);
    let open = OpenGuard(state.open_streams.clone());
    let clock = AudioClock::new(sample_rate);
    tokio::spawn(stream(on_upgrade, session, clock, state, uid, open));
    switching
}

/// One stream's life after the `101`: takes the connection over, meters it until something
/// ends it, ends the session, then closes the connection.
async fn stream(
    on_upgrade: OnUpgrade,
    session: Session,
    clock: AudioClock,
    state: AppState,
    uid: String,
    _open: OpenGuard,
) {
    let connection = match on_upgrade.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        // The client went away before the upgrade: the session ends with nothing charged.
        Err(error) => return tracing::debug!(%error, uid, "upgrade failed"),
    };
    let limits = state.limits;
    // Both limits: one frame, and a message assembled from fragments.
    let config = WebSocketConfig::default()
        .max_frame_size(Some(limits.max_message_bytes))
        .max_message_size(Some(limits.max_message_bytes));
    let mut socket = WebSocketStream::from_raw_socket(connection, Role::Server, Some(config)).await;
    let ending = meter(&mut socket, &session, clock, limits, state.closing).await;
    // The session ends before the closing handshake: nothing after this is charged, and its
    // remainder is flushed within the engine's session-end delay.
    drop(session);
    match ending {
        Ending::Idle => tracing::info!(uid, "stream idle for {:?}; closed", limits.idle_timeout),
        Ending::TooBig { size } => tracing::info!(
            uid,
            size,
            limit = limits.max_message_bytes,
            "message too big; stream closed"
        ),
        _ => tracing::debug!(uid, ?ending, "stream ended"),
    }
    close(socket, ending, limits).await;
}

/// Admission, the one place a stream is let in: refuses a user whose budget is used up (`429`),
/// a full slot table and a gateway shutting down (`503`), and opens the session every chunk is
/// charged to. The budget check is the engine's: for a user it does not track yet, it reads the
/// user's total once (at most [`BUDGET_READ_TIMEOUT`]); a total that cannot be read lets the
/// stream through (fail open).
async fn admit(state: &AppState, uid: &str) -> Result<Session, Response> {
    if *state.closing.borrow() {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response());
    }
    let session = state
        .engine
        .open_session(uid)
        .map_err(|error| (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response())?;
    session.synced(BUDGET_READ_TIMEOUT).await;
    if session.is_exhausted() {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "daily audio budget of {} ms is used up for this uid\n",
                state.daily_limit_ms
            ),
        )
            .into_response());
    }
    Ok(session)
}

/// Decrements the open-stream gauge however the stream ends (even if the upgrade fails).
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        // Relaxed: a gauge.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream's connection once upgraded.
type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Why a stream ended.
#[derive(Debug)]
enum Ending {
    /// The client sent a close frame.
    ClientClosed,
    /// The connection ended or broke: a FIN without a close frame, a reset, a protocol
    /// violation, a write that failed or did not finish in time.
    Gone,
    /// The client sent `{"type":"CloseStream"}`.
    CloseStream,
    /// Nothing arrived for the idle timeout.
    Idle,
    /// A message of `size` bytes (or more) went over the size limit.
    TooBig { size: usize },
    /// The gateway is shutting down.
    ShuttingDown,
    /// The user's budget for the day is used up.
    BudgetUsedUp,
}

/// The one loop per connection: charges every audio chunk to `session` until something ends
/// the stream, and says what did. Every reason to end a session is an arm of its `select!`.
async fn meter(
    socket: &mut Socket,
    session: &Session,
    mut clock: AudioClock,
    limits: StreamLimits,
    mut closing: watch::Receiver<bool>,
) -> Ending {
    let ping_every = limits.idle_timeout / 3;
    let mut pings = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let budget_used_up = session.exhausted();
    tokio::pin!(budget_used_up);
    loop {
        tokio::select! {
            message = socket.next() => {
                heard = Instant::now();
                match message {
                    Some(Ok(Message::Binary(chunk))) => {
                        let ms = clock.charge(chunk.len());
                        if ms > 0 {
                            session.add(ms);
                        }
                    }
                    Some(Ok(Message::Text(text))) => {
                        if is_close_stream(text.as_str()) {
                            return Ending::CloseStream;
                        }
                    }
                    // tungstenite answers pings itself; a pong only proves the client is there.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(_))) => return Ending::ClientClosed,
                    // Refused on its header (a frame) or when it grew too big (fragments), before
                    // anything of it was charged.
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                        return Ending::TooBig { size };
                    }
                    Some(Err(_)) | None => return Ending::Gone,
                }
            }
            _ = pings.tick() => {
                if heard.elapsed() >= limits.idle_timeout {
                    return Ending::Idle;
                }
                let ping = socket.send(Message::Ping(Default::default()));
                if !matches!(tokio::time::timeout(SEND_TIMEOUT, ping).await, Ok(Ok(()))) {
                    return Ending::Gone;
                }
            }
            () = shutting_down(&mut closing) => return Ending::ShuttingDown,
            // The engine says so after a flush: no Redis read per chunk.
            () = &mut budget_used_up => return Ending::BudgetUsedUp,
        }
    }
}

/// Resolves once the gateway is shutting down (or its state is gone).
async fn shutting_down(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}

/// Closes the connection of a stream that has ended: the close frame that says why, then the
/// closing handshake, bounded by [`CLOSE_TIMEOUT`].
async fn close(mut socket: Socket, ending: Ending, limits: StreamLimits) {
    let (code, reason) = match ending {
        Ending::Gone => return,
        Ending::ClientClosed => {
            // tungstenite has queued the answering close frame: reading sends it, then sees the
            // end of the connection.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while socket.next().await.is_some() {}
            })
            .await;
            return;
        }
        Ending::CloseStream => (CloseCode::Normal, "stream closed".to_owned()),
        Ending::Idle => (
            CloseCode::Policy,
            format!("idle: nothing received for {:?}", limits.idle_timeout),
        ),
        Ending::TooBig { size } => (
            CloseCode::Size,
            format!(
                "message too big: {size} bytes, at most {} accepted",
                limits.max_message_bytes
            ),
        ),
        Ending::ShuttingDown => (CloseCode::Away, "gateway shutting down".to_owned()),
        Ending::BudgetUsedUp => (CloseCode::Policy, "daily audio budget used up".to_owned()),
    };
    let refused = code == CloseCode::Size;
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        if refused {
            // The refused message's bytes are still arriving and the WebSocket reader cannot
            // skip them. Close our half (the client reads the close frame, then the end of the
            // stream) and read the connection dry until the client closes its half.
            let connection = socket.get_mut();
            if connection.shutdown().await.is_err() {
                return;
            }
            let mut scratch = vec![0u8; 16 * 1024];
            while matches!(connection.read(&mut scratch).await, Ok(n) if n > 0) {}
        } else {
            // The client answers the close frame, then the connection ends.
            while socket.next().await.is_some() {}
        }
    })
    .await;
}

fn is_close_stream(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|value| value.get("type").and_then(|t| t.as_str()) == Some("CloseStream"))
}

/// Turns byte counts of 16-bit mono PCM into milliseconds, carrying the remainder.
///
/// A chunk of `bytes` lasts `bytes * 1000 / (sample_rate * 2)` ms. Rounding each chunk down
/// would lose up to a millisecond per chunk (at 16 kHz a 1,000-byte chunk is 31.25 ms); the clock
/// keeps the remainder, in units of 1/1000 byte, and adds it to the next chunk. After any
/// sequence of chunks the total charged is exactly `floor(total bytes * 1000 / bytes per
/// second)`.
#[derive(Debug, Clone)]
pub(crate) struct AudioClock {
    bytes_per_second: u64,
    /// Always below `bytes_per_second`.
    carry: u64,
}

impl AudioClock {
    /// For 16-bit mono PCM at `sample_rate` Hz.
    pub(crate) fn new(sample_rate: u32) -> Self {
        Self {
            bytes_per_second: u64::from(sample_rate.max(1)) * 2,
            carry: 0,
        }
    }

    /// Milliseconds to charge for a chunk of `bytes`.
    pub(crate) fn charge(&mut self, bytes: usize) -> u64 {
        let scaled = self.carry + bytes as u64 * 1000;
        self.carry = scaled % self.bytes_per_second;
        scaled / self.bytes_per_second
    }
}

/// The user's day, as the engine knows it: no Redis read.
async fn usage(State(state): State<AppState>, Path(uid): Path<String>) -> Response {
    let uid = match valid_uid(Some(&uid)) {
        Ok(uid) => uid.to_owned(),
        Err(reason) => return bad_request(reason),
    };
    let now = SystemTime::now();
    let resets_at = state.keys.bucket_end(now).unwrap_or(now);
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let limit = state.daily_limit_ms;
    let mut body = json!({
        "uid": uid,
        "key": state.keys.key_at(&uid, now),
        "limit_ms": limit,
        "resets_at_unix": unix(resets_at),
        "resets_in_seconds": resets_at.duration_since(now).unwrap_or_default().as_secs(),
    });
    match state.engine.usage(&uid) {
        Some(usage) => {
            body["tracked"] = json!(true);
            body["used_ms"] = json!(usage.used);
            body["remaining_ms"] = json!(limit.saturating_sub(usage.used));
            body["exhausted"] = json!(state.engine.is_exhausted(&uid));
            body["global_ms"] = json!(usage.global);
            body["global_age_ms"] =
                json!(usage
                    .global_as_of
                    .map(|at| now.duration_since(at).unwrap_or_default().as_millis() as u64));
            body["pending_ms"] = json!(usage.local_pending);
        }
        None => {
            body["tracked"] = json!(false);
            body["used_ms"] = serde_json::Value::Null;
            body["remaining_ms"] = serde_json::Value::Null;
            body["exhausted"] = json!(false);
        }
    }
    Json(body).into_response()
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`). fred logs through the `log` crate;
/// the subscriber takes those records too.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = match EnvFilter::try_from_default_env() {
        Ok(filter) => filter,
        Err(error) => {
            if env_var("RUST_LOG").is_some() {
                eprintln!("warning: RUST_LOG not understood ({error}); logging at info");
            }
            EnvFilter::new("info")
        }
    };
    if let Err(error) = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init()
    {
        eprintln!("warning: no log subscriber: {error}");
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM, with the signal's name.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                () = ctrl_c => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            },
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; Ctrl-C only");
                ctrl_c.await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        ctrl_c.await;
        "Ctrl-C"
    }
}

/// Prints what shutdown wrote, could not write, and what Redis refused.
fn print_report(report: &ShutdownReport) {
    let rejected: u128 = report.rejected.iter().map(|r| u128::from(r.amount)).sum();
    println!(
        "shutdown: written {} ms to {} keys; unwritten {} ms in {} keys; rejected {} ms in {} keys",
        report.amount_written,
        report.keys_written,
        report.unwritten_amount(),
        report.unwritten.len(),
        rejected,
        report.rejected.len()
    );
    for (key, amount) in &report.unwritten {
        println!("  unwritten {key}: {amount} ms");
    }
    for rejection in &report.rejected {
        println!(
            "  rejected {}: {} ms ({})",
            rejection.key, rejection.amount, rejection.reason
        );
    }
}

#[allow(dead_code)] // `tests/gateway.rs` includes this file as a module and never calls `main`.
fn main() -> std::process::ExitCode {
    init_logging();
    let config = match GatewayConfig::from_env(std::env::args().nth(1)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Each worker gets a private shard: `session.add` is then a plain load and store.
        .on_thread_start(|| {
            let _ = shardmeter::register_worker_thread();
        })
        .on_thread_stop(shardmeter::unregister_worker_thread)
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let gateway = match Gateway::start(config).await {
            Ok(gateway) => gateway,
            Err(error) => {
                eprintln!("error: {error}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!("listening on http://{}", gateway.addr());
        println!(
            "  ws://{}/listen?uid=<user>&sample_rate=16000",
            gateway.addr()
        );
        println!("  http://{}/usage/<user>", gateway.addr());
        let signal = shutdown_signal().await;
        tracing::info!(
            signal,
            open_streams = gateway.open_streams(),
            slots_in_use = gateway.stats().slots_in_use,
            "shutting down"
        );
        match gateway.shutdown().await {
            Ok(report) => {
                print_report(&report);
                if report.is_complete() {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(error) => {
                eprintln!("error: {error}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_carries_sub_millisecond_remainders() {
        let mut clock = AudioClock::new(16_000);
        assert_eq!(clock.charge(960), 30); // 30 ms exactly
        assert_eq!(clock.charge(1000), 31); // 31.25 ms: 0.25 carried
        assert_eq!(clock.charge(1000), 31); // 31.5
        assert_eq!(clock.charge(1000), 31); // 31.75
        assert_eq!(clock.charge(1000), 32); // 32.00: the quarters add up
        let mut clock = AudioClock::new(44_100);
        let charged: u64 = (0..1000).map(|_| clock.charge(333)).sum();
        assert_eq!(charged, 333_000 * 1000 / 88_200);
    }

    #[test]
    fn input_is_checked() {
        assert!(valid_uid(None).is_err());
        assert!(valid_uid(Some(&" ".into())).is_err());
        assert!(valid_uid(Some(&"a\nb".into())).is_err());
        assert_eq!(valid_uid(Some(&"uid-42".into())), Ok("uid-42"));
        assert_eq!(valid_sample_rate(None), Ok(16_000));
        assert_eq!(valid_sample_rate(Some(&"48000".into())), Ok(48_000));
        for bad in ["0", "abc", "-16000", "16000.5", "999999"] {
            assert!(valid_sample_rate(Some(&bad.into())).is_err(), "{bad}");
        }
        assert!(is_close_stream(r#"{"type":"CloseStream"}"#));
        assert!(!is_close_stream(r#"{"type":"KeepAlive"}"#));
    }
}
