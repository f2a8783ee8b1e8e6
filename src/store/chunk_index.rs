//! The chunk index: where each stored chunk is, by its hash.
//!
//! It is one of the largest structures a collector keeps in memory (an entry per distinct 4 KiB block
//! it holds), and it changes under the store's state lock, which every catalog call and every
//! ingest also takes. One hash map grows by doubling all at once: at 3.7 million chunks, moving
//! them into a table twice the size took 0.2 s on an idle core, and the RPO benchmark saw the
//! collector answer nothing for 0.7 s and 1.6 s, each time at about the data volumes where the
//! index crosses 1.8 and 3.7 million chunks. Split into 256 maps by the hash's first byte (blake3
//! output is uniform), a doubling moves a 256th of the entries.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use super::pack::ChunkLoc;
use crate::types::ChunkHash;

pub(crate) struct ChunkIndex {
    shards: Box<[HashMap<ChunkHash, ChunkLoc>]>,
    len: usize,
}

impl Default for ChunkIndex {
    fn default() -> ChunkIndex {
        ChunkIndex {
            shards: (0..Self::SHARDS).map(|_| HashMap::new()).collect(),
            len: 0,
        }
    }
}

impl ChunkIndex {
    /// Shards, each a hash map of its own.
    pub const SHARDS: usize = 256;

    /// The shard holding `hash`: by its first byte.
    pub fn shard_of(hash: &ChunkHash) -> usize {
        usize::from(hash.0[0])
    }

    fn shard(&self, hash: &ChunkHash) -> &HashMap<ChunkHash, ChunkLoc> {
        &self.shards[Self::shard_of(hash)]
    }

    /// Where `hash` is stored. Many lookups are faster in shard order ([`ChunkIndex::shard_of`]):
    /// a restore looks up every block of its plan before its first frame goes out. In the
    /// plan's order each lookup missed the TLB in a table of tens of MiB: 640k lookups took
    /// 147-181 ms on two threads, about 500 ns each. In shard order each shard's pages are a
    /// 256th of that, and the lookups' profile samples came to about 120 ns each on one core;
    /// every lookup still misses the cache once, as each entry is touched once.
    pub fn get(&self, hash: &ChunkHash) -> Option<&ChunkLoc> {
        self.shard(hash).get(hash)
    }

    pub fn contains_key(&self, hash: &ChunkHash) -> bool {
        self.shard(hash).contains_key(hash)
    }

    /// Records where `hash` is stored, unless it is already known (the first copy stays).
    pub fn insert_if_absent(&mut self, hash: ChunkHash, loc: ChunkLoc) {
        if let Entry::Vacant(slot) = self.shards[Self::shard_of(&hash)].entry(hash) {
            slot.insert(loc);
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::pack::PackId;

    fn loc(offset: u64) -> ChunkLoc {
        ChunkLoc {
            pack: PackId(1),
            offset,
            entry_len: 100,
            index: 0,
        }
    }

    #[test]
    fn keeps_the_first_location_of_each_chunk_and_counts_distinct_chunks() {
        let mut index = ChunkIndex::default();
        let hashes: Vec<ChunkHash> = (0..5000u32)
            .map(|i| ChunkHash::of(&i.to_le_bytes()))
            .collect();
        for (offset, hash) in (0..).zip(&hashes) {
            index.insert_if_absent(*hash, loc(offset));
        }
        index.insert_if_absent(hashes[7], loc(999_999));
        assert_eq!(index.len(), hashes.len());
        for (offset, hash) in (0..).zip(&hashes) {
            assert!(index.contains_key(hash));
            assert_eq!(index.get(hash).map(|l| l.offset), Some(offset));
        }
        let unknown = ChunkHash::of(b"never stored");
        assert!(!index.contains_key(&unknown));
        assert!(index.get(&unknown).is_none());
    }
}
