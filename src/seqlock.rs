//! A few numbers that one thread publishes and any thread reads as one consistent snapshot,
//! without a lock or an allocation: a sequence lock whose words are all atomics.
//!
//! The engine's read side publishes every tracked account's numbers twice per flush (after the
//! sweep, after the sink's answer). An `ArcSwap` of an immutable view cost an allocation and a
//! walk of arc-swap's reader list per publication, about a fifth of the flusher's CPU
//! (`docs/benchmarks.md`, *The read side published with a sequence lock*); here a publication
//! is `N + 2` plain stores.
//!
//! # Synchronization
//!
//! The scheme is the one Hans Boehm shows correct in the C++ model ("Can seqlocks get along with
//! programming language memory models?", MSPC 2012), with every word atomic so that a racing
//! read is never a data race:
//!
//! - the writer stores an odd sequence, a `Release` fence, the words (`Relaxed`), then the next
//!   even sequence with `Release`;
//! - a reader loads the sequence with `Acquire`, the words (`Relaxed`), issues an `Acquire`
//!   fence and loads the sequence again; it keeps the words only if both loads saw the same even
//!   value, and tries again otherwise.
//!
//! Why that is enough: if any word the reader loaded was stored by a later publication than the
//! one its first load saw end, the writer's fence (before that word's store) and the reader's
//! fence (after that word's load) make the writer's odd store happen before the reader's second
//! load, which then cannot return the first value. And the first load's `Acquire` synchronizes
//! with the even store it read, so no word is older than that publication. Loom model
//! `seqlock_reads_whole_publications` (loom-tests/tests/seqlock.rs) fails when either fence is
//! removed, or the reader's first load or the writer's last store is weakened to `Relaxed`
//! (four mutations in `scripts/mutations.sh`).
//!
//! There must be one writer at a time: [`SeqLock::publish`] takes `&self` so that readers can
//! share the value, and its callers keep the single-writer rule (the engine's flusher is the only
//! one that publishes).

// `pub` for the loom models' re-export (`lib.rs`); crate-private otherwise.
#![cfg_attr(not(shardmeter_loom), allow(unreachable_pub))]

use crate::loom::{back_off, fence, AtomicU64, Ordering};

/// `N` words published together by one writer; see the module docs.
pub struct SeqLock<const N: usize> {
    /// Odd while a publication is under way; advances by 2 per publication.
    sequence: AtomicU64,
    words: [AtomicU64; N],
}

impl<const N: usize> SeqLock<N> {
    /// Holds `words` from the start.
    pub fn new(words: [u64; N]) -> Self {
        Self {
            sequence: AtomicU64::new(0),
            words: words.map(AtomicU64::new),
        }
    }

    /// Replaces every word. Only one thread may publish at a time (module docs).
    pub fn publish(&self, words: [u64; N]) {
        // Relaxed: the single writer reads its own last store.
        let sequence = self.sequence.load(Ordering::Relaxed);
        debug_assert!(sequence % 2 == 0, "SeqLock: two publications at once");
        self.sequence
            .store(sequence.wrapping_add(1), Ordering::Relaxed);
        // Release fence: a reader that loads any word stored below also sees the odd sequence
        // stored above, once it passes its own Acquire fence (module docs).
        fence(Ordering::Release);
        for (word, value) in self.words.iter().zip(words) {
            // Relaxed: the fences and the sequence order these stores for readers.
            word.store(value, Ordering::Relaxed);
        }
        // Release: a reader whose first load sees this value sees every word stored above.
        self.sequence
            .store(sequence.wrapping_add(2), Ordering::Release);
    }

    /// The words of one whole publication: the one whose end the read saw first (a word of a
    /// later publication makes it try again).
    /// A reader only waits while a publication is under way (`N + 2` stores, unless the OS
    /// deschedules the writer in between).
    pub fn read(&self) -> [u64; N] {
        let mut attempt = 0;
        loop {
            // Acquire: pairs with the Release store that ended the publication seen here.
            let before = self.sequence.load(Ordering::Acquire);
            if before % 2 == 1 {
                back_off(attempt);
                attempt = attempt.saturating_add(1);
                continue;
            }
            // Relaxed: checked against the sequence below.
            let words = std::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
            // Acquire fence: a word stored by a later publication makes that publication's odd
            // sequence visible to the load below (module docs).
            fence(Ordering::Acquire);
            // Relaxed: the fence above orders it after the loads of the words.
            if self.sequence.load(Ordering::Relaxed) == before {
                return words;
            }
            back_off(attempt);
            attempt = attempt.saturating_add(1);
        }
    }
}

impl<const N: usize> std::fmt::Debug for SeqLock<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SeqLock").field(&self.read()).finish()
    }
}
