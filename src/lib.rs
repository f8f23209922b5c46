//! shardmeter: lock-free, sharded, in-process usage accounting.
#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ledger;
mod loom;

pub use ledger::{
    register_worker_thread, unregister_worker_thread, Ledger, LedgerError, Session, Sweeper, Usage,
};
