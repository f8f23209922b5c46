//! What the read side costs in memory and allocations, measured with a counting global
//! allocator (this file is its own test binary, so nothing else allocates meanwhile):
//!
//! - bytes per tracked account: live heap after opening sessions of many new accounts through
//!   the engine, minus the same number of bare ledger sessions — the figure `docs/operations.md`
//!   states;
//! - a second session of a tracked account allocates nothing, and the per-chunk checks
//!   (`Session::is_exhausted`, `Session::add`) never allocate.
//!
//! A current-thread runtime runs the flusher only inside `block_on`, so measurements outside it
//! see this thread alone.

mod support;

use shardmeter::ledger::Ledger;
use shardmeter::{Budgets, Engine, KeyScheme, MemorySink};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Accounts opened per measurement: enough that per-account figures dwarf fixed costs.
const ACCOUNTS: usize = 20_000;
/// The deployment's ids are 28 alphanumeric characters.
const ID_LEN: usize = 28;
/// What the read side may cost per tracked account before this test fails: the stated figure
/// (`docs/operations.md`) plus room for hash-map growth.
const MAX_BYTES_PER_ACCOUNT: i64 = 1_024;

struct CountingAllocator;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// additions are relaxed counter updates, which neither allocate nor unwind.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // Relaxed: statistics read after the measured code, on the same thread.
        CALLS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CALLS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn live() -> i64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

fn account(i: usize) -> String {
    format!("{i:0>width$}", width = ID_LEN)
}

#[test]
fn the_read_side_costs_a_bounded_few_hundred_bytes_per_account_and_checks_never_allocate() {
    let runtime = support::current_thread_runtime();
    let _entered = runtime.enter();
    let engine = Engine::builder()
        // One more: a second session of one account.
        .capacity(ACCOUNTS + 1)
        .flush_interval(Duration::from_secs(3600))
        .keys(KeyScheme::daily_utc("fair_use:dg_budget"))
        .budgets(Budgets::per_bucket(1_800_000))
        .sink(MemorySink::new())
        .build()
        .unwrap();
    let (ledger, _sweeper) = Ledger::builder().capacity(ACCOUNTS).build().unwrap();
    let ids: Vec<String> = (0..ACCOUNTS).map(account).collect();

    let before = live();
    let bare: Vec<_> = ids
        .iter()
        .map(|id| ledger.open_session(id).unwrap())
        .collect();
    let per_bare_session = (live() - before) / ACCOUNTS as i64;

    let before = live();
    let sessions: Vec<_> = ids
        .iter()
        .map(|id| engine.open_session(id).unwrap())
        .collect();
    runtime.block_on(async {
        for session in &sessions {
            assert!(session.synced(Duration::from_secs(10)).await);
        }
    });
    assert_eq!(engine.stats().tracked_accounts, ACCOUNTS as u64);
    let per_session = (live() - before) / ACCOUNTS as i64;
    let per_account = per_session - per_bare_session;
    eprintln!(
        "{ACCOUNTS} accounts, {ID_LEN}-byte ids: {per_session} B per engine session = \
         {per_bare_session} B ledger session + {per_account} B read side"
    );
    assert!(
        (1..=MAX_BYTES_PER_ACCOUNT).contains(&per_account),
        "{per_account} B per tracked account"
    );

    // Its slot shares the id its account's state holds.
    let calls = CALLS.load(Ordering::Relaxed);
    let second = engine.open_session(&ids[0]).unwrap();
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        calls,
        "a second session of a tracked account allocates nothing"
    );
    drop(second);

    let session = &sessions[ACCOUNTS / 2];
    let calls = CALLS.load(Ordering::Relaxed);
    for _ in 0..100_000 {
        black_box(black_box(session).is_exhausted());
        black_box(session).add(black_box(20));
    }
    assert_eq!(
        CALLS.load(Ordering::Relaxed),
        calls,
        "is_exhausted and add allocate nothing"
    );
    drop((bare, sessions));
}
