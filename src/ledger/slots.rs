//! The slot table: which account each slot belongs to, and the queues that move slots between
//! sessions and the sweeper.
//!
//! A slot is always in exactly one place: the free queue, held by a session, the ended queue, or
//! in the sweeper's hands. Both queues therefore have room for every slot, so a push never fails.
//!
//! # Synchronization
//!
//! - `open` pops a slot from the free queue, so it alone owns the slot: it writes the account,
//!   then publishes the slot with `state.store(OPEN, Release)`.
//! - The sweeper reads `state` with `Acquire` before it reads the account, so it sees the account
//!   that was published with it. Only the sweeper frees slots, so a slot it sees open cannot be
//!   reopened (its account rewritten) while the sweeper reads it.
//! - `is_open` lets the sweeper skip free slots before reading cells; it is `Relaxed` because it
//!   publishes nothing: the sweeper reads the account only through `account` and its `Acquire`.
//! - `free` (sweeper only) takes the account and stores `FREE` (`Relaxed`: only the sweeper reads
//!   `state` after an opener has published it, and it reads its own store in program order); the
//!   free queue's push/pop then hands the slot, account cleared, to the next opener.
//! - A slot is **held** by its sessions: `holders` counts them, as an `Arc`'s strong count
//!   counts its clones, and `keep_alive` keeps the ledger alive for them. `open` sets both (it
//!   owns the slot, and the queues ordered the previous session's last `release` before it).
//!   `hold` adds a holder with `Relaxed`: its caller is a holder, so the count cannot reach 0
//!   meanwhile, and nothing is published. `release` subtracts with `Release`, and the holder that
//!   takes the count to 0 then passes an `Acquire` fence: every other holder's adds (stores to
//!   cells made before their decrements) happen before what the last one does next, which is to
//!   take `keep_alive` and push the slot to the ended queue, whose push/pop carries that order to
//!   the sweeper's final read of the cells (loom model `clones_drop_on_different_threads`).

use super::{Account, Shared};
use crate::loom::{fence, Arc, AtomicU32, AtomicU8, BoundedQueue, Ordering, UnsafeCell};

const FREE: u8 = 0;
const OPEN: u8 = 1;

/// Most holders of one slot: as `Arc`, a count this high can only come from leaked clones.
const MAX_HOLDERS: u32 = u32::MAX / 2;

/// What a slot's owner, holders and the sweeper read of it besides its state and holder count,
/// which are in dense arrays of their own (`Slots`).
struct SlotMeta {
    /// Written by the slot's owner (an opener, or the sweeper while freeing); read by the sweeper
    /// and by the slot's holders.
    account: UnsafeCell<Option<Account>>,
    /// The ledger, kept alive by every held slot. Written by the opener, taken by the last holder.
    keep_alive: UnsafeCell<Option<Arc<Shared>>>,
}

// SAFETY: `account` is only written by the thread that owns the slot (the opener that popped it
// from the free queue, or the sweeper freeing it) and only read by the sweeper after an `Acquire`
// load of `state` that saw it published, or by a holder, which got its session from the opener
// and keeps the sweeper from freeing the slot (module docs). `keep_alive` is written by the
// opener and taken by the last holder, which owns the slot then. `Account` and `Arc<Shared>` are
// `Send + Sync`.
unsafe impl Sync for SlotMeta {}

pub(super) struct Slots {
    /// Per slot, `FREE` or `OPEN`. A dense array: a sweep reads it for every slot, a byte per
    /// slot instead of the slot's metadata (32 B with it inside). Sweeps of 1 Mi slots with one
    /// slot in 64 dirty: 16% faster at 2 shards, unchanged at 8 (`docs/benchmarks.md`).
    states: Box<[AtomicU8]>,
    /// Per slot, how many sessions (clones) hold it (module docs). Only sessions touch it.
    holders: Box<[AtomicU32]>,
    meta: Box<[SlotMeta]>,
    free: BoundedQueue<u32>,
    ended: BoundedQueue<u32>,
}

impl Slots {
    pub(super) fn new(capacity: usize) -> Self {
        let free = BoundedQueue::new(capacity);
        for slot in 0..capacity {
            // Cannot fail: the queue has room for every slot.
            let _ = free.push(slot as u32);
        }
        Self {
            states: (0..capacity).map(|_| AtomicU8::new(FREE)).collect(),
            holders: (0..capacity).map(|_| AtomicU32::new(0)).collect(),
            meta: (0..capacity)
                .map(|_| SlotMeta {
                    account: UnsafeCell::new(None),
                    keep_alive: UnsafeCell::new(None),
                })
                .collect(),
            free,
            ended: BoundedQueue::new(capacity),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Slots that are not free: held by sessions or waiting for the sweeper.
    pub(super) fn in_use(&self) -> usize {
        self.capacity() - self.free.len()
    }

    /// Takes a free slot for `account`, held once and keeping `ledger` alive, or `None` when
    /// every slot is in use.
    pub(super) fn open(&self, account: Account, ledger: Arc<Shared>) -> Option<u32> {
        let slot = self.free.pop()?;
        let meta = &self.meta[slot as usize];
        // SAFETY: popping the slot from the free queue made this thread its only owner; the
        // sweeper does not read `account` until it sees the `OPEN` stored below, and the slot
        // has no holder until this call returns.
        meta.account
            .with_mut(|cell| unsafe { *cell = Some(account) });
        // SAFETY: as above; the last holder of the slot's previous session took its ledger.
        meta.keep_alive
            .with_mut(|cell| unsafe { *cell = Some(ledger) });
        // Relaxed: this thread owns the slot; the session it returns carries the count to any
        // other thread (module docs).
        self.holders[slot as usize].store(1, Ordering::Relaxed);
        let state = &self.states[slot as usize];
        // Release: publishes the account written above to the sweeper's `Acquire` in `account`.
        state.store(OPEN, Ordering::Release);
        Some(slot)
    }

    /// One more holder of `slot`; the caller is one already.
    pub(super) fn hold(&self, slot: u32) {
        // Relaxed: see the module docs.
        let before = self.holders[slot as usize].fetch_add(1, Ordering::Relaxed);
        if before > MAX_HOLDERS {
            // Billions of leaked clones; wrapping the count would end the session early.
            std::process::abort();
        }
    }

    /// One holder of `slot` fewer. The last one gets the ledger that the slot kept alive, and
    /// must end the slot ([`Slots::end`]) before it drops it.
    pub(super) fn release(&self, slot: u32) -> Option<Arc<Shared>> {
        // Release, and Acquire for the last holder: see the module docs.
        if self.holders[slot as usize].fetch_sub(1, Ordering::Release) != 1 {
            return None;
        }
        fence(Ordering::Acquire);
        // SAFETY: this thread released the slot's last hold: no session holds it, and no sweeper
        // frees it before `end` pushes it to the ended queue, so this thread owns it.
        self.meta[slot as usize]
            .keep_alive
            .with_mut(|cell| unsafe { (*cell).take() })
    }

    /// The account of a slot the caller holds.
    pub(super) fn held_account(&self, slot: u32) -> &str {
        // SAFETY: the caller holds the slot: its opener wrote the account before the caller's
        // session existed, and no one writes it again until the sweeper frees the slot, after
        // its last holder is gone (module docs).
        self.meta[slot as usize]
            .account
            .with(|cell| unsafe { (*cell).as_deref().expect("a held slot has its account") })
    }

    /// Called once, by the last holder of `slot`, after [`Slots::release`].
    pub(super) fn end(&self, slot: u32) {
        // The queue holds every slot at most once, and there are `capacity` of them.
        let pushed = self.ended.push(slot);
        debug_assert!(
            pushed.is_ok(),
            "ended-sessions queue overflow: slot {slot} ended twice"
        );
    }

    /// Sweeper only: the next slot whose session has ended.
    pub(super) fn next_ended(&self) -> Option<u32> {
        self.ended.pop()
    }

    /// Sweeper only: whether `slot` looks open, so that the caller may read its cells. Reads no
    /// account; call [`Slots::account`] for that.
    pub(super) fn is_open(&self, slot: usize) -> bool {
        // Relaxed: a filter, not a publication. The caller reads only cells after it (atomics,
        // whose values need no ordering, see `shard.rs`), and takes the account through
        // `account`, whose own `Acquire` load sees this `OPEN` or a later state (coherence; and
        // only the caller frees slots, so it is this `OPEN`).
        self.states[slot].load(Ordering::Relaxed) == OPEN
    }

    /// Sweeper only: the account of an open slot, or `None` if the slot is (or looks) free.
    pub(super) fn account(&self, slot: usize) -> Option<Account> {
        let state = &self.states[slot];
        // Acquire: pairs with the `Release` in `open`, making the account written there visible.
        if state.load(Ordering::Acquire) != OPEN {
            return None;
        }
        // SAFETY: the slot was seen open and only the sweeper (the caller) frees slots, so no
        // opener writes this account until the caller frees it.
        self.meta[slot]
            .account
            .with(|cell| unsafe { (*cell).clone() })
    }

    /// Sweeper only: returns an ended slot to the free queue and gives back its account.
    pub(super) fn free(&self, slot: u32) -> Option<Account> {
        let meta = &self.meta[slot as usize];
        // SAFETY: the slot came from the ended queue, so no session holds it and no opener can
        // pop it before the push below: the sweeper (the caller) owns it.
        let account = meta.account.with_mut(|cell| unsafe { (*cell).take() });
        // Relaxed: see the module docs.
        self.states[slot as usize].store(FREE, Ordering::Relaxed);
        // Cannot fail: the queue has room for every slot.
        let pushed = self.free.push(slot);
        debug_assert!(pushed.is_ok(), "free-slot queue overflow");
        account
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("capacity", &self.capacity())
            .field("in_use", &self.in_use())
            .finish()
    }
}
