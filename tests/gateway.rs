//! The gateway example (`examples/gateway.rs`, included as a module) driven by real WebSocket
//! clients against real Redis: the machine's shared Redis on 127.0.0.1:6379 for the main test
//! (every key under a unique prefix, deleted afterwards), and a private `redis-server` for the
//! outage test, which kills and restarts it.
//!
//! Clients end their streams every way a gateway sees: a close frame, a `CloseStream` text
//! message, a TCP close without a close frame, and a TCP reset. The totals in Redis and in
//! `/usage/{uid}` must equal the audio sent, `floor(bytes * 1000 / (sample_rate * 2))` ms per
//! stream. Waits are bounded; nothing asserts how long anything took.

#[path = "../examples/gateway.rs"]
mod gateway;
mod support;

use futures_util::{SinkExt, StreamExt};
use gateway::{Gateway, GatewayConfig, DAILY_LIMIT_MS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use support::wait::eventually;
use support::{Keyspace, RedisServer, RespClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let mut config = GatewayConfig::from_env(Some("127.0.0.1:0".into())).expect("config");
    config.redis_url = redis_url;
    config.key_prefix = key_prefix.to_owned();
    // Long: usage reaches Redis because sessions end, not because a timer fired.
    config.flush_interval = Duration::from_secs(60);
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

/// Sum of every key of `uid` under `prefix` (normally one: today's).
async fn stored_ms(redis: SocketAddr, prefix: &str, uid: &str) -> u64 {
    let pattern = format!("{prefix}:{{{uid}}}:*");
    tokio::task::spawn_blocking(move || {
        let mut client = RespClient::connect(redis).expect("connect to Redis");
        client
            .scan(&pattern)
            .iter()
            .map(|key| client.get_i64(key).unwrap_or(0) as u64)
            .sum()
    })
    .await
    .expect("read Redis")
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
        eventually("every stream closed", || gateway.open_sessions() == 0).await;
        until_stored(redis, keyspace.prefix(), &expected).await;

        // The status endpoint reads the same key.
        for (uid, &ms) in &expected {
            let body = usage(addr, uid).await;
            assert_eq!(body["used_ms"], ms, "{body}");
            assert_eq!(body["remaining_ms"], DAILY_LIMIT_MS - ms, "{body}");
            assert_eq!(body["limit_ms"], DAILY_LIMIT_MS);
            assert_eq!(body["exhausted"], false);
            assert!(body["resets_in_seconds"].as_u64().unwrap() <= 86_400);
            assert!(body["key"].as_str().unwrap().starts_with(keyspace.prefix()));
        }
        // A user who has sent nothing today.
        let nobody = usage(addr, &uid("nobody")).await;
        assert_eq!(nobody["used_ms"], 0);
        assert_eq!(nobody["remaining_ms"], DAILY_LIMIT_MS);

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

        // A stream still open at shutdown gets a close frame and is charged in full.
        let late = Stream {
            uid: uid("late"),
            sample_rate: 16_000,
            frames: vec![640; 25],
            end: End::Drop,
        };
        let url = format!("ws://{addr}/listen?uid={}&sample_rate=16000", late.uid);
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        for &size in &late.frames {
            ws.send(Message::Binary(vec![7u8; size].into()))
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
                None => panic!("stream ended before the pong"),
            }
        }
        let report = gateway.shutdown().await.expect("shutdown");
        assert!(report.is_complete(), "{report:?}");
        let mut close = None;
        for _ in 0..1000 {
            match next_message(&mut ws).await {
                Some(Message::Close(frame)) => {
                    close = frame;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        assert_eq!(
            close.map(|frame| u16::from(frame.code)),
            Some(1001),
            "going away"
        );
        assert_eq!(
            stored_ms(redis, keyspace.prefix(), &late.uid).await,
            late.expected_ms()
        );
        assert_eq!(late.expected_ms(), 500);
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
        // A valid request that is not an upgrade is refused by the upgrade extractor.
        let (status, _) = http_get(addr, "/listen?uid=a&sample_rate=16000").await;
        assert!((400..500).contains(&status), "{status}");
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
        eventually("every stream closed", || gateway.open_sessions() == 0).await;
        let body = usage(addr, &uid).await;
        assert_eq!(body["used_ms"], Value::Null, "{body}");
        assert_eq!(body["exhausted"], false);
        assert!(body["error"].as_str().is_some(), "{body}");

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
