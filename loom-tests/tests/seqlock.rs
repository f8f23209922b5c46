//! The read side's sequence lock (`src/seqlock.rs`): a reader racing the writer gets the words
//! of one whole publication, never words of two.
#![cfg(shardmeter_loom)]

use shardmeter::SeqLock;
use shardmeter_loom_tests::{run_model, spawn, Seen};

/// Model 10. The writer publishes `[1, 1]` and then `[2, 2]` over the initial `[0, 0]` while a
/// reader reads twice. Every read is one publication's words, and the second read is never older
/// than the first. It fails when either fence in `SeqLock` is removed, or the reader's first load
/// or the writer's last store of the sequence is weakened to `Relaxed` (`scripts/mutations.sh`).
#[test]
fn seqlock_reads_whole_publications() {
    static SEEN: Seen = Seen::new();
    run_model("seqlock_reads_whole_publications", || {
        let lock = loom::sync::Arc::new(SeqLock::<2>::new([0, 0]));
        let reader = {
            let lock = lock.clone();
            spawn("reader", move || [lock.read(), lock.read()])
        };
        lock.publish([1, 1]);
        lock.publish([2, 2]);
        let reads = reader.join().unwrap();
        for [first, second] in reads {
            assert_eq!(first, second, "torn read: {reads:?}");
        }
        assert!(reads[0][0] <= reads[1][0], "went back: {reads:?}");
        SEEN.note(format!("{}{}", reads[0][0], reads[1][0]));
    });
    SEEN.assert_reached(
        "seqlock_reads_whole_publications",
        &["00", "01", "12", "22"],
    );
}
