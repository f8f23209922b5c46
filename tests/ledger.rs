//! The ledger through its public API: exact accounting on the worker and striped paths, session
//! channels and session end, slot reuse, a full table, typed errors for bad input and bad
//! configuration, saturation near `u64::MAX`, worker registration, the session-end hook, and
//! many threads adding while another sweeps.
//!
//! Tests that need a thread on a particular path run it on a fresh thread (`on_worker`,
//! `on_unregistered`), so the test harness's own threads never change registration.

mod support;

use shardmeter::ledger::{Ledger, LedgerError, Session, Sweeper, Usage, MAX_ACCOUNT_BYTES};
use shardmeter::ledger::{MAX_CAPACITY, MAX_WORKERS};
use shardmeter::{register_worker_thread, unregister_worker_thread};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, RwLock};
use std::thread;
use std::time::Duration;
use support::rng::Rng;

/// Held for reading by every test that registers workers, and for writing by the one test that
/// registers [`MAX_WORKERS`] threads: it must not starve the others of worker indices. Take it
/// once per test (std's `RwLock` blocks new readers while a writer waits, so a second read from
/// another thread of the same test could deadlock): helpers below that take it say so.
static WORKER_INDICES: RwLock<()> = RwLock::new(());

fn worker_indices() -> std::sync::RwLockReadGuard<'static, ()> {
    WORKER_INDICES.read().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a fresh thread registered as a worker, and unregisters it after. Takes
/// `WORKER_INDICES`: do not call it while holding that.
fn on_worker<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let _indices = worker_indices();
    thread::scope(|scope| {
        scope
            .spawn(|| {
                register_worker_thread().expect("a free worker index");
                let result = f();
                unregister_worker_thread();
                result
            })
            .join()
            .expect("worker thread panicked")
    })
}

/// Runs `f` on a fresh thread that is not registered.
fn on_unregistered<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| scope.spawn(f).join().expect("thread panicked"))
}

/// A ledger in which every registered thread, whatever its worker index, has a worker shard.
fn ledger(capacity: usize) -> (Ledger, Sweeper) {
    Ledger::builder()
        .capacity(capacity)
        .worker_shards(MAX_WORKERS)
        .striped_shards(2)
        .build()
        .expect("valid configuration")
}

/// A ledger with no worker shards and `stripes` striped shards: every thread adds with
/// a compare-and-swap loop, threads sharing a stripe share its cells.
fn striped_only(stripes: usize) -> (Ledger, Sweeper) {
    Ledger::builder()
        .capacity(4)
        .worker_shards(0)
        .striped_shards(stripes)
        .build()
        .expect("valid configuration")
}

/// Like [`ledger`], with a session-end hook that counts its calls.
fn counting_ends(capacity: usize) -> (Ledger, Sweeper, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let hook = calls.clone();
    // Under Miri, fewer cells per sweep (a registered thread whose index is beyond the worker
    // shards falls back to the stripes, which is also exact).
    let worker_shards = if cfg!(miri) { 8 } else { MAX_WORKERS };
    let (ledger, sweeper) = Ledger::builder()
        .capacity(capacity)
        .worker_shards(worker_shards)
        .striped_shards(2)
        .on_session_end(move || {
            hook.fetch_add(1, Ordering::Relaxed);
        })
        .build()
        .expect("valid configuration");
    (ledger, sweeper, calls)
}

fn sweep(sweeper: &mut Sweeper) -> Vec<Usage> {
    let mut out = Vec::new();
    sweeper.sweep(&mut out);
    out
}

fn collect_ended(sweeper: &mut Sweeper) -> (usize, Vec<Usage>) {
    let mut out = Vec::new();
    let ended = sweeper.collect_ended(&mut out);
    (ended, out)
}

/// Per-account sums of `usage`.
fn totals(usage: &[Usage]) -> HashMap<String, u128> {
    let mut totals = HashMap::new();
    for record in usage {
        *totals.entry(record.account.to_string()).or_default() += u128::from(record.amount);
    }
    totals
}

fn record(account: &str, amount: u64) -> Usage {
    Usage {
        account: account.into(),
        amount,
    }
}

/// `usage`, sorted by account then amount, so tests can compare against a literal.
fn sorted(mut usage: Vec<Usage>) -> Vec<Usage> {
    usage.sort_by(|a, b| (&a.account, a.amount).cmp(&(&b.account, b.amount)));
    usage
}

// ---------------------------------------------------------------------------------------------
// Accounting

#[test]
fn open_add_sweep_is_exact_on_both_paths() {
    let (ledger, mut sweeper) = ledger(16);
    let alice = ledger.open_session("alice").unwrap();
    let bob = ledger.open_session("bob").unwrap();
    assert_eq!(alice.account(), "alice");
    assert_eq!(ledger.slots_in_use(), 2);

    on_worker(|| {
        for _ in 0..3 {
            alice.add(20);
        }
    });
    on_unregistered(|| {
        alice.add(5);
        bob.add(7);
    });
    alice.add(1); // the test's own thread, whatever it is

    // One record per session, summed over every shard.
    assert_eq!(
        sorted(sweep(&mut sweeper)),
        vec![record("alice", 66), record("bob", 7)]
    );
    assert_eq!(sweep(&mut sweeper), vec![], "nothing was added since");

    on_worker(|| bob.add(3));
    assert_eq!(sweep(&mut sweeper), vec![record("bob", 3)]);
    assert_eq!(ledger.slots_in_use(), 2, "sweeping does not end sessions");
}

#[test]
fn two_sessions_of_one_account_are_two_records() {
    let (ledger, mut sweeper) = ledger(16);
    let first = ledger.open_session("carol").unwrap();
    let second = ledger.open_session("carol").unwrap();
    first.add(10);
    on_worker(|| second.add(32));
    let usage = sweep(&mut sweeper);
    assert_eq!(usage.len(), 2);
    assert_eq!(totals(&usage)["carol"], 42);
}

#[test]
fn zero_and_huge_single_amounts() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("dave").unwrap();
    session.add(0);
    assert_eq!(
        sweep(&mut sweeper),
        vec![],
        "adding 0 leaves nothing to report"
    );
    on_worker(|| session.add(u64::MAX));
    assert_eq!(sweep(&mut sweeper), vec![record("dave", u64::MAX)]);
    assert_eq!(ledger.saturated_amount(), 0);
}

#[test]
fn clones_are_channels_of_one_session() {
    let (ledger, mut sweeper, ended) = counting_ends(8);
    let session = ledger.open_session("erin").unwrap();
    let channels: Vec<Session> = (0..4).map(|_| session.clone()).collect();
    assert_eq!(ledger.slots_in_use(), 1, "clones share the slot");

    // Each channel adds from a different thread, on both paths, and is dropped there.
    let indices = worker_indices();
    thread::scope(|scope| {
        let mut channels = channels.into_iter();
        for worker in [true, true, false, false] {
            let channel = channels.next().unwrap();
            scope.spawn(move || {
                if worker {
                    register_worker_thread().unwrap();
                }
                for _ in 0..1000 {
                    channel.add(3);
                }
                drop(channel);
                unregister_worker_thread();
            });
        }
    });
    drop(indices);
    assert_eq!(
        ended.load(Ordering::Relaxed),
        0,
        "one handle is still alive"
    );
    assert_eq!(collect_ended(&mut sweeper), (0, vec![]));
    assert_eq!(sweep(&mut sweeper), vec![record("erin", 12_000)]);

    session.add(8);
    drop(session);
    assert_eq!(ended.load(Ordering::Relaxed), 1);
    assert_eq!(collect_ended(&mut sweeper), (1, vec![record("erin", 8)]));
    assert_eq!(ledger.slots_in_use(), 0);
}

// ---------------------------------------------------------------------------------------------
// Session end and slot reuse

#[test]
fn session_end_hands_over_the_remainder_once() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("frank").unwrap();
    session.add(100);
    assert_eq!(sweep(&mut sweeper), vec![record("frank", 100)]);
    on_worker(|| session.add(40));
    session.add(2);
    drop(session);
    assert_eq!(ledger.slots_in_use(), 1, "the slot waits for the sweeper");

    assert_eq!(collect_ended(&mut sweeper), (1, vec![record("frank", 42)]));
    assert_eq!(ledger.slots_in_use(), 0);
    assert_eq!(collect_ended(&mut sweeper), (0, vec![]));
    assert_eq!(sweep(&mut sweeper), vec![]);
}

#[test]
fn sweep_also_collects_ended_sessions() {
    let (ledger, mut sweeper) = ledger(4);
    let open = ledger.open_session("gina").unwrap();
    let ending = ledger.open_session("hank").unwrap();
    open.add(1);
    ending.add(2);
    drop(ending);
    let usage = sorted(sweep(&mut sweeper));
    assert_eq!(usage, vec![record("gina", 1), record("hank", 2)]);
    assert_eq!(ledger.slots_in_use(), 1);
}

/// Ended sessions collected a few at a time: each step takes at most its bound, a sweep between
/// two steps charges the growth of the sessions still queued, and the last step their rest:
/// every amount once.
#[test]
fn ended_sessions_collected_in_bounded_steps_are_exact() {
    let (ledger, mut sweeper) = ledger(8);
    let sessions: Vec<Session> = ["ann", "bob", "cid", "dee", "eve"]
        .iter()
        .map(|account| ledger.open_session(account).unwrap())
        .collect();
    for (amount, session) in (1..).zip(&sessions) {
        session.add(amount);
    }
    drop(sessions);
    let mut usage = Vec::new();
    assert_eq!(sweeper.collect_ended_up_to(2, &mut usage), 2);
    assert_eq!(ledger.slots_in_use(), 3, "only the two collected are freed");
    // A sweep meanwhile charges the three still queued as open slots; their collection then
    // finds nothing left and frees them.
    sweeper.sweep_slots(0..sweeper.capacity(), &mut usage);
    assert_eq!(usage.len(), 5);
    assert_eq!(sweeper.collect_ended_up_to(2, &mut usage), 2);
    assert_eq!(
        sweeper.collect_ended_up_to(2, &mut usage),
        1,
        "fewer: none left"
    );
    assert_eq!(sweeper.collect_ended_up_to(2, &mut usage), 0);
    assert_eq!(ledger.slots_in_use(), 0);
    assert_eq!(
        sorted(usage),
        vec![
            record("ann", 1),
            record("bob", 2),
            record("cid", 3),
            record("dee", 4),
            record("eve", 5)
        ]
    );
}

#[test]
fn a_session_that_ends_with_nothing_left_is_counted_without_a_record() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("ivan").unwrap();
    session.add(5);
    assert_eq!(sweep(&mut sweeper).len(), 1);
    drop(session);
    assert_eq!(collect_ended(&mut sweeper), (1, vec![]));
    assert_eq!(ledger.slots_in_use(), 0);
}

/// Which threads add to a session in the reuse test.
#[derive(Debug, Clone, Copy)]
enum Path {
    Worker,
    Unregistered,
    Both,
}

fn add_on(path: Path, session: &Session, amount: u64) {
    match path {
        Path::Worker => on_worker(|| session.add(amount)),
        Path::Unregistered => on_unregistered(|| session.add(amount)),
        Path::Both => {
            on_worker(|| session.add(amount));
            on_unregistered(|| session.add(amount));
        }
    }
}

#[test]
fn a_reused_slot_never_reports_the_previous_sessions_amounts() {
    for path in [Path::Worker, Path::Unregistered, Path::Both] {
        // One slot: the second session must get the first one's slot.
        let (ledger, mut sweeper) = ledger(1);
        let first = ledger.open_session("old").unwrap();
        add_on(path, &first, 1_000);
        let swept = sweep(&mut sweeper); // the sweeper now remembers non-zero cells
        assert_eq!(
            totals(&swept)["old"],
            u128::from(1_000 * per(path)),
            "{path:?}"
        );
        add_on(path, &first, 7);
        drop(first);

        assert_eq!(
            ledger.open_session("new").unwrap_err(),
            LedgerError::Full { capacity: 1 },
            "{path:?}: the ended slot is not free before the sweeper collected it"
        );
        let (ended, usage) = collect_ended(&mut sweeper);
        assert_eq!(ended, 1);
        assert_eq!(usage, vec![record("old", 7 * per(path))], "{path:?}");

        let second = ledger.open_session("new").unwrap();
        assert_eq!(sweep(&mut sweeper), vec![], "{path:?}: nothing of `old`");
        add_on(path, &second, 3);
        assert_eq!(
            sweep(&mut sweeper),
            vec![record("new", 3 * per(path))],
            "{path:?}"
        );
        add_on(path, &second, 4);
        drop(second);
        assert_eq!(
            collect_ended(&mut sweeper),
            (1, vec![record("new", 4 * per(path))]),
            "{path:?}"
        );
    }

    fn per(path: Path) -> u64 {
        match path {
            Path::Both => 2,
            Path::Worker | Path::Unregistered => 1,
        }
    }
}

#[test]
fn a_reused_slot_starts_from_zero_even_when_never_swept_before() {
    let (ledger, mut sweeper) = ledger(1);
    let first = ledger.open_session("old").unwrap();
    add_on(Path::Both, &first, 50);
    drop(first);
    assert_eq!(collect_ended(&mut sweeper), (1, vec![record("old", 100)]));
    let second = ledger.open_session("new").unwrap();
    add_on(Path::Both, &second, 1);
    assert_eq!(sweep(&mut sweeper), vec![record("new", 2)]);
}

#[test]
fn record_charges_once_as_an_ended_session() {
    let (ledger, mut sweeper) = ledger(2);
    ledger.record("upload", 90_000).unwrap();
    on_worker(|| ledger.record("upload", 10).unwrap());
    assert_eq!(ledger.slots_in_use(), 2);
    let (ended, usage) = collect_ended(&mut sweeper);
    assert_eq!(ended, 2);
    assert_eq!(
        sorted(usage),
        vec![record("upload", 10), record("upload", 90_000)]
    );
    assert_eq!(ledger.slots_in_use(), 0);
}

// ---------------------------------------------------------------------------------------------
// A full table

#[test]
fn a_full_table_refuses_then_recovers_after_the_sweeper_frees_a_slot() {
    let (ledger, mut sweeper) = ledger(4);
    let mut sessions: Vec<Session> = (0..4)
        .map(|i| ledger.open_session(&format!("user-{i}")).unwrap())
        .collect();
    assert_eq!(ledger.slots_in_use(), 4);
    for _ in 0..3 {
        assert_eq!(
            ledger.open_session("late").unwrap_err(),
            LedgerError::Full { capacity: 4 }
        );
    }
    assert_eq!(
        ledger.record("late", 1).unwrap_err(),
        LedgerError::Full { capacity: 4 }
    );
    assert!(LedgerError::Full { capacity: 4 }.to_string().contains('4'));

    sessions.pop().unwrap().add(9);
    assert!(
        matches!(ledger.open_session("late"), Err(LedgerError::Full { .. })),
        "an ended session's slot is freed by the sweeper, not by the drop"
    );
    assert_eq!(sweep(&mut sweeper), vec![record("user-3", 9)]);
    assert_eq!(ledger.slots_in_use(), 3);

    let late = ledger.open_session("late").unwrap();
    late.add(1);
    assert_eq!(sweep(&mut sweeper), vec![record("late", 1)]);
    drop(sessions);
    drop(late);
    assert_eq!(collect_ended(&mut sweeper).0, 4);
    assert_eq!(ledger.slots_in_use(), 0);
}

// ---------------------------------------------------------------------------------------------
// Bad input and bad configuration

#[test]
fn account_ids_are_validated() {
    let (ledger, _sweeper) = ledger(4);
    assert_eq!(
        ledger.open_session("").unwrap_err(),
        LedgerError::EmptyAccount
    );
    assert_eq!(ledger.record("", 5).unwrap_err(), LedgerError::EmptyAccount);

    let longest = "x".repeat(MAX_ACCOUNT_BYTES);
    let session = ledger.open_session(&longest).unwrap();
    assert_eq!(session.account(), longest);

    let too_long = "x".repeat(MAX_ACCOUNT_BYTES + 1);
    assert_eq!(
        ledger.open_session(&too_long).unwrap_err(),
        LedgerError::AccountTooLong {
            len: MAX_ACCOUNT_BYTES + 1,
            max: MAX_ACCOUNT_BYTES
        }
    );
    // The limit is in bytes, not characters.
    let wide = "é".repeat(MAX_ACCOUNT_BYTES / 2 + 1);
    assert_eq!(
        ledger.open_session(&wide).unwrap_err(),
        LedgerError::AccountTooLong {
            len: MAX_ACCOUNT_BYTES + 2,
            max: MAX_ACCOUNT_BYTES
        }
    );
    assert_eq!(
        ledger.record(&too_long, 1).unwrap_err(),
        LedgerError::AccountTooLong {
            len: MAX_ACCOUNT_BYTES + 1,
            max: MAX_ACCOUNT_BYTES
        }
    );
    assert_eq!(ledger.slots_in_use(), 1, "a refused account takes no slot");
}

#[test]
fn the_builder_rejects_bad_configurations() {
    let invalid = |builder: shardmeter::ledger::LedgerBuilder| match builder.build() {
        Err(LedgerError::InvalidConfig(message)) => message,
        other => panic!("expected InvalidConfig, got {other:?}"),
    };
    assert!(invalid(Ledger::builder().capacity(0)).contains("capacity"));
    assert!(invalid(Ledger::builder().capacity(MAX_CAPACITY + 1)).contains("capacity"));
    assert!(invalid(Ledger::builder().striped_shards(0)).contains("striped_shards"));
    assert!(invalid(Ledger::builder().striped_shards(MAX_WORKERS + 1)).contains("striped_shards"));
    assert!(invalid(Ledger::builder().worker_shards(MAX_WORKERS + 1)).contains("worker_shards"));
    // Each setting is in range, the product is not: refused before anything is allocated
    // (allocating it would need 64 GiB).
    let absurd = invalid(
        Ledger::builder()
            .capacity(MAX_CAPACITY)
            .worker_shards(MAX_WORKERS)
            .striped_shards(MAX_WORKERS),
    );
    assert!(absurd.contains("bytes"), "{absurd}");
    // Just over the cell-memory limit (4 GiB): 2^24 slots × 33 shards × 8 bytes.
    invalid(
        Ledger::builder()
            .capacity(MAX_CAPACITY)
            .worker_shards(1)
            .striped_shards(32),
    );
    let error = Ledger::builder().capacity(0).build().unwrap_err();
    assert!(error
        .to_string()
        .starts_with("invalid ledger configuration"));

    // The edges that are allowed.
    Ledger::builder()
        .capacity(1)
        .worker_shards(0)
        .striped_shards(1)
        .build()
        .unwrap();
    Ledger::builder()
        .capacity(16)
        .worker_shards(MAX_WORKERS)
        .striped_shards(MAX_WORKERS)
        .build()
        .unwrap();
}

#[test]
fn a_ledger_without_worker_shards_still_counts_registered_threads() {
    let (ledger, mut sweeper) = striped_only(1);
    let session = ledger.open_session("judy").unwrap();
    on_worker(|| session.add(11));
    on_unregistered(|| session.add(31));
    assert_eq!(sweep(&mut sweeper), vec![record("judy", 42)]);
}

// ---------------------------------------------------------------------------------------------
// Amounts near u64::MAX

#[test]
fn a_worker_cell_saturates_and_counts_the_excess() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("kim").unwrap();
    on_worker(|| {
        session.add(u64::MAX - 10);
        session.add(25);
        assert_eq!(ledger.saturated_amount(), 15);
        session.add(u64::MAX);
    });
    assert_eq!(
        ledger.saturated_amount(),
        u64::MAX,
        "the statistic saturates too"
    );
    assert_eq!(sweep(&mut sweeper), vec![record("kim", u64::MAX)]);
}

#[test]
fn a_striped_cell_saturates_and_counts_the_excess() {
    // No worker shards, one striped shard: every thread adds to the same cell.
    let (ledger, mut sweeper) = striped_only(1);
    let session = ledger.open_session("lee").unwrap();
    on_unregistered(|| session.add(u64::MAX - 10));
    on_worker(|| session.add(25));
    assert_eq!(ledger.saturated_amount(), 15);
    assert_eq!(sweep(&mut sweeper), vec![record("lee", u64::MAX)]);
    session.add(1);
    assert_eq!(ledger.saturated_amount(), 16);
    assert_eq!(sweep(&mut sweeper), vec![]);
}

#[test]
fn saturation_caps_a_sessions_total_per_shard_across_sweeps() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("max").unwrap();
    on_worker(|| {
        session.add(u64::MAX - 1);
        assert_eq!(sweep(&mut sweeper), vec![record("max", u64::MAX - 1)]);
        // Swept, but the cell keeps its value: only 1 more fits in this shard.
        session.add(5);
    });
    assert_eq!(ledger.saturated_amount(), 4);
    assert_eq!(sweep(&mut sweeper), vec![record("max", 1)]);
}

#[test]
fn a_total_above_u64_max_across_worker_shards_is_split() {
    let (ledger, mut sweeper) = ledger(4);
    let open = ledger.open_session("nina").unwrap();
    let ending = ledger.open_session("omar").unwrap();
    // Three workers at once, so three different worker indices, so three shards.
    let indices = worker_indices();
    let barrier = Barrier::new(3);
    thread::scope(|scope| {
        for amount in [u64::MAX, u64::MAX, 7] {
            let (open, ending, barrier) = (&open, &ending, &barrier);
            scope.spawn(move || {
                register_worker_thread().unwrap();
                barrier.wait(); // all three registered
                open.add(amount);
                ending.add(amount);
                barrier.wait(); // nobody gave its index back before the others added
                unregister_worker_thread();
            });
        }
    });
    assert_eq!(ledger.saturated_amount(), 0, "no cell overflowed");
    assert_eq!(
        sorted(sweep(&mut sweeper)),
        vec![
            record("nina", 7),
            record("nina", u64::MAX),
            record("nina", u64::MAX),
            record("omar", 7),
            record("omar", u64::MAX),
            record("omar", u64::MAX),
        ]
    );
    drop(indices);

    // And at session end, in a fresh slot (whose cells are all 0).
    let fresh = ledger.open_session("pia").unwrap();
    on_worker(|| fresh.add(u64::MAX));
    on_unregistered(|| fresh.add(u64::MAX));
    drop(fresh);
    assert_eq!(
        collect_ended(&mut sweeper),
        (1, vec![record("pia", u64::MAX), record("pia", u64::MAX)])
    );
    assert_eq!(ledger.saturated_amount(), 0);
}

#[test]
fn a_total_above_u64_max_across_striped_shards_is_split() {
    // Unregistered threads only; two stripes, each thread on one of them (chosen per thread).
    let (ledger, mut sweeper) = striped_only(2);
    let session = ledger.open_session("pat").unwrap();
    on_unregistered(|| session.add(u64::MAX));
    // Threads that land on the first thread's stripe saturate it; the others fill the other.
    const LATER: u64 = 64;
    for _ in 0..LATER {
        on_unregistered(|| session.add(1));
    }
    let usage = sorted(sweep(&mut sweeper));
    let saturated = ledger.saturated_amount();
    assert_eq!(
        totals(&usage)["pat"] + u128::from(saturated),
        u128::from(u64::MAX) + u128::from(LATER)
    );
    assert_eq!(
        usage,
        vec![record("pat", LATER - saturated), record("pat", u64::MAX)],
        "threads spread over both stripes, so the total passed u64::MAX and was split"
    );
}

#[test]
fn a_total_above_u64_max_across_worker_and_striped_shards_is_split() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("quin").unwrap();
    on_worker(|| session.add(u64::MAX));
    on_unregistered(|| session.add(u64::MAX));
    assert_eq!(
        sweep(&mut sweeper),
        vec![record("quin", u64::MAX), record("quin", u64::MAX)]
    );
    assert_eq!(ledger.saturated_amount(), 0);
}

// ---------------------------------------------------------------------------------------------
// Worker registration

#[test]
fn registration_is_idempotent_and_accounting_survives_every_transition() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("rita").unwrap();
    let indices = worker_indices();
    on_unregistered(|| {
        unregister_worker_thread(); // not registered: a no-op
        session.add(1);
        let index = register_worker_thread().unwrap();
        assert!(index < MAX_WORKERS);
        assert_eq!(register_worker_thread().unwrap(), index, "same index again");
        session.add(10);
        unregister_worker_thread();
        unregister_worker_thread();
        session.add(100);
        register_worker_thread().unwrap();
        session.add(1_000);
        // Exits registered: the index is given back at thread exit.
    });
    drop(indices);
    on_worker(|| session.add(10_000));
    assert_eq!(sweep(&mut sweeper), vec![record("rita", 11_111)]);
}

#[test]
fn worker_indices_are_handed_over_without_losing_adds() {
    let (ledger, mut sweeper) = ledger(4);
    let session = ledger.open_session("sam").unwrap();
    // Short-lived workers one after another: each index is reused by the next thread, whose
    // first add must see its predecessor's last store to the cell.
    for _ in 0..50 {
        on_worker(|| {
            for _ in 0..10 {
                session.add(3);
            }
        });
    }
    assert_eq!(sweep(&mut sweeper), vec![record("sam", 1_500)]);
}

#[test]
fn too_many_workers_is_a_typed_error_and_the_thread_still_counts() {
    let _exclusive = WORKER_INDICES.write().unwrap_or_else(|e| e.into_inner());
    let (ledger, mut sweeper) = Ledger::builder()
        .capacity(4)
        .worker_shards(2)
        .striped_shards(1)
        .build()
        .unwrap();
    let session = ledger.open_session("tess").unwrap();
    let registered = Barrier::new(MAX_WORKERS + 1);
    let release = Barrier::new(MAX_WORKERS + 1);
    thread::scope(|scope| {
        for _ in 0..MAX_WORKERS {
            scope.spawn(|| {
                let index = register_retrying();
                if index < 2 {
                    session.add(1);
                }
                registered.wait();
                release.wait();
                unregister_worker_thread();
            });
        }
        registered.wait();
        on_unregistered(|| {
            assert_eq!(
                register_worker_thread().unwrap_err(),
                LedgerError::TooManyWorkers { max: MAX_WORKERS }
            );
            session.add(40); // on the striped shard
        });
        release.wait();
    });
    // The indices are free again. (Not `on_worker`: this test holds `WORKER_INDICES` already.)
    on_unregistered(|| {
        register_retrying();
        session.add(100);
        unregister_worker_thread();
    });
    assert_eq!(sweep(&mut sweeper), vec![record("tess", 142)]);
}

/// Registers, retrying while another test's thread that exited registered has not yet given its
/// index back (that happens in a thread-local destructor, after the thread was joined).
fn register_retrying() -> usize {
    for _ in 0..10_000 {
        match register_worker_thread() {
            Ok(index) => return index,
            Err(LedgerError::TooManyWorkers { .. }) => thread::sleep(Duration::from_millis(1)),
            Err(other) => panic!("{other}"),
        }
    }
    panic!("no worker index came free");
}

// ---------------------------------------------------------------------------------------------
// The session-end hook

#[test]
fn the_session_end_hook_fires_once_per_ended_session_on_the_dropping_thread() {
    let calls: Arc<Mutex<Vec<thread::ThreadId>>> = Arc::default();
    let seen = calls.clone();
    let (ledger, mut sweeper) = Ledger::builder()
        .capacity(8)
        .on_session_end(move || seen.lock().unwrap().push(thread::current().id()))
        .build()
        .unwrap();
    let a = ledger.open_session("a").unwrap();
    let b = ledger.open_session("b").unwrap();
    let b2 = b.clone();
    let b3 = b.clone();
    drop(b);
    drop(b2);
    assert!(
        calls.lock().unwrap().is_empty(),
        "b3 keeps the session open"
    );
    let dropper = on_unregistered(move || {
        drop(b3);
        thread::current().id()
    });
    assert_eq!(*calls.lock().unwrap(), vec![dropper]);
    drop(a);
    ledger.record("c", 1).unwrap();
    assert_eq!(calls.lock().unwrap().len(), 3);
    assert_eq!(collect_ended(&mut sweeper).0, 3);
    assert_eq!(
        calls.lock().unwrap().len(),
        3,
        "collecting does not fire it again"
    );
}

// ---------------------------------------------------------------------------------------------
// Everything at once

/// What one adder thread did: per-account amounts, and how many sessions it opened (each
/// `record` opens one too).
#[derive(Default)]
struct Expected {
    amounts: HashMap<String, u128>,
    sessions_opened: usize,
}

impl Expected {
    fn add(&mut self, session: &Session, amount: u64) {
        session.add(amount);
        *self
            .amounts
            .entry(session.account().to_owned())
            .or_default() += u128::from(amount);
    }
}

/// Opens a session, waiting for the sweeper to free a slot when the table is full.
fn open_retrying(ledger: &Ledger, account: &str) -> Session {
    loop {
        match ledger.open_session(account) {
            Ok(session) => return session,
            Err(LedgerError::Full { .. }) => thread::yield_now(),
            Err(other) => panic!("{other}"),
        }
    }
}

#[test]
fn concurrent_adds_sessions_and_sweeps_are_exact() {
    const ADDERS: usize = 5; // 3 registered workers, 2 unregistered threads
                             // Under Miri (which interprets every step and checks each access), a few hundred operations
                             // per thread still open, clone, end and reuse sessions on every path.
    const OPS: usize = if cfg!(miri) { 100 } else { 100_000 };
    const OPEN_PER_THREAD: usize = 4;
    const ACCOUNTS: u64 = 12;

    let (ledger, mut sweeper, hook_calls) = counting_ends(64);
    let _indices = worker_indices();
    let adders_done = AtomicBool::new(false);

    // Each adder sends clones of its sessions to the next one (a ring), which adds to them on its
    // own shard and drops them: channels of one session on different threads.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..ADDERS)
        .map(|_| mpsc::sync_channel::<Session>(4))
        .unzip();
    let mut senders: Vec<Option<_>> = senders.into_iter().map(Some).collect();
    senders.rotate_left(1);

    let ((swept, ended), expected) = thread::scope(|scope| {
        let sweeper_thread = scope.spawn(|| {
            let mut all = Vec::new();
            let mut out = Vec::new();
            let mut sweeps = 0usize;
            let mut ended = 0;
            while !adders_done.load(Ordering::Acquire) {
                ended += if sweeps % 4 == 3 {
                    sweeper.collect_ended(&mut out)
                } else {
                    sweeper.sweep(&mut out)
                };
                all.append(&mut out);
                sweeps += 1;
                thread::yield_now();
            }
            // Every session has ended by now: one last sweep collects everything left.
            ended += sweeper.sweep(&mut out);
            all.append(&mut out);
            assert!(sweeps > 1, "the sweeper ran while the adders did");
            (all, ended)
        });

        let adders: Vec<_> = receivers
            .into_iter()
            .zip(senders.iter_mut().map(|sender| sender.take().unwrap()))
            .enumerate()
            .map(|(id, (inbox, next))| {
                let ledger = &ledger;
                scope.spawn(move || {
                    let worker = id < 3;
                    if worker {
                        register_worker_thread().unwrap();
                    }
                    let mut rng = Rng::new(id as u64 + 1);
                    let mut expected = Expected::default();
                    let mut open: Vec<Option<Session>> = vec![None; OPEN_PER_THREAD];
                    let mut extra_channels: Vec<Session> = Vec::new();
                    for _ in 0..OPS {
                        let amount = 1 + rng.below(1_000);
                        let i = rng.below(OPEN_PER_THREAD as u64) as usize;
                        match rng.below(100) {
                            0 => {
                                // End the session (if it has no other channel alive).
                                open[i] = None;
                            }
                            1 => {
                                let account = format!("acct-{}", rng.below(ACCOUNTS));
                                expected.sessions_opened += 1;
                                loop {
                                    match ledger.record(&account, amount) {
                                        Ok(()) => break,
                                        Err(LedgerError::Full { .. }) => thread::yield_now(),
                                        Err(other) => panic!("{other}"),
                                    }
                                }
                                *expected.amounts.entry(account).or_default() += u128::from(amount);
                            }
                            2 | 3 => {
                                if let Some(session) = &open[i] {
                                    // Best effort: a full inbox just drops the clone.
                                    let _ = next.try_send(session.clone());
                                }
                            }
                            4 => {
                                if let Some(session) = &open[i] {
                                    if extra_channels.len() < 2 {
                                        extra_channels.push(session.clone());
                                    }
                                }
                            }
                            5 => {
                                extra_channels.pop();
                            }
                            _ => {
                                let session = open[i].get_or_insert_with(|| {
                                    expected.sessions_opened += 1;
                                    let account = format!("acct-{}", rng.below(ACCOUNTS));
                                    open_retrying(ledger, &account)
                                });
                                expected.add(session, amount);
                                if let Some(channel) = extra_channels.first() {
                                    expected.add(channel, 1);
                                }
                            }
                        }
                        while let Ok(channel) = inbox.try_recv() {
                            expected.add(&channel, amount);
                        }
                    }
                    drop(open);
                    drop(extra_channels);
                    drop(next);
                    // Drain until the previous adder has dropped its sender.
                    for channel in inbox.iter() {
                        expected.add(&channel, 2);
                    }
                    if worker {
                        unregister_worker_thread();
                    }
                    expected
                })
            })
            .collect();

        let expected: Vec<Expected> = adders.into_iter().map(|a| a.join().unwrap()).collect();
        adders_done.store(true, Ordering::Release);
        (sweeper_thread.join().unwrap(), expected)
    });

    let mut want: HashMap<String, u128> = HashMap::new();
    for thread in &expected {
        for (account, amount) in &thread.amounts {
            *want.entry(account.clone()).or_default() += amount;
        }
    }
    assert_eq!(totals(&swept), want);
    assert_eq!(ledger.slots_in_use(), 0, "every slot came back");
    assert_eq!(ledger.saturated_amount(), 0);
    let opened: usize = expected.iter().map(|e| e.sessions_opened).sum();
    assert!(
        opened > ADDERS * OPEN_PER_THREAD,
        "sessions did end and reopen"
    );
    assert_eq!(
        hook_calls.load(Ordering::Relaxed),
        opened,
        "hook: once per session"
    );
    assert_eq!(ended, opened, "the sweeper saw every session end, once");
}
