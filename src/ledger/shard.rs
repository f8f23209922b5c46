//! Shards: one row of `AtomicU64` cells per shard, one cell per slot.
//!
//! All shards live in one allocation of 128-byte-aligned lines of 16 cells. A shard is a whole
//! number of lines, so no two shards share a cache line (nor an adjacent-line prefetch pair);
//! inside a worker shard, neighbouring cells share lines safely because one thread writes them.
//!
//! # Synchronization
//!
//! Cells hold amounts only: every access to them is `Relaxed`. What makes that enough:
//!
//! - A **worker shard** is written by the thread holding its worker index, with `load` + `store`.
//!   There is one writer, so the load reads that writer's own last store, or, right after a
//!   hand-over of the index, the previous owner's (ordered by the registry, see `worker.rs`).
//! - A **striped shard** is shared by unregistered threads and takes `fetch_update`, an atomic
//!   read-modify-write, so concurrent adds never overwrite each other.
//! - The **sweeper** reads cells while they change. Cells only grow while a session holds the
//!   slot, and a thread's loads of one atomic never go back in its modification order, so a
//!   stale read only postpones part of a delta to the next sweep. The final read at session end
//!   is ordered after every add by the session's refcount and the ended-sessions queue. The same
//!   two facts (a cell only grows while its slot is held; a reading never goes back) make every
//!   per-cell growth between two sweeps non-negative, which is why the sweeper may keep one sum
//!   of readings per slot instead of one reading per cell (`Sweeper`'s docs).
//! - The sweeper **resets** a slot's cells to 0 only when no session holds the slot, so no add
//!   can race the reset; the free-slot queue orders the reset before the next session's adds.

use super::worker::{current_worker, stripe_seed};
use crate::loom::{AtomicU64, Ordering};
use crossbeam_utils::CachePadded;
use std::ptr::NonNull;

const CELLS_PER_LINE: usize = 16;

#[repr(align(128))]
struct CellLine([AtomicU64; CELLS_PER_LINE]);

impl CellLine {
    fn new() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// The worker shards followed by the striped shards of one ledger.
pub(super) struct Shards {
    lines: Box<[CellLine]>,
    lines_per_shard: usize,
    worker_shards: u32,
    striped_shards: u32,
    /// Amount that did not fit in a cell (a session's per-shard total is capped at `u64::MAX`).
    saturated: CachePadded<AtomicU64>,
}

impl Shards {
    pub(super) fn new(capacity: usize, worker_shards: usize, striped_shards: usize) -> Self {
        let lines_per_shard = capacity.div_ceil(CELLS_PER_LINE);
        // `SlotCells` keeps the stride in a `u32` and the shard counts in `u16`s.
        assert!(
            capacity <= super::MAX_CAPACITY
                && worker_shards <= super::MAX_WORKERS
                && striped_shards <= super::MAX_WORKERS,
            "the builder checks these bounds"
        );
        let shard_count = worker_shards + striped_shards;
        Self {
            lines: (0..lines_per_shard * shard_count)
                .map(|_| CellLine::new())
                .collect(),
            lines_per_shard,
            worker_shards: worker_shards as u32,
            striped_shards: striped_shards as u32,
            saturated: CachePadded::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn count(&self) -> usize {
        (self.worker_shards + self.striped_shards) as usize
    }

    /// Bytes of cell memory, for sizing checks and docs.
    pub(super) fn bytes_for(capacity: usize, shards: usize) -> u128 {
        (capacity.div_ceil(CELLS_PER_LINE) * CELLS_PER_LINE) as u128 * shards as u128 * 8
    }

    #[inline(always)]
    fn cell(&self, shard: usize, slot: usize) -> &AtomicU64 {
        &self.lines[shard * self.lines_per_shard + slot / CELLS_PER_LINE].0[slot % CELLS_PER_LINE]
    }

    /// The cursor a session keeps so that `add` needs no lookups.
    ///
    /// Its pointer is derived from the whole line array, not from a reference to one cell: a
    /// `&AtomicU64` only grants access to its own 8 bytes, so moving a pointer taken from it to
    /// another shard's cell would be undefined behaviour (Miri's Stacked Borrows rejects it).
    pub(super) fn slot_cells(&self, slot: usize) -> SlotCells {
        assert!(
            slot < self.lines_per_shard * CELLS_PER_LINE,
            "slot {slot} out of range"
        );
        let line_bytes = std::mem::size_of::<CellLine>();
        let offset = (slot / CELLS_PER_LINE) * line_bytes
            + std::mem::offset_of!(CellLine, 0)
            + (slot % CELLS_PER_LINE) * std::mem::size_of::<AtomicU64>();
        let lines = NonNull::from(&*self.lines).cast::<u8>();
        // SAFETY: `slot` is in range (asserted above), so `offset` is the byte offset of its cell
        // in shard 0's lines, inside the `lines` allocation, whose provenance `lines` carries.
        let first = unsafe { lines.add(offset) }.cast::<AtomicU64>();
        SlotCells {
            first,
            // Cannot truncate: at most 2^20 lines of 128 bytes per shard (`Shards::new`).
            shard_stride_bytes: (self.lines_per_shard * line_bytes) as u32,
            worker_shards: self.worker_shards as u16,
            striped_shards: self.striped_shards as u16,
        }
    }

    #[cold]
    pub(super) fn record_saturation(&self, current: u64, amount: u64) {
        let lost = amount - (u64::MAX - current);
        // Relaxed: a statistic; nothing is ordered by it.
        let _ = self
            .saturated
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                Some(total.saturating_add(lost))
            });
    }

    pub(super) fn saturated_amount(&self) -> u64 {
        // Relaxed: a statistic.
        self.saturated.load(Ordering::Relaxed)
    }

    /// The sweeper's read of one cell (module docs: a stale value only postpones a delta).
    pub(super) fn read(&self, shard: usize, slot: usize) -> u64 {
        self.cell(shard, slot).load(Ordering::Relaxed)
    }

    /// Zeroes a cell of a slot that no session holds.
    pub(super) fn reset(&self, shard: usize, slot: usize) {
        // Relaxed: no add can run on a slot without a session; the free-slot queue's
        // push/pop orders this store before the next session's first add.
        self.cell(shard, slot).store(0, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("worker_shards", &self.worker_shards)
            .field("striped_shards", &self.striped_shards)
            .field("cells_per_shard", &(self.lines_per_shard * CELLS_PER_LINE))
            .finish()
    }
}

/// Where one slot's cells are, in every shard: what [`Session::add`](super::Session::add) uses.
///
/// A session keeps it in its own value, beside the `Arc` of its handle, so that `add` reads it
/// where the session is and then goes straight to the cell: one cache miss, not one for the
/// handle and another for the cell. 16 bytes, so that a session stays small.
///
/// It points into a [`Shards`]. It is only ever stored in a `Session`, next to the
/// `Arc<SessionHandle>` that keeps that `Shards` alive (through `Shared`) and holds the slot, so
/// the pointer is valid, and the slot this session's, for as long as the cursor exists.
#[derive(Clone, Copy)]
pub(super) struct SlotCells {
    /// The slot's cell in shard 0; the same cell of shard `n` is `n * shard_stride_bytes` on.
    /// Derived from the whole line array (see [`Shards::slot_cells`]), so it may reach every
    /// shard's cell.
    first: NonNull<AtomicU64>,
    /// At most 2^27: a shard has at most [`MAX_CAPACITY`](super::MAX_CAPACITY) / 16 lines of
    /// 128 bytes (checked in [`Shards::new`]).
    shard_stride_bytes: u32,
    /// At most [`MAX_WORKERS`](super::MAX_WORKERS) = 256 each.
    worker_shards: u16,
    striped_shards: u16,
}

// SAFETY: `SlotCells` is a shared reference to `AtomicU64`s in disguise (see `cell`), and
// `&AtomicU64` is `Send` and `Sync`; the `Arc` that keeps them alive travels with it.
unsafe impl Send for SlotCells {}
// SAFETY: as for `Send`.
unsafe impl Sync for SlotCells {}

impl SlotCells {
    #[inline(always)]
    fn cell(&self, shard: u32) -> &AtomicU64 {
        debug_assert!(shard < u32::from(self.worker_shards) + u32::from(self.striped_shards));
        // SAFETY: every caller passes `shard < worker_shards + striped_shards`, and shard `n`'s
        // line array starts `n * shard_stride_bytes` after shard 0's, with the same layout, so
        // the result is this slot's cell in shard `n`, inside the `Shards` allocation. `first`
        // carries the provenance of that whole allocation (`Shards::slot_cells`), which
        // outlives `self` (type docs), and cells are only accessed atomically.
        unsafe {
            &*self
                .first
                .as_ptr()
                .byte_add(shard as usize * self.shard_stride_bytes as usize)
                .cast_const()
        }
    }

    /// The hot path: adds `amount` to this slot in the calling thread's shard. `shards` is only
    /// called on the cold paths (saturation), so the fast path reads nothing but `self`, the
    /// thread's worker index and the cell.
    #[inline(always)]
    pub(super) fn add<'a>(&self, amount: u64, shards: impl FnOnce() -> &'a Shards) {
        let worker = current_worker();
        if worker < u32::from(self.worker_shards) {
            let cell = self.cell(worker);
            // Relaxed load and store: this thread is the cell's only writer (module docs), so no
            // other store can fall between them; the sweeper only needs the value to arrive.
            let current = cell.load(Ordering::Relaxed);
            match current.checked_add(amount) {
                Some(total) => cell.store(total, Ordering::Relaxed),
                None => saturate_exclusive(cell, current, amount, shards()),
            }
        } else {
            self.add_striped(amount, shards);
        }
    }

    #[inline(never)]
    fn add_striped<'a>(&self, amount: u64, shards: impl FnOnce() -> &'a Shards) {
        // Spread the per-thread seeds (consecutive numbers) over the stripes, without a division.
        let mixed = stripe_seed().wrapping_mul(0x9E37_79B9);
        let stripe = ((u64::from(mixed) * u64::from(self.striped_shards)) >> 32) as u32;
        let cell = self.cell(u32::from(self.worker_shards) + stripe);
        // Relaxed: an atomic RMW never loses a concurrent add whatever its ordering; the sweeper's
        // visibility comes from elsewhere (module docs).
        let previous = cell
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
                Some(value.saturating_add(amount))
            })
            .unwrap_or_else(|value| value);
        if previous.checked_add(amount).is_none() {
            shards().record_saturation(previous, amount);
        }
    }
}

#[cold]
fn saturate_exclusive(cell: &AtomicU64, current: u64, amount: u64, shards: &Shards) {
    // Relaxed: single writer, as in `SlotCells::add`.
    cell.store(u64::MAX, Ordering::Relaxed);
    shards.record_saturation(current, amount);
}
