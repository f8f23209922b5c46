//! Shards: one `AtomicU64` cell per slot in every shard.
//!
//! Slots are grouped in chunks of [`CHUNK_SLOTS`] (511). A chunk has one page per shard
//! ([`PAGE_BYTES`]: 4 KiB, page-aligned), shard 0's page first, the chunk's pages side by side.
//! So a slot's cell in shard `n` is always `n * PAGE_BYTES` after its cell in shard 0, whatever
//! the ledger's size: that constant stride is what lets a session carry everything `add` needs in
//! 8 bytes ([`Cursor`]). The last word of every page is not a cell: in shard 0's pages it points
//! back to the ledger, which a session's cold paths (clone, drop, the striped and saturation
//! paths) find by rounding its cell's address down to the page.
//!
//! A page belongs to one shard, so no two shards share a cache line (nor an adjacent-line
//! prefetch pair); inside a worker shard's page, neighbouring cells share lines safely because
//! one thread writes them. A worker's cells of 511 consecutive slots fill one 4 KiB page, as
//! they would in one array per shard, so the TLB covers as many of them.
//!
//! # Synchronization
//!
//! Cells hold amounts only: every access to them is `Relaxed`. What makes that enough:
//!
//! - A **worker shard** is written by the thread holding its worker index, with `load` + `store`.
//!   There is one writer, so the load reads that writer's own last store, or, right after a
//!   hand-over of the index, the previous owner's (ordered by the registry, see `worker.rs`).
//! - A **striped shard** is shared by unregistered threads and takes a compare-and-swap loop, an
//!   atomic read-modify-write, so concurrent adds never overwrite each other.
//! - The **sweeper** reads cells while they change. Cells only grow while a session holds the
//!   slot, and a thread's loads of one atomic never go back in its modification order, so a
//!   stale read only postpones part of a delta to the next sweep. The final read at session end
//!   is ordered after every add by the slot's hold count and the ended-sessions queue. The same
//!   two facts (a cell only grows while its slot is held; a reading never goes back) make every
//!   per-cell growth between two sweeps non-negative, which is why the sweeper may keep one sum
//!   of readings per slot instead of one reading per cell (`Sweeper`'s docs).
//! - The sweeper **resets** a slot's cells to 0 only when no session holds the slot, so no add
//!   can race the reset; the free-slot queue orders the reset before the next session's adds.
//! - A page's **owner** pointer is stored once, before the ledger is handed out, and read only
//!   through a session, which was opened from (so after) the ledger.

use super::worker::{current_probe, stripe_seed};
use super::{LedgerError, Shared};
use crate::loom::{AtomicPtr, AtomicU64, Ordering};
use crossbeam_utils::CachePadded;
use std::ptr::NonNull;

/// Words in a page: a cell per slot of its chunk, and the owner word. Loom models and Miri use
/// small pages (loom tracks every atomic it creates; Miri interprets every byte of every test
/// ledger, and 4 KiB pages doubled the Miri stage of CI); the code is the same.
#[cfg(not(any(shardmeter_loom, miri)))]
const PAGE_WORDS: usize = 512;
#[cfg(any(shardmeter_loom, miri))]
const PAGE_WORDS: usize = 16;

/// Slots per chunk: one cell per page each.
pub(super) const CHUNK_SLOTS: usize = PAGE_WORDS - 1;

/// One shard's cells of one chunk. Its alignment is its size, so the page a cell is in is found
/// by rounding the cell's address down.
#[cfg_attr(not(any(shardmeter_loom, miri)), repr(C, align(4096)))]
#[cfg_attr(all(miri, not(shardmeter_loom)), repr(C, align(128)))]
// Loom's atomics are larger than std's; 16 of them fit in 1 KiB.
#[cfg_attr(shardmeter_loom, repr(C, align(1024)))]
struct Page {
    cells: [AtomicU64; CHUNK_SLOTS],
    /// In shard 0's pages: the ledger these pages belong to. Null in other shards' pages.
    owner: AtomicPtr<Shared>,
}

/// The distance between a slot's cells in two neighbouring shards.
const PAGE_BYTES: usize = std::mem::size_of::<Page>();
const _: () = assert!(
    PAGE_BYTES == std::mem::align_of::<Page>(),
    "a page must fill its alignment, or rounding down would not find it"
);

impl Page {
    fn new() -> Self {
        Self {
            cells: zeroed_cells(),
            owner: AtomicPtr::new(std::ptr::null_mut()),
        }
    }
}

/// A page's cells, all 0: filled as one block (Miri interprets 511 calls of a closure slowly).
#[cfg(not(shardmeter_loom))]
fn zeroed_cells() -> [AtomicU64; CHUNK_SLOTS] {
    [const { AtomicU64::new(0) }; CHUNK_SLOTS]
}

/// Loom's atomics have no `const` constructor.
#[cfg(shardmeter_loom)]
fn zeroed_cells() -> [AtomicU64; CHUNK_SLOTS] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "shardmeter's ledger needs a 64-bit target: a session keeps its ledger's worker-shard count \
     in the top bits of a pointer"
);

/// Where in a session's value [`Cursor`] keeps the ledger's worker-shard count: bits 55 to 63.
/// A cell's address must be below `1 << TAG_SHIFT` (checked when the shards are built).
const TAG_SHIFT: u32 = 55;
const ADDRESS_MASK: usize = (1 << TAG_SHIFT) - 1;

/// What a thread brings to `add`, precomputed when it registers, so that `add` compares and adds
/// instead of computing: `key` is `(worker index + 1) << TAG_SHIFT` (`usize::MAX` when the thread
/// is not a worker), `offset` is where its shard's cell is from shard 0's.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkerProbe {
    key: usize,
    offset: usize,
}

impl WorkerProbe {
    pub(super) const NOT_A_WORKER: Self = Self {
        key: usize::MAX,
        offset: 0,
    };

    /// `index` is below [`MAX_WORKERS`](super::MAX_WORKERS) (256), so the key fits in 64 bits.
    pub(super) const fn for_worker(index: u32) -> Self {
        Self {
            key: (index as usize + 1) << TAG_SHIFT,
            offset: index as usize * PAGE_BYTES,
        }
    }

    /// The worker index, or `None` for a thread that is not a worker.
    pub(super) fn index(self) -> Option<u32> {
        (self.key != usize::MAX).then(|| ((self.key >> TAG_SHIFT) - 1) as u32)
    }
}

/// The worker shards followed by the striped shards of one ledger.
pub(super) struct Shards {
    /// Chunk `c`'s page of shard `n` is `pages[c * count() + n]`.
    pages: Box<[Page]>,
    worker_shards: u32,
    striped_shards: u32,
    /// Amount that did not fit in a cell (a session's per-shard total is capped at `u64::MAX`).
    saturated: CachePadded<AtomicU64>,
}

impl Shards {
    pub(super) fn new(
        capacity: usize,
        worker_shards: usize,
        striped_shards: usize,
    ) -> Result<Self, LedgerError> {
        // A cursor keeps the worker-shard count in 9 bits.
        assert!(
            worker_shards <= super::MAX_WORKERS && striped_shards <= super::MAX_WORKERS,
            "the builder checks these bounds"
        );
        let shard_count = worker_shards + striped_shards;
        let pages: Box<[Page]> = (0..capacity.div_ceil(CHUNK_SLOTS) * shard_count)
            .map(|_| Page::new())
            .collect();
        // Every 64-bit platform Rust supports maps user memory below 2^48 unless asked otherwise;
        // refuse rather than mistake an address bit for a tag.
        let end = pages.as_ptr_range().end.addr();
        if end > ADDRESS_MASK {
            return Err(LedgerError::InvalidConfig(format!(
                "the cells were allocated at {end:#x}, above 2^{TAG_SHIFT}: this platform's \
                 addresses leave no room for a session's tag"
            )));
        }
        Ok(Self {
            pages,
            worker_shards: worker_shards as u32,
            striped_shards: striped_shards as u32,
            saturated: CachePadded::new(AtomicU64::new(0)),
        })
    }

    /// Points every shard-0 page at `owner`, the ledger these shards are part of. Called once,
    /// before any session is opened.
    pub(super) fn set_owner(&self, owner: *const Shared) {
        for page in self.pages.iter().step_by(self.count()) {
            // Relaxed: no session exists yet; whoever opens one got the ledger through a
            // synchronizing hand-over (module docs).
            page.owner.store(owner.cast_mut(), Ordering::Relaxed);
        }
    }

    pub(super) fn count(&self) -> usize {
        (self.worker_shards + self.striped_shards) as usize
    }

    /// Bytes of cell memory, for sizing checks and docs.
    pub(super) fn bytes_for(capacity: usize, shards: usize) -> u128 {
        capacity.div_ceil(CHUNK_SLOTS) as u128 * shards as u128 * PAGE_BYTES as u128
    }

    /// `slot`'s cells, one per shard, in shard order: the chunk's pages are found once.
    fn cells_of(&self, slot: usize) -> impl Iterator<Item = &AtomicU64> {
        let first_page = slot / CHUNK_SLOTS * self.count();
        let in_page = slot % CHUNK_SLOTS;
        // Each page indexed in place: no reference to a whole page (Miri would check 4 KiB).
        (first_page..first_page + self.count()).map(move |page| &self.pages[page].cells[in_page])
    }

    /// The cursor a session keeps so that `add` needs no lookups.
    ///
    /// Its pointer is derived from the whole page array, not from a reference to one cell: a
    /// `&AtomicU64` only grants access to its own 8 bytes, so moving a pointer taken from it to
    /// another shard's cell, or to its page's owner, would be undefined behaviour (Miri's Stacked
    /// Borrows rejects it).
    pub(super) fn cursor(&self, slot: usize) -> Cursor {
        assert!(
            slot < self.pages.len() / self.count() * CHUNK_SLOTS,
            "slot {slot} out of range"
        );
        let page = slot / CHUNK_SLOTS * self.count();
        let offset = page * PAGE_BYTES
            + std::mem::offset_of!(Page, cells)
            + (slot % CHUNK_SLOTS) * std::mem::size_of::<AtomicU64>();
        let pages = self.pages_start().cast::<u8>();
        // SAFETY: `slot` is in range (asserted above), so `offset` is the byte offset of its cell
        // in shard 0's page of its chunk, inside the `pages` allocation, whose provenance `pages`
        // carries.
        let cell = unsafe { pages.add(offset) };
        // The address is below `1 << TAG_SHIFT` (`Shards::new`), so the tag takes no address bit.
        Cursor(
            cell.map_addr(|address| address | ((self.worker_shards as usize) << TAG_SHIFT))
                .cast(),
        )
    }

    /// The start of the page array, with the provenance of the whole of it. A raw borrow, not a
    /// reference: Miri checks a reference's whole range each time one is made (slowly, for
    /// megabytes of pages), and a pointer derived from it could reach only that range anyway.
    fn pages_start(&self) -> NonNull<Page> {
        NonNull::new((&raw const *self.pages).cast::<Page>().cast_mut())
            .expect("a boxed slice's pointer is never null")
    }

    /// The slot a cursor of these shards points at.
    pub(super) fn slot_of(&self, cursor: Cursor) -> u32 {
        let cell = cursor.cell_address();
        let first = self.pages_start().addr().get();
        let page = (cell - first) / PAGE_BYTES;
        let in_page = (cell - first) % PAGE_BYTES - std::mem::offset_of!(Page, cells);
        // At most `MAX_CAPACITY` slots, so it fits.
        (page / self.count() * CHUNK_SLOTS + in_page / std::mem::size_of::<AtomicU64>()) as u32
    }

    #[cold]
    pub(super) fn record_saturation(&self, current: u64, amount: u64) {
        let lost = amount - (u64::MAX - current);
        // Relaxed (inside): a statistic; nothing is ordered by it.
        saturating_fetch_add(&self.saturated, lost);
    }

    pub(super) fn saturated_amount(&self) -> u64 {
        // Relaxed: a statistic.
        self.saturated.load(Ordering::Relaxed)
    }

    /// The sweeper's reads of `slot`'s cells, summed (module docs: a stale value only postpones
    /// a delta).
    pub(super) fn read_sum(&self, slot: usize) -> u128 {
        self.cells_of(slot)
            .map(|cell| u128::from(cell.load(Ordering::Relaxed)))
            .sum()
    }

    /// Zeroes the cells of a slot that no session holds.
    pub(super) fn reset(&self, slot: usize) {
        for cell in self.cells_of(slot) {
            // Relaxed: no add can run on a slot without a session; the free-slot queue's
            // push/pop orders this store before the next session's first add.
            cell.store(0, Ordering::Relaxed);
        }
    }

    /// Adds on a thread without a worker shard in this ledger: an atomic read-modify-write on
    /// one of the striped shards, chosen per thread.
    fn add_striped(&self, cursor: Cursor, amount: u64) {
        // Spread the per-thread seeds (consecutive numbers) over the stripes, without a division.
        let mixed = stripe_seed().wrapping_mul(0x9E37_79B9);
        let stripe = ((u64::from(mixed) * u64::from(self.striped_shards)) >> 32) as u32;
        let cell = cursor.cell_in(self, self.worker_shards + stripe);
        let previous = saturating_fetch_add(cell, amount);
        if previous.checked_add(amount).is_none() {
            self.record_saturation(previous, amount);
        }
    }
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("worker_shards", &self.worker_shards)
            .field("striped_shards", &self.striped_shards)
            .field(
                "cells_per_shard",
                &(self.pages.len() / self.count() * CHUNK_SLOTS),
            )
            .finish()
    }
}

/// Where one slot's cells are, in every shard: all that [`Session::add`](super::Session::add)
/// reads besides the thread's [`WorkerProbe`]. 8 bytes: the address of the slot's cell in shard
/// 0, with the ledger's worker-shard count in the bits above it (`TAG_SHIFT`). The cell of shard
/// `n` is `n * PAGE_BYTES` on; the ledger is found from the cell's page (module docs).
///
/// It points into a [`Shards`]. It is only ever stored in a `Session`, which holds the slot, and
/// a held slot keeps its ledger (and so the `Shards`) alive, so the pointer is valid, and the
/// slot this session's, for as long as the cursor is in use.
#[derive(Clone, Copy)]
pub(super) struct Cursor(
    /// Derived from the whole page array (see [`Shards::cursor`]), so it may reach every shard's
    /// cell of the slot and the owner word of its shard-0 page, once the tag is masked off.
    NonNull<AtomicU64>,
);

// SAFETY: `Cursor` is a shared reference to `AtomicU64`s (and to the owner word, an
// `AtomicPtr`) in disguise, and those references are `Send` and `Sync`; what keeps them alive
// travels with the session (type docs).
unsafe impl Send for Cursor {}
// SAFETY: as for `Send`.
unsafe impl Sync for Cursor {}

impl Cursor {
    fn cell_address(self) -> usize {
        self.0.as_ptr().addr() & ADDRESS_MASK
    }

    /// This slot's cell in `shards`' shard `shard` (below `shards.count()`); `shards` are the
    /// ones the cursor points into.
    fn cell_in(self, shards: &Shards, shard: u32) -> &AtomicU64 {
        debug_assert!((shard as usize) < shards.count());
        let address = self.0.as_ptr().map_addr(|address| address & ADDRESS_MASK);
        // SAFETY: `shard` is one of the ledger's shards, and shard `n`'s page of this chunk
        // starts `n * PAGE_BYTES` after shard 0's, with the same layout, so the result is this
        // slot's cell in shard `n`, inside the page array of `shards`, which the borrow keeps
        // alive. The pointer carries that allocation's provenance (`Shards::cursor`), and cells
        // are only accessed atomically.
        unsafe { &*address.byte_add(shard as usize * PAGE_BYTES).cast_const() }
    }

    /// The ledger this cursor's slot belongs to.
    ///
    /// # Safety
    ///
    /// The caller holds the slot (it is a live session's cursor), which keeps the ledger alive
    /// for `'a`.
    pub(super) unsafe fn owner<'a>(self) -> &'a Shared {
        let page = self
            .0
            .as_ptr()
            .map_addr(|address| address & ADDRESS_MASK & !(PAGE_BYTES - 1))
            .cast::<Page>()
            .cast_const();
        // SAFETY: the cursor points at a cell of a shard-0 page (`Shards::cursor`), which is
        // `PAGE_BYTES`-aligned and `PAGE_BYTES` long, so rounding down finds that page inside the
        // page array; the caller keeps it alive for `'a` (above).
        let owner = unsafe { &(*page).owner };
        // Relaxed: stored before the ledger was handed out (module docs).
        let owner = owner.load(Ordering::Relaxed);
        // SAFETY: `set_owner` pointed every shard-0 page at the ledger holding these pages, and
        // the caller keeps it alive for `'a`.
        unsafe { &*owner }
    }

    /// The hot path: adds `amount` to this slot in the calling thread's shard. The fast path
    /// reads nothing but the cursor, the thread's probe and the cell; `shards` is only called on
    /// the cold paths (another thread's stripe, saturation).
    #[inline(always)]
    pub(super) fn add<'a>(self, amount: u64, shards: impl FnOnce() -> &'a Shards) {
        let probe = current_probe();
        // `worker < worker_shards` exactly when `(worker + 1) << TAG_SHIFT <= tagged`: the tag
        // decides, as the address sits below it (`WorkerProbe`).
        if self.0.as_ptr().addr() >= probe.key {
            let address = self.0.as_ptr().map_addr(|address| address & ADDRESS_MASK);
            // SAFETY: as in `cell_in`: the probe's offset is `worker * PAGE_BYTES` for a worker
            // index below this ledger's worker-shard count (checked just above).
            let cell = unsafe { &*address.byte_add(probe.offset).cast_const() };
            // Relaxed load and store: this thread is the cell's only writer (module docs), so no
            // other store can fall between them; the sweeper only needs the value to arrive.
            let current = cell.load(Ordering::Relaxed);
            match current.checked_add(amount) {
                Some(total) => cell.store(total, Ordering::Relaxed),
                None => saturate_exclusive(cell, current, amount, shards),
            }
        } else {
            add_elsewhere(self, amount, shards);
        }
    }
}

// The cold paths take `shards` unevaluated, so that the fast path keeps nothing alive across a
// call and needs no saved registers.

#[inline(never)]
fn add_elsewhere<'a>(cursor: Cursor, amount: u64, shards: impl FnOnce() -> &'a Shards) {
    shards().add_striped(cursor, amount);
}

#[cold]
#[inline(never)]
fn saturate_exclusive<'a>(
    cell: &AtomicU64,
    current: u64,
    amount: u64,
    shards: impl FnOnce() -> &'a Shards,
) {
    // Relaxed: single writer, as in `Cursor::add`.
    cell.store(u64::MAX, Ordering::Relaxed);
    shards().record_saturation(current, amount);
}

/// Adds `amount` to `cell`, saturating at `u64::MAX`, and returns the value before: a
/// compare-and-swap loop, as std's `fetch_update` is (which newer toolchains deprecate for
/// `try_update`, younger than this crate's MSRV).
fn saturating_fetch_add(cell: &AtomicU64, amount: u64) -> u64 {
    // Relaxed: an atomic read-modify-write never loses a concurrent add whatever its ordering;
    // the sweeper's visibility comes from elsewhere (module docs).
    let mut current = cell.load(Ordering::Relaxed);
    loop {
        let new = current.saturating_add(amount);
        match cell.compare_exchange_weak(current, new, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(previous) => return previous,
            Err(actual) => current = actual,
        }
    }
}
