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
use std::sync::mpsc;

use crate::types::{BlockNo, ChunkHash, BLOCK_SIZE, BLOCK_SIZE_BYTES};

use super::pack::{frame_in_window, ChunkLoc, FrameBytes, PackWindow};
use super::{ChunkReadError, RestorePlan, Store, StoreError};

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

/// A block of a plan and where its bytes are stored.
#[derive(Clone, Copy)]
struct Located {
    loc: ChunkLoc,
    block: BlockNo,
    hash: ChunkHash,
}

/// The plan's blocks with their locations, sorted by frame (pack, then offset in the pack) and
/// by block number inside a frame, and the ranges of that list that share a frame.
fn locate_by_frame(
    store: &Store,
    plan: &RestorePlan,
) -> Result<(Vec<Located>, Vec<std::ops::Range<usize>>), StoreError> {
    let mut located = locate(store, plan)?;
    located.sort_unstable_by_key(|l| (l.loc.pack, l.loc.offset, l.block));
    let mut frames = Vec::new();
    let mut start = 0;
    for i in 1..=located.len() {
        let frame_ends = i == located.len()
            || (located[i].loc.pack, located[i].loc.offset)
                != (located[start].loc.pack, located[start].loc.offset);
        if frame_ends {
            frames.push(start..i);
            start = i;
        }
    }
    Ok((located, frames))
}

/// Looks up where each block of `plan` is stored, on every core: before the first frame of a
/// restore can go out, every one of its blocks (600k for 2.4 GiB) is looked up in the chunk
/// index, one cache miss each, while the client waits.
fn locate(store: &Store, plan: &RestorePlan) -> Result<Vec<Located>, StoreError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = plan.blocks.len().div_ceil(threads).max(1);
    let state = store.read_state();
    let chunks = &state.chunks;
    let shares: Vec<Result<Vec<Located>, StoreError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = plan
            .blocks
            .chunks(share)
            .map(|blocks| {
                scope.spawn(move || {
                    blocks
                        .iter()
                        .map(|&(block, hash)| match chunks.get(&hash) {
                            Some(&loc) => Ok(Located { loc, block, hash }),
                            None => Err(block_error(plan, block, ChunkReadError::Unknown { hash })),
                        })
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(join_scoped).collect()
    });
    let mut located = Vec::with_capacity(plan.blocks.len());
    for share in shares {
        located.extend(share?);
    }
    Ok(located)
}

/// What a scoped thread returned; a panic in it goes on in this thread.
fn join_scoped<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
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
            emit(Err(block_error(plan, blocks[0].block, source)));
            return false;
        }
    };
    let mut start = 0;
    while start < blocks.len() {
        let first = blocks[start].block;
        let run = blocks[start..]
            .iter()
            .take(max_blocks)
            .zip(first.0..)
            .take_while(|(l, expected)| l.block.0 == *expected)
            .count();
        let mut data = Vec::with_capacity(run * BLOCK_SIZE);
        for l in &blocks[start..start + run] {
            match frame.block(l.loc.index, &l.hash) {
                Ok(bytes) => data.extend_from_slice(bytes),
                Err(reason) => {
                    let source = ChunkReadError::Corrupt {
                        pack: store.packs.path(l.loc.pack).display().to_string(),
                        offset: l.loc.offset,
                        reason,
                    };
                    emit(Err(block_error(plan, l.block, source)));
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

/// Every frame holding blocks of `plan`, read once each in pack order and handed to `sink`
/// undecompressed. Neighbouring frames of a pack are read together, up to
/// [`WINDOW_MAX_BYTES`] at a time. Blocks are not verified here: the consumer must check each
/// block it uses against the hash given with it. A frame that cannot be read (I/O error,
/// truncated pack, damaged entry header) fails with the error of its first block.
pub fn for_each_stored_frame<E: From<StoreError>>(
    store: &Store,
    plan: &RestorePlan,
    mut sink: impl FnMut(StoredFrame) -> Result<(), E>,
) -> Result<(), E> {
    let (located, frames) = locate_by_frame(store, plan)?;
    let loc_of = |frame: &std::ops::Range<usize>| located[frame.start].loc;
    let mut rest = &frames[..];
    while let Some(first) = rest.first() {
        let together = frames_read_together(rest.iter().map(loc_of));
        let (read, later) = rest.split_at(together);
        rest = later;
        let (start, end) = (loc_of(first).offset, end_of(&loc_of(&read[read.len() - 1])));
        let window = store
            .read_window(&loc_of(first), (end - start) as usize)
            .map_err(|source| block_error(plan, located[first.start].block, source))?;
        for frame in read {
            let blocks = &located[frame.clone()];
            sink(stored_frame(store, plan, &window, blocks)?)?;
        }
    }
    Ok(())
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
        .map_err(|source| block_error(plan, blocks[0].block, source))?;
    Ok(StoredFrame {
        pack: path.display().to_string(),
        offset: loc.offset,
        block_count: hashes.len(),
        zstd,
        blocks: blocks
            .iter()
            .map(|l| (l.loc.index, l.block, l.hash))
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
