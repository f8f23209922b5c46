//! Session lifetime: the last handle drops on any thread, the sweeper collects the remainder once,
//! and a reused slot never mixes the amounts of its old and new sessions.
#![cfg(shardmeter_loom)]

use shardmeter::{register_worker_thread, unregister_worker_thread, Ledger, LedgerError};
use shardmeter_loom_tests::{expected, run_model, spawn, thread_name, totals, Seen};
use std::sync::{Arc, Mutex};

/// Model 2. Three handles of one session: a registered worker and an unregistered thread each
/// add and drop theirs, the main thread drops its own, and a sweeper thread sweeps and collects
/// meanwhile. Whichever drop is the last hands the slot to the sweeper. The session's total is
/// exact whatever the racing sweep saw; it ends exactly once (one hook call, one slot collected);
/// and the freed slot serves a new session with none of the old amounts.
#[test]
fn clones_drop_on_different_threads() {
    static SEEN: Seen = Seen::new();
    run_model("clones_drop_on_different_threads", || {
        // The hook notes which thread ended the session (std, not loom: it orders nothing).
        let ended_on = Arc::new(Mutex::new(Vec::new()));
        let hook_log = ended_on.clone();
        let (ledger, sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(1)
            .striped_shards(1)
            .on_session_end(move || hook_log.lock().unwrap().push(thread_name()))
            .build()
            .unwrap();
        let session = ledger.open_session("a").unwrap();

        let worker = {
            let session = session.clone();
            spawn("worker", move || {
                register_worker_thread().unwrap();
                session.add(1);
                drop(session);
                unregister_worker_thread();
            })
        };
        let unregistered = {
            let session = session.clone();
            spawn("unregistered", move || {
                session.add(2);
                drop(session);
            })
        };
        let sweeps = spawn("sweeper", move || {
            let mut sweeper = sweeper;
            let mut usage = Vec::new();
            let mut ended = sweeper.sweep(&mut usage);
            let swept = totals(&usage);
            ended += sweeper.collect_ended(&mut usage);
            (sweeper, usage, swept, ended)
        });

        drop(session);
        worker.join().unwrap();
        unregistered.join().unwrap();
        let (mut sweeper, mut usage, swept, ended_while_racing) = sweeps.join().unwrap();
        let ended = ended_while_racing + sweeper.collect_ended(&mut usage);

        assert_eq!(ended, 1, "the session must end exactly once");
        let ended_on = ended_on.lock().unwrap().clone();
        assert_eq!(ended_on.len(), 1, "hook calls: {ended_on:?}");
        assert_eq!(totals(&usage), expected(&[("a", 3)]));
        SEEN.note(format!("ended on {}", ended_on[0]));
        SEEN.note(format!(
            "racing sweep {swept:?}, end collected {}",
            if ended_while_racing == 1 {
                "while racing"
            } else {
                "after the join"
            }
        ));

        // The one slot is free again, and its cells start from zero.
        let next = ledger.open_session("b").unwrap();
        next.add(5);
        sweeper.sweep(&mut usage);
        drop(next);
        assert_eq!(sweeper.collect_ended(&mut usage), 1);
        assert_eq!(totals(&usage), expected(&[("a", 3), ("b", 5)]));
    });
    SEEN.assert_reached(
        "clones_drop_on_different_threads",
        &[
            "ended on main",
            "ended on worker",
            "ended on unregistered",
            r#"racing sweep {}, end collected after the join"#,
            r#"racing sweep {"a": 1}, end collected while racing"#,
            r#"racing sweep {"a": 2}, end collected while racing"#,
            r#"racing sweep {"a": 3}, end collected after the join"#,
        ],
    );
}

/// Model 3. With one slot, the main thread (a registered worker) ends the old session, which the
/// sweeper has already swept once, and at once tries to open a new one, while a sweeper thread
/// sweeps twice. The new session can only open once a sweep has freed the slot, so a later sweep
/// races the opening (the publication of the new account) and the new session's add, which goes
/// through the very cell the old session used. No amount crosses between the two accounts: the
/// cell and the sweeper's last reading of it both restart from zero.
///
/// The main thread opens and the sweeper runs on its own thread so that the racy schedule needs
/// only two preemptions (main → sweeper after the drop, sweeper → main after the free); the main
/// thread then blocks in `join`, letting the sweeper read the slot without a third one.
#[test]
fn reused_slot_racing_late_sweep() {
    static SEEN: Seen = Seen::new();
    run_model("reused_slot_racing_late_sweep", || {
        let (ledger, mut sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(1)
            .striped_shards(1)
            .build()
            .unwrap();
        register_worker_thread().unwrap();
        let old = ledger.open_session("old").unwrap();
        old.add(1);
        // The sweeper has seen the old session's cell at 1 before the race starts.
        let mut early = Vec::new();
        assert_eq!(sweeper.sweep(&mut early), 0);
        assert_eq!(totals(&early), expected(&[("old", 1)]));

        let sweeps = spawn("sweeper", move || {
            let mut sweeper = sweeper;
            let mut usage = Vec::new();
            let mut ended = sweeper.sweep(&mut usage);
            ended += sweeper.sweep(&mut usage);
            (sweeper, usage, ended)
        });

        old.add(2);
        drop(old);
        let new = match ledger.open_session("new") {
            Ok(new) => {
                new.add(4); // the old session's cell, reset by the sweeper in between
                Some(new)
            }
            Err(LedgerError::Full { .. }) => None,
            Err(error) => panic!("unexpected {error}"),
        };
        let (mut sweeper, mut usage, mut ended) = sweeps.join().unwrap();
        let late = totals(&usage).get("new").copied();
        usage.extend(early);
        ended += sweeper.sweep(&mut usage);
        let reopened = new.is_some();
        drop(new);
        ended += sweeper.collect_ended(&mut usage);
        unregister_worker_thread();

        // Each session ends once: the old one, and the new one if it opened.
        assert_eq!(ended, 1 + usize::from(reopened));

        if reopened {
            assert_eq!(totals(&usage), expected(&[("old", 3), ("new", 4)]));
            SEEN.note("reopened");
        } else {
            assert_eq!(totals(&usage), expected(&[("old", 3)]));
        }
        if let Some(amount) = late {
            SEEN.note(format!("a racing sweep charged new {amount}"));
        }
    });
    SEEN.assert_reached(
        "reused_slot_racing_late_sweep",
        &["reopened", "a racing sweep charged new 4"],
    );
}

/// Model 6. Two threads charge one-off amounts with `Ledger::record` (a whole session each) into
/// a one-slot ledger while the sweeper collects ended sessions. A record either fails with
/// `Full` (nothing charged) or is collected exactly once, in full.
#[test]
fn records_racing_collect() {
    static SEEN: Seen = Seen::new();
    run_model("records_racing_collect", || {
        let (ledger, mut sweeper) = Ledger::builder()
            .capacity(1)
            .worker_shards(0)
            .striped_shards(1)
            .build()
            .unwrap();
        let spawn_record = |account: &'static str, amount: u64| {
            let ledger = ledger.clone();
            spawn(account, move || match ledger.record(account, amount) {
                Ok(()) => amount,
                Err(LedgerError::Full { .. }) => 0,
                Err(error) => panic!("unexpected {error}"),
            })
        };
        let x = spawn_record("x", 2);
        let y = spawn_record("y", 3);

        let mut usage = Vec::new();
        let mut ended = sweeper.collect_ended(&mut usage);
        let charged = [("x", x.join().unwrap()), ("y", y.join().unwrap())];
        ended += sweeper.collect_ended(&mut usage);

        let accepted = charged.iter().filter(|&&(_, amount)| amount > 0).count();
        assert!(accepted >= 1, "the first record always finds the slot free");
        assert_eq!(ended, accepted);
        assert_eq!(totals(&usage), expected(&charged));
        SEEN.note(format!("{accepted} accepted"));
    });
    SEEN.assert_reached("records_racing_collect", &["1 accepted", "2 accepted"]);
}
