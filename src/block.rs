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

/// Chunks of every [`BLOCK_SIZE`] block of `data`, whose length must be a multiple of it.
pub fn chunks_of(data: &[u8]) -> Vec<Option<ChunkHash>> {
    debug_assert_eq!(data.len() % BLOCK_SIZE, 0);
    data.chunks(BLOCK_SIZE).map(chunk_of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
