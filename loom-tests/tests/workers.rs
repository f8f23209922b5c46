//! Worker index hand-over: the registry's claim (`Acquire`) / release (`Release`) pair.
#![cfg(shardmeter_loom)]

use shardmeter::{register_worker_thread, unregister_worker_thread, Ledger};
use shardmeter_loom_tests::{expected, run_model, spawn, totals, Seen};

/// Model 5. Two threads each register, add to the same session and unregister. With one worker
/// shard, whichever registers second while the first still holds index 0 gets index 1 and the
/// stripes; but when the first has already unregistered, the second claims index 0 and does a
/// plain `load` + `store` on the very cell the first wrote. That load must see the first
/// thread's store, or its add overwrites it: the registry's release/claim pair orders them.
#[test]
fn worker_index_handover() {
    static SEEN: Seen = Seen::new();
    run_model("worker_index_handover", || {
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
        "worker_index_handover",
        &["indexes [0, 0]", "indexes [0, 1]", "indexes [1, 0]"],
    );
}
