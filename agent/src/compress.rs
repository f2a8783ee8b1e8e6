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
use tideline_core::frame::{self, DEFAULT_ZSTD_LEVEL, MAX_FRAME_BLOCKS};
use tideline_core::{ChunkHash, BLOCK_SIZE};
use tideline_proto::v1;

/// Jobs waiting for a compression thread, per thread.
const QUEUED_PER_THREAD: usize = 4;

/// A batch's unique chunks: hashes in first-seen order and their bytes, one block each.
pub struct BatchChunks {
    pub hashes: Vec<ChunkHash>,
    pub data: Vec<u8>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Compresses the chunks at `missing` (indexes into `chunks`) into frames of up to
/// [`MAX_FRAME_BLOCKS`] blocks, in order, using every core.
pub fn frames(chunks: Arc<BatchChunks>, missing: &[u32]) -> Vec<v1::Frame> {
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
                let _ = done.send(compress_share(&chunks, &share));
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
fn compress_share(chunks: &BatchChunks, share: &[u32]) -> Vec<v1::Frame> {
    share
        .chunks(MAX_FRAME_BLOCKS)
        .map(|group| compress_frame(chunks, group))
        .collect()
}

/// One frame of the chunks `chunks.hashes[i]` for `i` in `group`.
fn compress_frame(chunks: &BatchChunks, group: &[u32]) -> v1::Frame {
    let block = |i: u32| &chunks.data[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
    let hashes =
        tideline_proto::wire_hashes(group.iter().map(|&i| Some(&chunks.hashes[i as usize])));
    // Chunks the collector lacks are usually consecutive: compress them where they lie.
    let consecutive = group.windows(2).all(|w| w[1] == w[0] + 1);
    let zstd_data = match (group.first(), consecutive) {
        (Some(&first), true) => {
            let start = first as usize * BLOCK_SIZE;
            frame::compress(
                &chunks.data[start..start + group.len() * BLOCK_SIZE],
                DEFAULT_ZSTD_LEVEL,
            )
        }
        _ => {
            // Block by block: collecting the bytes one at a time was 4 % of an ingest's CPU.
            let mut raw = Vec::with_capacity(group.len() * BLOCK_SIZE);
            group.iter().for_each(|&i| raw.extend_from_slice(block(i)));
            frame::compress(&raw, DEFAULT_ZSTD_LEVEL)
        }
    };
    v1::Frame {
        hashes,
        zstd_data: Bytes::from(zstd_data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize) -> Arc<BatchChunks> {
        let data: Vec<u8> = (0..n * BLOCK_SIZE).map(|i| (i / 97 % 253) as u8).collect();
        let hashes = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
        Arc::new(BatchChunks { hashes, data })
    }

    #[test]
    fn frames_hold_the_missing_chunks_in_order_whether_consecutive_or_not() {
        let all = chunks(3 * MAX_FRAME_BLOCKS + 5);
        let mut missing: Vec<u32> = (0..(2 * MAX_FRAME_BLOCKS) as u32).collect();
        missing.extend([700, 702, 703, 771]);
        let made = frames(all.clone(), &missing);
        assert_eq!(made.len(), 3);
        let mut seen = Vec::new();
        for f in &made {
            let hashes: Vec<ChunkHash> = f
                .hashes
                .iter()
                .map(|h| ChunkHash::from_slice(h).unwrap())
                .collect();
            let data = frame::open(&f.zstd_data, &hashes).expect("frame opens and verifies");
            assert_eq!(data.len(), hashes.len() * BLOCK_SIZE);
            seen.extend(hashes);
        }
        let expected: Vec<ChunkHash> = missing.iter().map(|&i| all.hashes[i as usize]).collect();
        assert_eq!(seen, expected);
        assert!(frames(chunks(1), &[]).is_empty());
    }
}
