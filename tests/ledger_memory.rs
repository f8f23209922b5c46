//! What the ledger costs in memory, from the allocator: bytes per slot and per open session (none
//! for a session that shares its caller's id), checked byte for byte against the formulas `docs/operations.md` states, and printed with
//! `cargo test --test ledger_memory -- --nocapture`.
//!
//! A counting global allocator adds up, per thread, the bytes this thread allocates minus those
//! it frees while counting is on, so the test harness's other threads do not disturb a figure.

use shardmeter::ledger::{Account, Ledger, Session, Sweeper};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct CountingAllocator;

thread_local! {
    // `const`-initialised, no destructors: the allocator can use them at any time.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static CALLS: Cell<u64> = const { Cell::new(0) };
}

fn note(bytes: i64, calls: u64) {
    // `try_with`: the allocator also runs while a thread's thread-locals are being destroyed.
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
            let _ = CALLS.try_with(|count| count.set(count.get() + calls));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
// addition is a thread-local counter update, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as i64, 1);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as i64, 1);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as i64 - layout.size() as i64, 1);
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as i64), 0);
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Bytes still allocated, and allocations made, by this thread while running `f`; `f`'s result
/// is returned alive, so what it holds is counted.
fn measure<T>(f: impl FnOnce() -> T) -> (T, i64, u64) {
    LIVE.with(|live| live.set(0));
    CALLS.with(|calls| calls.set(0));
    COUNTING.with(|counting| counting.set(true));
    let result = f();
    COUNTING.with(|counting| counting.set(false));
    (result, LIVE.with(Cell::get), CALLS.with(Cell::get))
}

/// Slots per chunk: a chunk has one 4 KiB page of cells per shard.
const CHUNK_SLOTS: usize = 511;

/// Per chunk of 511 slots, for `shards` shards (worker + striped), as `docs/operations.md` states
/// it: a 4 KiB page per shard (511 cells and the owner word), and per slot the sweeper's sum of
/// readings (16), the slot's state (1) and holder count (4), its account and the ledger's `Arc`
/// (24), and an entry in each of the two slot queues (16 each).
fn bytes_per_chunk(shards: usize) -> i64 {
    (4096 * shards + CHUNK_SLOTS * (16 + 1 + 4 + 24 + 2 * 16)) as i64
}

/// Per open session, as `docs/operations.md` states it: the account id (two reference counts and
/// the bytes, rounded up to 8), in one allocation.
fn bytes_per_session(id_len: usize) -> i64 {
    (16 + id_len).next_multiple_of(8) as i64
}

fn build(capacity: usize, shards: Option<(usize, usize)>) -> (Ledger, Sweeper) {
    let builder = Ledger::builder().capacity(capacity);
    let builder = match shards {
        Some((workers, stripes)) => builder.worker_shards(workers).striped_shards(stripes),
        None => builder,
    };
    builder.build().unwrap()
}

/// The bytes of one chunk of slots: the difference between two capacities (whole chunks, so no
/// page is part-used), divided by the difference of chunks. Also returns what a ledger costs
/// besides.
fn measured_per_chunk(shards: Option<(usize, usize)>) -> (i64, i64) {
    const SMALL: usize = 8;
    const LARGE: usize = 128;
    let (_small, small_bytes, _) = measure(|| build(SMALL * CHUNK_SLOTS, shards));
    let (_large, large_bytes, _) = measure(|| build(LARGE * CHUNK_SLOTS, shards));
    let chunks = (LARGE - SMALL) as i64;
    assert_eq!(
        (large_bytes - small_bytes) % chunks,
        0,
        "not a whole number of bytes per chunk: {small_bytes} B at {SMALL} chunks, \
         {large_bytes} B at {LARGE}"
    );
    let per_chunk = (large_bytes - small_bytes) / chunks;
    (per_chunk, small_bytes - per_chunk * SMALL as i64)
}

#[test]
fn bytes_per_chunk_of_slots_match_the_formula_at_the_default_and_for_2_16_64_cores() {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let default_shards = cpus.min(256) + cpus.min(2);
    // (label, explicit (worker, striped) shards or the defaults, shards in all)
    let cases = [
        ("default on this host", None, default_shards),
        ("2 cores' defaults", Some((2, 2)), 4),
        ("16 cores' defaults", Some((16, 2)), 18),
        ("64 cores' defaults", Some((64, 2)), 66),
    ];
    for (label, shards, total) in cases {
        let (per_chunk, fixed) = measured_per_chunk(shards);
        let per_slot = per_chunk as f64 / CHUNK_SLOTS as f64;
        println!(
            "{label}: {total} shards, {per_chunk} B per {CHUNK_SLOTS} slots = {per_slot:.1} B \
             per slot (+ {fixed} B per ledger); 1 Mi slots: {per_slot:.0} MiB"
        );
        assert_eq!(per_chunk, bytes_per_chunk(total), "{label}");
        // The shared state and the boxes' headers, not a per-slot cost.
        assert!((0..4096).contains(&fixed), "{label}: {fixed} B fixed");
    }
}

#[test]
fn an_open_session_costs_one_allocation_of_the_stated_size() {
    const SESSIONS: usize = 10_000;
    // The deployment's ids are 28 alphanumeric characters.
    let ids: Vec<String> = (0..SESSIONS).map(|i| format!("{i:0>28}")).collect();
    let (ledger, mut sweeper) = build(SESSIONS, Some((2, 2)));
    let mut sessions: Vec<Session> = Vec::with_capacity(SESSIONS);
    let ((), bytes, calls) = measure(|| {
        for id in &ids {
            sessions.push(ledger.open_session(id).unwrap());
        }
    });
    let per_session = bytes / SESSIONS as i64;
    println!(
        "an open session with a 28-byte id: {per_session} B in {} allocation(s), plus the \
         {}-byte `Session` value wherever it is kept",
        calls / SESSIONS as u64,
        std::mem::size_of::<Session>()
    );
    assert_eq!(bytes, bytes_per_session(28) * SESSIONS as i64);
    assert_eq!(calls, SESSIONS as u64);
    assert_eq!(std::mem::size_of::<Session>(), 8, "the size the docs state");

    // A clone (a channel) allocates nothing; ending a session frees nothing until the sweeper
    // collects it, which frees the id that the slot held.
    let (clones, bytes, calls) = measure(|| sessions.to_vec());
    assert_eq!((calls, bytes), (1, (SESSIONS * 8) as i64), "only the Vec");
    drop(clones);
    let ((), bytes, _) = measure(|| sessions.clear());
    assert_eq!(bytes, 0);
    let mut usage = Vec::new();
    let (ended, bytes, _) = measure(|| sweeper.collect_ended(&mut usage));
    assert_eq!(ended, SESSIONS);
    assert_eq!(bytes, -bytes_per_session(28) * SESSIONS as i64);
}

#[test]
fn a_session_opened_with_a_shared_id_allocates_nothing_and_its_usage_names_that_id() {
    const SESSIONS: usize = 1_000;
    let id: Account = format!("{:0>28}", 42).into();
    let (ledger, mut sweeper) = build(SESSIONS, Some((2, 2)));
    let mut sessions: Vec<Session> = Vec::with_capacity(SESSIONS);
    let ((), bytes, calls) = measure(|| {
        for _ in 0..SESSIONS {
            sessions.push(ledger.open_session_shared(id.clone()).unwrap());
        }
    });
    assert_eq!((bytes, calls), (0, 0), "no allocation");
    assert_eq!(
        Arc::strong_count(&id),
        SESSIONS + 1,
        "every slot holds the id"
    );
    sessions.iter().for_each(|session| session.add(1));
    sessions.clear();
    let mut usage = Vec::new();
    assert_eq!(sweeper.collect_ended(&mut usage), SESSIONS);
    assert!(usage.iter().all(|record| Arc::ptr_eq(&record.account, &id)));
    assert_eq!(
        usage.iter().map(|record| record.amount).sum::<u64>(),
        SESSIONS as u64
    );
    drop(usage);
    assert_eq!(Arc::strong_count(&id), 1, "the slots gave the id back");
}

/// The calling thread's minor page faults so far: field 10 of `/proc/thread-self/stat`, counted
/// after the command name, which is in parentheses and may hold spaces.
#[cfg(target_os = "linux")]
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(7).unwrap().parse().unwrap()
}

/// Everything the ledger allocates is written when it is built: a page the OS maps lazily and
/// that the sweeper reads first (readings, and the states, holders and cells of slots that no
/// session has touched yet) would fault twice at its first write, the second fault flushing the
/// other CPUs' TLBs, on the sweep's path or on `open_session`'s and `add`'s. So building faults
/// in about every page it allocates (fresh pages: the large parts come from `mmap`).
#[test]
#[cfg(target_os = "linux")]
fn building_a_ledger_writes_every_page_it_allocates() {
    const SLOTS: usize = 2048 * CHUNK_SLOTS;
    let faults_before = minor_faults();
    let (_ledger, bytes, _) = measure(|| build(SLOTS, Some((2, 2))));
    let faults = minor_faults() - faults_before;
    let pages = bytes as u64 / 4096;
    println!(
        "a ledger of {SLOTS} slots: {bytes} B allocated, {faults} pages faulted in of {pages}"
    );
    assert!(
        faults >= pages * 95 / 100,
        "{faults} page faults building a ledger of {pages} pages: some of it is left to the OS's \
         lazy zero pages"
    );
}

/// The builder writes every page of the sweeper's readings, so the first sweep faults in none of
/// them (`written_zeros` in src/ledger/mod.rs: a read then a write of a fresh page is two faults,
/// the second flushing the other CPUs' TLBs). With `vec![0; n]` this sweep took ~2 faults per
/// 256 slots.
#[test]
#[cfg(target_os = "linux")]
fn the_first_sweep_faults_in_none_of_the_sweepers_memory() {
    const SLOTS: usize = 128 * CHUNK_SLOTS;
    const STEP: usize = 16;
    let (ledger, mut sweeper) = build(SLOTS, Some((2, 2)));
    let sessions: Vec<Session> = (0..SLOTS)
        .map(|i| ledger.open_session(&i.to_string()).unwrap())
        .collect();
    sessions.iter().for_each(|session| session.add(1));
    // Swept a step at a time into one small list, as the flusher does: the list's own memory is
    // touched by the first step.
    let mut usage = Vec::with_capacity(STEP);
    sweeper.sweep_slots(0..STEP, &mut usage);
    let mut swept = usage.len();
    let faults_before = minor_faults();
    for start in (STEP..SLOTS).step_by(STEP) {
        usage.clear();
        sweeper.sweep_slots(start..start + STEP, &mut usage);
        swept += usage.len();
    }
    let faults = minor_faults() - faults_before;
    assert_eq!(swept, SLOTS, "every session's add swept");
    // 1 MiB of readings: 256 pages, up to 512 faults if the sweep had to fault them in.
    assert!(faults < 16, "{faults} page faults in the first sweep");
}
