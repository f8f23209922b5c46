//! A small realtime speech gateway metered with shardmeter: the shape of the reference
//! deployment (`docs/reference-deployment.md`), runnable.
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
//!   are ignored. Closing the socket, or losing the connection, ends the session: its remainder
//!   is flushed within the engine's session-end delay.
//! - Before upgrading, one `GET` of the user's daily key checks the budget (1,800,000 ms a day):
//!   an exhausted user gets `429`. A Redis error or a slow answer lets the stream through (fail
//!   open: Redis trouble never blocks audio).
//! - `GET /usage/<uid>` returns the user's day as JSON: limit, used, remaining, exhausted and when
//!   the budget resets (the next UTC midnight). It shows what Redis holds: usage of sessions in
//!   progress appears there at the next flush (every `GATEWAY_FLUSH_SECS`, default 60 s) or when
//!   they end. On a Redis error it answers `200` with `used_ms: null` and the error, and
//!   `exhausted: false` (fail open).
//! - Bad input (no uid, a sample rate that is not an integer from 8000 to 192000, another
//!   encoding) gets `400` with a one-line reason.
//!
//! Settings come from the environment: `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! `GATEWAY_ADDR` or the first argument (default `127.0.0.1:0`: a free port, printed),
//! `GATEWAY_FLUSH_SECS` (default 60) and `GATEWAY_KEY_PREFIX` (default `fair_use:dg_budget`).
//! Ctrl-C closes the open streams, flushes everything and prints the engine's report.
//!
//! The server is [`Gateway::start`]; `tests/gateway.rs` includes this file as a module and starts
//! it in-process.

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fred::prelude::*;
use serde_json::json;
use shardmeter::sink::redis::RedisSink;
use shardmeter::{Engine, KeyScheme, Session, ShutdownReport};
use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// The daily audio budget per user, in milliseconds (30 minutes).
pub(crate) const DAILY_LIMIT_MS: u64 = 1_800_000;
/// Sample rates accepted, in Hz.
const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 8_000..=192_000;
/// How long a budget read may take before the gateway stops waiting (and lets audio through).
const BUDGET_READ_TIMEOUT: Duration = Duration::from_millis(250);
/// How long shutdown waits for open streams to close after asking them to.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Where the gateway listens, where it writes, how often it flushes.
#[derive(Debug, Clone)]
pub(crate) struct GatewayConfig {
    /// Redis for the counters and the budget reads.
    pub(crate) redis_url: String,
    /// Address to listen on (port 0: any free port).
    pub(crate) listen: SocketAddr,
    /// Counter keys are `<prefix>:{<uid>}:<YYYYMMDD>`.
    pub(crate) key_prefix: String,
    /// How often open sessions' usage is flushed.
    pub(crate) flush_interval: Duration,
}

impl GatewayConfig {
    /// From `REDIS_URL`, `GATEWAY_ADDR` (or `listen_arg`), `GATEWAY_FLUSH_SECS` and
    /// `GATEWAY_KEY_PREFIX`.
    pub(crate) fn from_env(listen_arg: Option<String>) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let listen = listen_arg
            .or_else(|| var("GATEWAY_ADDR"))
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let flush_secs = match var("GATEWAY_FLUSH_SECS") {
            Some(secs) => secs
                .parse::<f64>()
                .ok()
                .filter(|s| (0.01..=86_400.0).contains(s))
                .ok_or_else(|| {
                    format!("GATEWAY_FLUSH_SECS={secs:?}: want seconds, 0.01 to 86400")
                })?,
            None => 60.0,
        };
        Ok(Self {
            redis_url: var("REDIS_URL").unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            listen: listen
                .parse()
                .map_err(|_| format!("listen address {listen:?} is not host:port"))?,
            key_prefix: var("GATEWAY_KEY_PREFIX").unwrap_or_else(|| "fair_use:dg_budget".into()),
            flush_interval: Duration::from_secs_f64(flush_secs),
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
    /// The gateway's own Redis client: the sink writes through it, budget reads use it.
    redis: Client,
    keys: KeyScheme,
    open_sessions: Arc<AtomicUsize>,
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
        redis.connect();
        match tokio::time::timeout(Duration::from_secs(2), redis.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("warning: Redis not reachable yet ({error}); retrying"),
            Err(_) => eprintln!("warning: Redis not reachable yet; retrying in the background"),
        }

        let keys = KeyScheme::daily_utc(config.key_prefix.clone());
        let engine = Engine::builder()
            .flush_interval(config.flush_interval)
            .keys(keys.clone())
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
            redis: redis.clone(),
            keys,
            open_sessions: Arc::new(AtomicUsize::new(0)),
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

    /// WebSocket streams open right now.
    pub(crate) fn open_sessions(&self) -> usize {
        // Relaxed: a gauge for display and tests; it orders nothing.
        self.state.open_sessions.load(Ordering::Relaxed)
    }

    /// Stops accepting, closes open streams (they get a close frame), waits up to 5 s for them,
    /// then shuts the engine down: every session's usage is flushed, and the report says what
    /// could not be written.
    pub(crate) async fn shutdown(self) -> Result<ShutdownReport, String> {
        let _ = self.closing.send(true);
        for _ in 0..(CLOSE_GRACE.as_millis() / 10) {
            if self.open_sessions() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match tokio::time::timeout(CLOSE_GRACE, self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => eprintln!("warning: server ended with {error}"),
            Ok(Err(error)) => eprintln!("warning: server task failed: {error}"),
            Err(_) => eprintln!("warning: connections still open after {CLOSE_GRACE:?}"),
        }
        let report = self
            .state
            .engine
            .shutdown()
            .await
            .map_err(|e| e.to_string());
        let _ = self.redis.quit().await;
        report
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/listen", get(listen))
        .route("/usage/{uid}", get(usage))
        .with_state(state)
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

async fn listen(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
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
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    if let Budget::Read { used_ms, .. } = read_budget(&state, &uid).await {
        if used_ms >= DAILY_LIMIT_MS {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                format!("daily audio budget of {DAILY_LIMIT_MS} ms is used up for this uid\n"),
            )
                .into_response();
        }
    }
    let session = match state.engine.open_session(&uid) {
        Ok(session) => session,
        Err(error) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response();
        }
    };
    // Relaxed: a gauge.
    state.open_sessions.fetch_add(1, Ordering::Relaxed);
    let open = OpenGuard(state.open_sessions.clone());
    let closing = state.closing.clone();
    upgrade.on_upgrade(move |socket| async move {
        stream(socket, session, AudioClock::new(sample_rate), closing).await;
        drop(open);
    })
}

/// Decrements the open-stream gauge however the stream ends (even if the upgrade fails).
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        // Relaxed: a gauge.
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads audio frames until the client closes, the connection drops or the gateway shuts down.
/// Returning drops `session`: the session ends and its remainder is flushed.
async fn stream(
    mut socket: WebSocket,
    session: Session,
    mut clock: AudioClock,
    mut closing: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            message = socket.recv() => message,
            () = shutting_down(&mut closing) => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: axum::extract::ws::close_code::AWAY,
                        reason: "gateway shutting down".into(),
                    })))
                    .await;
                return;
            }
        };
        match message {
            Some(Ok(Message::Binary(chunk))) => {
                let ms = clock.charge(chunk.len());
                if ms > 0 {
                    session.add(ms);
                }
            }
            Some(Ok(Message::Text(text))) => {
                if is_close_stream(text.as_str()) {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {} // pongs are automatic
            // A close frame, an error (reset, protocol violation) or the end of the stream.
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
        }
    }
}

/// Resolves once the gateway is shutting down (or its state is gone).
async fn shutting_down(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
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

/// What a budget read found.
#[derive(Debug)]
enum Budget {
    /// Redis answered.
    Read { key: String, used_ms: u64 },
    /// Redis did not answer in time, or failed: the caller fails open.
    Unknown { key: String, error: String },
}

async fn read_budget(state: &AppState, uid: &str) -> Budget {
    let key = state.keys.key_at(uid, SystemTime::now());
    let options = Options {
        timeout: Some(BUDGET_READ_TIMEOUT),
        max_attempts: Some(1),
        ..Options::default()
    };
    let reply: Result<Option<u64>, Error> = state.redis.with_options(&options).get(&key).await;
    match reply {
        Ok(used) => Budget::Read {
            key,
            used_ms: used.unwrap_or(0),
        },
        Err(error) => Budget::Unknown {
            key,
            error: error.to_string(),
        },
    }
}

async fn usage(State(state): State<AppState>, Path(uid): Path<String>) -> Response {
    let uid = match valid_uid(Some(&uid)) {
        Ok(uid) => uid.to_owned(),
        Err(reason) => return bad_request(reason),
    };
    let now = SystemTime::now();
    let resets_at = state.keys.bucket_end(now).unwrap_or(now);
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut body = json!({
        "uid": uid,
        "limit_ms": DAILY_LIMIT_MS,
        "resets_at_unix": unix(resets_at),
        "resets_in_seconds": resets_at.duration_since(now).unwrap_or_default().as_secs(),
    });
    match read_budget(&state, &uid).await {
        Budget::Read { key, used_ms } => {
            body["key"] = json!(key);
            body["used_ms"] = json!(used_ms);
            body["remaining_ms"] = json!(DAILY_LIMIT_MS.saturating_sub(used_ms));
            body["exhausted"] = json!(used_ms >= DAILY_LIMIT_MS);
        }
        Budget::Unknown { key, error } => {
            body["key"] = json!(key);
            body["used_ms"] = serde_json::Value::Null;
            body["remaining_ms"] = serde_json::Value::Null;
            body["exhausted"] = json!(false);
            body["error"] = json!(format!("Redis did not answer: {error}"));
        }
    }
    Json(body).into_response()
}

#[allow(dead_code)] // `tests/gateway.rs` includes this file as a module and never calls `main`.
fn main() -> std::process::ExitCode {
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
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down; {} streams open", gateway.open_sessions());
        match gateway.shutdown().await {
            Ok(report) if report.is_complete() => {
                eprintln!(
                    "flushed {} ms in {} key writes",
                    report.amount_written, report.keys_written
                );
                std::process::ExitCode::SUCCESS
            }
            Ok(report) => {
                eprintln!(
                    "{} ms could not be written: {:?}",
                    report.unwritten_amount(),
                    report.unwritten
                );
                std::process::ExitCode::FAILURE
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
