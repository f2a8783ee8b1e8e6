//! Turning a [`RestorePlan`] into bytes: a sparse image file, or a stream of extents.
//!
//! Only non-zero blocks are read and written; runs of consecutive blocks are coalesced into
//! one extent (one `pwrite` for a file). [`materialise`] and [`for_each_extent`] read extents
//! on every core (decompressing and verifying frames is what a restore spends its CPU on) and
//! hand them over in offset order, a few extents per core ahead at most. Every block is verified against its hash on the way
//! (see [`Store::read_chunk`]); a bad block stops the restore with an error naming the volume,
//! the block's byte offset in the volume, the pack file and the frame's byte offset in it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use crate::types::{BLOCK_SIZE, BLOCK_SIZE_BYTES};

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
        store.append_chunk(hash, &mut data).map_err(|source| {
            let offset_bytes = block.offset_bytes();
            let volume = plan.volume.clone();
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
        })?;
    }
    let offset = first.offset_bytes();
    let in_volume = plan.size_bytes.saturating_sub(offset);
    if (data.len() as u64) > in_volume {
        data.truncate(in_volume as usize);
    }
    Ok((offset, data))
}

/// Extents each reader thread may have read ahead of the consumer.
const READ_AHEAD_PER_THREAD: usize = 2;

/// The extents [`extents`] yields, read on every core, passed to `sink` in the same order on
/// the calling thread. Stops at the first error, of a read or of `sink`. At most
/// `READ_AHEAD_PER_THREAD + 1` extents per core are in memory at once.
pub fn for_each_extent<E: From<StoreError>>(
    store: &Store,
    plan: &RestorePlan,
    max_extent_bytes: usize,
    mut sink: impl FnMut(u64, Vec<u8>) -> Result<(), E>,
) -> Result<(), E> {
    let max_blocks = (max_extent_bytes / BLOCK_SIZE).max(1);
    let mut runs = Vec::new();
    let mut next = 0;
    while next < plan.blocks.len() {
        let run = next_run(plan, next, max_blocks);
        next = run.end;
        runs.push(run);
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(runs.len());
    if threads <= 1 {
        for run in runs {
            let (offset, data) = read_run(store, plan, run)?;
            sink(offset, data)?;
        }
        return Ok(());
    }
    std::thread::scope(|scope| {
        // Reader t reads runs t, t + threads, ...; so taking one extent from each reader in
        // turn yields them in order. Returning drops the receivers, which stops the readers.
        let readers: Vec<_> = (0..threads)
            .map(|t| {
                let (tx, rx) = mpsc::sync_channel(READ_AHEAD_PER_THREAD);
                let runs = &runs;
                scope.spawn(move || {
                    for run in runs.iter().skip(t).step_by(threads) {
                        let extent = read_run(store, plan, run.clone());
                        let failed = extent.is_err();
                        if tx.send(extent).is_err() || failed {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        for i in 0..runs.len() {
            let extent = readers[i % threads].recv().map_err(|_| StoreError::Io {
                action: format!("read the blocks of volume {}", plan.volume),
                source: std::io::Error::other("a reader thread stopped"),
            })?;
            let (offset, data) = extent?;
            sink(offset, data)?;
        }
        Ok(())
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
