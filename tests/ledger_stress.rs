//! Stress: worker indexes change hands while their previous owners keep adding.
//!
//! The single-writer rule (a worker cell is written by the thread holding its worker index, and
//! by no one else) is what makes the worker path's plain `load` + `store` exact. This test hammers
//! the one place where that rule could break at run time: a hand-over. Several threads, in a
//! loop, register (claiming index 0, the ledger's only worker shard, when it is free), add, give
//! the index back and keep adding to the same session, now through the striped shard, while a
//! sweeper sweeps. If a thread that gave its index back went on writing the worker cell, its
//! `load` + `store` would race the new owner's and adds would be lost: the totals below would not
//! match (`scripts/mutations.sh`, mutation `unregister-keeps-index`, checks that they do not).
//!
//! It runs in its own test binary, so no other test's threads hold worker indexes. Bounded: it
//! adds for `SHARDMETER_STRESS_MS` milliseconds (default 2000; a few rounds only under Miri).
//! It never asserts on time: the deadline only bounds how long it looks for a lost add.

use shardmeter::ledger::{Ledger, LedgerError, Usage};
use shardmeter::{register_worker_thread, unregister_worker_thread};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Adding threads; more than the machine's 2 cores, so that hand-overs also happen while the
/// previous owner is preempted between its load and its store.
const ADDERS: usize = 3;
/// Adds per thread between two registration changes.
const BURST: u64 = if cfg!(miri) { 3 } else { 200 };
/// Under Miri: registration rounds per thread (instead of a deadline).
const MIRI_ROUNDS: usize = 4;
const NO_OWNER: usize = usize::MAX;

fn duration() -> Duration {
    let ms = std::env::var("SHARDMETER_STRESS_MS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(2_000);
    Duration::from_millis(ms)
}

fn total(usage: &[Usage]) -> u128 {
    usage.iter().map(|record| u128::from(record.amount)).sum()
}

/// What one adder did.
#[derive(Debug, Default)]
struct Adder {
    /// Sum of the amounts it added.
    added: u128,
    /// Rounds in which it held index 0 (the worker shard).
    rounds_on_worker_shard: usize,
}

#[test]
fn worker_indexes_change_hands_while_old_owners_keep_adding() {
    let (ledger, mut sweeper) = Ledger::builder()
        .capacity(2)
        .worker_shards(1)
        .striped_shards(1)
        .build()
        .expect("valid configuration");
    let session = ledger.open_session("acct").unwrap();
    let deadline = Instant::now() + duration();
    let adders_done = AtomicBool::new(false);
    // Which adder held index 0 last, and how many times it passed from one adder to another.
    let last_owner = AtomicUsize::new(NO_OWNER);
    let handovers = AtomicUsize::new(0);

    let (adders, swept) = thread::scope(|scope| {
        let sweeper_thread = scope.spawn(|| {
            let mut swept = Vec::new();
            // Relaxed: the join below, not this flag, orders the adders' adds before the last
            // sweep; the flag only ends the loop.
            while !adders_done.load(Ordering::Relaxed) {
                sweeper.sweep(&mut swept);
                thread::yield_now();
            }
            (sweeper, swept)
        });
        let adders: Vec<_> = (0..ADDERS)
            .map(|id| {
                let session = session.clone();
                let (last_owner, handovers) = (&last_owner, &handovers);
                scope.spawn(move || {
                    let mut adder = Adder::default();
                    let mut round = 0usize;
                    loop {
                        round += 1;
                        let done = if cfg!(miri) {
                            round > MIRI_ROUNDS
                        } else {
                            Instant::now() >= deadline
                        };
                        if done {
                            break;
                        }
                        let index = match register_worker_thread() {
                            Ok(index) => index,
                            Err(LedgerError::TooManyWorkers { .. }) => {
                                unreachable!(
                                    "{ADDERS} threads cannot use {MAX} indexes",
                                    MAX = shardmeter::ledger::MAX_WORKERS
                                )
                            }
                            Err(other) => panic!("{other}"),
                        };
                        if index == 0 {
                            adder.rounds_on_worker_shard += 1;
                            // Relaxed: a statistic of the test, read after the join.
                            let previous = last_owner.swap(id, Ordering::Relaxed);
                            if previous != id && previous != NO_OWNER {
                                handovers.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Amounts vary per round, so that a lost add cannot cancel out.
                        let amount = 1 + (round as u64 % 7);
                        for _ in 0..BURST {
                            session.add(amount);
                        }
                        unregister_worker_thread();
                        // No longer a worker: these go to the striped shard, never to index 0's
                        // cell, which another adder may own by now.
                        for _ in 0..BURST {
                            session.add(amount);
                        }
                        adder.added += 2 * u128::from(BURST) * u128::from(amount);
                        if cfg!(miri) {
                            thread::yield_now();
                        }
                    }
                    adder
                })
            })
            .collect();
        let adders: Vec<Adder> = adders
            .into_iter()
            .map(|adder| adder.join().unwrap())
            .collect();
        adders_done.store(true, Ordering::Relaxed);
        (adders, sweeper_thread.join().unwrap())
    });
    let (mut sweeper, mut swept) = swept;
    drop(session);
    sweeper.collect_ended(&mut swept);

    let added: u128 = adders.iter().map(|adder| adder.added).sum();
    let on_worker_shard = adders
        .iter()
        .filter(|a| a.rounds_on_worker_shard > 0)
        .count();
    let handovers = handovers.into_inner();
    println!(
        "{ADDERS} adders added {added} in {} rounds on the worker shard; index 0 changed hands \
         {handovers} times",
        adders
            .iter()
            .map(|a| a.rounds_on_worker_shard)
            .sum::<usize>()
    );
    assert_eq!(total(&swept), added, "adds lost or counted twice");
    assert!(swept.iter().all(|usage| &*usage.account == "acct"));
    // Not vacuous: the worker shard was used, and by more than one thread in turn.
    if !cfg!(miri) {
        assert!(
            on_worker_shard > 1,
            "only {on_worker_shard} adder(s) held index 0"
        );
        assert!(handovers > 0, "index 0 never changed hands");
    }
    assert_eq!(ledger.slots_in_use(), 0);
}
