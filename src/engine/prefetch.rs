//! A hint to the CPU to start loading memory the flusher will touch a little later, so that
//! the cache misses of a loop over many accounts overlap instead of coming one at a time.

use std::sync::Arc;

/// Cache line size of the x86-64 CPUs this is tuned on.
const LINE: usize = 64;

/// Starts loading every cache line of `value`, without waiting for them. On x86-64 only: other
/// targets have no prefetch in stable Rust, and there it does nothing.
pub(crate) fn prefetch<T: ?Sized>(value: &T) {
    for line in lines(value) {
        prefetch_line(line);
    }
}

/// The first byte of every cache line `value` spans (none for an empty value).
fn lines<T: ?Sized>(value: &T) -> impl Iterator<Item = *const u8> {
    let start = (value as *const T).cast::<u8>();
    let size = std::mem::size_of_val(value);
    let skew = start.addr() % LINE;
    let count = if size == 0 {
        0
    } else {
        (skew + size).div_ceil(LINE)
    };
    (0..count).map(move |line| start.wrapping_sub(skew).wrapping_add(line * LINE))
}

/// Starts loading the cache line of `shared`'s reference counts, which a clone or a drop of it
/// changes with a locked instruction. A locked instruction on a line out of cache holds back
/// every load after it until the line comes, so its miss overlaps with no other, as a plain
/// load's would (`docs/benchmarks.md`).
pub(crate) fn prefetch_counts<T: ?Sized>(shared: &Arc<T>) {
    prefetch_line(counts_of(shared));
}

/// Where `shared`'s counts are: the two words before the value, as std's `ArcInner` is
/// `repr(C)` (strong, weak, value). That layout is not promised; were it to change, the prefetch
/// would load a line nobody needs, and only the speed-up would be lost (a test checks it).
fn counts_of<T: ?Sized>(shared: &Arc<T>) -> *const u8 {
    Arc::as_ptr(shared)
        .cast::<u8>()
        .wrapping_sub(2 * size_of::<usize>())
}

fn prefetch_line(address: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // `unsafe` for the MSRV, where the intrinsic is an unsafe fn; newer compilers call it safe.
    #[allow(unused_unsafe)]
    // SAFETY: the intrinsic needs SSE, which every x86-64 CPU has (it is in the target's
    // baseline); and a prefetch is a hint: it reads nothing the program sees and never faults,
    // whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(address.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(128))]
    struct Lines([u8; 4 * LINE]);

    #[test]
    fn every_line_a_value_spans_and_no_other() {
        let memory = Lines([0; 4 * LINE]);
        let base = memory.0.as_ptr();
        let spans = |range: std::ops::Range<usize>| -> Vec<usize> {
            lines(&memory.0[range])
                .map(|line| line.addr() - base.addr())
                .collect()
        };
        assert_eq!(spans(0..LINE), [0], "one whole line");
        assert_eq!(spans(0..1), [0]);
        assert_eq!(
            spans(LINE - 1..LINE + 1),
            [0, LINE],
            "two bytes across a boundary"
        );
        assert_eq!(spans(10..3 * LINE), [0, LINE, 2 * LINE]);
        assert_eq!(spans(LINE + 5..LINE + 5), [0_usize; 0], "nothing to load");
        // And it runs: the hint itself never faults.
        prefetch(&memory.0[..]);
        prefetch("");
    }

    #[test]
    fn the_counts_prefetched_are_the_arc_s_counts() {
        let shared: Arc<str> = Arc::from("fair_use:dg_budget:uid-1:20261129");
        let _clone = Arc::clone(&shared);
        // SAFETY: std's `ArcInner` begins with the strong count, a `usize` (the layout
        // `counts_of` assumes, and this test checks): the read is of the allocation's first
        // word, aligned and initialised, and nothing writes it meanwhile. Were the layout to
        // change, the read could fall outside the allocation: Miri, which runs this test, would
        // report it.
        let strong = unsafe { counts_of(&shared).cast::<usize>().read() };
        assert_eq!(strong, Arc::strong_count(&shared), "two handles");
        prefetch_counts(&shared);
    }
}
