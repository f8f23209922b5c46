//! Flush throughput to Redis in accounts per second, against the server's own limit for the
//! same writes, in one run.
//!
//! | id | what one iteration times (N accounts, one element each) |
//! | --- | --- |
//! | `engine/N` | `Engine::flush_now` with N dirty accounts: sweep, per-key totals, batches of 500, one `EVALSHA` per batch through `RedisSink` (inside: `SET … GET` of the dedup record, `INCRBY` per key, `EXPIRE` for new keys and refreshes), replies parsed |
//! | `sink/N` | `RedisSink::write` of N increments in batches of 500, built beforehand: the sink alone, without the engine's sweep |
//! | `fred_pipeline/N` | one fred pipeline of N × (`INCRBY`, `EXPIRE`), as the reference gateway wrote: no dedup record, no script, no exactly-once |
//! | `server_incrby_expire/N` | the server's limit for the same writes: N × (`INCRBY`, `EXPIRE`) encoded beforehand and written on one raw socket while the replies are counted — what `redis-benchmark -P` measures, with the flush's commands and keys |
//! | `server_incrby/N` | the same with `INCRBY` alone (cf. `redis-benchmark -P 1000 -t incr`) |
//!
//!
//! A second group, `flush_plain_keys`, writes the reference deployment's plain keys
//! (`fair_use:dg_budget:uid-<i>:20261129`, no hash tag, spread over all 16,384 slots) through
//! `RedisSink::write` in batches of 500, to a `redis-server` of its own (`one_redis/N`) and to a
//! local 3-primary Redis Cluster (`cluster/N`, 3 replicas; `tests/support/cluster.rs`) in the
//! same run. After it (not with `--test`), a figures pass prints for both, at 100k accounts:
//! server calls per account per steady flush (primaries' `INFO commandstats`, script-internal
//! calls included) and the bytes of one writer's dedup records (Redis' `MEMORY USAGE` of each,
//! and `used_memory` when they are written and when they are deleted: allocator and hash-table
//! effects make those two differ). The records reach their bound (2,048 lanes on one Redis,
//! within the eleven flushes of 200 batches; one per slot written on a Cluster, within two) and
//! never grow after that, so that figure is also the state per writer per day.
//!
//! Before each timed flush every account gets one `add` (outside the timed span), so every
//! flush writes N keys; each iteration checks that it did. Sessions stay open and the interval is
//! an hour, so only `flush_now` flushes. All contenders write N distinct keys of the same shape
//! (`<prefix>:{acct-<i>}`) with a one-hour TTL.
//!
//! Needs the Redis on 127.0.0.1:6379 and fails with a clear message without it. Every key lives
//! under a unique prefix and is deleted at the end.
//!
//! Wall-clock rates on a shared 2-core machine swing with whatever else runs. So after the
//! criterion groups (not with `--test`), a CPU pass runs each 100k-account contender 5 times
//! against a `redis-server` of its own and prints the CPU time each costs per account: the
//! server's (`INFO cpu`) and this process' (`/proc/self/stat`). A pipelined contender cannot go
//! faster than one account per max(server, client) CPU time; the engine adds its sweep, which runs
//! before its write. The pass also runs `engine_own`: the same flushes to a sink that answers at
//! once and keeps nothing, whose client CPU is the engine's own work per account (sweep, totals,
//! batches, the read side, settling, and the runtime around them), the figure behind "engine CPU
//! at most 0.3 µs per account per flush".
//!
//! Last, a polls pass (not with `--test`; alone with `-- polls`, a few minutes) opens a million
//! sessions on a million slots with a `RedisSink`, flushes them all with `flush_now` three
//! times, then twice at once, and prints the longest poll of the engine's tasks (the flusher and
//! the write and read tasks it spawns; `stats().longest_flusher_poll_micros`) and how many used
//! over 1 ms of CPU: the figures behind "no poll longer than 1 ms". Beside them, in the same run,
//! a probe task polls the same work every 5 ms, in turn a ~0.3 ms computation, random loads from
//! a 1 GiB buffer, and page faults of fresh memory, and prints how many of its polls of each
//! kind the machine alone pushed over 1 ms of CPU (`NoiseProbe`): on a guest whose clock charges
//! it time it did not compute, or whose page faults are sometimes slow, a few engine polls over
//! 1 ms are that noise, not work.
//!
//! Run: `cargo bench --bench flush`; `-- flush_plain_keys` for the Cluster group, then the figures
//! and CPU passes; `-- cpu`, `-- figures` or `-- polls` for that pass alone. Smoke
//! (one iteration each): `cargo bench --bench flush -- --test`.

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use fred::clients::Pipeline;
use fred::prelude::{Builder, Client, ClientLike, Config, KeysInterface, Value};
use shardmeter::sink::redis::{RedisSink, DEFAULT_MARKER_PREFIX};
use shardmeter::sink::{Batch, BatchId, BatchOutcome, Increment, KeyOutcome, Sink, SinkError};
use shardmeter::{Engine, KeyScheme, Session, Ttl};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCOUNTS: [usize; 3] = [1_000, 10_000, 100_000];
const BATCH_SIZE: usize = 500;
const TTL: Duration = Duration::from_secs(3600);
const AMOUNT: u64 = 30;

fn flush_to_redis(c: &mut Criterion) {
    let addr = support::shared_redis();
    let url = format!("redis://{addr}");
    let keyspace = support::Keyspace::new(addr, "bench-flush");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut group = c.benchmark_group("flush_to_redis");
    // A flush of 100k accounts takes a fraction of a second: few samples of one iteration.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));

    for accounts in ACCOUNTS {
        group.throughput(Throughput::Elements(accounts as u64));
        let keys = |name: &str| -> Vec<String> {
            let prefix = keyspace.key(&format!("{name}{accounts}"));
            (0..accounts)
                .map(|i| format!("{prefix}:{{acct-{i}}}"))
                .collect()
        };

        // The engine with the Redis sink.
        let (engine, sessions) = runtime.block_on(engine_with_sessions(&url, &keyspace, accounts));
        group.bench_function(BenchmarkId::new("engine", accounts), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    for session in &sessions {
                        session.add(AMOUNT);
                    }
                    let start = Instant::now();
                    let report = runtime.block_on(engine.flush_now()).expect("flush");
                    timed += start.elapsed();
                    assert_eq!(report.keys_written, accounts as u64, "every key written");
                }
                timed
            })
        });
        drop(sessions);
        let report = runtime.block_on(engine.shutdown()).expect("shutdown");
        assert!(report.is_complete(), "{report:?}");

        // The sink alone.
        let sink = runtime.block_on(redis_sink(&url, &keyspace));
        let sink_keys = keys("sink");
        let mut writer = BatchWriter::new();
        group.bench_function(BenchmarkId::new("sink", accounts), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| writer.write(&runtime, &sink, &sink_keys))
                    .sum()
            })
        });
        drop(sink);

        // The reference gateway's pipeline, with fred's defaults.
        let client = runtime.block_on(fred_client(&url));
        let pipeline = runtime.block_on(fred_pipeline(&client, &keys("fred")));
        group.bench_function(BenchmarkId::new("fred_pipeline", accounts), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    // fred copies the queued commands on every send.
                    let start = Instant::now();
                    let replies: Vec<Result<Value, _>> = runtime.block_on(pipeline.try_all());
                    timed += start.elapsed();
                    assert_eq!(replies.len(), 2 * accounts);
                    assert!(replies.iter().all(Result::is_ok), "a command failed");
                }
                timed
            })
        });
        runtime.block_on(async {
            let _ = client.quit().await;
        });

        // The server's limit.
        for (name, with_expire) in [("server_incrby_expire", true), ("server_incrby", false)] {
            let raw = RawPipeline::new(addr, &keys(name), with_expire);
            group.bench_function(BenchmarkId::new(name, accounts), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| raw.run()).sum())
            });
        }
    }
    group.finish();
    drop(keyspace); // deletes every key of the run
}

/// A sink on `url` with its dedup records under `keyspace` and the script loaded.
async fn redis_sink(url: &str, keyspace: &support::Keyspace) -> RedisSink {
    let sink = RedisSink::builder()
        .marker_prefix(keyspace.key("batch"))
        .command_timeout(Duration::from_secs(60))
        .connect(url)
        .await
        .expect("RedisSink::connect");
    sink.load_script().await.expect("SCRIPT LOAD");
    sink
}

/// A fred client with default settings (and a generous timeout for 200k-command pipelines).
async fn fred_client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("url"))
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(60))
        .build()
        .expect("client");
    client.init().await.expect("connect");
    client
}

/// A pipeline of `INCRBY` + `EXPIRE` per key, queued once and sent by each `try_all`.
async fn fred_pipeline(client: &Client, keys: &[String]) -> Pipeline<Client> {
    let pipeline = client.pipeline();
    for key in keys {
        let _: () = pipeline.incr_by(key, AMOUNT as i64).await.expect("queue");
        let _: () = pipeline
            .expire(key, TTL.as_secs() as i64, None)
            .await
            .expect("queue");
    }
    pipeline
}

/// An engine flushing to `url` only on `flush_now`, and one open session per account.
async fn engine_with_sessions(
    url: &str,
    keyspace: &support::Keyspace,
    accounts: usize,
) -> (Engine, Vec<Session>) {
    let sink = redis_sink(url, keyspace).await;
    engine_over(sink, &keyspace.key(&format!("engine{accounts}")), accounts)
}

/// An engine flushing to `sink` only on `flush_now`, and one open session per account.
fn engine_over(sink: impl Sink, prefix: &str, accounts: usize) -> (Engine, Vec<Session>) {
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .capacity(accounts.next_power_of_two().max(1024))
        .batch_size(BATCH_SIZE)
        .write_timeout(Duration::from_secs(60))
        .keys(KeyScheme::new(prefix).ttl(Ttl::Fixed(TTL)))
        .sink(sink)
        .build()
        .expect("engine");
    let sessions = (0..accounts)
        .map(|i| engine.open_session(&format!("acct-{i}")).expect("session"))
        .collect();
    (engine, sessions)
}

/// Batches of `BATCH_SIZE` increments of `keys`, with fresh ids.
fn batches(keys: &[String], writer: u64, sequence: &mut u64) -> Vec<Batch> {
    keys.chunks(BATCH_SIZE)
        .map(|chunk| {
            *sequence += 1;
            Batch {
                id: BatchId {
                    writer,
                    sequence: *sequence,
                },
                increments: chunk
                    .iter()
                    .map(|key| Increment {
                        key: key.as_str().into(),
                        amount: AMOUNT,
                        ttl: TTL,
                    })
                    .collect(),
            }
        })
        .collect()
}

/// One writer's fresh batches, as the engine sends them: each write takes the next sequence
/// numbers, so the sink never mistakes it for a re-send.
struct BatchWriter {
    writer: u64,
    sequence: u64,
}

impl BatchWriter {
    fn new() -> Self {
        Self {
            writer: support::unique_u64(),
            sequence: 0,
        }
    }

    /// Writes `keys` through `sink` in batches of [`BATCH_SIZE`] and checks that every batch
    /// applied. Returns how long the write took (building the batches is not timed).
    fn write(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        sink: &RedisSink,
        keys: &[String],
    ) -> Duration {
        let batches = batches(keys, self.writer, &mut self.sequence);
        let start = Instant::now();
        let results = runtime.block_on(sink.write(&batches));
        let took = start.elapsed();
        assert!(results.iter().all(Result::is_ok), "a batch failed");
        took
    }
}

/// Commands encoded once, written on one raw connection while the replies are counted: close
/// to what the server can do, with almost no client cost.
struct RawPipeline {
    stream: TcpStream,
    request: Vec<u8>,
    replies: usize,
}

impl RawPipeline {
    fn new(addr: SocketAddr, keys: &[String], with_expire: bool) -> Self {
        let amount = AMOUNT.to_string();
        let ttl = TTL.as_secs().to_string();
        let mut request = Vec::new();
        for key in keys {
            encode(&mut request, &["INCRBY", key, &amount]);
            if with_expire {
                encode(&mut request, &["EXPIRE", key, &ttl]);
            }
        }
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let replies = keys.len() * if with_expire { 2 } else { 1 };
        Self {
            stream,
            request,
            replies,
        }
    }

    /// Sends everything and waits for every reply; returns the time taken.
    fn run(&self) -> Duration {
        let mut reader = &self.stream;
        let mut writer = &self.stream;
        let mut buffer = vec![0u8; 1 << 16];
        let start = Instant::now();
        std::thread::scope(|scope| {
            // Write from another thread, so neither side's socket buffer fills up and stalls.
            let request = &self.request;
            scope.spawn(move || writer.write_all(request).expect("write"));
            // Every reply is an integer (`:<n>\r\n`): one line each.
            let mut lines = 0;
            while lines < self.replies {
                let n = reader.read(&mut buffer).expect("read");
                assert!(n > 0, "connection closed");
                assert!(!buffer[..n].contains(&b'-'), "an error reply");
                lines += buffer[..n].iter().filter(|&&b| b == b'\n').count();
            }
        });
        start.elapsed()
    }
}

fn encode(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
}

/// Whether the figures pass `name` (`cpu`, `figures` or `polls`) runs: only under `cargo bench`
/// (which passes `--bench`; `cargo test --all-targets` runs this binary without it, in a debug
/// build, where criterion only checks that each group runs once), never with `--test` or
/// `--list`. A filter argument that names a pass runs it alone; another filter (a criterion
/// group) runs `cpu` and `figures` after its group, not `polls`.
fn pass_wanted(name: &str) -> bool {
    const PASSES: [&str; 3] = ["cpu", "figures", "polls"];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benchmarking = args.iter().any(|arg| arg == "--bench");
    if !benchmarking || args.iter().any(|arg| arg == "--test" || arg == "--list") {
        return false;
    }
    // Criterion takes one filter.
    if let Some(named) = args.iter().find(|arg| PASSES.contains(&arg.as_str())) {
        return named == name;
    }
    let filtered = args.iter().any(|arg| !arg.starts_with('-'));
    name != "polls" || !filtered
}

/// CPU time per account of each contender at 100k accounts (see the module docs).
fn cpu_per_account() {
    if !pass_wanted("cpu") {
        return;
    }
    const N: usize = 100_000;
    const ROUNDS: u32 = 5;
    let server = support::RedisServer::start();
    let url = server.url();
    let keyspace = support::Keyspace::new(server.addr(), "cpu");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let keys = |name: &str| -> Vec<String> {
        (0..N)
            .map(|i| keyspace.key(&format!("{name}:{{acct-{i}}}")))
            .collect()
    };
    let measure = |name: &str, run: &mut dyn FnMut() -> Duration| {
        run(); // warm-up: keys created, script loaded
        let (server_before, client_before) = (server_cpu(&server), client_cpu());
        let wall: Duration = (0..ROUNDS).map(|_| run()).sum();
        let server_cpu = server_cpu(&server) - server_before;
        let client_cpu = client_cpu() - client_before;
        let per = |seconds: f64| seconds * 1e6 / f64::from(ROUNDS) / N as f64;
        eprintln!(
            "cpu/{name:<22} wall {:6.2} us/account ({:4.0}k/s)   server CPU {:5.2} us/account   client CPU {:5.2} us/account",
            per(wall.as_secs_f64()),
            f64::from(ROUNDS) * N as f64 / wall.as_secs_f64() / 1e3,
            per(server_cpu),
            per(client_cpu),
        );
    };

    let flush_all = |engine: &Engine, sessions: &[Session]| {
        sessions.iter().for_each(|session| session.add(AMOUNT));
        let start = Instant::now();
        let report = runtime.block_on(engine.flush_now()).expect("flush");
        assert_eq!(report.keys_written, N as u64, "every key written");
        start.elapsed()
    };
    let (engine, sessions) = runtime.block_on(engine_with_sessions(&url, &keyspace, N));
    measure("engine", &mut || flush_all(&engine, &sessions));
    drop(sessions);
    runtime.block_on(engine.shutdown()).expect("shutdown");

    // The engine's own part: the same flushes to a sink that answers at once.
    let (engine, sessions) = runtime.block_on(async { engine_over(AckSink, "own", N) });
    measure("engine_own", &mut || flush_all(&engine, &sessions));
    drop(sessions);
    runtime.block_on(engine.shutdown()).expect("shutdown");

    let sink = runtime.block_on(redis_sink(&url, &keyspace));
    let sink_keys = keys("sink");
    let mut writer = BatchWriter::new();
    measure("sink", &mut || writer.write(&runtime, &sink, &sink_keys));

    let client = runtime.block_on(fred_client(&url));
    let pipeline = runtime.block_on(fred_pipeline(&client, &keys("fred")));
    measure("fred_pipeline", &mut || {
        let start = Instant::now();
        let replies: Vec<Result<Value, _>> = runtime.block_on(pipeline.try_all());
        assert!(replies.iter().all(Result::is_ok), "a command failed");
        start.elapsed()
    });
    runtime.block_on(async {
        let _ = client.quit().await;
    });

    let raw = RawPipeline::new(server.addr(), &keys("raw"), true);
    measure("server_incrby_expire", &mut || raw.run());
}

/// A sink that applies every increment at once and keeps nothing, so that a flush through it
/// costs only the engine's own work: sweep, totals, batches, the read side and settling. Every
/// key's new total is its amount, as for a key the write created.
struct AckSink;

impl Sink for AckSink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        batches
            .iter()
            .map(|batch| {
                let outcomes = batch.increments.iter().map(|increment| KeyOutcome::Added {
                    total: increment.amount as i64,
                });
                Ok(BatchOutcome::Applied(outcomes.collect()))
            })
            .collect()
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        Ok(vec![None; keys.len()])
    }
}

/// CPU seconds the server has used (`INFO cpu`).
fn server_cpu(server: &support::RedisServer) -> f64 {
    let info = match server.client().command(&["INFO", "cpu"]) {
        Ok(support::Reply::Bulk(Some(text))) => String::from_utf8_lossy(&text).into_owned(),
        other => panic!("INFO cpu: {other:?}"),
    };
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| *name == "used_cpu_sys" || *name == "used_cpu_user")
        .map(|(_, value)| value.trim().parse::<f64>().expect("a number"))
        .sum()
}

/// CPU seconds this process has used (utime + stime of `/proc/self/stat`, in 1/100 s).
fn client_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| fields[i].parse::<f64>().expect("ticks");
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// The reference deployment's keys: no hash tag.
fn plain_keys(accounts: usize) -> Vec<String> {
    (0..accounts)
        .map(|i| format!("fair_use:dg_budget:uid-{i}:20261129"))
        .collect()
}

/// A sink on `url` (one Redis or a Cluster) with its records under `prefix` and the script
/// loaded.
async fn plain_sink(url: &str, prefix: &str) -> RedisSink {
    let sink = RedisSink::builder()
        .marker_prefix(prefix)
        .command_timeout(Duration::from_secs(60))
        .connect(url)
        .await
        .expect("RedisSink::connect");
    sink.load_script().await.expect("SCRIPT LOAD");
    sink
}

fn flush_plain_keys(c: &mut Criterion) {
    let server = support::RedisServer::start();
    let cluster = support::cluster::RedisCluster::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let one = runtime.block_on(plain_sink(&server.url(), DEFAULT_MARKER_PREFIX));
    let clustered = runtime.block_on(plain_sink(&cluster.url(), DEFAULT_MARKER_PREFIX));

    let mut group = c.benchmark_group("flush_plain_keys");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for accounts in [10_000, 100_000] {
        group.throughput(Throughput::Elements(accounts as u64));
        let keys = plain_keys(accounts);
        for (name, sink) in [("one_redis", &one), ("cluster", &clustered)] {
            let mut writer = BatchWriter::new();
            group.bench_function(BenchmarkId::new(name, accounts), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| writer.write(&runtime, sink, &keys))
                        .sum()
                })
            });
        }
    }
    group.finish();
    drop((one, clustered));

    if pass_wanted("figures") {
        plain_key_figures(&runtime, &server, &cluster);
    }
}

/// Server calls per account per steady flush and one writer's dedup bytes, at 100k accounts,
/// with the default record prefix and with a 4-byte one: record keys of at most 28 bytes fit
/// the allocator's 32-byte class instead of the 48-byte one.
fn plain_key_figures(
    runtime: &tokio::runtime::Runtime,
    server: &support::RedisServer,
    cluster: &support::cluster::RedisCluster,
) {
    const N: usize = 100_000;
    // With the first, 11 flushes of 200 batches: more sequences than the 2,048 lanes of one Redis.
    const ROUNDS: u64 = 10;
    let keys = plain_keys(N);
    let single = Target {
        name: "one_redis",
        calls: &|| {
            server
                .commandstats()
                .0
                .iter()
                .filter(|(name, _)| !matches!(name.as_str(), "info" | "config|resetstat"))
                .map(|(_, stat)| stat.calls)
                .sum()
        },
        reset: &|| {
            server
                .client()
                .command(&["CONFIG", "RESETSTAT"])
                .expect("RESETSTAT");
        },
        scan: &|pattern| server.client().scan(pattern),
        used_memory: &|| {
            server.client().info("memory")["used_memory"]
                .parse()
                .unwrap()
        },
        memory_usage: &|records| {
            let mut client = server.client();
            records
                .iter()
                .map(
                    |record| match client.command(&["MEMORY", "USAGE", record]) {
                        Ok(support::Reply::Integer(bytes)) => bytes as u64,
                        other => panic!("MEMORY USAGE: {other:?}"),
                    },
                )
                .sum()
        },
        delete: &|records| {
            let mut client = server.client();
            for record in records {
                client.command(&["DEL", record]).expect("DEL");
            }
        },
    };
    let clustered = Target {
        name: "cluster",
        calls: &|| cluster.server_calls(),
        reset: &|| cluster.reset_stats(),
        scan: &|pattern| cluster.scan(pattern),
        used_memory: &|| cluster.used_memory(),
        memory_usage: &|records| cluster.memory_usage(records),
        delete: &|records| {
            cluster.delete(records);
        },
    };
    let runs = [
        (&single, server.url(), DEFAULT_MARKER_PREFIX),
        (&clustered, cluster.url(), DEFAULT_MARKER_PREFIX),
        (&clustered, cluster.url(), "sm:d"),
    ];
    for (target, url, prefix) in runs {
        let sink = runtime.block_on(plain_sink(&url, prefix));
        let mut writer = BatchWriter::new();
        let mut flush = || {
            writer.write(runtime, &sink, &keys);
        };
        // The counters exist from the criterion group: what the first flushes add is records.
        let empty = (target.used_memory)();
        flush();
        (target.reset)();
        for _ in 0..ROUNDS {
            flush();
        }
        let per_account = (target.calls)() as f64 / (ROUNDS as f64 * N as f64);
        let records = (target.scan)(&format!("{prefix}:*:{:016x}", writer.writer));
        let usage = (target.memory_usage)(&records);
        let before = (target.used_memory)();
        let added = before.saturating_sub(empty);
        (target.delete)(&records);
        let freed = before.saturating_sub((target.used_memory)());
        let each = |bytes: u64| bytes as f64 / records.len().max(1) as f64;
        eprintln!(
            "figures/{:<9} {N} accounts: {per_account:.3} server calls per account per flush; \
             dedup state of one writer ({prefix}): {} records, MEMORY USAGE {usage} B ({:.0} B \
             each), used_memory +{added} B when written ({:.0} B each), -{freed} B when deleted \
             ({:.0} B each)",
            target.name,
            records.len(),
            each(usage),
            each(added),
            each(freed),
        );
    }
}

/// What the figures pass needs of one Redis or of a Cluster.
struct Target<'a> {
    name: &'static str,
    calls: &'a dyn Fn() -> u64,
    reset: &'a dyn Fn(),
    scan: &'a dyn Fn(&str) -> Vec<String>,
    used_memory: &'a dyn Fn() -> u64,
    memory_usage: &'a dyn Fn(&[String]) -> u64,
    delete: &'a dyn Fn(&[String]),
}

criterion_group!(benches, flush_to_redis, flush_plain_keys);
criterion_main!(benches, cpu_per_account, flusher_polls);

/// The longest poll of the flusher task (`Stats::longest_flusher_poll_micros`) at 1M slots with
/// 1M dirty accounts, against a `redis-server` of its own: one `flush_now` alone, then two at
/// once (the second sweeps while the first round is being written), each flush writing every
/// account, then the shutdown. Prints the figures; asserts only that every key was written.
fn flusher_polls() {
    if !pass_wanted("polls") {
        return;
    }
    const SLOTS: usize = 1 << 20;
    const ACCOUNTS: usize = 1_000_000;
    let server = support::RedisServer::start();
    let keyspace = support::Keyspace::new(server.addr(), "polls");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let probe = NoiseProbe::start(&runtime);
    let (engine, sessions) = runtime.block_on(async {
        let engine = Engine::builder()
            .flush_interval(Duration::from_secs(3600))
            .capacity(SLOTS)
            .batch_size(BATCH_SIZE)
            .write_timeout(Duration::from_secs(120))
            .keys(KeyScheme::new(keyspace.key("polls")).ttl(Ttl::Fixed(TTL)))
            .sink(redis_sink(&server.url(), &keyspace).await)
            .build()
            .expect("engine");
        let sessions: Vec<Session> = (0..ACCOUNTS)
            .map(|i| engine.open_session(&format!("acct-{i}")).expect("session"))
            .collect();
        // Every account tracked and read once, so the flushes below are steady ones.
        while engine.stats().tracked_accounts < ACCOUNTS as u64
            || engine.stats().account_reads < ACCOUNTS as u64
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (engine, sessions)
    });
    // Wall-clock time (what the gateway's tasks on that worker waited) and CPU time (the work
    // itself, without the OS's preemptions on this shared machine), each the most in one poll.
    let longest = || {
        let stats = engine.stats();
        format!(
            "{} us (CPU {} us); polls over 1 ms of CPU so far: {} of {}",
            stats.longest_flusher_poll_micros,
            stats.longest_flusher_poll_cpu_micros,
            stats.long_flusher_polls,
            stats.flusher_polls
        )
    };
    eprintln!(
        "polls/open     {ACCOUNTS} sessions on {SLOTS} slots: longest flusher poll {}",
        longest()
    );
    for round in 0..3 {
        sessions.iter().for_each(|session| session.add(AMOUNT));
        let start = Instant::now();
        let report = runtime.block_on(engine.flush_now()).expect("flush");
        assert_eq!(report.keys_written, ACCOUNTS as u64, "every key written");
        eprintln!(
            "polls/flush{round}    {ACCOUNTS} accounts in {:?}: longest flusher poll {}",
            start.elapsed(),
            longest()
        );
    }
    sessions.iter().for_each(|session| session.add(AMOUNT));
    let written_before = engine.stats().amount_written;
    let start = Instant::now();
    runtime.block_on(async {
        let first = engine.flush_now();
        let second = async {
            // Once the first round is being written: its sweep is then done.
            tokio::time::sleep(Duration::from_millis(200)).await;
            sessions.iter().for_each(|session| session.add(AMOUNT));
            engine.flush_now().await
        };
        let (first, second) = tokio::join!(first, second);
        first.expect("flush");
        second.expect("flush");
    });
    assert_eq!(
        engine.stats().amount_written - written_before,
        2 * ACCOUNTS as u64 * AMOUNT,
        "both adds of every account written"
    );
    eprintln!(
        "polls/overlap  2 x {ACCOUNTS} accounts in {:?}: longest flusher poll {}",
        start.elapsed(),
        longest()
    );
    drop(sessions);
    let report = runtime.block_on(engine.shutdown()).expect("shutdown");
    assert!(report.is_complete(), "{report:?}");
    // The sessions ended before the shutdown: its sweep collects a million ended sessions.
    // Wait for the flusher task to end, so that its last polls are counted.
    runtime.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
    eprintln!(
        "polls/shutdown (1M sessions ended before it): longest flusher poll {}",
        longest()
    );
    eprintln!("polls/noise    {}", runtime.block_on(probe.stop()));
}

/// The machine's own noise, measured beside the flusher in the same run: a task on the same
/// runtime whose polls do the same work, about as long as the engine's time budget for a slice of
/// work (~0.3 ms; the faulting kind ~0.2 ms), timed as the engine times its polls (the thread's CPU clock), every 5 ms (~6% of
/// one CPU). A probe poll over 1 ms did no more work than the others: the clock charged it time
/// the thread did not compute (a hypervisor preempting the guest, interrupts, the host's own
/// handling of the guest's memory). So the share of its polls over 1 ms is what the machine
/// alone gives a poll of the engine's length; a flusher whose polls go over 1 ms at about that
/// rate shows noise, not work.
///
/// The polls take turns at three kinds of work: a computation in registers; loads from random
/// places of a buffer of [`PROBE_BUFFER_BYTES`] (faulted in beforehand), far beyond the caches,
/// as the engine's loads at a million accounts are; and writes to [`PROBE_FRESH_PAGES`] pages the
/// process never touched (mapped for the poll and unmapped after it), each a page fault, as the
/// engine's steps meet where a round's memory is new (batches, pipelines, tables). The probe
/// is not free: its buffer doubles the memory of the pass, and each unmapping makes the kernel
/// interrupt the other vCPU if a thread of this process runs there (a TLB shootdown, some µs,
/// ~70 times a second): far below the millisecond that the figures count.
struct NoiseProbe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<[Vec<Duration>; 3]>,
}

/// Iterations of the probe's computation: ~0.3 ms of CPU on the development machines.
const PROBE_WORK: u64 = 300_000;
/// The memory probe's buffer: 1 GiB, the order of what the engine touches at a million accounts
/// and more than any L3 cache of the machines here (300 MiB on the largest).
const PROBE_BUFFER_BYTES: usize = 1 << 30;
/// Random loads per memory-probe poll: ~0.3 ms of CPU on the development machines.
const PROBE_LOADS: u64 = 6_000;
/// Pages faulted in per fault-probe poll: a few times what one step of the engine faults in
/// (0-16 in `scripts/poll-trace.sh`'s traces).
const PROBE_FRESH_PAGES: usize = 64;

impl NoiseProbe {
    fn start(runtime: &tokio::runtime::Runtime) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Written whole, so that every page is faulted in before the first poll.
        let buffer = vec![1u64; PROBE_BUFFER_BYTES / 8];
        assert!(buffer.len().is_power_of_two(), "indices are masked");
        let task = runtime.spawn(async move {
            let mut polls = [Vec::new(), Vec::new(), Vec::new()];
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            // Relaxed: a flag polled every 5 ms; nothing is published with it.
            while !stopped.load(Ordering::Relaxed) {
                let kind = polls
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, p)| p.len())
                    .expect("kinds")
                    .0;
                let started = thread_cpu_time();
                match kind {
                    0 => {
                        std::hint::black_box((0..PROBE_WORK).fold(1u64, |acc, i| {
                            std::hint::black_box(acc.wrapping_mul(31).wrapping_add(i))
                        }));
                    }
                    1 => {
                        // Independent loads at places a multiplicative hash picks: many in flight
                        // at once, as the engine's prefetched ones are.
                        let mask = buffer.len() as u64 - 1;
                        let sum = (0..PROBE_LOADS).fold(0u64, |sum, i| {
                            let at = (seed.wrapping_add(i).wrapping_mul(0x2545_f491_4f6c_dd1d)
                                >> 17)
                                & mask;
                            sum.wrapping_add(buffer[at as usize])
                        });
                        seed = seed.wrapping_add(std::hint::black_box(sum));
                    }
                    _ => fault_in_fresh_pages(PROBE_FRESH_PAGES),
                }
                polls[kind].push(thread_cpu_time() - started);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            polls
        });
        Self { stop, task }
    }

    /// Stops the probe and describes its polls of each kind.
    async fn stop(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let [compute, memory, faults] = self.task.await.expect("the probe task");
        format!(
            "a probe task's polls: computing, {}; loading from memory, {}; faulting in \
             {PROBE_FRESH_PAGES} pages, {}",
            describe_probe_polls(compute),
            describe_probe_polls(memory),
            describe_probe_polls(faults)
        )
    }
}

/// Maps `pages` pages, writes a byte to each (a page fault each), and unmaps them.
fn fault_in_fresh_pages(pages: usize) {
    // SAFETY: `sysconf` reads a system constant; it takes no pointer.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    let length = pages * page;
    // SAFETY: an anonymous private mapping of `length` bytes at an address the kernel picks; it
    // aliases nothing, is written only within its length below, and is unmapped once.
    unsafe {
        let memory = libc::mmap(
            std::ptr::null_mut(),
            length,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(memory, libc::MAP_FAILED, "mmap");
        let bytes = memory.cast::<u8>();
        for at in (0..length).step_by(page) {
            bytes.add(at).write_volatile(1);
        }
        assert_eq!(libc::munmap(memory, length), 0, "munmap");
    }
}

fn describe_probe_polls(mut polls: Vec<Duration>) -> String {
    if polls.is_empty() {
        return "no polls".into();
    }
    polls.sort_unstable();
    let over = polls
        .iter()
        .filter(|cpu| **cpu > Duration::from_millis(1))
        .count();
    format!(
        "{} polls (median {} us of CPU): {over} over 1 ms of CPU ({:.2}%), longest {} us",
        polls.len(),
        polls[polls.len() / 2].as_micros(),
        over as f64 * 100.0 / polls.len() as f64,
        polls.last().expect("polls").as_micros()
    )
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, the engine's clock for its polls).
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` that the call only writes;
    // `CLOCK_THREAD_CPUTIME_ID` needs no other argument.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(result, 0, "a thread CPU clock");
    Duration::new(
        u64::try_from(now.tv_sec).expect("seconds"),
        u32::try_from(now.tv_nsec).expect("nanoseconds"),
    )
}
