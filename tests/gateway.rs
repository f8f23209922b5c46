//! The gateway example (`examples/gateway.rs`, included as a module) driven by real WebSocket
//! clients against real Redis: the machine's shared Redis on 127.0.0.1:6379 (every key under a
//! unique prefix, deleted afterwards), and a private `redis-server` for the outage test, which
//! kills and restarts it.
//!
//! Clients end their streams every way a gateway sees: a close frame, a `CloseStream` text
//! message, a TCP close without a close frame, a TCP reset, going silent (the idle timeout), a
//! message over the size limit (close code 1009), and the gateway shutting down (close code
//! 1001). The totals in Redis (a GET of each user's literal daily key) and in `/usage/{uid}` must
//! equal the audio sent, `floor(bytes * 1000 / (sample_rate * 2))` ms per stream. Waits are
//! bounded; nothing asserts how long anything took.

#[path = "../examples/gateway.rs"]
mod gateway;
mod support;

use futures_util::{SinkExt, StreamExt};
use gateway::{Gateway, GatewayConfig, StreamLimits, DAILY_LIMIT_MS, DEFAULT_MAX_MESSAGE_BYTES};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use std::time::{Duration, SystemTime};
use support::logs::captured_logs;
use support::wait::eventually;
use support::{Keyspace, RedisServer, RespClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::MaybeTlsStream;

/// Bound on any single network step of a client.
const STEP: Duration = Duration::from_secs(10);

/// A multi-thread runtime whose workers are registered, as a gateway would run.
fn run<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(|| {
            let _ = shardmeter::register_worker_thread();
        })
        .on_thread_stop(shardmeter::unregister_worker_thread)
        .build()
        .expect("runtime")
        .block_on(future)
}

async fn start(redis_url: String, key_prefix: &str) -> Gateway {
    start_with(redis_url, key_prefix, |_| {}).await
}

async fn start_with(
    redis_url: String,
    key_prefix: &str,
    limits: impl FnOnce(&mut StreamLimits),
) -> Gateway {
    start_configured(redis_url, key_prefix, |config| limits(&mut config.limits)).await
}

async fn start_configured(
    redis_url: String,
    key_prefix: &str,
    configure: impl FnOnce(&mut GatewayConfig),
) -> Gateway {
    let mut config = GatewayConfig::from_env(Some("127.0.0.1:0".into())).expect("config");
    config.redis_url = redis_url;
    config.key_prefix = key_prefix.to_owned();
    // Long: usage reaches Redis because sessions end, not because a timer fired.
    config.flush_interval = Duration::from_secs(60);
    config.daily_limit_ms = DAILY_LIMIT_MS;
    // The defaults, whatever the environment says; a test changes what it tests.
    config.limits = StreamLimits {
        idle_timeout: Duration::from_secs(30),
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
    };
    configure(&mut config);
    Gateway::start(config).await.expect("gateway starts")
}

/// How a client ends its stream.
#[derive(Debug, Clone, Copy)]
enum End {
    /// A WebSocket close frame, then waits for the server's.
    CloseFrame,
    /// `{"type":"CloseStream"}`, then waits for the server's close frame.
    CloseStream,
    /// Drops the TCP connection (FIN) without a close frame.
    Drop,
    /// Waits until the server has read everything (a ping answered), then resets the
    /// connection (RST, zero linger): bytes still unread by the server would be discarded.
    Reset,
}

#[derive(Debug, Clone)]
struct Stream {
    uid: String,
    sample_rate: u32,
    frames: Vec<usize>,
    end: End,
}

impl Stream {
    fn expected_ms(&self) -> u64 {
        let bytes: u64 = self.frames.iter().map(|&n| n as u64).sum();
        bytes * 1000 / (u64::from(self.sample_rate) * 2)
    }
}

/// Bounded wait for the next message; `None` when the stream ended.
async fn next_message(
    ws: &mut tokio_tungstenite::WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
) -> Option<Message> {
    match tokio::time::timeout(STEP, ws.next()).await {
        Ok(Some(Ok(message))) => Some(message),
        Ok(Some(Err(_)) | None) => None,
        Err(_) => panic!("no message from the gateway within {STEP:?}"),
    }
}

async fn play(addr: SocketAddr, stream: Stream) {
    let url = format!(
        "ws://{addr}/listen?uid={}&sample_rate={}",
        stream.uid, stream.sample_rate
    );
    let (mut ws, response) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    assert_eq!(response.status(), 101);
    for (i, &size) in stream.frames.iter().enumerate() {
        // Not silence: a recognisable pattern, in case a frame were mangled.
        let chunk: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
        tokio::time::timeout(STEP, ws.send(Message::Binary(chunk.into())))
            .await
            .expect("send in time")
            .expect("send");
    }
    match stream.end {
        End::CloseFrame | End::CloseStream => {
            if let End::CloseFrame = stream.end {
                ws.close(None).await.expect("close");
            } else {
                let close = r#"{"type":"CloseStream"}"#;
                ws.send(Message::Text(close.into())).await.expect("send");
            }
            // Until the server's close frame (or the end): bounded by STEP per message.
            for _ in 0..1000 {
                match next_message(&mut ws).await {
                    Some(Message::Close(_)) | None => break,
                    Some(_) => {}
                }
            }
        }
        End::Drop => drop(ws),
        End::Reset => {
            ws.send(Message::Ping(b"barrier".to_vec().into()))
                .await
                .expect("ping");
            let mut ponged = false;
            for _ in 0..1000 {
                match next_message(&mut ws).await {
                    Some(Message::Pong(payload)) if payload.as_ref() == b"barrier" => {
                        ponged = true;
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            assert!(ponged, "{}: no pong", stream.uid);
            if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
                tcp.set_zero_linger().expect("SO_LINGER 0");
            }
            drop(ws);
        } // The compiler checks that every way of ending is handled above.
    }
}

/// `GET path` over a plain HTTP/1.1 connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(STEP, exchange)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP exchange");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn usage(addr: SocketAddr, uid: &str) -> Value {
    let (status, body) = http_get(addr, &format!("/usage/{uid}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// What a budget reader of the deployment sees: a GET of the user's literal daily key (today's,
/// plus yesterday's in case the test ran across midnight). The keys come from the engine's
/// `KeyScheme::key_at`, the mapping the engine writes with.
async fn stored_ms(redis: SocketAddr, prefix: &str, uid: &str) -> u64 {
    let scheme = shardmeter::KeyScheme::daily_utc(prefix);
    let now = SystemTime::now();
    let keys = [
        scheme.key_at(uid, now - Duration::from_secs(86_400)),
        scheme.key_at(uid, now),
    ];
    tokio::task::spawn_blocking(move || {
        let mut client = RespClient::connect(redis).expect("connect to Redis");
        keys.iter()
            .map(|key| client.get_i64(key).unwrap_or(0) as u64)
            .sum()
    })
    .await
    .expect("read Redis")
}

/// Waits (bounded) until no stream is open.
async fn until_no_open_streams(gateway: &Gateway) {
    until_open_streams(gateway, 0).await;
}

/// Waits (bounded) until `n` streams are open.
async fn until_open_streams(gateway: &Gateway, n: usize) {
    eventually(&format!("{n} open streams"), || gateway.open_streams() == n).await;
}

/// Waits (bounded) until the engine holds `n` slots: a session's slot returns to the free list
/// once the flusher has taken its final amount.
async fn until_slots_in_use(gateway: &Gateway, n: u64) {
    eventually(&format!("{n} slots in use"), || {
        gateway.stats().slots_in_use == n
    })
    .await;
}

/// Waits (bounded) until Redis holds `expected` ms for every uid; then they must match.
async fn until_stored(redis: SocketAddr, prefix: &str, expected: &BTreeMap<String, u64>) {
    let mut last = BTreeMap::new();
    for _ in 0..400 {
        last.clear();
        for uid in expected.keys() {
            last.insert(uid.clone(), stored_ms(redis, prefix, uid).await);
        }
        if &last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&last, expected, "Redis does not hold the audio sent");
}

#[test]
fn streams_are_charged_exactly_however_they_end() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway");
        let gateway = start(support::shared_redis_url(), keyspace.prefix()).await;
        let addr = gateway.addr();
        let uid = |name: &str| format!("{name}-{}", support::unique_suffix());

        let dup = uid("two-streams");
        let streams = vec![
            // 50 frames of exactly 30 ms.
            Stream {
                uid: uid("close"),
                sample_rate: 16_000,
                frames: vec![960; 50],
                end: End::CloseFrame,
            },
            // 1,000 bytes at 16 kHz is 31.25 ms: only the carried remainder gets this exact.
            Stream {
                uid: uid("drop"),
                sample_rate: 16_000,
                frames: vec![1000; 41],
                end: End::Drop,
            },
            Stream {
                uid: uid("reset"),
                sample_rate: 8_000,
                frames: vec![333; 77],
                end: End::Reset,
            },
            Stream {
                uid: uid("cs"),
                sample_rate: 44_100,
                frames: vec![777; 64],
                end: End::CloseStream,
            },
            // One user, two concurrent streams, both charged to the same daily key.
            Stream {
                uid: dup.clone(),
                sample_rate: 48_000,
                frames: vec![1920; 30],
                end: End::CloseFrame,
            },
            Stream {
                uid: dup.clone(),
                sample_rate: 48_000,
                frames: (1..=40).map(|n| n * 37).collect(),
                end: End::Reset,
            },
            Stream {
                uid: uid("tiny"),
                sample_rate: 16_000,
                frames: vec![1; 100],
                end: End::Drop,
            },
        ];
        let mut expected = BTreeMap::<String, u64>::new();
        for stream in &streams {
            *expected.entry(stream.uid.clone()).or_default() += stream.expected_ms();
        }
        assert_eq!(expected[&streams[0].uid], 1500);
        assert_eq!(expected[&streams[1].uid], 1281); // 41 × 31.25 = 1281.25

        let clients: Vec<_> = streams
            .iter()
            .cloned()
            .map(|stream| tokio::spawn(play(addr, stream)))
            .collect();
        for client in clients {
            client.await.expect("client");
        }
        until_no_open_streams(&gateway).await;
        until_stored(redis, keyspace.prefix(), &expected).await;

        // The status endpoint answers from the engine: every write returned the key's total.
        for (uid, &ms) in &expected {
            let body = usage(addr, uid).await;
            assert_eq!(body["tracked"], true, "{body}");
            assert_eq!(body["used_ms"], ms, "{body}");
            assert_eq!(body["global_ms"], ms, "{body}");
            assert_eq!(body["pending_ms"], 0, "{body}");
            assert_eq!(body["remaining_ms"], DAILY_LIMIT_MS - ms, "{body}");
            assert_eq!(body["limit_ms"], DAILY_LIMIT_MS);
            assert_eq!(body["exhausted"], false);
            assert!(body["resets_in_seconds"].as_u64().unwrap() <= 86_400);
            assert!(body["key"].as_str().unwrap().starts_with(keyspace.prefix()));
        }
        // A user without a stream: the engine tracks nothing of them, and says so.
        let nobody = usage(addr, &uid("nobody")).await;
        assert_eq!(nobody["tracked"], false, "{nobody}");
        assert_eq!(nobody["used_ms"], Value::Null);
        assert_eq!(nobody["limit_ms"], DAILY_LIMIT_MS);

        // An exhausted user is refused before the upgrade.
        let spent = uid("spent");
        let key = shardmeter::KeyScheme::daily_utc(keyspace.prefix())
            .key_at(&spent, std::time::SystemTime::now());
        tokio::task::spawn_blocking({
            let key = key.clone();
            move || {
                RespClient::connect(redis)
                    .unwrap()
                    .set(&key, &DAILY_LIMIT_MS.to_string())
            }
        })
        .await
        .unwrap();
        let refused = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/listen?uid={spent}&sample_rate=16000"
        ))
        .await;
        match refused {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
            other => panic!("expected 429, got {other:?}"),
        }
        let body = usage(addr, &spent).await;
        assert_eq!(body["exhausted"], true);
        assert_eq!(body["remaining_ms"], 0);

        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(
            report.amount_written,
            expected.values().map(|&ms| u128::from(ms)).sum::<u128>()
        );
    });
}

/// Reads what the gateway sends on a raw connection until it closes it (bounded), as (opcode,
/// payload) frames; a server's frames are not masked (RFC 6455 §5.1).
async fn frames_until_eof(tcp: &mut tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    let mut bytes = Vec::new();
    tokio::time::timeout(STEP, tcp.read_to_end(&mut bytes))
        .await
        .expect("the gateway closes the connection in time")
        .expect("the connection ends without a reset");
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 2 {
        assert_eq!(rest[1] & 0x80, 0, "a masked frame from the server");
        let (len, header) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => panic!("a frame of 64 KiB or more from the gateway: {rest:?}"),
            n => (usize::from(n), 2),
        };
        frames.push((rest[0] & 0x0f, rest[header..header + len].to_vec()));
        rest = &rest[header + len..];
    }
    assert!(rest.is_empty(), "a frame cut short: {rest:?}");
    frames
}

#[test]
fn a_silent_connection_is_closed_and_frees_its_slot() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-idle");
        let idle = Duration::from_millis(1500);
        let gateway = start_with(support::shared_redis_url(), keyspace.prefix(), |limits| {
            limits.idle_timeout = idle
        })
        .await;
        let addr = gateway.addr();

        // A client that sends no audio but answers pings (tungstenite does, while it reads).
        let listening = format!("listening-{}", support::unique_suffix());
        let url = format!("ws://{addr}/listen?uid={listening}&sample_rate=16000");
        let (mut live, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        // Six pings span two idle timeouts: one goes out every third of it.
        let live = tokio::spawn(async move {
            let mut pings = 0;
            while pings < 6 {
                match next_message(&mut live).await {
                    Some(Message::Ping(_)) => pings += 1,
                    Some(Message::Close(frame)) => {
                        panic!("a client answering pings closed: {frame:?}")
                    }
                    Some(_) => {}
                    None => panic!("a client answering pings lost its connection"),
                }
            }
            live
        });

        // A client that sends 300 ms of audio and then nothing: it neither reads nor answers
        // pings, like one that vanished without a FIN.
        let silent = format!("silent-{}", support::unique_suffix());
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        {
            let url = format!("ws://{addr}/listen?uid={silent}&sample_rate=16000");
            let (mut ws, _) =
                tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, &mut tcp))
                    .await
                    .expect("handshake in time")
                    .expect("upgrade accepted");
            for _ in 0..10 {
                ws.send(Message::Binary(vec![1u8; 960].into()))
                    .await
                    .expect("send");
            }
        } // The WebSocket is dropped without a close frame; the TCP connection stays open.

        // The gateway ends its session (its audio reaches Redis), closes it with code 1008 and
        // frees its slot.
        until_stored(
            redis,
            keyspace.prefix(),
            &BTreeMap::from([(silent.clone(), 300)]),
        )
        .await;
        let frames = frames_until_eof(&mut tcp).await;
        assert!(
            frames.iter().any(|(opcode, _)| *opcode == 0x9),
            "no ping: {frames:?}"
        );
        let (opcode, close) = frames.last().expect("frames");
        assert_eq!(*opcode, 0x8, "the last frame is a close frame: {frames:?}");
        assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1008);
        let reason = String::from_utf8_lossy(&close[2..]);
        assert_eq!(reason, "idle: nothing received for 1.5s");
        until_open_streams(&gateway, 1).await;
        until_slots_in_use(&gateway, 1).await;

        // The client that answered pings stayed open across two idle timeouts.
        let mut live = live.await.expect("listening client");
        assert_eq!(gateway.open_streams(), 1);
        live.close(None).await.expect("close");
        while next_message(&mut live).await.is_some() {}
        until_no_open_streams(&gateway).await;
        until_slots_in_use(&gateway, 0).await;
        assert_eq!(stored_ms(redis, keyspace.prefix(), &listening).await, 0);
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(report.amount_written, 300);
    });
}

/// How the gateway refused a stream: its close frame, and how the connection ended after it
/// (`Ok` when cleanly, an error for a reset).
struct Refusal {
    close: Option<tungstenite::protocol::CloseFrame>,
    end: Result<(), tungstenite::Error>,
}

/// Sends `prelude` (binary frames of these sizes), then `oversized`, while reading what the
/// gateway answers until the connection ends.
async fn refused(
    addr: SocketAddr,
    uid: &str,
    prelude: Vec<usize>,
    oversized: Vec<Message>,
) -> Refusal {
    let url = format!("ws://{addr}/listen?uid={uid}&sample_rate=16000");
    let (ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade accepted");
    let (mut sink, mut stream) = ws.split();
    // Sends on its own: a client writing a big message is blocked until the gateway reads it.
    let sender = tokio::spawn(async move {
        for size in prelude {
            sink.send(Message::Binary(vec![5u8; size].into()))
                .await
                .expect("send");
        }
        for message in oversized {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut close = None;
    let end = loop {
        match tokio::time::timeout(STEP, stream.next())
            .await
            .expect("the gateway answers in time")
        {
            Some(Ok(Message::Close(frame))) => close = frame,
            Some(Ok(_)) => {}
            Some(Err(error)) => break Err(error),
            None => break Ok(()),
        }
    };
    tokio::time::timeout(STEP, sender)
        .await
        .unwrap_or_else(|_| panic!("{uid}: the client's writes never finished"))
        .expect("client writes");
    Refusal { close, end }
}

#[test]
fn an_oversized_message_is_refused_with_1009_and_not_charged() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-size");
        let gateway = start(support::shared_redis_url(), keyspace.prefix()).await;
        let addr = gateway.addr();
        let uid = |name: &str| format!("{name}-{}", support::unique_suffix());
        assert_eq!(DEFAULT_MAX_MESSAGE_BYTES, 131_072);

        // 300 ms, then a message of exactly the limit (at 16 kHz, 131,072 bytes are 4,096 ms),
        // then one frame of 20 MB, more than the 16 MiB that tungstenite refuses by default.
        let one_frame = uid("one-frame");
        let mut prelude = vec![960; 10];
        prelude.push(DEFAULT_MAX_MESSAGE_BYTES);
        let refusal = refused(
            addr,
            &one_frame,
            prelude,
            vec![Message::Binary(vec![9u8; 20_000_000].into())],
        )
        .await;
        let close = refusal.close.expect("a close frame");
        assert_eq!(u16::from(close.code), 1009);
        assert_eq!(
            close.reason.as_str(),
            "message too big: 20000000 bytes, at most 131072 accepted"
        );
        assert!(refusal.end.is_ok(), "not a clean end: {:?}", refusal.end);

        // 150 ms, then a message in three fragments of 64 KiB: each frame is under the limit,
        // the message is not.
        let fragments = uid("fragments");
        let fragment =
            |opcode, last| Message::Frame(Frame::message(vec![9u8; 65_536], opcode, last));
        let refusal = refused(
            addr,
            &fragments,
            vec![960; 5],
            vec![
                fragment(OpCode::Data(Data::Binary), false),
                fragment(OpCode::Data(Data::Continue), false),
                fragment(OpCode::Data(Data::Continue), true),
            ],
        )
        .await;
        let close = refusal.close.expect("a close frame");
        assert_eq!(u16::from(close.code), 1009);
        assert!(
            close.reason.as_str().starts_with("message too big"),
            "{close:?}"
        );
        assert!(refusal.end.is_ok(), "not a clean end: {:?}", refusal.end);

        // What came before the refused message is charged, nothing of it.
        let expected = BTreeMap::from([(one_frame.clone(), 300 + 4096), (fragments.clone(), 150)]);
        until_stored(redis, keyspace.prefix(), &expected).await;
        until_no_open_streams(&gateway).await;
        until_slots_in_use(&gateway, 0).await;
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(report.amount_written, 300 + 4096 + 150);
    });
}

#[test]
fn shutdown_closes_every_stream_and_writes_everything() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-shutdown");
        let gateway = start(support::shared_redis_url(), keyspace.prefix()).await;
        let addr = gateway.addr();
        let uid = |name: &str| format!("{name}-{}", support::unique_suffix());
        let streams = [
            (uid("a"), 16_000u32, vec![640; 25]), // 500 ms
            (uid("b"), 48_000, vec![1000; 77]),   // 802.08 ms
            (uid("c"), 8_000, vec![333; 41]),     // 853.125 ms
            (uid("quiet"), 16_000, Vec::new()),   // connected, nothing sent
        ];
        let expected: BTreeMap<String, u64> = streams
            .iter()
            .map(|(uid, rate, frames)| {
                let bytes: u64 = frames.iter().map(|&n| n as u64).sum();
                (uid.clone(), bytes * 1000 / (u64::from(*rate) * 2))
            })
            .collect();

        // Each client sends its audio, makes sure the gateway has read it (a ping answered),
        // says so, then reads until the gateway closes the stream.
        let (read_tx, mut read_rx) = tokio::sync::mpsc::channel(streams.len());
        let clients: Vec<_> = streams
            .iter()
            .cloned()
            .map(|(uid, rate, frames)| {
                let read_tx = read_tx.clone();
                tokio::spawn(async move {
                    let url = format!("ws://{addr}/listen?uid={uid}&sample_rate={rate}");
                    let (mut ws, _) =
                        tokio::time::timeout(STEP, tokio_tungstenite::connect_async(url))
                            .await
                            .expect("connect in time")
                            .expect("upgrade accepted");
                    for size in frames {
                        ws.send(Message::Binary(vec![3u8; size].into()))
                            .await
                            .expect("send");
                    }
                    ws.send(Message::Ping(b"barrier".to_vec().into()))
                        .await
                        .expect("ping");
                    loop {
                        match next_message(&mut ws).await {
                            Some(Message::Pong(_)) => break,
                            Some(_) => {}
                            None => panic!("{uid}: stream ended before the pong"),
                        }
                    }
                    read_tx.send(()).await.expect("signal");
                    loop {
                        match next_message(&mut ws).await {
                            Some(Message::Close(frame)) => return frame,
                            Some(_) => {}
                            None => return None,
                        }
                    }
                })
            })
            .collect();
        for _ in 0..streams.len() {
            tokio::time::timeout(STEP, read_rx.recv())
                .await
                .expect("every client's audio read in time");
        }
        assert_eq!(gateway.open_streams(), streams.len());

        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(
            report.amount_written,
            expected.values().map(|&ms| u128::from(ms)).sum::<u128>()
        );
        // It stopped accepting connections.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        // Every open stream got a close frame: 1001, going away.
        for client in clients {
            let close = client.await.expect("client").expect("a close frame");
            assert_eq!(u16::from(close.code), 1001);
            assert_eq!(close.reason.as_str(), "gateway shutting down");
        }
        // Everything is in Redis as the deployment's readers see it, once shutdown returned.
        for (uid, &ms) in &expected {
            assert_eq!(stored_ms(redis, keyspace.prefix(), uid).await, ms, "{uid}");
        }
        assert_eq!(expected.values().sum::<u64>(), 500 + 802 + 853);
    });
}

#[test]
fn bad_requests_get_a_400_with_the_reason() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-400");
        let gateway = start(support::shared_redis_url(), keyspace.prefix()).await;
        let addr = gateway.addr();
        for (query, reason) in [
            ("", "missing uid"),
            ("?uid=", "missing uid"),
            ("?sample_rate=16000", "missing uid"),
            ("?uid=a&sample_rate=abc", "bad sample_rate"),
            ("?uid=a&sample_rate=0", "bad sample_rate"),
            ("?uid=a&sample_rate=1000000", "bad sample_rate"),
            ("?uid=a&encoding=opus", "bad encoding"),
            ("?uid=a&channels=2", "bad channels"),
        ] {
            // As a WebSocket upgrade...
            let url = format!("ws://{addr}/listen{query}");
            match tokio_tungstenite::connect_async(url).await {
                Err(tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 400, "{query}");
                    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]))
                        .into_owned();
                    assert!(body.contains(reason), "{query}: {body:?}");
                }
                other => panic!("{query}: expected a 400, got {other:?}"),
            }
            // ...and as a plain GET.
            let (status, body) = http_get(addr, &format!("/listen{query}")).await;
            assert_eq!(status, 400, "{query}");
            assert!(body.contains(reason), "{query}: {body:?}");
        }
        // A valid request that is not an upgrade: 426, Upgrade Required.
        let (status, body) = http_get(addr, "/listen?uid=a&sample_rate=16000").await;
        assert_eq!(status, 426, "{body}");
        assert_eq!(body, "this endpoint takes a WebSocket upgrade\n");
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete());
        assert_eq!(report.amount_written, 0);
    });
}

#[test]
fn a_redis_outage_does_not_block_audio_or_lose_it() {
    run(async {
        let mut server = RedisServer::start();
        let prefix = format!("gw-outage-{}", support::unique_suffix());
        let gateway = start(server.url(), &prefix).await;
        let addr = gateway.addr();
        let uid = format!("u-{}", support::unique_suffix());

        server.kill();
        // Redis is down: the budget check fails open and the stream is accepted and metered.
        let stream = Stream {
            uid: uid.clone(),
            sample_rate: 16_000,
            frames: vec![3200; 20],
            end: End::CloseFrame,
        };
        play(addr, stream.clone()).await;
        until_no_open_streams(&gateway).await;
        // The engine knows this process's part once it has collected the session's end; the
        // global part is unknown (fail open).
        support::until_ok("the ended session's usage", STEP, || async {
            let body = usage(addr, &uid).await;
            (body["pending_ms"] == 2000).then_some(()).ok_or(body)
        })
        .await;
        let body = usage(addr, &uid).await;
        assert_eq!(body["used_ms"], 2000, "{body}");
        assert_eq!(body["pending_ms"], 2000, "{body}");
        assert_eq!(body["global_ms"], Value::Null, "{body}");
        assert_eq!(body["exhausted"], false);

        // Redis is back: the engine's retries write the pending amount, once.
        server.restart();
        until_stored(
            server.addr(),
            &prefix,
            &BTreeMap::from([(uid.clone(), stream.expected_ms())]),
        )
        .await;
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(stored_ms(server.addr(), &prefix, &uid).await, 2000);
    });
}

#[test]
fn why_redis_refuses_the_gateway_is_logged() {
    let logs = captured_logs();
    run(async {
        let server = RedisServer::start_with(&["--requirepass", "secret"]);
        let gateway = start(format!("redis://:wrong@{}", server.addr()), "gw-auth").await;
        // The engine alone would only say that Redis is not connected; the cause is logged.
        for _ in 0..1000 {
            if logs.text().contains("WRONGPASS") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let text = logs.text();
        let line = text
            .lines()
            .find(|line| line.contains("WRONGPASS"))
            .unwrap_or_else(|| panic!("no WRONGPASS logged within 10 s:\n{text}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains("Redis connection error"), "{line}");
        drop(gateway); // Not shut down: its usage (none) could not be written anyway.
    });
}

/// A user who crosses the daily limit while streaming is closed with 1008 at the engine's next
/// flush (no Redis read per chunk), and refused at the next connection; the deployment's own
/// reader (a GET of the literal key) agrees.
#[test]
fn a_stream_that_uses_up_the_budget_is_closed_and_the_next_one_refused() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-budget");
        const LIMIT_MS: u64 = 500;
        let gateway = start_configured(support::shared_redis_url(), keyspace.prefix(), |config| {
            config.daily_limit_ms = LIMIT_MS;
            config.flush_interval = Duration::from_millis(100);
        })
        .await;
        let addr = gateway.addr();
        let user = format!("talker-{}", support::unique_suffix());
        let url = format!("ws://{addr}/listen?uid={user}&sample_rate=16000");
        let (mut ws, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(&url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        // 100 ms of audio every 20 ms until the gateway closes the stream.
        let mut sent_ms = 0;
        let close = loop {
            tokio::select! {
                message = next_message(&mut ws) => match message {
                    Some(Message::Close(frame)) => break frame.expect("a close frame with a code"),
                    Some(_) => {}
                    None => panic!("the connection ended without a close frame"),
                },
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    assert!(sent_ms < 60_000, "never closed after {sent_ms} ms of audio");
                    if ws.send(Message::Binary(vec![0u8; 3200].into())).await.is_ok() {
                        sent_ms += 100;
                    }
                }
            }
        };
        assert_eq!(u16::from(close.code), 1008, "{close:?}");
        assert_eq!(close.reason.as_str(), "daily audio budget used up");
        assert!(sent_ms >= LIMIT_MS, "closed after {sent_ms} ms");
        until_no_open_streams(&gateway).await;

        // The user's next stream: the engine reads the total again and refuses it.
        match tokio_tungstenite::connect_async(&url).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
            other => panic!("expected 429, got {other:?}"),
        }
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        let stored = stored_ms(redis, keyspace.prefix(), &user).await;
        assert!(stored >= LIMIT_MS, "the literal key holds {stored} ms");
        assert_eq!(report.amount_written, u128::from(stored));
    });
}

/// `/metrics` is the engine's counters in Prometheus text format, scraped as Prometheus would.
#[test]
fn metrics_are_exposed_in_prometheus_text_format() {
    run(async {
        let redis = support::shared_redis();
        let keyspace = Keyspace::new(redis, "gateway-metrics");
        let gateway = start(support::shared_redis_url(), keyspace.prefix()).await;
        let addr = gateway.addr();
        let uid = format!("scraped-{}", support::unique_suffix());
        let stream = Stream {
            uid: uid.clone(),
            sample_rate: 16_000,
            frames: vec![3200; 5],
            end: End::CloseFrame,
        };
        play(addr, stream.clone()).await;
        until_stored(
            redis,
            keyspace.prefix(),
            &BTreeMap::from([(uid, stream.expected_ms())]),
        )
        .await;
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no sample of {name} in:\n{body}"))
        };
        // Every gateway of this test binary reports into one recorder: at least this stream's.
        assert!(value("shardmeter_keys_written_total") >= 1.0);
        assert!(value("shardmeter_written_amount_total") >= 500.0);
        assert!(value("shardmeter_flush_rounds_total") >= 1.0);
        assert!(value("shardmeter_write_seconds_count") >= 1.0);
        for name in [
            "# TYPE shardmeter_write_failures_total counter",
            "# TYPE shardmeter_pending_amount gauge",
            "# TYPE shardmeter_flusher_longest_poll_seconds gauge",
            "# TYPE shardmeter_flusher_longest_poll_cpu_seconds gauge",
            "# TYPE shardmeter_flusher_long_polls_total counter",
            "# TYPE shardmeter_flusher_polls_total counter",
            "# TYPE shardmeter_config_errors_total counter",
            "# TYPE shardmeter_duplicate_batches_total counter",
        ] {
            assert!(body.contains(name), "{name} missing in:\n{body}");
        }
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
    });
}
