//! A consistency group as the agent sees it: its volumes, its spool, and the one lock that
//! gives all of them a single journal order.
//!
//! Every change to a volume happens inside [`Group::journalled`]: the change is applied to the
//! backing file and its record appended to the spool under the group lock, so the order of
//! records in the journal is the order in which the changes hit the volumes. Edge blocks of an
//! unaligned change are read back from the volume inside the same critical section, which is
//! what makes every journal record block-aligned and self-contained.
//!
//! One exception keeps large writes from queueing behind each other at the disk: a write that
//! goes around the page cache ([`DirectWriter`]) is written with the lock released, several at
//! once, as qemu-nbd's thread pool does. Its blocks are marked dirty and listed as *in flight*
//! first; any other change, or resync, touching them waits until it is done, and its record is
//! appended only once its data is on the volume. So a record still never describes data the
//! volume might not hold, and the journal order is the order in which changes reached each
//! block (writes to different blocks commute). At most [`MAX_UNLOCKED_WRITES`] run at once per
//! volume; the next ones wait for a slot of their own, woken one at a time, so a client with
//! 64 large writes queued does not wake every waiting thread whenever one write finishes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tideline_core::dirty::{DirtyMap, Opened};
use tideline_core::record::{Record, RecordKind, WriteOrigin};
use tideline_core::spool::{BlockSave, Spool, SpoolError, SpoolOp, Succession};
use tideline_core::{
    block, BlockNo, ChunkHash, GroupName, Seq, VolumeName, BLOCK_SIZE, BLOCK_SIZE_BYTES,
};

use tideline_core::direct::{read_buffered_exact_at, suits_direct, BlockReader, DirectWriter};

use crate::on_volume::OnVolumeMap;
use crate::recent::{Paced, RecentWrites};

/// Most writes to one volume that run with the group lock released at the same time (each
/// holds a 1 MiB bounce buffer): as many as fio or qemu keep queued. fio's 2 GiB of 1 MiB
/// writes at queue depth 16 through the tap, three alternating pairs: 298-304 MB/s with 8,
/// 322-348 with 16.
const MAX_UNLOCKED_WRITES: usize = 16;

/// One protected volume's backing store and dirty map.
pub struct VolumeState {
    pub name: VolumeName,
    pub path: PathBuf,
    /// Shared with the shipper, which reads back the blocks of writes spooled as
    /// [`SpoolOp::OnVolume`].
    pub file: Arc<File>,
    /// The same file for large aligned writes, when its filesystem takes direct I/O.
    pub direct: Option<DirectWriter>,
    pub size_bytes: u64,
    pub dirty: DirtyMap,
    /// True while the journal has a gap for this volume (spool overflow) not yet resynced.
    pub in_gap: bool,
    /// Block ranges `[first, end)` being written with the group lock released.
    pub in_flight: Vec<(u64, u64)>,
    /// Direct writers of finished unlocked writes, for the next ones.
    pub idle_writers: Vec<DirectWriter>,
    /// Blocks that are the only copy of an unshipped record's data.
    pub on_volume: OnVolumeMap,
}

impl VolumeState {
    fn overlaps_in_flight(&self, first: u64, end: u64) -> bool {
        self.in_flight.iter().any(|&(f, e)| f < end && first < e)
    }

    /// Takes `blocks` off the in-flight list (once: a range is listed once per writer).
    fn stop_flight(&mut self, blocks: (u64, u64)) {
        if let Some(at) = self.in_flight.iter().position(|&b| b == blocks) {
            self.in_flight.swap_remove(at);
        }
    }
}

/// Blocks `[from, to)` of unshipped record `seq` to save before they are overwritten.
struct PendingSave {
    seq: Seq,
    from: u64,
    to: u64,
    /// Their data, if the record's is still in memory.
    in_memory: Option<Bytes>,
}

impl PendingSave {
    fn blocks(&self) -> (u64, u64) {
        (self.from, self.to)
    }
}

pub struct Group {
    pub name: GroupName,
    pub spool: Spool,
    state: Mutex<Vec<VolumeState>>,
    /// Notified whenever a write made with the lock released has finished.
    settled: Condvar,
    /// Per volume, the writes that may run with the lock released at once.
    unlocked_slots: Vec<Slots>,
    /// Per volume, its name and a reader of its file, usable without the lock.
    readers: Vec<(VolumeName, BlockReader)>,
    /// The data of the newest writes spooled without it, and the pacing of large writes to
    /// the shipper.
    pub recent: RecentWrites,
}

/// A write to be made with the group lock released: volume `index`, blocks `[first, end)`
/// starting at byte `offset`, holding one of the volume's slots.
struct UnlockedWrite<'a> {
    index: usize,
    blocks: (u64, u64),
    offset: u64,
    slot: Option<Slot<'a>>,
}

/// A counting gate whose waiters are woken one at a time.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

/// One taken slot, given back when dropped.
struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(count: usize) -> Slots {
        Slots {
            free: Mutex::new(count),
            freed: Condvar::new(),
        }
    }

    fn take(&self) -> Slot<'_> {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mut free = self
            .freed
            .wait_while(free, |free| *free == 0)
            .unwrap_or_else(|p| p.into_inner());
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// Errors of a journalled change, mapped to an errno for the client.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("volume {volume}: {context}: {source}")]
    Io {
        volume: VolumeName,
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl From<TapError> for io::Error {
    fn from(e: TapError) -> io::Error {
        match e {
            TapError::Io { source, .. } => source,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A change to apply to a volume.
#[derive(Debug, Clone)]
pub enum Change {
    /// The bytes, moved into the journal once written to the volume.
    Write(Bytes),
    Trim(u64),
    Zero {
        len_bytes: u64,
        may_punch: bool,
    },
}

impl Change {
    fn len_bytes(&self) -> u64 {
        match self {
            Change::Write(data) => data.len() as u64,
            Change::Trim(len) => *len,
            Change::Zero { len_bytes, .. } => *len_bytes,
        }
    }
}

impl Group {
    pub fn new(name: GroupName, spool: Spool, mut volumes: Vec<VolumeState>) -> Group {
        remember_on_volume(&spool, &mut volumes);
        Group {
            name,
            spool,
            unlocked_slots: volumes
                .iter()
                .map(|_| Slots::new(MAX_UNLOCKED_WRITES))
                .collect(),
            readers: volumes
                .iter()
                .map(|v| (v.name.clone(), BlockReader::new(&v.path, v.file.clone())))
                .collect(),
            recent: RecentWrites::new(None),
            state: Mutex::new(volumes),
            settled: Condvar::new(),
        }
    }

    /// Large writes wait for a connected shipper `max_lag` behind ([`crate::recent`]); a new
    /// group never holds writes up.
    pub fn pacing_writes(mut self, max_lag: Option<Duration>) -> Group {
        self.recent = RecentWrites::new(max_lag);
        self
    }

    pub fn lock(&self) -> MutexGuard<'_, Vec<VolumeState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` at `offset` of volume `index` and journals it, in one critical section
    /// (or, for a large direct write, two: see the module documentation).
    pub fn journalled(&self, index: usize, offset: u64, change: Change) -> Result<(), TapError> {
        let first = offset / BLOCK_SIZE_BYTES;
        let count = (offset + change.len_bytes()).div_ceil(BLOCK_SIZE_BYTES) - first;
        // Taken before the lock: a write waiting for a slot must not hold up the others.
        let slot = self.slot_for(index, offset, &change);
        // A large aligned write (one that may go around the page cache) is spooled without its
        // data, which stays on the volume: its blocks are hashed here, before the lock.
        let hashes = match &change {
            Change::Write(data) if slot.is_some() => Some(block::chunks_of(data)),
            _ => None,
        };
        let volumes = self.lock();
        // Blocks in flight are not touched until that write is done, and the blocks of
        // unshipped large writes there are saved first.
        let mut volumes = self.settle(volumes, index, first, first + count)?;
        // A slot is only taken for a write that suits direct I/O, and a writer the kernel
        // refused is dropped (`finish_direct_write`), so this is all that is left to ask.
        let unlocked = slot.is_some() && volumes[index].direct.is_some();
        let volume = &mut volumes[index];
        // Write intent: the blocks stay marked in the (memory-mapped, so kill -9 proof) dirty
        // map from before the volume changes until the change's records are in the spool. A
        // crash in between leaves the mark, and the next start resyncs those blocks instead of
        // letting the journal silently disagree with the volume.
        if !volume.in_gap {
            volume.dirty.mark(first, count);
        }
        let result = match (change, hashes) {
            (Change::Write(data), Some(hashes)) if unlocked => {
                let applied;
                let blocks = (first, first + count);
                let write = UnlockedWrite {
                    index,
                    blocks,
                    offset,
                    slot,
                };
                (volumes, applied) = self.write_unlocked(volumes, write, &data);
                applied
                    .and_then(|()| self.journal_on_volume(&mut volumes[index], first, hashes, data))
            }
            // A file system that takes no direct I/O: through the page cache, and the data is
            // kept on the volume all the same.
            (Change::Write(data), Some(hashes)) => write_volume(volume, offset, &data)
                .and_then(|()| self.journal_on_volume(volume, first, hashes, data)),
            (change, _) => self.apply_and_journal(volume, offset, change),
        };
        let volume = &mut volumes[index];
        match result {
            // Journalled in whole blocks: the journal accounts for these blocks now.
            Ok(()) if !volume.in_gap => volume.dirty.clear(first, count),
            Ok(()) => {}
            // The volume may have changed without a record: resync the marked blocks.
            Err(_) => volume.dirty.set_resync_pending(true),
        }
        result
    }

    /// Whether a change to bytes `[offset, offset + len)` of volume `index` would wait for the
    /// disk first: for a write in flight there, or to save an unshipped large write.
    pub fn change_waits_on_disk(&self, index: usize, offset: u64, len: u64) -> bool {
        let first = offset / BLOCK_SIZE_BYTES;
        let end = offset.saturating_add(len).div_ceil(BLOCK_SIZE_BYTES);
        let volumes = self.lock();
        let Some(volume) = volumes.get(index) else {
            return false;
        };
        volume.overlaps_in_flight(first, end) || volume.on_volume.overlaps(first, end)
    }

    /// A slot of volume `index` if `change` may be written with the lock released.
    /// Such a write is kept on the volume, its data in memory for the shipper: it is paced to
    /// the shipper first (see [`crate::recent`]).
    fn slot_for(&self, index: usize, offset: u64, change: &Change) -> Option<Slot<'_>> {
        match change {
            Change::Write(data) if suits_direct(offset, data.len()) => {
                if self.recent.wait_for_shipper() == Paced::ShipperStalled {
                    tracing::debug!(group = %self.name,
                        "the shipper took nothing for a while: a large write goes ahead without it");
                }
                Some(self.unlocked_slots[index].take())
            }
            _ => None,
        }
    }

    /// Makes `write` (its `data`) around the page cache with the group lock released, the
    /// blocks listed as in flight meanwhile and its slot given back once the data is on the
    /// volume; returns the lock, taken again.
    fn write_unlocked<'a>(
        &'a self,
        mut volumes: MutexGuard<'a, Vec<VolumeState>>,
        write: UnlockedWrite<'a>,
        data: &[u8],
    ) -> (MutexGuard<'a, Vec<VolumeState>>, Result<(), TapError>) {
        let UnlockedWrite {
            index,
            blocks,
            offset,
            slot,
        } = write;
        let volume = &mut volumes[index];
        let writer = volume.idle_writers.pop().or_else(|| {
            let direct = volume.direct.as_ref()?;
            direct.try_clone().ok()
        });
        // Direct I/O refused meanwhile, or no descriptor to spare: write with the lock held.
        let Some(mut writer) = writer else {
            let result = write_volume(volume, offset, data);
            return (volumes, result);
        };
        volume.in_flight.push(blocks);
        drop(volumes);
        let written = writer.write(data, offset);
        // The disk is free for the next one while this write is journalled.
        drop(slot);
        let mut volumes = self.lock();
        let volume = &mut volumes[index];
        volume.stop_flight(blocks);
        self.settled.notify_all();
        if matches!(written, Ok(true)) {
            volume.idle_writers.push(writer);
        }
        let result = finish_direct_write(volume, written, offset, data);
        (volumes, result)
    }

    fn apply_and_journal(
        &self,
        volume: &mut VolumeState,
        offset: u64,
        change: Change,
    ) -> Result<(), TapError> {
        apply(volume, offset, &change)?;
        self.journal(volume, offset, change)
    }

    /// Appends the records of `change`, already applied to the volume.
    fn journal(
        &self,
        volume: &mut VolumeState,
        offset: u64,
        change: Change,
    ) -> Result<(), TapError> {
        for op in records_for(volume, offset, change)? {
            self.append_or_mark_gap(volume, op)?;
        }
        Ok(())
    }

    /// Appends the record of a whole-block write the volume now holds, without its data; its
    /// blocks are the record's data until the collector holds it.
    fn journal_on_volume(
        &self,
        volume: &mut VolumeState,
        first: u64,
        blocks: Vec<Option<ChunkHash>>,
        data: Bytes,
    ) -> Result<(), TapError> {
        let end = first + blocks.len() as u64;
        let kind = RecordKind::Write {
            volume: volume.name.clone(),
            first: BlockNo(first),
            blocks,
            origin: WriteOrigin::Client,
        };
        if let Some(seq) = self.append_or_mark_gap(volume, SpoolOp::OnVolume(kind))? {
            volume.on_volume.insert(first, end, seq);
            self.recent.keep(seq, data);
        }
        Ok(())
    }

    /// Waits until no write in flight touches blocks `[first, end)` of volume `index` and no
    /// unshipped record's only copy is there. Such records' blocks are saved to the spool
    /// first: all of each record's blocks still on the volume, so small changes scattered over
    /// a large write cost one save between them. The lock is released while saving, with
    /// those blocks in flight, so a save's fdatasync holds up only the changes that touch
    /// them, and concurrent saves share one. With the spool full, the journal gets a gap
    /// instead (the records' blocks are then lost to it, and found so when they ship). A
    /// record is forgotten only once saved.
    fn settle<'a>(
        &'a self,
        mut volumes: MutexGuard<'a, Vec<VolumeState>>,
        index: usize,
        first: u64,
        end: u64,
    ) -> Result<MutexGuard<'a, Vec<VolumeState>>, TapError> {
        loop {
            volumes = self
                .settled
                .wait_while(volumes, |volumes| {
                    volumes[index].overlaps_in_flight(first, end)
                })
                .unwrap_or_else(|p| p.into_inner());
            let volume = &mut volumes[index];
            let mut records: Vec<Seq> = volume
                .on_volume
                .overlapping(first, end)
                .into_iter()
                .map(|(_, _, seq)| seq)
                .collect();
            if records.is_empty() {
                return Ok(volumes);
            }
            records.sort_unstable();
            records.dedup();
            if volume.in_gap {
                records.iter().for_each(|&seq| volume.on_volume.remove(seq));
                continue;
            }
            let saves = self.saves_of(volume, &records);
            volume
                .in_flight
                .extend(saves.iter().map(PendingSave::blocks));
            drop(volumes);
            let saved = self.save(index, saves.iter());
            volumes = self.lock();
            let volume = &mut volumes[index];
            for save in &saves {
                volume.stop_flight(save.blocks());
            }
            self.settled.notify_all();
            match saved {
                Ok(()) => {}
                Err(TapError::Spool(SpoolError::Full { .. })) => self.open_gap(volume)?,
                Err(e) => return Err(e),
            }
            records.iter().for_each(|&seq| volume.on_volume.remove(seq));
        }
    }

    /// What saving `records` takes: each part of theirs still on the volume, with its data
    /// if that is still in memory.
    fn saves_of(&self, volume: &VolumeState, records: &[Seq]) -> Vec<PendingSave> {
        let mut saves = Vec::new();
        for &seq in records {
            let data = self
                .recent
                .get(seq)
                .zip(volume.on_volume.first_block_of(seq));
            for (from, to) in volume.on_volume.parts_of(seq) {
                let in_memory = data.as_ref().map(|(data, start)| {
                    let at = ((from - start) as usize) * BLOCK_SIZE;
                    data.slice(at..at + (to - from) as usize * BLOCK_SIZE)
                });
                saves.push(PendingSave {
                    seq,
                    from,
                    to,
                    in_memory,
                });
            }
        }
        saves
    }

    /// Saves `saves` of volume `index` (their blocks in flight, so the volume holds them),
    /// reading from the volume what is not in memory.
    fn save<'s>(
        &self,
        index: usize,
        saves: impl Iterator<Item = &'s PendingSave>,
    ) -> Result<(), TapError> {
        let (name, reader) = &self.readers[index];
        let blocks = saves
            .map(|save| {
                let data = match &save.in_memory {
                    Some(data) => data.clone(),
                    None => reader
                        .read_exact_at(
                            (save.to - save.from) as usize * BLOCK_SIZE,
                            save.from * BLOCK_SIZE_BYTES,
                        )
                        .map_err(|source| TapError::Io {
                            volume: name.clone(),
                            context: "read back blocks to save",
                            source,
                        })?
                        .freeze(),
                };
                Ok(BlockSave {
                    seq: save.seq,
                    first: BlockNo(save.from),
                    data,
                })
            })
            .collect::<Result<Vec<_>, TapError>>()?;
        Ok(self.spool.save_blocks(&blocks)?)
    }

    /// The collector holds every record through `seq`: frees the spool's segments wholly at
    /// or below it, and the volumes' blocks those records' data was kept in.
    pub fn release_through(&self, seq: Seq) -> Result<(), SpoolError> {
        for volume in self.lock().iter_mut() {
            volume.on_volume.forget_through(seq);
        }
        self.recent.forget_through(seq);
        self.spool.release_through(seq)
    }

    /// The blocks of `record`, a write spooled without its data, from the volume or, where
    /// the volume has changed since, from the blocks saved before it did; checked against the
    /// record's hashes.
    pub fn on_volume_data(&self, record: &Record) -> Result<Bytes, OnVolumeError> {
        let RecordKind::Write {
            volume,
            first,
            blocks,
            ..
        } = &record.kind
        else {
            return Err(OnVolumeError::NotAWrite(record.seq));
        };
        // The bytes the write brought, which its hashes were taken from.
        if let Some(data) = self.recent.take(record.seq) {
            return Ok(data);
        }
        let reader = self
            .volume_reader(volume)
            .ok_or_else(|| OnVolumeError::NoSuchVolume(record.seq, volume.clone()))?;
        let read_failed = |source| OnVolumeError::Read {
            seq: record.seq,
            volume: volume.clone(),
            source,
        };
        let mut data = reader
            .read_exact_at(blocks.len() * BLOCK_SIZE, first.0 * BLOCK_SIZE_BYTES)
            .map_err(read_failed)?;
        if block::chunks_of(&data) == *blocks {
            return Ok(data.freeze());
        }
        // Read after the volume: a change that overwrote these blocks meanwhile saved them
        // before it started.
        let saved = self
            .spool
            .saved_blocks(record.seq)
            .map_err(|e| read_failed(io::Error::other(e)))?;
        let end = first.0 + blocks.len() as u64;
        for (from, bytes) in saved {
            let to = from.0 + (bytes.len() / BLOCK_SIZE) as u64;
            let (lo, hi) = (from.0.max(first.0), to.min(end));
            if lo < hi {
                let src =
                    ((lo - from.0) as usize * BLOCK_SIZE)..((hi - from.0) as usize * BLOCK_SIZE);
                let dst =
                    ((lo - first.0) as usize * BLOCK_SIZE)..((hi - first.0) as usize * BLOCK_SIZE);
                data[dst].copy_from_slice(&bytes[src]);
            }
        }
        if block::chunks_of(&data) == *blocks {
            return Ok(data.freeze());
        }
        Err(OnVolumeError::Lost {
            seq: record.seq,
            volume: volume.clone(),
            first: *first,
            count: blocks.len() as u64,
        })
    }

    /// Blocks of `volume` whose journalled data was lost: they are journalled again, as the
    /// volume holds them, by a resync that ends with a `Complete` record.
    pub fn resync_lost(&self, volume: &VolumeName, first: BlockNo, count: u64) {
        let mut volumes = self.lock();
        if let Some(v) = volumes.iter_mut().find(|v| v.name == *volume) {
            v.dirty.mark(first.0, count);
            v.dirty.set_resync_pending(true);
        }
    }

    /// The reader of the volume called `name`, usable without the group lock.
    pub fn volume_reader(&self, name: &VolumeName) -> Option<&BlockReader> {
        self.readers.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }

    /// Appends `op` to the spool and returns its seq; if the spool is full, marks the blocks
    /// dirty instead and opens a gap in the journal (once), so writes keep flowing and a
    /// resync catches up later.
    fn append_or_mark_gap(
        &self,
        volume: &mut VolumeState,
        op: SpoolOp,
    ) -> Result<Option<Seq>, TapError> {
        // The blocks `op` covers, known before `op` moves into the spool (no copy of its data).
        let blocks = blocks_of(&op);
        if volume.in_gap {
            mark_dirty(volume, blocks);
            return Ok(None);
        }
        match self.spool.append(op) {
            Ok((seq, _)) => Ok(Some(seq)),
            Err(SpoolError::Full { .. }) => {
                self.open_gap(volume)?;
                mark_dirty(volume, blocks);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The spool is full: journals a gap for `volume`, whose changes the dirty map tracks
    /// from now on, until a resync catches up.
    fn open_gap(&self, volume: &mut VolumeState) -> Result<(), TapError> {
        tracing::warn!(group = %self.name, volume = %volume.name,
            "spool full: tracking changed blocks in the dirty map until the collector catches up");
        self.spool.append(SpoolOp::Other(RecordKind::Gap {
            volume: volume.name.clone(),
        }))?;
        volume.in_gap = true;
        volume.dirty.set_resync_pending(true);
        Ok(())
    }

    /// FLUSH: the volume's data and every spooled record are durable, and a flush point is
    /// journalled, before this returns.
    ///
    /// The dirty map is synced only while it holds marks that are the sole record of acknowledged
    /// writes (a journal gap or a pending resync); the write-intent marks of journalled changes
    /// need no durability, and an msync per flush would add a third synchronous write to every
    /// FLUSH.
    pub fn flush(&self, index: usize) -> Result<(), TapError> {
        let (file, name) = {
            let volumes = self.lock();
            let volume = &volumes[index];
            if volume.in_gap || volume.dirty.resync_pending() {
                volume
                    .dirty
                    .flush()
                    .map_err(io_error(volume, "flush dirty map"))?;
            }
            let file = volume
                .file
                .try_clone()
                .map_err(io_error(volume, "clone backing file handle"))?;
            (file, volume.name.clone())
        };
        file.sync_data().map_err(|source| TapError::Io {
            volume: name,
            context: "fsync backing volume",
            source,
        })?;
        self.spool
            .append_durable(SpoolOp::Other(RecordKind::Flush))?;
        Ok(())
    }
}

impl Group {
    /// The collector's journal and this spool cannot be joined: the collector holds records
    /// this group's spool lost (a power loss took them from the page cache after they were
    /// shipped), so the spool's seqs would collide with the collector's; or the collector
    /// lacks records the spool freed once another collector had acknowledged them. Journals a
    /// gap for every volume and marks each whole for a resync, durably, then continues the
    /// journal as a successor spool after the seq before the first gap.
    /// Records spooled between the loss and that gap are not shipped: the resync journals their
    /// blocks as the volume holds them, after the gap.
    pub fn continue_after_loss(&self) -> Result<Succession, TapError> {
        let mut volumes = self.lock();
        let mut resume_after = None;
        for volume in volumes.iter_mut() {
            let (gap, _) = self.spool.append(SpoolOp::Other(RecordKind::Gap {
                volume: volume.name.clone(),
            }))?;
            resume_after.get_or_insert(Seq(gap.0 - 1));
            self.spool
                .append_durable(trim_whole(&volume.name, volume.size_bytes))?;
            resync_whole(&mut volume.dirty, &volume.file, volume.size_bytes)
                .map_err(io_error(volume, "mark the volume for a resync"))?;
        }
        let resume_after = resume_after.unwrap_or_else(|| self.spool.last_seq());
        // The records up to there are never shipped: their blocks need not be kept.
        for volume in volumes.iter_mut() {
            volume.on_volume.forget_through(resume_after);
        }
        Ok(self.spool.succeed(resume_after)?)
    }
}

/// Fills the volumes' maps of blocks that hold unshipped records' data from the records the
/// spool held when it was opened, in seq order, less the blocks saved for them.
fn remember_on_volume(spool: &Spool, volumes: &mut [VolumeState]) {
    for (seq, kind) in spool.take_recovered_on_volume() {
        let RecordKind::Write {
            volume,
            first,
            blocks,
            ..
        } = kind
        else {
            continue;
        };
        let Some(v) = volumes.iter_mut().find(|v| v.name == volume) else {
            continue;
        };
        v.on_volume
            .insert(first.0, first.0 + blocks.len() as u64, seq);
        for (from, count) in spool.saved_ranges(seq) {
            v.on_volume.take_overlapping(from.0, from.0 + count);
        }
    }
}

/// Why the data of a write spooled without it cannot be shipped.
#[derive(Debug, thiserror::Error)]
pub enum OnVolumeError {
    #[error("spooled record {0} is kept on the volume but is not a write")]
    NotAWrite(Seq),
    #[error("record {0} names volume {1}, which this agent does not protect")]
    NoSuchVolume(Seq, VolumeName),
    #[error("volume {volume}: read back the blocks of record {seq}: {source}")]
    Read {
        seq: Seq,
        volume: VolumeName,
        #[source]
        source: io::Error,
    },
    #[error("volume {volume}: blocks {}..+{count} of record {seq} changed before it was shipped and were not saved (changed outside the agent, or the spool was full)", first.0)]
    Lost {
        seq: Seq,
        volume: VolumeName,
        first: BlockNo,
        count: u64,
    },
}

/// The (first block, count) a spooled change covers, if any.
fn blocks_of(op: &SpoolOp) -> Option<(u64, u64)> {
    match op {
        SpoolOp::Write { first, data, .. } => Some((first.0, (data.len() / BLOCK_SIZE) as u64)),
        SpoolOp::Other(RecordKind::Trim { first, count, .. })
        | SpoolOp::Other(RecordKind::WriteZeroes { first, count, .. }) => Some((first.0, *count)),
        SpoolOp::OnVolume(RecordKind::Write { first, blocks, .. }) => {
            Some((first.0, blocks.len() as u64))
        }
        SpoolOp::OnVolume(_) | SpoolOp::Other(_) => None,
    }
}

fn mark_dirty(volume: &mut VolumeState, blocks: Option<(u64, u64)>) {
    if let Some((first, count)) = blocks {
        volume.dirty.mark(first, count);
    }
}

fn io_error<'a>(
    volume: &'a VolumeState,
    context: &'static str,
) -> impl FnOnce(io::Error) -> TapError + 'a {
    move |source| TapError::Io {
        volume: volume.name.clone(),
        context,
        source,
    }
}

fn apply(volume: &mut VolumeState, offset: u64, change: &Change) -> Result<(), TapError> {
    match *change {
        Change::Write(ref data) => write_volume(volume, offset, data),
        Change::Trim(len) => {
            punch_or_zero(&volume.file, offset, len, true).map_err(io_error(volume, "discard"))
        }
        Change::Zero {
            len_bytes,
            may_punch,
        } => punch_or_zero(&volume.file, offset, len_bytes, may_punch)
            .map_err(io_error(volume, "write zeroes")),
    }
}

/// Writes `data` to the volume: around the page cache when it is large and aligned and the
/// filesystem allows ([`crate::direct`]), else through it.
fn write_volume(volume: &mut VolumeState, offset: u64, data: &[u8]) -> Result<(), TapError> {
    match volume
        .direct
        .as_mut()
        .filter(|d| d.takes(offset, data.len()))
    {
        Some(direct) => {
            let written = direct.write(data, offset);
            finish_direct_write(volume, written, offset, data)
        }
        None => volume
            .file
            .write_all_at(data, offset)
            .map_err(io_error(volume, "write backing volume")),
    }
}

/// The outcome of a direct write of `data`. If the kernel refused direct I/O for the file, the
/// volume is written through the page cache from then on, starting with `data`.
fn finish_direct_write(
    volume: &mut VolumeState,
    written: io::Result<bool>,
    offset: u64,
    data: &[u8],
) -> Result<(), TapError> {
    match written {
        Ok(true) => Ok(()),
        Ok(false) => {
            volume.direct = None;
            volume.idle_writers.clear();
            volume
                .file
                .write_all_at(data, offset)
                .map_err(io_error(volume, "write backing volume"))
        }
        Err(source) => Err(io_error(volume, "write backing volume")(source)),
    }
}

/// Deallocates (or zeroes in place) a range, falling back to writing zeroes where the file
/// system or device does not support fallocate.
fn punch_or_zero(file: &File, offset: u64, len: u64, may_punch: bool) -> io::Result<()> {
    let mode = if may_punch {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: fallocate on a valid, open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads whole blocks `[first, first + count)` from the volume, through the page cache: the
/// edge blocks of unaligned changes and a resync's runs, read under the group lock.
pub fn read_blocks(volume: &VolumeState, first: u64, count: u64) -> Result<Bytes, TapError> {
    let len = (count * BLOCK_SIZE_BYTES) as usize;
    read_buffered_exact_at(&volume.file, len, first * BLOCK_SIZE_BYTES)
        .map(BytesMut::freeze)
        .map_err(io_error(volume, "read back blocks"))
}

/// The spool entries describing `change` once applied: whole blocks only.
fn records_for(
    volume: &VolumeState,
    offset: u64,
    change: Change,
) -> Result<Vec<SpoolOp>, TapError> {
    let len = change.len_bytes();
    let first = offset / BLOCK_SIZE_BYTES;
    let end_block = (offset + len).div_ceil(BLOCK_SIZE_BYTES);
    let aligned = offset.is_multiple_of(BLOCK_SIZE_BYTES) && len.is_multiple_of(BLOCK_SIZE_BYTES);
    let name = volume.name.clone();
    let write = |first: u64, data: Bytes| SpoolOp::Write {
        volume: name.clone(),
        first: BlockNo(first),
        data,
        origin: WriteOrigin::Client,
    };
    match change {
        Change::Write(data) if aligned => Ok(vec![write(first, data)]),
        Change::Write(_) => Ok(vec![write(
            first,
            read_blocks(volume, first, end_block - first)?,
        )]),
        Change::Trim(_) | Change::Zero { .. } => {
            // Whole blocks inside the range become a trim/zero record; partial edge blocks are
            // read back and journalled as writes.
            let inner_first = offset.div_ceil(BLOCK_SIZE_BYTES);
            let inner_end = (offset + len) / BLOCK_SIZE_BYTES;
            let mut ops = Vec::new();
            if inner_first >= inner_end {
                ops.push(write(first, read_blocks(volume, first, end_block - first)?));
                return Ok(ops);
            }
            if first < inner_first {
                ops.push(write(first, read_blocks(volume, first, 1)?));
            }
            let (first_inner, count) = (BlockNo(inner_first), inner_end - inner_first);
            ops.push(SpoolOp::Other(match change {
                Change::Trim(_) => RecordKind::Trim {
                    volume: volume.name.clone(),
                    first: first_inner,
                    count,
                },
                _ => RecordKind::WriteZeroes {
                    volume: volume.name.clone(),
                    first: first_inner,
                    count,
                },
            }));
            if inner_end < end_block {
                ops.push(write(inner_end, read_blocks(volume, inner_end, 1)?));
            }
            Ok(ops)
        }
    }
}

/// Opens a volume's dirty map; a volume never protected before (or whose map was moved aside
/// to force a full resync) gets its allocated extents marked for a baseline, and says so.
pub fn open_dirty_map(
    spool_dir: &std::path::Path,
    volume: &VolumeName,
    file: &File,
    size_bytes: u64,
) -> anyhow::Result<(DirtyMap, Opened)> {
    let path = spool_dir.join(format!("{volume}.dirty"));
    let blocks = size_bytes / BLOCK_SIZE_BYTES;
    let (mut map, opened) = DirtyMap::open(&path, blocks)?;
    if opened == Opened::Created {
        resync_whole(&mut map, file, size_bytes)?;
    }
    Ok((map, opened))
}

/// A trim of the whole volume, journalled right after the gap of a resync of every allocated
/// block. A power loss can take trims the collector never received; their blocks are holes in
/// the volume now, which the resync does not read, so without this the journal would keep
/// their old content for good. After it, the resync's writes make the journal equal the
/// volume again (holes read as zeros); the moments in between lie in the gap.
pub fn trim_whole(volume: &VolumeName, size_bytes: u64) -> SpoolOp {
    SpoolOp::Other(RecordKind::Trim {
        volume: volume.clone(),
        first: BlockNo(0),
        count: size_bytes / BLOCK_SIZE_BYTES,
    })
}

/// Marks every allocated block of the volume for a resync and makes the marks durable.
fn resync_whole(map: &mut DirtyMap, file: &File, size_bytes: u64) -> io::Result<()> {
    mark_allocated(map, file, size_bytes)?;
    map.set_resync_pending(true);
    map.flush()
}

/// Marks every allocated block of the volume dirty: a resync then journals all of them as the
/// volume holds them.
pub fn mark_allocated(map: &mut DirtyMap, file: &File, size_bytes: u64) -> io::Result<()> {
    for (start, end) in allocated_extents(file, size_bytes)? {
        let first = start / BLOCK_SIZE_BYTES;
        map.mark(first, end.div_ceil(BLOCK_SIZE_BYTES) - first);
    }
    Ok(())
}

/// Allocated byte ranges of a file, found with SEEK_DATA / SEEK_HOLE. Block devices (and file
/// systems without support) report one extent covering everything.
pub fn allocated_extents(file: &File, size_bytes: u64) -> io::Result<Vec<(u64, u64)>> {
    allocated_extents_in(file, 0, size_bytes)
}

/// Allocated byte ranges of `[start, end)` of a file, clipped to that range.
pub fn allocated_extents_in(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    let mut extents = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a valid descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(extents),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(start, end)]),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(end));
        if data >= end {
            break;
        }
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}
/// What one resync step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncStep {
    /// Journalled this many blocks; call again.
    Journalled(u64),
    /// Waiting for spool space.
    SpoolBusy,
    /// Nothing is dirty: every volume of the group is complete.
    Idle,
}

/// Blocks journalled per resync record (1 MiB).
const RESYNC_RUN_BLOCKS: u64 = 256;

impl Group {
    /// Journals one run of dirty blocks of the first volume that needs it, or closes its
    /// resync with a `Complete` record. Only proceeds while the spool is at most half full, so
    /// a resync never crowds out client writes.
    pub fn resync_step(&self) -> Result<ResyncStep, TapError> {
        let mut volumes = self.lock();
        let Some(index) = volumes.iter().position(|v| v.dirty.resync_pending()) else {
            return Ok(ResyncStep::Idle);
        };
        if self.spool.used_bytes() > self.spool.max_bytes() / 2 {
            return Ok(ResyncStep::SpoolBusy);
        }
        // Blocks being written with the lock released are not read until that write is done
        // (its own record follows; reading them now could journal half of it).
        let run = |v: &mut VolumeState| v.dirty.first_run(RESYNC_RUN_BLOCKS);
        volumes = self
            .settled
            .wait_while(volumes, |volumes| {
                let v = &mut volumes[index];
                run(v).is_some_and(|(first, count)| v.overlaps_in_flight(first, first + count))
            })
            .unwrap_or_else(|p| p.into_inner());
        let volume = &mut volumes[index];
        let Some((first, count)) = run(volume) else {
            self.spool.append(SpoolOp::Other(RecordKind::Complete {
                volume: volume.name.clone(),
            }))?;
            volume.in_gap = false;
            volume.dirty.set_resync_pending(false);
            tracing::info!(group = %self.name, volume = %volume.name, "volume journal complete");
            return Ok(ResyncStep::Journalled(0));
        };
        let data = read_blocks(volume, first, count)?;
        let op = SpoolOp::Write {
            volume: volume.name.clone(),
            first: BlockNo(first),
            data,
            origin: WriteOrigin::Resync,
        };
        match self.spool.append(op) {
            Ok(_) => {
                volume.dirty.clear(first, count);
                Ok(ResyncStep::Journalled(count))
            }
            Err(SpoolError::Full { .. }) => Ok(ResyncStep::SpoolBusy),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use tideline_core::spool::SpoolConfig;
    use tideline_core::Seq;

    const VOLUME_BYTES: u64 = 8 << 20;

    /// A group of one 8 MiB volume in a temporary directory (kept alive by the returned
    /// handle); `None` (skipped, or failed under CI) where the filesystem refuses direct I/O,
    /// since then no write would run with the lock released.
    pub(crate) fn one_volume_group() -> Option<(tempfile::TempDir, Arc<Group>)> {
        let temp = tempfile::tempdir().unwrap();
        let group = open_group(temp.path())?;
        Some((temp, Arc::new(group)))
    }

    /// Opens the group of [`one_volume_group`] in `dir`, creating its files if missing.
    fn open_group(dir: &std::path::Path) -> Option<Group> {
        let path = dir.join("volume");
        let file = if path.exists() {
            File::options().read(true).write(true).open(&path).unwrap()
        } else {
            tideline_testkit::sized_file(&path, VOLUME_BYTES)
        };
        let direct = DirectWriter::open(&path).map(DirectWriter::submitting_through_aio);
        let missing = direct
            .is_none()
            .then(|| format!("O_DIRECT on {}", path.display()));
        if !tideline_testkit::skip_or_fail(missing.into_iter().collect()) {
            return None;
        }
        let spool_dir = dir.join("spool");
        let spool = Spool::open(SpoolConfig::new(&spool_dir, 256 << 20)).unwrap();
        let name = VolumeName::new("v").unwrap();
        let (dirty, _) = open_dirty_map(&spool_dir, &name, &file, VOLUME_BYTES).unwrap();
        let volume = VolumeState {
            name,
            path,
            file: file.into(),
            direct,
            size_bytes: VOLUME_BYTES,
            dirty,
            in_gap: false,
            in_flight: Vec::new(),
            idle_writers: Vec::new(),
            on_volume: Default::default(),
        };
        Some(Group::new(
            GroupName::new("g").unwrap(),
            spool,
            vec![volume],
        ))
    }

    /// A change of writer `thread`'s `step`th turn: mostly large aligned writes (taken with the
    /// lock released), some small unaligned writes and trims (taken with it held), all over
    /// the same 4 MiB so that they overlap.
    fn change_of(thread: u64, step: u64) -> (u64, Change) {
        let mut x = (thread * 1_000 + step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let block = next(1024);
        let fill = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|i| (thread * 37 + step * 11 + (i / 512) as u64) as u8)
                .collect()
        };
        match next(10) {
            0..=5 => {
                // Half of them on the same MiB, so that some always meet there.
                let blocks = 16 + next(241);
                let first = if block % 2 == 0 {
                    0
                } else {
                    block.min(1024 - blocks)
                };
                let data = fill((blocks * BLOCK_SIZE_BYTES) as usize);
                (first * BLOCK_SIZE_BYTES, Change::Write(data.into()))
            }
            6..=7 => (
                block * BLOCK_SIZE_BYTES + 1_000,
                Change::Write(fill(5_000).into()),
            ),
            _ => (
                block * BLOCK_SIZE_BYTES,
                Change::Trim(next(64) * BLOCK_SIZE_BYTES + 4096),
            ),
        }
    }

    /// The volume as the spool's records describe it (the data of writes kept on the volume
    /// read back from it and the saved blocks, not from memory).
    fn replay(group: &Group) -> Vec<u8> {
        group.recent.forget_all();
        let mut image = vec![0u8; VOLUME_BYTES as usize];
        let mut reader = group.spool.reader(Seq(1));
        while let Some(entry) = reader.next_entry(&group.spool).unwrap() {
            let (at, bytes) = match entry.op {
                SpoolOp::Write { first, data, .. } => (first.0, data),
                SpoolOp::OnVolume(kind) => {
                    let RecordKind::Write { first, .. } = kind else {
                        panic!("{kind:?} kept on the volume")
                    };
                    let record = Record {
                        seq: entry.seq,
                        time: entry.time,
                        kind,
                    };
                    (first.0, group.on_volume_data(&record).unwrap())
                }
                SpoolOp::Other(RecordKind::Trim { first, count, .. }) => (
                    first.0,
                    vec![0u8; (count * BLOCK_SIZE_BYTES) as usize].into(),
                ),
                SpoolOp::Other(_) => continue,
            };
            let start = (at * BLOCK_SIZE_BYTES) as usize;
            image[start..start + bytes.len()].copy_from_slice(&bytes);
        }
        image
    }

    #[test]
    fn overlapping_changes_from_many_threads_replay_from_the_spool_to_the_volume() {
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        let writers: Vec<_> = (0..4u64)
            .map(|thread| {
                let group = group.clone();
                std::thread::spawn(move || {
                    for step in 0..60 {
                        let (offset, change) = change_of(thread, step);
                        group.journalled(0, offset, change).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let mut volume = vec![0u8; VOLUME_BYTES as usize];
        group.lock()[0].file.read_exact_at(&mut volume, 0).unwrap();
        assert!(
            replay(&group) == volume,
            "replaying the journal does not give the volume"
        );
        let volumes = group.lock();
        assert!(volumes[0].in_flight.is_empty());
        assert!(!volumes[0].idle_writers.is_empty(), "no write ran unlocked");
        assert_eq!(
            volumes[0].dirty.dirty_blocks(),
            0,
            "write-intent marks left"
        );
    }

    /// Starts `change` at `offset` on a thread of its own and checks that it waits (for
    /// `blocker`) while a small write elsewhere goes ahead; once `release` has run, it must
    /// finish.
    fn waits_until_released(
        group: &Arc<Group>,
        offset: u64,
        change: Change,
        blocker: &str,
        release: impl FnOnce(),
    ) {
        let (done_tx, done) = std::sync::mpsc::channel();
        let waiter = {
            let group = group.clone();
            std::thread::spawn(move || {
                let result = group.journalled(0, offset, change);
                done_tx.send(result.is_ok()).unwrap();
            })
        };
        group
            .journalled(
                0,
                300 * BLOCK_SIZE_BYTES,
                Change::Write(vec![2u8; 4096].into()),
            )
            .unwrap();
        // Bounds a negative: the change must not finish while it is blocked.
        let early = done.recv_timeout(std::time::Duration::from_millis(300));
        assert!(early.is_err(), "a change went ahead despite {blocker}");
        release();
        let finished = done.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(finished, Ok(true), "the change blocked by {blocker}");
        waiter.join().unwrap();
    }

    #[test]
    fn a_change_to_blocks_in_flight_waits_for_them_and_others_do_not() {
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        // Blocks 0..256 are being written with the lock released.
        group.lock()[0].in_flight.push((0, 256));
        let change = Change::Write(vec![1u8; 4096].into());
        waits_until_released(
            &group,
            10 * BLOCK_SIZE_BYTES,
            change,
            "a block in flight",
            || {
                group.lock()[0].in_flight.clear();
                group.settled.notify_all();
            },
        );
        let mut reader = group.spool.reader(Seq(1));
        let mut firsts = Vec::new();
        while let Some(entry) = reader.next_entry(&group.spool).unwrap() {
            if let SpoolOp::Write { first, .. }
            | SpoolOp::OnVolume(RecordKind::Write { first, .. }) = entry.op
            {
                firsts.push(first.0);
            }
        }
        assert_eq!(firsts, [300, 10]);
    }

    /// The record of write `seq`, spooled without its data.
    fn on_volume_record(group: &Group, seq: Seq) -> Record {
        let entry = group
            .spool
            .reader(seq)
            .next_entry(&group.spool)
            .unwrap()
            .unwrap();
        let SpoolOp::OnVolume(kind) = entry.op else {
            panic!("a large aligned write was spooled with its data");
        };
        Record {
            seq,
            time: entry.time,
            kind,
        }
    }

    #[test]
    fn a_large_write_waits_for_a_connected_shipper_behind_the_bound_and_small_writes_do_not() {
        let temp = tempfile::tempdir().unwrap();
        let Some(group) = open_group(temp.path()) else {
            return;
        };
        let group = Arc::new(group.pacing_writes(Some(Duration::ZERO)));
        group.recent.shipper_connected(true);
        let mib = 1 << 20;
        group
            .journalled(0, 0, Change::Write(fresh_bytes(1, mib)))
            .unwrap();
        let unshipped = on_volume_record(&group, group.spool.last_seq());
        let change = Change::Write(fresh_bytes(2, mib));
        waits_until_released(&group, 2 * mib as u64, change, "an untaken write", || {
            group.on_volume_data(&unshipped).unwrap();
        });
    }

    #[test]
    fn a_large_write_waits_for_a_free_slot_and_small_writes_do_not() {
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        let taken: Vec<_> = (0..MAX_UNLOCKED_WRITES)
            .map(|_| group.unlocked_slots[0].take())
            .collect();
        let change = Change::Write(vec![1u8; 1 << 20].into());
        waits_until_released(&group, 0, change, "every slot taken", || drop(taken));
        assert_eq!(
            *group.unlocked_slots[0].free.lock().unwrap(),
            MAX_UNLOCKED_WRITES
        );
    }

    /// Bytes no other change writes.
    pub(crate) fn fresh_bytes(seed: u64, len: usize) -> Bytes {
        Bytes::from(tideline_testkit::noise_bytes(seed, len))
    }

    /// `count` block-aligned changes over the first 1 MiB, so they overlap: large writes (kept
    /// on the volume), small writes and trims. Returns each write's record and bytes.
    fn overlapping_changes(group: &Group, seed: u64, count: u64) -> Vec<(Seq, Bytes)> {
        let mut writes = Vec::new();
        for step in 0..count {
            let pick = (seed + step).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 7;
            let first = pick % 240;
            let change = match pick % 5 {
                0..=2 => Change::Write(fresh_bytes(
                    seed ^ step,
                    (16 + pick % 48) as usize * BLOCK_SIZE,
                )),
                3 => Change::Write(fresh_bytes(
                    seed ^ step,
                    (1 + pick % 8) as usize * BLOCK_SIZE,
                )),
                _ => Change::Trim((1 + pick % 32) * BLOCK_SIZE_BYTES),
            };
            let written = match &change {
                Change::Write(data) => Some(data.clone()),
                _ => None,
            };
            group
                .journalled(0, first * BLOCK_SIZE_BYTES, change)
                .unwrap();
            if let Some(data) = written {
                writes.push((group.spool.last_seq(), data));
            }
        }
        writes
    }

    /// Checks that every spooled write record reads back as the bytes its change wrote, from
    /// memory and then, with the newest writes' data forgotten, from the volume and the saved
    /// blocks; returns how many were kept on the volume.
    fn assert_writes_ship_their_own_bytes(group: &Group, writes: &[(Seq, Bytes)]) -> usize {
        assert_writes_read_back(group, writes);
        group.recent.forget_all();
        assert_writes_read_back(group, writes)
    }

    fn assert_writes_read_back(group: &Group, writes: &[(Seq, Bytes)]) -> usize {
        let expected: std::collections::BTreeMap<Seq, &Bytes> =
            writes.iter().map(|(seq, data)| (*seq, data)).collect();
        let mut on_volume = 0;
        let mut reader = group.spool.reader(Seq(1));
        while let Some(entry) = reader.next_entry(&group.spool).unwrap() {
            let got = match entry.op {
                SpoolOp::Write { data, .. } => data,
                SpoolOp::OnVolume(kind) => {
                    on_volume += 1;
                    let record = Record {
                        seq: entry.seq,
                        time: entry.time,
                        kind,
                    };
                    group.on_volume_data(&record).unwrap()
                }
                SpoolOp::Other(_) => continue,
            };
            let want = expected
                .get(&entry.seq)
                .unwrap_or_else(|| panic!("no write {}", entry.seq));
            assert!(
                got == **want,
                "record {} does not read back as its write",
                entry.seq
            );
        }
        on_volume
    }

    #[test]
    fn writes_kept_on_the_volume_ship_their_own_bytes_across_overwrites_and_a_restart() {
        let temp = tempfile::tempdir().unwrap();
        let Some(group) = open_group(temp.path()) else {
            return;
        };
        let mut writes = overlapping_changes(&group, 1, 300);
        let kept = assert_writes_ship_their_own_bytes(&group, &writes);
        let saved = writes
            .iter()
            .filter(|(seq, _)| !group.spool.saved_ranges(*seq).is_empty())
            .count();
        assert!(
            kept > 100 && saved > 50,
            "{kept} kept on the volume, {saved} saved"
        );
        // The agent restarts (killed: the spool's and the volume's pages survive): the saved
        // blocks are found again, and so are the blocks that must be saved before a change.
        drop(group);
        let group = open_group(temp.path()).unwrap();
        assert_writes_ship_their_own_bytes(&group, &writes);
        writes.extend(overlapping_changes(&group, 2, 300));
        assert_writes_ship_their_own_bytes(&group, &writes);
        // Shipped: nothing is saved any more, and the blocks are free to change.
        let last = group.spool.last_seq();
        group.release_through(last).unwrap();
        assert!(group.lock()[0].on_volume.ranges().next().is_none());
        let before = group.spool.used_bytes();
        group
            .journalled(0, 0, Change::Write(fresh_bytes(3, 1 << 20)))
            .unwrap();
        assert!(group.spool.saved_ranges(group.spool.last_seq()).is_empty());
        assert!(
            group.spool.used_bytes() - before < 64 << 10,
            "a 1 MiB write spooled its data"
        );
    }

    #[test]
    fn a_change_over_an_unshipped_large_write_is_said_to_wait_for_the_disk_until_it_ships() {
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        let mib = 1 << 20;
        group
            .journalled(0, mib, Change::Write(fresh_bytes(1, mib as usize)))
            .unwrap();
        assert!(group.change_waits_on_disk(0, mib + 4096, 512));
        assert!(group.change_waits_on_disk(0, mib - 512, 1024), "an edge");
        assert!(
            !group.change_waits_on_disk(0, mib - 4096, 4096),
            "the block before"
        );
        assert!(
            !group.change_waits_on_disk(0, 2 * mib, 4096),
            "the block after"
        );
        group.release_through(group.spool.last_seq()).unwrap();
        assert!(!group.change_waits_on_disk(0, mib + 4096, 512), "shipped");
    }

    #[test]
    fn blocks_changed_behind_the_agents_back_are_lost_not_shipped_wrong() {
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        group
            .journalled(0, 0, Change::Write(fresh_bytes(1, 256 * BLOCK_SIZE)))
            .unwrap();
        let record = on_volume_record(&group, group.spool.last_seq());
        group.lock()[0]
            .file
            .write_all_at(&[7u8; 512], 8192)
            .unwrap();
        // Still in memory, the write's own bytes ship; read back from the volume, they are lost.
        assert_eq!(
            group.on_volume_data(&record).unwrap().len(),
            256 * BLOCK_SIZE
        );
        group.recent.forget_all();
        match group.on_volume_data(&record) {
            Err(OnVolumeError::Lost { first, count, .. }) => assert_eq!((first.0, count), (0, 256)),
            other => panic!("{other:?}"),
        }
    }
}
