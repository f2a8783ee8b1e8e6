//! Persistent dirty-block map: which blocks of a volume the journal does not account for.
//!
//! Two situations leave blocks unjournalled: a volume that already held data when protection
//! started (its allocated extents need a *baseline*), and a spool that filled up while the
//! collector was unreachable (writes go on, the journal has a gap). In both the agent marks the
//! blocks here and a resync later reads them back from the volume and journals them. The map
//! is a memory-mapped file, one bit per 4 KiB block (32 KiB per GiB), so setting a bit costs a
//! memory write and survives the agent being killed; [`DirtyMap::flush`] makes it durable
//! against power loss and is called on every client flush.
//!
//! Layout: a 4096-byte header (`TLDIRTY1`, u8 state, u64 block count, little-endian) followed by
//! the bitmap. State `PENDING` means "a resync must run and end with a `Complete` record",
//! which is what tells a restart to finish an interrupted baseline even if no bit is left set.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use memmap2::MmapMut;

const MAGIC: &[u8; 8] = b"TLDIRTY1";
const HEADER_BYTES: usize = 4096;
const STATE_AT: usize = 8;
const BLOCKS_AT: usize = 9;
const STATE_CLEAN: u8 = 0;
const STATE_PENDING: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DirtyMapError {
    #[error("dirty map {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("dirty map {path} is not a Tideline dirty map or is for a volume of {found} blocks (expected {expected}); move it aside to force a full resync")]
    Mismatch {
        path: String,
        found: u64,
        expected: u64,
    },
}

pub struct DirtyMap {
    map: MmapMut,
    block_count: u64,
    /// Lowest block index that may still be dirty: makes repeated scans cheap.
    scan_from: u64,
}

/// Whether [`DirtyMap::open`] created the file (a volume never protected before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    Existing,
}

impl DirtyMap {
    pub fn open(path: &Path, block_count: u64) -> Result<(DirtyMap, Opened), DirtyMapError> {
        let shown = path.display().to_string();
        let io_err = |source| DirtyMapError::Io {
            path: shown.clone(),
            source,
        };
        let opened = if path.exists() {
            Opened::Existing
        } else {
            Opened::Created
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let len = HEADER_BYTES as u64 + block_count.div_ceil(8);
        if opened == Opened::Created {
            file.set_len(len).map_err(io_err)?;
        } else if file.metadata().map_err(io_err)?.len() != len {
            return Err(DirtyMapError::Mismatch {
                path: shown,
                found: file.metadata().map(|m| m.len()).unwrap_or(0),
                expected: block_count,
            });
        }
        // SAFETY: the file is private to this agent's spool directory, opened read-write and
        // sized above; nothing else maps or truncates it while the agent runs.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io_err)?;
        if opened == Opened::Created {
            map[..8].copy_from_slice(MAGIC);
            map[BLOCKS_AT..BLOCKS_AT + 8].copy_from_slice(&block_count.to_le_bytes());
            map.flush().map_err(io_err)?;
        } else {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&map[BLOCKS_AT..BLOCKS_AT + 8]);
            let found = u64::from_le_bytes(raw);
            if &map[..8] != MAGIC || found != block_count {
                return Err(DirtyMapError::Mismatch {
                    path: shown,
                    found,
                    expected: block_count,
                });
            }
        }
        Ok((
            DirtyMap {
                map,
                block_count,
                scan_from: 0,
            },
            opened,
        ))
    }

    pub fn resync_pending(&self) -> bool {
        self.map[STATE_AT] == STATE_PENDING
    }

    pub fn set_resync_pending(&mut self, pending: bool) {
        self.map[STATE_AT] = if pending { STATE_PENDING } else { STATE_CLEAN };
    }

    /// Marks blocks `[first, first + count)` dirty (clamped to the volume).
    pub fn mark(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.block_count);
        for block in first..end {
            self.map[HEADER_BYTES + (block / 8) as usize] |= 1 << (block % 8);
        }
        self.scan_from = self.scan_from.min(first);
    }

    fn is_set(&self, block: u64) -> bool {
        self.map[HEADER_BYTES + (block / 8) as usize] & (1 << (block % 8)) != 0
    }

    /// The first run of dirty blocks, at most `max_blocks` long, as `(first, count)`.
    pub fn first_run(&mut self, max_blocks: u64) -> Option<(u64, u64)> {
        let mut block = self.scan_from;
        while block < self.block_count {
            let byte = self.map[HEADER_BYTES + (block / 8) as usize];
            if byte == 0 && block.is_multiple_of(8) {
                block += 8;
                continue;
            }
            if self.is_set(block) {
                self.scan_from = block;
                let mut end = block + 1;
                while end < self.block_count && end - block < max_blocks && self.is_set(end) {
                    end += 1;
                }
                return Some((block, end - block));
            }
            block += 1;
        }
        self.scan_from = self.block_count;
        None
    }

    /// Clears blocks `[first, first + count)`.
    pub fn clear(&mut self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.block_count);
        for block in first..end {
            self.map[HEADER_BYTES + (block / 8) as usize] &= !(1 << (block % 8));
        }
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.map[HEADER_BYTES..]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    /// Makes the map durable (msync).
    pub fn flush(&self) -> io::Result<()> {
        self.map.flush()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mark_scan_clear_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.dirty");
        let (mut map, opened) = DirtyMap::open(&path, 100).unwrap();
        assert_eq!(opened, Opened::Created);
        assert_eq!(map.first_run(10), None);
        map.mark(5, 20);
        map.mark(90, 50);
        map.set_resync_pending(true);
        assert_eq!(map.dirty_blocks(), 30);
        assert_eq!(map.first_run(8), Some((5, 8)));
        map.clear(5, 8);
        assert_eq!(map.first_run(100), Some((13, 12)));
        map.flush().unwrap();
        drop(map);

        let (mut map, opened) = DirtyMap::open(&path, 100).unwrap();
        assert_eq!(opened, Opened::Existing);
        assert!(map.resync_pending());
        assert_eq!(map.first_run(100), Some((13, 12)));
        map.clear(13, 12);
        assert_eq!(map.first_run(100), Some((90, 10)));
        assert!(DirtyMap::open(&path, 101).is_err());
    }
}
