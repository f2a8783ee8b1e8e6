//! Compressed frames: many blocks compressed together with zstd.
//!
//! Compressing one 4 KiB block at a time costs about a third of zstd's speed and a tenth of its
//! ratio on filesystem data (see REFERENCES), so the shipper batches the blocks the collector
//! lacks into frames of up to [`MAX_FRAME_BLOCKS`] blocks, and the collector stores frames as
//! they arrive. Blocks that barely compress go into the frame stored, as raw zstd blocks. A
//! frame is always checked against the hashes that name its blocks.

use crate::types::{ChunkHash, BLOCK_SIZE};
use std::cell::RefCell;

/// Most blocks in one frame (1 MiB of uncompressed data).
pub const MAX_FRAME_BLOCKS: usize = 256;
/// zstd level used on the write path. Level -1 (zstd's `--fast=1`) against level 1 on an ext4
/// image of system files, 1 MiB frames, one core: compression 469 → 616 MB/s and
/// decompression 1.5 → 1.95 GB/s, for frames about 11 % larger. Every stage of ingest and
/// restore runs on the same two cores as the volume's own I/O, so the CPU is worth more than
/// the bytes; stored bytes stay well under restic's for the same history (benches/README.md).
pub const DEFAULT_ZSTD_LEVEL: i32 = -1;

/// The zstd levels [`compress`] takes.
pub fn compression_levels() -> std::ops::RangeInclusive<i32> {
    zstd::compression_level_range()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame names {0} blocks; between 1 and {MAX_FRAME_BLOCKS} are allowed")]
    BadBlockCount(usize),
    #[error("frame does not decompress: {0}")]
    Undecodable(String),
    #[error("frame decompresses to {actual} bytes, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("block {index} of the frame does not match its hash {expected}")]
    HashMismatch { index: usize, expected: ChunkHash },
}

thread_local! {
    /// One zstd context per thread, kept between frames: building a fresh one for every 1 MiB
    /// frame (tables allocated and cleared) cost about 4 % of compression on ext4 data.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses whole blocks into one frame.
pub fn compress(blocks: &[u8], level: i32) -> Vec<u8> {
    compress_pieces(&[blocks], level)
}

/// Compresses whole blocks lying in `pieces`, in order, into one frame without gathering them
/// first: each piece becomes a zstd frame of its own and they are concatenated, which zstd's
/// decoder reads as one stream. Worth it for pieces of tens of KiB and more; small ones
/// compress better gathered. A piece of [`MIN_PROBED_PIECE_BYTES`] or more whose first
/// [`PROBE_BYTES`], and two samples further in, each save less than an eighth has the rest
/// stored, not compressed (see `worth_compressing` and `samples_compress`).
pub fn compress_pieces(pieces: &[&[u8]], level: i32) -> Vec<u8> {
    debug_assert!(pieces.iter().all(|p| p.len() % BLOCK_SIZE == 0));
    COMPRESSOR
        .with_borrow_mut(|slot| {
            let mut context = match slot.take() {
                Some((at, context)) if at == level => context,
                _ => compressor(level)?,
            };
            let frame = compress_each(&mut context, pieces);
            *slot = Some((level, context));
            frame
        })
        .ok()
        // Compressing an in-memory slice cannot fail for a valid level; fall back to level 1.
        .or_else(|| {
            let mut context = compressor(1).ok()?;
            compress_each(&mut context, pieces).ok()
        })
        .unwrap_or_default()
}

/// A zstd context for `level` that compresses a piece, or a small frame, the way it would a
/// whole frame.
///
/// zstd picks its parameters by the size of the input, and a piece of 256 KiB or less (what
/// nbdcopy, and most of the history benchmark's writes, bring) gets a table for small inputs:
/// at the fast levels the same parameters but for a minimum match of 5 bytes instead of 6 at
/// level -1 and below, and 6 instead of 7 at level 1. Shorter matches mean more sequences,
/// slower both ways: `zstd -b --fast=1` on 256 MiB of the ext4 image in 256 KiB blocks
/// compressed at 380-385 MB/s and decompressed at 1167-1227, against 417-421 and 1380 with
/// the minimum match set to 6, for 4.5 % more bytes (2026-12-07). So the fast levels keep the
/// minimum match of a large input, and a frame's speed no longer depends on how its writer
/// cut it up. Higher levels differ by more than that between the tables and are left to zstd.
fn compressor(level: i32) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    let mut context = zstd::bulk::Compressor::new(level)?;
    if let Some(bytes) = large_input_min_match(level) {
        context.set_parameter(zstd::zstd_safe::CParameter::MinMatch(bytes))?;
    }
    Ok(context)
}

/// The minimum match zstd uses at `level` for inputs over 256 KiB, for the fast levels whose
/// small-input parameters differ from it in that alone (zstd's `clevels.h`).
fn large_input_min_match(level: i32) -> Option<u32> {
    match level {
        ..=-1 => Some(6),
        1 => Some(7),
        _ => None,
    }
}

/// Bytes at the start of a piece that are compressed to see whether the rest is worth it.
pub const PROBE_BYTES: usize = 16 * BLOCK_SIZE;

/// Smallest piece that is probed. The probe and the samples are zstd frames of their own, each
/// with its tables set up afresh: on nbdcopy's 256 KiB writes of random data, probing every
/// piece made a 2 GiB ingest about 1.1 s slower (durable after 10.73 and 11.02 s against 9.51
/// and 9.95), where zstd alone already gets through such data at 1.87 GB/s.
pub const MIN_PROBED_PIECE_BYTES: usize = 8 * PROBE_BYTES;

/// Whether data that compressed from `raw` to `compressed` bytes saved enough to compress more
/// like it: at least an eighth, the rule ZFS applies to its blocks. Data that saves less costs
/// nearly as much to compress as data that compresses well (fio's default buffers, which save
/// 9.5 %, went through zstd level -1 at 527 MB/s on one core), and every receiver decompresses
/// it again, while a stored block only costs a copy.
fn worth_compressing(compressed: usize, raw: usize) -> bool {
    compressed * 8 <= raw * 7
}

fn compress_each(
    context: &mut zstd::bulk::Compressor<'static>,
    pieces: &[&[u8]],
) -> std::io::Result<Vec<u8>> {
    // Room for the worst case up front, so no piece's append moves the pieces before it.
    let mut out = Vec::with_capacity(pieces.iter().map(|p| piece_bound(p.len())).sum());
    for piece in pieces {
        if piece.len() < MIN_PROBED_PIECE_BYTES {
            append_compressed(context, piece, &mut out)?;
            continue;
        }
        let (probe, rest) = piece.split_at(PROBE_BYTES);
        let start = out.len();
        append_compressed(context, probe, &mut out)?;
        if worth_compressing(out.len() - start, probe.len()) || samples_compress(context, rest)? {
            append_compressed(context, rest, &mut out)?;
        } else {
            append_stored(rest, &mut out);
        }
    }
    Ok(out)
}

/// Most bytes [`compress_each`] appends for a piece of `len` bytes: a probed piece is two zstd
/// frames, the probe's and the rest's (a stored rest is smaller than a compressed one's bound).
fn piece_bound(len: usize) -> usize {
    let bound = zstd::zstd_safe::compress_bound;
    if len < MIN_PROBED_PIECE_BYTES {
        bound(len)
    } else {
        bound(PROBE_BYTES) + bound(len - PROBE_BYTES)
    }
}

/// Whether either of two [`PROBE_BYTES`] samples of `rest`, a third and two thirds of the way
/// in, is worth compressing. The start of a frame does not speak for all of it: of 606 1 MiB
/// pieces of the ext4 image's data, 27 began with 64 KiB that did not compress by an eighth.
/// Sixteen of those compress to 30-87 % as a whole, and a sample finds each of them; the
/// eleven it does not find would have compressed to 94 % or more.
fn samples_compress(
    context: &mut zstd::bulk::Compressor<'static>,
    rest: &[u8],
) -> std::io::Result<bool> {
    let mut scratch = Vec::new();
    for third in [1, 2] {
        let at = (rest.len() * third / 3 / BLOCK_SIZE * BLOCK_SIZE).min(rest.len() - PROBE_BYTES);
        scratch.clear();
        append_compressed(context, &rest[at..at + PROBE_BYTES], &mut scratch)?;
        if worth_compressing(scratch.len(), PROBE_BYTES) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Appends `data` to `out` as one compressed zstd frame.
fn append_compressed(
    context: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    let start = out.len();
    context.compress_to_buffer(data, &mut SpareTail { vec: out, start })?;
    Ok(())
}

/// Largest block of a zstd frame (RFC 8878, `Block_Maximum_Size`).
const ZSTD_MAX_BLOCK_BYTES: usize = 128 << 10;

/// Appends `data` (at most 4 GiB) to `out` as one zstd frame of raw blocks (RFC 8878 3.1.1):
/// the magic number; a frame header descriptor saying single segment, with the content size
/// in 4 bytes; that size; then blocks of at most 128 KiB, each a 3-byte little-endian header
/// (last-block bit, block type 0 for raw, the size shifted left by 3) and its bytes as they are.
fn append_stored(data: &[u8], out: &mut Vec<u8>) {
    const MAGIC: u32 = 0xFD2F_B528;
    const SINGLE_SEGMENT_CONTENT_SIZE_4: u8 = 0b1010_0000;
    debug_assert!(!data.is_empty() && u32::try_from(data.len()).is_ok());
    let blocks = data.len().div_ceil(ZSTD_MAX_BLOCK_BYTES);
    out.reserve(4 + 1 + 4 + 3 * blocks + data.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(SINGLE_SEGMENT_CONTENT_SIZE_4);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for (i, block) in data.chunks(ZSTD_MAX_BLOCK_BYTES).enumerate() {
        let last = u32::from(i + 1 == blocks);
        let header = last | (block.len() as u32) << 3;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(block);
    }
}

/// The room after a vector's bytes, for zstd to append a frame to them (its `Vec` buffer
/// writes from the start, over what is there).
struct SpareTail<'v> {
    vec: &'v mut Vec<u8>,
    start: usize,
}

// SAFETY: the slice and pointer cover the vector's memory from `start` on, `capacity` is what
// is allocated past `start`, and `filled_until` sets the length to `start + n` only for bytes
// zstd reports as written there.
unsafe impl zstd::zstd_safe::WriteBuf for SpareTail<'_> {
    fn as_slice(&self) -> &[u8] {
        &self.vec[self.start..]
    }

    fn capacity(&self) -> usize {
        self.vec.capacity() - self.start
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `start` is at most the vector's length, so within its allocation.
        unsafe { self.vec.as_mut_ptr().add(self.start) }
    }

    unsafe fn filled_until(&mut self, n: usize) {
        // SAFETY: the caller vouches that the `n` bytes from `start` are written, and they lie
        // within the capacity.
        unsafe { self.vec.set_len(self.start + n) };
    }
}

/// Decompresses a frame that should hold exactly `block_count` blocks, allocating no more.
pub fn decompress(compressed: &[u8], block_count: usize) -> Result<Vec<u8>, FrameError> {
    let expected = expected_bytes(block_count)?;
    let data = with_decompressor(|context| context.decompress(compressed, expected))?;
    check_length(expected, data.len())?;
    Ok(data)
}

/// Decompresses a frame into `out`, which it must fill exactly: `out` is as long as the frame's
/// blocks. For callers that keep their buffers (aligned for direct I/O, say) between frames.
pub fn decompress_into(compressed: &[u8], out: &mut [u8]) -> Result<(), FrameError> {
    let expected = expected_bytes(out.len() / BLOCK_SIZE)?;
    check_length(expected, out.len())?;
    let actual = with_decompressor(|context| context.decompress_to_buffer(compressed, out))?;
    check_length(expected, actual)
}

/// The bytes of a frame of `block_count` blocks, if that count is allowed.
fn expected_bytes(block_count: usize) -> Result<usize, FrameError> {
    if block_count == 0 || block_count > MAX_FRAME_BLOCKS {
        return Err(FrameError::BadBlockCount(block_count));
    }
    Ok(block_count * BLOCK_SIZE)
}

fn check_length(expected: usize, actual: usize) -> Result<(), FrameError> {
    if actual != expected {
        return Err(FrameError::WrongLength { expected, actual });
    }
    Ok(())
}

/// Runs `decompress` with this thread's zstd context.
fn with_decompressor<T>(
    decompress: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> Result<T, FrameError> {
    DECOMPRESSOR
        .with_borrow_mut(|slot| {
            let mut context = match slot.take() {
                Some(context) => context,
                None => zstd::bulk::Decompressor::new()?,
            };
            let result = decompress(&mut context);
            *slot = Some(context);
            result
        })
        .map_err(|e| FrameError::Undecodable(e.to_string()))
}

/// Checks that block `i` of `data` hashes to `hashes[i]`, for every block.
pub fn verify(hashes: &[ChunkHash], data: &[u8]) -> Result<(), FrameError> {
    if data.len() != hashes.len() * BLOCK_SIZE {
        return Err(FrameError::WrongLength {
            expected: hashes.len() * BLOCK_SIZE,
            actual: data.len(),
        });
    }
    let actual = crate::block::hash_blocks(data);
    for (index, (expected, actual)) in hashes.iter().zip(&actual).enumerate() {
        if actual != expected {
            return Err(FrameError::HashMismatch {
                index,
                expected: *expected,
            });
        }
    }
    Ok(())
}

/// Decompresses and verifies a frame in one step: what a receiver does with untrusted bytes.
pub fn open(compressed: &[u8], hashes: &[ChunkHash]) -> Result<Vec<u8>, FrameError> {
    let data = decompress(compressed, hashes.len())?;
    verify(hashes, &data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_testkit::{noise_bytes, text_bytes};

    #[test]
    fn blocks_compressed_in_pieces_come_back_as_one_frame() {
        let blocks: Vec<u8> = (0..40 * BLOCK_SIZE)
            .map(|i| (i * 7 / 4096 % 251) as u8)
            .collect();
        let (a, rest) = blocks.split_at(16 * BLOCK_SIZE);
        let (b, c) = rest.split_at(BLOCK_SIZE);
        let frame = compress_pieces(&[a, b, c], -1);
        assert_eq!(decompress(&frame, 40).unwrap(), blocks);
        let mut out = vec![0u8; blocks.len()];
        decompress_into(&frame, &mut out).unwrap();
        assert_eq!(out, blocks);
        // The pieces are whole frames one after another, not one frame of all of them.
        assert_ne!(frame, compress(&blocks, -1));
    }

    #[test]
    fn a_piece_of_a_small_write_is_compressed_as_a_whole_frame_would_be() {
        // 256 KiB of text: zstd alone takes its small-input table for it.
        let piece = text_bytes(1, 64 * BLOCK_SIZE);
        // 512 KiB: zstd's own large-input parameters, which the context must not change.
        let large = text_bytes(2, 128 * BLOCK_SIZE);
        for level in [DEFAULT_ZSTD_LEVEL, -5, 1] {
            let mut context = compressor(level).unwrap();
            assert_eq!(
                context.compress(&large).unwrap(),
                zstd::bulk::compress(&large, level).unwrap(),
                "level {level}: not zstd's own minimum match for a large input"
            );
            let frame = compress(&piece, level);
            assert_ne!(
                frame,
                zstd::bulk::compress(&piece, level).unwrap(),
                "level {level}: the piece got zstd's small-input parameters"
            );
            assert_eq!(decompress(&frame, 64).unwrap(), piece);
        }
        // Other levels are zstd's own.
        assert_eq!(
            compress(&piece, 3),
            zstd::bulk::compress(&piece, 3).unwrap()
        );
    }

    #[test]
    fn stored_frames_decode_as_zstd_whatever_their_length() {
        for len in [1, 4096, 128 << 10, (128 << 10) + 4096, 960 << 10, 1 << 20] {
            let data = noise_bytes(len as u64, len);
            let mut frame = Vec::new();
            append_stored(&data, &mut frame);
            let blocks = len.div_ceil(ZSTD_MAX_BLOCK_BYTES);
            assert_eq!(frame.len(), 9 + 3 * blocks + len, "{len} bytes");
            assert_eq!(zstd::bulk::decompress(&frame, len).unwrap(), data, "{len}");
        }
    }

    #[test]
    fn a_piece_that_does_not_compress_is_stored_after_its_probe() {
        let data = noise_bytes(7, MAX_FRAME_BLOCKS * BLOCK_SIZE);
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL);
        assert_eq!(decompress(&frame, MAX_FRAME_BLOCKS).unwrap(), data);
        // The probe, compressed, then the rest as a stored frame of its own (zstd alone would
        // also keep noise in raw blocks, but inside one frame with the probe).
        assert!(frame.ends_with(&stored(&data[PROBE_BYTES..])));
    }

    #[test]
    fn a_piece_that_compresses_is_compressed_throughout() {
        let data = blocks(MAX_FRAME_BLOCKS);
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL);
        assert_eq!(decompress(&frame, MAX_FRAME_BLOCKS).unwrap(), data);
        assert!(frame.len() < data.len() / 8, "{} bytes", frame.len());
        // Compressible data after an incompressible probe: the samples further in speak for it.
        let mut mixed = noise_bytes(3, PROBE_BYTES);
        mixed.extend_from_slice(&data[PROBE_BYTES..]);
        let frame = compress(&mixed, DEFAULT_ZSTD_LEVEL);
        assert_eq!(decompress(&frame, MAX_FRAME_BLOCKS).unwrap(), mixed);
        assert!(
            frame.len() < PROBE_BYTES + mixed.len() / 8,
            "{} bytes",
            frame.len()
        );
        // Incompressible but for the last sixth, which no sample reaches: stored.
        let tail = data.len() - data.len() / 6 / BLOCK_SIZE * BLOCK_SIZE;
        let mut mostly_noise = noise_bytes(5, tail);
        mostly_noise.extend_from_slice(&data[tail..]);
        let frame = compress(&mostly_noise, DEFAULT_ZSTD_LEVEL);
        assert_eq!(decompress(&frame, MAX_FRAME_BLOCKS).unwrap(), mostly_noise);
        assert!(frame.ends_with(&stored(&mostly_noise[PROBE_BYTES..])));
    }

    fn stored(data: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        append_stored(data, &mut frame);
        frame
    }

    #[test]
    fn every_piece_fits_the_room_reserved_up_front() {
        for (data, pieces) in [
            (noise_bytes(9, 1 << 20), vec![1 << 20]),
            (blocks(256), vec![1 << 20]),
            (noise_bytes(9, 1 << 20), vec![256 << 10; 4]),
            (
                noise_bytes(9, 1 << 20),
                vec![512 << 10, 4096, (512 << 10) - 4096],
            ),
        ] {
            let mut rest = &data[..];
            let pieces: Vec<&[u8]> = pieces
                .iter()
                .map(|&len| {
                    let (piece, later) = rest.split_at(len);
                    rest = later;
                    piece
                })
                .collect();
            let frame = compress_pieces(&pieces, DEFAULT_ZSTD_LEVEL);
            let room: usize = pieces.iter().map(|p| piece_bound(p.len())).sum();
            assert!(frame.len() <= room && frame.capacity() == room);
            assert_eq!(decompress(&frame, MAX_FRAME_BLOCKS).unwrap(), data);
        }
    }

    #[test]
    fn compressing_is_worth_it_from_an_eighth_saved() {
        assert!(worth_compressing(56, 64));
        assert!(!worth_compressing(57, 64));
        assert!(worth_compressing(0, 64));
    }

    fn blocks(n: usize) -> Vec<u8> {
        (0..n * BLOCK_SIZE).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn round_trip_and_verify() {
        let data = blocks(3);
        let hashes: Vec<_> = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL);
        assert!(frame.len() < data.len());
        assert_eq!(open(&frame, &hashes).unwrap(), data);
    }

    #[test]
    fn lies_are_caught() {
        let data = blocks(2);
        let mut hashes: Vec<_> = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL);
        hashes[1] = ChunkHash::of(b"something else");
        assert!(matches!(
            open(&frame, &hashes),
            Err(FrameError::HashMismatch { index: 1, .. })
        ));
        assert!(matches!(
            open(&frame, &hashes[..1]),
            Err(FrameError::Undecodable(_))
        ));
        assert!(open(b"not zstd at all", &hashes).is_err());
        assert_eq!(decompress(&frame, 0), Err(FrameError::BadBlockCount(0)));
    }

    #[test]
    fn decompress_into_fills_the_buffer_exactly_or_says_why_not() {
        let data = blocks(3);
        let frame = compress(&data, DEFAULT_ZSTD_LEVEL);
        let mut out = vec![0u8; data.len()];
        decompress_into(&frame, &mut out).unwrap();
        assert!(out == data);
        let mut short = vec![0u8; 2 * BLOCK_SIZE];
        assert!(matches!(
            decompress_into(&frame, &mut short),
            Err(FrameError::Undecodable(_))
        ));
        let mut long = vec![0u8; 4 * BLOCK_SIZE];
        assert_eq!(
            decompress_into(&frame, &mut long),
            Err(FrameError::WrongLength {
                expected: 4 * BLOCK_SIZE,
                actual: 3 * BLOCK_SIZE
            })
        );
        let mut ragged = vec![0u8; 3 * BLOCK_SIZE + 1];
        assert!(matches!(
            decompress_into(&frame, &mut ragged),
            Err(FrameError::WrongLength { .. })
        ));
        assert_eq!(
            decompress_into(&frame, &mut []),
            Err(FrameError::BadBlockCount(0))
        );
    }
}
