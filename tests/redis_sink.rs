//! `RedisSink` against real Redis servers: totals and TTLs, deduplication by batch id, lost
//! replies (through a fault-injecting proxy) contrasted with a plain `INCRBY` pipeline and a
//! `MULTI`/`EXEC`, refused keys, `NOSCRIPT`, start-up errors, configuration errors (a database
//! Redis does not have, an ACL that forbids a command), a killed and a paused Redis, the
//! commands a steady flush costs, TTLs given back, and the bound on the dedup records. The same
//! sink on a Redis Cluster: `tests/cluster.rs`.
//!
//! Tests that only write their own keys use the shared Redis on 127.0.0.1:6379 under a unique
//! prefix; tests that count commands, kill, pause or need a password start their own
//! `redis-server` (see `support/mod.rs`).

mod support;

use fred::prelude::{
    Builder, ClientLike, Config, KeysInterface, ReconnectPolicy, TransactionInterface,
};
use shardmeter::sink::redis::{RedisSink, RedisSinkError};
use shardmeter::sink::{Batch, BatchId, BatchOutcome, Increment, KeyOutcome, Sink, SinkError};
use std::time::Duration;
use support::{
    shared_redis, shared_redis_url, unique_u64, until_ok, Keyspace, Proxy, RedisServer, Reply,
    RespClient,
};

/// Deadline for anything that waits on a reconnect.
const PATIENCE: Duration = Duration::from_secs(30);

fn batch(writer: u64, sequence: u64, increments: &[(&str, u64, Duration)]) -> Batch {
    Batch {
        id: BatchId { writer, sequence },
        increments: increments
            .iter()
            .map(|(key, amount, ttl)| Increment {
                key: (*key).into(),
                amount: *amount,
                ttl: *ttl,
            })
            .collect(),
    }
}

async fn write_one(sink: &RedisSink, batch: &Batch) -> Result<BatchOutcome, SinkError> {
    let mut results = sink.write(std::slice::from_ref(batch)).await;
    assert_eq!(results.len(), 1);
    results.remove(0)
}

/// A sink on `url` whose dedup records live under `keyspace`.
async fn sink_on(url: &str, keyspace: &Keyspace, timeout: Duration) -> RedisSink {
    RedisSink::builder()
        .marker_prefix(keyspace.key("batch"))
        .dedup_window(Duration::from_secs(600))
        .command_timeout(timeout)
        .connect(url)
        .await
        .expect("connect")
}

fn added(total: i64) -> KeyOutcome {
    KeyOutcome::Added { total }
}

/// One batch per sequence, of `per_batch` of `names` each, in order; a key's amount is
/// `sequence * 1,000 + its place in the batch (from 1)`, so every amount names its key.
fn numbered_batches(
    writer: u64,
    names: &[String],
    per_batch: usize,
    sequences: &[u64],
) -> Vec<Batch> {
    names
        .chunks(per_batch)
        .zip(sequences)
        .map(|(chunk, &sequence)| {
            let increments: Vec<(&str, u64, Duration)> = chunk
                .iter()
                .enumerate()
                .map(|(i, key)| (key.as_str(), sequence * 1_000 + i as u64 + 1, MINUTE))
                .collect();
            batch(writer, sequence, &increments)
        })
        .collect()
}

/// Every batch applied, each key answered with its own amount: the keys were new.
fn assert_new_keys_total_their_amounts(
    batches: &[Batch],
    results: Vec<Result<BatchOutcome, SinkError>>,
) {
    assert_eq!(results.len(), batches.len());
    for (batch, result) in batches.iter().zip(results) {
        let expected: Vec<KeyOutcome> = batch
            .increments
            .iter()
            .map(|increment| added(increment.amount as i64))
            .collect();
        assert_eq!(result, Ok(BatchOutcome::Applied(expected)), "{}", batch.id);
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_applied_with_totals_and_ttls() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "applied");
    let sink = sink_on(&shared_redis_url(), &keys, Duration::from_secs(3)).await;
    let mut redis = RespClient::connect(addr).unwrap();

    let day = keys.key("{uid-42}:20261129");
    let hour = keys.key("{uid-42}:1764374400");
    // Keys are opaque: spaces, `%XX` escapes, `:` and non-ASCII are just bytes.
    let odd = keys.key("{uid%20%7B42%7D}:day one é");
    redis.set(&day, "1000"); // another gateway's usage: totals include it

    let b = batch(
        unique_u64(),
        1,
        &[
            (&day, 20, Duration::from_secs(3600)),
            (&hour, 30, MINUTE),
            (&odd, 5_000, Duration::from_millis(1500)),
        ],
    );
    let outcome = write_one(&sink, &b).await.expect("write");
    assert_eq!(
        outcome,
        BatchOutcome::Applied(vec![added(1020), added(30), added(5000)])
    );

    // The reported totals are what Redis holds.
    assert_eq!(redis.get_i64(&day), Some(1020));
    assert_eq!(redis.get_i64(&hour), Some(30));
    assert_eq!(redis.get_i64(&odd), Some(5000));
    // TTLs in whole seconds, sub-second parts rounded up (1.5 s -> 2 s).
    assert!(
        (3598..=3600).contains(&redis.ttl(&day)),
        "ttl {}",
        redis.ttl(&day)
    );
    assert!((58..=60).contains(&redis.ttl(&hour)));
    assert!((1..=2).contains(&redis.ttl(&odd)));

    // On one Redis the lane is the batch sequence: one record guards the three keys, holds the
    // sequence and lives for the dedup window.
    let record = sink.dedup_record_key(b.id, &day);
    assert_eq!(sink.dedup_record_key(b.id, &odd), record);
    let (head, tail) = (
        format!("{}:{{", keys.key("batch")),
        format!("}}:{:016x}", b.id.writer),
    );
    assert!(
        record.starts_with(&head) && record.ends_with(&tail),
        "{record}"
    );
    assert_eq!(redis.get(&record).as_deref(), Some("1"));
    assert!((598..=600).contains(&redis.ttl(&record)));
    // One EVALSHA; or NOSCRIPT, SCRIPT LOAD, EVALSHA if no earlier test loaded the script.
    assert!(matches!(sink.commands_sent(), 1 | 3), "{sink:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_id_is_applied_once() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "dedup");
    let sink = sink_on(&shared_redis_url(), &keys, Duration::from_secs(3)).await;
    let mut redis = RespClient::connect(addr).unwrap();
    let (a, b) = (keys.key("{a}"), keys.key("{a}:2"));
    let writer = unique_u64();
    let first = batch(writer, 1, &[(&a, 7, MINUTE), (&b, 11, MINUTE)]);

    assert_eq!(
        write_one(&sink, &first).await,
        Ok(BatchOutcome::Applied(vec![added(7), added(11)]))
    );
    assert_eq!(
        write_one(&sink, &first).await,
        Ok(BatchOutcome::AlreadyApplied)
    );
    assert_eq!((redis.get_i64(&a), redis.get_i64(&b)), (Some(7), Some(11)));

    // Twice in one write: sent once, the copy is a duplicate of the first.
    let second = batch(writer, 2, &[(&a, 100, MINUTE)]);
    let results = sink.write(&[second.clone(), second.clone()]).await;
    assert_eq!(
        results,
        vec![
            Ok(BatchOutcome::Applied(vec![added(107)])),
            Ok(BatchOutcome::AlreadyApplied)
        ]
    );
    assert_eq!(redis.get_i64(&a), Some(107));

    // Deduplication is by id, not by content: another id with the same increments applies.
    let third = batch(writer, 3, &[(&a, 100, MINUTE)]);
    assert_eq!(
        write_one(&sink, &third).await,
        Ok(BatchOutcome::Applied(vec![added(207)]))
    );

    // A batch without increments sends nothing and is trivially applied.
    let sent = sink.commands_sent();
    assert_eq!(
        write_one(&sink, &batch(writer, 4, &[])).await,
        Ok(BatchOutcome::Applied(vec![]))
    );
    assert_eq!(sink.commands_sent(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_keys_leave_the_rest_of_the_batch_applied() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "refused");
    let sink = sink_on(&shared_redis_url(), &keys, Duration::from_secs(3)).await;
    let mut redis = RespClient::connect(addr).unwrap();

    let text = keys.key("{u}:text");
    let hash = keys.key("{u}:hash");
    let full = keys.key("{u}:full");
    let huge = keys.key("{u}:huge");
    let fine = keys.key("{u}:fine");
    let wild = keys.key("{u}:wild");
    redis.set(&text, "hello");
    assert_eq!(
        redis.command(&["HSET", &hash, "f", "1"]).unwrap(),
        Reply::Integer(1)
    );
    redis.set(&full, &(i64::MAX - 10).to_string());
    redis.set(&huge, &(i64::MAX - 100).to_string());

    let b = batch(
        unique_u64(),
        1,
        &[
            (&text, 5, MINUTE),
            (&fine, 5, MINUTE),
            (&hash, 5, MINUTE),
            (&full, 20, MINUTE),
            (&huge, 3, MINUTE),
            // Outside the contract (amount > i64::MAX): refused, no panic.
            (&wild, u64::MAX, MINUTE),
        ],
    );
    let BatchOutcome::Applied(outcomes) = write_one(&sink, &b).await.expect("write") else {
        panic!("not applied");
    };
    let reason = |i: usize| match &outcomes[i] {
        KeyOutcome::Rejected { reason } => reason.clone(),
        other => panic!("key {i}: {other:?}"),
    };
    assert!(reason(0).contains("not an integer"), "{}", reason(0));
    assert_eq!(outcomes[1], added(5));
    assert!(reason(2).starts_with("WRONGTYPE"), "{}", reason(2));
    assert!(reason(3).contains("overflow"), "{}", reason(3));
    // Beyond 2^53 a Lua number is inexact: the total is read back exactly.
    assert_eq!(outcomes[4], added(i64::MAX - 97));
    assert!(reason(5).contains("not an integer"), "{}", reason(5));

    // Refused keys are untouched (no value change, no TTL); the others are applied.
    assert_eq!(redis.get(&text).as_deref(), Some("hello"));
    assert_eq!(redis.ttl(&text), -1);
    assert_eq!(
        redis.command(&["TYPE", &hash]).unwrap(),
        Reply::Status("hash".into())
    );
    assert_eq!(redis.ttl(&hash), -1);
    assert_eq!(redis.get_i64(&full), Some(i64::MAX - 10));
    assert_eq!(redis.ttl(&full), -1);
    assert!(!redis.exists(&wild));
    assert_eq!(redis.get_i64(&fine), Some(5));
    assert!(redis.ttl(&fine) > 0);
    assert_eq!(redis.get_i64(&huge), Some(i64::MAX - 97));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_after_script_flush_reloads_and_commands_match_commandstats() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "noscript");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(3)).await;
    let k = |i: usize| keys.key(&format!("{{acct}}:{i}"));
    let writer = unique_u64();

    // First use: EVALSHA -> NOSCRIPT, SCRIPT LOAD, EVALSHA.
    let b1 = batch(writer, 1, &[(&k(0), 1, MINUTE), (&k(1), 2, MINUTE)]);
    assert_eq!(
        write_one(&sink, &b1).await,
        Ok(BatchOutcome::Applied(vec![added(1), added(2)]))
    );
    assert_eq!(sink.commands_sent(), 3);

    // The script cache is emptied (as by a restart or failover): reloaded once, still applied.
    assert_eq!(
        server.client().command(&["SCRIPT", "FLUSH"]).unwrap(),
        Reply::Status("OK".into())
    );
    let b2 = batch(writer, 2, &[(&k(0), 10, MINUTE)]);
    assert_eq!(
        write_one(&sink, &b2).await,
        Ok(BatchOutcome::Applied(vec![added(11)]))
    );
    assert_eq!(sink.commands_sent(), 6);

    // Ten batches of five keys in one write: ten EVALSHA, pipelined, nothing else on the wire.
    let many: Vec<Batch> = (0..10)
        .map(|i| {
            let increments: Vec<(String, u64, Duration)> =
                (0..5).map(|j| (k(100 + i * 5 + j), 1, MINUTE)).collect();
            let refs: Vec<(&str, u64, Duration)> = increments
                .iter()
                .map(|(key, a, t)| (key.as_str(), *a, *t))
                .collect();
            batch(writer, 10 + i as u64, &refs)
        })
        .collect();
    let results = sink.write(&many).await;
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(BatchOutcome::Applied(o)) if o.len() == 5)));
    assert_eq!(sink.commands_sent(), 16);

    // What Redis saw agrees: every EVALSHA and SCRIPT LOAD the sink counted reached it, and
    // inside the 12 applied calls ran 1 SET (the record) each and INCRBY per key (2 + 1 + 50).
    // EXPIRE ran for the 52 new keys, and for k(0) in b2 only if its refresh came up.
    let stats = server.commandstats();
    assert_eq!(
        stats.received("evalsha") + stats.calls("script|load"),
        sink.commands_sent()
    );
    assert_eq!(stats.calls("script|load"), 2);
    assert_eq!(stats.calls("set"), 12);
    assert_eq!(stats.calls("incrby"), 53);
    assert!((52..=53).contains(&stats.calls("expire")), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_evalsha_reply_is_applied_once() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr()).await;
    let keys = Keyspace::new(server.addr(), "lost");
    let sink = sink_on(&proxy.url(), &keys, Duration::from_secs(3)).await;
    sink.load_script().await.unwrap();
    let (a, b) = (keys.key("{acct}:a"), keys.key("{acct}:b"));
    let before = server.commandstats();

    // The script runs in Redis, then the connection is cut before its reply arrives.
    proxy.lose_replies_to("EVALSHA", 1);
    let lost = batch(unique_u64(), 1, &[(&a, 100, MINUTE), (&b, 5, MINUTE)]);
    let first = write_one(&sink, &lost).await;
    // fred re-sends the EVALSHA after reconnecting (then the sink answers Ok), or gives up
    // (then the sink answers an error and the flusher retries): either way, retry until Ok.
    let (outcome, _) = match first.clone() {
        Ok(outcome) => (outcome, 0),
        Err(_) => until_ok("retry", PATIENCE, || write_one(&sink, &lost)).await,
    };
    eprintln!("first answer after the lost reply: {first:?}");

    assert_eq!(proxy.faults_fired(), 1);
    // The first run applied it; the re-send or retry found the record.
    assert_eq!(outcome, BatchOutcome::AlreadyApplied);
    assert_eq!(server.get(&a).as_deref(), Some("100"));
    assert_eq!(server.get(&b).as_deref(), Some("5"));
    let after = server.commandstats();
    assert_eq!(
        after.calls("incrby") - before.calls("incrby"),
        2,
        "INCRBY ran once per key"
    );
    assert!(after.received("evalsha") - before.received("evalsha") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_beyond_freds_attempts_are_errors_and_the_retry_is_deduplicated() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr()).await;
    let keys = Keyspace::new(server.addr(), "lost2");
    let sink = sink_on(&proxy.url(), &keys, Duration::from_secs(3)).await;
    sink.load_script().await.unwrap();
    let a = keys.key("{acct}");

    // Two lost replies: the first send and fred's one re-send. The sink must say it does not
    // know the outcome.
    proxy.lose_replies_to("EVALSHA", 2);
    let lost = batch(unique_u64(), 1, &[(&a, 250, MINUTE)]);
    let first = write_one(&sink, &lost).await;
    assert!(
        matches!(
            first,
            Err(SinkError::Unavailable(_) | SinkError::Timeout(_))
        ),
        "{first:?}"
    );
    let (outcome, _) = until_ok("retry", PATIENCE, || write_one(&sink, &lost)).await;
    assert_eq!(proxy.faults_fired(), 2);
    assert_eq!(outcome, BatchOutcome::AlreadyApplied);
    assert_eq!(server.get(&a).as_deref(), Some("250"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_lost_replies_never_change_the_totals() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr()).await;
    let keys = Keyspace::new(server.addr(), "random");
    let sink = sink_on(&proxy.url(), &keys, Duration::from_secs(3)).await;
    sink.load_script().await.unwrap();
    proxy.lose_replies_randomly("EVALSHA", 0.3, 0x5eed);

    let writer = unique_u64();
    let mut expected = [0i64; 4];
    for sequence in 0..30u64 {
        let increments: Vec<(String, u64, Duration)> = (0..4)
            .map(|i| {
                (
                    keys.key(&format!("{{acct}}:{i}")),
                    sequence * 4 + i as u64 + 1,
                    MINUTE,
                )
            })
            .collect();
        for (i, (_, amount, _)) in increments.iter().enumerate() {
            expected[i] += *amount as i64;
        }
        let refs: Vec<(&str, u64, Duration)> = increments
            .iter()
            .map(|(k, a, t)| (k.as_str(), *a, *t))
            .collect();
        let b = batch(writer, sequence, &refs);
        until_ok("write", PATIENCE, || write_one(&sink, &b)).await;
    }
    assert!(
        proxy.faults_fired() > 0,
        "the fault never fired: the test proves nothing"
    );
    for (i, total) in expected.iter().enumerate() {
        let key = keys.key(&format!("{{acct}}:{i}"));
        assert_eq!(server.get(&key), Some(total.to_string()), "{key}");
    }
}

/// The trap the dedup record exists for: a plain pipeline (as the reference gateway wrote) and a
/// MULTI/EXEC through the same fault count twice, and the caller sees success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_dedup_record_the_same_fault_double_counts() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.addr()).await;
    let keys = Keyspace::new(server.addr(), "trap");

    // fred's defaults (3 attempts per command) with a reconnect policy, as a gateway has.
    let client = Builder::from_config(Config::from_url(&proxy.url()).unwrap())
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .build()
        .unwrap();
    client.init().await.unwrap();

    let pipelined = keys.key("{acct}:pipeline");
    proxy.lose_replies_to("INCRBY", 1);
    let pipeline = client.pipeline();
    let _: () = pipeline.incr_by(&pipelined, 100).await.unwrap();
    let _: () = pipeline.expire(&pipelined, 60, None).await.unwrap();
    let replies: Result<(i64, bool), _> = pipeline.all().await;
    assert_eq!(proxy.faults_fired(), 1);
    // fred re-sent the pipeline after reconnecting: the caller sees success...
    let (total, _) = replies.expect("fred re-sends and reports success");
    // ...and the counter holds twice what was sent.
    assert_eq!(total, 200);
    assert_eq!(server.get(&pipelined).as_deref(), Some("200"));

    // MULTI/EXEC re-sends the whole transaction, even with a single attempt per command.
    let transaction_client = Builder::from_config(Config::from_url(&proxy.url()).unwrap())
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .with_connection_config(|c| c.max_command_attempts = 1)
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .build()
        .unwrap();
    transaction_client.init().await.unwrap();
    let transacted = keys.key("{acct}:multi");
    proxy.lose_replies_to("EXEC", 1);
    let transaction = transaction_client.multi();
    let _: () = transaction.incr_by(&transacted, 100).await.unwrap();
    let _: () = transaction.expire(&transacted, 60, None).await.unwrap();
    let replies: Result<(i64, bool), _> = transaction.exec(true).await;
    assert_eq!(proxy.faults_fired(), 2);
    assert_eq!(replies.expect("fred re-sends the transaction").0, 200);
    assert_eq!(server.get(&transacted).as_deref(), Some("200"));

    let _ = client.quit().await;
    let _ = transaction_client.quit().await;
}

#[tokio::test]
async fn bad_urls_and_settings_are_typed_errors() {
    for url in [
        "",
        "not a url",
        "127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "redis://127.0.0.1:70000",
        "redis://",
        "http://127.0.0.1:6379",
        // TLS without a TLS feature in fred: refused rather than silently sent in clear text.
        "rediss://127.0.0.1:6379",
    ] {
        match RedisSink::connect(url).await {
            Err(RedisSinkError::InvalidUrl(_)) => {}
            other => panic!("{url:?}: {other:?}"),
        }
    }
    // The error never repeats a password from the URL.
    let error = RedisSink::connect("redis://user:hunter2@127.0.0.1:99999")
        .await
        .unwrap_err();
    assert!(matches!(error, RedisSinkError::InvalidUrl(_)), "{error:?}");
    assert!(!error.to_string().contains("hunter2"), "{error}");

    for builder in [
        RedisSink::builder().marker_prefix(""),
        RedisSink::builder().marker_prefix("batch:{x}"),
        RedisSink::builder().dedup_window(Duration::from_millis(999)),
        RedisSink::builder().dedup_window(Duration::MAX),
        RedisSink::builder().command_timeout(Duration::ZERO),
    ] {
        match builder.connect(&shared_redis_url()).await {
            Err(RedisSinkError::InvalidConfig(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_an_error_at_connect() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let port = server.port();

    let wrong = RedisSink::connect(&format!("redis://:wrong@127.0.0.1:{port}")).await;
    assert!(matches!(wrong, Err(RedisSinkError::Auth(_))), "{wrong:?}");
    let wrong_user = RedisSink::connect(&format!("redis://nobody:s3cret@127.0.0.1:{port}")).await;
    assert!(
        matches!(wrong_user, Err(RedisSinkError::Auth(_))),
        "{wrong_user:?}"
    );
    let missing = RedisSink::connect(&server.url()).await;
    assert!(
        matches!(missing, Err(RedisSinkError::Auth(_))),
        "{missing:?}"
    );

    let sink = RedisSink::connect(&format!("redis://:s3cret@127.0.0.1:{port}"))
        .await
        .unwrap();
    let key = "{acct}:authenticated";
    let b = batch(unique_u64(), 1, &[(key, 3, MINUTE)]);
    assert_eq!(
        write_one(&sink, &b).await,
        Ok(BatchOutcome::Applied(vec![added(3)]))
    );
    assert_eq!(server.get(key).as_deref(), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_down_at_start_up_is_unavailable_until_it_comes_up() {
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}");

    // Starting a gateway while Redis is down is not an error...
    let sink = tokio::time::timeout(PATIENCE, RedisSink::connect(&url))
        .await
        .expect("connect does not hang")
        .expect("a Redis that is down is not a start-up error");
    // ...writes say, at once, that nothing was sent (so a shutdown may call it safe to replay)...
    let key = "{acct}:late";
    let b = batch(unique_u64(), 1, &[(key, 9, MINUTE)]);
    let early = tokio::time::timeout(PATIENCE, write_one(&sink, &b))
        .await
        .expect("no hang");
    assert!(matches!(early, Err(SinkError::NotSent(_))), "{early:?}");

    // ...and succeed once Redis is there, without touching the sink.
    let server = RedisServer::start_on(port, &[]);
    let (outcome, _) = until_ok("first write", PATIENCE, || write_one(&sink, &b)).await;
    assert_eq!(outcome, BatchOutcome::Applied(vec![added(9)]));
    assert_eq!(server.get(key).as_deref(), Some("9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_fails_writes_until_it_is_back() {
    // AOF on, so what was acknowledged (dedup records included) survives the SIGKILL.
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let keys = Keyspace::new(server.addr(), "killed");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(2)).await;
    let key = keys.key("{acct}");
    let writer = unique_u64();
    let before = batch(writer, 1, &[(&key, 10, MINUTE)]);
    let during = batch(writer, 2, &[(&key, 20, MINUTE)]);
    assert_eq!(
        write_one(&sink, &before).await,
        Ok(BatchOutcome::Applied(vec![added(10)]))
    );

    server.kill();
    let failed = tokio::time::timeout(PATIENCE, write_one(&sink, &during))
        .await
        .expect("no hang");
    assert!(
        matches!(
            failed,
            Err(SinkError::Unavailable(_) | SinkError::Timeout(_))
        ),
        "{failed:?}"
    );
    // Still down: still an error, still no hang.
    let again = tokio::time::timeout(PATIENCE, write_one(&sink, &during))
        .await
        .expect("no hang");
    assert!(again.is_err(), "{again:?}");

    server.restart();
    let (outcome, _) = until_ok("write after restart", PATIENCE, || {
        write_one(&sink, &during)
    })
    .await;
    assert_eq!(outcome, BatchOutcome::Applied(vec![added(30)]));
    // The first batch's record survived the restart: a late retry of it is recognised.
    assert_eq!(
        write_one(&sink, &before).await,
        Ok(BatchOutcome::AlreadyApplied)
    );
    assert_eq!(server.get(&key).as_deref(), Some("30"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_times_out_and_the_retry_applies_once() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "paused");
    let timeout = Duration::from_millis(500);
    let sink = sink_on(&server.url(), &keys, timeout).await;
    sink.load_script().await.unwrap();
    let key = keys.key("{acct}");
    let b = batch(unique_u64(), 1, &[(&key, 42, MINUTE)]);

    server.pause();
    let stalled = tokio::time::timeout(PATIENCE, write_one(&sink, &b))
        .await
        .expect("no hang");
    server.resume();
    // The EVALSHA was written before the pause was noticed: its outcome is unknown.
    assert!(
        matches!(stalled, Err(SinkError::Timeout(t)) if t == timeout),
        "{stalled:?}"
    );

    // Whichever of the stalled command and the retry runs first applies; the other is a
    // duplicate.
    let (outcome, _) = until_ok("retry", PATIENCE, || write_one(&sink, &b)).await;
    assert!(
        matches!(
            &outcome,
            BatchOutcome::AlreadyApplied | BatchOutcome::Applied(_)
        ),
        "{outcome:?}"
    );
    assert_eq!(server.get(&key).as_deref(), Some("42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_fred_client_can_be_passed_in() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "passed");
    let client = Builder::from_config(Config::from_url(&shared_redis_url()).unwrap())
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()
        .unwrap();
    client.init().await.unwrap();
    let sink = RedisSink::builder()
        .marker_prefix(keys.key("batch"))
        .build(client.clone())
        .unwrap();
    let key = keys.key("{acct}");
    let b = batch(unique_u64(), 1, &[(&key, 4, MINUTE)]);
    assert_eq!(
        write_one(&sink, &b).await,
        Ok(BatchOutcome::Applied(vec![added(4)]))
    );

    // The gateway keeps using its client; the sink does not close it when dropped.
    drop(sink);
    let total: i64 = client.get(&key).await.unwrap();
    assert_eq!(total, 4);

    // A client that is not connected: writes are not sent, not hung.
    let idle = Builder::from_config(Config::from_url(&shared_redis_url()).unwrap())
        .build()
        .unwrap();
    let sink = RedisSink::new(idle);
    let result = tokio::time::timeout(PATIENCE, write_one(&sink, &b))
        .await
        .expect("no hang");
    assert!(matches!(result, Err(SinkError::NotSent(_))), "{result:?}");
    let _ = client.quit().await;
}

/// `count` keys `<keyspace>:{acct}:<i>` of 1 each, in batches of `per_batch` from `sequence` on.
fn round(
    keys: &Keyspace,
    writer: u64,
    sequence: u64,
    count: usize,
    per_batch: usize,
) -> Vec<Batch> {
    let names: Vec<String> = (0..count).map(|i| keys.key(&format!("acct:{i}"))).collect();
    names
        .chunks(per_batch)
        .zip(sequence..)
        .map(|(chunk, sequence)| {
            let increments: Vec<(&str, u64, Duration)> =
                chunk.iter().map(|k| (k.as_str(), 1, MINUTE)).collect();
            batch(writer, sequence, &increments)
        })
        .collect()
}

/// Every command Redis ran, but the INFO and PING the test itself sends.
fn server_calls(server: &RedisServer) -> u64 {
    let stats = server.commandstats();
    stats
        .0
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "ping" | "scan"))
        .map(|(_, stat)| stat.calls)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_flushes_cost_at_most_1_1_calls_per_account_and_every_key_keeps_a_ttl() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "calls");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(3)).await;
    let writer = unique_u64();
    let (accounts, per_batch, rounds) = (2_000, 500, 20u64);

    // The first round creates the keys (INCRBY + EXPIRE each); the next ones are steady.
    let first = round(&keys, writer, 0, accounts, per_batch);
    assert!(sink.write(&first).await.iter().all(Result::is_ok));
    let before = server_calls(&server);
    for r in 1..rounds {
        let batches = round(&keys, writer, r * 4, accounts, per_batch);
        let results = sink.write(&batches).await;
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(BatchOutcome::Applied(_)))));
    }
    let calls = server_calls(&server) - before;
    let per_account = calls as f64 / (accounts as u64 * (rounds - 1)) as f64;
    eprintln!("{calls} server calls, {per_account:.3} per account per flush");
    // 1 INCRBY per account, 1 EVALSHA + 1 SET per 500 accounts, an EXPIRE refresh per 16.
    assert!(per_account <= 1.1, "{per_account}");
    assert!(
        per_account > 1.0,
        "{per_account}: every account needs its INCRBY"
    );

    let mut redis = server.client();
    for i in 0..accounts {
        let key = keys.key(&format!("acct:{i}"));
        assert_eq!(redis.get_i64(&key), Some(rounds as i64), "{key}");
        assert!(redis.ttl(&key) > 0, "{key} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_whose_ttl_was_removed_gets_it_back() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "persist");
    let sink = sink_on(&shared_redis_url(), &keys, Duration::from_secs(3)).await;
    let mut redis = RespClient::connect(addr).unwrap();
    let key = keys.key("acct");
    let writer = unique_u64();
    let hour = Duration::from_secs(3600);

    write_one(&sink, &batch(writer, 0, &[(&key, 1, hour)]))
        .await
        .unwrap();
    assert!(redis.ttl(&key) > 3590);
    // Someone removes the TTL: later writes must give it back.
    assert_eq!(
        redis.command(&["PERSIST", &key]).unwrap(),
        Reply::Integer(1)
    );
    let mut writes = 0;
    while redis.ttl(&key) == -1 {
        writes += 1;
        assert!(writes <= 200, "the TTL never came back");
        write_one(&sink, &batch(writer, writes, &[(&key, 1, hour)]))
            .await
            .unwrap();
    }
    eprintln!("TTL back after {writes} writes");
    assert!((3590..=3600).contains(&redis.ttl(&key)));
    assert_eq!(redis.get_i64(&key), Some(1 + writes as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_one_lane_share_one_call_and_one_record() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "lane");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(3)).await;
    sink.load_script().await.unwrap();
    let writer = unique_u64();
    let (a, b) = (keys.key("a"), keys.key("b"));
    // Sequences 1 and 2,049 share lane 1 on one Redis: one EVALSHA applies both, atomically, so
    // no later call of the lane can advance its record over an earlier one that failed.
    let one = batch(writer, 1, &[(&a, 5, MINUTE)]);
    let other = batch(writer, 2_049, &[(&b, 7, MINUTE)]);
    assert_eq!(
        sink.dedup_record_key(one.id, &a),
        sink.dedup_record_key(other.id, &b)
    );
    let results = sink.write(&[one.clone(), other.clone()]).await;
    assert_eq!(
        results,
        vec![
            Ok(BatchOutcome::Applied(vec![added(5)])),
            Ok(BatchOutcome::Applied(vec![added(7)]))
        ]
    );
    assert_eq!(server.commandstats().calls("evalsha"), 1);
    assert_eq!(
        server.get(&sink.dedup_record_key(one.id, &a)).as_deref(),
        Some("2049")
    );
    // Re-sent, alone or together: applied before, the totals read back.
    assert_eq!(
        write_one(&sink, &one).await,
        Ok(BatchOutcome::AlreadyApplied)
    );
    assert_eq!(
        sink.write(&[one, other]).await,
        vec![
            Ok(BatchOutcome::AlreadyApplied),
            Ok(BatchOutcome::AlreadyApplied)
        ]
    );
    assert_eq!(
        (server.get(&a), server.get(&b)),
        (Some("5".into()), Some("7".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_records_are_bounded_per_writer_and_outside_the_counters() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "bound");
    let sink = RedisSink::builder()
        .marker_prefix("bound-dedup")
        .connect(&server.url())
        .await
        .unwrap();
    let writer = unique_u64();
    // 700 writes of 3 batches: 2,100 sequences, more than the 2,048 lanes.
    for w in 0..700u64 {
        let batches = round(&keys, writer, w * 3, 3, 1);
        assert!(sink.write(&batches).await.iter().all(Result::is_ok));
    }
    let mut redis = server.client();
    let records = redis.scan(&format!("bound-dedup:*:{writer:016x}"));
    assert_eq!(records.len(), 2_048);
    assert!(records.iter().all(|r| redis.ttl(r) > 86_000));
    // The counters' prefix holds counters only.
    let mut counters = redis.scan(&format!("{}*", keys.prefix()));
    counters.sort();
    assert_eq!(
        counters,
        vec![keys.key("acct:0"), keys.key("acct:1"), keys.key("acct:2")]
    );
    assert_eq!(redis.get_i64(&keys.key("acct:0")), Some(700));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_never_looks_applied_because_of_a_later_one() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "failed-lane");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(3)).await;
    let writer = unique_u64();
    let (a, b) = (keys.key("a"), keys.key("b"));
    let earlier = batch(writer, 1, &[(&a, 5, MINUTE)]);
    let later = batch(writer, 2, &[(&b, 7, MINUTE)]);
    // The earlier batch's call fails as a whole (its record holds a hash: SET answers
    // WRONGTYPE and the script stops before any INCRBY); the later one, pipelined behind it in
    // the same write, applies.
    let record = sink.dedup_record_key(earlier.id, &a);
    assert_ne!(record, sink.dedup_record_key(later.id, &b));
    let mut redis = server.client();
    assert_eq!(
        redis.command(&["HSET", &record, "f", "1"]).unwrap(),
        Reply::Integer(1)
    );
    let results = sink.write(&[earlier.clone(), later.clone()]).await;
    assert!(
        matches!(&results[0], Err(SinkError::Failed(e)) if e.contains("WRONGTYPE")),
        "{results:?}"
    );
    assert_eq!(results[1], Ok(BatchOutcome::Applied(vec![added(7)])));
    assert_eq!(server.get(&a), None);

    // The flusher re-sends the earlier batch alone: it is applied now, not taken for a
    // duplicate of the later one.
    redis.command(&["DEL", &record]).unwrap();
    assert_eq!(
        write_one(&sink, &earlier).await,
        Ok(BatchOutcome::Applied(vec![added(5)]))
    );
    assert_eq!(
        write_one(&sink, &earlier).await,
        Ok(BatchOutcome::AlreadyApplied)
    );
    assert_eq!(
        (server.get(&a), server.get(&b)),
        (Some("5".into()), Some("7".into()))
    );
}

/// Writes `b` until the sink answers that Redis refuses its settings; returns that message.
async fn until_misconfigured(sink: &RedisSink, b: &Batch) -> String {
    let (message, _) = until_ok("a configuration error", PATIENCE, || async {
        match write_one(sink, b).await {
            Err(SinkError::Misconfigured(message)) => Ok(message),
            other => Err(other),
        }
    })
    .await;
    message
}

/// A sink connected to a free port where nothing listens (yet), with `path` after the address
/// (`""`, `"/99"`): `connect` succeeds, as a gateway starting before its Redis needs.
async fn sink_to_nowhere(path: &str) -> (u16, RedisSink) {
    let port = support::free_port();
    let sink = RedisSink::builder()
        .command_timeout(Duration::from_millis(300))
        .connect(&format!("redis://127.0.0.1:{port}{path}"))
        .await
        .expect("a Redis that is down is not a start-up error");
    (port, sink)
}

/// Nothing listens: the sink still starts (a gateway must), and what it answers names the
/// address and fred's cause, not only a client state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_nowhere_names_the_address_and_the_cause() {
    let (port, sink) = sink_to_nowhere("").await;
    let b = batch(unique_u64(), 1, &[("nowhere", 1, MINUTE)]);
    let (message, _) = until_ok("the cause in the error", PATIENCE, || async {
        match write_one(&sink, &b).await {
            Err(SinkError::NotSent(message)) if message.contains("refused") => Ok(message),
            other => Err(other),
        }
    })
    .await;
    assert!(
        message.contains(&format!("not connected to Redis at 127.0.0.1:{port}: ")),
        "{message}"
    );
}

/// A database index Redis does not have is a configuration error, reported by `connect` with
/// the address and Redis' reply, not retried forever like an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_redis_does_not_have_is_refused_at_connect() {
    let error = tokio::time::timeout(
        PATIENCE,
        RedisSink::connect(&format!("{}/99", shared_redis_url())),
    )
    .await
    .expect("connect does not hang")
    .unwrap_err();
    let RedisSinkError::Misconfigured(message) = &error else {
        panic!("{error:?}");
    };
    assert!(message.contains("127.0.0.1:6379"), "{message}");
    assert!(
        message.contains("ERR DB index is out of range"),
        "{message}"
    );
    assert!(
        error
            .to_string()
            .starts_with("Redis refuses the sink's settings: "),
        "{error}"
    );
    // Refused credentials name the address too.
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let error = RedisSink::connect(&format!("redis://:wrong@127.0.0.1:{}", server.port()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RedisSinkError::Auth(m)
            if m.contains(&format!("127.0.0.1:{}", server.port())) && m.contains("WRONGPASS")),
        "{error:?}"
    );
}

/// The same database, with Redis down at start-up: `connect` cannot know yet and succeeds;
/// writes are `NotSent` while nothing listens, then `Misconfigured` (nothing applied) once
/// Redis answers and refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_redis_does_not_have_is_misconfigured_once_redis_is_up() {
    let (port, sink) = sink_to_nowhere("/99").await;
    let b = batch(unique_u64(), 1, &[("{acct}:db99", 1, MINUTE)]);
    let early = write_one(&sink, &b).await;
    assert!(
        matches!(&early, Err(SinkError::NotSent(m)) if m.contains("refused")),
        "{early:?}"
    );

    let _server = RedisServer::start_on(port, &[]);
    let message = until_misconfigured(&sink, &b).await;
    assert!(
        message.contains(&format!("127.0.0.1:{port}"))
            && message.contains("ERR DB index is out of range"),
        "{message}"
    );
    assert!(!SinkError::Misconfigured(message).may_have_applied());
}

/// An ACL that lets the sink's user run `EVALSHA` but not a command the script runs: the script
/// refuses the whole call before writing anything (no key, no dedup record), instead of
/// applying part of it and reporting the rest as refused keys. Once the permission is given,
/// the same batch applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_forbidding_a_command_of_the_script_refuses_the_whole_call() {
    let server = RedisServer::start();
    let mut admin = server.client();
    admin.set_meter_acl("-expire");
    let sink = RedisSink::connect(&support::meter_user_url(server.port()))
        .await
        .expect("connect as meter");

    let b = batch(
        unique_u64(),
        1,
        &[("{acct}:acl-1", 3, MINUTE), ("{acct}:acl-2", 4, MINUTE)],
    );
    let refused = write_one(&sink, &b).await;
    for key in ["{acct}:acl-1", "{acct}:acl-2"] {
        assert_eq!(server.get(key), None, "{key} was written: {refused:?}");
    }
    assert_eq!(
        server.get(&sink.dedup_record_key(b.id, "{acct}:acl-1")),
        None
    );
    let Err(SinkError::Misconfigured(message)) = &refused else {
        panic!("{refused:?}");
    };
    assert!(
        message.contains("NOPERM") && message.contains(&format!("127.0.0.1:{}", server.port())),
        "{message}"
    );

    // SET forbidden: the script's first write fails, before anything is written.
    admin.set_meter_acl("-set");
    let refused = write_one(&sink, &b).await;
    assert!(
        matches!(&refused, Err(SinkError::Misconfigured(m)) if m.contains("can't run")),
        "{refused:?}"
    );
    assert_eq!(server.get("{acct}:acl-1"), None);

    // EVALSHA itself forbidden: Redis refuses before the script runs.
    admin.set_meter_acl("-evalsha");
    let refused = write_one(&sink, &b).await;
    assert!(
        matches!(&refused, Err(SinkError::Misconfigured(m)) if m.contains("evalsha")),
        "{refused:?}"
    );

    admin.set_meter_acl("+evalsha");
    assert_eq!(
        write_one(&sink, &b).await,
        Ok(BatchOutcome::Applied(vec![added(3), added(4)]))
    );
    assert_eq!(server.ttl("{acct}:acl-1"), 60);
}

/// Redis' password changes under a running sink: the reconnect is refused (`WRONGPASS`), a
/// configuration error naming the address; once the password is back, the client reconnects
/// and the same batch applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_changed_under_the_sink_is_misconfigured_until_it_is_back() {
    let server = RedisServer::start_with(&["--requirepass", "old"]);
    let sink = RedisSink::builder()
        .command_timeout(Duration::from_millis(300))
        .connect(&format!("redis://:old@127.0.0.1:{}", server.port()))
        .await
        .unwrap();
    let mut admin = server.client();
    admin
        .command(&["CONFIG", "SET", "requirepass", "new"])
        .unwrap();
    admin
        .command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .unwrap();

    let b = batch(unique_u64(), 1, &[("{acct}:rotated", 6, MINUTE)]);
    let message = until_misconfigured(&sink, &b).await;
    assert!(
        message.contains(&format!("127.0.0.1:{}", server.port())) && message.contains("WRONGPASS"),
        "{message}"
    );
    assert_eq!(admin.get("{acct}:rotated"), None);

    admin
        .command(&["CONFIG", "SET", "requirepass", "old"])
        .unwrap();
    let (outcome, _) = until_ok("a write once the password is back", PATIENCE, || {
        write_one(&sink, &b)
    })
    .await;
    assert_eq!(outcome, BatchOutcome::Applied(vec![added(6)]));
}

/// A write of more keys than one pipeline carries: every key of every batch gets its own reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_in_several_pipelines_answers_every_key_in_order() {
    let addr = shared_redis();
    let keys = Keyspace::new(addr, "pipelines");
    let sink = sink_on(&shared_redis_url(), &keys, Duration::from_secs(10)).await;
    let writer = unique_u64();
    // 7 batches of 700 keys: the sink sends them in pipelines of about 1,024 keys, so replies
    // come back from several pipelines and must still reach the right key of the right batch.
    let names: Vec<String> = (0..4_900).map(|i| keys.key(&format!("k:{i}"))).collect();
    let batches = numbered_batches(writer, &names, 700, &[0, 1, 2, 3, 4, 5, 6]);
    assert_new_keys_total_their_amounts(&batches, sink.write(&batches).await);
    let mut redis = RespClient::connect(addr).unwrap();
    assert_eq!(redis.get_i64(&names[4_899]), Some(6_700));
}

/// On one Redis a lane's call is sent as soon as the write's last batch of that lane is
/// planned, so calls go out in another order than their lanes first appear: every key still
/// gets its own reply, and each lane is one call whose record holds its highest sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_as_their_lanes_close_answer_every_key_in_order() {
    let server = RedisServer::start();
    let keys = Keyspace::new(server.addr(), "streamed");
    let sink = sink_on(&server.url(), &keys, Duration::from_secs(10)).await;
    sink.load_script().await.unwrap();
    let writer = unique_u64();
    // Lanes 1, 2, 1, 3, 1, 2 (sequence modulo 2,048): lane 3 closes at the fourth batch, lane 1
    // at the fifth, lane 2 at the last. 600 keys each: several pipelines.
    let sequences = [1u64, 2, 2_049, 3, 4_097, 2_050];
    let names: Vec<String> = (0..sequences.len() * 600)
        .map(|i| keys.key(&format!("k:{i}")))
        .collect();
    let batches = numbered_batches(writer, &names, 600, &sequences);
    assert_new_keys_total_their_amounts(&batches, sink.write(&batches).await);
    assert_eq!(server.commandstats().calls("evalsha"), 3);
    for (sequence, key, highest) in [
        (1, &names[0], "4097"),
        (2, &names[600], "2050"),
        (3, &names[1_800], "3"),
    ] {
        let id = BatchId { writer, sequence };
        assert_eq!(
            server.get(&sink.dedup_record_key(id, key)).as_deref(),
            Some(highest)
        );
    }
    // Sent again whole: every lane was applied before.
    assert!(sink
        .write(&batches)
        .await
        .iter()
        .all(|result| *result == Ok(BatchOutcome::AlreadyApplied)));
    assert_eq!(server.get(&names[0]), Some("1001".into()));
}
