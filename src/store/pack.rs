//! Pack files: append-only files of compressed frames, read back with `pread` and verified.
//! Restores read the frames they need in pack order, neighbours together, several reads at once
//! and around the page cache where the filesystem allows ([`read_direct`]).
//!
//! A pack is `packs/NNNNNN.pack`. Each frame is one [`crate::framed`] entry whose body is
//!
//! ```text
//! u16 n | n x 32-byte blake3 hash | zstd bytes (n x 4096 bytes once decompressed)
//! ```
//!
//! (little-endian). A batch's frames follow one another from a block boundary, so that they go
//! to the disk in one direct write; zeros fill the gap before the next batch's boundary.
//! The catalog locates a chunk by pack id, byte offset of the frame's entry,
//! entry length and the block's index in the frame. Packs are never scanned: a chunk is only
//! ever read through a location the catalog holds, and every block read back is checked
//! against the hash it was asked for, so a damaged byte fails that one read, never the store.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::BytesMut;

use crate::direct::{self, AlignedBuf, DIRECT_ALIGN};
use crate::frame::{self, MAX_FRAME_BLOCKS};
use crate::framed::{self, ENTRY_HEADER_BYTES, ENTRY_MAGIC};
use crate::types::{ChunkHash, BLOCK_SIZE};

use super::ChunkReadError;

/// Sub-directory of the store holding the pack files.
pub const PACKS_DIR: &str = "packs";

/// Number of a pack file: `packs/000001.pack` is `PackId(1)`. Ids start at 1 and only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackId(pub u32);

impl PackId {
    pub const FIRST: PackId = PackId(1);

    /// File name inside [`PACKS_DIR`].
    pub fn file_name(self) -> String {
        format!("{:06}.pack", self.0)
    }

    /// Parses a pack file name; `None` for anything else found in the directory.
    pub fn from_file_name(name: &str) -> Option<PackId> {
        let digits = name.strip_suffix(".pack")?;
        if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(PackId)
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PACKS_DIR}/{}", self.file_name())
    }
}

/// Where one chunk lives: a block of a frame stored in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkLoc {
    pub pack: PackId,
    /// Byte offset of the frame's entry (its header) in the pack.
    pub offset: u64,
    /// Bytes of the whole entry, header included.
    pub entry_len: u32,
    /// Index of the block inside the frame.
    pub index: u16,
}

/// Bytes of frame body before the zstd data, for `block_count` blocks.
pub(crate) fn frame_header_bytes(block_count: usize) -> usize {
    2 + 32 * block_count
}

/// A frame as the pack entry that holds it: entry header, then the body
/// `u16 n | n hashes | zstd bytes`. The zstd bytes are not copied until [`FrameEntry::write_to`]
/// puts them straight into the pack's write buffer (a whole encoded entry first, then the
/// buffer, copied them twice).
pub(crate) struct FrameEntry<'a> {
    /// Entry header, block count and hashes.
    head: Vec<u8>,
    zstd_data: &'a [u8],
    block_count: u16,
}

impl<'a> FrameEntry<'a> {
    pub(crate) fn new(hashes: &[ChunkHash], zstd_data: &'a [u8]) -> FrameEntry<'a> {
        let mut head =
            Vec::with_capacity(ENTRY_HEADER_BYTES as usize + frame_header_bytes(hashes.len()));
        framed::encode_entry_head(
            &mut head,
            |out| {
                out.extend_from_slice(&(hashes.len() as u16).to_le_bytes());
                hashes
                    .iter()
                    .for_each(|hash| out.extend_from_slice(&hash.0));
            },
            zstd_data,
        );
        FrameEntry {
            head,
            zstd_data,
            block_count: hashes.len() as u16,
        }
    }

    /// Bytes of the whole entry, header included.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.zstd_data.len()
    }

    pub(crate) fn block_count(&self) -> u16 {
        self.block_count
    }

    /// Writes the entry at the start of `out`, which holds at least [`FrameEntry::len`] bytes.
    pub(crate) fn write_to(&self, out: &mut [u8]) {
        let (head, rest) = out.split_at_mut(self.head.len());
        head.copy_from_slice(&self.head);
        rest[..self.zstd_data.len()].copy_from_slice(self.zstd_data);
    }
}

/// Splits a frame body read from disk into its hashes and zstd bytes.
pub(crate) fn parse_frame_body(body: &[u8]) -> Result<(Vec<ChunkHash>, &[u8]), String> {
    let Some((count, rest)) = body.split_first_chunk::<2>() else {
        return Err("frame body is shorter than its block count".into());
    };
    let n = usize::from(u16::from_le_bytes(*count));
    if n == 0 || n > MAX_FRAME_BLOCKS {
        return Err(format!(
            "frame header names {n} blocks (1 to {MAX_FRAME_BLOCKS} allowed)"
        ));
    }
    if rest.len() < 32 * n {
        return Err(format!("frame body is too short for its {n} block hashes"));
    }
    let (raw_hashes, zstd_data) = rest.split_at(32 * n);
    let hashes = raw_hashes
        .chunks_exact(32)
        .filter_map(ChunkHash::from_slice)
        .collect();
    Ok((hashes, zstd_data))
}

/// A frame read back from a pack and decompressed, with each block checked against the hash
/// the frame's header gives it.
pub(crate) struct LoadedFrame {
    hashes: Vec<ChunkHash>,
    data: Vec<u8>,
    block_ok: Vec<bool>,
}

impl LoadedFrame {
    /// The bytes of block `index`, provided it is the block the catalog says (`expected`) and
    /// its content still hashes to that.
    pub fn block(&self, index: u16, expected: &ChunkHash) -> Result<&[u8], String> {
        let i = usize::from(index);
        if i >= self.hashes.len() {
            return Err(format!(
                "block {i} is not in the frame, which holds {} blocks",
                self.hashes.len()
            ));
        }
        if self.hashes[i] != *expected {
            return Err(format!(
                "block {i} of the frame is named {} on disk, but the catalog expects {expected}",
                self.hashes[i]
            ));
        }
        if !self.block_ok[i] {
            return Err(format!("block {i} does not match its hash"));
        }
        Ok(&self.data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE])
    }
}

pub(crate) fn io_error(pack: &Path, loc: &ChunkLoc, source: io::Error) -> ChunkReadError {
    ChunkReadError::Io {
        pack: pack.display().to_string(),
        offset: loc.offset,
        source,
    }
}

pub(crate) fn corrupt(pack: &Path, loc: &ChunkLoc, reason: String) -> ChunkReadError {
    ChunkReadError::Corrupt {
        pack: pack.display().to_string(),
        offset: loc.offset,
        reason,
    }
}

fn pack_ends_early(pack: &Path, loc: &ChunkLoc) -> ChunkReadError {
    corrupt(
        pack,
        loc,
        format!(
            "the pack file ends before this {}-byte frame does (it was truncated after it was written)",
            loc.entry_len
        ),
    )
}

/// The entry length the catalog gives `loc`, refused when it cannot hold an entry header.
fn entry_len_of(pack: &Path, loc: &ChunkLoc) -> Result<usize, ChunkReadError> {
    if u64::from(loc.entry_len) < ENTRY_HEADER_BYTES {
        return Err(corrupt(
            pack,
            loc,
            format!(
                "catalog gives the frame an impossible length of {} bytes",
                loc.entry_len
            ),
        ));
    }
    Ok(loc.entry_len as usize)
}

/// Checks a frame entry's header and parses its body: the hashes it names and where its zstd
/// bytes start. The entry's CRC is checked but not trusted alone: blake3 of each block decides
/// whether that block is usable, so a frame whose damage spares the wanted block still serves
/// it.
fn check_entry(
    entry: &[u8],
    pack: &Path,
    loc: &ChunkLoc,
) -> Result<(Vec<ChunkHash>, usize), ChunkReadError> {
    let (header, body) = entry.split_at(ENTRY_HEADER_BYTES as usize);
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != ENTRY_MAGIC || word(4) as usize != body.len() {
        return Err(corrupt(pack, loc, "frame entry header is damaged".into()));
    }
    let crc_ok = crc32c::crc32c(body) == word(8);
    let (hashes, zstd_data) = parse_frame_body(body).map_err(|r| corrupt(pack, loc, r))?;
    if !crc_ok {
        tracing::warn!(
            pack = %pack.display(),
            offset = loc.offset,
            "frame checksum mismatch: serving only blocks whose blake3 still matches"
        );
    }
    Ok((hashes, entry.len() - zstd_data.len()))
}

/// Bytes of one pack read in one piece, covering one or more frame entries: a restore reads
/// the frames it needs in pack order, and neighbours are read together.
pub struct PackWindow {
    /// The bytes read: fewer than asked for where the pack ends.
    buf: WindowBuf,
    /// Offset in the pack of the first byte of `buf`.
    pack_offset: u64,
}

enum WindowBuf {
    Direct(AlignedBuf),
    Buffered(BytesMut),
}

impl PackWindow {
    fn bytes(&self) -> &[u8] {
        match &self.buf {
            WindowBuf::Direct(buf) => buf,
            WindowBuf::Buffered(buf) => buf,
        }
    }
}

/// A frame's zstd bytes inside a shared [`PackWindow`], handed on without a copy.
pub struct FrameBytes {
    window: Arc<PackWindow>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for FrameBytes {
    fn as_ref(&self) -> &[u8] {
        &self.window.bytes()[self.range.clone()]
    }
}

impl fmt::Debug for FrameBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameBytes({} bytes)", self.range.len())
    }
}

/// Reads bytes `offset..offset + len` of a pack through the page cache.
pub(crate) fn read_buffered(file: &File, offset: u64, len: usize) -> io::Result<PackWindow> {
    let mut buf = BytesMut::with_capacity(len);
    direct::read_appending(file, &mut buf, len, offset)?;
    Ok(PackWindow {
        buf: WindowBuf::Buffered(buf),
        pack_offset: offset,
    })
}

/// Reads bytes `offset..offset + len` of a pack from `direct` (opened with `O_DIRECT`), and
/// enough around them to satisfy direct I/O. The copy from the page cache into fresh memory was
/// the collector's largest cost in a restore (8.5 % of all CPU samples); a direct read lands in
/// the buffer without one. EINVAL means the kernel refused the direct read.
pub(crate) fn read_direct(direct: &File, offset: u64, len: usize) -> io::Result<PackWindow> {
    let start = offset - offset % DIRECT_ALIGN as u64;
    let end = direct::align_up(offset + len as u64);
    Ok(PackWindow {
        buf: WindowBuf::Direct(AlignedBuf::read_at(direct, start, (end - start) as usize)?),
        pack_offset: start,
    })
}

/// The frame entry at `loc` inside `window`: its hashes and its zstd bytes (see
/// [`check_entry`]).
pub(crate) fn frame_in_window(
    window: &Arc<PackWindow>,
    pack: &Path,
    loc: &ChunkLoc,
) -> Result<(Vec<ChunkHash>, FrameBytes), ChunkReadError> {
    let entry_len = entry_len_of(pack, loc)?;
    let start = loc
        .offset
        .checked_sub(window.pack_offset)
        .map(|s| s as usize)
        .filter(|&s| s.saturating_add(entry_len) <= window.bytes().len())
        .ok_or_else(|| pack_ends_early(pack, loc))?;
    let entry = &window.bytes()[start..start + entry_len];
    let (hashes, zstd_start) = check_entry(entry, pack, loc)?;
    let bytes = FrameBytes {
        window: Arc::clone(window),
        range: start + zstd_start..start + entry_len,
    };
    Ok((hashes, bytes))
}

/// Reads the frame entry at `loc` from `file` and decompresses it, checking each block against
/// the hash the frame's header gives it (see [`check_entry`]).
pub(crate) fn load_frame(
    file: &File,
    pack: &Path,
    loc: &ChunkLoc,
) -> Result<LoadedFrame, ChunkReadError> {
    let window = read_buffered(file, loc.offset, loc.entry_len as usize)
        .map_err(|source| io_error(pack, loc, source))?;
    let (hashes, zstd) = frame_in_window(&Arc::new(window), pack, loc)?;
    let data = frame::decompress(zstd.as_ref(), hashes.len())
        .map_err(|e| corrupt(pack, loc, e.to_string()))?;
    let block_ok: Vec<bool> = hashes
        .iter()
        .zip(crate::block::hash_blocks(&data))
        .map(|(hash, actual)| actual == *hash)
        .collect();
    Ok(LoadedFrame {
        hashes,
        data,
        block_ok,
    })
}

/// Open pack files, shared by readers (pread needs no lock) and the writer.
pub(crate) struct Packs {
    dir: PathBuf,
    files: RwLock<HashMap<PackId, Arc<File>>>,
    /// The same files opened for direct reads; `None` where the filesystem refused.
    direct: RwLock<HashMap<PackId, Option<Arc<File>>>>,
}

impl Packs {
    pub fn new(store_dir: &Path) -> Packs {
        Packs {
            dir: store_dir.join(PACKS_DIR),
            files: RwLock::new(HashMap::new()),
            direct: RwLock::new(HashMap::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, id: PackId) -> PathBuf {
        self.dir.join(id.file_name())
    }

    /// The open pack file, opening it (read-only) on first use and keeping it open.
    pub fn file(&self, id: PackId) -> io::Result<Arc<File>> {
        get_or_open(&self.files, id, || File::open(self.path(id)).map(Arc::new))
    }

    /// The pack opened read-only with `O_DIRECT`, on first use; `None` (logged once) where
    /// the filesystem refuses it or refused a direct read of it.
    pub fn direct_file(&self, id: PackId) -> Option<Arc<File>> {
        let open = || {
            let path = self.path(id);
            let file = crate::direct::open_for_direct_reads(&path)
                .inspect_err(|e| {
                    tracing::info!(pack = %path.display(), error = %e,
                        "no direct reads of this pack: restores read it through the page cache");
                })
                .ok();
            Ok::<_, std::convert::Infallible>(file.map(Arc::new))
        };
        get_or_open(&self.direct, id, open).unwrap_or_else(|never| match never {})
    }

    /// From now on, reads of pack `id` go through the page cache.
    pub fn refuse_direct(&self, id: PackId) {
        self.direct
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, None);
    }

    /// Shares a file the writer opened for appending.
    pub fn insert(&self, id: PackId, file: Arc<File>) {
        self.files
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, file);
    }
}

/// The value kept for `id`, or the one `open` gives, kept unless another thread kept one first.
fn get_or_open<T: Clone, E>(
    map: &RwLock<HashMap<PackId, T>>,
    id: PackId,
    open: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if let Some(value) = map.read().unwrap_or_else(PoisonError::into_inner).get(&id) {
        return Ok(value.clone());
    }
    let value = open()?;
    let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
    Ok(map.entry(id).or_insert(value).clone())
}

type FrameKey = (PackId, u64);

/// Least-recently-used cache of decompressed, verified frames, bounded by a frame count.
/// A restore reads blocks in volume order, which mostly means frame by frame: with the cache
/// each frame is decompressed once, not once per block.
pub(crate) struct FrameCache {
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    capacity: usize,
    tick: u64,
    frames: HashMap<FrameKey, (Arc<LoadedFrame>, u64)>,
    by_age: BTreeMap<u64, FrameKey>,
}

impl FrameCache {
    pub fn new(capacity: usize) -> FrameCache {
        FrameCache {
            inner: Mutex::new(CacheInner {
                capacity,
                tick: 0,
                frames: HashMap::new(),
                by_age: BTreeMap::new(),
            }),
        }
    }

    pub fn get(&self, key: FrameKey) -> Option<Arc<LoadedFrame>> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.tick += 1;
        let tick = inner.tick;
        let (frame, old_tick) = {
            let (frame, used) = inner.frames.get_mut(&key)?;
            let old = std::mem::replace(used, tick);
            (Arc::clone(frame), old)
        };
        inner.by_age.remove(&old_tick);
        inner.by_age.insert(tick, key);
        Some(frame)
    }

    pub fn insert(&self, key: FrameKey, frame: Arc<LoadedFrame>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.capacity == 0 {
            return;
        }
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old_tick)) = inner.frames.insert(key, (frame, tick)) {
            inner.by_age.remove(&old_tick);
        }
        inner.by_age.insert(tick, key);
        while inner.frames.len() > inner.capacity {
            let Some((_, oldest)) = inner.by_age.pop_first() else {
                break;
            };
            inner.frames.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .frames
            .len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pack_names_round_trip() {
        assert_eq!(PackId(3).file_name(), "000003.pack");
        assert_eq!(PackId(3).to_string(), "packs/000003.pack");
        assert_eq!(PackId::from_file_name("000003.pack"), Some(PackId(3)));
        assert_eq!(
            PackId::from_file_name("1234567.pack"),
            Some(PackId(1_234_567))
        );
        assert_eq!(PackId::from_file_name("3.pack"), None);
        assert_eq!(PackId::from_file_name("000003.pack.tmp"), None);
        assert_eq!(PackId::from_file_name("abcdef.pack"), None);
    }

    #[test]
    fn frame_bodies_round_trip_and_garbage_is_an_error() {
        let hashes = [ChunkHash::of(b"a"), ChunkHash::of(b"b")];
        let body: Vec<u8> = [&[2u8, 0][..], &hashes[0].0, &hashes[1].0, b"zstd"].concat();
        let mut entry = Vec::new();
        framed::encode_entry(&mut entry, &body);
        let frame = FrameEntry::new(&hashes, b"zstd");
        let mut written = vec![0u8; frame.len() + 3];
        frame.write_to(&mut written);
        assert_eq!(frame.len(), entry.len());
        assert_eq!(&written[..entry.len()], &entry[..]);
        assert_eq!(frame.block_count(), 2);
        let (parsed, data) = parse_frame_body(&body).unwrap();
        assert_eq!(parsed, hashes);
        assert_eq!(data, b"zstd");
        for cut in 0..frame_header_bytes(2) {
            assert!(parse_frame_body(&body[..cut]).is_err(), "cut {cut}");
        }
        assert!(parse_frame_body(&[0, 0]).is_err());
        assert!(parse_frame_body(&[0xff, 0xff]).is_err());
    }

    fn frame(n: u64) -> Arc<LoadedFrame> {
        Arc::new(LoadedFrame {
            hashes: vec![ChunkHash::of(&n.to_le_bytes())],
            data: vec![0; BLOCK_SIZE],
            block_ok: vec![true],
        })
    }

    #[test]
    fn windows_read_directly_or_buffered_hold_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000001.pack");
        let bytes: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let direct = crate::direct::open_for_direct_reads(&path).ok();
        for (offset, len) in [(0, 100), (5_000, 3_000), (8_192, 4_096), (19_000, 5_000)] {
            for source in [direct.as_ref(), None] {
                let window = match source {
                    Some(direct) => read_direct(direct, offset, len),
                    None => read_buffered(&file, offset, len),
                };
                let window = Arc::new(window.unwrap());
                let loc = ChunkLoc {
                    pack: PackId(1),
                    offset,
                    entry_len: len as u32,
                    index: 0,
                };
                let start = (offset - window.pack_offset) as usize;
                let end = bytes.len().min(offset as usize + len);
                let got = &window.bytes()[start..];
                let want = &bytes[offset as usize..end];
                assert!(
                    got.len() >= want.len() && got[..want.len()] == *want,
                    "at {offset}"
                );
                let err = frame_in_window(&window, &path, &loc);
                if end < offset as usize + len {
                    let err = err.err().unwrap().to_string();
                    assert!(err.contains("ends before this 5000-byte frame"), "{err}");
                }
            }
        }
    }

    #[test]
    fn cache_evicts_least_recently_used() {
        let cache = FrameCache::new(2);
        cache.insert((PackId(1), 0), frame(0));
        cache.insert((PackId(1), 10), frame(1));
        assert!(cache.get((PackId(1), 0)).is_some());
        cache.insert((PackId(1), 20), frame(2));
        assert_eq!(cache.len(), 2);
        assert!(
            cache.get((PackId(1), 10)).is_none(),
            "least recently used goes first"
        );
        assert!(cache.get((PackId(1), 0)).is_some());
        assert!(cache.get((PackId(1), 20)).is_some());
        let off = FrameCache::new(0);
        off.insert((PackId(1), 0), frame(0));
        assert!(off.get((PackId(1), 0)).is_none());
    }
}
