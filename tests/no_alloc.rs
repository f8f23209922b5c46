//! `Session::add` never allocates: proven with a counting global allocator, over millions of
//! adds from several threads, on registered worker threads and on unregistered ones, including
//! the very first `add` on a brand-new thread (whose thread-locals are touched for the first
//! time), the first `add` after registering, and the cold saturation paths.
//!
//! The allocator counts per thread, and only while the calling thread has switched counting on
//! around the code under test: thread start-up, registration, opening sessions and the test
//! harness's own threads allocate freely and are not counted. It counts `alloc`, `alloc_zeroed`,
//! `realloc` and `dealloc` alike.

use shardmeter::ledger::{Ledger, Session, MAX_WORKERS};
use shardmeter::{register_worker_thread, unregister_worker_thread};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::Barrier;
use std::thread;

struct CountingAllocator;

thread_local! {
    // `const`-initialised and without destructors: reading them never allocates and never
    // registers a destructor, so the allocator can use them.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

fn note_call() {
    // `try_with`: the allocator also runs while a thread's thread-locals are being destroyed.
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let _ = CALLS.try_with(|calls| calls.set(calls.get() + 1));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is a thread-local counter update, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_call();
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_call();
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_call();
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_call();
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Allocator calls made by this thread while running `f`.
fn allocator_calls(f: impl FnOnce()) -> u64 {
    CALLS.with(|calls| calls.set(0));
    COUNTING.with(|counting| counting.set(true));
    f();
    COUNTING.with(|counting| counting.set(false));
    CALLS.with(Cell::get)
}

const THREADS: usize = 4;
const ADDS_PER_THREAD: u64 = 1_000_000;

/// A ledger with a worker shard for any registered thread, and sessions for `THREADS` threads.
fn ledger_and_sessions(
    worker_shards: usize,
) -> (Ledger, shardmeter::ledger::Sweeper, Vec<Session>) {
    let (ledger, sweeper) = Ledger::builder()
        .capacity(64)
        .worker_shards(worker_shards)
        .striped_shards(2)
        .build()
        .unwrap();
    let sessions = (0..THREADS)
        .map(|i| ledger.open_session(&format!("user-{i}")).unwrap())
        .collect();
    (ledger, sweeper, sessions)
}

/// On `THREADS` brand-new threads at once (registered or not), counts the allocator calls of
/// the first `add`, then of `ADDS_PER_THREAD - 1` more; checks that the adds all arrived.
fn adds_on_new_threads(worker_shards: usize, register: bool) {
    let (_ledger, mut sweeper, sessions) = ledger_and_sessions(worker_shards);
    let start = Barrier::new(THREADS);
    let counts: Vec<(u64, u64)> = thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .iter()
            .map(|session| {
                let start = &start;
                scope.spawn(move || {
                    if register {
                        register_worker_thread().expect("a worker index");
                    }
                    start.wait();
                    let first = allocator_calls(|| session.add(1));
                    let rest = allocator_calls(|| {
                        for _ in 1..ADDS_PER_THREAD {
                            session.add(black_box(1));
                        }
                    });
                    unregister_worker_thread();
                    (first, rest)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (thread, (first, rest)) in counts.iter().enumerate() {
        assert_eq!(*first, 0, "thread {thread}: the first add allocated");
        assert_eq!(*rest, 0, "thread {thread}: later adds allocated");
    }
    let mut usage = Vec::new();
    sweeper.sweep(&mut usage);
    assert_eq!(usage.len(), THREADS);
    assert!(usage.iter().all(|u| u.amount == ADDS_PER_THREAD));
}

#[test]
fn the_counter_sees_allocations() {
    assert!(allocator_calls(|| drop(black_box(vec![1u8; 16]))) >= 2);
    assert_eq!(allocator_calls(|| ()), 0);
}

#[test]
fn adds_on_registered_workers_never_allocate() {
    adds_on_new_threads(MAX_WORKERS, true);
}

#[test]
fn adds_on_unregistered_threads_never_allocate_not_even_the_first() {
    adds_on_new_threads(MAX_WORKERS, false);
}

#[test]
fn adds_of_registered_threads_without_a_worker_shard_never_allocate() {
    // Registered, but the ledger has no worker shards: the striped path.
    adds_on_new_threads(0, true);
}

#[test]
fn saturating_adds_never_allocate() {
    for (worker_shards, register) in [(MAX_WORKERS, true), (0, false)] {
        let (ledger, _sweeper, sessions) = ledger_and_sessions(worker_shards);
        let session = &sessions[0];
        let calls = thread::scope(|scope| {
            scope
                .spawn(|| {
                    if register {
                        register_worker_thread().expect("a worker index");
                    }
                    let calls = allocator_calls(|| {
                        session.add(u64::MAX - 1);
                        for _ in 0..1000 {
                            session.add(black_box(7)); // the cold saturation path
                        }
                    });
                    unregister_worker_thread();
                    calls
                })
                .join()
                .unwrap()
        });
        assert_eq!(calls, 0, "worker shards {worker_shards}");
        assert_eq!(ledger.saturated_amount(), 1000 * 7 - 1);
    }
}

#[test]
fn a_clone_moved_to_a_new_thread_adds_without_allocating() {
    let (_ledger, _sweeper, sessions) = ledger_and_sessions(MAX_WORKERS);
    let clone_calls = allocator_calls(|| drop(black_box(sessions[0].clone())));
    assert_eq!(
        clone_calls, 0,
        "cloning a session (a channel) allocates nothing"
    );
    let channel = sessions[0].clone();
    let calls = thread::spawn(move || allocator_calls(|| channel.add(1)))
        .join()
        .unwrap();
    assert_eq!(calls, 0);
}

/// Not a requirement (registration is not on the hot path), but worth knowing: printed with
/// `--nocapture`.
#[test]
fn registration_allocations_are_reported() {
    let (first, again) = thread::spawn(|| {
        let first = allocator_calls(|| {
            register_worker_thread().unwrap();
        });
        let again = allocator_calls(|| {
            unregister_worker_thread();
            register_worker_thread().unwrap();
        });
        unregister_worker_thread();
        (first, again)
    })
    .join()
    .unwrap();
    println!("allocator calls: first registration on a thread {first}, re-registration {again}");
    assert_eq!(again, 0, "re-registering only flips an index");
}
