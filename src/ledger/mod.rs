//! The ledger: the lock-free, synchronous core. It knows nothing of tokio, Redis or I/O.
//!
//! A [`Ledger`] is a table of slots. [`Ledger::open_session`] gives a [`Session`] a free slot;
//! [`Session::add`] adds an amount to that slot in the calling thread's shard; the one
//! [`Sweeper`] collects what was added since its last sweep, per account, and frees the slots of
//! ended sessions once it has collected their remainder.
//!
//! ```
//! use shardmeter::ledger::Ledger;
//!
//! let (ledger, mut sweeper) = Ledger::builder().capacity(1024).build()?;
//! let session = ledger.open_session("uid-42")?;
//! session.add(20);
//! session.clone().add(20); // a second channel of the same session
//!
//! let mut usage = Vec::new();
//! sweeper.sweep(&mut usage);
//! assert_eq!((&*usage[0].account, usage[0].amount), ("uid-42", 40));
//!
//! session.add(5);
//! drop(session); // the last handle: the remainder is handed to the sweeper
//! usage.clear();
//! assert_eq!(sweeper.collect_ended(&mut usage), 1); // one session ended
//! assert_eq!(usage[0].amount, 5);
//! # Ok::<(), shardmeter::ledger::LedgerError>(())
//! ```
//!
//! The design, its invariants and the loom models behind them are in `docs/design.md`.

mod shard;
mod slots;
mod worker;

pub use worker::{register_worker_thread, unregister_worker_thread, MAX_WORKERS};

use crate::loom::Arc;
use shard::{Cursor, Shards};
use slots::Slots;

/// An account id as the ledger hands it back: cheap to clone, shared by all of its records.
pub type Account = std::sync::Arc<str>;

/// Longest account id accepted, in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 512;
/// Most slots one ledger can have.
pub const MAX_CAPACITY: usize = 1 << 24;
/// Striped shards of a ledger whose builder is not told otherwise (fewer on a single CPU).
const DEFAULT_STRIPED_SHARDS: usize = 2;
/// Most cell memory one ledger may allocate (capacity × shards × 8 bytes).
pub const MAX_CELL_BYTES: u128 = 4 << 30;

/// What the ledger refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Every slot is held by an open session or awaits the sweeper.
    #[error(
        "all {capacity} session slots are in use: open sessions, and ended ones whose slots wait \
         for the flusher to collect their remainder (within the engine's session_end_delay); \
         raise the capacity, or open fewer sessions at once (a burst of `record` calls holds one \
         slot each until collected)"
    )]
    Full {
        /// The ledger's capacity.
        capacity: usize,
    },
    /// The account id is the empty string.
    #[error("account id is empty")]
    EmptyAccount,
    /// The account id is longer than [`MAX_ACCOUNT_BYTES`].
    #[error("account id is {len} bytes long; at most {max} are accepted")]
    AccountTooLong {
        /// Its length in bytes.
        len: usize,
        /// [`MAX_ACCOUNT_BYTES`].
        max: usize,
    },
    /// [`MAX_WORKERS`] threads are registered already.
    #[error("{max} worker threads are registered already; this thread uses the striped shards")]
    TooManyWorkers {
        /// [`MAX_WORKERS`].
        max: usize,
    },
    /// A builder setting is out of range.
    #[error("invalid ledger configuration: {0}")]
    InvalidConfig(String),
}

type SessionEndHook = Box<dyn Fn() + Send + Sync>;

struct Shared {
    shards: Shards,
    slots: Slots,
    on_session_end: Option<SessionEndHook>,
}

/// Opens sessions. Cheap to clone: all clones share one table.
#[derive(Clone)]
pub struct Ledger {
    shared: Arc<Shared>,
}

/// Settings of a [`Ledger`]; see [`Ledger::builder`].
pub struct LedgerBuilder {
    capacity: usize,
    worker_shards: usize,
    striped_shards: usize,
    on_session_end: Option<SessionEndHook>,
}

impl Ledger {
    /// Starts a ledger with 65,536 slots, one worker shard per CPU and two striped shards (one
    /// on a single-CPU host).
    ///
    /// Striped shards serve only threads that are not registered workers (a blocking pool, a
    /// foreign thread): a gateway's adds come from its registered runtime workers, each with a
    /// shard of its own. Every shard costs 8 bytes per slot, so one striped shard per CPU would
    /// double the ledger for threads that should not be adding much; two keep two such threads
    /// apart half the time. Raise [`LedgerBuilder::striped_shards`] where many unregistered
    /// threads add.
    pub fn builder() -> LedgerBuilder {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        LedgerBuilder {
            capacity: 65_536,
            worker_shards: cpus.min(MAX_WORKERS),
            striped_shards: cpus.min(DEFAULT_STRIPED_SHARDS),
            on_session_end: None,
        }
    }

    /// Opens a session for `account`, taking a free slot.
    ///
    /// Allocates (a copy of the id); never blocks. Fails with
    /// [`LedgerError::Full`] when no slot is free, [`LedgerError::EmptyAccount`] for an empty id,
    /// [`LedgerError::AccountTooLong`] for an id longer than [`MAX_ACCOUNT_BYTES`] bytes.
    pub fn open_session(&self, account: &str) -> Result<Session, LedgerError> {
        validate_account(account)?;
        self.open_slot(account.into())
    }

    /// Opens a session for an id the caller already holds as an [`Account`]: the slot shares
    /// that allocation (allocates nothing), and the sweeper's [`Usage`] records name the same one,
    /// so a caller that keeps its own index of accounts can match them by address. Fails as
    /// [`Ledger::open_session`] does.
    pub fn open_session_shared(&self, account: Account) -> Result<Session, LedgerError> {
        validate_account(&account)?;
        self.open_slot(account)
    }

    fn open_slot(&self, account: Account) -> Result<Session, LedgerError> {
        let slot =
            self.shared
                .slots
                .open(account, self.shared.clone())
                .ok_or(LedgerError::Full {
                    capacity: self.capacity(),
                })?;
        Ok(Session {
            cursor: self.shared.shards.cursor(slot as usize),
        })
    }

    /// Charges `amount` to `account` once, without a session (an offline upload, say): it is
    /// flushed like the remainder of an ended session.
    pub fn record(&self, account: &str, amount: u64) -> Result<(), LedgerError> {
        self.open_session(account)?.add(amount);
        Ok(())
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.shared.slots.capacity()
    }

    /// Slots not free right now: open sessions plus ended ones the sweeper has not collected.
    pub fn slots_in_use(&self) -> usize {
        self.shared.slots.in_use()
    }

    /// Total amount dropped because one session's total in one shard would pass `u64::MAX`.
    pub fn saturated_amount(&self) -> u64 {
        self.shared.shards.saturated_amount()
    }
}

/// Whether the ledger takes `account` as an id: not empty, at most [`MAX_ACCOUNT_BYTES`] bytes.
pub(crate) fn validate_account(account: &str) -> Result<(), LedgerError> {
    if account.is_empty() {
        return Err(LedgerError::EmptyAccount);
    }
    if account.len() > MAX_ACCOUNT_BYTES {
        return Err(LedgerError::AccountTooLong {
            len: account.len(),
            max: MAX_ACCOUNT_BYTES,
        });
    }
    Ok(())
}

impl LedgerBuilder {
    /// How many sessions can be open (or ended and not yet swept) at once. 1 to [`MAX_CAPACITY`].
    pub fn capacity(mut self, slots: usize) -> Self {
        self.capacity = slots;
        self
    }

    /// How many shards are reserved for registered worker threads (0 to [`MAX_WORKERS`]). A
    /// worker whose index is at or above this count uses the striped shards.
    pub fn worker_shards(mut self, shards: usize) -> Self {
        self.worker_shards = shards;
        self
    }

    /// How many shards unregistered threads share (1 to [`MAX_WORKERS`]).
    pub fn striped_shards(mut self, shards: usize) -> Self {
        self.striped_shards = shards;
        self
    }

    /// Called (on the dropping thread) whenever a session's last handle drops, so that a flusher
    /// can collect the remainder promptly. It must not block.
    pub fn on_session_end(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_session_end = Some(Box::new(hook));
        self
    }

    /// Allocates the ledger and its one sweeper.
    pub fn build(self) -> Result<(Ledger, Sweeper), LedgerError> {
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(LedgerError::InvalidConfig(format!(
                "capacity must be 1 to {MAX_CAPACITY} slots, got {}",
                self.capacity
            )));
        }
        if self.worker_shards > MAX_WORKERS {
            return Err(LedgerError::InvalidConfig(format!(
                "worker_shards must be 0 to {MAX_WORKERS}, got {}",
                self.worker_shards
            )));
        }
        if self.striped_shards == 0 || self.striped_shards > MAX_WORKERS {
            return Err(LedgerError::InvalidConfig(format!(
                "striped_shards must be 1 to {MAX_WORKERS}, got {}",
                self.striped_shards
            )));
        }
        let shard_count = self.worker_shards + self.striped_shards;
        let bytes = Shards::bytes_for(self.capacity, shard_count);
        if bytes > MAX_CELL_BYTES {
            return Err(LedgerError::InvalidConfig(format!(
                "{} slots × {shard_count} shards need {bytes} bytes of cells; the limit is {MAX_CELL_BYTES}",
                self.capacity
            )));
        }
        let shared = Arc::new(Shared {
            shards: Shards::new(self.capacity, self.worker_shards, self.striped_shards)?,
            slots: Slots::new(self.capacity),
            on_session_end: self.on_session_end,
        });
        shared.shards.set_owner(&*shared);
        let readings = written_zeros(self.capacity);
        Ok((
            Ledger {
                shared: shared.clone(),
            },
            Sweeper { shared, readings },
        ))
    }
}

/// `len` zeros, each memory page of them written once now, by the builder.
///
/// `vec![0; len]` takes fresh pages that the OS maps at their first touch. The sweeper reads a
/// slot's reading before it writes it, and a first read maps the shared zero page; the write
/// after it faults again for a private page, and that second fault flushes the TLBs of the other
/// CPUs running the process (an inter-processor interrupt). On a KVM guest with two vCPUs that
/// was 1–2.5 ms per page, in most of the first flush's 22–38 polls over 1 ms at a million slots
/// (`docs/benchmarks.md`, session 9). Written here, a page faults once, on the write, before
/// the engine runs; the readings are resident from the start (16 bytes per slot).
fn written_zeros(len: usize) -> Box<[u128]> {
    const PER_PAGE: usize = 4096 / std::mem::size_of::<u128>();
    let mut zeros = vec![0; len].into_boxed_slice();
    for page in zeros.chunks_mut(PER_PAGE) {
        // The compiler knows the allocation is zeroed and would drop a store of zero into it;
        // after `black_box` it no longer knows what the word holds.
        std::hint::black_box(&mut page[0]);
        page[0] = 0;
    }
    zeros
}

/// One metered session. Clones are channels of the same session and share its slot; when the
/// last clone drops, the session ends and its remainder goes to the sweeper.
///
/// A session is 8 bytes: where its slot's cells are, with the ledger's worker-shard count in the
/// same word (what [`Session::add`] reads, so that an `add` on a session out of cache costs one
/// miss for the session and one for the cell, nothing in between, and a gateway's array of
/// sessions is as small as an array of pointers). Everything else (the slot's holders, its
/// account, the ledger) is found from the cell's page on the cold paths.
pub struct Session {
    /// Points at the slot this session holds; the held slot keeps the ledger, and so the cells,
    /// alive (`Cursor`'s docs).
    cursor: Cursor,
}

impl Session {
    /// Adds `amount` to this session: no lock, no allocation, no syscall.
    ///
    /// On a registered worker thread this is a `Relaxed` atomic load and store of a cell only
    /// this thread writes: no locked instruction, no read-modify-write, 10 instructions once
    /// inlined (`scripts/hot-path-guard.sh` holds it to its budget). Elsewhere it is an atomic
    /// read-modify-write (a compare-and-swap loop) on a striped cell. A session's total in one
    /// shard stops at `u64::MAX`; the excess is counted in [`Ledger::saturated_amount`].
    ///
    /// # Not async-signal-safe
    ///
    /// Do not call `add` from a signal handler. On a registered worker, `add` reads the cell and
    /// then stores the sum: a handler that interrupts it between the two, on the same thread, and
    /// adds to the same session has its amount overwritten, so that add is lost.
    #[inline]
    pub fn add(&self, amount: u64) {
        // The ledger is looked up only on the cold paths (another stripe, saturation).
        self.cursor.add(amount, || &self.ledger().shards);
    }

    /// The account this session charges.
    pub fn account(&self) -> &str {
        self.ledger().slots.held_account(self.slot())
    }

    fn ledger(&self) -> &Shared {
        // SAFETY: this session holds its slot until it drops, which keeps the ledger alive for
        // as long as `self` is borrowed.
        unsafe { self.cursor.owner() }
    }

    fn slot(&self) -> u32 {
        self.ledger().shards.slot_of(self.cursor)
    }
}

impl Clone for Session {
    fn clone(&self) -> Self {
        self.ledger().slots.hold(self.slot());
        Self {
            cursor: self.cursor,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let slot = self.slot();
        let Some(ledger) = self.ledger().slots.release(slot) else {
            return;
        };
        // This was the last holder (`Slots::release` passed an `Acquire` fence): every `add` on
        // this session happens before this push, and the queue's push/pop carries that to the
        // sweeper. From here on the slot is not ours: only the `Arc` keeps the ledger alive.
        ledger.slots.end(slot);
        if let Some(hook) = &ledger.on_session_end {
            hook();
        }
    }
}

/// Usage collected by a sweep: `amount` added to `account` since the last sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The account charged.
    pub account: Account,
    /// How much was added (a slot's collection above `u64::MAX` is split over several records).
    pub amount: u64,
}

/// Collects usage. There is exactly one per ledger (returned by [`LedgerBuilder::build`]), and
/// only it frees slots: that is what lets sweeps read slots without locks.
///
/// # What a sweep reports
///
/// The sweeper keeps, per slot, one number: the sum of its latest readings of that slot's
/// cells in all shards (`readings`, 0 while the slot is free). A sweep reads every cell of an
/// open slot once, sums the readings, reports the new sum minus the kept one, and keeps the new
/// sum. That is exactly what keeping one reading per cell and summing the per-cell growths
/// would report, because no per-cell growth is negative:
///
/// - while a session holds the slot, its cells only grow (adds; a cell is reset only while no
///   session holds the slot: `shard.rs`), and
/// - this thread's loads of one atomic never go back in its modification order (read-read
///   coherence), so a reading is at least the previous reading of the same cell.
///
/// So for every cell `new_i ≥ old_i`, and `Σ new_i − Σ old_i = Σ (new_i − old_i)`, a sum of
/// non-negative growths. A per-cell scheme's exactness (`docs/design.md`, *Why the totals are
/// exact*) therefore carries over to the sums unchanged, at 16 bytes per slot instead of 8 per
/// cell. A `u128` holds any sum of up to 512 shards' `u64` cells, so nothing wraps. If the
/// premise broke (a cell that goes back while its slot is held), a sum would hide it: one cell's
/// loss would cancel another's growth. The loom model `adds::sums_over_two_shards_racing_sweeps`
/// fails in that case (mutation `reset-open-slots` in `scripts/mutations.sh`), and debug builds
/// assert that a slot's sum never goes back.
pub struct Sweeper {
    shared: Arc<Shared>,
    /// Per slot, the sum of this sweeper's latest readings of the slot's cells (type docs).
    readings: Box<[u128]>,
}

impl Sweeper {
    /// Collects the remainders of ended sessions into `out` and frees their slots. Returns the
    /// number of sessions that ended.
    pub fn collect_ended(&mut self, out: &mut Vec<Usage>) -> usize {
        self.collect_ended_up_to(usize::MAX, out)
    }

    /// [`Sweeper::collect_ended`] of at most `max` sessions, so that a caller sharing its thread
    /// can pause between bounded steps when many sessions ended at once. Returns how many it
    /// collected: fewer than `max` means none is left (until more end). Sessions it leaves in
    /// the queue stay exact: a sweep meanwhile collects their growth as an open slot's, and the
    /// later collection takes what is left.
    pub fn collect_ended_up_to(&mut self, max: usize, out: &mut Vec<Usage>) -> usize {
        let mut ended = 0;
        while ended < max {
            let Some(slot) = self.shared.slots.next_ended() else {
                break;
            };
            ended += 1;
            let total = self.take_delta(slot as usize, true);
            let account = self.shared.slots.free(slot);
            if let Some(account) = account {
                push_usage(out, account, total);
            }
        }
        ended
    }

    /// Collects everything added since the last sweep: ended sessions first (their slots are
    /// freed), then open ones. Exact under concurrent adds: what a sweep misses, the next gets.
    /// Returns the number of sessions that ended, as [`Sweeper::collect_ended`] does.
    pub fn sweep(&mut self, out: &mut Vec<Usage>) -> usize {
        let ended = self.collect_ended(out);
        self.sweep_slots(0..self.capacity(), out);
        ended
    }

    /// Collects what was added since the last sweep to the open sessions in `slots` (indices
    /// `0..capacity()`; the rest is ignored). A full sweep may be done in slices, so that a
    /// caller sharing its thread with others can pause between them: `collect_ended`, then
    /// `sweep_slots` over consecutive ranges. The result is as exact as [`Sweeper::sweep`]'s.
    pub fn sweep_slots(&mut self, slots: std::ops::Range<usize>, out: &mut Vec<Usage>) {
        let end = slots.end.min(self.capacity());
        for slot in slots.start..end {
            // A slot that looks free has nothing to collect (its cells and readings were reset
            // when it was freed); a new session there is collected by the next sweep.
            if !self.shared.slots.is_open(slot) {
                continue;
            }
            let total = self.take_delta(slot, false);
            if total == 0 {
                // No account clone, so no refcount traffic, for slots idle since the last sweep.
                continue;
            }
            // Some: the slot was seen open above and only this sweeper frees slots.
            if let Some(account) = self.shared.slots.account(slot) {
                push_usage(out, account, total);
            }
        }
    }

    /// The number of slots, as [`Ledger::capacity`].
    pub fn capacity(&self) -> usize {
        self.shared.slots.capacity()
    }

    /// `slot`'s growth over all shards since the last sweep (type docs), remembering the new
    /// sum; with `reset`, zeroes the cells and the sum instead (the slot has no session).
    fn take_delta(&mut self, slot: usize, reset: bool) -> u128 {
        let shards = &self.shared.shards;
        let sum = shards.read_sum(slot);
        let seen = &mut self.readings[slot];
        // Every cell's reading is at least its previous one (type docs), so their sum is too.
        debug_assert!(
            sum >= *seen,
            "slot {slot}'s readings went back from {} to {sum}",
            *seen
        );
        let delta = sum.saturating_sub(*seen);
        if reset {
            shards.reset(slot);
            *seen = 0;
        } else {
            *seen = sum;
        }
        delta
    }
}

fn push_usage(out: &mut Vec<Usage>, account: Account, mut total: u128) {
    let max = u128::from(u64::MAX);
    while total > max {
        out.push(Usage {
            account: account.clone(),
            amount: u64::MAX,
        });
        total -= max;
    }
    if total > 0 {
        // The last record takes the caller's reference rather than a clone of it.
        out.push(Usage {
            account,
            amount: total as u64,
        });
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("slots", &self.shared.slots)
            .field("shards", &self.shared.shards)
            .finish()
    }
}

impl std::fmt::Debug for LedgerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerBuilder")
            .field("capacity", &self.capacity)
            .field("worker_shards", &self.worker_shards)
            .field("striped_shards", &self.striped_shards)
            .field("on_session_end", &self.on_session_end.is_some())
            .finish()
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("account", &self.account())
            .field("slot", &self.slot())
            .finish()
    }
}

impl std::fmt::Debug for Sweeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweeper")
            .field("slots", &self.shared.slots)
            .field("shards", &self.shared.shards)
            .finish()
    }
}
