//! Frame compression for the shipper, spread over the cores on threads that live as long as
//! the agent.
//!
//! Each thread keeps its zstd context between batches ([`tideline_core::frame`] holds one per
//! thread). A scoped thread per batch, as before, built a fresh context, tables and all, for
//! every batch, and paid a thread start besides. The calling thread, a blocking-pool thread,
//! only waits: when it compressed a share itself, every pool thread that ever built a batch
//! kept a context of its own, and once large writes ran on the blocking pool as well, an
//! ingest of 2.7 GB through nbdcopy peaked at 207-208 MiB of agent RSS instead of 138. The
//! pool's queue is bounded.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tideline_core::frame::{self, MAX_FRAME_BLOCKS};
use tideline_core::{ChunkHash, BLOCK_SIZE};
use tideline_proto::v1;

/// Jobs waiting for a compression thread, per thread.
const QUEUED_PER_THREAD: usize = 4;

/// A batch's unique chunks: hashes in first-seen order, and where each one's block lies in
/// the write payloads it came from. The payloads are slices of the spool's read-ahead, so a
/// block is copied once, into the frame being compressed, instead of first into a batch-wide
/// buffer (8 MiB written and read back cold) and then into the frame.
#[derive(Default)]
pub struct BatchChunks {
    hashes: Vec<ChunkHash>,
    sources: Vec<Bytes>,
    places: Vec<ChunkPlace>,
}

/// Where a chunk's block is: `sources[source][offset..offset + BLOCK_SIZE]`.
#[derive(Clone, Copy)]
struct ChunkPlace {
    source: u32,
    offset: u32,
}

impl BatchChunks {
    /// Adds the chunks of one write: each `(offset, hash)` names a block of `payload`. The
    /// payload is kept only if it brings at least one chunk.
    pub fn add_write(
        &mut self,
        payload: Bytes,
        chunks: impl IntoIterator<Item = (usize, ChunkHash)>,
    ) {
        let source = self.sources.len() as u32;
        let before = self.hashes.len();
        for (offset, hash) in chunks {
            self.hashes.push(hash);
            self.places.push(ChunkPlace {
                source,
                offset: offset as u32,
            });
        }
        if self.hashes.len() > before {
            self.sources.push(payload);
        }
    }

    pub fn hashes(&self) -> &[ChunkHash] {
        &self.hashes
    }

    /// The blocks of chunks `group` as the fewest slices of their sources, in order: the
    /// longest runs of blocks lying one after another in a single source (a large write).
    fn runs(&self, group: &[u32]) -> Vec<&[u8]> {
        let mut runs = Vec::new();
        let mut rest = group;
        while let Some(&first) = rest.first() {
            let start = self.places[first as usize];
            let len = rest
                .iter()
                .zip(0u32..)
                .take_while(|&(&i, k)| {
                    let place = self.places[i as usize];
                    place.source == start.source
                        && place.offset == start.offset + k * BLOCK_SIZE as u32
                })
                .count();
            let at = start.offset as usize;
            runs.push(&self.sources[start.source as usize][at..at + len * BLOCK_SIZE]);
            rest = &rest[len..];
        }
        runs
    }
}

/// Pieces of a frame at least this long are compressed where they lie, without a copy.
const MIN_PIECE_BYTES: usize = 64 * 1024;

thread_local! {
    /// A compression thread's buffer for gathering a frame's blocks, kept between frames.
    static GATHERED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

type Job = Box<dyn FnOnce() + Send>;

/// Compresses the chunks at `missing` (indexes into `chunks`) into frames of up to
/// [`MAX_FRAME_BLOCKS`] blocks at zstd level `level`, in order, using every core.
pub fn frames(chunks: Arc<BatchChunks>, missing: &[u32], level: i32) -> Vec<v1::Frame> {
    let frame_count = missing.len().div_ceil(MAX_FRAME_BLOCKS);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Each share is whole frames' worth of chunks.
    let share_len = frame_count.div_ceil(threads).max(1) * MAX_FRAME_BLOCKS;
    let pending: Vec<_> = missing
        .chunks(share_len)
        .map(|share| {
            let (done, result) = crossbeam_channel::bounded(1);
            let (chunks, share) = (chunks.clone(), share.to_vec());
            let job: Job = Box::new(move || {
                let _ = done.send(compress_share(&chunks, &share, level));
            });
            match workers() {
                Some(workers) => {
                    if let Err(crossbeam_channel::SendError(job)) = workers.send(job) {
                        job();
                    }
                }
                // No pool: this thread does the share itself.
                None => job(),
            }
            result
        })
        .collect();
    let mut frames = Vec::with_capacity(frame_count);
    for result in pending {
        // A panicking job drops its sender: fail the batch as the panic would have.
        let share = result.recv().expect("a frame compression thread panicked");
        frames.extend(share);
    }
    frames
}

/// The pool's queue; `None` when not a single thread could be started.
fn workers() -> Option<&'static crossbeam_channel::Sender<Job>> {
    static WORKERS: OnceLock<Option<crossbeam_channel::Sender<Job>>> = OnceLock::new();
    WORKERS
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let (tx, rx) = crossbeam_channel::bounded::<Job>(threads * QUEUED_PER_THREAD);
            let started = (0..threads)
                .filter(|i| {
                    let rx = rx.clone();
                    std::thread::Builder::new()
                        .name(format!("compress-{i}"))
                        .spawn(move || {
                            for job in rx {
                                // The thread outlives a panicking job; its batch fails.
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                        })
                        .inspect_err(
                            |e| tracing::warn!(error = %e, "cannot start a compression thread"),
                        )
                        .is_ok()
                })
                .count();
            (started > 0).then_some(tx)
        })
        .as_ref()
}

/// The frames of `share` (indexes into `chunks`), [`MAX_FRAME_BLOCKS`] chunks each.
fn compress_share(chunks: &BatchChunks, share: &[u32], level: i32) -> Vec<v1::Frame> {
    share
        .chunks(MAX_FRAME_BLOCKS)
        .map(|group| compress_frame(chunks, group, level))
        .collect()
}

/// One frame of the chunks `chunks.hashes[i]` for `i` in `group`.
fn compress_frame(chunks: &BatchChunks, group: &[u32], level: i32) -> v1::Frame {
    let hashes =
        tideline_proto::wire_hashes(group.iter().map(|&i| Some(&chunks.hashes[i as usize])));
    // The blocks of large writes are compressed where they lie, a zstd frame per write's
    // part; a frame with smaller pieces is gathered first, which compresses them better.
    let runs = chunks.runs(group);
    let zstd_data = if runs.iter().all(|run| run.len() >= MIN_PIECE_BYTES) {
        frame::compress_pieces(&runs, level)
    } else {
        GATHERED.with_borrow_mut(|gathered| {
            gathered.clear();
            runs.iter().for_each(|run| gathered.extend_from_slice(run));
            frame::compress(gathered, level)
        })
    };
    v1::Frame {
        hashes,
        zstd_data: Bytes::from(zstd_data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_core::frame::DEFAULT_ZSTD_LEVEL;

    /// `n` distinct chunks: one write of a frame's worth and three blocks, then writes of 1, 2,
    /// 3, ... blocks, so one frame can lie in one write and others span several.
    fn chunks(n: usize) -> Arc<BatchChunks> {
        let data: Vec<u8> = (0..n * BLOCK_SIZE).map(|i| (i / 97 % 253) as u8).collect();
        let data = Bytes::from(data);
        let mut chunks = BatchChunks::default();
        let (mut block, mut write_blocks) = (0, MAX_FRAME_BLOCKS + 3);
        while block < n {
            let end = (block + write_blocks).min(n);
            let write = data.slice(block * BLOCK_SIZE..end * BLOCK_SIZE);
            let hashes: Vec<_> = write
                .chunks(BLOCK_SIZE)
                .map(ChunkHash::of)
                .enumerate()
                .map(|(k, hash)| (k * BLOCK_SIZE, hash))
                .collect();
            chunks.add_write(write, hashes);
            write_blocks = if block == 0 { 1 } else { write_blocks + 1 };
            block = end;
        }
        Arc::new(chunks)
    }

    #[test]
    fn a_frames_blocks_come_as_the_runs_of_the_writes_they_lie_in() {
        let n = MAX_FRAME_BLOCKS + 10;
        let all = chunks(n);
        let data: Vec<u8> = (0..n * BLOCK_SIZE).map(|i| (i / 97 % 253) as u8).collect();
        let blocks_of = |group: &[u32]| -> Vec<u8> {
            group
                .iter()
                .flat_map(|&i| data[i as usize * BLOCK_SIZE..][..BLOCK_SIZE].to_vec())
                .collect()
        };
        let run_blocks = |group: &[u32]| -> Vec<usize> {
            all.runs(group)
                .iter()
                .map(|r| r.len() / BLOCK_SIZE)
                .collect()
        };
        let first: Vec<u32> = (0..MAX_FRAME_BLOCKS as u32).collect();
        assert_eq!(
            run_blocks(&first),
            [MAX_FRAME_BLOCKS],
            "within the first write"
        );
        // The first write ends 3 blocks past a frame, the next is one block, then two.
        let across: Vec<u32> = (10..MAX_FRAME_BLOCKS as u32 + 5).collect();
        assert_eq!(run_blocks(&across), [MAX_FRAME_BLOCKS - 7, 1, 1]);
        assert_eq!(run_blocks(&[0, 2]), [1, 1], "skips a block");
        assert_eq!(run_blocks(&[1, 0]), [1, 1], "out of order");
        for group in [&first[..], &across[..], &[0, 2], &[1, 0]] {
            assert_eq!(all.runs(group).concat(), blocks_of(group));
        }
    }

    /// The hashes of frame `f`, once it opened and verified against them.
    fn opened(f: &v1::Frame) -> Vec<ChunkHash> {
        let hashes: Vec<ChunkHash> = f
            .hashes
            .iter()
            .map(|h| ChunkHash::from_slice(h).unwrap())
            .collect();
        let data = frame::open(&f.zstd_data, &hashes).expect("frame opens and verifies");
        assert_eq!(data.len(), hashes.len() * BLOCK_SIZE);
        hashes
    }

    #[test]
    fn frames_hold_the_missing_chunks_in_order_whether_consecutive_or_not() {
        let all = chunks(3 * MAX_FRAME_BLOCKS + 5);
        let mut missing: Vec<u32> = (0..(2 * MAX_FRAME_BLOCKS) as u32).collect();
        missing.extend([700, 702, 703, 771]);
        let made = frames(all.clone(), &missing, DEFAULT_ZSTD_LEVEL);
        assert_eq!(made.len(), 3);
        let seen: Vec<ChunkHash> = made.iter().flat_map(opened).collect();
        let expected: Vec<ChunkHash> = missing.iter().map(|&i| all.hashes[i as usize]).collect();
        assert_eq!(seen, expected);
        assert!(frames(chunks(1), &[], DEFAULT_ZSTD_LEVEL).is_empty());
    }

    #[test]
    fn frames_are_compressed_at_the_level_given() {
        let all = chunks(2 * MAX_FRAME_BLOCKS);
        let missing: Vec<u32> = (0..all.hashes().len() as u32).collect();
        let bytes_at = |level| -> usize {
            let made = frames(all.clone(), &missing, level);
            made.iter()
                .map(|f| {
                    opened(f);
                    f.zstd_data.len()
                })
                .sum()
        };
        let (fastest, default, strong) =
            (bytes_at(-100), bytes_at(DEFAULT_ZSTD_LEVEL), bytes_at(9));
        assert!(
            fastest > default && default > strong,
            "bytes at level -100, {DEFAULT_ZSTD_LEVEL} and 9: {fastest}, {default}, {strong}"
        );
    }
}
