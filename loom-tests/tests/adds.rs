//! Adds racing sweeps: nothing added is lost or counted twice, on private worker shards (plain
//! `load` + `store` by one writer), on a striped shard that two threads share (a CAS loop),
//! and on both shards of one slot at once, which the sweeper tracks with one sum per slot.
//!
//! The sweeper runs on a thread spawned after the adding threads, so that loom's first schedule
//! has every add before every sweep and its DPOR then moves the sweeps' loads back between the
//! adds (see `Seen` in the helpers for why the other way round explores too little).
#![cfg(shardmeter_loom)]

use shardmeter::{register_worker_thread, unregister_worker_thread, Ledger};
use shardmeter_loom_tests::{expected, run_model, spawn, sweep_twice, totals, Seen};

/// Model 1. Two registered workers (the main thread and one more) add to two sessions, each on
/// its private shard, while a sweeper thread sweeps twice; a sweep may read any cell between
/// any two adds. After the threads are joined, a final sweep makes the per-account totals over
/// all sweeps exact, and ending the sessions adds nothing.
#[test]
fn worker_adds_racing_sweeps() {
    static SEEN: Seen = Seen::new();
    run_model("worker_adds_racing_sweeps", || {
        let (ledger, sweeper) = Ledger::builder()
            .capacity(2)
            .worker_shards(2)
            .striped_shards(1)
            .build()
            .unwrap();
        let main_index = register_worker_thread().unwrap();
        let a = ledger.open_session("a").unwrap();
        let b = ledger.open_session("b").unwrap();

        let worker = {
            let a = a.clone();
            spawn("worker", move || {
                let index = register_worker_thread().unwrap();
                a.add(4);
                a.add(8);
                unregister_worker_thread();
                index
            })
        };
        let sweeps = sweep_twice(sweeper);

        a.add(1);
        b.add(2);
        unregister_worker_thread();
        let worker_index = worker.join().unwrap();
        let (mut sweeper, mut usage, first) = sweeps.join().unwrap();
        // Both threads wrote private shards (0 and 1, or 0 twice after a hand-over).
        assert!(main_index < 2 && worker_index < 2);

        assert_eq!(sweeper.sweep(&mut usage), 0, "no session has ended yet");
        assert_eq!(totals(&usage), expected(&[("a", 13), ("b", 2)]));
        SEEN.note(format!("first sweep {first:?}"));

        drop((a, b));
        let mut ended = Vec::new();
        assert_eq!(sweeper.collect_ended(&mut ended), 2);
        assert!(ended.is_empty(), "already swept, yet {ended:?}");
    });
    // The race is explored: a sweep before any add, after all, and between the two threads'.
    SEEN.assert_reached(
        "worker_adds_racing_sweeps",
        &[
            r#"first sweep {}"#,
            r#"first sweep {"a": 1}"#,
            r#"first sweep {"a": 4}"#,
            r#"first sweep {"a": 13, "b": 2}"#,
        ],
    );
}

/// Model 4. With no worker shards, a registered thread (its index is beyond the ledger's zero
/// worker shards) and the unregistered main thread both fall back to the one striped shard and
/// add to the same cell concurrently, racing a sweeper thread: totals stay exact, because a
/// striped add is an atomic read-modify-write.
#[test]
fn striped_adds_share_a_shard() {
    static SEEN: Seen = Seen::new();
    run_model("striped_adds_share_a_shard", || {
        let (ledger, sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(0)
            .striped_shards(1)
            .build()
            .unwrap();
        let session = ledger.open_session("a").unwrap();

        let registered = {
            let session = session.clone();
            spawn("registered", move || {
                register_worker_thread().unwrap();
                session.add(1);
                session.add(2);
                unregister_worker_thread();
            })
        };
        let sweeps = spawn("sweeper", move || {
            let mut sweeper = sweeper;
            let mut usage = Vec::new();
            sweeper.sweep(&mut usage);
            (sweeper, usage)
        });

        session.add(4);
        registered.join().unwrap();
        let (mut sweeper, mut usage) = sweeps.join().unwrap();
        SEEN.note(format!("racing sweep {:?}", totals(&usage)));
        drop(session);

        assert_eq!(sweeper.collect_ended(&mut usage), 1);
        assert_eq!(totals(&usage), expected(&[("a", 7)]));
    });
    SEEN.assert_reached(
        "striped_adds_share_a_shard",
        &[
            r#"racing sweep {}"#,
            r#"racing sweep {"a": 1}"#,
            r#"racing sweep {"a": 4}"#,
            r#"racing sweep {"a": 7}"#,
        ],
    );
}

/// Model 9. The sweeper's per-slot sums: one session gets adds on two shards at once, a worker
/// shard (the registered main thread: `load` + `store`) and the striped shard (an unregistered
/// thread: a CAS loop), while a sweeper thread sweeps twice. Each sweep reads both cells
/// once and reports the growth of their sum; the totals over all sweeps are exact whatever each
/// sweep saw. Exact because no cell goes back while the session holds the slot: break that (a
/// sweep that resets the cells of an open slot, mutation `reset-open-slots`) and an add that
/// straddles the reset is counted twice or lost, which this model catches.
#[test]
fn sums_over_two_shards_racing_sweeps() {
    static SEEN: Seen = Seen::new();
    run_model("sums_over_two_shards_racing_sweeps", || {
        let (ledger, sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(1)
            .striped_shards(1)
            .build()
            .unwrap();
        assert_eq!(register_worker_thread().unwrap(), 0);
        let session = ledger.open_session("a").unwrap();

        let unregistered = {
            let session = session.clone();
            spawn("unregistered", move || {
                session.add(2);
                session.add(4);
            })
        };
        let sweeps = sweep_twice(sweeper);

        session.add(1);
        session.add(8);
        unregister_worker_thread();
        unregistered.join().unwrap();
        let (mut sweeper, mut usage, first) = sweeps.join().unwrap();
        SEEN.note(format!("first sweep {first:?}"));

        assert_eq!(sweeper.sweep(&mut usage), 0, "the session is still open");
        assert_eq!(totals(&usage), expected(&[("a", 15)]));
        drop(session);
        let mut ended = Vec::new();
        assert_eq!(sweeper.collect_ended(&mut ended), 1);
        assert!(ended.is_empty(), "already swept, yet {ended:?}");
    });
    // Sweeps that saw one shard's adds, the other's, and parts of both.
    SEEN.assert_reached(
        "sums_over_two_shards_racing_sweeps",
        &[
            r#"first sweep {}"#,
            r#"first sweep {"a": 1}"#,
            r#"first sweep {"a": 2}"#,
            r#"first sweep {"a": 3}"#,
            r#"first sweep {"a": 15}"#,
        ],
    );
}
