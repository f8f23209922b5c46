//! Worker index hand-over: the registry's claim (`Acquire`) / release (`Release`) pair.
#![cfg(shardmeter_loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use shardmeter::{register_worker_thread, unregister_worker_thread, Ledger};
use shardmeter_loom_tests::{expected, run_model, spawn, totals, Seen};

/// Model 5. Two threads each register, add to the same session and unregister. With one worker
/// shard, whichever registers second while the first still holds index 0 gets index 1 and the
/// stripes; but when the first has already unregistered, the second claims index 0 and does a
/// plain `load` + `store` on the very cell the first wrote. That load must see the first
/// thread's store, or its add overwrites it: the registry's release/claim pair orders them.
#[test]
fn worker_handoff() {
    static SEEN: Seen = Seen::new();
    run_model("worker_handoff", || {
        let (ledger, mut sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(1)
            .striped_shards(1)
            .build()
            .unwrap();
        let session = ledger.open_session("a").unwrap();

        let spawn_worker = |name: &str, amount| {
            let session = session.clone();
            spawn(name, move || {
                let index = register_worker_thread().unwrap();
                session.add(amount);
                unregister_worker_thread();
                index
            })
        };
        let first = spawn_worker("first", 1);
        let second = spawn_worker("second", 2);
        let indexes = [first.join().unwrap(), second.join().unwrap()];
        SEEN.note(format!("indexes {indexes:?}"));

        let mut usage = Vec::new();
        sweeper.sweep(&mut usage);
        assert_eq!(
            totals(&usage),
            expected(&[("a", 3)]),
            "worker indexes {indexes:?}"
        );
    });
    // The model is about the hand-over (both got index 0): make sure loom explored it.
    SEEN.assert_reached(
        "worker_handoff",
        &["indexes [0, 0]", "indexes [0, 1]", "indexes [1, 0]"],
    );
}

/// Model 8. The single-writer rule after a hand-over: a thread that gave its index back must
/// stop writing the worker shard at once. "first" registers, adds, unregisters and adds again;
/// "second" registers, adds and unregisters (1 worker shard). When second claims index 0 after
/// first released it, first's second add must go to the striped shard: were first still on
/// index 0, both threads would `load` + `store` one cell with nothing ordering them, and one add
/// would be lost (caught: mutation `unregister-keeps-index` in `scripts/mutations.sh`).
#[test]
fn old_owner_leaves_the_worker_shard() {
    static SEEN: Seen = Seen::new();
    run_model("old_owner_leaves_the_worker_shard", || {
        let (ledger, mut sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(1)
            .striped_shards(1)
            .build()
            .unwrap();
        let session = ledger.open_session("a").unwrap();

        let first = {
            let session = session.clone();
            spawn("first", move || {
                let index = register_worker_thread().unwrap();
                session.add(1);
                unregister_worker_thread();
                session.add(2);
                index
            })
        };
        let second = {
            let session = session.clone();
            spawn("second", move || {
                let index = register_worker_thread().unwrap();
                session.add(4);
                unregister_worker_thread();
                index
            })
        };
        let indexes = [first.join().unwrap(), second.join().unwrap()];
        SEEN.note(format!("indexes {indexes:?}"));

        let mut usage = Vec::new();
        sweeper.sweep(&mut usage);
        assert_eq!(
            totals(&usage),
            expected(&[("a", 7)]),
            "worker indexes {indexes:?}"
        );
    });
    // The hand-over (both got index 0) is the case this model is about.
    SEEN.assert_reached(
        "old_owner_leaves_the_worker_shard",
        &["indexes [0, 0]", "indexes [0, 1]", "indexes [1, 0]"],
    );
}

/// Model 7. The worker registry is a process-wide static (a `loom::lazy_static` under the cfg) and the
/// worker index a thread-local: both must start afresh in every loom iteration, or iterations
/// would leak indexes into each other. Here neither thread unregisters (under loom a thread's
/// exit does not give its index back: loom drops all of a thread's locals at once, so the exit
/// hook finds the index already gone). With a fresh registry and fresh thread-locals, the two
/// threads hold indexes 0 and 1 in every iteration; a registry that outlived an iteration would
/// hand out 2 and 3 in the next, and a thread-local that did would give both threads index 0.
#[test]
fn registry_starts_afresh_in_every_iteration() {
    let iterations = run_model("registry_starts_afresh_in_every_iteration", || {
        // A race of the model's own, so that loom runs several iterations whatever the registry
        // is made of.
        let turn = Arc::new(AtomicUsize::new(0));
        let other = {
            let turn = turn.clone();
            spawn("other", move || {
                turn.fetch_add(1, Ordering::Relaxed);
                register_worker_thread().unwrap()
            })
        };
        turn.fetch_add(1, Ordering::Relaxed);
        let mine = register_worker_thread().unwrap();
        let mut indexes = [mine, other.join().unwrap()];
        indexes.sort_unstable();
        assert_eq!(indexes, [0, 1]);
    });
    assert!(iterations > 1, "loom ran {iterations} iteration(s)");
}
