//! Amounts the flusher has swept but the sink has not acknowledged, per key.
//!
//! Four stages, in order: `waiting` (merged per key, not yet in a batch); the open round's
//! `cutting` (what was waiting when the round began, cut into batches a slice at a time, so
//! that a round of a million keys is never built in one poll); `staged` (batches built, ids
//! given, not sent yet); and `in_flight` (the batches of the write in progress, re-sent
//! unchanged with the same ids until the sink answers).
//!
//! New amounts never join a built batch: that is what lets the sink deduplicate retries by id.
//! A write carries new batches only when every batch of the previous write is settled (a failed
//! write is re-sent as it was, alone), and a new round begins only when the previous one is
//! fully acknowledged, so memory is bounded by twice the number of distinct keys, however long
//! the sink is away. Within a round, batches go out as they are cut: the sink writes the first
//! ones while the flusher cuts the rest.

use crate::sink::{Batch, BatchId, BatchOutcome, Increment, Key, KeyOutcome, SinkError};
use std::collections::hash_map::{self, HashMap};
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

/// The most one increment may carry: Redis counters are signed 64-bit.
const MAX_INCREMENT: u128 = i64::MAX as u128;

/// foldhash instead of std's SipHash: a key is hashed at every sweep that finds it, and
/// SipHash was a quarter of a flush's instructions. No key here comes from a client that
/// could choose collisions to slow the map down: keys are built from account ids the
/// application opened sessions for, and foldhash's seed is still random per process.
pub(crate) type KeyMap<V> = HashMap<Key, V, foldhash::fast::RandomState>;

/// Shards of a [`Sharded`] map.
pub(crate) const MAP_SHARDS: usize = 256;

/// A map split over [`MAP_SHARDS`] maps by a hash of the key. A `HashMap` grows by rehashing
/// all of its entries at once: at a million keys that is one poll of tens to hundreds of
/// milliseconds. Here one growth rehashes one shard, a 256th of the entries. Used for the
/// flusher's per-key and per-account maps, looked up about once per key per flush, so with
/// foldhash (see [`KeyMap`]).
pub(crate) struct Sharded<K, V> {
    route: foldhash::fast::RandomState,
    pub(crate) shards: Box<[HashMap<K, V, foldhash::fast::RandomState>]>,
}

impl<K: std::hash::Hash + Eq, V> Sharded<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            route: foldhash::fast::RandomState::default(),
            shards: (0..MAP_SHARDS).map(|_| HashMap::default()).collect(),
        }
    }

    fn index<Q: std::hash::Hash + ?Sized>(&self, key: &Q) -> usize {
        // The top byte of a hash of its own (the shards' maps use other seeds): below 256.
        (self.route.hash_one(key) >> 56) as usize
    }

    pub(crate) fn shard<Q: std::hash::Hash + ?Sized>(
        &self,
        key: &Q,
    ) -> &HashMap<K, V, foldhash::fast::RandomState> {
        &self.shards[self.index(key)]
    }

    pub(crate) fn shard_mut<Q: std::hash::Hash + ?Sized>(
        &mut self,
        key: &Q,
    ) -> &mut HashMap<K, V, foldhash::fast::RandomState> {
        let index = self.index(key);
        &mut self.shards[index]
    }

    /// An empty map whose shards have the capacity of `self`'s.
    fn empty_like(&self) -> Self {
        Self {
            route: self.route.clone(),
            shards: self
                .shards
                .iter()
                .map(|shard| {
                    HashMap::with_capacity_and_hasher(shard.capacity(), Default::default())
                })
                .collect(),
        }
    }
}

impl<K, V> std::fmt::Debug for Sharded<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Waiting {
    amount: u128,
    ttl: Duration,
}

/// The answers to a write, applied a slice at a time (see `Pending::settle_some`).
#[derive(Debug)]
struct Answers {
    batches: std::vec::IntoIter<Batch>,
    in_doubt: std::vec::IntoIter<bool>,
    results: std::vec::IntoIter<Result<BatchOutcome, SinkError>>,
    /// The batches not acknowledged, in flight again once every answer is applied.
    kept: Vec<Batch>,
    kept_in_doubt: Vec<bool>,
}

#[derive(Debug)]
pub(crate) struct Pending {
    waiting: Sharded<Key, Waiting>,
    /// Keys in `waiting`.
    waiting_keys: usize,
    /// The open round's keys not yet in a batch, one iterator per shard of the `waiting` it
    /// took, the next to cut from last (empty once all are cut).
    cutting: Vec<hash_map::IntoIter<Key, Waiting>>,
    /// Keys in `cutting`.
    uncut: usize,
    /// The batch being filled by `cut`.
    filling: Vec<Increment>,
    /// Built, with ids, not sent yet; sent in order.
    staged: VecDeque<Batch>,
    /// Shared with the write future that sends it, so a send or a re-send copies no key.
    in_flight: Arc<Vec<Batch>>,
    /// Per in-flight batch (same order): an attempt may have reached the sink and its outcome
    /// is unknown. Once in doubt, a batch stays so until the sink acknowledges it.
    in_doubt: Vec<bool>,
    /// The answers to the last write while they are being applied; its batches are here then,
    /// not in `in_flight`.
    answers: Option<Answers>,
    /// Increments in `filling`, `staged`, `in_flight` and `answers`.
    batched: usize,
    /// Sum of everything not yet acknowledged, in every stage.
    amount: u128,
    writer: u64,
    next_sequence: u64,
    /// Rounds begun so far.
    rounds: u64,
    batch_size: usize,
}

/// A key the sink refused for good, and the amount that therefore was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The key.
    pub key: String,
    /// The amount of the refused increment.
    pub amount: u64,
    /// The sink's reason.
    pub reason: String,
}

/// What one write achieved.
#[derive(Debug, Default)]
pub(crate) struct Settlement {
    pub(crate) batches_written: u64,
    pub(crate) duplicate_batches: u64,
    pub(crate) keys_written: u64,
    pub(crate) amount_written: u128,
    pub(crate) rejections: Vec<Rejection>,
    pub(crate) failure: Option<SinkError>,
}

impl Pending {
    pub(crate) fn new(writer: u64, batch_size: usize) -> Self {
        Self {
            waiting: Sharded::new(),
            waiting_keys: 0,
            cutting: Vec::new(),
            uncut: 0,
            filling: Vec::new(),
            staged: VecDeque::new(),
            in_flight: Arc::default(),
            in_doubt: Vec::new(),
            answers: None,
            batched: 0,
            amount: 0,
            writer,
            next_sequence: 0,
            rounds: 0,
            batch_size,
        }
    }

    /// Adds a swept amount; the latest TTL for a key wins. The key is shared, not copied.
    pub(crate) fn add(&mut self, key: Key, amount: u64, ttl: Duration) {
        if amount == 0 {
            return;
        }
        let waiting = match self.waiting.shard_mut(&key).entry(key) {
            hash_map::Entry::Occupied(entry) => entry.into_mut(),
            hash_map::Entry::Vacant(entry) => {
                self.waiting_keys += 1;
                entry.insert(Waiting { amount: 0, ttl })
            }
        };
        waiting.amount += u128::from(amount);
        waiting.ttl = ttl;
        self.amount += u128::from(amount);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting_keys == 0 && !self.round_open()
    }

    /// Whether some batch of the round begun last is not yet acknowledged, or not yet built.
    fn round_open(&self) -> bool {
        self.uncut > 0
            || !self.filling.is_empty()
            || !self.staged.is_empty()
            || !self.in_flight.is_empty()
            || self.answers.is_some()
    }

    /// Whether `cut` has work: keys of the open round not yet in a batch, or a round to begin.
    pub(crate) fn has_uncut(&self) -> bool {
        self.uncut > 0 || (!self.round_open() && self.waiting_keys > 0)
    }

    /// Moves up to `most` keys of the open round into batches, beginning a round from
    /// `waiting` if none is open. A batch is staged when full, or when the round's last key is
    /// in it; so cutting a round costs one poll per slice and is linear in its keys.
    pub(crate) fn cut(&mut self, most: usize) {
        if !self.round_open() {
            if self.waiting_keys == 0 {
                return;
            }
            self.rounds += 1;
            // Amounts swept from now on wait for the next round, in shards as large as these:
            // growing them again is a rehash per doubling.
            let next = self.waiting.empty_like();
            let round = std::mem::replace(&mut self.waiting, next);
            self.cutting = round
                .shards
                .into_vec()
                .into_iter()
                .map(HashMap::into_iter)
                .collect();
            self.uncut = std::mem::take(&mut self.waiting_keys);
        }
        let mut cut = 0;
        while cut < most {
            let Some(shard) = self.cutting.last_mut() else {
                break;
            };
            let Some((key, mut waiting)) = shard.next() else {
                self.cutting.pop();
                continue;
            };
            cut += 1;
            self.uncut -= 1;
            let amount = waiting.amount.min(MAX_INCREMENT);
            waiting.amount -= amount;
            if waiting.amount > 0 {
                // What is over `i64::MAX` waits for a later round.
                let ttl = waiting.ttl;
                self.add_above_max(key.clone(), waiting.amount, ttl);
            }
            if self.filling.capacity() == 0 {
                self.filling.reserve_exact(self.batch_size);
            }
            self.filling.push(Increment {
                key,
                // At most `i64::MAX`: the cast keeps the value.
                amount: amount as u64,
                ttl: waiting.ttl,
            });
            self.batched += 1;
            if self.filling.len() == self.batch_size {
                self.stage();
            }
        }
        if self.uncut == 0 {
            self.cutting.clear();
            if !self.filling.is_empty() {
                self.stage();
            }
        }
    }

    /// Puts back into `waiting` the part of a key's amount above `i64::MAX` (already counted in
    /// `amount`).
    fn add_above_max(&mut self, key: Key, amount: u128, ttl: Duration) {
        let later = match self.waiting.shard_mut(&key).entry(key) {
            hash_map::Entry::Occupied(entry) => entry.into_mut(),
            hash_map::Entry::Vacant(entry) => {
                self.waiting_keys += 1;
                entry.insert(Waiting { amount: 0, ttl })
            }
        };
        later.amount += amount;
    }

    /// Gives the batch being filled its id and queues it for sending.
    fn stage(&mut self) {
        let id = BatchId {
            writer: self.writer,
            sequence: self.next_sequence,
        };
        self.next_sequence += 1;
        self.staged.push_back(Batch {
            id,
            increments: std::mem::take(&mut self.filling),
        });
    }

    /// The batches to send now: the unacknowledged ones of the last write (unchanged), or else
    /// every staged batch.
    pub(crate) fn batches_to_send(&mut self) -> Arc<Vec<Batch>> {
        if self.in_flight.is_empty() && !self.staged.is_empty() {
            let batches: Vec<Batch> = self.staged.drain(..).collect();
            self.in_doubt = vec![false; batches.len()];
            self.in_flight = Arc::new(batches);
        }
        self.in_flight.clone()
    }

    /// Whether a built batch waits to be sent, or a sent one to be acknowledged.
    pub(crate) fn has_batches(&self) -> bool {
        !self.staged.is_empty() || !self.in_flight.is_empty()
    }

    /// How many batches the last `batches_to_send` returned and are not yet settled.
    pub(crate) fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The round that carries everything pending now: the next one if amounts wait, else the
    /// open one, else the last one (already acknowledged). An amount above `i64::MAX` for
    /// one key spans several rounds; this is the first of them.
    pub(crate) fn round_carrying_pending(&self) -> u64 {
        if self.waiting_keys == 0 {
            self.rounds
        } else {
            self.rounds + 1
        }
    }

    /// Whether round `round` is fully acknowledged. A round begins only once the previous one
    /// is, so a later round having begun means it was.
    pub(crate) fn round_done(&self, round: u64) -> bool {
        self.rounds > round || (self.rounds == round && !self.round_open())
    }

    /// Takes the sink's answers to the last write (one per batch of the last `batches_to_send`,
    /// in order), for `settle_some` to apply.
    pub(crate) fn receive(&mut self, results: Vec<Result<BatchOutcome, SinkError>>) {
        // The write future that shared these batches is done, so this copies nothing.
        let batches = std::mem::take(Arc::make_mut(&mut self.in_flight));
        self.answers = Some(Answers {
            kept: Vec::new(),
            kept_in_doubt: Vec::new(),
            batches: batches.into_iter(),
            in_doubt: std::mem::take(&mut self.in_doubt).into_iter(),
            results: results.into_iter(),
        });
    }

    /// Applies the received answers of batches holding about `most` increments (whole
    /// batches, at least one), adding what they achieved to `settlement`; returns whether all
    /// are applied. Acknowledged batches leave, the others are in flight again, to be re-sent
    /// unchanged. `acknowledged` hears of every increment that left: with the key's new total
    /// when the sink gave one (not for a batch it had already applied, nor for a refused
    /// increment). Slices keep a write of a whole round from being settled in one poll.
    pub(crate) fn settle_some(
        &mut self,
        most: usize,
        settlement: &mut Settlement,
        mut acknowledged_increment: impl FnMut(&Increment, Option<i64>),
    ) -> bool {
        let Some(answers) = self.answers.as_mut() else {
            return true;
        };
        let mut applied = 0;
        while applied < most {
            let Some(batch) = answers.batches.next() else {
                break;
            };
            let was_in_doubt = answers.in_doubt.next().unwrap_or(true);
            let result = answers.results.next().unwrap_or_else(|| {
                Err(SinkError::Failed(
                    "the sink returned fewer results than batches".into(),
                ))
            });
            applied += batch.increments.len().max(1);
            match result {
                Ok(BatchOutcome::Applied(outcomes)) => {
                    settlement.batches_written += 1;
                    let mut outcomes = outcomes.into_iter();
                    for increment in &batch.increments {
                        match outcomes.next() {
                            Some(KeyOutcome::Added { total }) => {
                                acknowledged_increment(increment, Some(total));
                                settlement.keys_written += 1;
                                settlement.amount_written += u128::from(increment.amount);
                            }
                            Some(KeyOutcome::Rejected { reason }) => {
                                acknowledged_increment(increment, None);
                                settlement.rejections.push(Rejection {
                                    key: increment.key.to_string(),
                                    amount: increment.amount,
                                    reason,
                                });
                            }
                            None => {
                                acknowledged_increment(increment, None);
                                settlement.rejections.push(Rejection {
                                    key: increment.key.to_string(),
                                    amount: increment.amount,
                                    reason: "the sink returned no outcome for this key".into(),
                                });
                            }
                        }
                    }
                }
                Ok(BatchOutcome::AlreadyApplied) => {
                    for increment in &batch.increments {
                        acknowledged_increment(increment, None);
                    }
                    settlement.batches_written += 1;
                    settlement.duplicate_batches += 1;
                    settlement.keys_written += batch.increments.len() as u64;
                    settlement.amount_written += batch_amount(&batch);
                }
                Err(error) => {
                    answers
                        .kept_in_doubt
                        .push(was_in_doubt || error.may_have_applied());
                    answers.kept.push(batch);
                    settlement.failure.get_or_insert(error);
                    continue;
                }
            }
            self.amount -= batch_amount(&batch);
            self.batched -= batch.increments.len();
        }
        if answers.batches.len() > 0 {
            return false;
        }
        if let Some(answers) = self.answers.take() {
            self.in_flight = Arc::new(answers.kept);
            self.in_doubt = answers.kept_in_doubt;
        }
        true
    }

    /// Total amount not yet acknowledged.
    pub(crate) fn amount(&self) -> u128 {
        self.amount
    }

    /// Entries held: waiting keys, keys of the open round not yet cut, and increments in
    /// batches. A key both in a batch and waiting again counts twice, so this is at most twice
    /// the distinct keys; it is read after every sweep slice, so it is counted, not computed.
    pub(crate) fn entries(&self) -> usize {
        self.waiting_keys + self.uncut + self.batched
    }

    /// Every key with its unacknowledged amount that certainly did not reach the sink (never
    /// sent, or every attempt known not to have applied), sorted by key: safe to replay.
    pub(crate) fn unwritten(&mut self) -> Vec<(String, u128)> {
        // The uncut keys are only reachable by taking them: read them, then put them back.
        let uncut: KeyMap<Waiting> = self.cutting.drain(..).flatten().collect();
        let mut per_key: HashMap<&str, u128> = HashMap::new();
        for (key, waiting) in self.waiting.shards.iter().flatten().chain(&uncut) {
            *per_key.entry(key).or_default() += waiting.amount;
        }
        let certain = self
            .in_flight
            .iter()
            .zip(&self.in_doubt)
            .filter(|(_, in_doubt)| !**in_doubt)
            .map(|(batch, _)| &batch.increments);
        let built = self.staged.iter().map(|batch| &batch.increments);
        for increment in certain
            .chain(built)
            .chain(std::iter::once(&self.filling))
            .flatten()
        {
            *per_key.entry(&increment.key).or_default() += u128::from(increment.amount);
        }
        let mut unwritten: Vec<_> = per_key
            .into_iter()
            .map(|(key, amount)| (key.to_owned(), amount))
            .collect();
        unwritten.sort();
        if !uncut.is_empty() {
            self.cutting.push(uncut.into_iter());
        }
        unwritten
    }
}

impl Pending {
    /// The unacknowledged batches that may have been applied: sent at least once with an
    /// unknown outcome (a timeout, a connection lost after sending). Replaying them could count
    /// them twice; re-sending them with the same id cannot.
    pub(crate) fn in_doubt(&self) -> Vec<Batch> {
        self.in_flight
            .iter()
            .zip(&self.in_doubt)
            .filter(|(_, in_doubt)| **in_doubt)
            .map(|(batch, _)| batch.clone())
            .collect()
    }
}

fn batch_amount(batch: &Batch) -> u128 {
    batch
        .increments
        .iter()
        .map(|increment| u128::from(increment.amount))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    /// Cuts whatever is waiting into batches and returns what a write would send now.
    fn send(pending: &mut Pending) -> Vec<Batch> {
        pending.cut(usize::MAX);
        pending.batches_to_send().to_vec()
    }

    /// Applies a write's answers, two increments at a time (so slices are exercised).
    fn settle(pending: &mut Pending, results: Vec<Result<BatchOutcome, SinkError>>) -> Settlement {
        let mut settlement = Settlement::default();
        pending.receive(results);
        while !pending.settle_some(2, &mut settlement, |_, _| {}) {}
        settlement
    }

    fn applied(batch: &Batch) -> Result<BatchOutcome, SinkError> {
        Ok(BatchOutcome::Applied(
            batch
                .increments
                .iter()
                .map(|_| KeyOutcome::Added { total: 0 })
                .collect(),
        ))
    }

    #[test]
    fn amounts_merge_per_key_and_split_into_bounded_batches() {
        let mut pending = Pending::new(7, 2);
        for key in ["a", "b", "c", "a"] {
            pending.add(key.into(), 5, TTL);
        }
        pending.add("zero".into(), 0, TTL);
        let batches = send(&mut pending);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches.iter().map(|b| b.increments.len()).sum::<usize>(), 3);
        assert_eq!(
            batches[0].id,
            BatchId {
                writer: 7,
                sequence: 0
            }
        );
        assert_eq!(
            batches[1].id,
            BatchId {
                writer: 7,
                sequence: 1
            }
        );
        assert_eq!(pending.amount(), 20, "a: 5 + 5, b: 5, c: 5");
        assert_eq!(
            pending.unwritten(),
            vec![("a".into(), 10), ("b".into(), 5), ("c".into(), 5)]
        );
    }

    #[test]
    fn only_batches_that_may_have_applied_are_in_doubt() {
        let mut pending = Pending::new(1, 1);
        for key in ["never", "refused", "lost"] {
            pending.add(key.into(), 5, TTL);
        }
        let batches = send(&mut pending);
        let outcome = |batch: &Batch| match &*batch.increments[0].key {
            "never" => Err(SinkError::NotSent("not connected".into())),
            "refused" => Err(SinkError::Failed("OOM".into())),
            _ => Err(SinkError::Timeout(TTL)),
        };
        settle(&mut pending, batches.iter().map(outcome).collect());
        pending.add("waiting".into(), 2, TTL);
        assert_eq!(
            pending.unwritten(),
            vec![
                ("never".into(), 5),
                ("refused".into(), 5),
                ("waiting".into(), 2)
            ]
        );
        let doubt = pending.in_doubt();
        assert_eq!(doubt.len(), 1);
        assert_eq!(&*doubt[0].increments[0].key, "lost");
        // A later attempt that is known not to have applied does not clear the doubt.
        let again = send(&mut pending);
        settle(
            &mut pending,
            again
                .iter()
                .map(|_| Err(SinkError::NotSent("down".into())))
                .collect(),
        );
        assert_eq!(pending.in_doubt().len(), 1);
    }

    #[test]
    fn failed_batches_are_resent_unchanged_and_new_amounts_wait() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 5, TTL);
        let first = send(&mut pending);
        let settlement = settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        assert!(settlement.failure.is_some());
        pending.add("a".into(), 3, TTL);
        assert_eq!(send(&mut pending), first, "a retry re-sends the same batch");
        assert_eq!(pending.amount(), 8);
        let settlement = settle(&mut pending, vec![applied(&first[0])]);
        assert_eq!((settlement.keys_written, settlement.amount_written), (1, 5));
        let second = send(&mut pending);
        assert_eq!(second[0].id.sequence, 1);
        assert_eq!(second[0].increments[0].amount, 3);
    }

    #[test]
    fn a_round_carries_what_was_pending_and_later_amounts_wait_for_the_next() {
        let mut pending = Pending::new(1, 10);
        assert!(
            pending.round_done(pending.round_carrying_pending()),
            "nothing pending"
        );
        pending.add("a".into(), 1, TTL);
        let round = pending.round_carrying_pending();
        assert!(!pending.round_done(round));
        let first = send(&mut pending);
        pending.add("b".into(), 2, TTL);
        assert_eq!(pending.round_carrying_pending(), round + 1);
        settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        assert!(!pending.round_done(round), "a failed round is not done");
        send(&mut pending);
        settle(&mut pending, vec![applied(&first[0])]);
        assert!(
            pending.round_done(round),
            "b came later: it does not hold round {round} up"
        );
        assert!(!pending.round_done(round + 1));
        let second = send(&mut pending);
        settle(&mut pending, vec![applied(&second[0])]);
        assert!(pending.round_done(round + 1) && pending.is_empty());
    }

    #[test]
    fn duplicates_count_as_written_and_rejections_are_reported() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 5, TTL);
        pending.add("b".into(), 6, TTL);
        let batch = send(&mut pending)[0].clone();
        let outcomes = batch
            .increments
            .iter()
            .map(|i| match &*i.key {
                "a" => KeyOutcome::Added { total: 5 },
                _ => KeyOutcome::Rejected {
                    reason: "WRONGTYPE".into(),
                },
            })
            .collect();
        let settlement = settle(&mut pending, vec![Ok(BatchOutcome::Applied(outcomes))]);
        assert_eq!(settlement.amount_written, 5);
        assert_eq!(
            settlement.rejections,
            vec![Rejection {
                key: "b".into(),
                amount: 6,
                reason: "WRONGTYPE".into()
            }]
        );
        assert!(pending.is_empty());

        pending.add("a".into(), 1, TTL);
        send(&mut pending);
        let settlement = settle(&mut pending, vec![Ok(BatchOutcome::AlreadyApplied)]);
        assert_eq!(
            (settlement.duplicate_batches, settlement.amount_written),
            (1, 1)
        );
    }

    #[test]
    fn amounts_above_i64_max_are_split_over_rounds() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), u64::MAX, TTL);
        pending.add("a".into(), u64::MAX, TTL);
        let mut written = 0u128;
        for _ in 0..5 {
            let batches = send(&mut pending);
            if batches.is_empty() {
                break;
            }
            assert!(batches[0].increments[0].amount <= i64::MAX as u64);
            let unwritten: u128 = pending.unwritten().iter().map(|(_, amount)| amount).sum();
            assert_eq!(pending.amount(), unwritten, "the running total matches");
            written += settle(&mut pending, batches.iter().map(applied).collect()).amount_written;
        }
        assert_eq!(written, 2 * u128::from(u64::MAX));
        assert!(pending.is_empty());
    }

    #[test]
    fn a_round_is_cut_in_slices_and_its_batches_go_out_as_they_fill() {
        let mut pending = Pending::new(1, 2);
        for key in ["a", "b", "c", "d", "e"] {
            pending.add(key.into(), 1, TTL);
        }
        let round = pending.round_carrying_pending();
        assert!(pending.has_uncut());
        pending.cut(3);
        assert!(pending.has_uncut(), "two keys left to cut");
        let first = pending.batches_to_send().to_vec();
        assert_eq!(first.len(), 1, "only the full batch is staged");
        assert_eq!(first[0].increments.len(), 2);
        assert_eq!(pending.entries(), 5, "2 sent, 1 filling, 2 uncut");
        let all: u128 = pending.unwritten().iter().map(|(_, amount)| amount).sum();
        assert_eq!(all, 5, "every stage is unwritten before it is acknowledged");
        pending.add("a".into(), 10, TTL);
        pending.cut(3);
        assert!(
            !pending.has_uncut(),
            "a's new amount waits for the next round"
        );
        assert_eq!(
            pending.batches_to_send().to_vec(),
            first,
            "no new batch joins a write in flight"
        );
        settle(&mut pending, vec![applied(&first[0])]);
        assert!(!pending.round_done(round));
        let rest = pending.batches_to_send().to_vec();
        assert_eq!(
            rest.iter().map(|b| b.id.sequence).collect::<Vec<_>>(),
            [1, 2],
            "what was staged meanwhile goes out in one write"
        );
        assert_eq!(rest.iter().map(|b| b.increments.len()).sum::<usize>(), 3);
        settle(&mut pending, rest.iter().map(applied).collect());
        assert!(pending.round_done(round));
        assert_eq!(pending.amount(), 10);
        assert_eq!(send(&mut pending)[0].increments[0].amount, 10);
    }

    #[test]
    fn a_failed_write_is_resent_alone_while_later_batches_wait() {
        let mut pending = Pending::new(1, 1);
        for key in ["a", "b", "c"] {
            pending.add(key.into(), 1, TTL);
        }
        pending.cut(1);
        let first = pending.batches_to_send().to_vec();
        settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        pending.cut(usize::MAX);
        assert_eq!(
            pending.batches_to_send().to_vec(),
            first,
            "the re-send carries the failed batch alone, unchanged"
        );
        assert_eq!(
            pending.in_doubt(),
            first,
            "a timed-out batch may have applied"
        );
        settle(&mut pending, vec![applied(&first[0])]);
        let next = pending.batches_to_send().to_vec();
        assert_eq!(
            next.iter().map(|b| b.id.sequence).collect::<Vec<_>>(),
            [1, 2]
        );
    }

    #[test]
    fn entries_count_a_key_once_per_stage() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 1, TTL);
        pending.add("a".into(), 1, TTL);
        pending.add("b".into(), 1, TTL);
        assert_eq!(pending.entries(), 2);
        send(&mut pending);
        pending.add("a".into(), 1, TTL);
        assert_eq!(pending.entries(), 3, "a is in flight and waiting again");
        let batches = pending.batches_to_send().to_vec();
        settle(&mut pending, batches.iter().map(applied).collect());
        assert_eq!(pending.entries(), 1);
    }
}
