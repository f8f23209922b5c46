//! Worker threads: a registered thread owns one private shard in every ledger.
//!
//! A gateway registers the threads that call [`Session::add`](super::Session::add), typically
//! from tokio's `on_thread_start` hook. Registration claims the lowest free *worker index*; in
//! every ledger with more than that many worker shards, the shard at that index is written by
//! this thread alone, with a plain `load` + `store` (no read-modify-write). Threads that are not
//! registered, or whose index is beyond a ledger's worker shards, use the ledger's striped
//! shards instead, with a compare-and-swap loop (an atomic read-modify-write; a loop, not a
//! `fetch_add`, as the add saturates at `u64::MAX` rather than wrapping): slower, never wrong.
//!
//! # Synchronization
//!
//! A worker index is held by at most one live thread. It is claimed with a `compare_exchange`
//! (`Acquire`) and given back with `fetch_and` (`Release`). That pair orders the previous owner's
//! last store to any private cell before the next owner's first load of the same cell, which is
//! what makes the next owner's `load` + `store` exact (loom model `worker_handoff`).

use super::shard::WorkerProbe;
use super::LedgerError;
use crate::loom::{global, thread_local_const, AtomicU64, Ordering};
use std::cell::Cell;

/// How many threads can be registered as workers at once, process-wide.
pub const MAX_WORKERS: usize = 256;

const WORDS: usize = MAX_WORKERS / 64;

/// Bit `i` of the bitmap is set while worker index `i` is claimed.
struct WorkerRegistry {
    claimed: [AtomicU64; WORDS],
}

impl WorkerRegistry {
    fn new() -> Self {
        Self {
            claimed: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn claim(&self) -> Option<u32> {
        for (word_index, word) in self.claimed.iter().enumerate() {
            // Relaxed: only a guess at which bit is free; the CAS below decides.
            let mut bits = word.load(Ordering::Relaxed);
            while bits != u64::MAX {
                let bit = bits.trailing_ones();
                // Acquire on success: synchronizes with the `Release` in `release` by the thread
                // that held this index before, so its stores to private cells are visible here.
                match word.compare_exchange_weak(
                    bits,
                    bits | (1 << bit),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Some(word_index as u32 * 64 + bit),
                    Err(current) => bits = current,
                }
            }
        }
        None
    }

    fn release(&self, index: u32) {
        let word = &self.claimed[index as usize / 64];
        // Release: publishes this thread's last stores to its private cells to the next claimer.
        word.fetch_and(!(1u64 << (index % 64)), Ordering::Release);
    }
}

global! {
    static REGISTRY: WorkerRegistry = WorkerRegistry::new();
}

thread_local_const! {
    /// Read by every `add`: this thread's worker index, in the form `add` uses it.
    static WORKER: Cell<WorkerProbe> = Cell::new(WorkerProbe::NOT_A_WORKER);
}

/// `STRIPE_SEED` before its first use.
const NO_SEED: u32 = u32::MAX;

thread_local_const! {
    /// Lazily assigned spread-out number choosing an unregistered thread's striped shard.
    static STRIPE_SEED: Cell<u32> = Cell::new(NO_SEED);
}

/// Gives the worker index back when the thread exits without unregistering.
struct ReleaseOnExit;

impl Drop for ReleaseOnExit {
    fn drop(&mut self) {
        unregister_worker_thread();
    }
}

thread_local_const! {
    static RELEASE_ON_EXIT: ReleaseOnExit = ReleaseOnExit;
}

/// Makes the calling thread a worker: from now on its `add`s go to a shard only it writes.
///
/// Idempotent: a thread that is already registered gets its index again. The index is given
/// back by [`unregister_worker_thread`] or, at the latest, when the thread exits. Returns
/// [`LedgerError::TooManyWorkers`] when [`MAX_WORKERS`] threads are registered already; the
/// thread then keeps working through the striped shards.
///
/// ```
/// let runtime = tokio::runtime::Builder::new_multi_thread()
///     .on_thread_start(|| {
///         let _ = shardmeter::register_worker_thread();
///     })
///     .on_thread_stop(shardmeter::unregister_worker_thread)
///     .build()
///     .unwrap();
/// # drop(runtime);
/// ```
pub fn register_worker_thread() -> Result<usize, LedgerError> {
    if let Some(current) = WORKER.with(Cell::get).index() {
        return Ok(current as usize);
    }
    let index = REGISTRY
        .claim()
        .ok_or(LedgerError::TooManyWorkers { max: MAX_WORKERS })?;
    WORKER.with(|cell| cell.set(WorkerProbe::for_worker(index)));
    // Touching the key registers its destructor, which unregisters at thread exit.
    RELEASE_ON_EXIT.with(|_| ());
    Ok(index as usize)
}

/// Gives back the calling thread's worker index; a no-op on a thread that is not registered.
pub fn unregister_worker_thread() {
    // `try_with`: this also runs from a thread-local destructor, when the key may be gone.
    let probe = WORKER.try_with(|cell| cell.replace(WorkerProbe::NOT_A_WORKER));
    if let Some(index) = probe.ok().and_then(WorkerProbe::index) {
        REGISTRY.release(index);
    }
}

/// The calling thread's worker index as `add` uses it. Thread-local loads only: this is on the
/// hot path.
#[inline(always)]
pub(super) fn current_probe() -> WorkerProbe {
    WORKER.with(Cell::get)
}

/// A number that stays the same for this thread and differs between threads started one after
/// another, so unregistered threads spread over the striped shards.
#[inline]
pub(super) fn stripe_seed() -> u32 {
    STRIPE_SEED.with(|cell| {
        let seed = cell.get();
        if seed != NO_SEED {
            return seed;
        }
        // Only spreads threads out: no other memory depends on it, and it runs once per thread.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seed = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % NO_SEED;
        cell.set(seed);
        seed
    })
}
