//! Large writes, and pack reads, around the page cache.
//!
//! Through the page cache every byte written is copied into freshly allocated pages and later
//! written back by the kernel. On the kind of virtual machine Tideline is measured on, that copy
//! into fresh pages ran at about 1 GB/s: it was the largest single cost of a 1 MiB sequential
//! write through the tap, and 15 % of a restore's CPU samples. A buffered 2 GiB write with fsync
//! managed 530-615 MB/s where direct writes of 1 MiB reached 1.6-2.1 GB/s. Large block-aligned
//! writes therefore go with `O_DIRECT`, through a bounce buffer aligned as direct I/O requires
//! (an NBD payload or a decompressed frame is not). Small writes stay buffered: a 4 KiB direct
//! write waits for the disk, and both users (an NBD connection's ordinary writes and the restore's
//! writer thread) write one piece after another.
//!
//! A writer for a file whose writes allocate blocks (a sparse volume) submits its direct writes
//! through Linux AIO ([`crate::aio`]) and waits for them: a write into a hole then holds ext4's
//! inode lock only while it is queued, not until it is on the disk, so several writers'
//! allocating writes overlap. A writer whose AIO context cannot be had or fails uses `pwritev`,
//! as every writer into blocks allocated beforehand does.
//!
//! Reads of large aligned ranges go around the page cache too ([`BlockReader`]): the agent's
//! shipper reads back from the volume the large writes it no longer holds in memory, and through
//! the page cache that copy out of freshly filled pages was the agent's largest cost in an
//! ingest (4.7 of its 19.5 CPU seconds, more than compressing), for pages nobody reads again.
//!
//! Durability is the caller's as before: a direct write has reached the disk's cache, not
//! necessarily its platter, so the same fsync still ends a restore and a FLUSH still syncs the
//! volume. Buffered and direct writes to one file stay coherent: the kernel writes back and
//! drops cached pages a direct write overlaps.

use bytes::{Buf, BufMut, BytesMut};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::aio::AioContext;
use crate::{BLOCK_SIZE, BLOCK_SIZE_BYTES};

/// Writes of at least this many bytes, block-aligned, go around the page cache.
pub const DIRECT_MIN_BYTES: usize = 64 * 1024;
/// The bounce buffer: larger writes go out in pieces of this size.
const BOUNCE_BYTES: usize = 1 << 20;
/// Alignment of direct I/O buffers, offsets and lengths: a block covers the logical block size
/// of any disk in use (512 or 4096 bytes).
pub(crate) const DIRECT_ALIGN: usize = BLOCK_SIZE;

/// Bytes whose first one sits where direct I/O needs it: a restore decompresses frames into
/// these, so their runs go to the disk without a copy into a bounce buffer.
pub struct AlignedBuf(BytesMut);

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut buf = aligned_bytes(len);
        buf.resize(len, 0);
        AlignedBuf(buf)
    }

    /// Up to `len` bytes of `file` from `offset`, fewer where the file ends, read into memory
    /// that is not zeroed first. A restore reads its packs 4 MiB at a time, and zeroing each
    /// window just before the read overwrote it was 6 % of the collector's CPU.
    pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let mut buf = aligned_bytes(len);
        read_appending(file, &mut buf, len, offset)?;
        Ok(AlignedBuf(buf))
    }
}

/// Reads up to `len` bytes of `file` from `offset` into `buf`'s spare room (which must hold
/// them), stopping early only where the file ends; the bytes read are appended to `buf`. The
/// room is not zeroed first: the kernel fills it.
pub(crate) fn read_appending(
    file: &File,
    buf: &mut BytesMut,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    assert!(buf.capacity() - buf.len() >= len, "room for the read");
    let mut filled = 0;
    while filled < len {
        let room = &mut buf.spare_capacity_mut()[..len - filled];
        let at = libc::off_t::try_from(offset + filled as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: pread writes at most `room.len()` bytes into `room`, memory `buf` owns and
        // that nothing else refers to; it never reads them. The descriptor is open for `file`.
        let n = unsafe { libc::pread(file.as_raw_fd(), room.as_mut_ptr().cast(), room.len(), at) };
        match n {
            0 => break,
            n if n > 0 => {
                let n = n as usize;
                // SAFETY: the kernel initialised the first `n` bytes of the spare room.
                unsafe { buf.set_len(buf.len() + n) };
                filled += n;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Exactly `len` bytes of `file` from `offset`, appended to the empty `buf`; an error where the
/// file ends before them.
fn read_exact_into(
    file: &File,
    mut buf: BytesMut,
    len: usize,
    offset: u64,
) -> io::Result<BytesMut> {
    read_appending(file, &mut buf, len, offset)?;
    if buf.len() < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(buf)
}

/// The `len` bytes of `file` at `offset`, read through the page cache into memory that is not
/// zeroed first; an error where the file ends before them.
pub fn read_buffered_exact_at(file: &File, len: usize, offset: u64) -> io::Result<BytesMut> {
    read_exact_into(file, BytesMut::with_capacity(len), len, offset)
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// An empty buffer with room for `capacity` bytes, the first of them where direct I/O needs it.
/// Bytes that arrive by copy anyway (from a socket, from FUSE) are copied in here, so that
/// frozen into [`Bytes`](bytes::Bytes) they reach the disk with no copy into a bounce buffer
/// (that copy was 2.7 % of the agent's CPU in an ingest). Below [`DIRECT_MIN_BYTES`], which
/// goes through the page cache anyway, the buffer is an ordinary one. Nothing is zeroed but
/// the padding in front.
pub fn direct_buffer(capacity: usize) -> BytesMut {
    if capacity < DIRECT_MIN_BYTES {
        return BytesMut::with_capacity(capacity);
    }
    aligned_bytes(capacity)
}

/// An empty buffer with room for `capacity` bytes from an aligned address; it stays aligned as
/// long as it is not grown past that.
fn aligned_bytes(capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(capacity + DIRECT_ALIGN);
    // Should the offset be unknowable, the kernel refuses direct writes from the buffer, and
    // they go buffered.
    let pad = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    buf.put_bytes(0, pad);
    // Moves the start without moving the bytes; the room left is still `capacity`.
    buf.advance(pad);
    buf
}

/// True for a write large and aligned enough to go around the page cache, where the file
/// allows ([`DirectWriter::takes`]).
pub fn suits_direct(offset: u64, len: usize) -> bool {
    len >= DIRECT_MIN_BYTES && block_aligned(offset, len)
}

/// The first boundary direct I/O accepts at or after `offset`.
pub fn align_up(offset: u64) -> u64 {
    offset.next_multiple_of(DIRECT_ALIGN as u64)
}

/// True when `len` bytes at `offset` are whole blocks at a block boundary.
fn block_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(BLOCK_SIZE_BYTES) && len.is_multiple_of(BLOCK_SIZE)
}

/// Opens `path` read-only with `O_DIRECT`.
pub fn open_for_direct_reads(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A file read in whole blocks: reads that [`suits_direct`] go around the page cache where the
/// filesystem allows, into an aligned buffer, and the others through it. Direct and buffered
/// I/O stay coherent: the kernel writes back cached pages a direct read overlaps first.
pub struct BlockReader {
    buffered: Arc<File>,
    direct: Option<File>,
    /// Set once the kernel refused a direct read (EINVAL): every read is buffered from then on.
    direct_refused: AtomicBool,
}

impl BlockReader {
    /// Reads `buffered`, the file at `path`, also opening `path` for direct reads where its
    /// filesystem allows.
    pub fn new(path: &Path, buffered: Arc<File>) -> BlockReader {
        BlockReader {
            buffered,
            direct: open_for_direct_reads(path).ok(),
            direct_refused: AtomicBool::new(false),
        }
    }

    /// The `len` bytes at `offset`; an error where the file ends before them.
    pub fn read_exact_at(&self, len: usize, offset: u64) -> io::Result<BytesMut> {
        if let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| self.takes_direct(offset, len))
        {
            match read_exact_into(direct, aligned_bytes(len), len, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(error = %e,
                        "direct read refused: this file is read through the page cache from now on");
                    self.direct_refused.store(true, Ordering::Relaxed);
                }
                read => return read,
            }
        }
        read_buffered_exact_at(&self.buffered, len, offset)
    }

    fn takes_direct(&self, offset: u64, len: usize) -> bool {
        suits_direct(offset, len) && !self.direct_refused.load(Ordering::Relaxed)
    }
}

/// A file opened for direct I/O, with an aligned bounce buffer for data that is not aligned
/// (allocated by the first such write: a restore's writers never need one).
pub struct DirectWriter {
    file: File,
    bounce: Option<AlignedBuf>,
    /// Set when the kernel refused a direct write (EINVAL): from then on writes go buffered.
    refused: bool,
    aio: Aio,
}

/// Whether a writer submits through AIO ([`crate::aio`]).
enum Aio {
    /// Asked for; the first write sets the context up.
    Untried,
    Ready(AioContext),
    /// Not asked for, no context to be had, or one failed: `pwritev`.
    Unavailable,
}

impl Aio {
    /// The context, set up by the first write that asks.
    fn ready(&mut self) -> Option<&mut AioContext> {
        if let Aio::Untried = self {
            *self = match AioContext::new() {
                Ok(context) => Aio::Ready(context),
                Err(e) => {
                    tracing::debug!(error = %e, "no AIO context: direct writes use pwritev");
                    Aio::Unavailable
                }
            };
        }
        match self {
            Aio::Ready(context) => Some(context),
            _ => None,
        }
    }
}

impl DirectWriter {
    /// Opens `path` for direct writes; `None` (logged) when its filesystem refuses `O_DIRECT`.
    pub fn open(path: &Path) -> Option<DirectWriter> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .inspect_err(|e| {
                tracing::info!(path = %path.display(), error = %e,
                    "no direct I/O on this file: large writes go through the page cache");
            })
            .ok()?;
        Some(DirectWriter {
            file,
            bounce: None,
            refused: false,
            aio: Aio::Unavailable,
        })
    }

    /// This writer (and its clones) submit through AIO: for files whose writes may allocate
    /// blocks, such as a sparse volume. Into blocks allocated beforehand, as a restore writes,
    /// AIO gains nothing and its deferred completions cost: a restore of the ext4 image took
    /// 3.30-3.80 s with it against 2.98-3.36 s without (three alternating pairs).
    pub fn submitting_through_aio(mut self) -> DirectWriter {
        self.aio = Aio::Untried;
        self
    }

    /// Another writer to the same file, with a bounce buffer of its own if it needs one, for
    /// writes that run at the same time as this one's.
    pub fn try_clone(&self) -> io::Result<DirectWriter> {
        Ok(DirectWriter {
            file: self.file.try_clone()?,
            bounce: None,
            refused: self.refused,
            aio: match self.aio {
                Aio::Untried | Aio::Ready(_) => Aio::Untried,
                Aio::Unavailable => Aio::Unavailable,
            },
        })
    }

    /// True when a write of `len` bytes at `offset` should go around the page cache.
    pub fn takes(&self, offset: u64, len: usize) -> bool {
        self.takes_at_least(offset, len, DIRECT_MIN_BYTES)
    }

    /// [`DirectWriter::takes`] with another smallest size: a restore writing into blocks
    /// allocated beforehand sends every whole-block run direct, as those writes do not wait
    /// for each other.
    pub fn takes_at_least(&self, offset: u64, len: usize, min_bytes: usize) -> bool {
        !self.refused && len > 0 && len >= min_bytes && block_aligned(offset, len)
    }

    /// True once the kernel refused a direct write: from then on everything goes buffered.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Writes `data` at `offset` (see [`DirectWriter::takes`]): straight from `data` when it is
    /// aligned, else through the bounce buffer. Returns false, having written nothing the
    /// caller can rely on, when the kernel refused direct I/O for it: the caller then writes
    /// all of `data` through the page cache.
    pub fn write(&mut self, data: &[u8], offset: u64) -> io::Result<bool> {
        if data.as_ptr().align_offset(DIRECT_ALIGN) == 0 {
            return self.write_slices(&[data], offset);
        }
        let mut bounce = self
            .bounce
            .take()
            .unwrap_or_else(|| AlignedBuf::zeroed(BOUNCE_BYTES));
        let mut written = Ok(true);
        for (i, piece) in data.chunks(BOUNCE_BYTES).enumerate() {
            let at = offset + (i * BOUNCE_BYTES) as u64;
            let bounce = &mut bounce[..piece.len()];
            bounce.copy_from_slice(piece);
            written = self.write_slices(&[bounce], at);
            if !matches!(written, Ok(true)) {
                break;
            }
        }
        self.bounce = Some(bounce);
        written
    }

    /// Writes `pieces` one after another from `offset` in as few system calls as the kernel's
    /// iovec limit allows (see [`DirectWriter::takes`] for their total): each piece must start
    /// at an aligned address and be whole blocks long, or nothing is written and false comes
    /// back, as it does when the kernel refused direct I/O. The caller then writes the pieces
    /// through the page cache.
    pub fn write_pieces(&mut self, pieces: &[&[u8]], offset: u64) -> io::Result<bool> {
        let aligned = |piece: &&[u8]| {
            piece.as_ptr().align_offset(DIRECT_ALIGN) == 0 && piece.len().is_multiple_of(BLOCK_SIZE)
        };
        if self.refused || !pieces.iter().all(aligned) {
            return Ok(false);
        }
        self.write_slices(pieces, offset)
    }

    /// Writes all of `pieces` (aligned) one after another from `offset`; false, with the
    /// writer marked refused, when the kernel refused direct I/O (EINVAL).
    fn write_slices(&mut self, pieces: &[&[u8]], offset: u64) -> io::Result<bool> {
        let slices = || pieces.iter().map(|p| IoSlice::new(p)).collect::<Vec<_>>();
        let mut written = match self.aio.ready() {
            Some(context) => context.write_vectored_at(&self.file, &mut slices(), offset),
            None => write_all_vectored_at(&self.file, &mut slices(), offset),
        };
        if let Aio::Ready(context) = &self.aio {
            if context.broken() {
                // Nothing is in flight any more: the same bytes go again with `pwritev`, as
                // every later write of this writer will.
                tracing::info!(error = ?written.as_ref().err(),
                    "AIO failed: direct writes use pwritev from now on");
                self.aio = Aio::Unavailable;
                written = write_all_vectored_at(&self.file, &mut slices(), offset);
            }
        }
        match written {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(offset, error = %e,
                    "direct write refused: large writes go through the page cache from now on");
                self.refused = true;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// The most pieces one `pwritev` takes (Linux's `UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// Writes all of `slices` at `offset` with `pwritev`, resuming after a short write.
fn write_all_vectored_at(
    file: &File,
    mut slices: &mut [IoSlice<'_>],
    mut offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !slices.is_empty() {
        let count = slices.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and every slice borrows
        // memory that outlives the call; the kernel only reads from it.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count,
                offset as libc::off_t,
            )
        };
        match written {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                IoSlice::advance_slices(&mut slices, n as usize);
                offset += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn block_reads_see_buffered_writes_not_yet_written_back_and_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        let file = Arc::new(tideline_testkit::sized_file(&path, 4 << 20));
        let reader = BlockReader::new(&path, Arc::clone(&file));
        let refused = format!("O_DIRECT on {}", path.display());
        let missing = reader
            .direct
            .is_none()
            .then_some(refused)
            .into_iter()
            .collect();
        if !tideline_testkit::skip_or_fail(missing) {
            return;
        }
        // Written through the page cache and not synced: a direct read must still see it.
        let len = 2 * DIRECT_MIN_BYTES;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        file.write_all_at(&data, BLOCK_SIZE_BYTES).unwrap();
        assert!(reader.takes_direct(BLOCK_SIZE_BYTES, len));
        let back = reader.read_exact_at(len, BLOCK_SIZE_BYTES).unwrap();
        assert!(
            back[..] == data[..],
            "a direct read missed a buffered write"
        );
        assert_eq!(back.as_ptr().align_offset(DIRECT_ALIGN), 0);
        // A small read goes through the page cache.
        assert!(!reader.takes_direct(BLOCK_SIZE_BYTES, BLOCK_SIZE));
        let small = reader.read_exact_at(BLOCK_SIZE, BLOCK_SIZE_BYTES).unwrap();
        assert!(small[..] == data[..BLOCK_SIZE]);
        // Past the end, either way: an error, not short data.
        let end = (4 << 20) - BLOCK_SIZE_BYTES;
        for len in [BLOCK_SIZE * 2, DIRECT_MIN_BYTES] {
            let error = reader.read_exact_at(len, end).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{len} bytes");
        }
    }

    #[test]
    fn large_aligned_writes_land_around_the_page_cache_and_small_ones_are_declined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        let buffered = tideline_testkit::sized_file(&path, 4 << 20);
        let direct = DirectWriter::open(&path);
        let refused = format!("O_DIRECT on {}", path.display());
        let missing = direct.is_none().then_some(refused).into_iter().collect();
        if !tideline_testkit::skip_or_fail(missing) {
            return;
        }
        let mut direct = direct.unwrap();
        assert!(!direct.takes(0, 4096), "small writes stay buffered");
        assert!(!direct.takes(512, DIRECT_MIN_BYTES), "unaligned offset");
        assert!(!direct.takes(0, DIRECT_MIN_BYTES + 512), "unaligned length");
        // Larger than the bounce buffer, from an unaligned source buffer.
        let len = BOUNCE_BYTES + 3 * BLOCK_SIZE;
        let source: Vec<u8> = (0..len + 1).map(|i| (i % 251) as u8).collect();
        let data = &source[1..];
        assert!(direct.takes(BLOCK_SIZE_BYTES, len));
        assert!(direct.write(data, BLOCK_SIZE_BYTES).unwrap());
        let mut back = vec![0u8; len];
        buffered.read_exact_at(&mut back, BLOCK_SIZE_BYTES).unwrap();
        assert!(back == data, "bytes read back differ");
        let mut first = vec![1u8; BLOCK_SIZE];
        buffered.read_exact_at(&mut first, 0).unwrap();
        assert!(first.iter().all(|&b| b == 0), "nothing before the write");
        // From an aligned buffer, in one piece larger than the bounce buffer.
        let mut aligned = AlignedBuf::zeroed(2 * BOUNCE_BYTES);
        assert_eq!(aligned.as_ptr().align_offset(DIRECT_ALIGN), 0);
        assert_eq!(aligned.len(), 2 * BOUNCE_BYTES);
        aligned
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 241) as u8);
        assert!(direct.write(&aligned, 2 << 20).unwrap());
        let mut back = vec![0u8; aligned.len()];
        buffered.read_exact_at(&mut back, 2 << 20).unwrap();
        assert!(
            back == *aligned,
            "bytes written from the aligned buffer differ"
        );
        // Two aligned pieces in one vectored write, from the aligned buffer's two halves in
        // reverse; a piece that is not whole blocks is declined and writes nothing.
        let (first, second) = aligned.split_at(BOUNCE_BYTES);
        assert!(direct.write_pieces(&[second, first], 8 << 20).unwrap());
        let mut back = vec![0u8; aligned.len()];
        buffered.read_exact_at(&mut back, 8 << 20).unwrap();
        assert!(back[..BOUNCE_BYTES] == *second && back[BOUNCE_BYTES..] == *first);
        assert!(!direct.write_pieces(&[&first[..100]], 12 << 20).unwrap());
        assert!(!direct.refused(), "declined, not refused by the kernel");
    }

    #[test]
    fn bytes_filled_into_a_direct_buffer_reach_the_disk_without_a_bounce_copy() {
        let len = BOUNCE_BYTES + 5 * BLOCK_SIZE;
        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buf = direct_buffer(len);
        assert!(buf.capacity() >= len);
        // In uneven pieces, as a socket fills it.
        pattern.chunks(7_001).for_each(|piece| buf.put_slice(piece));
        let data = buf.freeze();
        assert_eq!(
            data.as_ptr().align_offset(DIRECT_ALIGN),
            0,
            "aligned once frozen"
        );
        assert!(data == pattern);
        assert!(direct_buffer(BLOCK_SIZE).capacity() >= BLOCK_SIZE);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        let buffered = tideline_testkit::sized_file(&path, 4 << 20);
        let Some(mut direct) = DirectWriter::open(&path) else {
            assert!(!tideline_testkit::skip_or_fail(vec![format!(
                "O_DIRECT on {}",
                path.display()
            )]));
            return;
        };
        assert!(direct.write(&data, BLOCK_SIZE_BYTES).unwrap());
        assert!(direct.bounce.is_none(), "written from the buffer itself");
        let mut back = vec![0u8; len];
        buffered.read_exact_at(&mut back, BLOCK_SIZE_BYTES).unwrap();
        assert!(back == pattern, "bytes read back differ");
    }

    #[test]
    fn a_writer_whose_aio_context_failed_writes_with_pwritev() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("volume");
        let buffered = tideline_testkit::sized_file(&path, 1 << 20);
        let writer = DirectWriter::open(&path).map(DirectWriter::submitting_through_aio);
        let (Some(mut direct), Ok(mut context)) = (writer, AioContext::new()) else {
            let why = vec![format!("O_DIRECT and AIO on {}", path.display())];
            assert!(!tideline_testkit::skip_or_fail(why));
            return;
        };
        // Broken the way a refused submission breaks it.
        let read_only = File::open(&path).unwrap();
        let block = AlignedBuf::zeroed(BLOCK_SIZE);
        let slices = &mut [IoSlice::new(&block)];
        assert!(context.write_vectored_at(&read_only, slices, 0).is_err());
        direct.aio = Aio::Ready(context);
        let mut data = AlignedBuf::zeroed(DIRECT_MIN_BYTES);
        data.iter_mut().for_each(|b| *b = 7);
        assert!(direct.write(&data, 0).unwrap());
        assert!(matches!(direct.aio, Aio::Unavailable));
        let mut back = vec![0u8; data.len()];
        buffered.read_exact_at(&mut back, 0).unwrap();
        assert!(back == *data);
    }
}
