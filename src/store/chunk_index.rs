//! The chunk index: where each stored chunk is, by its hash.
//!
//! It is the largest structure a collector keeps in memory, an entry for every distinct 4 KiB
//! block it holds (5.3 million for 20 GiB of unique data), and it changes under the store's
//! state lock, which every catalog call and every ingest also takes. Two things shaped it.
//!
//! - **Growth must not stall the store.** One hash map grows by doubling all at once: at 3.7
//!   million chunks, moving them into a table twice the size took 0.2 s on an idle core, and the
//!   RPO benchmark saw the collector answer nothing for 0.7 s and 1.6 s. So the index is split
//!   into 64 shards by the hash's first bits (blake3 output is uniform), and any rebuild moves
//!   a 64th of the entries at most.
//! - **Memory.** Hash maps leave slots empty, and maps fed by uniform hashes all double within
//!   the same seconds, the old tables' memory kept by the allocator: a store of 4.1 million
//!   chunks held 653 MB once opened, and 60 s of flat-out new data peaked at 817 MB. So each
//!   shard keeps its entries sorted, packed into 50 bytes with no empty slots, in an anonymous
//!   mapping of its own, plus a small hash map of the entries added since. When that map
//!   reaches an eighth of the array, the two are merged into a new mapping, and the old one
//!   goes back to the kernel at once.
//!
//! Lookups in a sorted array start from a guess: the hashes are uniform, so a hash's value
//! says about where it lies (see [`SortedEntries`]).

use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

use memmap2::MmapMut;

use super::pack::{ChunkLoc, PackId};
use crate::types::ChunkHash;

/// Bits of a hash that pick its shard.
const SHARD_BITS: u32 = 6;

/// Bytes of a hash after the first eight, which its [`position`] stands for.
const TAIL_BYTES: usize = 24;
/// Bytes of an entry besides its position: the hash's tail, then the pack (u32), the frame's
/// offset (u64), the entry's length (u32) and the block's index in its frame (u16),
/// little-endian.
const REST_BYTES: usize = TAIL_BYTES + 18;

type Rest = [u8; REST_BYTES];

/// A shard's map of recent entries is merged into its array once it holds this many, however
/// small the array.
const MERGE_AT_LEAST: usize = 256;
/// ... or an eighth of the array: each entry is copied about nine times over the index's life.
const MERGE_FRACTION: usize = 8;

pub(crate) struct ChunkIndex {
    shards: Box<[Shard]>,
    len: usize,
    /// Entries are being loaded ([`ChunkIndex::loading`]) and cannot be looked up yet.
    loading: bool,
}

impl Default for ChunkIndex {
    fn default() -> ChunkIndex {
        ChunkIndex {
            shards: (0..Self::SHARDS).map(|_| Shard::default()).collect(),
            len: 0,
            loading: false,
        }
    }
}

impl ChunkIndex {
    /// Shards, each an array and a map of its own.
    pub const SHARDS: usize = 1 << SHARD_BITS;

    /// The shard holding `hash`: by its first [`SHARD_BITS`] bits.
    pub fn shard_of(hash: &ChunkHash) -> usize {
        usize::from(hash.0[0] >> (8 - SHARD_BITS))
    }

    /// Keys of [`ChunkIndex::order_key`].
    pub const ORDER_KEYS: usize = 1 << 16;

    /// A key to sort many lookups by: the hash's first 16 bits, which order it by shard and,
    /// coarsely, by its place in its shard's arrays.
    pub fn order_key(hash: &ChunkHash) -> usize {
        usize::from(u16::from_be_bytes([hash.0[0], hash.0[1]]))
    }

    fn shard(&self, hash: &ChunkHash) -> &Shard {
        &self.shards[Self::shard_of(hash)]
    }

    /// An index to load with every chunk a store holds, then [`ChunkIndex::finish_loading`]:
    /// each shard's entries are sorted once, where inserting them one by one would merge each
    /// entry into new arrays about nine times and look each up first.
    pub fn loading() -> ChunkIndex {
        ChunkIndex {
            loading: true,
            ..ChunkIndex::default()
        }
    }

    /// Sorts the loaded entries into each shard's array; of a hash loaded twice, the first
    /// location stays.
    pub fn finish_loading(&mut self) -> std::io::Result<()> {
        for shard in self.shards.iter_mut() {
            shard.finish_loading()?;
        }
        self.len = self.shards.iter().map(|s| s.sorted.len).sum();
        self.loading = false;
        Ok(())
    }

    /// Where `hash` is stored. Many lookups are faster in the order of
    /// [`ChunkIndex::order_key`]: a restore looks up every block of its plan before its first
    /// frame goes out, and in that order they walk each shard's arrays from start to end,
    /// where in the plan's order each would miss the cache.
    pub fn get(&self, hash: &ChunkHash) -> Option<ChunkLoc> {
        debug_assert!(!self.loading, "a chunk index looked up while loading");
        self.shard(hash).get(hash)
    }

    pub fn contains_key(&self, hash: &ChunkHash) -> bool {
        self.get(hash).is_some()
    }

    /// Records where `hash` is stored. The caller has looked it up and not found it, and
    /// nothing has inserted it since: the store's ingests check and insert under one lock.
    /// (Were it there after all, both locations would hold the same checked bytes, and a
    /// lookup would find one of them.) While loading, a hash may come again; the first
    /// location stays.
    pub fn insert_new(&mut self, hash: ChunkHash, loc: ChunkLoc) {
        let shard = &mut self.shards[Self::shard_of(&hash)];
        if self.loading {
            shard.loaded.push((position(&hash.0), rest(&hash, &loc)));
        } else if shard.insert_new(hash, loc) {
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

struct Shard {
    sorted: SortedEntries,
    recent: HashMap<ChunkHash, ChunkLoc>,
    /// A bit for each recent entry's [`position`], at a place picked by it: a hash whose bit
    /// is clear is not among the recent entries. Most hashes looked up during an ingest of new
    /// data are in neither part, and the recent entries' table, its lines pushed out of the
    /// cache by the arrays' lookups, would cost each of them a miss.
    recent_bits: Vec<u64>,
    /// Entries loaded and not yet sorted ([`ChunkIndex::loading`]).
    loaded: Vec<(u64, Rest)>,
}

impl Default for Shard {
    fn default() -> Shard {
        let mut shard = Shard {
            sorted: SortedEntries::default(),
            recent: HashMap::new(),
            recent_bits: Vec::new(),
            loaded: Vec::new(),
        };
        shard.reset_recent_bits();
        shard
    }
}

impl Shard {
    fn get(&self, hash: &ChunkHash) -> Option<ChunkLoc> {
        let (word, mask) = self.recent_bit(hash);
        let recent = match self.recent_bits[word] & mask {
            0 => None,
            _ => self.recent.get(hash).copied(),
        };
        recent.or_else(|| self.sorted.get(hash))
    }

    /// The recent entries are merged into the array once they are this many.
    fn merge_at(&self) -> usize {
        MERGE_AT_LEAST.max(self.sorted.len / MERGE_FRACTION)
    }

    /// The bit of `recent_bits` for `hash`: word and mask.
    fn recent_bit(&self, hash: &ChunkHash) -> (usize, u64) {
        let bit = (position(&hash.0) >> 16) % (self.recent_bits.len() as u64 * 64);
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    /// Clear bits for the recent entries to come: eight for each at most.
    fn reset_recent_bits(&mut self) {
        self.recent_bits.clear();
        self.recent_bits
            .resize((self.merge_at() * 8).div_ceil(64), 0);
    }

    /// Adds `hash`, which the sorted entries do not hold, to the recent ones; true when it was
    /// not among those either.
    fn insert_new(&mut self, hash: ChunkHash, loc: ChunkLoc) -> bool {
        debug_assert!(self.sorted.get(&hash).is_none(), "{hash} inserted twice");
        match self.recent.entry(hash) {
            Entry::Occupied(_) => return false,
            Entry::Vacant(slot) => slot.insert(loc),
        };
        let (word, mask) = self.recent_bit(&hash);
        self.recent_bits[word] |= mask;
        if self.recent.len() >= self.merge_at() {
            self.merge_recent();
        }
        true
    }

    fn finish_loading(&mut self) -> std::io::Result<()> {
        let mut loaded = std::mem::take(&mut self.loaded);
        // Stable, so that of equal hashes the first loaded stays first, and is kept.
        loaded.sort_by(order);
        loaded.dedup_by(|later, first| order(later, first).is_eq());
        self.sorted = self.sorted.merged_with(&loaded)?;
        self.reset_recent_bits();
        Ok(())
    }

    /// Moves the recent entries into a new sorted array. Without memory for one, they stay
    /// where they are, and the next insert tries again.
    fn merge_recent(&mut self) {
        let mut added: Vec<(u64, Rest)> = self
            .recent
            .iter()
            .map(|(hash, loc)| (position(&hash.0), rest(hash, loc)))
            .collect();
        added.sort_unstable_by(order);
        match self.sorted.merged_with(&added) {
            Ok(merged) => {
                self.sorted = merged;
                self.recent.clear();
                self.reset_recent_bits();
            }
            Err(e) => tracing::warn!(
                entries = self.sorted.len + self.recent.len(),
                error = %e,
                "no memory to merge a chunk index shard; its recent entries stay in its hash map"
            ),
        }
    }
}

/// A shard's entries sorted by hash, in an anonymous mapping of their own (none while there
/// are none): first every entry's [`position`], then the rest of every entry. Beside them, a
/// fence: every [`FENCE_EVERY`]th position.
///
/// A lookup reads the fence near where the hash's position puts it (hashes are uniform), then
/// the few positions between two fence posts, all in one cache line, and the rest of an entry
/// only when its position matches. A binary search over the entries would miss the cache at
/// most of its twenty steps.
#[derive(Default)]
struct SortedEntries {
    map: Option<MmapMut>,
    len: usize,
    fence: Vec<u64>,
}

/// One entry in this many has its position in the fence.
const FENCE_EVERY: usize = 8;
/// A guess in the fence is first looked for this many places either side of it. For a shard
/// of n entries the guess is off by about sqrt(n) / 2 entries: 16 posts for a shard of 65,000
/// (4 million chunks in all).
const FENCE_WALK: usize = 16;

impl SortedEntries {
    /// These entries and `added` (sorted, none of them among these) in a new array. The
    /// entries between two added ones are copied as one run.
    fn merged_with(&self, added: &[(u64, Rest)]) -> std::io::Result<SortedEntries> {
        let len = self.len + added.len();
        if len == 0 {
            return Ok(SortedEntries::default());
        }
        let mut map = MmapMut::map_anon(len * (8 + REST_BYTES))?;
        // Large arrays in huge pages: lookups land on random pages. Only a hint.
        let _ = map.advise(memmap2::Advice::HugePage);
        let (positions, rests) = map.split_at_mut(len * 8);
        let mut out = Appender {
            positions,
            rests,
            at: 0,
        };
        let (old_positions, old_rests) = self.bytes().split_at(self.len * 8);
        let old_run = |from: usize, to: usize| {
            (
                &old_positions[from * 8..to * 8],
                &old_rests[from * REST_BYTES..to * REST_BYTES],
            )
        };
        let mut old = 0;
        for (position, rest) in added {
            let mut run_end = old;
            while run_end < self.len
                && self.order_at(run_end, *position, &rest[..TAIL_BYTES]) == Ordering::Less
            {
                run_end += 1;
            }
            let (run_positions, run_rests) = old_run(old, run_end);
            out.append(run_positions, run_rests);
            out.append(&position.to_ne_bytes(), rest);
            old = run_end;
        }
        let (run_positions, run_rests) = old_run(old, self.len);
        out.append(run_positions, run_rests);
        let positions = out.positions;
        let fence = positions
            .as_chunks::<8>()
            .0
            .iter()
            .step_by(FENCE_EVERY)
            .map(|p| u64::from_ne_bytes(*p))
            .collect();
        Ok(SortedEntries {
            map: Some(map),
            len,
            fence,
        })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    fn position(&self, at: usize) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.bytes()[at * 8..at * 8 + 8]);
        u64::from_ne_bytes(bytes)
    }

    fn rest(&self, at: usize) -> &[u8] {
        let from = self.len * 8 + at * REST_BYTES;
        &self.bytes()[from..from + REST_BYTES]
    }

    fn tail(&self, at: usize) -> &[u8] {
        &self.rest(at)[..TAIL_BYTES]
    }

    /// How entry `at` compares with the hash of this `position` and `tail`.
    fn order_at(&self, at: usize, position: u64, tail: &[u8]) -> Ordering {
        self.position(at)
            .cmp(&position)
            .then_with(|| self.tail(at).cmp(tail))
    }

    fn get(&self, hash: &ChunkHash) -> Option<ChunkLoc> {
        self.find(hash).map(|at| unpack(self.rest(at)))
    }

    /// The index of `hash` among the entries.
    fn find(&self, hash: &ChunkHash) -> Option<usize> {
        let target = position(&hash.0);
        let start = self.posts_below(target).saturating_sub(1) * FENCE_EVERY;
        for at in start..self.len {
            match self.order_at(at, target, &hash.0[8..]) {
                Ordering::Less => continue,
                Ordering::Equal => return Some(at),
                Ordering::Greater => return None,
            }
        }
        None
    }

    /// How many fence posts lie below `target`: looked for in a window around a guess, which
    /// widens fourfold until it holds the answer.
    fn posts_below(&self, target: u64) -> usize {
        let fence = &self.fence[..];
        let guess = ((u128::from(target) * fence.len() as u128) >> 64) as usize;
        let mut radius = FENCE_WALK;
        loop {
            let (lo, hi) = (
                guess.saturating_sub(radius),
                guess.saturating_add(radius).min(fence.len()),
            );
            let from_below = lo == 0 || fence[lo - 1] < target;
            let from_above = hi == fence.len() || fence[hi] >= target;
            if from_below && from_above {
                return lo + fence[lo..hi].partition_point(|&p| p < target);
            }
            radius = radius.saturating_mul(4);
        }
    }
}

/// Writes entries one after another into a new array's positions and rests.
struct Appender<'a> {
    positions: &'a mut [u8],
    rests: &'a mut [u8],
    at: usize,
}

impl Appender<'_> {
    /// Appends the entries whose positions and rests these are.
    fn append(&mut self, positions: &[u8], rests: &[u8]) {
        let count = positions.len() / 8;
        let (from, to) = (self.at, self.at + count);
        self.positions[from * 8..to * 8].copy_from_slice(positions);
        self.rests[from * REST_BYTES..to * REST_BYTES].copy_from_slice(rests);
        self.at = to;
    }
}

/// How two entries of one shard compare: by position, then by the rest of their hashes.
fn order(a: &(u64, Rest), b: &(u64, Rest)) -> Ordering {
    a.0.cmp(&b.0)
        .then_with(|| a.1[..TAIL_BYTES].cmp(&b.1[..TAIL_BYTES]))
}

/// Where a hash lies among the uniform hashes of its shard: its first eight bytes as a number,
/// without the bits that all of the shard's hashes share. With the hash's tail it gives the
/// hash back.
fn position(hash: &[u8; 32]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(bytes) << SHARD_BITS
}

fn rest(hash: &ChunkHash, loc: &ChunkLoc) -> Rest {
    let mut out = [0u8; REST_BYTES];
    out[..24].copy_from_slice(&hash.0[8..]);
    out[24..28].copy_from_slice(&loc.pack.0.to_le_bytes());
    out[28..36].copy_from_slice(&loc.offset.to_le_bytes());
    out[36..40].copy_from_slice(&loc.entry_len.to_le_bytes());
    out[40..42].copy_from_slice(&loc.index.to_le_bytes());
    out
}

fn unpack(rest: &[u8]) -> ChunkLoc {
    ChunkLoc {
        pack: PackId(u32::from_le_bytes(field(rest, 24))),
        offset: u64::from_le_bytes(field(rest, 28)),
        entry_len: u32::from_le_bytes(field(rest, 36)),
        index: u16::from_le_bytes(field(rest, 40)),
    }
}

fn field<const N: usize>(rest: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&rest[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{Rng, SeedableRng};

    /// As the store inserts: only what a lookup did not find.
    fn insert_if_absent(index: &mut ChunkIndex, hash: ChunkHash, loc: ChunkLoc) {
        if index.get(&hash).is_none() {
            index.insert_new(hash, loc);
        }
    }

    fn loc(offset: u64) -> ChunkLoc {
        ChunkLoc {
            pack: PackId(u32::try_from(offset % 7).unwrap() + 1),
            offset,
            entry_len: 100 + u32::try_from(offset % 1000).unwrap(),
            index: u16::try_from(offset % 256).unwrap(),
        }
    }

    #[test]
    fn keeps_the_first_location_of_each_chunk_and_counts_distinct_chunks() {
        let mut index = ChunkIndex::default();
        let hashes: Vec<ChunkHash> = (0..5000u32)
            .map(|i| ChunkHash::of(&i.to_le_bytes()))
            .collect();
        for (offset, hash) in (0..).zip(&hashes) {
            insert_if_absent(&mut index, *hash, loc(offset));
        }
        insert_if_absent(&mut index, hashes[7], loc(999_999));
        assert_eq!(index.len(), hashes.len());
        for (offset, hash) in (0..).zip(&hashes) {
            assert!(index.contains_key(hash));
            assert_eq!(index.get(hash), Some(loc(offset)));
        }
        let unknown = ChunkHash::of(b"never stored");
        assert!(!index.contains_key(&unknown));
        assert!(index.get(&unknown).is_none());
    }

    #[test]
    fn an_empty_index_loads_and_answers() {
        let mut index = ChunkIndex::loading();
        index.finish_loading().unwrap();
        assert_eq!(index.len(), 0);
        assert!(index.get(&ChunkHash::of(b"x")).is_none());
        index.insert_new(ChunkHash::of(b"x"), loc(3));
        assert_eq!(index.get(&ChunkHash::of(b"x")), Some(loc(3)));
    }

    #[test]
    fn a_location_packs_and_unpacks_to_itself() {
        let far = ChunkLoc {
            pack: PackId(u32::MAX),
            offset: u64::MAX - 1,
            entry_len: u32::MAX,
            index: u16::MAX,
        };
        let hash = ChunkHash::of(b"far");
        let packed = rest(&hash, &far);
        assert_eq!(packed[..TAIL_BYTES], hash.0[8..]);
        assert_eq!(unpack(&packed), far);
    }

    /// Hashes of one shard that agree on many leading bytes, as no blake3 output would: the
    /// interpolation sees ranges whose ends have the same position.
    fn crowded_hash(rng: &mut impl Rng) -> ChunkHash {
        let mut hash = [0u8; 32];
        hash[0] = 9;
        hash[1..12].fill(0x5a);
        rng.fill(&mut hash[12..]);
        if rng.gen_bool(0.3) {
            hash[12..30].fill(0);
        }
        ChunkHash(hash)
    }

    /// Against a hash map, through many merges: uniform hashes, crowded ones, hashes inserted
    /// twice, and lookups of hashes never inserted.
    #[test]
    fn answers_as_a_hash_map_does_through_merges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut index = ChunkIndex::default();
        let mut model: HashMap<ChunkHash, ChunkLoc> = HashMap::new();
        let mut inserted = Vec::new();
        for step in 0..120_000u64 {
            let hash = match rng.gen_range(0..10) {
                0 if !inserted.is_empty() => inserted[rng.gen_range(0..inserted.len())],
                1..=3 => crowded_hash(&mut rng),
                _ => ChunkHash(rng.gen()),
            };
            insert_if_absent(&mut index, hash, loc(step));
            model.entry(hash).or_insert(loc(step));
            inserted.push(hash);
            if step % 97 == 0 {
                let probe = [
                    inserted[rng.gen_range(0..inserted.len())],
                    ChunkHash(rng.gen()),
                    crowded_hash(&mut rng),
                ];
                for hash in probe {
                    assert_eq!(index.get(&hash), model.get(&hash).copied(), "step {step}");
                }
            }
        }
        assert_eq!(index.len(), model.len());
        for (hash, loc) in &model {
            assert_eq!(index.get(hash), Some(*loc));
        }
    }

    #[test]
    fn loading_gives_the_index_that_inserting_one_by_one_gives() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut hashes: Vec<ChunkHash> = Vec::new();
        for _ in 0..30_000 {
            let hash = match rng.gen_range(0..10) {
                0 if !hashes.is_empty() => hashes[rng.gen_range(0..hashes.len())],
                1 => crowded_hash(&mut rng),
                _ => ChunkHash(rng.gen()),
            };
            hashes.push(hash);
        }
        let (mut loaded, mut inserted) = (ChunkIndex::loading(), ChunkIndex::default());
        for (offset, hash) in (0..).zip(&hashes) {
            loaded.insert_new(*hash, loc(offset));
            insert_if_absent(&mut inserted, *hash, loc(offset));
        }
        loaded.finish_loading().unwrap();
        assert_eq!(loaded.len(), inserted.len());
        for hash in &hashes {
            assert_eq!(loaded.get(hash), inserted.get(hash));
        }
        for offset in 0..5_000 {
            let hash = ChunkHash(rng.gen());
            loaded.insert_new(hash, loc(offset));
            insert_if_absent(&mut inserted, hash, loc(offset));
            hashes.push(hash);
        }
        assert_eq!(loaded.len(), inserted.len());
        for hash in &hashes {
            assert_eq!(loaded.get(hash), inserted.get(hash));
        }
    }

    #[test]
    fn a_shards_recent_entries_stay_a_small_part_of_it() {
        let mut index = ChunkIndex::default();
        for i in 0..200_000u32 {
            index.insert_new(ChunkHash::of(&i.to_le_bytes()), loc(u64::from(i)));
        }
        for shard in index.shards.iter() {
            assert!(
                shard.recent.len() < shard.merge_at(),
                "{} recent",
                shard.recent.len()
            );
            let sorted = &shard.sorted;
            assert!((1..sorted.len).all(|at| {
                sorted.order_at(at - 1, sorted.position(at), sorted.tail(at)) == Ordering::Less
            }));
        }
        let sorted: usize = index.shards.iter().map(|s| s.sorted.len).sum();
        assert!(sorted > 150_000, "only {sorted} entries in sorted arrays");
    }
}
