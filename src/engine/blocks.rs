//! Growable lists that never copy what they hold.
//!
//! A `Vec` or a `VecDeque` that grows past its capacity moves every item into an allocation
//! twice as large, in one call: at a million tracked accounts that is tens of megabytes copied
//! and as many newly touched pages in one poll of the flusher (`docs/benchmarks.md`, *The
//! flusher's polls at a million accounts*). These lists grow by one block of [`BLOCK`] items at
//! a time instead, so a push costs at most one block's allocation.

use std::collections::VecDeque;

/// Items per block: at most a few hundred kilobytes per allocation for the flusher's items.
const BLOCK: usize = 4_096;

/// A vector that grows in blocks: indices are stable, items never move.
#[derive(Debug)]
pub(crate) struct BlockVec<T> {
    blocks: Vec<Vec<T>>,
    len: usize,
}

impl<T> BlockVec<T> {
    pub(crate) fn new() -> Self {
        Self {
            blocks: Vec::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `item`; returns its index.
    pub(crate) fn push(&mut self, item: T) -> usize {
        if self.len % BLOCK == 0 {
            self.blocks.push(Vec::with_capacity(BLOCK));
        }
        // A block is made with room for `BLOCK` items and holds fewer here: no reallocation.
        self.blocks[self.len / BLOCK].push(item);
        self.len += 1;
        self.len - 1
    }

    /// # Panics
    ///
    /// If `index` is not below [`BlockVec::len`], as a slice's index does.
    pub(crate) fn get(&self, index: usize) -> &T {
        &self.blocks[index / BLOCK][index % BLOCK]
    }

    /// # Panics
    ///
    /// If `index` is not below [`BlockVec::len`], as a slice's index does.
    pub(crate) fn get_mut(&mut self, index: usize) -> &mut T {
        &mut self.blocks[index / BLOCK][index % BLOCK]
    }
}

/// A first-in, first-out queue that grows in blocks and frees each block once it is read.
#[derive(Debug)]
pub(crate) struct BlockQueue<T> {
    blocks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> BlockQueue<T> {
    pub(crate) fn new() -> Self {
        Self {
            blocks: VecDeque::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn push_back(&mut self, item: T) {
        match self.blocks.back_mut() {
            Some(block) if block.len() < BLOCK => block.push_back(item),
            _ => {
                let mut block = VecDeque::with_capacity(BLOCK);
                block.push_back(item);
                self.blocks.push_back(block);
            }
        }
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<T> {
        let block = self.blocks.front_mut()?;
        let item = block.pop_front();
        if block.is_empty() {
            self.blocks.pop_front();
        }
        self.len -= 1;
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_vec_keeps_indices_and_never_reallocates_a_block() {
        let mut items = BlockVec::new();
        for i in 0..3 * BLOCK + 5 {
            assert_eq!(items.push(i), i);
        }
        assert_eq!(items.len(), 3 * BLOCK + 5);
        assert_eq!(items.blocks.len(), 4);
        assert!(items.blocks.iter().all(|block| block.capacity() == BLOCK));
        *items.get_mut(BLOCK) += 1_000_000;
        assert_eq!(*items.get_mut(BLOCK), BLOCK + 1_000_000);
        assert_eq!(*items.get_mut(3 * BLOCK + 4), 3 * BLOCK + 4);
        let sum: usize = (0..items.len()).map(|index| *items.get_mut(index)).sum();
        let expected: usize = (0..3 * BLOCK + 5).sum::<usize>() + 1_000_000;
        assert_eq!(sum, expected);
    }

    #[test]
    fn a_block_queue_is_first_in_first_out_and_frees_blocks_it_has_read() {
        let mut queue = BlockQueue::new();
        assert_eq!(queue.pop_front(), None);
        for i in 0..2 * BLOCK + 1 {
            queue.push_back(i);
        }
        assert_eq!((queue.len(), queue.blocks.len()), (2 * BLOCK + 1, 3));
        for i in 0..BLOCK + 1 {
            assert_eq!(queue.pop_front(), Some(i));
        }
        assert_eq!(queue.blocks.len(), 2, "the first block is freed");
        queue.push_back(usize::MAX);
        let rest: Vec<usize> = std::iter::from_fn(|| queue.pop_front()).collect();
        assert_eq!(rest.len(), BLOCK + 1);
        assert_eq!(rest.first(), Some(&(BLOCK + 1)));
        assert_eq!(rest.last(), Some(&usize::MAX));
        assert!(queue.is_empty() && queue.blocks.is_empty());
    }
}
