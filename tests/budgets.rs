//! The read side against real Redis: usage, status and budgets answered in process, checked
//! against what the deployment's own reader (`GET` of the literal key, compared with the limit)
//! sees.
//!
//! Tests that only write their own keys use the shared Redis under a unique [`Keyspace`]; the
//! fail-open test starts and kills its own `redis-server`.

mod support;

use shardmeter::{Budgets, Clock, Engine, KeyScheme, MemorySink, RedisSink, Session};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::{shared_redis, shared_redis_url, Keyspace, RedisServer, RespClient};

/// The deployment's default budget: 30 minutes of audio a day, in ms.
const DAILY_LIMIT_MS: u64 = 1_800_000;
/// How long a test waits for something the engine publishes (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(10);
/// 2026-11-29T23:59:00Z.
const A_MINUTE_TO_MIDNIGHT: u64 = 1_795_996_740;

/// A wall clock the test moves by hand.
#[derive(Clone)]
struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    fn at(unix_secs: u64) -> Self {
        Self(Arc::new(AtomicU64::new(unix_secs)))
    }

    fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst))
    }
}

/// An engine writing the deployment's daily keys under `keyspace` to the shared Redis.
async fn engine(keyspace: &Keyspace, budgets: Budgets, clock: Option<ManualClock>) -> Engine {
    let builder = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .keys(KeyScheme::daily_utc(keyspace.prefix()))
        .budgets(budgets);
    let builder = match clock {
        Some(clock) => builder.clock(clock),
        None => builder,
    };
    builder
        .sink(RedisSink::connect(&shared_redis_url()).await.unwrap())
        .build()
        .unwrap()
}

/// What the deployment's `is_dg_budget_exhausted` answers: one GET of today's literal key.
fn deployment_reader_exhausted(redis: &mut RespClient, key: &str, limit: u64) -> bool {
    redis.get_i64(key).unwrap_or(0) >= limit as i64
}

async fn open_synced(engine: &Engine, account: &str) -> Session {
    let session = engine.open_session(account).unwrap();
    assert!(session.synced(PATIENCE).await, "{account}: first read");
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_the_deployment_wrote_before_counts_at_the_first_session() {
    let keyspace = Keyspace::new(shared_redis(), "budget-preexisting");
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    let engine = engine(&keyspace, Budgets::per_bucket(DAILY_LIMIT_MS), None).await;
    // The old per-chunk writer charged this user 1,890,000 ms today, under the literal key.
    let key = format!("{}:uid-42:{}", keyspace.prefix(), today());
    redis.command(&["INCRBY", &key, "1890000"]).unwrap();

    let session = open_synced(&engine, "uid-42").await;
    assert!(session.is_exhausted());
    let status = session.status().unwrap();
    assert_eq!(
        (
            status.limit,
            status.used,
            status.remaining,
            status.exhausted
        ),
        (DAILY_LIMIT_MS, 1_890_000, 0, true)
    );
    assert_eq!(session.usage().global, Some(1_890_000));
    assert!(engine.is_exhausted("uid-42"));
    assert_eq!(engine.stats().account_reads, 1);
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_is_at_exactly_the_limit_as_the_deployments_reader_sees_it() {
    let keyspace = Keyspace::new(shared_redis(), "budget-limit");
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    let engine = engine(&keyspace, Budgets::per_bucket(100), None).await;
    let key = format!("{}:team:ops:{}", keyspace.prefix(), today());

    let session = open_synced(&engine, "team:ops").await;
    let channel = session.clone();
    let mut exhausted = std::pin::pin!(channel.exhausted());
    session.add(99);
    engine.flush_now().await.unwrap();
    assert!(!session.is_exhausted(), "99 of 100");
    assert!(!deployment_reader_exhausted(&mut redis, &key, 100));
    assert!(
        tokio::time::timeout(Duration::ZERO, exhausted.as_mut())
            .await
            .is_err(),
        "not notified below the limit"
    );

    session.add(1);
    engine.flush_now().await.unwrap();
    assert!(session.is_exhausted(), "100 of 100: used >= limit");
    assert!(deployment_reader_exhausted(&mut redis, &key, 100));
    tokio::time::timeout(PATIENCE, exhausted).await.unwrap();

    session.add(1);
    engine.flush_now().await.unwrap();
    let status = engine.status("team:ops").unwrap();
    assert_eq!(
        (status.used, status.remaining, status.exhausted),
        (101, 0, true)
    );
    assert_eq!(redis.get_i64(&key), Some(101), "the literal key holds it");
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_see_each_others_usage_within_one_flush_of_each() {
    let keyspace = Keyspace::new(shared_redis(), "budget-two");
    let budgets = || Budgets::per_bucket(1_000);
    let near = engine(&keyspace, budgets(), None).await;
    let far = engine(&keyspace, budgets(), None).await;
    let here = open_synced(&near, "uid-7").await;
    let there = open_synced(&far, "uid-7").await;

    there.add(600);
    far.flush_now().await.unwrap();
    assert_eq!(here.usage().used, 0, "not before this engine's own flush");
    // Nothing of uid-7 to write here: the flush reads its total instead.
    near.flush_now().await.unwrap();
    support::until_ok("the other engine's 600", PATIENCE, || async {
        (here.usage().global == Some(600)).then_some(()).ok_or(())
    })
    .await;

    // The other engine pushes the account over its budget: reported here within the bound.
    there.add(500);
    far.flush_now().await.unwrap();
    near.flush_now().await.unwrap();
    tokio::time::timeout(PATIENCE, here.exhausted())
        .await
        .expect("exhaustion reported after one flush of each engine");
    assert_eq!(here.status().unwrap().used, 1_100);

    // This engine's own usage is seen within one sweep, before Redis acknowledges it.
    here.add(5);
    near.flush_now().await.unwrap();
    assert_eq!(here.usage().used, 1_105);
    drop((here, there));
    assert!(near.shutdown().await.unwrap().is_complete());
    assert!(far.shutdown().await.unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_status_move_to_the_new_bucket_at_utc_midnight() {
    let keyspace = Keyspace::new(shared_redis(), "budget-midnight");
    let clock = ManualClock::at(A_MINUTE_TO_MIDNIGHT);
    let engine = engine(&keyspace, Budgets::per_bucket(50), Some(clock.clone())).await;
    let session = open_synced(&engine, "uid-9").await;
    session.add(60);
    engine.flush_now().await.unwrap();
    assert!(session.is_exhausted());
    let midnight = UNIX_EPOCH + Duration::from_secs(A_MINUTE_TO_MIDNIGHT + 60);
    assert_eq!(session.status().unwrap().resets_at, Some(midnight));

    clock.advance(120);
    engine.flush_now().await.unwrap();
    assert!(!session.is_exhausted(), "a new day, a new budget");
    let status = session.status().unwrap();
    assert_eq!((status.used, status.remaining), (0, 50));
    assert_eq!(
        status.resets_at,
        Some(midnight + Duration::from_secs(86_400))
    );
    session.add(7);
    engine.flush_now().await.unwrap();
    assert_eq!(session.usage().used, 7);
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    assert_eq!(
        redis.get_i64(&format!("{}:uid-9:20261129", keyspace.prefix())),
        Some(60)
    );
    assert_eq!(
        redis.get_i64(&format!("{}:uid-9:20261130", keyspace.prefix())),
        Some(7)
    );
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opens_while_redis_is_down_and_fails_open() {
    let mut redis = RedisServer::start();
    let sink = RedisSink::builder()
        .command_timeout(Duration::from_millis(300))
        .connect(&redis.url())
        .await
        .unwrap();
    redis.kill();
    let engine = Engine::builder()
        .keys(KeyScheme::daily_utc("down"))
        .budgets(Budgets::per_bucket(10))
        .write_timeout(Duration::from_millis(500))
        .shutdown_timeout(Duration::from_millis(500))
        .sink(sink)
        .build()
        .unwrap();
    let session = engine.open_session("uid-1").unwrap();
    assert!(session.synced(PATIENCE).await, "the failed read settles");
    assert_eq!(session.usage().global, None, "unknown, not zero");
    assert!(!session.is_exhausted(), "fail open");
    session.add(3);
    drop(session);
    let report = engine.shutdown().await.unwrap();
    assert_eq!(report.unwritten_amount(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_flush_interval_and_the_switch_reload_without_dropping_a_session() {
    let keyspace = Keyspace::new(shared_redis(), "budget-reload");
    let engine = engine(&keyspace, Budgets::unlimited(), None).await;
    let session = open_synced(&engine, "uid-3").await;
    session.add(40);
    engine.flush_now().await.unwrap();
    assert_eq!(session.status(), None, "no limit, no status");

    engine
        .set_budgets(Budgets::per_bucket(1_000).limit_for("uid-3", 40))
        .await
        .unwrap();
    assert!(session.is_exhausted(), "applied before set_budgets returns");
    engine
        .set_budgets(Budgets::per_bucket(10).lookup(|_| Some(41)))
        .await
        .unwrap();
    assert!(!session.is_exhausted());

    // A flush interval of 50 ms from now on: the session's next add arrives without flush_now.
    engine
        .set_flush_interval(Duration::from_millis(50))
        .await
        .unwrap();
    assert!(engine
        .set_flush_interval(Duration::from_millis(1))
        .await
        .is_err());
    session.add(1);
    tokio::time::timeout(PATIENCE, session.exhausted())
        .await
        .expect("flushed on the new interval");

    engine.set_enabled(false).await.unwrap();
    session.add(100);
    engine.set_enabled(true).await.unwrap();
    session.add(2);
    engine.flush_now().await.unwrap();
    assert_eq!(session.usage().used, 43, "usage while off is not charged");
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
}

/// A day of churn: many accounts each open one session and leave. What the read side keeps is
/// bounded by the accounts with a session, across the bucket boundary too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_side_forgets_accounts_without_sessions() {
    const ROUNDS: u64 = 40;
    const ACCOUNTS_PER_ROUND: u64 = 250;
    let clock = ManualClock::at(A_MINUTE_TO_MIDNIGHT + 60 - ROUNDS / 2 * 3);
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .keys(KeyScheme::daily_utc("churn"))
        .budgets(Budgets::per_bucket(1))
        .clock(clock.clone())
        .sink(sink.clone())
        .build()
        .unwrap();
    let regular = engine.open_session("regular").unwrap();
    let mut most_tracked = 0;
    for round in 0..ROUNDS {
        let sessions: Vec<_> = (0..ACCOUNTS_PER_ROUND)
            .map(|i| engine.open_session(&format!("u{round}-{i}")).unwrap())
            .collect();
        for session in &sessions {
            session.add(1);
        }
        drop(sessions);
        regular.add(1);
        clock.advance(3); // the boundary falls in the middle of the run
        engine.flush_now().await.unwrap();
        most_tracked = most_tracked.max(engine.stats().tracked_accounts);
    }
    engine.flush_now().await.unwrap();
    let stats = engine.stats();
    assert_eq!(stats.tracked_accounts, 1, "only the account with a session");
    assert!(
        most_tracked <= ACCOUNTS_PER_ROUND + 1,
        "at most one round's accounts at once, got {most_tracked}"
    );
    assert!(engine.usage("u0-0").is_none());
    assert_eq!(regular.usage().used, ROUNDS / 2, "today's part only");
    let written: i64 = sink.totals().values().sum();
    assert_eq!(written as u64, ROUNDS * (ACCOUNTS_PER_ROUND + 1));
    drop(regular);
    assert!(engine.shutdown().await.unwrap().is_complete());
}

/// Today's UTC date as `YYYYMMDD`, computed without the engine.
fn today() -> String {
    let output = std::process::Command::new("date")
        .args(["-u", "+%Y%m%d"])
        .output()
        .expect("date(1)");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}
