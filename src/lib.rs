//! Lock-free, sharded, in-process usage accounting for high-concurrency realtime gateways.
//!
//! A speech gateway streams audio in ~20 ms chunks, 50 per second per session, and every chunk
//! costs its user metered time. Writing each chunk to Redis (`INCRBY` + `EXPIRE`) costs ~100 Redis
//! commands per second per session. shardmeter counts in process instead and writes per-account
//! totals once per interval and at session end:
//!
//! - [`Session::add`] is the hot path: on a registered worker thread, a `Relaxed` atomic load and
//!   store of a cell that only this thread writes (13 instructions once inlined, no atomic
//!   read-modify-write). No lock, no allocation, no syscall, no I/O.
//! - [`Session::is_exhausted`] is the budget check: one atomic load of what the flusher last
//!   published for the session's account (usage across every gateway process, from the totals
//!   Redis returns on each write), never a Redis read.
//! - One flusher task per [`Engine`] sweeps all shards every interval (60 s by default), at every
//!   time-bucket boundary and shortly after sessions end, sums per account key, and writes batches
//!   to a [`Sink`]: [`RedisSink`] (fred, exactly-once through a Lua script, single Redis or
//!   Cluster) or [`MemorySink`].
//! - Nothing is lost and nothing is counted twice: failed writes are retried with the same batch
//!   ids, which the sink applies at most once; shutdown reports exactly what it could not write.
//!
//! # Usage
//!
//! ```
//! use shardmeter::{Engine, KeyScheme, MemorySink};
//! use std::time::Duration;
//!
//! // Register the runtime's worker threads so `add` takes the single-writer fast path.
//! let runtime = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(2)
//!     .on_thread_start(|| {
//!         let _ = shardmeter::register_worker_thread();
//!     })
//!     .on_thread_stop(shardmeter::unregister_worker_thread)
//!     .enable_all()
//!     .build()?;
//!
//! runtime.block_on(async {
//!     let sink = MemorySink::new(); // or RedisSink::connect("redis://127.0.0.1:6379").await?
//!     let engine = Engine::builder()
//!         .flush_interval(Duration::from_secs(60))
//!         .keys(KeyScheme::daily_utc("fair_use:dg_budget"))
//!         .sink(sink.clone())
//!         .build()?;
//!
//!     let session = engine.open_session("uid-42")?; // per websocket
//!     let handler = tokio::spawn(async move {
//!         for _chunk in 0..50 {
//!             session.add(20); // per 20 ms audio chunk
//!         }
//!     }); // the session ends when its last handle drops
//!     handler.await.expect("handler panicked");
//!
//!     let report = engine.shutdown().await?;
//!     assert!(report.is_complete());
//!     assert_eq!(sink.totals().values().sum::<i64>(), 1000);
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layers
//!
//! - [`ledger`]: the lock-free core (slots, shards, sessions, the sweeper). Synchronous; knows
//!   nothing of tokio or Redis; modelled with loom (`loom-tests/`).
//! - [`engine`] (feature `engine`): the tokio flusher: schedule, per-key aggregation, time buckets,
//!   retries, shutdown. Knows nothing of shard layout.
//! - [`sink`] (feature `engine`; Redis with feature `redis`): where totals go.
//!
//! The design and its proofs are in `docs/design.md`, operations (configuration, failure modes,
//! what a crash loses) in `docs/operations.md`, measured figures in `docs/benchmarks.md`.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "engine")]
pub mod engine;
pub mod ledger;
mod loom;
#[cfg(any(feature = "engine", shardmeter_loom))]
mod seqlock;
#[cfg(feature = "engine")]
pub mod sink;

#[cfg(feature = "engine")]
pub use engine::{
    AccountUsage, Bucket, BucketLabel, BudgetStatus, Budgets, Clock, Engine, EngineBuilder,
    EngineError, FlushReport, KeyScheme, Session, ShutdownReport, StatsSnapshot, SystemClock, Ttl,
};
/// Without the engine, the ledger's session (with it, [`engine::Session`] wraps one).
#[cfg(not(feature = "engine"))]
pub use ledger::Session;
pub use ledger::{
    register_worker_thread, unregister_worker_thread, Ledger, LedgerError, Sweeper, Usage,
};
/// The read side's sequence lock, exported for the loom models only.
#[cfg(shardmeter_loom)]
pub use seqlock::SeqLock;
#[cfg(feature = "redis")]
pub use sink::redis::RedisSink;
#[cfg(feature = "engine")]
pub use sink::{MemorySink, Sink};

/// Compiles the README's examples as doctests, so they cannot drift from the API.
#[cfg(all(doctest, feature = "redis"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
