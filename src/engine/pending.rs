//! Amounts the flusher has swept but the sink has not acknowledged, per key.
//!
//! Four stages, in order: `waiting` (merged per key, not yet in a batch: by the owner's number
//! in the owned lane where the amount was counted for an account, else by key); the open round's
//! `cutting` (what was waiting when the round began, cut into batches a slice at a time, so
//! that a round of a million keys is never built in one poll); `staged` (batches built, ids
//! given, not sent yet); and `in_flight` (the batches of the write in progress, re-sent
//! unchanged with the same ids until the sink answers).
//!
//! An amount may name the account it was counted for (an [`Owner`]: the read side's number for
//! it). Each increment's acknowledgement hands back the owner and how much of the increment was
//! counted ([`Counted`]), so that the read side finds the account without a lookup and subtracts
//! exactly what it counted, also when uncounted amounts of the same key joined it.
//!
//! New amounts never join a built batch: that is what lets the sink deduplicate retries by id.
//! A write carries new batches only when every batch of the previous write is settled (a failed
//! write is re-sent as it was, alone), and a new round begins only when the previous one is
//! fully acknowledged, so memory is bounded by twice the number of distinct keys, however long
//! the sink is away. Within a round, batches go out as they are cut: the sink writes the first
//! ones while the flusher cuts the rest.

use super::prefetch::prefetch_counts;
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

/// Bits of a hash that pick the shard of `Pending`'s map of waiting amounts: 256 shards. A round
/// takes the map whole and leaves a new one, whose shards make room for the round before's keys
/// at their first insert (see [`Sharded::sized_like`]), in the tables the round before emptied
/// where there are some ([`Sharded::shard_to_fill`]): fewer, larger shards make fewer of those
/// allocations. With 4,096, before that sizing, the engine's own CPU per account was a third
/// higher at 100,000 accounts (`docs/benchmarks.md`).
pub(crate) const PENDING_SHARD_BITS: u32 = 8;
/// Given-back tables freed per call of [`Pending::cut`] (~60 µs each at a million keys under
/// jemalloc, less under glibc, which unmaps them).
const RELEASED_PER_CUT: usize = 4;

/// A map split over `1 << bits` maps by a hash of the key. A `HashMap` grows by rehashing
/// all of its entries at once: at a million keys that is one poll of tens to hundreds of
/// milliseconds. Here one growth rehashes one shard. Used for the pending amounts not counted for
/// an owner (see [`OwnedLane`]), looked up about once per key per flush, so with foldhash (see
/// [`KeyMap`]); the read side's indices are `NameIndex`es (`names.rs`), which keep their hashes.
pub(crate) struct Sharded<K, V> {
    route: foldhash::fast::RandomState,
    /// How many of the route hash's top bits pick the shard.
    bits: u32,
    pub(crate) shards: Box<[HashMap<K, V, foldhash::fast::RandomState>]>,
    /// Per shard, the entries to make room for at its first insert (see [`Sharded::sized_like`]).
    expected: Option<Box<[usize]>>,
}

impl<K: std::hash::Hash + Eq, V> Sharded<K, V> {
    /// An empty map of `1 << bits` shards (an empty shard costs its 48 bytes and nothing else).
    pub(crate) fn new(bits: u32) -> Self {
        debug_assert!((1..usize::BITS).contains(&bits));
        Self {
            route: foldhash::fast::RandomState::default(),
            bits,
            shards: (0..1_usize << bits).map(|_| HashMap::default()).collect(),
            expected: None,
        }
    }

    /// An empty map whose shards, at their first insert, make room for as many entries as
    /// `other`'s hold now, so that a map refilled with about the same keys every round does not
    /// grow (rehash) its way there again. Room is made at the first insert, not here: up front it
    /// would be every shard's allocation and page faults in one poll.
    pub(crate) fn sized_like<W>(other: &Sharded<K, W>) -> Self {
        Self {
            expected: Some(other.shards.iter().map(HashMap::len).collect()),
            ..Self::new(other.bits)
        }
    }

    /// Its shards make room, at their first insert, for at least a share of `entries` and four
    /// standard deviations more (keys routed at random: a share of `n` varies by about `√n`),
    /// plus an eighth for keys the estimate missed; or for what they expected already, if more.
    pub(crate) fn expect(&mut self, entries: usize) {
        let share = entries.div_ceil(self.shards.len());
        let room = share + 4 * share.isqrt() + share / 8;
        match &mut self.expected {
            Some(expected) => expected
                .iter_mut()
                .for_each(|expected| *expected = (*expected).max(room)),
            None if entries > 0 => {
                self.expected = Some(vec![room; self.shards.len()].into_boxed_slice());
            }
            None => {}
        }
    }

    fn index<Q: std::hash::Hash + ?Sized>(&self, key: &Q) -> usize {
        // The top `bits` of a hash of its own (the shards' maps use other seeds): below the
        // number of shards, so the cast keeps the value.
        (self.route.hash_one(key) >> (u64::BITS - self.bits)) as usize
    }

    /// The shard of `key`, for an insert: a shard without a table yet takes one of `spares`
    /// (emptied tables of an earlier map) before it allocates, so that a map refilled every round
    /// reuses the memory the round before touched. A fresh table's first touches were page
    /// faults: sweep slices of 2–6 ms at the start of a flush of a million keys.
    pub(crate) fn shard_to_fill(
        &mut self,
        key: &K,
        spares: &mut Vec<HashMap<K, V, foldhash::fast::RandomState>>,
    ) -> &mut HashMap<K, V, foldhash::fast::RandomState> {
        let index = self.index(key);
        adopt_spare(&mut self.shards[index], spares);
        self.prepared(index)
    }

    /// Shard `index`, which at its first insert makes room for what is expected of it, or gives
    /// back what a spare table has far beyond that (the keys became fewer).
    fn prepared(&mut self, index: usize) -> &mut HashMap<K, V, foldhash::fast::RandomState> {
        let shard = &mut self.shards[index];
        if let Some(expected) = &self.expected {
            if shard.is_empty() {
                make_room(shard, expected[index]);
            }
        }
        shard
    }

    /// Ahead of the inserts: gives up to `most` shards that have no table yet, and are expected
    /// to get keys, their table (one of `spares`, else a new one with room for what is
    /// expected). Returns whether such a shard is left. A sweep calls it a slice at a time before
    /// it begins: otherwise its first slices made every shard's table (256 allocations, each
    /// with its first page faults) in two or three polls of 2–3 ms at a million keys.
    pub(crate) fn prepare(
        &mut self,
        most: usize,
        spares: &mut Vec<HashMap<K, V, foldhash::fast::RandomState>>,
    ) -> bool {
        let Some(expected) = &self.expected else {
            return false;
        };
        let mut prepared = 0;
        for (shard, &room) in self.shards.iter_mut().zip(expected.iter()) {
            if shard.capacity() > 0 || room == 0 {
                continue;
            }
            if prepared == most {
                return true;
            }
            adopt_spare(shard, spares);
            make_room(shard, room);
            prepared += 1;
        }
        false
    }
}

/// Gives a shard without a table one of `spares`, if there is one.
fn adopt_spare<K, V>(
    shard: &mut HashMap<K, V, foldhash::fast::RandomState>,
    spares: &mut Vec<HashMap<K, V, foldhash::fast::RandomState>>,
) {
    if shard.capacity() == 0 {
        if let Some(spare) = spares.pop() {
            debug_assert!(spare.is_empty());
            *shard = spare;
        }
    }
}

/// Makes an empty shard's table fit `room` entries: grown to it, or shrunk when it is far
/// larger (a spare from a round of more keys).
fn make_room<K: std::hash::Hash + Eq, V>(
    shard: &mut HashMap<K, V, foldhash::fast::RandomState>,
    room: usize,
) {
    if shard.capacity() < room {
        shard.reserve(room);
    } else if shard.capacity() > 4 * room + 64 {
        shard.shrink_to(room);
    }
}

impl<K, V> std::fmt::Debug for Sharded<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded").finish_non_exhaustive()
    }
}

/// The caller's number for the account an amount was counted for (the read side's index of
/// it), handed back with the amount's acknowledgement.
pub(crate) type Owner = u32;

/// How many increments ahead of the one settled [`Pending::settle_some`] starts loading a key's
/// reference counts ([`prefetch_counts`]).
const KEY_COUNTS_AHEAD: usize = 16;

/// How much of an increment was counted for `owner` (the rest, if any, for nobody).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) owner: Owner,
    pub(crate) amount: u64,
}

#[derive(Debug)]
struct Waiting {
    amount: u128,
    /// The part of `amount` counted for `owner`.
    counted: u128,
    owner: Option<Owner>,
    ttl: Duration,
}

impl Waiting {
    fn new(ttl: Duration) -> Self {
        Self {
            amount: 0,
            counted: 0,
            owner: None,
            ttl,
        }
    }

    /// Adds `amount`, of which `counted.1` counted for `counted.0`.
    fn add(&mut self, amount: u128, counted: Option<(Owner, u128)>) {
        self.amount += amount;
        if let Some((owner, counted)) = counted {
            // A key is one account's in one bucket, and the read side keeps an account's
            // number while amounts counted for it are unacknowledged.
            debug_assert!(self.owner.is_none_or(|seen| seen == owner));
            self.owner = Some(owner);
            self.counted += counted;
        }
    }

    /// Joins `other`, waiting for the same key: its amount and its counted part. The longer TTL
    /// wins, so that neither part's key expires sooner than it asked.
    fn join(&mut self, other: Waiting) {
        self.add(
            other.amount,
            other.owner.map(|owner| (owner, other.counted)),
        );
        self.ttl = self.ttl.max(other.ttl);
    }
}

/// Entries per block of [`OwnedLane`] (80 bytes each: 320 KiB a block).
const LANE_BLOCK: usize = 4_096;
/// Owners per block of [`OwnedLane`]'s index (8 bytes each).
const OWNERS_PER_BLOCK: usize = 4_096;

/// The waiting amounts counted for an owner, one entry per owner in a round, found by the
/// owner's number rather than by key. A sweep finds almost every amount's owner, so most amounts
/// wait here: an amount costs no hash, and a sweep's new entries are written one after another
/// into blocks that earlier rounds already touched. In the keyed map each was a store to a table
/// line out of cache, and the key's locked count increment that came next waited for it: the
/// engine's own CPU per account was two fifths lower without the map (`docs/benchmarks.md`).
///
/// An owner's entry holds the key it was made with. An amount for another key of the same owner
/// (its key in the next bucket, or the number of a forgotten account taken by another) is not
/// joined to it: [`OwnedLane::add`] gives the key back, and it waits in the keyed map. A key
/// therefore has at most one entry here, and [`Pending::cut`] joins the keyed map's entry, if
/// any, to it.
#[derive(Debug)]
struct OwnedLane {
    blocks: Vec<Vec<(Key, Waiting)>>,
    /// Entries in `blocks`.
    len: usize,
    /// Per owner, in blocks of [`OWNERS_PER_BLOCK`]: the generation its entry was made in and the
    /// entry's position; an entry of an older generation is gone (taken by a round). One
    /// generation a round, so that beginning a round clears nothing here.
    at: Vec<Box<[(u32, u32)]>>,
    generation: u32,
    /// Blocks a round has emptied, kept for the lane to fill again.
    spares: Vec<Vec<(Key, Waiting)>>,
    /// Spare blocks the lane did not take again during a round, given back when the next one
    /// began, [`RELEASED_PER_CUT`] per call of `cut` (as the keyed map's spare tables).
    released: Vec<Vec<(Key, Waiting)>>,
}

impl OwnedLane {
    fn new() -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
            at: Vec::new(),
            generation: 1,
            spares: Vec::new(),
            released: Vec::new(),
        }
    }

    /// Adds `amount`, all counted for `owner`, to `owner`'s entry if it is `key`'s, or to a new
    /// entry if `owner` has none this round; returns whether it made one. Gives `key` back if
    /// `owner`'s entry is another key's.
    fn add(&mut self, key: Key, amount: u128, ttl: Duration, owner: Owner) -> Result<bool, Key> {
        let owner_at = owner as usize;
        let (block, offset) = (owner_at / OWNERS_PER_BLOCK, owner_at % OWNERS_PER_BLOCK);
        if self.at.len() <= block {
            self.at
                .resize_with(block + 1, || vec![(0, 0); OWNERS_PER_BLOCK].into());
        }
        let at = &mut self.at[block][offset];
        let counted = Some((owner, amount));
        if at.0 == self.generation {
            let position = at.1 as usize;
            let (entry_key, waiting) =
                &mut self.blocks[position / LANE_BLOCK][position % LANE_BLOCK];
            if !(Arc::ptr_eq(entry_key, &key) || *entry_key == key) {
                return Err(key);
            }
            waiting.add(amount, counted);
            waiting.ttl = ttl;
            return Ok(false);
        }
        // Four billion entries in a round would take hundreds of gigabytes.
        let Ok(position) = u32::try_from(self.len) else {
            return Err(key);
        };
        if self
            .blocks
            .last()
            .is_none_or(|block| block.len() == LANE_BLOCK)
        {
            let block = self.spares.pop();
            self.blocks
                .push(block.unwrap_or_else(|| Vec::with_capacity(LANE_BLOCK)));
        }
        let mut waiting = Waiting::new(ttl);
        waiting.add(amount, counted);
        // A block is made with room for `LANE_BLOCK` entries and holds fewer here.
        if let Some(block) = self.blocks.last_mut() {
            block.push((key, waiting));
        }
        *at = (self.generation, position);
        self.len += 1;
        Ok(true)
    }

    /// Takes every entry, for a round; the lane starts a new generation, empty. Spare blocks it
    /// did not take again since the last round are surplus: released.
    fn take(&mut self) -> Vec<Vec<(Key, Waiting)>> {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            // Once in four billion rounds: no index entry may look current.
            self.at.iter_mut().for_each(|block| block.fill((0, 0)));
            self.generation = 1;
        }
        self.len = 0;
        self.released.append(&mut self.spares);
        std::mem::take(&mut self.blocks)
    }

    /// Keeps a block a round emptied, to fill again.
    fn recycle(&mut self, block: Vec<(Key, Waiting)>) {
        debug_assert!(block.is_empty());
        if block.capacity() == LANE_BLOCK {
            self.spares.push(block);
        }
    }

    fn entries(&self) -> impl Iterator<Item = &(Key, Waiting)> {
        self.blocks.iter().flatten()
    }
}

/// The answers to a write, applied a slice at a time (see `Pending::settle_some`).
#[derive(Debug)]
struct Answers {
    batches: std::vec::IntoIter<Batch>,
    counts: std::vec::IntoIter<Vec<Option<Counted>>>,
    in_doubt: std::vec::IntoIter<bool>,
    results: std::vec::IntoIter<Result<BatchOutcome, SinkError>>,
    /// The acknowledged batch whose increments are being applied, when a slice ended inside it.
    applying: Option<Applying>,
    /// The batches not acknowledged, in flight again once every answer is applied.
    kept: Vec<Batch>,
    kept_counts: Vec<Vec<Option<Counted>>>,
    kept_in_doubt: Vec<bool>,
}

/// An acknowledged batch applied increment by increment, so that a slice can end inside it (a
/// batch holds up to 100,000 increments).
#[derive(Debug)]
struct Applying {
    increments: std::vec::IntoIter<Increment>,
    counts: std::vec::IntoIter<Option<Counted>>,
    /// The sink's outcome per increment, in order; `None` for a batch it had already applied.
    outcomes: Option<std::vec::IntoIter<KeyOutcome>>,
}

#[derive(Debug)]
pub(crate) struct Pending {
    /// Waiting amounts: most in `owned`, the others (not counted for an owner, or for a key
    /// other than the owner's entry's) in the keyed map `waiting`.
    owned: OwnedLane,
    waiting: Sharded<Key, Waiting>,
    /// Keys in `owned` and `waiting` (a key in both counts twice).
    waiting_keys: usize,
    /// The open round's keys not yet in a batch: the blocks of `owned` it took (`round_owned`)
    /// and the entries of the one being cut (`cutting_owned`, from the end), then the shards of
    /// the `waiting` it took (`round`) from `round_shard` on, and the entries of the one being
    /// cut (`cutting`). A block or shard is begun when the one before is used up, so that
    /// beginning a round does no work per shard. An owned entry is cut with the keyed entry of
    /// its key, if there is one (`round_keyed` counts the keys in shards not begun).
    round_owned: std::vec::IntoIter<Vec<(Key, Waiting)>>,
    cutting_owned: Vec<(Key, Waiting)>,
    round: Option<Sharded<Key, Waiting>>,
    round_shard: usize,
    round_keyed: usize,
    cutting: Vec<(Key, Waiting)>,
    /// Keys in all of the round's parts.
    uncut: usize,
    /// Shards the round has emptied, their tables kept for `waiting` to fill again (see
    /// [`Sharded::shard_to_fill`]).
    spare_shards: Vec<KeyMap<Waiting>>,
    /// Spare tables that the next round's `waiting` did not take, given back when that round
    /// began: freed [`RELEASED_PER_CUT`] per call of `cut`, not all at once (256 tables of a
    /// million keys freed in one step were a poll of 12-17 ms under jemalloc).
    released: Vec<KeyMap<Waiting>>,
    /// The batch being filled by `cut`, and what of each increment was counted.
    filling: Vec<Increment>,
    filling_counts: Vec<Option<Counted>>,
    /// Built, with ids, not sent yet; sent in order. With what of each increment was counted.
    staged: VecDeque<(Batch, Vec<Option<Counted>>)>,
    /// Shared with the write future that sends it, so a send or a re-send copies no key.
    in_flight: Arc<Vec<Batch>>,
    /// Per in-flight batch (same order), what of each increment was counted.
    in_flight_counts: Vec<Vec<Option<Counted>>>,
    /// Per in-flight batch (same order): an attempt may have reached the sink and its outcome
    /// is unknown. Once in doubt, a batch stays so until the sink acknowledges it.
    in_doubt: Vec<bool>,
    /// The answers to the last write while they are being applied; its batches are here then,
    /// not in `in_flight`.
    answers: Option<Answers>,
    /// Increments in `filling`, `staged`, `in_flight` and `answers`.
    batched: usize,
    /// Amount in `filling`; increments and amount in `staged`, and in `in_flight` (while a
    /// write's answers are applied: in its batches not yet acknowledged). What a write carries,
    /// known without a pass over its (up to a million) increments.
    filling_amount: u128,
    staged_totals: (usize, u128),
    in_flight_totals: (usize, u128),
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
            owned: OwnedLane::new(),
            waiting: Sharded::new(PENDING_SHARD_BITS),
            waiting_keys: 0,
            round_owned: Vec::new().into_iter(),
            cutting_owned: Vec::new(),
            round: None,
            round_shard: 0,
            round_keyed: 0,
            cutting: Vec::new(),
            uncut: 0,
            spare_shards: Vec::new(),
            released: Vec::new(),
            filling: Vec::new(),
            filling_counts: Vec::new(),
            staged: VecDeque::new(),
            in_flight: Arc::default(),
            in_flight_counts: Vec::new(),
            in_doubt: Vec::new(),
            answers: None,
            batched: 0,
            filling_amount: 0,
            staged_totals: (0, 0),
            in_flight_totals: (0, 0),
            amount: 0,
            writer,
            next_sequence: 0,
            rounds: 0,
            batch_size,
        }
    }

    /// The keyed map of waiting amounts may take about `keys` keys: it makes room for them as it
    /// fills, rather than grow to them. A growth of a shard of ~3,600 keys (a million in all)
    /// was a poll of ~1 ms, and the first flush of a million accounts grew every shard several
    /// times (~130 polls over 1 ms). Otherwise it makes room for as many keys as the round
    /// before's (`Sharded::sized_like`): amounts counted for an owner go to the owned lane.
    pub(crate) fn expect_keys(&mut self, keys: usize) {
        self.waiting.expect(keys);
    }

    /// Whether a round has begun since this was made.
    pub(crate) fn has_begun_a_round(&self) -> bool {
        self.rounds > 0
    }

    /// Gives up to `shards` of the waiting map's shards their table ahead of the inserts (see
    /// [`Sharded::prepare`]); returns whether more are left to prepare.
    pub(crate) fn prepare(&mut self, shards: usize) -> bool {
        self.waiting.prepare(shards, &mut self.spare_shards)
    }

    /// Adds a swept amount, counted for `owner` if some (to the owned lane, else to the keyed
    /// map); the latest TTL for a key wins. The key is shared, not copied.
    pub(crate) fn add(&mut self, key: Key, amount: u64, ttl: Duration, owner: Option<Owner>) {
        if amount == 0 {
            return;
        }
        let amount = u128::from(amount);
        self.amount += amount;
        let key = match owner {
            Some(owner) => match self.owned.add(key, amount, ttl, owner) {
                Ok(new_entry) => {
                    self.waiting_keys += usize::from(new_entry);
                    return;
                }
                Err(key) => key,
            },
            None => key,
        };
        self.merge(key, amount, ttl, owner.map(|owner| (owner, amount)));
    }

    /// Merges `amount`, of which `counted.1` counted for `counted.0`, into `key`'s waiting
    /// amount (not into `self.amount`: the caller counts it).
    fn merge(&mut self, key: Key, amount: u128, ttl: Duration, counted: Option<(Owner, u128)>) {
        let shard = self.waiting.shard_to_fill(&key, &mut self.spare_shards);
        match shard.entry(key) {
            hash_map::Entry::Occupied(entry) => {
                let waiting = entry.into_mut();
                waiting.add(amount, counted);
                waiting.ttl = ttl;
            }
            // Written whole, not added to: the entry's line is rarely in cache (the table is new
            // each round), and stores alone do not wait for it where an add to memory does.
            hash_map::Entry::Vacant(entry) => {
                self.waiting_keys += 1;
                let mut waiting = Waiting::new(ttl);
                waiting.add(amount, counted);
                entry.insert(waiting);
            }
        }
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

    /// Whether keys wait to be cut: keys of the open round not yet in a batch, or a round to
    /// begin.
    pub(crate) fn has_uncut(&self) -> bool {
        self.uncut > 0 || (!self.round_open() && self.waiting_keys > 0)
    }

    /// Whether [`Pending::cut`] has work: keys to cut, or given-back tables to free.
    pub(crate) fn needs_cut(&self) -> bool {
        self.has_uncut() || !self.released.is_empty() || !self.owned.released.is_empty()
    }

    /// Moves up to `most` keys of the open round into batches, beginning a round from
    /// `waiting` if none is open. A batch is staged when full, or when the round's last key is
    /// in it; so cutting a round costs one poll per slice and is linear in its keys.
    pub(crate) fn cut(&mut self, most: usize) {
        if !self.round_open() && self.waiting_keys > 0 {
            self.rounds += 1;
            // Amounts swept from now on wait for the next round, in shards that make room at
            // their first insert for as many keys as this round's (growing them by rehashes,
            // round after round, was a twentieth of the engine's CPU at 100,000 keys; sizing them
            // all here, 4,096 then, was one poll of ~17 ms at a million keys, mostly page faults).
            let next = Sharded::sized_like(&self.waiting);
            let round = std::mem::replace(&mut self.waiting, next);
            self.round_keyed = round.shards.iter().map(HashMap::len).sum();
            self.round = Some(round);
            self.round_shard = 0;
            self.round_owned = self.owned.take().into_iter();
            self.uncut = std::mem::take(&mut self.waiting_keys);
            // Tables the last round emptied and `waiting` did not take are more than its keys
            // need: given back, so that spares never outlive the round after theirs.
            self.released.append(&mut self.spare_shards);
        }
        let keep = self.released.len().saturating_sub(RELEASED_PER_CUT);
        self.released.truncate(keep);
        let keep = self.owned.released.len().saturating_sub(RELEASED_PER_CUT);
        self.owned.released.truncate(keep);
        let mut cut = 0;
        while cut < most {
            if let Some((key, mut waiting)) = self.cutting_owned.pop() {
                if let Some(keyed) = self.take_keyed(&key) {
                    waiting.join(keyed);
                    self.uncut -= 1;
                }
                cut += 1;
                self.uncut -= 1;
                self.push_increment(key, waiting);
                continue;
            }
            if let Some(block) = self.round_owned.next() {
                let emptied = std::mem::replace(&mut self.cutting_owned, block);
                self.owned.recycle(emptied);
                continue;
            }
            self.recycle_cutting_owned();
            let Some((key, waiting)) = self.cutting.pop() else {
                let Some(round) = self.round.as_mut() else {
                    break;
                };
                let Some(next) = round.shards.get_mut(self.round_shard) else {
                    break;
                };
                self.round_shard += 1;
                // One move of the shard's entries (~4,000 at a million keys, tens of µs); its
                // table, emptied, is kept for `waiting` to fill again.
                if next.capacity() > 0 {
                    let mut next = std::mem::take(next);
                    self.round_keyed -= next.len();
                    self.cutting.extend(next.drain());
                    self.spare_shards.push(next);
                }
                continue;
            };
            cut += 1;
            self.uncut -= 1;
            self.push_increment(key, waiting);
        }
        if self.uncut == 0 {
            self.recycle_cutting_owned();
            if let Some(round) = self.round.take() {
                // Shards not begun are empty (their keys joined owned entries): their tables,
                // like the begun ones', are kept for `waiting`, not freed here in one step (a
                // round's first tables are sized for every tracked account).
                debug_assert_eq!(self.round_keyed, 0, "every keyed entry cut or joined");
                let unbegun = round.shards.into_vec().into_iter().skip(self.round_shard);
                self.spare_shards
                    .extend(unbegun.filter(|shard| shard.capacity() > 0));
            }
            if !self.filling.is_empty() {
                self.stage();
            }
        }
    }

    /// Gives the lane back the block of owned entries being cut, once it is used up.
    fn recycle_cutting_owned(&mut self) {
        if self.cutting_owned.capacity() > 0 {
            self.owned.recycle(std::mem::take(&mut self.cutting_owned));
        }
    }

    /// Takes `key`'s entry out of the open round's keyed shards not begun yet, if it has one.
    /// Owned entries are cut before any keyed shard is begun, so that the entry is found there.
    fn take_keyed(&mut self, key: &Key) -> Option<Waiting> {
        if self.round_keyed == 0 {
            return None;
        }
        let round = self.round.as_mut()?;
        let index = round.index(key);
        let keyed = round.shards[index].remove(key)?;
        self.round_keyed -= 1;
        Some(keyed)
    }

    /// Adds `key`'s increment to the batch being filled, staging the batch when full. What is
    /// over `i64::MAX` waits in `waiting` for a later round (the counted part goes first).
    fn push_increment(&mut self, key: Key, waiting: Waiting) {
        let Waiting {
            amount,
            counted,
            owner,
            ttl,
        } = waiting;
        let now = amount.min(MAX_INCREMENT);
        let counted_now = counted.min(now);
        if amount > now {
            let later = owner.map(|owner| (owner, counted - counted_now));
            self.merge(key.clone(), amount - now, ttl, later);
        }
        if self.filling.capacity() == 0 {
            self.filling.reserve_exact(self.batch_size);
            self.filling_counts.reserve_exact(self.batch_size);
        }
        self.filling.push(Increment {
            key,
            // At most `i64::MAX`: the cast keeps the value.
            amount: now as u64,
            ttl,
        });
        self.filling_counts
            .push(owner.filter(|_| counted_now > 0).map(|owner| Counted {
                owner,
                // At most `now`: the cast keeps the value.
                amount: counted_now as u64,
            }));
        self.batched += 1;
        self.filling_amount += now;
        if self.filling.len() == self.batch_size {
            self.stage();
        }
    }

    /// Gives the batch being filled its id and queues it for sending.
    fn stage(&mut self) {
        let id = BatchId {
            writer: self.writer,
            sequence: self.next_sequence,
        };
        self.next_sequence += 1;
        self.staged_totals.0 += self.filling.len();
        self.staged_totals.1 += std::mem::take(&mut self.filling_amount);
        let batch = Batch {
            id,
            increments: std::mem::take(&mut self.filling),
        };
        self.staged
            .push_back((batch, std::mem::take(&mut self.filling_counts)));
    }

    /// The batches to send now: the unacknowledged ones of the last write (unchanged), or else
    /// every staged batch.
    pub(crate) fn batches_to_send(&mut self) -> Arc<Vec<Batch>> {
        if self.in_flight.is_empty() && !self.staged.is_empty() {
            let (batches, counts): (Vec<Batch>, Vec<_>) = self.staged.drain(..).unzip();
            self.in_flight_counts = counts;
            self.in_doubt = vec![false; batches.len()];
            self.in_flight = Arc::new(batches);
            self.in_flight_totals = std::mem::take(&mut self.staged_totals);
        }
        self.in_flight.clone()
    }

    /// Increments and amount of the batches the last `batches_to_send` returned.
    pub(crate) fn in_flight_totals(&self) -> (usize, u128) {
        self.in_flight_totals
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
            applying: None,
            kept: Vec::new(),
            kept_counts: Vec::new(),
            kept_in_doubt: Vec::new(),
            batches: batches.into_iter(),
            counts: std::mem::take(&mut self.in_flight_counts).into_iter(),
            in_doubt: std::mem::take(&mut self.in_doubt).into_iter(),
            results: results.into_iter(),
        });
    }

    /// Applies the received answers to up to `most` increments (a batch that was not
    /// acknowledged counts as one; a slice may end inside a batch), adding what they achieved to
    /// `settlement`; returns whether all are applied. Acknowledged batches leave, the others are
    /// in flight again, to be re-sent unchanged. `acknowledged` hears of every increment that
    /// left, with what of it was counted for an owner (as given to `add`), the key's new total
    /// when the sink gave one (not for a batch it had already applied, nor for a refused
    /// increment), and what was counted of the increments after it in its batch, in order (so
    /// that the read side can start loading their accounts). Slices keep a write of a whole round
    /// from being settled in one poll.
    pub(crate) fn settle_some(
        &mut self,
        most: usize,
        settlement: &mut Settlement,
        mut acknowledged_increment: impl FnMut(
            &Increment,
            Option<Counted>,
            Option<i64>,
            &[Option<Counted>],
        ),
    ) -> bool {
        let Some(answers) = self.answers.as_mut() else {
            return true;
        };
        let mut applied = 0;
        while applied < most.max(1) {
            let Some(applying) = answers.applying.as_mut() else {
                let Some(batch) = answers.batches.next() else {
                    break;
                };
                let was_in_doubt = answers.in_doubt.next().unwrap_or(true);
                let counts = answers.counts.next().unwrap_or_default();
                let result = answers.results.next().unwrap_or_else(|| {
                    Err(SinkError::Failed(
                        "the sink returned fewer results than batches".into(),
                    ))
                });
                applied += 1;
                let outcomes = match result {
                    Ok(BatchOutcome::Applied(outcomes)) => Some(outcomes.into_iter()),
                    Ok(BatchOutcome::AlreadyApplied) => {
                        settlement.duplicate_batches += 1;
                        None
                    }
                    Err(error) => {
                        answers
                            .kept_in_doubt
                            .push(was_in_doubt || error.may_have_applied());
                        answers.kept.push(batch);
                        answers.kept_counts.push(counts);
                        settlement.failure.get_or_insert(error);
                        continue;
                    }
                };
                settlement.batches_written += 1;
                answers.applying = Some(Applying {
                    increments: batch.increments.into_iter(),
                    counts: counts.into_iter(),
                    outcomes,
                });
                continue;
            };
            let Some(increment) = applying.increments.next() else {
                answers.applying = None;
                continue;
            };
            // Dropping the increment changes its key's count, far out of cache at 100,000 keys.
            if let Some(ahead) = applying.increments.as_slice().get(KEY_COUNTS_AHEAD) {
                prefetch_counts(&ahead.key);
            }
            let counted = applying.counts.next().flatten();
            let upcoming = applying.counts.as_slice();
            applied += 1;
            self.amount -= u128::from(increment.amount);
            self.batched -= 1;
            self.in_flight_totals.0 -= 1;
            self.in_flight_totals.1 -= u128::from(increment.amount);
            let outcome = match applying.outcomes.as_mut() {
                Some(outcomes) => outcomes.next().unwrap_or_else(|| KeyOutcome::Rejected {
                    reason: "the sink returned no outcome for this key".into(),
                }),
                // Applied by an earlier attempt: written, with no new total.
                None => {
                    acknowledged_increment(&increment, counted, None, upcoming);
                    settlement.keys_written += 1;
                    settlement.amount_written += u128::from(increment.amount);
                    continue;
                }
            };
            match outcome {
                KeyOutcome::Added { total } => {
                    acknowledged_increment(&increment, counted, Some(total), upcoming);
                    settlement.keys_written += 1;
                    settlement.amount_written += u128::from(increment.amount);
                }
                KeyOutcome::Rejected { reason } => {
                    acknowledged_increment(&increment, counted, None, upcoming);
                    settlement.rejections.push(Rejection {
                        key: increment.key.to_string(),
                        amount: increment.amount,
                        reason,
                    });
                }
            }
        }
        if answers
            .applying
            .as_ref()
            .is_some_and(|applying| applying.increments.len() == 0)
        {
            answers.applying = None;
        }
        if answers.applying.is_some() || answers.batches.len() > 0 {
            return false;
        }
        if let Some(answers) = self.answers.take() {
            // `in_flight_totals` lost each increment acknowledged: it is the kept batches' now.
            self.in_flight = Arc::new(answers.kept);
            self.in_flight_counts = answers.kept_counts;
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
    pub(crate) fn unwritten(&self) -> Vec<(String, u128)> {
        let mut per_key: HashMap<&str, u128> = HashMap::new();
        let keyed_uncut = self
            .round
            .iter()
            .flat_map(|round| &round.shards[self.round_shard.min(round.shards.len())..])
            .flatten();
        let listed = self
            .owned
            .entries()
            .chain(self.round_owned.as_slice().iter().flatten())
            .chain(&self.cutting_owned)
            .chain(&self.cutting)
            .map(|(key, waiting)| (key, waiting));
        for (key, waiting) in self
            .waiting
            .shards
            .iter()
            .flatten()
            .chain(keyed_uncut)
            .chain(listed)
        {
            *per_key.entry(key).or_default() += waiting.amount;
        }
        let certain = self
            .in_flight
            .iter()
            .zip(&self.in_doubt)
            .filter(|(_, in_doubt)| !**in_doubt)
            .map(|(batch, _)| &batch.increments);
        let built = self.staged.iter().map(|(batch, _)| &batch.increments);
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
        unwritten
    }
}

impl Pending {
    /// The write in flight will not be answered (the shutdown's deadline passed): its batches
    /// were handed to the sink, which may have applied them or may still, so every one is in
    /// doubt, whatever its earlier attempts said.
    pub(crate) fn unanswered_in_doubt(&mut self) {
        self.in_doubt
            .iter_mut()
            .for_each(|in_doubt| *in_doubt = true);
    }

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
        while !pending.settle_some(2, &mut settlement, |_, _, _, _| {}) {}
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

    /// Inserts `keys` and checks that no shard grew after its first insert.
    fn fill_without_growing(map: &mut Sharded<Key, u32>, keys: &[Key]) {
        let mut room = vec![None; map.shards.len()];
        for key in keys {
            let index = map.index(key);
            map.shard_to_fill(key, &mut Vec::new())
                .insert(key.clone(), 0);
            room[index].get_or_insert(map.shards[index].capacity());
        }
        for (i, shard) in map.shards.iter().enumerate() {
            assert_eq!(Some(shard.capacity()), room[i], "shard {i} grew");
        }
    }

    #[test]
    fn a_map_told_what_to_expect_makes_room_at_each_first_insert() {
        let keys = numbered_keys(20_000);
        let mut map: Sharded<Key, u32> = Sharded::new(PENDING_SHARD_BITS);
        map.expect(keys.len());
        map.expect(1);
        fill_without_growing(&mut map, &keys);
    }

    #[test]
    fn a_map_sized_like_a_smaller_one_makes_room_for_more_when_told() {
        let keys = numbered_keys(20_000);
        let mut small: Sharded<Key, u32> = Sharded::new(PENDING_SHARD_BITS);
        small
            .shard_to_fill(&keys[0], &mut Vec::new())
            .insert(keys[0].clone(), 0);
        let mut map = Sharded::<Key, u32>::sized_like(&small);
        map.expect(keys.len());
        fill_without_growing(&mut map, &keys);
    }

    /// Keys `k0`, `k1`, … (`n` of them).
    fn numbered_keys(n: usize) -> Vec<Key> {
        (0..n).map(|i| format!("k{i}").into()).collect()
    }

    fn add_one_to_each(pending: &mut Pending, keys: &[Key]) {
        for key in keys {
            pending.add(key.clone(), 1, TTL, None);
        }
    }

    /// Sends and acknowledges the open round's batches.
    fn acknowledge_round(pending: &mut Pending) {
        let batches = send(pending);
        settle(pending, batches.iter().map(applied).collect());
    }

    /// Cuts the whole open round, begun from what is waiting.
    fn cut_all(pending: &mut Pending) {
        pending.cut(usize::MAX);
        assert!(!pending.has_uncut());
    }

    #[test]
    fn a_round_s_emptied_tables_are_filled_again_by_the_next() {
        let keys = numbered_keys(20_000);
        let mut pending = Pending::new(1, 500);
        add_one_to_each(&mut pending, &keys);
        cut_all(&mut pending);
        assert_eq!(pending.spare_shards.len(), pending.waiting.shards.len());
        add_one_to_each(&mut pending, &keys);
        assert!(pending.spare_shards.is_empty(), "every table taken again");
        // Round 2's tables are emptied again; one is taken for round 3's only key. When round 3
        // begins, the others are given back: spares never outlive the round after theirs.
        acknowledge_round(&mut pending);
        cut_all(&mut pending);
        pending.add(keys[0].clone(), 1, TTL, None);
        let shards = pending.waiting.shards.len();
        assert_eq!(pending.spare_shards.len(), shards - 1);
        acknowledge_round(&mut pending);
        cut_all(&mut pending);
        assert_eq!(pending.spare_shards.len(), 1, "round 3's one table");
        // The others were given back when round 3 began, and are freed a few per cut.
        assert_eq!(pending.released.len(), shards - 1 - RELEASED_PER_CUT);
        let cuts = (shards - 1).div_ceil(RELEASED_PER_CUT) - 1;
        for _ in 0..cuts {
            assert!(pending.needs_cut(), "tables left to free");
            pending.cut(usize::MAX);
        }
        assert!(pending.released.is_empty() && !pending.needs_cut());
    }

    #[test]
    fn outcomes_pair_with_increments_in_order_however_many_the_sink_returns() {
        for returned in [2, 4] {
            let mut pending = Pending::new(1, 10);
            for key in ["a", "b", "c"] {
                pending.add(key.into(), 1, TTL, None);
            }
            let sent = send(&mut pending);
            let keys: Vec<String> = sent[0]
                .increments
                .iter()
                .map(|i| i.key.to_string())
                .collect();
            let outcomes = (1..=returned)
                .map(|total| KeyOutcome::Added { total })
                .collect();
            pending.receive(vec![Ok(BatchOutcome::Applied(outcomes))]);
            let mut heard = Vec::new();
            let mut settlement = Settlement::default();
            while !pending.settle_some(1, &mut settlement, |increment, _, total, _| {
                heard.push((increment.key.to_string(), total));
            }) {}
            heard.sort();
            let mut expected = vec![
                (keys[0].clone(), Some(1)),
                (keys[1].clone(), Some(2)),
                (keys[2].clone(), (returned > 2).then_some(3)),
            ];
            expected.sort();
            assert_eq!(heard, expected, "{returned} outcomes");
            let refused: Vec<_> = settlement
                .rejections
                .iter()
                .map(|r| r.key.clone())
                .collect();
            let expected_refused = if returned > 2 {
                vec![]
            } else {
                vec![keys[2].clone()]
            };
            assert_eq!(refused, expected_refused, "{returned} outcomes");
        }
    }

    #[test]
    fn shards_are_prepared_a_few_at_a_time_spares_first() {
        let keys = numbered_keys(20_000);
        let mut map: Sharded<Key, u32> = Sharded::new(PENDING_SHARD_BITS);
        let mut spares: Vec<_> = (0..3)
            .map(|_| HashMap::with_capacity_and_hasher(1_000, Default::default()))
            .collect();
        assert!(
            !map.prepare(16, &mut spares),
            "nothing expected, nothing to prepare"
        );
        map.expect(keys.len());
        let with_table = |map: &Sharded<Key, u32>| {
            map.shards
                .iter()
                .filter(|shard| shard.capacity() > 0)
                .count()
        };
        assert!(map.prepare(16, &mut spares));
        assert_eq!(with_table(&map), 16);
        assert!(spares.is_empty(), "spares are taken first");
        // The last call prepares the last 16 and says that none is left.
        let mut calls = 2;
        while map.prepare(16, &mut spares) {
            calls += 1;
        }
        assert_eq!(calls, map.shards.len() / 16);
        assert_eq!(with_table(&map), map.shards.len());
        let room: Vec<usize> = map.shards.iter().map(HashMap::capacity).collect();
        for key in &keys {
            map.shard_to_fill(key, &mut Vec::new())
                .insert(key.clone(), 0);
        }
        for (i, shard) in map.shards.iter().enumerate() {
            assert_eq!(shard.capacity(), room[i], "shard {i} grew");
        }
    }

    #[test]
    fn a_spare_table_far_larger_than_its_shard_needs_is_shrunk() {
        let keys = numbered_keys(50_000);
        let mut pending = Pending::new(1, 500);
        add_one_to_each(&mut pending, &keys);
        cut_all(&mut pending);
        // The next round has one key: the one after expects about that many per shard.
        pending.add(keys[0].clone(), 1, TTL, None);
        acknowledge_round(&mut pending);
        cut_all(&mut pending);
        pending.add(keys[0].clone(), 1, TTL, None);
        let shard = &pending.waiting.shards[pending.waiting.index(&keys[0])];
        assert_eq!(shard.len(), 1);
        assert!(shard.capacity() < 64, "capacity {}", shard.capacity());
    }

    #[test]
    fn amounts_merge_per_key_and_split_into_bounded_batches() {
        let mut pending = Pending::new(7, 2);
        for key in ["a", "b", "c", "a"] {
            pending.add(key.into(), 5, TTL, None);
        }
        pending.add("zero".into(), 0, TTL, None);
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
            pending.add(key.into(), 5, TTL, None);
        }
        let batches = send(&mut pending);
        let outcome = |batch: &Batch| match &*batch.increments[0].key {
            "never" => Err(SinkError::NotSent("not connected".into())),
            "refused" => Err(SinkError::Failed("OOM".into())),
            _ => Err(SinkError::Timeout(TTL)),
        };
        settle(&mut pending, batches.iter().map(outcome).collect());
        pending.add("waiting".into(), 2, TTL, None);
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
        pending.add("a".into(), 5, TTL, None);
        let first = send(&mut pending);
        let settlement = settle(&mut pending, vec![Err(SinkError::Timeout(TTL))]);
        assert!(settlement.failure.is_some());
        pending.add("a".into(), 3, TTL, None);
        assert_eq!(send(&mut pending), first, "a retry re-sends the same batch");
        assert_eq!(pending.amount(), 8);
        let settlement = settle(&mut pending, vec![applied(&first[0])]);
        assert_eq!((settlement.keys_written, settlement.amount_written), (1, 5));
        let second = send(&mut pending);
        assert_eq!(second[0].id.sequence, 1);
        assert_eq!(second[0].increments[0].amount, 3);
    }

    #[test]
    fn what_was_counted_comes_back_with_each_increment() {
        let mut pending = Pending::new(1, 1);
        pending.add("a".into(), 5, TTL, Some(7));
        pending.add("a".into(), 2, TTL, None);
        pending.add("a".into(), 1, TTL, Some(7));
        pending.add("b".into(), 4, TTL, Some(9));
        pending.add("c".into(), 3, TTL, None);
        let sent = send(&mut pending);
        assert_eq!(sent.len(), 3, "one increment per key");
        // The first write fails and is re-sent: what was counted stays with its increment.
        settle(
            &mut pending,
            sent.iter().map(|_| Err(SinkError::Timeout(TTL))).collect(),
        );
        assert_eq!(send(&mut pending), sent);
        let mut heard = Vec::new();
        pending.receive(sent.iter().map(applied).collect());
        let mut settlement = Settlement::default();
        while !pending.settle_some(1, &mut settlement, |increment, counted, _, _| {
            heard.push((increment.key.to_string(), increment.amount, counted));
        }) {}
        heard.sort_by(|a, b| a.0.cmp(&b.0));
        let counted = |owner, amount| Some(Counted { owner, amount });
        assert_eq!(
            heard,
            [
                ("a".into(), 8, counted(7, 6)),
                ("b".into(), 4, counted(9, 4)),
                ("c".into(), 3, None)
            ]
        );
        assert!(pending.is_empty());
    }

    #[test]
    fn an_owner_s_amount_for_another_key_waits_apart_and_is_written_apart() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 5, TTL, Some(7));
        pending.add("b".into(), 3, TTL, Some(7));
        pending.add("a".into(), 1, TTL, Some(7));
        assert_eq!(pending.owned.len, 1, "a's entry, found by its owner");
        assert_eq!(pending.entries(), 2);
        assert_eq!(
            pending.unwritten(),
            [("a".to_string(), 6), ("b".to_string(), 3)]
        );
        let sent = send(&mut pending);
        let mut increments: Vec<_> = sent[0]
            .increments
            .iter()
            .map(|increment| (increment.key.to_string(), increment.amount))
            .collect();
        increments.sort();
        assert_eq!(increments, [("a".into(), 6), ("b".into(), 3)]);
    }

    #[test]
    fn a_round_s_emptied_blocks_are_filled_again_by_the_next() {
        let keys = numbered_keys(LANE_BLOCK + 1);
        let mut pending = Pending::new(1, 500);
        let add_owned = |pending: &mut Pending, keys: &[Key]| {
            for (owner, key) in keys.iter().enumerate() {
                pending.add(key.clone(), 1, TTL, Some(owner as Owner));
            }
        };
        add_owned(&mut pending, &keys);
        assert_eq!(pending.owned.blocks.len(), 2);
        cut_all(&mut pending);
        assert_eq!(pending.owned.spares.len(), 2, "both blocks kept");
        add_owned(&mut pending, &keys);
        assert!(pending.owned.spares.is_empty(), "both taken again");
        acknowledge_round(&mut pending);
        cut_all(&mut pending);
        pending.add(keys[0].clone(), 1, TTL, Some(0));
        assert_eq!(pending.owned.spares.len(), 1);
        // When round 3 begins, the block its one key did not need is given back.
        acknowledge_round(&mut pending);
        cut_all(&mut pending);
        assert_eq!(pending.owned.spares.len(), 1, "round 3's one block");
        assert!(pending.owned.released.is_empty(), "freed by that cut");
        assert!(!pending.needs_cut());
    }

    #[test]
    fn a_round_of_owned_keys_keeps_the_keyed_tables_made_for_it() {
        let keys = numbered_keys(1_000);
        let mut pending = Pending::new(1, 500);
        pending.expect_keys(keys.len());
        while pending.prepare(usize::MAX) {}
        let tables = pending.waiting.shards.len();
        for (owner, key) in keys.iter().enumerate() {
            pending.add(key.clone(), 1, TTL, Some(owner as Owner));
        }
        // A step that ends with the last owned key, before any keyed shard is begun.
        pending.cut(keys.len());
        assert!(!pending.has_uncut());
        assert_eq!(
            pending.spare_shards.len(),
            tables,
            "none freed at the round's end"
        );
    }

    #[test]
    fn an_owner_s_entry_of_a_round_four_billion_rounds_ago_is_gone() {
        let mut lane = OwnedLane::new();
        assert_eq!(lane.add("a".into(), 1, TTL, 0), Ok(true));
        lane.take();
        // As if the generation had come round: the next round's is the first one's again.
        lane.generation = u32::MAX;
        lane.take();
        assert_eq!(lane.generation, 1);
        assert_eq!(lane.add("b".into(), 1, TTL, 0), Ok(true), "a new entry");
        assert_eq!(lane.add("b".into(), 1, TTL, 0), Ok(false), "joined");
        assert_eq!(
            lane.entries()
                .map(|(_, waiting)| waiting.amount)
                .sum::<u128>(),
            2
        );
    }

    #[test]
    fn each_increment_is_heard_with_the_counts_of_those_after_it_in_its_batch() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 5, TTL, Some(7));
        pending.add("b".into(), 4, TTL, Some(9));
        pending.add("c".into(), 3, TTL, None);
        pending.add("d".into(), 2, TTL, Some(11));
        let sent = send(&mut pending);
        assert_eq!(sent.len(), 1, "one batch");
        pending.receive(sent.iter().map(applied).collect());
        let mut heard = Vec::new();
        let mut settlement = Settlement::default();
        while !pending.settle_some(2, &mut settlement, |_, counted, _, upcoming| {
            heard.push((counted, upcoming.to_vec()));
        }) {}
        assert_eq!(heard.len(), 4);
        let counts: Vec<_> = heard.iter().map(|(counted, _)| *counted).collect();
        for (at, (_, upcoming)) in heard.iter().enumerate() {
            assert_eq!(
                upcoming[..],
                counts[at + 1..],
                "increment {at} of {counts:?}"
            );
        }
    }

    #[test]
    fn a_round_carries_what_was_pending_and_later_amounts_wait_for_the_next() {
        let mut pending = Pending::new(1, 10);
        assert!(
            pending.round_done(pending.round_carrying_pending()),
            "nothing pending"
        );
        pending.add("a".into(), 1, TTL, None);
        let round = pending.round_carrying_pending();
        assert!(!pending.round_done(round));
        let first = send(&mut pending);
        pending.add("b".into(), 2, TTL, None);
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
        pending.add("a".into(), 5, TTL, None);
        pending.add("b".into(), 6, TTL, None);
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

        pending.add("a".into(), 1, TTL, None);
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
        pending.add("a".into(), u64::MAX, TTL, None);
        pending.add("a".into(), u64::MAX, TTL, Some(3));
        let (mut written, mut counted) = (0u128, 0u128);
        for _ in 0..5 {
            let batches = send(&mut pending);
            if batches.is_empty() {
                break;
            }
            assert!(batches[0].increments[0].amount <= i64::MAX as u64);
            let unwritten: u128 = pending.unwritten().iter().map(|(_, amount)| amount).sum();
            assert_eq!(pending.amount(), unwritten, "the running total matches");
            let mut settlement = Settlement::default();
            pending.receive(batches.iter().map(applied).collect());
            while !pending.settle_some(1, &mut settlement, |_, part, _, _| {
                counted += part.map_or(0, |part| u128::from(part.amount));
                // The counted part goes first: a round after it is used up counts nothing.
                assert!(part.is_some() || counted == u128::from(u64::MAX));
            }) {}
            written += settlement.amount_written;
        }
        assert_eq!(written, 2 * u128::from(u64::MAX));
        assert_eq!(counted, u128::from(u64::MAX), "what was counted, in parts");
        assert!(pending.is_empty());
    }

    #[test]
    fn a_round_is_cut_in_slices_and_its_batches_go_out_as_they_fill() {
        let mut pending = Pending::new(1, 2);
        for key in ["a", "b", "c", "d", "e"] {
            pending.add(key.into(), 1, TTL, None);
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
        pending.add("a".into(), 10, TTL, None);
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
            pending.add(key.into(), 1, TTL, None);
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
    fn a_slice_of_answers_may_end_inside_a_batch() {
        let mut pending = Pending::new(1, 4);
        for key in ["a", "b", "c", "d", "e"] {
            pending.add(key.into(), 2, TTL, None);
        }
        let batches = send(&mut pending);
        assert_eq!(batches.len(), 2, "4 keys, then 1");
        pending.receive(batches.iter().map(applied).collect());
        let mut settlement = Settlement::default();
        let mut heard = 0;
        // Beginning a batch counts as one, each increment as one: the first slice hears two.
        assert!(!pending.settle_some(3, &mut settlement, |_, _, _, _| heard += 1));
        assert_eq!(heard, 2);
        assert_eq!(
            pending.amount(),
            6,
            "what was heard of is no longer pending"
        );
        while !pending.settle_some(3, &mut settlement, |_, _, _, _| heard += 1) {}
        assert_eq!(heard, 5);
        assert_eq!(settlement.batches_written, 2);
        assert_eq!(settlement.keys_written, 5);
        assert_eq!(settlement.amount_written, 10);
        assert_eq!((pending.amount(), pending.entries()), (0, 0));
        assert!(pending.is_empty());
    }

    #[test]
    fn in_flight_totals_follow_the_batches_sent() {
        let totals = |batches: &[Batch]| {
            let increments = || batches.iter().flat_map(|batch| &batch.increments);
            (
                increments().count(),
                increments().map(|i| u128::from(i.amount)).sum::<u128>(),
            )
        };
        let mut pending = Pending::new(1, 2);
        for (amount, key) in (1..).zip(["a", "b", "c", "d", "e"]) {
            pending.add(key.into(), amount, TTL, None);
        }
        pending.cut(4);
        let first = pending.batches_to_send().to_vec();
        assert_eq!(first.len(), 2);
        assert_eq!(pending.in_flight_totals(), totals(&first));
        pending.cut(usize::MAX);
        settle(
            &mut pending,
            vec![applied(&first[0]), Err(SinkError::Timeout(TTL))],
        );
        let resent = pending.batches_to_send().to_vec();
        assert_eq!(resent, first[1..]);
        assert_eq!(pending.in_flight_totals(), totals(&resent));
        settle(&mut pending, vec![applied(&resent[0])]);
        let last = pending.batches_to_send().to_vec();
        assert_eq!(pending.in_flight_totals(), totals(&last));
        assert_eq!(pending.in_flight_totals().0, 1);
        assert_eq!(pending.in_flight_totals().1 + totals(&first).1, 15);
    }

    #[test]
    fn entries_count_a_key_once_per_stage() {
        let mut pending = Pending::new(1, 10);
        pending.add("a".into(), 1, TTL, None);
        pending.add("a".into(), 1, TTL, None);
        pending.add("b".into(), 1, TTL, None);
        assert_eq!(pending.entries(), 2);
        send(&mut pending);
        pending.add("a".into(), 1, TTL, None);
        assert_eq!(pending.entries(), 3, "a is in flight and waiting again");
        let batches = pending.batches_to_send().to_vec();
        settle(&mut pending, batches.iter().map(applied).collect());
        assert_eq!(pending.entries(), 1);
    }
}
