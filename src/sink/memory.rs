//! An in-process sink: totals in a map, for embedding without Redis, examples and the demo.

use super::{Batch, BatchId, BatchOutcome, KeyOutcome, Sink, SinkError};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How many batch ids the memory sink remembers for deduplication.
const DEDUP_WINDOW: usize = 1 << 16;

/// Keeps totals in memory. Clones share one store, so a test or an endpoint can read what the
/// engine wrote.
///
/// Expiry is recorded, not enforced: [`MemorySink::ttl`] says how long a key has left.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    store: Arc<Mutex<Store>>,
}

#[derive(Debug, Default)]
struct Store {
    totals: HashMap<String, i64>,
    expires: HashMap<String, Instant>,
    applied: HashSet<BatchId>,
    applied_order: VecDeque<BatchId>,
}

impl MemorySink {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The total of `key`, if anything was written to it.
    pub fn total(&self, key: &str) -> Option<i64> {
        self.lock().totals.get(key).copied()
    }

    /// Every key and its total.
    pub fn totals(&self) -> HashMap<String, i64> {
        self.lock().totals.clone()
    }

    /// Time left before `key` would expire.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        let expires = *self.lock().expires.get(key)?;
        Some(expires.saturating_duration_since(Instant::now()))
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the process's view, so keep serving.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn apply(&self, batch: &Batch) -> BatchOutcome {
        let mut store = self.lock();
        if !store.applied.insert(batch.id) {
            return BatchOutcome::AlreadyApplied;
        }
        store.applied_order.push_back(batch.id);
        if store.applied_order.len() > DEDUP_WINDOW {
            if let Some(oldest) = store.applied_order.pop_front() {
                store.applied.remove(&oldest);
            }
        }
        let now = Instant::now();
        let outcomes = batch
            .increments
            .iter()
            .map(|increment| {
                let current = store.totals.get(&*increment.key).copied().unwrap_or(0);
                let added = i64::try_from(increment.amount)
                    .ok()
                    .and_then(|amount| current.checked_add(amount));
                match added {
                    Some(total) => {
                        store.totals.insert(increment.key.to_string(), total);
                        store
                            .expires
                            .insert(increment.key.to_string(), now + increment.ttl);
                        KeyOutcome::Added { total }
                    }
                    None => KeyOutcome::Rejected {
                        reason: "increment or decrement would overflow".into(),
                    },
                }
            })
            .collect();
        BatchOutcome::Applied(outcomes)
    }
}

impl Sink for MemorySink {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        batches.iter().map(|batch| Ok(self.apply(batch))).collect()
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        let store = self.lock();
        Ok(keys
            .iter()
            .map(|key| store.totals.get(key).copied())
            .collect())
    }
}
