//! Writing restore frames into an image: decompress, check every block against the hash the
//! catalog gives it, write it where it belongs.
//!
//! The collector sends frames as stored (`RestoreRequest.frames`), so the checks run here, on
//! this machine's cores, right before the bytes are written: what lands in the image is what
//! was journalled, whatever happened to the pack or on the way. Frames are checked on every
//! core while the stream is read, and one writer thread writes them; a few frames wait at most.
//!
//! The collector first lists the image's non-zero block ranges ([`v1::DataExtents`]), and
//! [`DataBytes`] adds them up, so a filesystem too small fails before anything is written.
//!
//! The writer writes through the page cache into the sparse image; the filesystem allocates
//! blocks as it writes them back (ext4's delayed allocation), and a writeback thread keeps the
//! disk busy meanwhile. Direct writes into blocks allocated ahead (`fallocate`) were slower on
//! the machine this is measured on: such blocks are unwritten extents, every write converts its
//! part in the filesystem's journal, and 8 writers restoring a 4 GiB ext4 image took 6.18-6.37 s
//! against 5.05-5.95 s this way, in alternating runs (fio, 2.5 GB in 256 KiB random writes up to
//! a final fsync: 484-571 MB/s into allocated blocks at queue depth 8, 713-750 MB/s through the
//! page cache into a sparse file).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::bail;
use tideline_core::block;
use tideline_core::frame::{self, MAX_FRAME_BLOCKS};
use tideline_core::store::{ChunkReadError, StoreError};
use tideline_core::{ChunkHash, VolumeName, BLOCK_SIZE, BLOCK_SIZE_BYTES};
use tideline_proto::v1;

/// Frames each worker may have waiting.
const QUEUED_PER_WORKER: usize = 2;
/// Checked frames waiting for the writer.
const QUEUED_FOR_WRITER: usize = 4;
/// Written bytes after which the image's dirty pages are handed to the disk.
const WRITEBACK_STEP_BYTES: u64 = 64 << 20;

/// Writes frames into an image: checker threads, one per core, decompress and check frames,
/// and a writer thread writes them.
pub struct FrameWriter {
    tx: tokio::sync::mpsc::Sender<v1::RestoreFrame>,
    checkers: Vec<JoinHandle<anyhow::Result<()>>>,
    writer: JoinHandle<anyhow::Result<u64>>,
    failed: Arc<AtomicBool>,
}

impl FrameWriter {
    /// Starts the threads for an image of `size_bytes` of `volume` in `file`.
    pub fn start(file: File, size_bytes: u64, volume: VolumeName) -> FrameWriter {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_PER_WORKER * threads);
        let rx = Arc::new(Mutex::new(rx));
        let (checked_tx, checked_rx) = crossbeam_channel::bounded(QUEUED_FOR_WRITER);
        // Every buffer is in a checker, queued, or held by the writer: the queues bound them.
        let (spare_tx, spare_rx) =
            crossbeam_channel::bounded::<Box<[u8]>>(threads + QUEUED_FOR_WRITER + 1);
        let failed = Arc::new(AtomicBool::new(false));
        let checkers = (0..threads)
            .map(|_| {
                let queues = (rx.clone(), checked_tx.clone(), spare_rx.clone());
                let (failed, volume) = (failed.clone(), volume.clone());
                std::thread::spawn(move || check_frames(queues, size_bytes, &volume, &failed))
            })
            .collect();
        let image = ImageWriter::new(file);
        let writer = {
            let failed = failed.clone();
            std::thread::spawn(move || write_frames(image, &checked_rx, &spare_tx, &failed))
        };
        FrameWriter {
            tx,
            checkers,
            writer,
            failed,
        }
    }

    /// Queues a frame; false once a thread failed (then [`FrameWriter::finish`] says why).
    pub async fn submit(&self, frame: v1::RestoreFrame) -> bool {
        !self.failed.load(Ordering::Relaxed) && self.tx.send(frame).await.is_ok()
    }

    /// Waits for the queued frames; the bytes written, or the first error (a checker's, which
    /// explains a writer that stopped early, before the writer's).
    pub async fn finish(self) -> anyhow::Result<u64> {
        let FrameWriter {
            tx,
            checkers,
            writer,
            ..
        } = self;
        drop(tx);
        tokio::task::spawn_blocking(move || {
            let mut first_error = None;
            for checker in checkers {
                if let Err(e) = join(checker) {
                    first_error.get_or_insert(e);
                }
            }
            // The checkers are gone, so the writer's queue has closed.
            let written = join(writer);
            match (first_error, written) {
                (Some(e), _) | (None, Err(e)) => Err(e),
                (None, Ok(written)) => Ok(written),
            }
        })
        .await?
    }
}

/// The data bytes of an image, added up from the block ranges the collector lists.
#[derive(Default)]
pub struct DataBytes(u64);

impl DataBytes {
    /// Adds `ranges` of an image of `size_bytes`, refusing ranges outside it.
    pub fn add(&mut self, ranges: &v1::DataExtents, size_bytes: u64) -> anyhow::Result<()> {
        if ranges.start_block.len() != ranges.block_count.len() {
            bail!("collector sent block ranges whose lists differ in length");
        }
        let blocks_in_image = size_bytes.div_ceil(BLOCK_SIZE_BYTES);
        for (&start, &count) in ranges.start_block.iter().zip(&ranges.block_count) {
            if count == 0 || start >= blocks_in_image || count > blocks_in_image - start {
                bail!("collector sent {count} blocks from block {start}, outside the image");
            }
            let offset = start * BLOCK_SIZE_BYTES;
            self.0 += (count * BLOCK_SIZE_BYTES).min(size_bytes - offset);
        }
        Ok(())
    }

    /// Fails, before anything is written, when the filesystem holding `file` has less room
    /// than the data needs.
    pub fn check_room(&self, file: &File) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: fstatvfs fills the zeroed struct it is given; the descriptor stays open.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut stats) } != 0 {
            let e = std::io::Error::last_os_error();
            bail!("find the free space for the restored image: {e}");
        }
        let available = stats.f_bavail.saturating_mul(stats.f_frsize);
        if self.0 > available {
            bail!(
                "no space for the restored image's data ({} bytes, {available} available); nothing was written: free space there or restore to another filesystem",
                self.0
            );
        }
        Ok(())
    }
}

/// Where a checker takes frames from, hands checked ones to, and finds spare buffers.
type CheckerQueues = (
    Arc<Mutex<tokio::sync::mpsc::Receiver<v1::RestoreFrame>>>,
    crossbeam_channel::Sender<Checked>,
    crossbeam_channel::Receiver<Box<[u8]>>,
);

/// A checker thread: decompresses and checks frames until the stream ends or a frame fails.
fn check_frames(
    (frames, checked_tx, spare_rx): CheckerQueues,
    size_bytes: u64,
    volume: &VolumeName,
    failed: &AtomicBool,
) -> anyhow::Result<()> {
    loop {
        let next = frames
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocking_recv();
        let Some(frame) = next else {
            return Ok(());
        };
        let buffer = spare_rx.try_recv().unwrap_or_else(|_| frame_buffer());
        let checked = check_frame(size_bytes, volume, &frame, buffer).inspect_err(|_| {
            failed.store(true, Ordering::Relaxed);
        })?;
        if checked_tx.send(checked).is_err() {
            // The writer stopped: it failed and says why.
            return Ok(());
        }
    }
}

/// The writer thread: writes checked frames until the checkers are done; the bytes it wrote.
fn write_frames(
    mut image: ImageWriter,
    checked_rx: &crossbeam_channel::Receiver<Checked>,
    spare_tx: &crossbeam_channel::Sender<Box<[u8]>>,
    failed: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut written = 0;
    while let Ok(checked) = checked_rx.recv() {
        written += image.write(&checked).inspect_err(|_| {
            failed.store(true, Ordering::Relaxed);
        })?;
        // Reused, its pages stay mapped: a fresh buffer faults them in again.
        let _ = spare_tx.try_send(checked.data);
    }
    Ok(written)
}

/// What the thread returned; a panic in it goes on in this thread.
fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Starts the disk writing the image while it is still being restored.
///
/// An image of a few GiB stays below the kernel's background-writeback threshold (10 % of
/// memory), so without this nothing reached the disk until the final fsync, which then took a
/// quarter of the restore (1.1 s for 2.4 GiB). Every [`WRITEBACK_STEP_BYTES`] written, a
/// thread of its own asks for writeback of the whole file (`sync_file_range`, not waiting for
/// it), so the disk works while the cores decompress; the final fsync stays the durability
/// point. It is a hint: if it fails, the fsync does all the work as before.
#[derive(Clone)]
struct Writeback {
    written: u64,
    kick: crossbeam_channel::Sender<()>,
}

impl Writeback {
    fn start(file: Arc<File>) -> Writeback {
        let (kick, kicks) = crossbeam_channel::bounded::<()>(1);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            for () in kicks {
                // SAFETY: plain syscall on a descriptor `file` keeps open; no memory is passed.
                let done = unsafe {
                    libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
                };
                if done != 0 {
                    return;
                }
            }
        });
        Writeback { written: 0, kick }
    }

    fn wrote(&mut self, bytes: u64) {
        let before = self.written;
        self.written += bytes;
        if self.written / WRITEBACK_STEP_BYTES != before / WRITEBACK_STEP_BYTES {
            // Full: a writeback request is already waiting, and it covers these bytes too.
            let _ = self.kick.try_send(());
        }
    }
}

/// Where one block of a frame goes.
struct Placement {
    index: usize,
    block: u64,
    hash: ChunkHash,
}

/// The frame's placements, checked against the frame and the image: nothing the collector sends
/// can make this write outside the image or read outside the frame.
fn placements(frame: &v1::RestoreFrame, size_bytes: u64) -> anyhow::Result<Vec<Placement>> {
    let count = frame.block_count as usize;
    if count == 0 || count > MAX_FRAME_BLOCKS {
        bail!("collector sent a frame of {count} blocks (1 to {MAX_FRAME_BLOCKS} allowed)");
    }
    let n = frame.index.len();
    if frame.volume_block.len() != n || frame.hashes.len() != n {
        bail!("collector sent a frame whose block lists differ in length");
    }
    let blocks_in_image = size_bytes.div_ceil(BLOCK_SIZE_BYTES);
    (0..n)
        .map(|i| {
            let (index, block) = (frame.index[i] as usize, frame.volume_block[i]);
            let Some(hash) = ChunkHash::from_slice(&frame.hashes[i]) else {
                bail!("collector sent a block hash of {} bytes", frame.hashes[i].len());
            };
            if index >= count || block >= blocks_in_image {
                bail!("collector sent block {index} of a {count}-block frame for volume block {block}, outside the frame or the image");
            }
            Ok(Placement { index, block, hash })
        })
        .collect()
}

/// A frame's blocks, decompressed and checked, and where they go.
struct Checked {
    data: Box<[u8]>,
    runs: Vec<Run>,
}

/// A buffer for the largest frame.
fn frame_buffer() -> Box<[u8]> {
    vec![0; MAX_FRAME_BLOCKS * BLOCK_SIZE].into_boxed_slice()
}

/// `len` bytes of [`Checked::data`] from `start`, to be written at `offset` of the image.
struct Run {
    offset: u64,
    start: usize,
    len: usize,
}

/// Decompresses `frame` into `buffer` (a [`frame_buffer`]) and checks each placed block; the
/// runs to write, cut at the image end.
fn check_frame(
    size_bytes: u64,
    volume: &VolumeName,
    frame: &v1::RestoreFrame,
    mut buffer: Box<[u8]>,
) -> anyhow::Result<Checked> {
    let placed = placements(frame, size_bytes)?;
    let corrupt = |block: u64, reason: String| StoreError::CorruptBlock {
        volume: volume.clone(),
        offset_bytes: block * BLOCK_SIZE_BYTES,
        source: ChunkReadError::Corrupt {
            pack: frame.pack.clone(),
            offset: frame.pack_offset,
            reason,
        },
    };
    let Some(first) = placed.first() else {
        return Ok(Checked {
            data: buffer,
            runs: Vec::new(),
        });
    };
    let data = &mut buffer[..frame.block_count as usize * BLOCK_SIZE];
    frame::decompress_into(&frame.zstd_data, data)
        .map_err(|e| corrupt(first.block, e.to_string()))?;
    let blocks = data.as_chunks::<BLOCK_SIZE>().0;
    let placed_blocks: Vec<&[u8; BLOCK_SIZE]> = placed.iter().map(|p| &blocks[p.index]).collect();
    for (p, actual) in placed.iter().zip(block::hash_each(&placed_blocks)) {
        if actual != p.hash {
            return Err(corrupt(
                p.block,
                format!("block {} does not match its hash", p.index),
            )
            .into());
        }
    }
    // Runs consecutive both in the frame and in the volume go out in one pwrite.
    let mut runs = Vec::new();
    let mut start = 0;
    while start < placed.len() {
        let mut end = start + 1;
        while end < placed.len()
            && placed[end].index == placed[end - 1].index + 1
            && placed[end].block == placed[end - 1].block + 1
        {
            end += 1;
        }
        let offset = placed[start].block * BLOCK_SIZE_BYTES;
        let len = (end - start) * BLOCK_SIZE;
        // The image's last block may be cut short.
        let len = (len as u64).min(size_bytes - offset) as usize;
        runs.push(Run {
            offset,
            start: placed[start].index * BLOCK_SIZE,
            len,
        });
        start = end;
    }
    Ok(Checked { data: buffer, runs })
}

/// The image as the writer thread sees it: the file, and the writeback thread to nudge.
struct ImageWriter {
    file: Arc<File>,
    writeback: Writeback,
}

impl ImageWriter {
    fn new(file: File) -> ImageWriter {
        let file = Arc::new(file);
        ImageWriter {
            writeback: Writeback::start(file.clone()),
            file,
        }
    }

    /// Writes the runs of a checked frame; returns the bytes written.
    fn write(&mut self, checked: &Checked) -> anyhow::Result<u64> {
        let mut written = 0;
        for run in &checked.runs {
            let data = &checked.data[run.start..run.start + run.len];
            self.file.write_all_at(data, run.offset).map_err(|e| {
                anyhow::anyhow!("write restored image at offset {}: {e}", run.offset)
            })?;
            written += run.len as u64;
        }
        self.writeback.wrote(written);
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_frame(
        file: &File,
        size_bytes: u64,
        volume: &VolumeName,
        frame: &v1::RestoreFrame,
    ) -> anyhow::Result<u64> {
        let checked = check_frame(size_bytes, volume, frame, frame_buffer())?;
        ImageWriter::new(file.try_clone()?).write(&checked)
    }

    fn frame_of(
        blocks: &[Vec<u8>],
        placed: &[(u32, u64)],
        hashes: Option<Vec<ChunkHash>>,
    ) -> v1::RestoreFrame {
        let raw: Vec<u8> = blocks.concat();
        let hashes = hashes.unwrap_or_else(|| {
            placed
                .iter()
                .map(|(i, _)| ChunkHash::of(&blocks[*i as usize]))
                .collect()
        });
        v1::RestoreFrame {
            zstd_data: frame::compress(&raw, 1).into(),
            block_count: blocks.len() as u32,
            index: placed.iter().map(|p| p.0).collect(),
            volume_block: placed.iter().map(|p| p.1).collect(),
            hashes: hashes.iter().map(|h| h.0.to_vec().into()).collect(),
            pack: "packs/000001.pack".into(),
            pack_offset: 124,
        }
    }

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BLOCK_SIZE]
    }

    #[test]
    fn blocks_land_where_the_frame_says_and_runs_are_cut_at_the_image_end() {
        let file = tempfile::tempfile().unwrap();
        let size = 10 * BLOCK_SIZE_BYTES - 100;
        let blocks = [block(1), block(2), block(3), block(4)];
        // Blocks 0-1 of the frame go to volume blocks 3-4; block 3 to volume block 9 (the
        // last, cut short); block 2 to volume block 0; block 1 again to volume block 7.
        let frame = frame_of(&blocks, &[(2, 0), (0, 3), (1, 4), (1, 7), (3, 9)], None);
        let volume = VolumeName::new("v").unwrap();
        let written = write_frame(&file, size, &volume, &frame).unwrap();
        assert_eq!(written, 4 * BLOCK_SIZE_BYTES + BLOCK_SIZE_BYTES - 100);
        let mut image = vec![0u8; size as usize];
        file.read_exact_at(&mut image[..file.metadata().unwrap().len() as usize], 0)
            .unwrap();
        let at = |b: usize| image[b * BLOCK_SIZE];
        assert_eq!((at(0), at(3), at(4), at(7), at(9)), (3, 1, 2, 2, 4));
        assert_eq!(at(1), 0);
        assert_eq!(file.metadata().unwrap().len(), size);
    }

    fn extents(ranges: &[(u64, u64)]) -> v1::DataExtents {
        v1::DataExtents {
            start_block: ranges.iter().map(|r| r.0).collect(),
            block_count: ranges.iter().map(|r| r.1).collect(),
        }
    }

    #[test]
    fn listed_ranges_add_up_to_the_data_bytes_and_ranges_outside_the_image_are_refused() {
        let size = 64 * BLOCK_SIZE_BYTES - 100;
        let mut data = DataBytes::default();
        data.add(&extents(&[(2, 3), (10, 1)]), size).unwrap();
        data.add(&extents(&[(63, 1)]), size).unwrap();
        assert_eq!(
            data.0,
            5 * BLOCK_SIZE_BYTES - 100,
            "the last block is cut short"
        );
        for range in [(64, 1), (60, 5), (0, 0)] {
            let err = data.add(&extents(&[range]), size).unwrap_err().to_string();
            assert!(err.contains("outside the image"), "{err}");
        }
        let uneven = v1::DataExtents {
            start_block: vec![0, 1],
            block_count: vec![1],
        };
        let err = data.add(&uneven, size).unwrap_err().to_string();
        assert!(err.contains("differ in length"), "{err}");
        let file = tempfile::tempfile().unwrap();
        data.check_room(&file).unwrap();
        let err = DataBytes(u64::MAX)
            .check_room(&file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no space for the restored image") && err.contains("nothing was written"),
            "{err}"
        );
    }

    #[test]
    fn frames_checked_on_every_core_land_byte_identical_where_they_belong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let (frames, per_frame) = (16u64, 8u64);
        let size = frames * per_frame * BLOCK_SIZE_BYTES;
        let file = tideline_testkit::sized_file(&path, size);
        // Block i of frame f goes to volume block i * 16 + f: no two blocks of a frame meet,
        // and each run meets runs of the neighbouring frames.
        let content = |f: u64, i: u64| block((f * per_frame + i + 1) as u8);
        let volume = VolumeName::new("v").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let written = runtime.block_on(async {
            let writer = FrameWriter::start(file.try_clone().unwrap(), size, volume);
            for f in 0..frames {
                let blocks: Vec<Vec<u8>> = (0..per_frame).map(|i| content(f, i)).collect();
                let placed: Vec<(u32, u64)> =
                    (0..per_frame).map(|i| (i as u32, i * frames + f)).collect();
                assert!(writer.submit(frame_of(&blocks, &placed, None)).await);
            }
            writer.finish().await.unwrap()
        });
        assert_eq!(written, size);
        let mut back = vec![0u8; size as usize];
        file.read_exact_at(&mut back, 0).unwrap();
        for f in 0..frames {
            for i in 0..per_frame {
                let at = ((i * frames + f) * BLOCK_SIZE_BYTES) as usize;
                assert!(
                    back[at..at + BLOCK_SIZE] == content(f, i),
                    "block {i} of frame {f}"
                );
            }
        }
    }

    #[test]
    fn a_block_that_does_not_match_its_hash_names_the_volume_offset_and_pack() {
        let file = tempfile::tempfile().unwrap();
        let blocks = [block(1), block(2)];
        let lie = vec![ChunkHash::of(&blocks[0]), ChunkHash::of(&block(9))];
        let frame = frame_of(&blocks, &[(0, 0), (1, 5)], Some(lie));
        let volume = VolumeName::new("data").unwrap();
        let err = write_frame(&file, 1 << 20, &volume, &frame)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("volume data: block at offset 20480 is corrupt: pack packs/000001.pack byte 124: block 1 does not match its hash"),
            "{err}"
        );
        assert_eq!(file.metadata().unwrap().len(), 0, "nothing written");
    }

    #[test]
    fn frames_that_point_outside_the_frame_or_the_image_are_refused() {
        let volume = VolumeName::new("v").unwrap();
        let file = tempfile::tempfile().unwrap();
        let blocks = [block(1)];
        for (placed, size) in [(&[(1u32, 0u64)][..], 1 << 20), (&[(0, 256)][..], 1 << 20)] {
            let frame = frame_of(&blocks, placed, Some(vec![ChunkHash::of(&blocks[0])]));
            let err = write_frame(&file, size, &volume, &frame)
                .unwrap_err()
                .to_string();
            assert!(err.contains("outside the frame or the image"), "{err}");
        }
        let mut frame = frame_of(&blocks, &[(0, 0)], None);
        frame.block_count = 0;
        assert!(write_frame(&file, 1 << 20, &volume, &frame).is_err());
        let mut frame = frame_of(&blocks, &[(0, 0)], None);
        frame.zstd_data = b"not zstd".to_vec().into();
        let err = write_frame(&file, 1 << 20, &volume, &frame)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is corrupt"), "{err}");
        assert_eq!(file.metadata().unwrap().len(), 0);
    }
}
