//! Amounts the flusher has swept but the sink has not acknowledged, per key.
//!
//! Two stages: `waiting` (merged per key, not yet in a batch) and `in_flight` (batches built
//! once, then sent, and re-sent unchanged with the same ids until the sink answers). New
//! amounts never join an in-flight batch: that is what lets the sink deduplicate retries by id.
//! A new round of batches starts only when the previous round is fully acknowledged, so memory
//! is bounded by twice the number of distinct keys, however long the sink is away.

use crate::sink::{Batch, BatchId, BatchOutcome, Increment, KeyOutcome, SinkError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The most one increment may carry: Redis counters are signed 64-bit.
const MAX_INCREMENT: u128 = i64::MAX as u128;

#[derive(Debug)]
struct Waiting {
    amount: u128,
    ttl: Duration,
}

#[derive(Debug)]
pub(crate) struct Pending {
    waiting: HashMap<String, Waiting>,
    /// Shared with the write future that sends it, so a send or a re-send copies no key.
    in_flight: Arc<Vec<Batch>>,
    /// Per in-flight batch (same order): an attempt may have reached the sink and its outcome
    /// is unknown. Once in doubt, a batch stays so until the sink acknowledges it.
    in_doubt: Vec<bool>,
    /// Sum of everything in `waiting` and `in_flight`.
    amount: u128,
    writer: u64,
    next_sequence: u64,
    /// Rounds of batches started so far.
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

/// What one write round achieved.
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
            waiting: HashMap::new(),
            in_flight: Arc::default(),
            in_doubt: Vec::new(),
            amount: 0,
            writer,
            next_sequence: 0,
            rounds: 0,
            batch_size,
        }
    }

    /// Adds a swept amount; the latest TTL for a key wins.
    pub(crate) fn add(&mut self, key: String, amount: u64, ttl: Duration) {
        if amount == 0 {
            return;
        }
        let waiting = self
            .waiting
            .entry(key)
            .or_insert(Waiting { amount: 0, ttl });
        waiting.amount += u128::from(amount);
        waiting.ttl = ttl;
        self.amount += u128::from(amount);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }

    /// The batches to send now: the unacknowledged ones, or else a new round from `waiting`.
    pub(crate) fn batches_to_send(&mut self) -> Arc<Vec<Batch>> {
        if self.in_flight.is_empty() && !self.waiting.is_empty() {
            self.start_round();
        }
        self.in_flight.clone()
    }

    /// Moves every waiting amount (up to `i64::MAX` per key) into new batches. Keys move, not
    /// copy; batches fill one after another, so building a round is linear in its keys.
    fn start_round(&mut self) {
        self.rounds += 1;
        let batch_size = self.batch_size;
        let mut filled = Vec::with_capacity(self.waiting.len().div_ceil(batch_size));
        let mut increments = Vec::with_capacity(batch_size.min(self.waiting.len()));
        let mut over_max = Vec::new();
        for (key, mut waiting) in self.waiting.drain() {
            let amount = waiting.amount.min(MAX_INCREMENT);
            waiting.amount -= amount;
            if waiting.amount > 0 {
                // What is over `i64::MAX` waits for a later round.
                over_max.push((key.clone(), waiting.amount, waiting.ttl));
            }
            increments.push(Increment {
                key,
                amount: amount as u64,
                ttl: waiting.ttl,
            });
            if increments.len() == batch_size {
                filled.push(std::mem::replace(
                    &mut increments,
                    Vec::with_capacity(batch_size),
                ));
            }
        }
        if !increments.is_empty() {
            filled.push(increments);
        }
        for (key, amount, ttl) in over_max {
            self.waiting.insert(key, Waiting { amount, ttl });
        }
        let writer = self.writer;
        let first_sequence = self.next_sequence;
        self.next_sequence += filled.len() as u64;
        self.in_doubt = vec![false; filled.len()];
        self.in_flight = Arc::new(
            (first_sequence..)
                .zip(filled)
                .map(|(sequence, increments)| Batch {
                    id: BatchId { writer, sequence },
                    increments,
                })
                .collect(),
        );
    }

    /// How many batches the last `batches_to_send` returned and are not yet settled.
    pub(crate) fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The round that carries everything pending now: the next one if amounts wait, else the
    /// one in flight, else the last one (already acknowledged). An amount above `i64::MAX` for
    /// one key spans several rounds; this is the first of them.
    pub(crate) fn round_carrying_pending(&self) -> u64 {
        if self.waiting.is_empty() {
            self.rounds
        } else {
            self.rounds + 1
        }
    }

    /// Whether round `round` is fully acknowledged. A round starts only once the previous one
    /// is, so a later round having started means it was.
    pub(crate) fn round_done(&self, round: u64) -> bool {
        self.rounds > round || (self.rounds == round && self.in_flight.is_empty())
    }

    /// Applies the sink's answers (one per batch of the last `batches_to_send`, in order):
    /// acknowledged batches leave, the others stay to be re-sent unchanged. `acknowledged` hears
    /// of every increment that left: with the key's new total when the sink gave one (not for a
    /// batch it had already applied, nor for a refused increment).
    pub(crate) fn settle(
        &mut self,
        results: Vec<Result<BatchOutcome, SinkError>>,
        mut acknowledged_increment: impl FnMut(&Increment, Option<i64>),
    ) -> Settlement {
        let mut settlement = Settlement::default();
        let mut results = results.into_iter();
        let mut acknowledged = 0u128;
        let mut doubts = std::mem::take(&mut self.in_doubt).into_iter();
        let in_doubt = &mut self.in_doubt;
        // The write future that shared these batches is done, so this copies nothing.
        Arc::make_mut(&mut self.in_flight).retain(|batch| {
            let was_in_doubt = doubts.next().unwrap_or(true);
            let result = results.next().unwrap_or_else(|| {
                Err(SinkError::Failed(
                    "the sink returned fewer results than batches".into(),
                ))
            });
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
                                    key: increment.key.clone(),
                                    amount: increment.amount,
                                    reason,
                                });
                            }
                            None => {
                                acknowledged_increment(increment, None);
                                settlement.rejections.push(Rejection {
                                    key: increment.key.clone(),
                                    amount: increment.amount,
                                    reason: "the sink returned no outcome for this key".into(),
                                });
                            }
                        }
                    }
                    acknowledged += batch_amount(batch);
                    false
                }
                Ok(BatchOutcome::AlreadyApplied) => {
                    for increment in &batch.increments {
                        acknowledged_increment(increment, None);
                    }
                    settlement.batches_written += 1;
                    settlement.duplicate_batches += 1;
                    settlement.keys_written += batch.increments.len() as u64;
                    settlement.amount_written += batch_amount(batch);
                    acknowledged += batch_amount(batch);
                    false
                }
                Err(error) => {
                    in_doubt.push(was_in_doubt || error.may_have_applied());
                    settlement.failure.get_or_insert(error);
                    true
                }
            }
        });
        self.amount -= acknowledged;
        settlement
    }

    /// Total amount not yet acknowledged.
    pub(crate) fn amount(&self) -> u128 {
        self.amount
    }

    /// Distinct keys with an unacknowledged amount (no allocation: this is read after every
    /// sweep).
    pub(crate) fn keys(&self) -> usize {
        let only_in_flight = self
            .in_flight
            .iter()
            .flat_map(|batch| &batch.increments)
            .filter(|increment| !self.waiting.contains_key(&increment.key))
            .count();
        self.waiting.len() + only_in_flight
    }

    /// Every key with its unacknowledged amount that certainly did not reach the sink (never
    /// sent, or every attempt known not to have applied), sorted by key: safe to replay.
    pub(crate) fn unwritten(&self) -> Vec<(String, u128)> {
        let mut per_key: HashMap<&str, u128> = HashMap::new();
        for (key, waiting) in &self.waiting {
            *per_key.entry(key).or_default() += waiting.amount;
        }
        let certain = self
            .in_flight
            .iter()
            .zip(&self.in_doubt)
            .filter(|(_, in_doubt)| !**in_doubt);
        for increment in certain.flat_map(|(batch, _)| &batch.increments) {
            *per_key.entry(&increment.key).or_default() += u128::from(increment.amount);
        }
        let mut unwritten: Vec<_> = per_key
            .into_iter()
            .map(|(key, amount)| (key.to_owned(), amount))
            .collect();
        unwritten.sort();
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

    fn settle(pending: &mut Pending, results: Vec<Result<BatchOutcome, SinkError>>) -> Settlement {
        pending.settle(results, |_, _| {})
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
        let batches = pending.batches_to_send().to_vec();
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
        let batches = pending.batches_to_send().to_vec();
        let outcome = |batch: &Batch| match batch.increments[0].key.as_str() {
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
        assert_eq!(doubt[0].increments[0].key, "lost");
        // A later attempt that is known not to have applied does not clear the doubt.
        let again = pending.batches_to_send().to_vec();
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
        let first = pending.batches_to_send().to_vec();
        let settlement = settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        assert!(settlement.failure.is_some());
        pending.add("a".into(), 3, TTL);
        assert_eq!(
            *pending.batches_to_send(),
            first,
            "a retry re-sends the same batch"
        );
        assert_eq!(pending.amount(), 8);
        let settlement = settle(&mut pending, vec![applied(&first[0])]);
        assert_eq!((settlement.keys_written, settlement.amount_written), (1, 5));
        let second = pending.batches_to_send().to_vec();
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
        let first = pending.batches_to_send().to_vec();
        pending.add("b".into(), 2, TTL);
        assert_eq!(pending.round_carrying_pending(), round + 1);
        settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        assert!(!pending.round_done(round), "a failed round is not done");
        pending.batches_to_send();
        settle(&mut pending, vec![applied(&first[0])]);
        assert!(
            pending.round_done(round),
            "b came later: it does not hold round {round} up"
        );
        assert!(!pending.round_done(round + 1));
        let second = pending.batches_to_send().to_vec();
        settle(&mut pending, vec![applied(&second[0])]);
        assert!(pending.round_done(round + 1) && pending.is_empty());
    }

    #[test]
    fn duplicates_count_as_written_and_rejections_are_reported() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 5, TTL);
        pending.add("b".into(), 6, TTL);
        let batch = pending.batches_to_send()[0].clone();
        let outcomes = batch
            .increments
            .iter()
            .map(|i| match i.key.as_str() {
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
        pending.batches_to_send();
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
            let batches = pending.batches_to_send().to_vec();
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
}
