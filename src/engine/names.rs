//! The read side's index of tracked accounts by name: an account's id, or its key.

use super::prefetch::prefetch;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Finds the book's index of the account with a name, split over `1 << bits` shards.
///
/// An entry keeps its name's hash beside the index, and the names stay in the book: a shard that
/// grows moves its entries without reading a name. The names are strings elsewhere in memory,
/// so a table of the names themselves read every one when it grew, a cache miss each: at a
/// million accounts one growth took 0.3–0.9 ms, and opening a million sessions made 5–6
/// flusher polls over 1 ms, 0–2 with this index (an AMD EPYC guest, `docs/benchmarks.md`,
/// session 9). An entry is also 16 bytes where a name and an index took 24.
pub(crate) struct NameIndex {
    hasher: foldhash::fast::RandomState,
    bits: u32,
    shards: Box<[HashTable<Named>]>,
}

#[derive(Clone, Copy)]
struct Named {
    hash: u64,
    index: usize,
}

impl NameIndex {
    /// An empty index of `1 << bits` shards (an empty shard costs its 32 bytes and nothing else).
    pub(crate) fn new(bits: u32) -> Self {
        // The shard is picked by bits 32 and up, which the tables use for nothing (below).
        debug_assert!((1..=24).contains(&bits));
        Self {
            hasher: foldhash::fast::RandomState::default(),
            bits,
            shards: (0..1_usize << bits).map(|_| HashTable::new()).collect(),
        }
    }

    /// `name`'s hash, and its shard: from bits 32 and up, because a table places an entry by
    /// the hash's low bits and tags it with its top 7, and a shard whose entries all shared those
    /// bits would crowd them together.
    fn locate(&self, name: &str) -> (u64, usize) {
        let hash = self.hasher.hash_one(name);
        let shard = (hash >> 32) as usize & ((1 << self.bits) - 1);
        (hash, shard)
    }

    /// The index of the account named `name`; `name_at` gives the name at an index, to tell
    /// apart names whose hashes are equal. Names are compared by address first: a swept record
    /// names its account with the allocation the book's entry holds (the registry's, which the
    /// session's slot shares), and then no text is read.
    pub(crate) fn find<'a>(
        &self,
        name: &str,
        name_at: impl Fn(usize) -> Option<&'a str>,
    ) -> Option<usize> {
        let (hash, shard) = self.locate(name);
        self.shards[shard]
            .find(hash, |named| {
                named.hash == hash
                    && name_at(named.index).is_some_and(|at| std::ptr::eq(at, name) || at == name)
            })
            .map(|named| named.index)
    }

    /// Starts loading, without waiting for them, the entries [`NameIndex::find`] would compare
    /// for `name`. At a million names the entries are out of cache, and the load of the entry
    /// was most of `find`'s time; asked for a few names ahead, it overlaps with the work between.
    pub(crate) fn prefetch(&self, name: &str) {
        let (hash, shard) = self.locate(name);
        // A search that matches nothing: it reads the control bytes (one byte per entry, more
        // often in cache) and is shown each candidate entry, which it only asks for.
        let _ = self.shards[shard].find(hash, |named| {
            prefetch(named);
            false
        });
    }

    /// Adds `name` at `index`; the caller knows the name is not indexed yet.
    pub(crate) fn insert(&mut self, name: &str, index: usize) {
        let (hash, shard) = self.locate(name);
        self.shards[shard].insert_unique(hash, Named { hash, index }, |named| named.hash);
    }

    /// Removes `name`, which is indexed at `index` (the index tells it from a name with the
    /// same hash, so no name is read).
    pub(crate) fn remove(&mut self, name: &str, index: usize) {
        let (hash, shard) = self.locate(name);
        if let Ok(entry) =
            self.shards[shard].find_entry(hash, |named| named.hash == hash && named.index == index)
        {
            entry.remove();
        }
    }

    /// Names indexed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    /// Shards holding at least one name.
    #[cfg(test)]
    pub(crate) fn shards_used(&self) -> usize {
        self.shards.iter().filter(|shard| !shard.is_empty()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` names `uid-<i>`, each indexed at `i` in an index of `1 << bits` shards.
    fn indexed(count: usize, bits: u32) -> (Vec<String>, NameIndex) {
        let names: Vec<String> = (0..count).map(|i| format!("uid-{i}")).collect();
        let mut index = NameIndex::new(bits);
        for (i, name) in names.iter().enumerate() {
            index.insert(name, i);
        }
        (names, index)
    }

    /// The name at an index, as the book gives it to [`NameIndex::find`].
    fn name_at<'a>(names: &'a [String]) -> impl Fn(usize) -> Option<&'a str> {
        |index| names.get(index).map(String::as_str)
    }

    #[test]
    fn finds_inserted_names_and_forgets_removed_ones() {
        let (names, mut index) = indexed(10_000, 4);
        assert_eq!(index.len(), 10_000);
        assert_eq!(index.shards_used(), 16, "names spread over every shard");
        assert_eq!(index.find("uid-4321", name_at(&names)), Some(4321));
        assert_eq!(index.find("uid-10000", name_at(&names)), None);
        for (i, name) in names.iter().enumerate().step_by(2) {
            index.remove(name, i);
        }
        assert_eq!(index.len(), 5_000);
        assert_eq!(index.find("uid-4320", name_at(&names)), None);
        assert_eq!(index.find("uid-4321", name_at(&names)), Some(4321));
    }

    #[test]
    fn names_with_equal_hashes_are_told_apart_by_the_name_and_removed_by_the_index() {
        // Two entries with one hash, as two colliding names would have: a lookup compares the
        // names, a removal the indices.
        let names = ["a", "b"];
        let name_at = |index: usize| names.get(index).copied();
        let mut index = NameIndex::new(1);
        let (hash, shard) = index.locate("a");
        for i in 0..2 {
            index.shards[shard].insert_unique(hash, Named { hash, index: i }, |named| named.hash);
        }
        assert_eq!(index.find("a", name_at), Some(0));
        index.remove("a", 1);
        assert_eq!(
            index.find("a", name_at),
            Some(0),
            "entry 1 went, not entry 0"
        );
        index.remove("a", 0);
        assert_eq!(index.find("a", name_at), None);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn asking_ahead_changes_no_answer() {
        // Present names, absent ones, and two entries with one hash: a prefetch finds nothing
        // and changes nothing.
        let (names, mut index) = indexed(1_000, 2);
        let (hash, shard) = index.locate("uid-7");
        index.shards[shard].insert_unique(hash, Named { hash, index: 999 }, |named| named.hash);
        for name in ["uid-7", "uid-500", "uid-1000", ""] {
            index.prefetch(name);
        }
        assert_eq!(index.len(), 1_001);
        assert_eq!(index.find("uid-7", name_at(&names)), Some(7));
        assert_eq!(index.find("uid-500", name_at(&names)), Some(500));
        assert_eq!(index.find("uid-1000", name_at(&names)), None);
    }

    #[test]
    fn a_growing_shard_keeps_every_name() {
        // Two shards, so that each grows many times; every name is still found after.
        let (names, index) = indexed(50_000, 1);
        assert!(names
            .iter()
            .enumerate()
            .all(|(i, name)| index.find(name, name_at(&names)) == Some(i)));
    }
}
