//! The engine's flusher against the in-process sink: scheduling, attribution, retries,
//! enable/disable and shutdown. Redis behaviour is tested against a real server in
//! `engine_redis.rs`; here the sink is `MemorySink`, sometimes behind a wrapper that fails.

mod support;

use shardmeter::sink::{Batch, BatchOutcome, Sink, SinkError};
use shardmeter::{Bucket, Clock, Engine, EngineError, KeyScheme, MemorySink, Ttl};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::load::add_random;
use support::rng::Rng;
use support::wait::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_threads_and_sessions_flush_exact_totals() {
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_millis(20))
        .session_end_delay(Duration::from_millis(5))
        .batch_size(7)
        .keys(KeyScheme::new("exact"))
        .sink(sink.clone())
        .build()
        .unwrap();

    let threads: Vec<_> = (0..4u64)
        .map(|thread| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                if thread % 2 == 0 {
                    shardmeter::register_worker_thread().unwrap();
                }
                let mut expected: HashMap<String, u64> = HashMap::new();
                let mut rng = Rng::new(thread);
                for round in 0..200u64 {
                    let account = format!("user-{}", (thread + round) % 13);
                    let session = engine.open_session(&account).unwrap();
                    let channels = [session.clone(), session];
                    let sum = add_random(&mut rng, &channels, 50, 0..40);
                    *expected.entry(account).or_default() += sum;
                }
                expected
            })
        })
        .collect();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for thread in threads {
        for (account, amount) in thread.join().unwrap() {
            *expected.entry(format!("exact:{account}")).or_default() += amount as i64;
        }
    }
    let report = engine.shutdown().await.unwrap();
    assert!(report.is_complete(), "{report:?}");
    expected.retain(|_, amount| *amount > 0);
    assert_eq!(sink.totals(), expected);
    let stats = engine.stats();
    assert_eq!(stats.sessions_ended, 800);
    assert_eq!(u128::from(stats.amount_written), report.amount_written);
    assert_eq!(stats.pending_amount, 0);
    for key in expected.keys() {
        assert!(sink.ttl(key).unwrap() > Duration::from_secs(29 * 86_400));
    }
    // The flusher's polls were timed: the CPU a poll used is within its wall-clock time.
    let (wall, cpu) = (
        stats.longest_flusher_poll_micros,
        stats.longest_flusher_poll_cpu_micros,
    );
    assert!(wall > 0, "no flusher poll was timed");
    if cfg!(unix) {
        assert!(0 < cpu && cpu <= wall, "CPU {cpu} us, wall-clock {wall} us");
    }
}

/// A sweep step collects many tracked accounts at once, and the flusher locates each record's
/// account on the read side one record ahead: every amount still lands under its own account's
/// key, and in its own account's view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_many_tracked_accounts_counts_each_amount_for_its_own_account() {
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .keys(KeyScheme::new("own"))
        .sink(sink.clone())
        .build()
        .unwrap();
    let mut sessions = Vec::new();
    for i in 0..64u64 {
        let session = engine.open_session(&format!("acct-{i}")).unwrap();
        assert!(
            session.synced(Duration::from_secs(10)).await,
            "acct-{i} tracked"
        );
        sessions.push(session);
    }
    for (i, session) in (0..).zip(&sessions) {
        session.add(100 + i);
    }
    engine.flush_now().await.unwrap();
    let expected: HashMap<String, i64> = (0..64)
        .map(|i| (format!("own:acct-{i}"), 100 + i))
        .collect();
    assert_eq!(sink.totals(), expected);
    for (i, session) in (0..).zip(&sessions) {
        assert_eq!(session.usage().used, 100 + i, "acct-{i}'s view");
    }
    drop(sessions);
    engine.shutdown().await.unwrap();
}

/// The shutdown cuts its round into batches itself: with batches larger than the flusher cuts
/// in one step and nothing cut before (no periodic flush ran), a shutdown that cut only when no
/// write was in flight built no batch and waited for its deadline, reporting everything
/// unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_writes_batches_larger_than_a_cut_step() {
    const ACCOUNTS: usize = 3_000;
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .batch_size(5_000)
        .shutdown_timeout(Duration::from_secs(10))
        .keys(KeyScheme::new("large"))
        .sink(sink.clone())
        .build()
        .unwrap();
    let sessions: Vec<_> = (0..ACCOUNTS)
        .map(|i| engine.open_session(&format!("user-{i}")).unwrap())
        .collect();
    sessions.iter().for_each(|session| session.add(3));
    let report = engine.shutdown().await.unwrap();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.keys_written, ACCOUNTS as u64);
    assert_eq!(sink.totals().len(), ACCOUNTS);
    assert_eq!(sink.totals()["large:user-2999"], 3);
}

#[tokio::test(start_paused = true)]
async fn an_ended_session_is_flushed_within_the_session_end_delay() {
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .session_end_delay(Duration::from_millis(50))
        .keys(KeyScheme::new("ended"))
        .sink(sink.clone())
        .build()
        .unwrap();
    let session = engine.open_session("u").unwrap();
    let channel = session.clone();
    session.add(20);
    channel.add(20);
    drop(session);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink.total("ended:u"),
        None,
        "a channel is still open: nothing ended yet"
    );
    drop(channel);
    let ended_at = tokio::time::Instant::now();
    eventually("the remainder", || sink.total("ended:u") == Some(40)).await;
    // Paused time only moves when every task waits, so this measures the flusher's schedule.
    assert!(
        ended_at.elapsed() < Duration::from_secs(1),
        "flushed by the interval, not the end"
    );
    assert_eq!(engine.stats().flushes, 1);

    engine.record("offline", 45 * 60 * 1000).unwrap();
    eventually("the one-shot record", || {
        sink.total("ended:offline") == Some(2_700_000)
    })
    .await;
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test]
async fn zero_amounts_and_idle_engines_write_nothing() {
    let sink = CountingSink::default();
    let engine = Engine::builder().sink(sink.clone()).build().unwrap();
    let session = engine.open_session("u").unwrap();
    session.add(0);
    drop(session);
    engine.flush_now().await.unwrap();
    assert!(engine.shutdown().await.unwrap().is_complete());
    assert_eq!(sink.calls(), 0);
}

#[tokio::test]
async fn switching_off_keeps_what_was_recorded_and_records_nothing_after() {
    let sink = CountingSink::default();
    let engine = Engine::builder()
        .keys(KeyScheme::new("switch"))
        .sink(sink.clone())
        .build()
        .unwrap();
    let session = engine.open_session("u").unwrap();
    session.add(30);
    engine.set_enabled(false).await.unwrap();
    assert!(!engine.is_enabled());
    session.add(1000);
    engine.flush_now().await.unwrap();
    assert_eq!(
        sink.memory.total("switch:u"),
        Some(30),
        "recorded before the switch: written"
    );
    let calls_while_off = sink.calls();
    session.add(1000);
    engine.flush_now().await.unwrap();
    assert_eq!(sink.calls(), calls_while_off, "no sink call while off");
    engine.set_enabled(true).await.unwrap();
    session.add(5);
    drop(session);
    let report = engine.shutdown().await.unwrap();
    assert!(report.is_complete());
    assert_eq!(sink.memory.total("switch:u"), Some(35));
    assert_eq!(engine.stats().amount_discarded, 2000);

    let sink = CountingSink::default();
    let engine = Engine::builder()
        .enabled(false)
        .sink(sink.clone())
        .build()
        .unwrap();
    engine.open_session("u").unwrap().add(10);
    engine.record("v", 10).unwrap();
    assert!(engine.shutdown().await.unwrap().is_complete());
    assert_eq!(sink.calls(), 0, "a disabled engine never calls its sink");
}

/// A clock that reads tokio's (paused) clock, started at a chosen wall time.
struct TokioClock {
    wall: SystemTime,
    start: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

#[tokio::test(start_paused = true)]
async fn usage_lands_in_the_utc_day_it_was_added_in() {
    // 2026-11-29T23:59:58Z.
    let before_midnight = UNIX_EPOCH + Duration::from_secs(1_795_996_798);
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(60))
        .keys(KeyScheme::daily_utc("fair_use:dg_budget"))
        .clock(TokioClock {
            wall: before_midnight,
            start: tokio::time::Instant::now(),
        })
        .sink(sink.clone())
        .build()
        .unwrap();
    let session = engine.open_session("uid-42").unwrap();
    session.add(100); // 23:59:58
    tokio::time::sleep(Duration::from_millis(2500)).await; // 00:00:00.5, past the boundary
    session.add(7);
    // The periodic flush would only come at 00:00:58: the boundary sweep already split the day.
    engine.flush_now().await.unwrap();
    assert_eq!(sink.total("fair_use:dg_budget:uid-42:20261129"), Some(100));
    assert_eq!(sink.total("fair_use:dg_budget:uid-42:20261130"), Some(7));
    // Yesterday's key lives until an hour after its midnight, which is about now + 1 h.
    let ttl = sink.ttl("fair_use:dg_budget:uid-42:20261129").unwrap();
    assert!(
        ttl <= Duration::from_secs(3600) && ttl > Duration::from_secs(3500),
        "{ttl:?}"
    );
    assert!(engine.shutdown().await.unwrap().is_complete());
}

#[tokio::test(start_paused = true)]
async fn hourly_buckets_split_at_every_boundary() {
    let start = UNIX_EPOCH + Duration::from_secs(3600 * 1000 - 10);
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(86_400))
        .keys(
            KeyScheme::new("h")
                .bucket(Bucket::Every(Duration::from_secs(3600)))
                .ttl(Ttl::Fixed(Duration::from_secs(60))),
        )
        .clock(TokioClock {
            wall: start,
            start: tokio::time::Instant::now(),
        })
        .sink(sink.clone())
        .build()
        .unwrap();
    let session = engine.open_session("u").unwrap();
    for hour in 0..3u64 {
        session.add(hour + 1);
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    drop(session);
    assert!(engine.shutdown().await.unwrap().is_complete());
    let totals = sink.totals();
    assert_eq!(totals.get("h:u:3596400"), Some(&1));
    assert_eq!(totals.get("h:u:3600000"), Some(&2));
    assert_eq!(totals.get("h:u:3603600"), Some(&3));
}

/// A sink that counts calls and forwards to a `MemorySink`.
#[derive(Clone, Default)]
struct CountingSink {
    memory: MemorySink,
    calls: Arc<AtomicUsize>,
}

impl CountingSink {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Sink for CountingSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.memory.write(batches).await
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        self.memory.read_totals(keys).await
    }
}

/// A sink whose writes fail while `failing` is set. With `apply_then_fail`, a failing write is
/// applied first and then reported as lost (a reply lost on the way back).
#[derive(Clone, Default)]
struct FlakySink {
    memory: MemorySink,
    failing: Arc<std::sync::atomic::AtomicBool>,
    apply_then_fail: bool,
    writes: Arc<AtomicUsize>,
}

impl Sink for FlakySink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if !self.failing.load(Ordering::SeqCst) {
            return self.memory.write(batches).await;
        }
        // Applied and then the reply lost: the outcome is unknown to the engine. Otherwise the
        // sink is down and nothing was sent.
        let error = if self.apply_then_fail {
            self.memory.write(batches).await;
            SinkError::Unavailable("connection reset after the write".into())
        } else {
            SinkError::NotSent("connection refused".into())
        };
        batches.iter().map(|_| Err(error.clone())).collect()
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(SinkError::NotSent("connection refused".into()));
        }
        self.memory.read_totals(keys).await
    }
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_retried_with_the_same_ids_and_nothing_doubles() {
    for apply_then_fail in [false, true] {
        let sink = FlakySink {
            apply_then_fail,
            ..FlakySink::default()
        };
        sink.failing.store(true, Ordering::SeqCst);
        let engine = Engine::builder()
            .flush_interval(Duration::from_millis(100))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(200))
            .batch_size(3)
            .keys(KeyScheme::new("flaky"))
            .sink(sink.clone())
            .build()
            .unwrap();
        let sessions: Vec<_> = (0..10)
            .map(|i| engine.open_session(&format!("u{i}")).unwrap())
            .collect();
        for _ in 0..50 {
            for session in &sessions {
                session.add(3);
            }
            tokio::time::sleep(Duration::from_millis(37)).await;
        }
        let err = engine.flush_now().await.unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Sink(SinkError::Unavailable(_) | SinkError::NotSent(_))
            ),
            "{err}"
        );
        let stats = engine.stats();
        assert!(stats.write_failures >= 5 && stats.retries >= 5, "{stats:?}");
        assert_eq!(stats.pending_amount, 1500, "nothing lost while failing");
        assert_eq!(
            stats.pending_keys, 20,
            "pending memory is per key and stage (10 in flight, 10 waiting again), not per flush"
        );

        sink.failing.store(false, Ordering::SeqCst);
        engine.flush_now().await.unwrap();
        drop(sessions);
        assert!(engine.shutdown().await.unwrap().is_complete());
        let totals = sink.memory.totals();
        assert_eq!(totals.len(), 10);
        assert!(
            totals.values().all(|&total| total == 150),
            "{totals:?} apply_then_fail={apply_then_fail}"
        );
        if apply_then_fail {
            assert!(engine.stats().duplicate_batches > 0);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_reports_exactly_what_could_not_be_written() {
    let sink = FlakySink::default();
    sink.failing.store(true, Ordering::SeqCst);
    let engine = Engine::builder()
        .keys(KeyScheme::new("down"))
        .shutdown_timeout(Duration::from_secs(2))
        .sink(sink.clone())
        .build()
        .unwrap();
    let a = engine.open_session("a").unwrap();
    let b = engine.open_session("b").unwrap();
    a.add(11);
    b.add(22);
    b.add(u64::MAX - 10); // 12 over: the cell saturates at u64::MAX
    drop(a);
    let report = engine.shutdown().await.unwrap();
    assert_eq!(
        report.unwritten,
        vec![
            ("down:a".to_string(), 11),
            ("down:b".to_string(), u128::from(u64::MAX))
        ]
    );
    assert_eq!(report.amount_written, 0);
    assert_eq!(engine.stats().saturated_amount, 12);
    assert!(matches!(
        engine.open_session("c"),
        Err(EngineError::ShutDown)
    ));
    assert!(matches!(
        engine.shutdown().await,
        Err(EngineError::ShutDown)
    ));
    assert!(
        sink.writes.load(Ordering::SeqCst) > 1,
        "shutdown retried before giving up"
    );
    assert!(report.in_doubt.is_empty(), "nothing was sent");
}

/// Records 11 for `a` and 22 for `b` on an engine over `sink` (keys `<prefix>:a` and `:b`), shuts
/// it down with 1 s to write them (a write alone may take 60 s), and checks that the sink, which
/// applied both, has them in doubt in the report and none unwritten: replaying an applied
/// amount would count it twice.
async fn shut_down_with_two_amounts_in_doubt<S: Sink + Clone>(sink: S, prefix: &str) {
    let engine = Engine::builder()
        .keys(KeyScheme::new(prefix))
        .write_timeout(Duration::from_secs(60))
        .shutdown_timeout(Duration::from_secs(1))
        .sink(sink)
        .build()
        .unwrap();
    engine.record("a", 11).unwrap();
    engine.record("b", 22).unwrap();
    let report = engine.shutdown().await.unwrap();
    assert_eq!(report.unwritten, vec![], "every batch reached the sink");
    assert!(!report.is_complete());
    let mut in_doubt: Vec<_> = report
        .in_doubt
        .iter()
        .flat_map(|batch| &batch.increments)
        .map(|increment| (increment.key.to_string(), increment.amount))
        .collect();
    in_doubt.sort();
    let key = |account: &str| format!("{prefix}:{account}");
    assert_eq!(in_doubt, [(key("a"), 11), (key("b"), 22)]);
}

/// Batches whose replies were lost are in doubt, not unwritten.
#[tokio::test(start_paused = true)]
async fn shutdown_lists_batches_with_lost_replies_as_in_doubt() {
    let sink = FlakySink {
        apply_then_fail: true,
        ..FlakySink::default()
    };
    sink.failing.store(true, Ordering::SeqCst);
    shut_down_with_two_amounts_in_doubt(sink.clone(), "lost").await;
    assert_eq!(sink.memory.total("lost:a"), Some(11), "applied");
}

/// Applies every write, then never answers: a reply lost on a connection that stays up.
#[derive(Clone, Default)]
struct SilentSink {
    memory: MemorySink,
}

impl Sink for SilentSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        self.memory.write(batches).await;
        std::future::pending().await
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        self.memory.read_totals(keys).await
    }
}

/// The deadline passes while the first attempt of a write is still unanswered (its timeout is
/// longer than the shutdown's): its batches went to the sink, which may have applied them, so
/// they are in doubt, not "unwritten" (safe to replay).
#[tokio::test(start_paused = true)]
async fn a_write_unanswered_at_the_deadline_is_in_doubt() {
    let sink = SilentSink::default();
    shut_down_with_two_amounts_in_doubt(sink.clone(), "silent").await;
    assert_eq!(sink.memory.total("silent:a"), Some(11), "applied");
}

#[tokio::test]
async fn bad_configuration_is_a_typed_error() {
    let build = |builder: shardmeter::EngineBuilder<MemorySink>| builder.build().unwrap_err();
    let base = || Engine::builder().sink(MemorySink::new());
    let errors = [
        build(base().flush_interval(Duration::ZERO)),
        build(base().flush_interval(Duration::from_secs(86_401))),
        build(base().batch_size(0)),
        build(base().write_timeout(Duration::ZERO)),
        build(base().session_end_delay(Duration::from_secs(120))),
        build(base().retry_backoff(Duration::from_secs(2), Duration::from_secs(1))),
        build(base().retry_backoff(Duration::from_secs(1), Duration::from_secs(3601))),
        build(base().capacity(0)),
        build(base().keys(KeyScheme::new("p").ttl(Ttl::Fixed(Duration::ZERO)))),
        build(base().keys(KeyScheme::new(""))),
    ];
    for error in &errors {
        assert!(
            matches!(
                error,
                EngineError::InvalidConfig(_) | EngineError::KeyScheme(_) | EngineError::Ledger(_)
            ),
            "{error}"
        );
        assert!(!error.to_string().is_empty());
    }
    let engine = base().capacity(1).build().unwrap();
    let _held = engine.open_session("a").unwrap();
    assert!(matches!(
        engine.open_session("b"),
        Err(EngineError::Ledger(shardmeter::LedgerError::Full {
            capacity: 1
        }))
    ));
    assert!(matches!(
        engine.open_session(""),
        Err(EngineError::Ledger(shardmeter::LedgerError::EmptyAccount))
    ));
    let too_long = "x".repeat(shardmeter::ledger::MAX_ACCOUNT_BYTES + 1);
    assert!(matches!(
        engine.open_session(&too_long),
        Err(EngineError::Ledger(shardmeter::LedgerError::AccountTooLong { len, max }))
            if len == too_long.len() && max == shardmeter::ledger::MAX_ACCOUNT_BYTES
    ));
}

#[test]
fn building_outside_a_runtime_is_a_typed_error() {
    let error = Engine::builder()
        .sink(MemorySink::new())
        .build()
        .unwrap_err();
    assert!(matches!(error, EngineError::NoRuntime), "{error}");
}

/// An engine dropped without `shutdown()` says so at `ERROR`, on the dropping thread, with what is
/// at risk: the usual `#[tokio::main]` ends the runtime right after, and its flusher never runs.
#[test]
fn dropping_the_engine_without_shutdown_is_logged_as_an_error() {
    // The drop logs on this thread; the global capture would also take other tests' lines.
    let (logs, _capture) =
        support::logs::this_thread_logs(tracing::Level::WARN, support::logs::FmtSpan::NONE);
    let runtime = support::current_thread_runtime();
    let _entered = runtime.enter();
    let engine = Engine::builder()
        .keys(KeyScheme::new("dropped"))
        .sink(MemorySink::new())
        .build()
        .unwrap();
    let session = engine.open_session("uid-dropped").unwrap();
    session.add(5);
    drop(engine);
    let text = logs.text();
    assert!(
        text.contains("Engine dropped without `shutdown().await`")
            && text.contains("slots_in_use=1"),
        "{text}"
    );
    // The documented recipe: shut down before the runtime ends, and nothing is said.
    let engine = Engine::builder()
        .keys(KeyScheme::new("kept"))
        .sink(MemorySink::new())
        .build()
        .unwrap();
    runtime.block_on(engine.shutdown()).unwrap();
    let before = logs.text().len();
    drop(engine);
    assert_eq!(logs.text().len(), before, "{}", logs.text());
}

/// A sink that refuses every write as misconfigured while `refusing` is set.
#[derive(Clone, Default)]
struct MisconfiguredSink {
    memory: MemorySink,
    refusing: Arc<AtomicBool>,
    writes: Arc<AtomicUsize>,
}

impl Sink for MisconfiguredSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if !self.refusing.load(Ordering::SeqCst) {
            return self.memory.write(batches).await;
        }
        let error = SinkError::Misconfigured("database 99 does not exist".into());
        batches.iter().map(|_| Err(error.clone())).collect()
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        self.memory.read_totals(keys).await
    }
}

/// A configuration error is not retried like an outage (10 ms, 20 ms, 40 ms...) but at the
/// longest backoff; it is counted and shown in the stats until a write succeeds, and nothing
/// is lost meanwhile.
#[tokio::test(start_paused = true)]
async fn a_misconfigured_sink_is_retried_at_the_longest_backoff_and_shown_in_the_stats() {
    let sink = MisconfiguredSink::default();
    sink.refusing.store(true, Ordering::SeqCst);
    let engine = Engine::builder()
        .retry_backoff(Duration::from_millis(10), Duration::from_secs(1))
        .keys(KeyScheme::new("misconfigured"))
        .sink(sink.clone())
        .build()
        .unwrap();
    engine.record("u", 5).unwrap();
    let error = engine.flush_now().await.unwrap_err();
    assert!(
        matches!(&error, EngineError::Sink(SinkError::Misconfigured(m)) if m.contains("99")),
        "{error}"
    );
    let writes = || sink.writes.load(Ordering::SeqCst);
    assert_eq!(writes(), 1);
    let stats = engine.stats();
    assert_eq!((stats.write_failures, stats.config_errors), (1, 1));
    assert_eq!(stats.pending_amount, 5);
    assert_eq!(
        stats.last_write_error.as_deref(),
        Some("sink misconfigured, nothing applied until it is fixed: database 99 does not exist")
    );

    // The retry comes in the upper half of the longest backoff: not before 500 ms, by 1 s.
    tokio::time::sleep(Duration::from_millis(490)).await;
    assert_eq!(writes(), 1, "retried like an outage");
    tokio::time::sleep(Duration::from_millis(520)).await;
    assert_eq!(writes(), 2);
    assert_eq!(engine.stats().config_errors, 2);

    sink.refusing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_010)).await;
    assert_eq!(writes(), 3);
    let stats = engine.stats();
    assert_eq!((stats.pending_amount, stats.amount_written), (0, 5));
    assert_eq!(stats.last_write_error, None);
    assert_eq!(stats.config_errors, 2);
    assert!(engine.shutdown().await.unwrap().is_complete());
    assert_eq!(sink.memory.total("misconfigured:u"), Some(5));
}

/// Two `set_enabled` calls race: the flusher applies them one after the other, and it alone
/// publishes the state, so `is_enabled` ends as the state it applied last (seen here from what
/// it does: is new usage written or discarded?).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_set_enabled_calls_end_with_the_state_applied_last() {
    let sink = MemorySink::new();
    let engine = Engine::builder()
        .keys(KeyScheme::new("race"))
        .capacity(64)
        .sink(sink.clone())
        .build()
        .unwrap();
    let mut outcomes = [0; 2];
    for round in 0..300 {
        // Spawned in alternating order, so that each side sometimes comes last.
        let states = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let calls = states.map(|enabled| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.set_enabled(enabled).await })
        });
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let account = format!("u{round}");
        engine.record(&account, 1).unwrap();
        engine.flush_now().await.unwrap();
        let applied_last = sink.total(&format!("race:{account}")).is_some();
        assert_eq!(engine.is_enabled(), applied_last, "round {round}");
        outcomes[usize::from(applied_last)] += 1;
    }
    // Both orders happened, or the race was not exercised.
    assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
    engine.shutdown().await.unwrap();
}

/// Each write round and each full sweep runs in a span with what an operator needs to tell
/// them apart (round number, retry, batches, keys, amount; slots swept).
#[tokio::test]
async fn write_rounds_and_sweeps_run_in_spans() {
    // This runtime has one thread, so the flusher task runs where this subscriber is set.
    let (logs, _capture) =
        support::logs::this_thread_logs(tracing::Level::INFO, support::logs::FmtSpan::CLOSE);
    let engine = Engine::builder()
        .keys(KeyScheme::new("spans"))
        .capacity(64)
        .batch_size(1)
        .sink(MemorySink::new())
        .build()
        .unwrap();
    engine.record("a", 3).unwrap();
    engine.record("b", 4).unwrap();
    engine.flush_now().await.unwrap();
    engine.shutdown().await.unwrap();
    let text = logs.text();
    assert!(
        text.contains("flush_write{write=1 retry=false batches=2 keys=2 amount=7}: "),
        "{text}"
    );
    assert!(text.contains("sweep{slots=64}: "), "{text}");
}
