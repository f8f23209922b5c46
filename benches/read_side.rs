//! The read side's cost on the gateway's threads, in one run so every ratio is a same-run ratio:
//!
//! | id | what one operation is |
//! | --- | --- |
//! | `add/budgets_off` | `ledger::Session::add` on a registered worker: the hot path without the read side |
//! | `add/budgets_on` | the engine's `Session::add` on a registered worker, the account tracked, with a limit |
//! | `check/session_is_exhausted` | `Session::is_exhausted()`: the per-chunk budget check |
//! | `check/session_usage` | `Session::usage()`: the published view, copied out |
//! | `check/engine_is_exhausted_by_name` | `Engine::is_exhausted(account)`: a registry look-up by name, then the check |
//!
//! Each `add` contender goes round-robin over 64 sessions, so that the time is the
//! instructions', not a store waiting on the previous one to the same cell (see `hot_path.rs`).
//!
//! Run: `cargo bench --bench read_side`; smoke: `cargo bench --bench read_side -- --test`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shardmeter::ledger::Ledger;
use shardmeter::{register_worker_thread, unregister_worker_thread};
use shardmeter::{Budgets, Engine, KeyScheme, MemorySink};
use std::hint::black_box;
use std::time::Duration;

/// Sessions visited round-robin by the `add` contenders.
const SESSIONS: usize = 64;
/// One audio chunk, in milliseconds.
const CHUNK_MS: u64 = 30;

fn read_side(c: &mut Criterion) {
    // Benchmarks run on this thread: register it, as a gateway registers its runtime's workers.
    register_worker_thread().expect("a worker index is free");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let engine = Engine::builder()
        .flush_interval(Duration::from_secs(3600))
        .keys(KeyScheme::daily_utc("bench"))
        .budgets(Budgets::per_bucket(u64::MAX))
        .worker_shards(2)
        .sink(MemorySink::new())
        .build()
        .expect("engine");
    let tracked: Vec<_> = (0..SESSIONS)
        .map(|i| engine.open_session(&format!("uid-{i}")).expect("slot"))
        .collect();
    // Let the flusher track the accounts and read their totals, as in a running gateway.
    runtime.block_on(async {
        for session in &tracked {
            assert!(session.synced(Duration::from_secs(10)).await);
        }
    });
    let (ledger, _sweeper) = Ledger::builder().worker_shards(2).build().expect("ledger");
    let plain: Vec<_> = (0..SESSIONS)
        .map(|i| ledger.open_session(&format!("uid-{i}")).expect("slot"))
        .collect();
    let amount = black_box(CHUNK_MS);

    let mut group = c.benchmark_group("add");
    group.throughput(Throughput::Elements(SESSIONS as u64));
    group.bench_function("budgets_off", |b| {
        b.iter(|| {
            for session in black_box(&plain) {
                session.add(amount);
            }
        })
    });
    group.bench_function("budgets_on", |b| {
        b.iter(|| {
            for session in black_box(&tracked) {
                session.add(amount);
            }
        })
    });
    group.finish();

    let mut group = c.benchmark_group("check");
    let session = black_box(&tracked[0]);
    group.bench_function("session_is_exhausted", |b| {
        b.iter(|| black_box(session.is_exhausted()))
    });
    group.bench_function("session_usage", |b| b.iter(|| black_box(session.usage())));
    group.bench_function("engine_is_exhausted_by_name", |b| {
        b.iter(|| black_box(engine.is_exhausted(black_box("uid-7"))))
    });
    group.finish();

    drop((tracked, plain));
    unregister_worker_thread();
}

criterion_group!(benches, read_side);
criterion_main!(benches);
