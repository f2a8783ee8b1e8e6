//! Turning a [`RestorePlan`] into bytes: a sparse image file, or a stream of extents.
//!
//! Only non-zero blocks are read and written; runs of consecutive blocks are coalesced into
//! one extent (one `pwrite` for a file). [`materialise`] and [`for_each_extent`] read the plan
//! frame by frame in pack order, on every core, and hand extents over in no particular order:
//! a journal interleaves the writes of concurrent writers, so one frame often holds blocks of
//! several distant parts of the volume, and reading in volume order would decompress it once
//! per part. [`extents`] reads in volume order on one thread. Every block is verified against
//! its hash on the way
//! (see [`Store::read_chunk`]); a bad block stops the restore with an error naming the volume,
//! the block's byte offset in the volume, the pack file and the frame's byte offset in it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};

use crate::types::{BlockNo, ChunkHash, BLOCK_SIZE, BLOCK_SIZE_BYTES};

use super::chunk_index::ChunkIndex;
use super::pack::{frame_in_window, ChunkLoc, FrameBytes, PackWindow};
use super::{grouping, ChunkReadError, RestorePlan, Store, StoreError};

/// Largest extent [`materialise`] writes with one `pwrite`.
pub const MATERIALISE_EXTENT_BYTES: usize = 4 << 20;

/// What [`materialise`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterialiseStats {
    /// Bytes written to the output (the holes are not counted).
    pub bytes_written: u64,
    /// Non-zero blocks written.
    pub blocks: u64,
}

/// Writes the image of `plan` into `out`, which must be freshly created or truncated: only the
/// non-zero blocks are written, in coalesced runs, and then the file is sized to the volume,
/// leaving holes everywhere else. Does not fsync `out`: call `out.sync_all()` when the restore
/// has to survive a crash.
pub fn materialise(
    store: &Store,
    plan: &RestorePlan,
    out: &File,
) -> Result<MaterialiseStats, StoreError> {
    let mut stats = MaterialiseStats::default();
    for_each_extent(store, plan, MATERIALISE_EXTENT_BYTES, |offset, data| {
        out.write_all_at(&data, offset)
            .map_err(|source| StoreError::Io {
                action: format!(
                    "write the restored image of volume {} at byte {offset}",
                    plan.volume
                ),
                source,
            })?;
        stats.bytes_written += data.len() as u64;
        stats.blocks += data.len().div_ceil(BLOCK_SIZE) as u64;
        Ok::<(), StoreError>(())
    })?;
    out.set_len(plan.size_bytes)
        .map_err(|source| StoreError::Io {
            action: format!(
                "set the restored image of volume {} to its size of {} bytes",
                plan.volume, plan.size_bytes
            ),
            source,
        })?;
    Ok(stats)
}

/// The non-zero data of `plan` as `(volume byte offset, bytes)` extents of consecutive blocks,
/// each at most `max_extent_bytes` long (at least one block), in increasing offset order, every
/// block verified. The last extent is cut at the volume's size. After an error the iterator
/// ends.
pub fn extents<'a>(
    store: &'a Store,
    plan: &'a RestorePlan,
    max_extent_bytes: usize,
) -> Extents<'a> {
    Extents {
        store,
        plan,
        max_blocks: (max_extent_bytes / BLOCK_SIZE).max(1),
        next: 0,
        failed: false,
    }
}

/// Iterator returned by [`extents`].
pub struct Extents<'a> {
    store: &'a Store,
    plan: &'a RestorePlan,
    max_blocks: usize,
    /// Index into `plan.blocks` of the next block to read.
    next: usize,
    failed: bool,
}

impl Extents<'_> {
    fn read_extent(&mut self) -> Result<(u64, Vec<u8>), StoreError> {
        let run = next_run(self.plan, self.next, self.max_blocks);
        self.next = run.end;
        read_run(self.store, self.plan, run)
    }
}

/// The indexes into `plan.blocks` of the run of consecutive blocks starting at `start`, at most
/// `max_blocks` long.
fn next_run(plan: &RestorePlan, start: usize, max_blocks: usize) -> std::ops::Range<usize> {
    let blocks = &plan.blocks[start..];
    let first = blocks[0].0;
    let run = blocks
        .iter()
        .take(max_blocks)
        .zip(first.0..)
        .take_while(|((block, _), expected)| block.0 == *expected)
        .count();
    start..start + run
}

/// Reads and verifies the blocks `plan.blocks[run]`, consecutive in the volume, as one extent
/// cut at the volume's size.
fn read_run(
    store: &Store,
    plan: &RestorePlan,
    run: std::ops::Range<usize>,
) -> Result<(u64, Vec<u8>), StoreError> {
    let blocks = &plan.blocks[run];
    let first = blocks[0].0;
    let mut data = Vec::with_capacity(blocks.len() * BLOCK_SIZE);
    for (block, hash) in blocks {
        store
            .append_chunk(hash, &mut data)
            .map_err(|source| block_error(plan, *block, source))?;
    }
    let offset = first.offset_bytes();
    let in_volume = plan.size_bytes.saturating_sub(offset);
    if (data.len() as u64) > in_volume {
        data.truncate(in_volume as usize);
    }
    Ok((offset, data))
}

/// Extents each reader thread may have read ahead of the consumer.
const READ_AHEAD_PER_THREAD: usize = 4;

/// A block of a plan and where its bytes are stored: 32 bytes, for a block's number and hash
/// are the plan's. Every block of a restore has one, built before its first frame goes out, in
/// fresh memory whose page faults were a fifth of that wait when it held them too.
#[derive(Clone, Copy)]
struct Located {
    loc: ChunkLoc,
    /// Index of the block in `plan.blocks`, which are in block order.
    at: usize,
}

const _: () = assert!(std::mem::size_of::<Located>() == 32);

impl Located {
    fn block(&self, plan: &RestorePlan) -> BlockNo {
        plan.blocks[self.at].0
    }

    fn hash<'p>(&self, plan: &'p RestorePlan) -> &'p ChunkHash {
        &plan.blocks[self.at].1
    }
}

/// The plan's blocks with their locations, sorted by frame (pack, then offset in the pack) and
/// by block number inside a frame, and the ranges of that list that share a frame.
fn locate_by_frame(
    store: &Store,
    plan: &RestorePlan,
) -> Result<(Vec<Located>, Vec<std::ops::Range<usize>>), StoreError> {
    let mut located = locate_by_pack(store, plan)?;
    let mut frames = Vec::new();
    let mut start = 0;
    for pack in located.chunk_by_mut(|a, b| a.loc.pack == b.loc.pack) {
        for frame in sorted_by_frame(pack) {
            frames.push(start..start + frame.len());
            start += frame.len();
        }
    }
    Ok((located, frames))
}

/// Sorts the blocks of one pack by frame, and by block number inside a frame; the frames.
fn sorted_by_frame(
    pack: &mut [Located],
) -> std::slice::ChunkBy<'_, Located, impl FnMut(&Located, &Located) -> bool> {
    pack.sort_unstable_by_key(|l| (l.loc.offset, l.at));
    pack.chunk_by(|a, b| a.loc.offset == b.loc.offset)
}

/// Looks up where each block of `plan` is stored, and groups the blocks by pack, in pack
/// order. Before the first frame of a restore can go out, every one of its blocks (640k for
/// 2.6 GB) is looked up in the chunk index while the client waits: the lookups go in the
/// index's order (see [`ChunkIndex::get`]), half the shards on each of two threads.
fn locate_by_pack(store: &Store, plan: &RestorePlan) -> Result<Vec<Located>, StoreError> {
    // The hashes travel with the blocks: read from the plan in the index's order, each would
    // miss the cache, and those misses were most of the lookups' time.
    let order_key = |(_, hash): &(usize, ChunkHash)| ChunkIndex::order_key(hash);
    let in_order = grouping::grouped_by(
        plan.blocks
            .iter()
            .enumerate()
            .map(|(at, &(_, hash))| (at, hash)),
        ChunkIndex::ORDER_KEYS,
        order_key,
    );
    let half =
        in_order.partition_point(|(_, hash)| ChunkIndex::shard_of(hash) < ChunkIndex::SHARDS / 2);
    let (first, second) = in_order.split_at(half);
    // The store's state is locked, against ingests too, only while the lookups run.
    let state = store.read_state();
    let lookup = |blocks: &[(usize, ChunkHash)]| -> Result<Vec<Located>, StoreError> {
        blocks
            .iter()
            .map(|&(at, ref hash)| match state.chunks.get(hash) {
                Some(loc) => Ok(Located { loc, at }),
                None => Err(block_error(
                    plan,
                    plan.blocks[at].0,
                    ChunkReadError::Unknown { hash: *hash },
                )),
            })
            .collect()
    };
    let (first, second) = std::thread::scope(|scope| {
        let second = scope.spawn(|| lookup(second));
        let first = lookup(first);
        let second = second
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (first, second)
    });
    drop(state);
    Ok(grouped_by_pack(first?, second?))
}

/// The blocks of `first` and `second` grouped by pack, in pack order.
fn grouped_by_pack(first: Vec<Located>, second: Vec<Located>) -> Vec<Located> {
    let both = || first.iter().chain(&second).copied();
    let packs = both().map(|l| l.loc.pack.0 as usize + 1).max();
    match packs {
        // Pack ids are dense from 1, so a counting sort's table is small.
        Some(packs) if packs <= 2 * (first.len() + second.len()) + 1024 => {
            grouping::grouped_by(both(), packs, |l| l.loc.pack.0 as usize)
        }
        _ => {
            let mut located: Vec<Located> = both().collect();
            located.sort_unstable_by_key(|l| l.loc.pack);
            located
        }
    }
}

/// The error for `block` of `plan`, which could not be read.
fn block_error(plan: &RestorePlan, block: BlockNo, source: ChunkReadError) -> StoreError {
    let volume = plan.volume.clone();
    let offset_bytes = block.offset_bytes();
    match source {
        ChunkReadError::Corrupt { .. } => StoreError::CorruptBlock {
            volume,
            offset_bytes,
            source,
        },
        _ => StoreError::ReadBlock {
            volume,
            offset_bytes,
            source,
        },
    }
}

/// Loads the one frame holding `blocks` (sorted by block number) and passes their bytes to
/// `emit` as extents of consecutive blocks, at most `max_blocks` long, cut at the volume's size.
/// Stops, and returns false, when `emit` does or an error was emitted.
fn read_frame_extents(
    store: &Store,
    plan: &RestorePlan,
    blocks: &[Located],
    max_blocks: usize,
    emit: &mut impl FnMut(Result<(u64, Vec<u8>), StoreError>) -> bool,
) -> bool {
    let frame = match store.load_frame(&blocks[0].loc) {
        Ok(frame) => frame,
        Err(source) => {
            emit(Err(block_error(plan, blocks[0].block(plan), source)));
            return false;
        }
    };
    let mut start = 0;
    while start < blocks.len() {
        let first = blocks[start].block(plan);
        let run = blocks[start..]
            .iter()
            .take(max_blocks)
            .zip(first.0..)
            .take_while(|(l, expected)| l.block(plan).0 == *expected)
            .count();
        let mut data = Vec::with_capacity(run * BLOCK_SIZE);
        for l in &blocks[start..start + run] {
            match frame.block(l.loc.index, l.hash(plan)) {
                Ok(bytes) => data.extend_from_slice(bytes),
                Err(reason) => {
                    let source = ChunkReadError::Corrupt {
                        pack: store.packs.path(l.loc.pack).display().to_string(),
                        offset: l.loc.offset,
                        reason,
                    };
                    emit(Err(block_error(plan, l.block(plan), source)));
                    return false;
                }
            }
        }
        let offset = first.offset_bytes();
        data.truncate(
            plan.size_bytes
                .saturating_sub(offset)
                .min(data.len() as u64) as usize,
        );
        if !emit(Ok((offset, data))) {
            return false;
        }
        start += run;
    }
    true
}

/// The extents [`extents`] yields, each block verified, but in no particular order: the plan's
/// blocks are read frame by frame, in pack order, on every core, so each frame is read and
/// decompressed once however the volume's writes were interleaved in the journal (reading in
/// volume order decompresses a frame once per distant region it holds blocks of). `sink` runs
/// on the calling thread. Stops at the first error, of a read or of `sink`. At most
/// `READ_AHEAD_PER_THREAD` extents per core wait for `sink`, plus one frame per core.
pub fn for_each_extent<E: From<StoreError>>(
    store: &Store,
    plan: &RestorePlan,
    max_extent_bytes: usize,
    mut sink: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let max_blocks = (max_extent_bytes / BLOCK_SIZE).max(1);
    let (located, frames) = locate_by_frame(store, plan)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(frames.len());
    if threads == 0 {
        return Ok(());
    }
    let next_frame = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(READ_AHEAD_PER_THREAD * threads);
        for _ in 0..threads {
            let tx = tx.clone();
            let (located, frames, next_frame) = (&located, &frames, &next_frame);
            scope.spawn(move || {
                let mut emit = |extent: Result<(u64, Vec<u8>), StoreError>| {
                    let failed = extent.is_err();
                    tx.send(extent).is_ok() && !failed
                };
                while let Some(frame) = frames.get(next_frame.fetch_add(1, Ordering::Relaxed)) {
                    if !read_frame_extents(
                        store,
                        plan,
                        &located[frame.clone()],
                        max_blocks,
                        &mut emit,
                    ) {
                        return;
                    }
                }
            });
        }
        // The readers hold the only senders: the loop ends when all of them are done. Returning
        // early drops the receiver, which stops them at their next send.
        drop(tx);
        for extent in rx {
            let (offset, data) = extent?;
            sink(offset, data)?;
        }
        Ok(())
    })
}

/// A frame of a plan as stored, still compressed, with the plan's blocks it holds: for a
/// reader that decompresses and verifies on its own side (a restore client), so the store
/// neither decompresses nor copies block data.
#[derive(Debug)]
pub struct StoredFrame {
    /// The pack file and the frame's byte offset in it, for error messages.
    pub pack: String,
    pub offset: u64,
    /// Blocks the frame decompresses to.
    pub block_count: usize,
    /// The frame's compressed bytes, shared with the other frames read with it.
    pub zstd: FrameBytes,
    /// (index of the block in the frame, volume block, the hash the catalog gives it), sorted
    /// by volume block.
    pub blocks: Vec<(u16, BlockNo, ChunkHash)>,
}

/// Most bytes read from a pack in one piece for a restore.
const WINDOW_MAX_BYTES: u64 = 4 << 20;
/// Most bytes of frames a restore does not need that are read over to keep one read going.
const WINDOW_MAX_GAP_BYTES: u64 = 256 << 10;

/// Windows read and waiting for the frames' consumer, beyond those being read.
const WINDOWS_READ_AHEAD: usize = 2;

/// Threads reading windows at once. During a restore, with its own writeback going on, a cold
/// 4 MiB pack read took about 9 ms (traced; the disk reads 1 GB/s at queue depth 1 when idle),
/// and with one reader the decompressing cores waited for frames.
const WINDOW_READERS: usize = 3;

/// Every frame holding blocks of `plan`, read once each and handed to `sink` undecompressed,
/// in no particular order. Neighbouring frames of a pack are read together, up to
/// [`WINDOW_MAX_BYTES`] at a time, by [`WINDOW_READERS`] threads of their own, in pack order,
/// staying up to [`WINDOWS_READ_AHEAD`] windows ahead of `sink`. A pack's blocks are sorted by
/// frame just before its first window is read, so the first frame goes out once the blocks are
/// located and grouped by pack. Blocks are not verified here: the consumer must check each
/// block it uses against the hash given with it. A frame that cannot be read (I/O error,
/// truncated pack, damaged entry header) fails with the error of its first block.
pub fn for_each_stored_frame<E: From<StoreError>>(
    store: &Store,
    plan: &RestorePlan,
    mut sink: impl FnMut(StoredFrame) -> Result<(), E>,
) -> Result<(), E> {
    let mut located = locate_by_pack(store, plan)?;
    let packs: Vec<&mut [Located]> = located
        .chunk_by_mut(|a, b| a.loc.pack == b.loc.pack)
        .collect();
    let windows = Mutex::new(Windows {
        packs: packs.into_iter(),
        frames: Vec::new(),
        taken: 0,
        stopped: false,
    });
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(WINDOWS_READ_AHEAD);
        for _ in 0..WINDOW_READERS {
            let (tx, windows) = (tx.clone(), &windows);
            scope.spawn(move || read_windows(store, plan, windows, &tx));
        }
        drop(tx);
        // Returning early drops the receiver, which stops each reader at its next send.
        for (window, frames) in rx {
            let window = window?;
            for blocks in frames {
                sink(stored_frame(store, plan, &window, blocks)?)?;
            }
        }
        Ok(())
    })
}

/// A window read from a pack, and the frames in it a restore needs: each the plan's blocks it
/// holds.
type FramesRead<'a> = (Result<Arc<PackWindow>, StoreError>, Vec<&'a [Located]>);

/// The windows of a restore not yet taken by a reader, pack by pack.
struct Windows<'a> {
    /// Packs not yet started, each its blocks in no order.
    packs: std::vec::IntoIter<&'a mut [Located]>,
    /// Frames of the current pack, in pack order, and how many of them are taken.
    frames: Vec<&'a [Located]>,
    taken: usize,
    /// Set once a read failed: the readers take nothing more.
    stopped: bool,
}

impl<'a> Windows<'a> {
    /// The frames of the next window, in pack order; `None` when all are taken.
    fn next_window(&mut self) -> Option<Vec<&'a [Located]>> {
        if self.stopped {
            return None;
        }
        while self.taken == self.frames.len() {
            self.frames = sorted_by_frame(self.packs.next()?).collect();
            self.taken = 0;
        }
        let rest = &self.frames[self.taken..];
        let count = frames_read_together(rest.iter().map(|f| f[0].loc));
        self.taken += count;
        Some(rest[..count].to_vec())
    }
}

/// A reading thread of [`for_each_stored_frame`]: takes the next window and reads it, handing
/// it over with its frames, until none are left, a read failed, or nobody takes the windows.
fn read_windows<'a>(
    store: &Store,
    plan: &RestorePlan,
    windows: &Mutex<Windows<'a>>,
    tx: &mpsc::SyncSender<FramesRead<'a>>,
) {
    let take = || {
        windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_window()
    };
    while let Some(read) = take() {
        let first = read[0][0].loc;
        let end = end_of(&read[read.len() - 1][0].loc);
        let window = store
            .read_window(&first, (end - first.offset) as usize)
            .map_err(|source| block_error(plan, read[0][0].block(plan), source));
        let failed = window.is_err();
        if failed {
            windows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stopped = true;
        }
        if tx.send((window, read)).is_err() || failed {
            return;
        }
    }
}

fn end_of(loc: &ChunkLoc) -> u64 {
    loc.offset + u64::from(loc.entry_len)
}

/// How many of the frames `locs` (in pack order) to read in one piece with the first.
fn frames_read_together(mut locs: impl Iterator<Item = ChunkLoc>) -> usize {
    let Some(first) = locs.next() else {
        return 0;
    };
    let mut end = end_of(&first);
    let mut count = 1;
    for loc in locs {
        let near = loc.pack == first.pack
            && loc.offset >= end
            && loc.offset - end <= WINDOW_MAX_GAP_BYTES
            && end_of(&loc) - first.offset <= WINDOW_MAX_BYTES;
        if !near {
            break;
        }
        end = end_of(&loc);
        count += 1;
    }
    count
}

fn stored_frame(
    store: &Store,
    plan: &RestorePlan,
    window: &std::sync::Arc<PackWindow>,
    blocks: &[Located],
) -> Result<StoredFrame, StoreError> {
    let loc = blocks[0].loc;
    let path = store.packs.path(loc.pack);
    let (hashes, zstd) = frame_in_window(window, &path, &loc)
        .map_err(|source| block_error(plan, blocks[0].block(plan), source))?;
    Ok(StoredFrame {
        pack: path.display().to_string(),
        offset: loc.offset,
        block_count: hashes.len(),
        zstd,
        blocks: blocks
            .iter()
            .map(|l| (l.loc.index, l.block(plan), *l.hash(plan)))
            .collect(),
    })
}

impl Iterator for Extents<'_> {
    type Item = Result<(u64, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.plan.blocks.len() {
            return None;
        }
        let extent = self.read_extent();
        self.failed = extent.is_err();
        Some(extent)
    }
}

impl std::iter::FusedIterator for Extents<'_> {}

/// Bytes of the volume covered by the plan's blocks (for progress reporting).
pub fn plan_data_bytes(plan: &RestorePlan) -> u64 {
    let full = plan.blocks.len() as u64 * BLOCK_SIZE_BYTES;
    match plan.blocks.last() {
        Some((last, _)) => {
            let end = last.offset_bytes() + BLOCK_SIZE_BYTES;
            full - end.saturating_sub(plan.size_bytes.max(last.offset_bytes()))
        }
        None => 0,
    }
}

/// The plan's blocks as ranges of consecutive blocks, `(first, count)`, in order: what a
/// restored image allocates.
pub fn plan_block_ranges(plan: &RestorePlan) -> Vec<(BlockNo, u64)> {
    let mut ranges: Vec<(BlockNo, u64)> = Vec::new();
    for &(block, _) in &plan.blocks {
        match ranges.last_mut() {
            Some((first, count)) if first.0 + *count == block.0 => *count += 1,
            _ => ranges.push((block, 1)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PackId;

    #[test]
    fn block_ranges_join_consecutive_blocks_only() {
        let plan = |blocks: &[u64]| RestorePlan {
            volume: crate::VolumeName::new("v").unwrap(),
            size_bytes: 1 << 30,
            seq: crate::Seq(1),
            time: crate::TimeNs(0),
            blocks: blocks
                .iter()
                .map(|&b| (BlockNo(b), ChunkHash::of(&[0u8; BLOCK_SIZE])))
                .collect(),
        };
        assert!(plan_block_ranges(&plan(&[])).is_empty());
        let ranges = plan_block_ranges(&plan(&[0, 1, 2, 5, 7, 8]));
        let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(b, n)| (b.0, n)).collect();
        assert_eq!(ranges, [(0, 3), (5, 1), (7, 2)]);
    }

    fn loc(pack: u32, offset: u64, entry_len: u32) -> ChunkLoc {
        ChunkLoc {
            pack: PackId(pack),
            offset,
            entry_len,
            index: 0,
        }
    }

    #[test]
    fn blocks_are_grouped_by_pack_in_pack_order_however_sparse_the_pack_ids() {
        let located = |packs: &[u32]| -> Vec<Located> {
            (0..)
                .zip(packs)
                .map(|(at, &pack)| Located {
                    loc: loc(pack, 0, 1),
                    at,
                })
                .collect()
        };
        let order = |grouped: Vec<Located>| -> Vec<(u32, usize)> {
            grouped.iter().map(|l| (l.loc.pack.0, l.at)).collect()
        };
        // Dense ids take the counting sort, which keeps the order inside a pack.
        let grouped = grouped_by_pack(located(&[3, 1, 3]), located(&[2, 1]));
        assert_eq!(order(grouped), [(1, 1), (1, 1), (2, 0), (3, 0), (3, 2)]);
        // An id far beyond the block count takes a comparison sort instead of a huge table.
        let grouped = grouped_by_pack(located(&[u32::MAX, 1]), located(&[7]));
        let packs: Vec<u32> = order(grouped).into_iter().map(|(p, _)| p).collect();
        assert_eq!(packs, [1, 7, u32::MAX]);
        assert!(grouped_by_pack(Vec::new(), Vec::new()).is_empty());
    }

    #[test]
    fn neighbours_in_a_pack_are_read_together_within_the_limits() {
        let kib = 1024;
        let together = |locs: &[ChunkLoc]| frames_read_together(locs.iter().copied());
        assert_eq!(together(&[]), 0);
        let adjacent = [loc(1, 0, 512 * kib), loc(1, 512 * 1024, 512 * kib)];
        assert_eq!(together(&adjacent), 2);
        let gap = WINDOW_MAX_GAP_BYTES;
        assert_eq!(together(&[loc(1, 0, kib), loc(1, 1024 + gap, kib)]), 2);
        assert_eq!(together(&[loc(1, 0, kib), loc(1, 1024 + gap + 1, kib)]), 1);
        assert_eq!(together(&[loc(1, 0, kib), loc(2, 1024, kib)]), 1);
        let frame = (WINDOW_MAX_BYTES / 4) as u32;
        let run: Vec<ChunkLoc> = (0..6)
            .map(|i| loc(1, i * u64::from(frame), frame))
            .collect();
        assert_eq!(together(&run), 4, "a read stops at WINDOW_MAX_BYTES");
        let huge = (WINDOW_MAX_BYTES * 2) as u32;
        assert_eq!(
            together(&[loc(1, 0, huge), loc(1, u64::from(huge), kib)]),
            1
        );
        assert_eq!(
            together(&[loc(1, 4096, kib), loc(1, 0, kib)]),
            1,
            "out of order"
        );
    }
}
