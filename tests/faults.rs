//! The engine under faults, end to end: a real [`Engine`] flushing through a [`RedisSink`] to
//! `redis-server` processes the tests start on free ports (killed, restarted, paused), with the
//! fault-injecting [`Proxy`] in between for lost replies and network cuts. No mocks for Redis.
//!
//! The fault scenarios and the soak run several threads that add continuously to many sessions (some threads
//! registered as workers, some not; sessions ending and new ones starting; clones as channels,
//! some shared across threads; one-shot `record`s), keeps its own exact total per account, and
//! at the end checks that Redis holds exactly those totals under exactly the expected keys, each
//! with a TTL: no loss, no double count. Where Redis kept its command statistics, it also checks
//! that `INCRBY` ran exactly once per acknowledged increment.
//!
//! - lost replies (random and in bursts), SIGKILL and restart with an fsynced AOF, SIGSTOP past
//!   the command timeout: totals exact;
//! - shutdown while Redis is killed or the network is cut: the report's `unwritten` is exact;
//! - regressions: a shutdown after or during an outage still writes whatever backoff was
//!   scheduled; `flush_now` returns under steady churn with a slow Redis;
//! - bad input: a key holding text, odd account ids, amounts near `u64::MAX`;
//! - `soak`: all of the faults at random for `SHARDMETER_SOAK_SECS` seconds (default 30), seeded
//!   (the seed is printed; replay with `SHARDMETER_SOAK_SEED`).
//!
//! No test asserts a wall-clock duration; every wait has a deadline, and every test body runs
//! under an overall time limit.

mod support;

use fred::prelude::ClientLike;
use shardmeter::sink::redis::RedisSink;
use shardmeter::{Engine, KeyScheme, Session, ShutdownReport, StatsSnapshot, Ttl};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::load::add_random;
use support::rng::Rng;
use support::{Proxy, RedisServer, RespClient};

/// Prefix of the engine's keys: `fault:{<escaped account>}`.
const PREFIX: &str = "fault";
/// Prefix of the sink's batch markers (not matched by `fault:*`).
const MARKERS: &str = "fault-batch";
/// TTL of every counter key.
const KEY_TTL_SECS: i64 = 3600;
/// The sink's per-command timeout: short, so pauses and lost replies resolve quickly.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);
/// Overall limit of one non-soak test body.
const TEST_LIMIT: Duration = Duration::from_secs(120);
/// Shutdown deadline when Redis is healthy: generous, it is only reached if something is wrong.
const HEALTHY_SHUTDOWN: Duration = Duration::from_secs(30);
/// `redis-server` arguments for a server that keeps what it acknowledged across a SIGKILL.
const DURABLE: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs a test body with an overall deadline, so a hang fails the test instead of CI.
async fn within<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"))
}

/// The key the engine writes `account` to, computed independently of the engine: the account id
/// exactly as given after the prefix (`docs/operations.md`, *Keys*).
fn key_of(account: &str) -> String {
    format!("{PREFIX}:{account}")
}

/// A sink with short timeouts writing to `url`, markers under [`MARKERS`].
async fn sink(url: &str) -> RedisSink {
    RedisSink::builder()
        .marker_prefix(MARKERS)
        .dedup_window(Duration::from_secs(900))
        .command_timeout(COMMAND_TIMEOUT)
        .connect(url)
        .await
        .expect("connect the sink")
}

/// An engine flushing every 50 ms in small batches (so a round pipelines several `EVALSHA`s),
/// with short timeouts and backoff.
fn engine(sink: RedisSink, shutdown_timeout: Duration) -> Engine {
    Engine::builder()
        .flush_interval(Duration::from_millis(50))
        .session_end_delay(Duration::from_millis(10))
        .batch_size(8)
        .write_timeout(Duration::from_secs(1))
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .shutdown_timeout(shutdown_timeout)
        .worker_shards(16)
        .keys(KeyScheme::new(PREFIX).ttl(Ttl::Fixed(Duration::from_secs(KEY_TTL_SECS as u64))))
        .sink(sink)
        .build()
        .expect("build the engine")
}

/// `acct-0` .. `acct-{n-1}` plus ids that need escaping.
fn accounts(n: usize) -> Vec<String> {
    let mut accounts: Vec<String> = (0..n).map(|i| format!("acct-{i}")).collect();
    accounts.extend(
        [
            "user one",
            "line\nbreak",
            "{tag}",
            "}{",
            "a:b",
            "é-ü",
            "%41",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    accounts
}

/// Per-key totals from per-account totals (accounts with nothing added are left out).
fn per_key(accounts: &[String], amounts: &[u128]) -> BTreeMap<String, u128> {
    let mut keys = BTreeMap::new();
    for (account, amount) in accounts.iter().zip(amounts) {
        if *amount > 0 {
            *keys.entry(key_of(account)).or_default() += *amount;
        }
    }
    keys
}

/// Checks that the Redis at `addr` holds exactly `expected` under `fault:*`: the same keys, each
/// with its exact total and a TTL between 1 s and [`KEY_TTL_SECS`].
fn assert_redis_holds(addr: SocketAddr, expected: &BTreeMap<String, u128>) {
    let mut redis = RespClient::connect(addr).expect("connect to check Redis");
    let found: BTreeSet<String> = redis.scan(&format!("{PREFIX}:*")).into_iter().collect();
    let wanted: BTreeSet<String> = expected.keys().cloned().collect();
    assert_eq!(
        found.difference(&wanted).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "keys in Redis that nothing was added to"
    );
    assert_eq!(
        wanted.difference(&found).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "keys missing in Redis"
    );
    let mut wrong = Vec::new();
    for (key, amount) in expected {
        let value = redis.get(key);
        let ttl = redis.ttl(key);
        if value.as_deref() != Some(amount.to_string().as_str())
            || !(1..=KEY_TTL_SECS).contains(&ttl)
        {
            wrong.push(format!(
                "{key:?}: expected {amount}, Redis has {value:?} (ttl {ttl})"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} keys wrong:\n{}",
        wrong.len(),
        expected.len(),
        wrong.join("\n")
    );
}

/// The closing check: Redis holds exactly what `tally` added to `accounts` (see
/// [`assert_redis_holds`]), and the shutdown report counts exactly that amount as written.
fn assert_written_exactly(
    addr: SocketAddr,
    accounts: &[String],
    tally: &Tally,
    report: &ShutdownReport,
) {
    let expected = per_key(accounts, &tally.amounts);
    assert_redis_holds(addr, &expected);
    assert_eq!(report.amount_written, expected.values().sum::<u128>());
}

/// Shuts the engine down and checks that everything was written.
async fn shutdown_complete(engine: &Engine) -> ShutdownReport {
    let report = engine.shutdown().await.expect("shutdown");
    assert!(
        report.is_complete(),
        "shutdown with a healthy Redis left something: unwritten {:?}, in doubt {:?}, \
         rejected {:?}",
        report.unwritten,
        report.in_doubt,
        report.rejected
    );
    report
}

/// `INCRBY` ran exactly once per increment the engine saw acknowledged: not one ran twice, not
/// even one whose reply was lost. Valid for a server that never restarted.
fn assert_incrby_once_per_increment(server: &RedisServer, stats: &StatsSnapshot) {
    let incrby = server.commandstats().get("incrby");
    assert_eq!(
        incrby.calls, stats.keys_written,
        "INCRBY executions vs increments acknowledged ({stats:?})"
    );
    assert_eq!(incrby.failed_calls, 0);
}

/// `EVALSHA` executions in Redis (not counting `NOSCRIPT` answers).
fn scripts_run(server: &RedisServer) -> u64 {
    let evalsha = server.commandstats().get("evalsha");
    evalsha.calls - evalsha.failed_calls
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

/// What one adder thread did.
#[derive(Debug, Default)]
struct Tally {
    /// Per account index, everything added.
    amounts: Vec<u128>,
    /// `add` and `record` calls.
    adds: u64,
    /// Sessions opened (including `record`s).
    sessions: u64,
}

impl Tally {
    fn new(accounts: usize) -> Self {
        Self {
            amounts: vec![0; accounts],
            ..Self::default()
        }
    }

    fn add(&mut self, account: usize, amount: u64) {
        self.added(account, amount, 1);
    }

    /// `adds` calls that added `sum` to `account` in all.
    fn added(&mut self, account: usize, sum: u64, adds: u64) {
        self.amounts[account] += u128::from(sum);
        self.adds += adds;
    }

    fn merge(&mut self, other: &Tally) {
        for (total, amount) in self.amounts.iter_mut().zip(&other.amounts) {
            *total += amount;
        }
        self.adds += other.adds;
        self.sessions += other.sessions;
    }
}

/// Sessions that several threads use at once (one session, many channels).
type SharedSessions = Arc<Mutex<Vec<(usize, Session)>>>;

/// Threads adding continuously to sessions of `accounts` until stopped.
struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
    shared: SharedSessions,
    accounts: usize,
}

impl Workload {
    /// Starts `threads` adders; even-numbered ones register as worker threads.
    fn start(engine: &Engine, accounts: &[String], threads: usize, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let shared: SharedSessions = Arc::new(Mutex::new(Vec::new()));
        let accounts_arc: Arc<Vec<String>> = Arc::new(accounts.to_vec());
        let threads = (0..threads)
            .map(|index| {
                let engine = engine.clone();
                let stop = stop.clone();
                let shared = shared.clone();
                let accounts = accounts_arc.clone();
                let rng = Rng::new(seed ^ (index as u64).wrapping_mul(0x9e37_79b9));
                std::thread::Builder::new()
                    .name(format!("adder-{index}"))
                    .spawn(move || adder(engine, &accounts, index % 2 == 0, rng, &stop, &shared))
                    .expect("spawn an adder")
            })
            .collect();
        Self {
            stop,
            threads,
            shared,
            accounts: accounts.len(),
        }
    }

    /// Stops the adders and returns what they added. Sessions shared between threads stay
    /// open unless `end_shared`; an open session is swept by the engine's shutdown.
    async fn stop(mut self, end_shared: bool) -> (Tally, Vec<(usize, Session)>) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut self.threads);
        let accounts = self.accounts;
        let tally = tokio::task::spawn_blocking(move || {
            let mut total = Tally::new(accounts);
            for thread in threads {
                total.merge(&thread.join().expect("an adder panicked"));
            }
            total
        })
        .await
        .expect("join the adders");
        let open = std::mem::take(&mut *self.shared.lock().unwrap());
        if end_shared {
            drop(open);
            (tally, Vec::new())
        } else {
            (tally, open)
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // A failed test must not leave adders running.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One adder: short sessions with two channels, long-lived sessions it holds, channels of
/// sessions shared with other threads, and one-shot records.
fn adder(
    engine: Engine,
    accounts: &[String],
    register: bool,
    mut rng: Rng,
    stop: &AtomicBool,
    shared: &Mutex<Vec<(usize, Session)>>,
) -> Tally {
    if register {
        // Best effort: with many workers registered process-wide this thread falls back to the
        // striped shards, which is also worth exercising.
        let _ = shardmeter::register_worker_thread();
    }
    let n = accounts.len() as u64;
    let mut tally = Tally::new(accounts.len());
    let mut held: Vec<(usize, Session)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match rng.below(20) {
            // A short session on two channels, ended at once.
            0..=9 => {
                let account = rng.below(n) as usize;
                let session = engine.open_session(&accounts[account]).expect("open");
                tally.sessions += 1;
                let adds = rng.below(30) + 1;
                let sum = add_random(&mut rng, &[session.clone(), session], adds, 0..64);
                tally.added(account, sum, adds);
            }
            // Long-lived sessions: open one, add to one, or end one.
            10..=14 => {
                if held.len() < 4 && rng.below(3) == 0 {
                    let account = rng.below(n) as usize;
                    held.push((
                        account,
                        engine.open_session(&accounts[account]).expect("open"),
                    ));
                    tally.sessions += 1;
                } else if !held.is_empty() {
                    let i = rng.below(held.len() as u64) as usize;
                    let (account, session) = &held[i];
                    let adds = rng.below(20) + 1;
                    let sum = add_random(&mut rng, std::slice::from_ref(session), adds, 1..41);
                    tally.added(*account, sum, adds);
                    if rng.below(8) == 0 {
                        held.swap_remove(i);
                    }
                }
            }
            // A channel of a session other threads also add to.
            15..=17 => {
                let channel = {
                    let mut pool = shared.lock().unwrap();
                    if pool.len() < 4 {
                        let account = rng.below(n) as usize;
                        let session = engine.open_session(&accounts[account]).expect("open");
                        tally.sessions += 1;
                        pool.push((account, session));
                    }
                    let i = rng.below(pool.len() as u64) as usize;
                    let channel = (pool[i].0, pool[i].1.clone());
                    if rng.below(10) == 0 {
                        // The session ends once every thread has dropped its channel.
                        pool.swap_remove(i);
                    }
                    channel
                };
                let adds = rng.below(20) + 1;
                let sum = add_random(&mut rng, &[channel.1], adds, 0..50);
                tally.added(channel.0, sum, adds);
            }
            // An offline upload: one large amount without a streaming session.
            _ => {
                let account = rng.below(n) as usize;
                let amount = 1 + rng.below(2_700_000);
                engine.record(&accounts[account], amount).expect("record");
                tally.add(account, amount);
                tally.sessions += 1;
            }
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    tally
}

/// Lets the workload run for `duration` (the engine keeps flushing meanwhile).
async fn run_for(duration: Duration) {
    tokio::time::sleep(duration).await;
}

/// Restarts a killed [`DURABLE`] server, then rewrites its AOF from memory.
///
/// Without the rewrite, Redis 7.0 itself can count twice after two kills in a row: a kill that
/// cuts a script's `MULTI`/`EXEC` block in the AOF short leaves a dangling `MULTI` there (see
/// `RedisServer::rewrite_aof`); the engine then rightly retries that batch, which the restart
/// did not load, and the next restart replays the cut block's first increments a second time
/// along with the retry. Seen here with 7.0.15 (one batch's leading keys over by exactly their
/// increments, and "MULTI calls can not be nested" in Redis' log). No client can prevent it; the
/// rewrite is the operator's remedy (`docs/operations.md`) and does not change the data, so a
/// double count of the engine's own would still show.
fn restart_durable(server: &mut RedisServer) {
    tokio::task::block_in_place(|| {
        server.restart();
        server.rewrite_aof();
    });
}

/// Kills Redis (SIGKILL) `delay` after the engine starts a write round, so that the kill lands
/// while its `EVALSHA`s are in flight: not yet read, running, or run and fsynced but not yet
/// answered (the later the kill, the likelier the last). If no round starts within a second,
/// kills anyway. Returns whether a round had just started.
async fn kill_mid_flush(engine: &Engine, server: &mut RedisServer, delay: Duration) -> bool {
    let rounds = engine.stats().flushes;
    let give_up = Instant::now() + Duration::from_secs(1);
    let mut caught = false;
    while Instant::now() < give_up {
        if engine.stats().flushes > rounds {
            caught = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    if caught {
        // Spinning: a timer would be far coarser than the window aimed at.
        let until = Instant::now() + delay;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
    server.kill();
    caught
}

// ---------------------------------------------------------------------------------------------
// 1. Lost replies
// ---------------------------------------------------------------------------------------------

/// The proxy lets Redis run an `EVALSHA` and then cuts the connection before the reply: fred
/// re-sends it or the flusher retries it, and the marker makes the second run a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_never_change_the_totals() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr()).await;
        let engine = engine(sink(&proxy.url()).await, HEALTHY_SHUTDOWN);
        let accounts = accounts(40);
        let workload = Workload::start(&engine, &accounts, 4, 0x1057);

        // Random losses, then bursts that also hit fred's own re-send.
        proxy.lose_replies_randomly("EVALSHA", 0.25, 0x1057_5eed);
        run_for(Duration::from_millis(2000)).await;
        for _ in 0..3 {
            proxy.lose_replies_to("EVALSHA", 3);
            run_for(Duration::from_millis(400)).await;
        }
        proxy.clear_faults();
        run_for(Duration::from_millis(200)).await;

        let (tally, _open) = workload.stop(false).await;
        let report = shutdown_complete(&engine).await;
        let stats = engine.stats();
        eprintln!(
            "lost replies: {} faults, {} adds; {stats:?}",
            proxy.faults_fired(),
            tally.adds
        );

        assert!(
            proxy.faults_fired() > 0,
            "no reply was lost: the test proved nothing"
        );
        assert!(
            stats.duplicate_batches + stats.write_failures > 0,
            "the engine never noticed a lost reply: {stats:?}"
        );
        assert_written_exactly(server.addr(), &accounts, &tally, &report);
        assert_incrby_once_per_increment(&server, &stats);
        assert!(
            scripts_run(&server) > stats.batches_written,
            "no script ran twice: the lost replies were not exercised"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. SIGKILL and restart
// ---------------------------------------------------------------------------------------------

/// Redis is killed (SIGKILL) at random moments while flushes run, and restarted on its fsynced
/// AOF, four times, while adds continue throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_mid_flush_keeps_totals_exact() {
    within(TEST_LIMIT, async {
        let mut server = RedisServer::start_with(DURABLE);
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        let accounts = accounts(200);
        let workload = Workload::start(&engine, &accounts, 4, 0x5161);
        let mut rng = Rng::new(0x5161_c111);

        let mut mid_flush = 0;
        for kill in 0..4u64 {
            run_for(rng.millis(150, 600)).await;
            let delay = Duration::from_micros(kill * 500);
            mid_flush += u32::from(kill_mid_flush(&engine, &mut server, delay).await);
            run_for(rng.millis(100, 500)).await;
            restart_durable(&mut server);
        }
        run_for(Duration::from_millis(300)).await;

        let (tally, open) = workload.stop(true).await;
        assert!(open.is_empty());
        let report = shutdown_complete(&engine).await;
        let stats = engine.stats();
        // Duplicates here are batches whose reply the kill cut off after the AOF had them:
        // their markers came back with the restart. Likely but timing-dependent: not asserted.
        eprintln!(
            "sigkill: {mid_flush} of 4 kills right after a round started; {} adds; {stats:?}",
            tally.adds
        );
        assert!(stats.write_failures > 0, "no write failed: {stats:?}");
        assert_written_exactly(server.addr(), &accounts, &tally, &report);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. SIGSTOP past the command timeout
// ---------------------------------------------------------------------------------------------

/// Redis is paused for several command timeouts: writes time out and are retried, the stalled
/// `EVALSHA`s still run when it resumes, and their markers make every second run a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_command_timeout_counts_nothing_twice() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        let accounts = accounts(40);
        let workload = Workload::start(&engine, &accounts, 4, 0x5709);

        run_for(Duration::from_millis(500)).await;
        for pause in [1500, 700] {
            server.pause();
            run_for(Duration::from_millis(pause)).await;
            server.resume();
            run_for(Duration::from_millis(500)).await;
        }

        let (tally, _open) = workload.stop(false).await;
        let report = shutdown_complete(&engine).await;
        let stats = engine.stats();
        eprintln!("sigstop: {} adds; {stats:?}", tally.adds);
        assert!(stats.write_failures > 0, "no write timed out: {stats:?}");
        assert_written_exactly(server.addr(), &accounts, &tally, &report);
        assert_incrby_once_per_increment(&server, &stats);
        // A batch sent during a pause runs when Redis resumes, and its retry runs too.
        assert!(
            scripts_run(&server) > stats.batches_written,
            "no stalled script ran late: the pause was not exercised"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Shutdown while Redis is away
// ---------------------------------------------------------------------------------------------

/// Adds before the outage (flushed and checked), then adds only while Redis is away, then a
/// shutdown with a short deadline: `unwritten` must be exactly what was added while away.
async fn shutdown_while_away(
    engine: &Engine,
    redis: SocketAddr,
    seed: u64,
    outage: impl FnOnce(),
) -> (
    BTreeMap<String, u128>,
    BTreeMap<String, u128>,
    ShutdownReport,
) {
    let accounts = accounts(30);
    // Sessions open across the outage, added to before and during it, open at shutdown.
    let spanning: Vec<Session> = accounts[..3]
        .iter()
        .map(|account| engine.open_session(account).unwrap())
        .collect();
    let mut before = Tally::new(accounts.len());
    for (i, session) in spanning.iter().enumerate() {
        session.add(1000 + i as u64);
        before.add(i, 1000 + i as u64);
    }
    let workload = Workload::start(engine, &accounts, 3, seed);
    run_for(Duration::from_millis(600)).await;
    let (tally, open) = workload.stop(false).await;
    before.merge(&tally);
    tokio::time::timeout(Duration::from_secs(30), engine.flush_now())
        .await
        .expect("flush_now before the outage hung")
        .expect("flush before the outage");
    let expected_before = per_key(&accounts, &before.amounts);
    assert_redis_holds(redis, &expected_before);

    outage();

    let mut during = Tally::new(accounts.len());
    for (i, session) in spanning.iter().enumerate() {
        session.add(7 + i as u64);
        during.add(i, 7 + i as u64);
    }
    for (account, session) in &open {
        session.add(11);
        during.add(*account, 11);
    }
    let workload = Workload::start(engine, &accounts, 3, seed.rotate_left(7));
    run_for(Duration::from_millis(500)).await;
    let (tally, _open_too) = workload.stop(false).await;
    during.merge(&tally);

    let report = engine.shutdown().await.expect("shutdown");
    drop(spanning);
    let expected_during = per_key(&accounts, &during.amounts);
    assert_eq!(
        not_acknowledged(&report),
        expected_during,
        "unwritten and in doubt must be exactly what was added while Redis was away"
    );
    assert_eq!(
        report.unwritten_amount() + report.in_doubt_amount(),
        during.amounts.iter().sum::<u128>()
    );
    assert_eq!(report.amount_written, before.amounts.iter().sum::<u128>());
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    (expected_before, expected_during, report)
}

/// Per key, everything the report says was not acknowledged: unwritten and in doubt.
fn not_acknowledged(report: &ShutdownReport) -> BTreeMap<String, u128> {
    let mut keys: BTreeMap<String, u128> = report.unwritten.iter().cloned().collect();
    for increment in report.in_doubt.iter().flat_map(|batch| &batch.increments) {
        *keys.entry(increment.key.to_string()).or_default() += u128::from(increment.amount);
    }
    keys
}

/// A shutdown while Redis is frozen (SIGSTOP): batches sent into the frozen server are in doubt
/// (Redis runs them when it resumes), what was never sent is unwritten. Replaying only the
/// unwritten part, the way an operator would, gives exact totals; replaying everything would
/// count the in-doubt batches twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_redis_is_frozen_reports_in_doubt_apart_from_safe_to_replay() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let engine = engine(sink(&server.url()).await, Duration::from_millis(1500));
        let accounts = accounts(20);
        let sessions: Vec<Session> = accounts
            .iter()
            .map(|account| engine.open_session(account).unwrap())
            .collect();
        let mut added = Tally::new(accounts.len());
        let add_to_all = |amount: u64, added: &mut Tally| {
            for (i, session) in sessions.iter().enumerate() {
                session.add(amount);
                added.add(i, amount);
            }
        };
        add_to_all(100, &mut added);
        engine.flush_now().await.expect("flush before the freeze");

        server.pause();
        add_to_all(20, &mut added);
        // A few flush intervals: a round goes out to the frozen server and times out.
        run_for(Duration::from_millis(1200)).await;
        add_to_all(3, &mut added);
        let report = engine.shutdown().await.expect("shutdown");
        drop(sessions);
        assert!(!report.in_doubt.is_empty(), "nothing was sent: {report:?}");
        assert!(
            !report.unwritten.is_empty(),
            "everything was sent: {report:?}"
        );
        assert_eq!(
            report.unwritten_amount() + report.in_doubt_amount(),
            accounts.len() as u128 * 23,
            "the report accounts for every add after the last flush"
        );

        server.resume();
        let mut redis = RespClient::connect(server.addr()).unwrap();
        for (key, amount) in &report.unwritten {
            let amount = amount.to_string();
            redis.command(&["INCRBY", key.as_str(), &amount]).unwrap();
            redis
                .command(&["EXPIRE", key.as_str(), &KEY_TTL_SECS.to_string()])
                .unwrap();
        }
        // The stalled scripts run once Redis has read them; then the totals are exact.
        let expected = per_key(&accounts, &added.amounts);
        support::until_ok(
            "the in-doubt batches applied",
            Duration::from_secs(10),
            || {
                let held = expected
                    .keys()
                    .map(|key| (key.clone(), redis_total(server.addr(), key)))
                    .collect::<BTreeMap<_, _>>();
                let done = held == expected;
                async move { done.then_some(()).ok_or(held) }
            },
        )
        .await;
        assert_redis_holds(server.addr(), &expected);
    })
    .await;
}

fn redis_total(addr: SocketAddr, key: &str) -> u128 {
    let mut redis = RespClient::connect(addr).expect("connect to check Redis");
    redis.get_i64(key).map_or(0, |total| total as u128)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_redis_is_killed_reports_exactly_what_is_unwritten() {
    within(TEST_LIMIT, async {
        let mut server = RedisServer::start_with(DURABLE);
        let engine = engine(sink(&server.url()).await, Duration::from_millis(800));
        let addr = server.addr();
        let server_ref = &mut server;
        let (before, _during, _) =
            shutdown_while_away(&engine, addr, 0xdead, || server_ref.kill()).await;
        // The AOF kept exactly what was acknowledged; nothing of the outage reached it.
        server.restart();
        assert_redis_holds(addr, &before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_network_is_cut_reports_exactly_what_is_unwritten() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr()).await;
        let engine = engine(sink(&proxy.url()).await, Duration::from_millis(800));
        let (before, _during, _) = shutdown_while_away(&engine, server.addr(), 0xc07, || {
            proxy.set_network_down(true)
        })
        .await;
        proxy.set_network_down(false);
        // Redis still holds exactly the totals from before the cut.
        assert_redis_holds(server.addr(), &before);
        assert_incrby_once_per_increment(&server, &engine.stats());
    })
    .await;
}

/// Regression: after a long outage the flusher's backoff can be longer than the shutdown
/// timeout. A shutdown that starts once Redis is back must write at once, not wait out a backoff
/// scheduled before it and then report everything as unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_an_outage_writes_without_waiting_out_the_backoff() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr()).await;
        let sink = sink(&proxy.url()).await;
        let client = sink.client().clone();
        let engine = Engine::builder()
            .flush_interval(Duration::from_millis(50))
            .write_timeout(Duration::from_secs(1))
            // A backoff far longer than the shutdown timeout, as after a long outage with the
            // defaults (30 s vs 10 s).
            .retry_backoff(Duration::from_secs(60), Duration::from_secs(60))
            .shutdown_timeout(Duration::from_secs(5))
            .keys(KeyScheme::new(PREFIX).ttl(Ttl::Fixed(Duration::from_secs(KEY_TTL_SECS as u64))))
            .sink(sink)
            .build()
            .unwrap();

        proxy.set_network_down(true);
        engine.record("early", 40).unwrap();
        let failed = tokio::time::timeout(Duration::from_secs(30), engine.flush_now())
            .await
            .expect("flush_now hung");
        assert!(failed.is_err(), "the network is down: {failed:?}");

        proxy.set_network_down(false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !client.is_connected() {
            assert!(Instant::now() < deadline, "the sink never reconnected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        engine.record("late", 2).unwrap();
        let report = engine.shutdown().await.unwrap();
        assert!(report.is_complete(), "{report:?}");
        let expected = BTreeMap::from([(key_of("early"), 40), (key_of("late"), 2)]);
        assert_redis_holds(server.addr(), &expected);
    })
    .await;
}

/// Regression, second half: a shutdown that starts while Redis is still away restarts the
/// backoff from `retry_initial`, so it keeps retrying until its deadline and writes once Redis is
/// back, instead of making one attempt and then sleeping past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_an_outage_keeps_retrying_until_its_deadline() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let proxy = Proxy::start(server.addr()).await;
        // The gateway's own client, reconnecting every 50 ms: how soon the sink can write again
        // is then up to the engine's backoff alone.
        let client = fred::prelude::Builder::from_config(
            fred::prelude::Config::from_url(&proxy.url()).unwrap(),
        )
        .set_policy(fred::prelude::ReconnectPolicy::new_constant(0, 50))
        .build()
        .unwrap();
        client.init().await.unwrap();
        let sink = RedisSink::builder()
            .marker_prefix(MARKERS)
            .command_timeout(COMMAND_TIMEOUT)
            .build(client.clone())
            .unwrap();
        let engine = Engine::builder()
            .flush_interval(Duration::from_secs(3600))
            .write_timeout(Duration::from_secs(1))
            .retry_backoff(Duration::from_millis(10), Duration::from_secs(60))
            .shutdown_timeout(Duration::from_secs(8))
            .keys(KeyScheme::new(PREFIX).ttl(Ttl::Fixed(Duration::from_secs(KEY_TTL_SECS as u64))))
            .sink(sink)
            .build()
            .unwrap();

        proxy.set_network_down(true);
        engine.record("patient", 1234).unwrap();
        // Fifteen failed rounds in a row: the backoff is now at its 60 s ceiling.
        for _ in 0..15 {
            let failed = tokio::time::timeout(Duration::from_secs(30), engine.flush_now())
                .await
                .expect("flush_now hung");
            assert!(failed.is_err(), "the network is down: {failed:?}");
        }
        assert!(engine.stats().write_failures >= 15);

        // The shutdown starts while the network is still down; it comes back half a second in.
        let (report, ()) = tokio::join!(engine.shutdown(), async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            proxy.set_network_down(false);
        });
        let report = report.unwrap();
        assert!(report.is_complete(), "{report:?}");
        assert_redis_holds(server.addr(), &BTreeMap::from([(key_of("patient"), 1234)]));
        let _ = client.quit().await;
    })
    .await;
}

/// Regression: `flush_now` answered only once nothing at all was pending, so under steady
/// session churn, with write rounds slower than the session-end delay (a large round, a busy
/// Redis), it never returned although every round succeeded. It must return once what was
/// pending at the call is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_now_returns_under_churn_with_a_slow_redis() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
        let engine = Engine::builder()
            .flush_interval(Duration::from_millis(50))
            // Every session end is collected at once: something is always pending.
            .session_end_delay(Duration::ZERO)
            // One key per batch: a round is hundreds of `EVALSHA`s, never over in an instant.
            .batch_size(1)
            .write_timeout(Duration::from_secs(5))
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
            .shutdown_timeout(HEALTHY_SHUTDOWN)
            .keys(KeyScheme::new(PREFIX).ttl(Ttl::Fixed(Duration::from_secs(KEY_TTL_SECS as u64))))
            .sink(
                // Patient enough to wait behind the other client's commands below.
                RedisSink::builder()
                    .marker_prefix(MARKERS)
                    .command_timeout(Duration::from_secs(2))
                    .connect(&server.url())
                    .await
                    .unwrap(),
            )
            .build()
            .unwrap();
        let accounts = accounts(300);
        let workload = Workload::start(&engine, &accounts, 3, 0xf1a5);
        // A busy Redis: another client keeps it blocked in 200 ms slices, so nearly every write
        // round waits up to 200 ms, with sessions ending meanwhile.
        let busy = Arc::new(AtomicBool::new(true));
        let blocker = {
            let busy = busy.clone();
            let mut client = server.client();
            std::thread::spawn(move || {
                while busy.load(Ordering::SeqCst) {
                    client.command(&["DEBUG", "SLEEP", "0.2"]).unwrap();
                }
            })
        };
        let probe = engine.open_session("probe").unwrap();
        run_for(Duration::from_millis(300)).await;

        for round in 1..=3u64 {
            // Added before the call, to a session that stays open: only a sweep collects it.
            probe.add(100);
            tokio::time::timeout(Duration::from_secs(15), engine.flush_now())
                .await
                .expect("flush_now never returned under churn")
                .expect("flush");
            assert_eq!(
                server.get(&key_of("probe")),
                Some((round * 100).to_string()),
                "flush_now returned before what was added before it was written"
            );
        }

        busy.store(false, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || blocker.join())
            .await
            .unwrap()
            .expect("the blocker panicked");
        let (mut tally, _open) = workload.stop(false).await;
        drop(probe);
        let report = shutdown_complete(&engine).await;
        let mut accounts = accounts;
        accounts.push("probe".to_owned());
        tally.amounts.push(300);
        assert_written_exactly(server.addr(), &accounts, &tally, &report);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

/// A key that holds text is refused by Redis: that key alone is rejected (counted, reported,
/// left untouched), every other key is exact, and the flusher keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holding_text_is_rejected_and_the_rest_stay_exact() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let bad_key = key_of("bad");
        server.client().set(&bad_key, "abc");
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        let mut accounts = accounts(20);
        accounts.push("bad".to_owned());
        let bad = accounts.len() - 1;

        let workload = Workload::start(&engine, &accounts, 3, 0xbad);
        let deadline = Instant::now() + Duration::from_secs(30);
        while engine.stats().keys_rejected == 0 {
            assert!(Instant::now() < deadline, "the bad key was never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let at_first_rejection = engine.stats();
        run_for(Duration::from_millis(800)).await;
        let (mut tally, _open) = workload.stop(true).await;

        // Flushes after the rejection succeed, and a rejection is not a failed flush.
        let session = engine.open_session(&accounts[0]).unwrap();
        session.add(5);
        tally.add(0, 5);
        let bad_session = engine.open_session("bad").unwrap();
        bad_session.add(9);
        tally.add(bad, 9);
        tokio::time::timeout(Duration::from_secs(30), engine.flush_now())
            .await
            .expect("flush_now hung")
            .expect("a flush with a rejected key is not a failure");
        drop((session, bad_session));

        let report = engine.shutdown().await.unwrap();
        let stats = engine.stats();
        assert!(report.unwritten.is_empty(), "{:?}", report.unwritten);
        assert!(
            stats.batches_written > at_first_rejection.batches_written,
            "nothing was written after the first rejection"
        );
        let bad_total = tally.amounts[bad];
        assert!(!report.rejected.is_empty());
        assert!(
            report
                .rejected
                .iter()
                .all(|r| r.key == bad_key && r.reason.contains("not an integer")),
            "{:?}",
            report.rejected
        );
        assert_eq!(
            report
                .rejected
                .iter()
                .map(|r| u128::from(r.amount))
                .sum::<u128>(),
            bad_total
        );
        assert_eq!(stats.keys_rejected, report.rejected.len() as u64);
        assert_eq!(u128::from(stats.amount_rejected), bad_total);

        // The refused key is untouched (no value change, no TTL); the others are exact.
        let mut redis = server.client();
        assert_eq!(redis.get(&bad_key).as_deref(), Some("abc"));
        assert_eq!(redis.ttl(&bad_key), -1);
        redis.command(&["DEL", bad_key.as_str()]).unwrap();
        tally.amounts[bad] = 0;
        assert_written_exactly(server.addr(), &accounts, &tally, &report);
    })
    .await;
}

/// Account ids with spaces, newlines, braces, colons, `%`, non-ASCII text and RESP syntax each
/// get their own key, exactly as documented, and nothing else appears in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_account_ids_get_distinct_exact_keys() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        let long = "x".repeat(512);
        let ids: Vec<String> = [
            "a b",
            "a%20b",
            "a+b",
            "line\nbreak",
            "line\r\nbreak",
            "tab\there",
            "{uid-42}",
            "}{",
            "{}",
            "a:b",
            "a%3Ab",
            "%",
            "é",
            "e\u{301}",
            "日本語",
            "🎙️ mic",
            "\r\n*1\r\n$8\r\nFLUSHALL\r\n",
            "nul\0byte",
            long.as_str(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let keys: BTreeSet<String> = ids.iter().map(|id| key_of(id)).collect();
        assert_eq!(keys.len(), ids.len(), "the oracle itself is one-to-one");

        let workload = Workload::start(&engine, &ids, 3, 0x0dd);
        run_for(Duration::from_millis(800)).await;
        let (mut tally, open) = workload.stop(false).await;
        for (i, id) in ids.iter().enumerate() {
            engine.record(id, 1000 + i as u64).unwrap();
            tally.add(i, 1000 + i as u64);
        }
        assert!(
            engine.open_session(&"y".repeat(513)).is_err(),
            "513 bytes is too long"
        );
        assert!(engine.open_session("").is_err());
        let report = shutdown_complete(&engine).await;
        drop(open);

        let expected = per_key(&ids, &tally.amounts);
        assert_eq!(expected.len(), ids.len());
        assert_redis_holds(server.addr(), &expected);
        assert_eq!(report.amount_written, expected.values().sum::<u128>());
        // Nothing but counters and markers: no id smuggled a command or a stray key in.
        let all = server.client().scan("*");
        let strays: Vec<_> = all
            .iter()
            .filter(|key| !expected.contains_key(*key) && !key.starts_with(&format!("{MARKERS}:")))
            .collect();
        assert!(strays.is_empty(), "{strays:?}");
    })
    .await;
}

/// Amounts near `u64::MAX`: no panic anywhere; what Redis can hold is written exactly, the rest
/// is reported (rejected by Redis as an overflow, or saturated in the ledger), to the unit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_near_u64_max_are_written_or_reported_exactly() {
    within(TEST_LIMIT, async {
        let server = RedisServer::start();
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        let half = u64::MAX / 2;

        // One session, two threads (a registered worker and a striped one): u64::MAX - 1 in
        // total, spread over two shards so no cell saturates.
        let split = engine.open_session("split").unwrap();
        std::thread::scope(|scope| {
            for register in [true, false] {
                let channel = split.clone();
                scope.spawn(move || {
                    if register {
                        let _ = shardmeter::register_worker_thread();
                    }
                    channel.add(half);
                });
            }
        });
        drop(split);
        // u64::MAX in one add, on one cell.
        engine.record("max", u64::MAX).unwrap();
        // A cell that saturates: 5 over u64::MAX.
        let saturating = engine.open_session("saturating").unwrap();
        saturating.add(u64::MAX - 10);
        saturating.add(15);
        drop(saturating);
        // Exactly i64::MAX fits.
        engine.record("fits", i64::MAX as u64).unwrap();
        // Another writer already brought this key near the top.
        server
            .client()
            .set(&key_of("crowded"), &(i64::MAX - 10).to_string());
        engine.record("crowded", 20).unwrap();
        engine.record("small", 42).unwrap();

        let added: BTreeMap<&str, u128> = BTreeMap::from([
            ("split", u128::from(half) * 2),
            ("max", u128::from(u64::MAX)),
            ("saturating", u128::from(u64::MAX) + 5),
            ("fits", i64::MAX as u128),
            ("crowded", 20),
            ("small", 42),
        ]);

        tokio::time::timeout(Duration::from_secs(30), engine.flush_now())
            .await
            .expect("flush_now hung")
            .expect("flush");
        // The flusher keeps working after the overflows.
        engine.record("after", 7).unwrap();
        let report = engine.shutdown().await.unwrap();
        assert!(report.unwritten.is_empty(), "{:?}", report.unwritten);
        let stats = engine.stats();
        assert_eq!(stats.saturated_amount, 5);

        let mut redis = server.client();
        let mut rejected: BTreeMap<String, u128> = BTreeMap::new();
        for rejection in &report.rejected {
            assert!(rejection.reason.contains("overflow"), "{rejection:?}");
            *rejected.entry(rejection.key.clone()).or_default() += u128::from(rejection.amount);
        }
        for (account, amount) in &added {
            let key = key_of(account);
            let held: u128 = match redis.get_i64(&key) {
                Some(value) if *account == "crowded" => (value - (i64::MAX - 10)) as u128,
                Some(value) => value as u128,
                None => 0,
            };
            let saturated = if *account == "saturating" { 5 } else { 0 };
            let refused = rejected.get(&key).copied().unwrap_or(0);
            assert_eq!(
                held + refused + saturated,
                *amount,
                "{account}: Redis added {held}, rejected {refused}, saturated {saturated}"
            );
            // Redis holds as much as fits in a signed 64-bit counter.
            let expected_held = match *account {
                "crowded" => 0,
                _ => (*amount - saturated).min(i64::MAX as u128),
            };
            assert_eq!(held, expected_held, "{account}");
        }
        assert_eq!(redis.get_i64(&key_of("after")), Some(7));
        assert_eq!(redis.get_i64(&key_of("small")), Some(42));
        // Everything added is accounted for, to the unit (the stats' amounts saturate at
        // `u64::MAX`; the report's do not).
        assert_eq!(
            report.amount_written + rejected.values().sum::<u128>() + 5,
            added.values().sum::<u128>() + 7
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Soak
// ---------------------------------------------------------------------------------------------

/// One kind of fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Calm,
    RandomLostReplies,
    LostReplyBurst,
    NetworkDown,
    Kill,
    Pause,
    PauseThenKill,
    CutConnections,
}

const ALL_FAULTS: [Fault; 8] = [
    Fault::Calm,
    Fault::RandomLostReplies,
    Fault::LostReplyBurst,
    Fault::NetworkDown,
    Fault::Kill,
    Fault::Pause,
    Fault::PauseThenKill,
    Fault::CutConnections,
];

/// All of the faults above, in a random order per cycle with random durations, for
/// `SHARDMETER_SOAK_SECS` seconds (default 30), with continuous adds and session churn. Checks
/// that pending memory stays bounded by the number of distinct keys while Redis is away, and
/// that the totals are exact at the end. Prints its seed and figures (`--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    let secs: u64 = std::env::var("SHARDMETER_SOAK_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("SHARDMETER_SOAK_SECS must be a number of seconds")
        })
        .unwrap_or(30);
    let seed: u64 = std::env::var("SHARDMETER_SOAK_SEED")
        .ok()
        .map(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).expect("SHARDMETER_SOAK_SEED must be hexadecimal")
        })
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
        });
    println!("soak: {secs} s, seed {seed:#x} (replay: SHARDMETER_SOAK_SEED={seed:x})");
    within(Duration::from_secs(secs + 180), soak_run(secs, seed)).await;
}

async fn soak_run(secs: u64, seed: u64) {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut server = RedisServer::start_with(DURABLE);
    let proxy = Proxy::start(server.addr()).await;
    let engine = engine(sink(&proxy.url()).await, Duration::from_secs(60));
    let accounts = accounts(300);
    let distinct_keys = accounts.len() as u64;
    let workload = Workload::start(&engine, &accounts, 4, seed);

    // Watches pending memory throughout: never more entries than twice the distinct keys (a
    // key in flight and waiting again counts twice).
    let away = Arc::new(AtomicBool::new(false));
    let max_pending_keys = Arc::new(AtomicU64::new(0));
    let max_pending_keys_away = Arc::new(AtomicU64::new(0));
    let max_pending_amount = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let monitor = {
        let (engine, away, watching) = (engine.clone(), away.clone(), watching.clone());
        let (max_keys, max_keys_away, max_amount) = (
            max_pending_keys.clone(),
            max_pending_keys_away.clone(),
            max_pending_amount.clone(),
        );
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                let stats = engine.stats();
                assert!(
                    stats.pending_keys <= 2 * distinct_keys,
                    "pending entries {} exceed twice the {distinct_keys} distinct keys",
                    stats.pending_keys
                );
                max_keys.fetch_max(stats.pending_keys, Ordering::SeqCst);
                max_amount.fetch_max(stats.pending_amount, Ordering::SeqCst);
                if away.load(Ordering::SeqCst) {
                    max_keys_away.fetch_max(stats.pending_keys, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let deadline = started + Duration::from_secs(secs);
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut away_time = Duration::ZERO;
    'cycles: loop {
        let mut order = ALL_FAULTS;
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for fault in order {
            if Instant::now() >= deadline {
                break 'cycles;
            }
            *counts.entry(format!("{fault:?}")).or_default() += 1;
            let step = Instant::now();
            match fault {
                Fault::Calm => run_for(rng.millis(100, 800)).await,
                Fault::RandomLostReplies => {
                    let probability = 0.1 + rng.below(40) as f64 / 100.0;
                    proxy.lose_replies_randomly("EVALSHA", probability, rng.next() | 1);
                    run_for(rng.millis(300, 1500)).await;
                    proxy.clear_faults();
                }
                Fault::LostReplyBurst => {
                    proxy.lose_replies_to("EVALSHA", 1 + rng.below(5) as u32);
                    run_for(rng.millis(300, 1000)).await;
                    proxy.clear_faults();
                }
                Fault::NetworkDown => {
                    away.store(true, Ordering::SeqCst);
                    proxy.set_network_down(true);
                    run_for(rng.millis(200, 1500)).await;
                    proxy.set_network_down(false);
                    away.store(false, Ordering::SeqCst);
                    away_time += step.elapsed();
                }
                Fault::Kill => {
                    away.store(true, Ordering::SeqCst);
                    if rng.below(2) == 0 {
                        let delay = Duration::from_micros(rng.below(2000));
                        kill_mid_flush(&engine, &mut server, delay).await;
                    } else {
                        server.kill();
                    }
                    run_for(rng.millis(100, 1500)).await;
                    restart_durable(&mut server);
                    away.store(false, Ordering::SeqCst);
                    away_time += step.elapsed();
                }
                Fault::Pause => {
                    away.store(true, Ordering::SeqCst);
                    server.pause();
                    run_for(rng.millis(400, 2000)).await;
                    server.resume();
                    away.store(false, Ordering::SeqCst);
                    away_time += step.elapsed();
                }
                Fault::PauseThenKill => {
                    away.store(true, Ordering::SeqCst);
                    server.pause();
                    run_for(rng.millis(100, 800)).await;
                    server.kill();
                    run_for(rng.millis(0, 500)).await;
                    restart_durable(&mut server);
                    away.store(false, Ordering::SeqCst);
                    away_time += step.elapsed();
                }
                Fault::CutConnections => {
                    proxy.cut_all();
                    run_for(rng.millis(50, 300)).await;
                }
            }
            // Between faults, a moment of health so that some flushes succeed.
            run_for(rng.millis(50, 400)).await;
        }
    }

    // Heal everything, stop adding, shut down with Redis healthy.
    proxy.clear_faults();
    proxy.set_network_down(false);
    let (tally, open) = workload.stop(false).await;
    let report = shutdown_complete(&engine).await;
    drop(open);
    watching.store(false, Ordering::SeqCst);
    monitor.await.expect("the pending-memory monitor failed");
    let stats = engine.stats();
    let expected = per_key(&accounts, &tally.amounts);
    assert_redis_holds(server.addr(), &expected);
    assert_eq!(report.amount_written, expected.values().sum::<u128>());
    assert_eq!(
        u128::from(stats.amount_swept),
        tally.amounts.iter().sum::<u128>()
    );

    let faults: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "soak: seed {seed:#x}, ran {:.1} s ({secs} s of faults); {} adds in {} sessions, amount {}; \
         {} keys exact in Redis",
        started.elapsed().as_secs_f64(),
        tally.adds,
        tally.sessions,
        tally.amounts.iter().sum::<u128>(),
        expected.len()
    );
    println!(
        "soak: fault steps: {}; Redis away {:.1} s; replies lost by the proxy {}",
        faults.join(", "),
        away_time.as_secs_f64(),
        proxy.faults_fired()
    );
    println!(
        "soak: engine: {} write rounds, {} failed, {} retries, {} batches written, {} duplicate \
         batches caught, {} keys written, {} sessions ended; max pending keys {} ({} while Redis \
         was away; {distinct_keys} distinct keys), max pending amount {}",
        stats.flushes,
        stats.write_failures,
        stats.retries,
        stats.batches_written,
        stats.duplicate_batches,
        stats.keys_written,
        stats.sessions_ended,
        max_pending_keys.load(Ordering::SeqCst),
        max_pending_keys_away.load(Ordering::SeqCst),
        max_pending_amount.load(Ordering::SeqCst)
    );
    println!("soak: final totals exact: yes (every key equal to the adds, every key with a TTL)");

    assert!(proxy.faults_fired() > 0, "no reply was lost");
    assert!(stats.write_failures > 0, "no write failed");
    assert!(
        max_pending_keys_away.load(Ordering::SeqCst) > 0,
        "nothing was pending while Redis was away: the outages were not exercised"
    );
}

/// Redis starts requiring a password mid-run (and drops the sink's connection): flushes fail,
/// and the WARN an operator sees names the cause (`NOAUTH`), not only a timeout or a client
/// state. Once the password requirement is lifted, the pending amounts are written exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_auth_mid_run_is_warned_with_its_cause() {
    within(TEST_LIMIT, async {
        let logs = support::logs::captured_logs();
        let server = RedisServer::start();
        let engine = engine(sink(&server.url()).await, HEALTHY_SHUTDOWN);
        engine.record("before", 10).unwrap();
        engine.flush_now().await.expect("flush before");

        let mut admin = server.client();
        admin
            .command(&["CONFIG", "SET", "requirepass", "sesame"])
            .unwrap();
        admin
            .command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            .unwrap();
        engine.record("during", 20).unwrap();
        support::until_ok("a WARN naming NOAUTH", Duration::from_secs(20), || {
            let text = logs.text();
            let warned = text
                .lines()
                .any(|line| line.contains("WARN") && line.contains("NOAUTH"));
            async move { warned.then_some(()).ok_or("no such WARN yet") }
        })
        .await;

        admin
            .command(&["CONFIG", "SET", "requirepass", ""])
            .unwrap();
        support::until_ok(
            "a flush after AUTH is lifted",
            Duration::from_secs(20),
            || engine.flush_now(),
        )
        .await;
        let report = shutdown_complete(&engine).await;
        assert_redis_holds(
            server.addr(),
            &BTreeMap::from([(key_of("before"), 10), (key_of("during"), 20)]),
        );
        assert_eq!(report.amount_written, 30);
    })
    .await;
}
