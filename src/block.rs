//! Splitting data into journal blocks, hashing them and spotting the all-zero block.
//!
//! The all-zero block is never hashed into the store: it is represented as `None` wherever a
//! block's chunk is named, and a restore leaves a hole for it.

use crate::types::{ChunkHash, BLOCK_SIZE};

/// True when every byte of `data` is zero. Reads 16-byte words; the compiler vectorises it.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let tail = words.remainder();
    words
        .map(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])))
        .fold(0u128, |acc, w| acc | w)
        == 0
        && tail.iter().all(|&b| b == 0)
}

/// The chunk naming one block's bytes, or `None` for the all-zero block.
pub fn chunk_of(block: &[u8]) -> Option<ChunkHash> {
    if is_zero(block) {
        None
    } else {
        Some(ChunkHash::of(block))
    }
}

/// Chunks of every [`BLOCK_SIZE`] block of `data` (a shorter last block is hashed as it is),
/// the non-zero blocks hashed side by side ([`hash_each`]).
pub fn chunks_of(data: &[u8]) -> Vec<Option<ChunkHash>> {
    let (whole, tail) = data.as_chunks::<BLOCK_SIZE>();
    let blocks: Vec<(&[u8; BLOCK_SIZE], bool)> = whole.iter().map(|b| (b, is_zero(b))).collect();
    let non_zero: Vec<&[u8; BLOCK_SIZE]> = blocks
        .iter()
        .filter(|(_, zero)| !zero)
        .map(|(b, _)| *b)
        .collect();
    let mut hashes = hash_each(&non_zero).into_iter();
    let mut chunks: Vec<Option<ChunkHash>> = blocks
        .iter()
        .map(|(_, zero)| if *zero { None } else { hashes.next() })
        .collect();
    if !tail.is_empty() {
        chunks.push(chunk_of(tail));
    }
    chunks
}

/// The hashes of `blocks`, in order, several blocks at a time.
///
/// BLAKE3 hashes a 4 KiB block as four 1 KiB chunks, which it compresses side by side in SIMD
/// lanes; with AVX-512 there are sixteen lanes, so hashing one block at a time leaves three
/// quarters of them idle. This hashes the same chunk of up to sixteen blocks at once, then
/// their parent nodes and roots the same way, and gives exactly `blake3::hash` of each block
/// (the tests compare them).
pub fn hash_each(blocks: &[&[u8; BLOCK_SIZE]]) -> Vec<ChunkHash> {
    let platform = blake3::platform::Platform::detect();
    let mut hashes = Vec::with_capacity(blocks.len());
    for group in blocks.chunks(LANES) {
        hash_group(platform, group, &mut hashes);
    }
    hashes
}

/// The hashes of the [`BLOCK_SIZE`] blocks of `data`, whose length must be a multiple of it.
pub fn hash_blocks(data: &[u8]) -> Vec<ChunkHash> {
    debug_assert_eq!(data.len() % BLOCK_SIZE, 0);
    let blocks: Vec<&[u8; BLOCK_SIZE]> = data.as_chunks::<BLOCK_SIZE>().0.iter().collect();
    hash_each(&blocks)
}

/// Blocks hashed side by side: the most lanes any SIMD implementation of BLAKE3 has.
const LANES: usize = 16;
/// BLAKE3's chunk, and the chunks of a block.
const CHUNK_LEN: usize = 1024;
const CHUNKS: usize = BLOCK_SIZE / CHUNK_LEN;
/// Bytes of a chaining value, and of a parent node's input (two of them).
const CV_LEN: usize = 32;
const PARENT_LEN: usize = 2 * CV_LEN;
/// Domain flags and initial vector from the BLAKE3 specification (sections 2.1 and 2.2).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];

/// Hashes up to [`LANES`] blocks. A block's tree is `root(parent(c0, c1), parent(c2, c3))`
/// over its four chunks `c0..c3`, chunk `k` compressed with counter `k`.
fn hash_group(
    platform: blake3::platform::Platform,
    group: &[&[u8; BLOCK_SIZE]],
    hashes: &mut Vec<ChunkHash>,
) {
    use blake3::IncrementCounter::No;
    let n = group.len();
    debug_assert!(n <= LANES);
    // Chaining values of chunk k of every block: chunk_cvs[k][i * CV_LEN..] for block i.
    let mut chunk_cvs = [[0u8; LANES * CV_LEN]; CHUNKS];
    for (k, cvs) in chunk_cvs.iter_mut().enumerate() {
        let mut inputs = [&[0u8; CHUNK_LEN]; LANES];
        for (input, block) in inputs.iter_mut().zip(group) {
            *input = chunk(block, k);
        }
        let (flags, counter) = (0, k as u64);
        platform.hash_many(
            &inputs[..n],
            &IV,
            counter,
            No,
            flags,
            CHUNK_START,
            CHUNK_END,
            &mut cvs[..n * CV_LEN],
        );
    }
    // The two parents of each block: chunks 0-1 and chunks 2-3.
    let mut parents = [[0u8; PARENT_LEN]; 2 * LANES];
    for i in 0..n {
        for half in 0..2 {
            let node = &mut parents[2 * i + half];
            node[..CV_LEN].copy_from_slice(cv(&chunk_cvs[2 * half], i));
            node[CV_LEN..].copy_from_slice(cv(&chunk_cvs[2 * half + 1], i));
        }
    }
    let mut parent_cvs = [0u8; 2 * LANES * CV_LEN];
    let inputs: Vec<&[u8; PARENT_LEN]> = parents[..2 * n].iter().collect();
    platform.hash_many(
        &inputs,
        &IV,
        0,
        No,
        PARENT,
        0,
        0,
        &mut parent_cvs[..2 * n * CV_LEN],
    );
    // Each block's root: its two parents' chaining values, side by side already.
    let roots: Vec<&[u8; PARENT_LEN]> = parent_cvs[..2 * n * CV_LEN]
        .as_chunks::<PARENT_LEN>()
        .0
        .iter()
        .collect();
    let mut out = [0u8; LANES * CV_LEN];
    platform.hash_many(
        &roots,
        &IV,
        0,
        No,
        PARENT | ROOT,
        0,
        0,
        &mut out[..n * CV_LEN],
    );
    hashes.extend((0..n).map(|i| ChunkHash(*cv(&out, i))));
}

/// Chunk `k` of `block`.
fn chunk(block: &[u8; BLOCK_SIZE], k: usize) -> &[u8; CHUNK_LEN] {
    &block.as_chunks::<CHUNK_LEN>().0[k]
}

/// Chaining value `i` of `cvs`.
fn cv(cvs: &[u8], i: usize) -> &[u8; CV_LEN] {
    &cvs.as_chunks::<CV_LEN>().0[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hashed_side_by_side_hash_as_blake3_hashes_each() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 41 * BLOCK_SIZE];
        rng.fill_bytes(&mut data);
        // A zero block, a block of one repeated byte, and one differing in its last byte only.
        data[3 * BLOCK_SIZE..4 * BLOCK_SIZE].fill(0);
        data[4 * BLOCK_SIZE..5 * BLOCK_SIZE].fill(0xa5);
        data[5 * BLOCK_SIZE..6 * BLOCK_SIZE].fill(0xa5);
        data[6 * BLOCK_SIZE - 1] = 0x5a;
        for count in 0..=41 {
            let part = &data[..count * BLOCK_SIZE];
            let expected: Vec<ChunkHash> = part.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
            assert_eq!(hash_blocks(part), expected, "{count} blocks");
        }
        let mut with_tail = data[..18 * BLOCK_SIZE + 100].to_vec();
        with_tail[BLOCK_SIZE..2 * BLOCK_SIZE].fill(0);
        let expected: Vec<Option<ChunkHash>> = with_tail.chunks(BLOCK_SIZE).map(chunk_of).collect();
        assert_eq!(chunks_of(&with_tail), expected);
        assert_eq!(expected[1], None);
    }

    #[test]
    fn zero_detection() {
        let mut block = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&block));
        assert_eq!(chunk_of(&block), None);
        block[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&block));
        assert_eq!(chunk_of(&block), Some(ChunkHash::of(&block)));
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
