//! shardmeter: lock-free, sharded, in-process usage accounting.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "engine")]
pub mod engine;
pub mod ledger;
mod loom;
#[cfg(feature = "engine")]
pub mod sink;

#[cfg(feature = "engine")]
pub use engine::{
    Bucket, Clock, Engine, EngineBuilder, EngineError, FlushReport, KeyScheme, ShutdownReport,
    StatsSnapshot, SystemClock, Ttl,
};
pub use ledger::{
    register_worker_thread, unregister_worker_thread, Ledger, LedgerError, Session, Sweeper, Usage,
};
#[cfg(feature = "engine")]
pub use sink::{MemorySink, Sink};
