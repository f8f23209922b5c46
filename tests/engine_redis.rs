//! The engine end to end against a real Redis: exact totals and TTLs after concurrent use,
//! prompt session-end flushes, a disabled engine costing no command, a Redis that stops and
//! comes back, the command count of a realistic gateway profile against the per-chunk
//! baseline — counted by Redis itself (`INFO commandstats`) — and the errors a user acts on:
//! a Redis nowhere, refused keys in `flush_now`'s report, a permission revoked mid-run.

mod support;

use shardmeter::sink::SinkError;
use shardmeter::{Engine, EngineError, KeyScheme, RedisSink};
use std::collections::HashMap;
use std::time::Duration;
use support::load::add_random;
use support::rng::Rng;
use support::wait::eventually;
use support::{shared_redis, shared_redis_url, Keyspace, RedisServer, RespClient};

fn key(keyspace: &Keyspace, account: &str) -> String {
    format!("{}:{account}", keyspace.prefix())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_flush_exact_totals_with_ttls() {
    let keyspace = Keyspace::new(shared_redis(), "engine-exact");
    let engine = Engine::builder()
        .flush_interval(Duration::from_millis(50))
        .session_end_delay(Duration::from_millis(10))
        .batch_size(16)
        .keys(KeyScheme::new(keyspace.prefix()))
        .sink(RedisSink::connect(&shared_redis_url()).await.unwrap())
        .build()
        .unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let workers: Vec<_> = (0..4u64)
        .map(|thread| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                if thread < 2 {
                    shardmeter::register_worker_thread().unwrap();
                }
                let mut expected: HashMap<String, u64> = HashMap::new();
                let mut rng = Rng::new(thread);
                let mut round = 0u64;
                while std::time::Instant::now() < deadline {
                    round += 1;
                    let account = format!("acct-{}", (thread * 31 + round) % 40);
                    // Sessions open faster than the flusher frees ended ones (it runs on the
                    // same two cores as these four threads): when every slot is taken, wait for
                    // it, as a gateway would refuse and retry.
                    let session = loop {
                        match engine.open_session(&account) {
                            Ok(session) => break session,
                            Err(shardmeter::EngineError::Ledger(
                                shardmeter::LedgerError::Full { .. },
                            )) => std::thread::sleep(Duration::from_millis(1)),
                            Err(error) => panic!("open_session: {error}"),
                        }
                    };
                    let channels = [session.clone(), session.clone(), session];
                    let sum = add_random(&mut rng, &channels, 200, 0..25);
                    *expected.entry(account).or_default() += sum;
                }
                expected
            })
        })
        .collect();
    let mut expected: HashMap<String, u64> = HashMap::new();
    for worker in workers {
        for (account, amount) in worker.join().unwrap() {
            *expected.entry(account).or_default() += amount;
        }
    }
    let report = engine.shutdown().await.unwrap();
    assert!(report.is_complete(), "{report:?}");

    let mut redis = RespClient::connect(shared_redis()).unwrap();
    let mut stored_keys = keyspace.keys();
    stored_keys.sort();
    let mut expected_keys: Vec<_> = expected
        .iter()
        .filter(|(_, &a)| a > 0)
        .map(|(acct, _)| key(&keyspace, acct))
        .collect();
    expected_keys.sort();
    assert_eq!(
        stored_keys, expected_keys,
        "only the expected keys, no marker under our prefix"
    );
    for (account, amount) in &expected {
        let key = key(&keyspace, account);
        assert_eq!(redis.get_i64(&key).unwrap_or(0), *amount as i64, "{key}");
        if *amount > 0 {
            let ttl = redis.ttl(&key);
            assert!(ttl > 29 * 86_400, "{key} has TTL {ttl}");
        }
    }
    let stats = engine.stats();
    assert_eq!(u128::from(stats.amount_written), report.amount_written);
    assert_eq!(stats.amount_written, expected.values().sum::<u64>());
    assert_eq!(
        (stats.write_failures, stats.keys_rejected),
        (0, 0),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_different_tasks_and_a_prompt_session_end_flush() {
    let keyspace = Keyspace::new(shared_redis(), "engine-channels");
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .session_end_delay(Duration::from_millis(20))
        .keys(KeyScheme::daily_utc(keyspace.prefix()))
        .sink(RedisSink::connect(&shared_redis_url()).await.unwrap())
        .build()
        .unwrap();
    let session = engine.open_session("uid 42\n{x}").unwrap();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let channel = session.clone();
            tokio::spawn(async move {
                for _ in 0..100 {
                    channel.add(20);
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    drop(session);
    for task in tasks {
        task.await.unwrap();
    }
    // The hour-long interval cannot have fired: only the session end can have written this.
    let day_key =
        KeyScheme::daily_utc(keyspace.prefix()).key_at("uid 42\n{x}", std::time::SystemTime::now());
    assert!(
        day_key.contains(":uid 42\n{x}:"),
        "the id as it is: {day_key:?}"
    );
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    eventually("the ended session's total", || {
        redis.get_i64(&day_key) == Some(6000)
    })
    .await;
    let ttl = redis.ttl(&day_key);
    assert!(
        (3600..=90_000).contains(&ttl),
        "TTL to the next UTC midnight + 1 h, got {ttl}"
    );
    assert_eq!(engine.stats().sweeps, 0, "no full sweep ran");
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_engine_and_zero_amounts_cost_no_redis_command() {
    let redis = RedisServer::start();
    let sink = RedisSink::connect(&redis.url()).await.unwrap();
    let before = redis.commandstats();
    let engine = Engine::builder()
        .flush_interval(Duration::from_millis(20))
        .enabled(false)
        .sink(sink)
        .build()
        .unwrap();
    let session = engine.open_session("u").unwrap();
    for _ in 0..100 {
        session.add(20);
    }
    let zero = engine.open_session("zero").unwrap();
    zero.add(0);
    drop(zero);
    tokio::time::sleep(Duration::from_millis(100)).await;
    engine.flush_now().await.unwrap();

    // Switching on: what was added while off is discarded; zero amounts still write nothing.
    engine.set_enabled(true).await.unwrap();
    engine.open_session("zero-too").unwrap().add(0);
    engine.flush_now().await.unwrap();
    let after = redis.commandstats();
    for command in ["evalsha", "eval", "script|load", "incrby", "expire", "set"] {
        assert_eq!(
            after.received(command),
            before.received(command),
            "{command} was sent"
        );
    }

    session.add(7);
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
    assert_eq!(redis.client().get_i64("shardmeter:usage:u"), Some(7));
    assert_eq!(engine.stats().amount_discarded, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_stops_and_starts_again_gets_exact_totals() {
    let mut redis = RedisServer::start();
    let engine = Engine::builder()
        .flush_interval(Duration::from_millis(30))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .write_timeout(Duration::from_millis(500))
        .sink(
            RedisSink::builder()
                .command_timeout(Duration::from_millis(300))
                .connect(&redis.url())
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    let sessions: Vec<_> = (0..20)
        .map(|i| engine.open_session(&format!("s{i}")).unwrap())
        .collect();
    let add_for = |sessions: &[shardmeter::Session], rounds: u64| {
        for _ in 0..rounds {
            for session in sessions {
                session.add(20);
            }
        }
    };
    add_for(&sessions, 10);
    engine.flush_now().await.unwrap();

    redis.kill();
    for _ in 0..10 {
        add_for(&sessions, 10);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("a failed flush while Redis is down", || {
        engine.stats().write_failures > 0
    })
    .await;
    // 20 keys in the failing write (fewer if its sweep caught an `add_for` midway), 20 waiting
    // again: per key and stage, not per flush (some 7 sweeps ran while Redis was away).
    let pending_keys = engine.stats().pending_keys;
    assert!(
        (20..=40).contains(&pending_keys),
        "pending is per key while Redis is away: {pending_keys}"
    );

    redis.restart();
    add_for(&sessions, 10);
    support::until_ok("a flush after the restart", Duration::from_secs(15), || {
        engine.flush_now()
    })
    .await;
    drop(sessions);
    assert!(engine.shutdown().await.unwrap().is_complete());
    // Without persistence the restart lost the first 10 rounds: Redis' contract, not ours.
    let mut client = redis.client();
    for i in 0..20 {
        assert_eq!(
            client.get_i64(&format!("shardmeter:usage:s{i}")),
            Some(110 * 20),
            "s{i}"
        );
    }
}

/// 100 sessions × 50 chunks/s × 20 ms for a little over two flush intervals, counted by Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_profile_sends_a_fraction_of_the_per_chunk_commands() {
    const SESSIONS: usize = 100;
    const CHUNKS_PER_SESSION: u64 = 125; // 2.5 s of audio at 50 chunks/s
    let redis = RedisServer::start();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(1))
        .session_end_delay(Duration::from_millis(50))
        .sink(RedisSink::connect(&redis.url()).await.unwrap())
        .build()
        .unwrap();
    let before = redis.commandstats();
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let session = engine.open_session(&format!("user-{i}")).unwrap();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_millis(20));
                for _ in 0..CHUNKS_PER_SESSION {
                    ticker.tick().await;
                    session.add(20);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(engine.shutdown().await.unwrap().is_complete());
    let after = redis.commandstats();
    let sent = |command: &str| after.received(command) - before.received(command);

    let chunks = SESSIONS as u64 * CHUNKS_PER_SESSION;
    let per_chunk_baseline = 2 * chunks; // INCRBY + EXPIRE per chunk
    let stats = engine.stats();
    // Every flush round writes each account at most once: 2 commands per account per flush.
    assert!(
        sent("incrby") <= SESSIONS as u64 * stats.flushes,
        "{} incrby",
        sent("incrby")
    );
    // EXPIRE runs when INCRBY creates a key, plus a periodic refresh (RedisSink docs).
    assert!(sent("expire") >= SESSIONS as u64 && sent("expire") <= sent("incrby"));
    // The first EVALSHA is refused with NOSCRIPT (the script loads lazily), then runs.
    let succeeded = |stats: &support::CommandStats| {
        let evalsha = stats.get("evalsha");
        evalsha.calls - evalsha.failed_calls
    };
    let ran = succeeded(&after) - succeeded(&before);
    assert_eq!(
        ran, stats.batches_written,
        "one EVALSHA run per batch, no retries here"
    );
    let total = ["evalsha", "script|load", "incrby", "expire", "set", "get"]
        .iter()
        .map(|c| sent(c))
        .sum::<u64>();
    let reduction = per_chunk_baseline as f64 / total as f64;
    eprintln!("{chunks} chunks: {total} commands (incl. script-internal and read-side GETs) vs {per_chunk_baseline} per-chunk: {reduction:.1}x fewer");
    // Two 1-second flushes and the session-end flush over 2.5 s: ~4 writes per account at most,
    // so ~2 commands per account-second against the baseline's 100.
    assert!(
        reduction >= 20.0,
        "{total} commands vs {per_chunk_baseline} per-chunk: {reduction:.1}x"
    );
    let mut client = redis.client();
    for i in 0..SESSIONS {
        let total = client.get_i64(&format!("shardmeter:usage:user-{i}"));
        assert_eq!(total, Some(CHUNKS_PER_SESSION as i64 * 20), "user-{i}");
        assert!(
            client.ttl(&format!("shardmeter:usage:user-{i}")) > 0,
            "user-{i}"
        );
    }
}

/// The deployment's keys, literally, and nothing else under their prefix: a `SCAN` of the
/// counters' prefix (what an operator or a reader's clean-up job runs) finds counters only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_counters_prefix_holds_the_deployments_keys_and_nothing_else() {
    let keyspace = Keyspace::new(shared_redis(), "engine-drop-in");
    let engine = Engine::builder()
        .keys(KeyScheme::daily_utc(keyspace.prefix()))
        .sink(RedisSink::connect(&shared_redis_url()).await.unwrap())
        .build()
        .unwrap();
    let accounts = ["uid-42", "team:ops", "a{b}c", "José"];
    for account in accounts {
        engine.record(account, 20).unwrap();
    }
    assert!(engine.shutdown().await.unwrap().is_complete());
    let day = std::process::Command::new("date")
        .args(["-u", "+%Y%m%d"])
        .output()
        .unwrap();
    let day = String::from_utf8(day.stdout).unwrap();
    let mut expected: Vec<String> = accounts
        .iter()
        .map(|account| format!("{}:{account}:{}", keyspace.prefix(), day.trim()))
        .collect();
    expected.sort();
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    let mut found = redis.scan(&format!("{}:*", keyspace.prefix()));
    found.sort();
    assert_eq!(found, expected);
    for key in &expected {
        assert_eq!(redis.get_i64(key), Some(20), "{key}");
        let ttl = redis.ttl(key);
        assert!((3600..=86_400 + 3600).contains(&ttl), "{key}: TTL {ttl}");
    }
}

/// Nothing listens where the sink connects: the engine starts (fail-open), and `flush_now`'s
/// error names the address and the cause, with the amount kept pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_now_to_nowhere_names_the_address_and_the_cause() {
    let port = support::free_port();
    let sink = RedisSink::builder()
        .command_timeout(Duration::from_millis(300))
        .connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect("a Redis that is down is not a start-up error");
    let engine = Engine::builder()
        .shutdown_timeout(Duration::from_millis(200))
        .sink(sink)
        .build()
        .unwrap();
    engine.record("u", 5).unwrap();
    let error = engine.flush_now().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, EngineError::Sink(SinkError::NotSent(_)))
            && text.contains(&format!("not connected to Redis at 127.0.0.1:{port}"))
            && text.contains("refused"),
        "{text}"
    );
    let stats = engine.stats();
    assert_eq!(stats.pending_amount, 5);
    assert!(
        stats
            .last_write_error
            .as_deref()
            .is_some_and(|e| text.ends_with(e) && e.contains("refused")),
        "{stats:?}"
    );
    let report = engine.shutdown().await.unwrap();
    assert_eq!(report.unwritten, vec![("shardmeter:usage:u".to_owned(), 5)]);
}

/// `flush_now` says what the sink refused while it ran, not only what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_now_reports_what_the_sink_refused() {
    let keyspace = Keyspace::new(shared_redis(), "engine-refused");
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    redis.set(&key(&keyspace, "text"), "abc");
    let engine = Engine::builder()
        .keys(KeyScheme::new(keyspace.prefix()))
        .sink(RedisSink::connect(&shared_redis_url()).await.unwrap())
        .build()
        .unwrap();
    engine.record("text", 9).unwrap();
    engine.record("number", 5).unwrap();
    let report = engine.flush_now().await.unwrap();
    assert_eq!((report.keys_written, report.amount_written), (1, 5));
    assert_eq!((report.keys_rejected, report.amount_rejected), (1, 9));
    assert_eq!(report.rejected.len(), 1);
    let rejection = &report.rejected[0];
    assert_eq!(
        (rejection.key.as_str(), rejection.amount),
        (key(&keyspace, "text").as_str(), 9)
    );
    assert!(rejection.reason.contains("not an integer"), "{rejection:?}");

    // The next flush reports only its own.
    engine.record("number", 2).unwrap();
    let report = engine.flush_now().await.unwrap();
    assert_eq!((report.keys_written, report.amount_written), (1, 2));
    assert_eq!((report.keys_rejected, report.amount_rejected), (0, 0));
    assert!(report.rejected.is_empty());
    let stats = engine.stats();
    assert_eq!((stats.keys_rejected, stats.amount_rejected), (1, 9));
    assert_eq!(redis.get(&key(&keyspace, "number")).as_deref(), Some("7"));
    engine.shutdown().await.unwrap();
}

/// The sink's user loses the permission to run the script mid-run: `flush_now` fails with the
/// typed configuration error, the stats and an ERROR log say so, the amounts stay pending and
/// are written exactly once the permission is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_revoked_mid_run_is_a_configuration_error_until_restored() {
    let logs = support::logs::captured_logs();
    let redis = RedisServer::start();
    let mut admin = redis.client();
    admin.set_meter_acl("+evalsha");
    let sink = RedisSink::connect(&support::meter_user_url(redis.port()))
        .await
        .unwrap();
    let engine = Engine::builder()
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .sink(sink)
        .build()
        .unwrap();
    engine.record("before", 10).unwrap();
    engine.flush_now().await.unwrap();

    admin.set_meter_acl("-evalsha");
    engine.record("during", 20).unwrap();
    let error = engine.flush_now().await.unwrap_err();
    let EngineError::Sink(SinkError::Misconfigured(message)) = &error else {
        panic!("{error:?}");
    };
    assert!(
        message.contains("NOPERM") && message.contains(&format!("127.0.0.1:{}", redis.port())),
        "{message}"
    );
    let stats = engine.stats();
    assert!(stats.config_errors >= 1, "{stats:?}");
    assert_eq!(stats.pending_amount, 20);
    assert!(
        stats
            .last_write_error
            .as_deref()
            .is_some_and(|e| e.contains("NOPERM")),
        "{stats:?}"
    );
    let text = logs.text();
    assert!(
        text.lines().any(|line| line.contains("ERROR")
            && line.contains("configuration is wrong")
            && line.contains("NOPERM")),
        "{text}"
    );

    admin.set_meter_acl("+evalsha");
    support::until_ok("a flush once fixed", Duration::from_secs(20), || {
        engine.flush_now()
    })
    .await;
    assert_eq!(engine.stats().last_write_error, None);
    assert!(engine.shutdown().await.unwrap().is_complete());
    let mut check = redis.client();
    assert_eq!(check.get_i64("shardmeter:usage:before"), Some(10));
    assert_eq!(check.get_i64("shardmeter:usage:during"), Some(20));
}
