//! `RedisSink` (and engines in separate processes) against a real local Redis Cluster of six
//! `redis-server` processes (`support::cluster`): exact totals with the deployment's plain keys
//! and with hash-tagged keys, the commands each flush costs, a primary killed with `kill -9`
//! mid-run, slots resharded mid-run, lost replies through a proxy in front of one node, two OS
//! processes on the same accounts (on one Redis and on the Cluster), and the bound on the dedup
//! state.
//!
//! The rounds here follow the engine's contract, as the flusher does: a round's batches are
//! written together, every batch not yet settled is re-sent unchanged in the next write, and a
//! new round (higher sequences) starts only when all are settled.

mod support;

use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use shardmeter::sink::redis::RedisSink;
use shardmeter::sink::{Batch, BatchId, BatchOutcome, Increment, Sink};
use shardmeter::{Engine, KeyScheme};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::cluster::{slot_of, RedisCluster};
use support::{shared_redis, unique_u64, Keyspace, Proxy, RespClient};

const DAY: Duration = Duration::from_secs(86_400);
/// How long a round may keep failing (failover takes ~3.5 s, a reshard longer).
const PATIENCE: Duration = Duration::from_secs(60);

/// The reference deployment's keys: no hash tag, spread over all slots.
fn plain_keys(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("fair_use:dg_budget:uid-{i}:20261129"))
        .collect()
}

/// The amount account `i` gets in round `round`: varied, never zero.
fn amount(i: usize, round: u64) -> u64 {
    (i as u64 % 7) + round + 1
}

/// A writer that builds rounds of batches of 500 and settles them as the flusher does.
struct Writer {
    id: u64,
    next_sequence: u64,
    /// Batches answered `AlreadyApplied` (a re-send after a lost reply).
    duplicates: u64,
    /// Writes that left batches unsettled.
    failed_writes: u64,
}

impl Writer {
    fn new() -> Self {
        Self {
            id: unique_u64(),
            next_sequence: 0,
            duplicates: 0,
            failed_writes: 0,
        }
    }

    fn round(&mut self, keys: &[String], round: u64) -> Vec<Batch> {
        keys.chunks(500)
            .enumerate()
            .map(|(c, chunk)| {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                Batch {
                    id: BatchId {
                        writer: self.id,
                        sequence,
                    },
                    increments: chunk
                        .iter()
                        .enumerate()
                        .map(|(j, key)| Increment {
                            key: key.as_str().into(),
                            amount: amount(c * 500 + j, round),
                            ttl: DAY,
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Writes `batches` until every one is settled.
    async fn settle(&mut self, sink: &RedisSink, mut batches: Vec<Batch>) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let results = sink.write(&batches).await;
            let mut unsettled = Vec::new();
            let mut last_error = None;
            for (batch, result) in batches.into_iter().zip(results) {
                match result {
                    Ok(BatchOutcome::Applied(outcomes)) => {
                        assert_eq!(outcomes.len(), batch.increments.len())
                    }
                    Ok(BatchOutcome::AlreadyApplied) => self.duplicates += 1,
                    Err(error) => {
                        last_error = Some(error);
                        unsettled.push(batch);
                    }
                }
            }
            if unsettled.is_empty() {
                return;
            }
            self.failed_writes += 1;
            assert!(
                tokio::time::Instant::now() < deadline,
                "a round stayed unsettled for {PATIENCE:?}: {last_error:?}"
            );
            batches = unsettled;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn cluster_sink(url: &str) -> RedisSink {
    RedisSink::builder()
        .command_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .expect("connect to the cluster")
}

/// Checks that every key holds the sum of `rounds` rounds of `amount`.
fn assert_totals(cluster: &RedisCluster, keys: &[String], rounds: u64) {
    let values = cluster.get_all(keys);
    for (i, (key, value)) in keys.iter().zip(values).enumerate() {
        let expected: u64 = (0..rounds).map(|r| amount(i, r)).sum();
        assert_eq!(value, Some(expected.to_string()), "{key}");
    }
}

/// Runs `rounds` rounds over `keys` in the background; `progress` counts finished rounds.
fn run_rounds(
    sink: Arc<RedisSink>,
    keys: Arc<Vec<String>>,
    rounds: u64,
    progress: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Writer> {
    tokio::spawn(async move {
        let mut writer = Writer::new();
        for round in 0..rounds {
            let batches = writer.round(&keys, round);
            writer.settle(&sink, batches).await;
            // Relaxed: the test only polls it to time its fault.
            progress.fetch_add(1, Ordering::Relaxed);
        }
        writer
    })
}

async fn wait_for_round(progress: &AtomicU64, round: u64) {
    while progress.load(Ordering::Relaxed) < round {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_hash_tagged_keys_add_up_exactly_with_one_call_per_slot() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let sink = cluster_sink(&cluster.url()).await;
    let mut keys = plain_keys(20_000);
    // Hash-tagged keys: ten accounts' days in one slot each.
    keys.extend((0..2_000).map(|i| format!("usage:{{uid-{}}}:day-{}", i % 10, i / 10)));
    let slots: HashSet<u16> = keys.iter().map(|k| slot_of(k)).collect();
    let mut writer = Writer::new();

    let first = writer.round(&keys, 0);
    writer.settle(&sink, first).await;
    // Steady rounds: what Redis ran, counted by Redis.
    cluster.reset_stats();
    let rounds = 3u64;
    for round in 1..=rounds {
        let batches = writer.round(&keys, round);
        writer.settle(&sink, batches).await;
    }
    assert_eq!(writer.failed_writes, 0);

    let stats: Vec<_> = cluster
        .primaries()
        .iter()
        .map(|n| n.client().commandstats())
        .collect();
    let total = |command: &str| stats.iter().map(|s| s.calls(command)).sum::<u64>();
    let per_round = |n: u64| n / rounds;
    // One EVALSHA and one record SET per slot written, one INCRBY per key, and EXPIRE only for
    // the refreshes (about 1 key in 16; the keys exist, so never for creation).
    assert_eq!(per_round(total("evalsha")), slots.len() as u64);
    assert_eq!(per_round(total("set")), slots.len() as u64);
    assert_eq!(per_round(total("incrby")), keys.len() as u64);
    let expire = total("expire") as f64 / (rounds as f64 * keys.len() as f64);
    assert!((0.03..=0.1).contains(&expire), "EXPIRE per key: {expire}");
    assert_eq!(total("get"), 0, "no total needed reading back");
    // Nothing else ran: (2 per slot + 1 per key + the refreshes) per round.
    let per_account = cluster.server_calls() as f64 / (rounds as f64 * keys.len() as f64);
    let expected = (2 * slots.len() + keys.len()) as f64 / keys.len() as f64 + expire;
    assert!(
        (per_account - expected).abs() < 1e-3,
        "{per_account} vs {expected}"
    );
    eprintln!(
        "{} keys over {} slots: {per_account:.3} server calls per account per flush",
        keys.len(),
        slots.len()
    );
    assert_totals(&cluster, &keys, rounds + 1);

    // A clustered fred client of the gateway's own, passed in, works the same.
    let config = Config::from_url(&cluster.url()).unwrap();
    assert!(config.server.is_clustered());
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()
        .unwrap();
    client.init().await.unwrap();
    let passed_in = RedisSink::new(client.clone());
    let batches = writer.round(&keys, rounds + 1);
    writer.settle(&passed_in, batches).await;
    assert_totals(&cluster, &keys, rounds + 2);
    let _ = client.quit().await;

    // Every key carries its TTL; the tagged keys of one account share a slot.
    let primary = cluster.primaries()[0];
    let mut node = primary.client();
    let ttls = keys.iter().step_by(97).filter(|key| {
        let owner = cluster.primary_port_of(slot_of(key));
        if owner != primary.port {
            return false;
        }
        assert!(node.ttl(key) > 86_000, "{key}");
        true
    });
    assert!(ttls.count() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_run_loses_and_doubles_nothing() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let sink = Arc::new(cluster_sink(&cluster.url()).await);
    let keys = Arc::new(plain_keys(5_000));
    let progress = Arc::new(AtomicU64::new(0));
    let rounds = 14;
    let run = run_rounds(sink.clone(), keys.clone(), rounds, progress.clone());

    wait_for_round(&progress, 3).await;
    let victim = slot_of(&keys[0]);
    cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_primary_of(victim);
        cluster
    })
    .await
    .unwrap();
    let writer = run.await.unwrap();
    eprintln!(
        "after the kill: {} failed writes, {} duplicate batches",
        writer.failed_writes, writer.duplicates
    );
    assert!(
        progress.load(Ordering::Relaxed) == rounds,
        "every round settled"
    );
    assert_eq!(cluster.primaries().len(), 3, "the replica took over");
    assert_totals(&cluster, &keys, rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_resharded_mid_run_add_up_exactly() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .unwrap(),
    );
    let sink = Arc::new(cluster_sink(&cluster.url()).await);
    let keys = Arc::new(plain_keys(5_000));
    let owner_before = cluster.primary_port_of(slot_of(&keys[0]));
    let progress = Arc::new(AtomicU64::new(0));
    // Enough rounds to outlast the reshard; the loop below checks that they did.
    let rounds = 40;
    let run = run_rounds(sink.clone(), keys.clone(), rounds, progress.clone());

    wait_for_round(&progress, 2).await;
    let moving = cluster.clone();
    let first_slot = slot_of(&keys[0]);
    tokio::task::spawn_blocking(move || moving.reshard(first_slot, 400))
        .await
        .unwrap();
    let rounds_during = progress.load(Ordering::Relaxed);
    assert!(
        rounds_during < rounds,
        "the rounds ended before the reshard did: it was not mid-run"
    );
    let writer = run.await.unwrap();
    eprintln!(
        "reshard ended after round {rounds_during}; {} failed writes, {} duplicates",
        writer.failed_writes, writer.duplicates
    );
    assert_totals(&cluster, &keys, rounds);
    // Slots did move: 400 of the source's slots have a new owner.
    let moved = (0..16_384u16)
        .filter(|&slot| cluster.primary_port_of(slot) != owner_before)
        .count();
    assert!(moved > 16_384 * 2 / 3, "{moved} slots off the source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_from_one_node_never_change_the_totals() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let keys = plain_keys(5_000);
    // A proxy in front of the primary of keys[0], announced by that node as its address: the
    // sink (and the replica) reach it only through the proxy.
    let behind = cluster.primary_port_of(slot_of(&keys[0]));
    let node = cluster
        .nodes()
        .iter()
        .find(|n| n.port == behind)
        .expect("ours");
    let proxy = Proxy::start(node.addr()).await;
    let announced = proxy.addr().port();
    let announcing = tokio::task::spawn_blocking(move || {
        cluster.announce_port(behind, announced);
        cluster
    });
    let cluster = announcing.await.unwrap();
    let sink = cluster_sink(&cluster.url()).await;
    sink.load_script().await.unwrap();
    let mut writer = Writer::new();
    let rounds = 6;
    let mut lost = 0;
    for round in 0..rounds {
        // The node runs the calls, the replies never arrive, the connection is cut. Every other
        // round loses fred's re-send too, so the sink answers an error and the batches come
        // back in the next write.
        let times = 1 + round as u32 % 2;
        proxy.lose_replies_to("EVALSHA", times);
        lost += u64::from(times);
        let batches = writer.round(&keys, round);
        writer.settle(&sink, batches).await;
        assert_eq!(proxy.faults_fired(), lost, "round {round}");
    }
    eprintln!(
        "{} replies lost, {} failed writes, {} duplicate batches",
        proxy.faults_fired(),
        writer.failed_writes,
        writer.duplicates
    );
    assert!(
        writer.duplicates > 0,
        "no call was applied before its reply was lost"
    );
    assert_totals(&cluster, &keys, rounds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_state_is_bounded_by_writers_and_slots() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let sink = cluster_sink(&cluster.url()).await;
    let keys = plain_keys(20_000);
    let slots: HashSet<u16> = keys.iter().map(|k| slot_of(k)).collect();
    let records_of = |writer: &Writer| {
        cluster.scan(&format!(
            "{}:*:{:016x}",
            shardmeter::sink::redis::DEFAULT_MARKER_PREFIX,
            writer.id
        ))
    };

    let mut first = Writer::new();
    for round in 0..2 {
        let batches = first.round(&keys, round);
        first.settle(&sink, batches).await;
    }
    let records = records_of(&first);
    assert_eq!(records.len(), slots.len(), "one record per slot written");
    // More rounds (80 batches by now) add no record.
    for round in 2..5 {
        let batches = first.round(&keys, round);
        first.settle(&sink, batches).await;
    }
    assert_eq!(records_of(&first).len(), slots.len());

    // A second writer (a restarted process) has records of its own, as many.
    let mut second = Writer::new();
    let batches = second.round(&keys, 5);
    second.settle(&sink, batches).await;
    assert_eq!(records_of(&second).len(), slots.len());

    // Records sit outside the counters' prefix; they expire after the dedup window.
    let counters = cluster.scan("fair_use:dg_budget:*");
    assert_eq!(counters.len(), keys.len());
    let mut node = cluster.primaries()[0].client();
    let mine = records_of(&first);
    let local: Vec<&String> = mine
        .iter()
        .filter(|r| cluster.primary_port_of(slot_of(r)) == cluster.primaries()[0].port)
        .take(5)
        .collect();
    assert!(!local.is_empty());
    for record in local {
        let ttl = node.ttl(record);
        assert!((86_000..=86_400).contains(&ttl), "{record}: {ttl}");
        // The highest sequence of the last round's batches with a key in that slot.
        let sequence: u64 = node.get(record).unwrap().parse().unwrap();
        assert!((first.next_sequence - 40..first.next_sequence).contains(&sequence));
    }

    // What one writer's records cost, by deleting them.
    let before = cluster.used_memory();
    assert_eq!(cluster.delete(&mine), mine.len() as u64);
    let bytes = before.saturating_sub(cluster.used_memory());
    let per_record = bytes as f64 / mine.len() as f64;
    eprintln!(
        "{} records, {bytes} bytes ({per_record:.0} B each): {:.2} MB per writer at 16,384 slots",
        mine.len(),
        per_record * 16_384.0 / 1e6
    );
    assert!(per_record < 250.0, "{per_record} B per record");
}

// ---------------------------------------------------------------------------------------------
// Two OS processes
// ---------------------------------------------------------------------------------------------

const CHILD_URL: &str = "SHARDMETER_CLUSTER_TEST_CHILD_URL";
const CHILD_PREFIX: &str = "SHARDMETER_CLUSTER_TEST_CHILD_PREFIX";
const ACCOUNTS: usize = 300;
const RECORDS_PER_ACCOUNT: u64 = 40;

/// What each child process adds to account `i`.
fn child_total(i: usize) -> u64 {
    (1..=RECORDS_PER_ACCOUNT).map(|r| r + i as u64 % 5).sum()
}

/// Not a test on its own: the body of the gateway processes that
/// `two_processes_on_the_same_accounts` starts by running this test binary again with
/// `CHILD_URL` set. Without it, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_gateway_process() {
    let (Ok(url), Ok(prefix)) = (std::env::var(CHILD_URL), std::env::var(CHILD_PREFIX)) else {
        return;
    };
    let engine = Engine::builder()
        .flush_interval(Duration::from_millis(100))
        .keys(KeyScheme::new(prefix))
        .sink(RedisSink::connect(&url).await.expect("connect"))
        .build()
        .unwrap();
    for r in 1..=RECORDS_PER_ACCOUNT {
        for i in 0..ACCOUNTS {
            engine
                .record(&format!("acct-{i}"), r + i as u64 % 5)
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = engine.shutdown().await.unwrap();
    assert!(report.is_complete(), "{report:?}");
}

fn spawn_child(url: &str, prefix: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_gateway_process", "--nocapture"])
        .env(CHILD_URL, url)
        .env(CHILD_PREFIX, prefix)
        .spawn()
        .expect("run the test binary again")
}

fn run_two_children(url: &str, prefix: &str) {
    let children = [spawn_child(url, prefix), spawn_child(url, prefix)];
    for mut child in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a gateway process failed: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_the_same_accounts() {
    let key = |prefix: &str, i: usize| format!("{prefix}:acct-{i}");

    // One Redis: the machine's shared one, under a prefix of this test's own.
    let keyspace = Keyspace::new(shared_redis(), "two-processes");
    let prefix = keyspace.prefix().to_owned();
    let url = format!("redis://{}", shared_redis());
    let (u, p) = (url.clone(), prefix.clone());
    tokio::task::spawn_blocking(move || run_two_children(&u, &p))
        .await
        .unwrap();
    let mut redis = RespClient::connect(shared_redis()).unwrap();
    for i in 0..ACCOUNTS {
        assert_eq!(
            redis.get_i64(&key(&prefix, i)),
            Some(2 * child_total(i) as i64),
            "acct-{i} on one Redis"
        );
    }

    // The Cluster.
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster = RedisCluster::start();
        run_two_children(&cluster.url(), "two");
        cluster
    })
    .await
    .unwrap();
    let keys: Vec<String> = (0..ACCOUNTS).map(|i| key("two", i)).collect();
    for (i, value) in cluster.get_all(&keys).into_iter().enumerate() {
        assert_eq!(
            value,
            Some((2 * child_total(i)).to_string()),
            "acct-{i} on the Cluster"
        );
    }
}
