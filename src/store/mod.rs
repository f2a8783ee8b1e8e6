//! The collector's storage engine: chunk packs, the catalog log and the journal index.
//!
//! A [`Store`] is one directory. It is synchronous and thread-safe: every method takes `&self`;
//! ingests are serialised by one writer mutex, reads (plans, chunk reads, restores) run
//! concurrently and never wait for an fsync.
//!
//! # Files
//!
//! ```text
//! DIR/lock                 held with flock(LOCK_EX) while a Store is open: one process per store
//! DIR/catalog.log          append-only framed log (crate::framed) of catalog entries: the commit
//!                          point of everything (format: catalog.rs)
//! DIR/packs/NNNNNN.pack    append-only framed entries, one per compressed frame (format: pack.rs)
//! ```
//!
//! A pack entry body is `u16 n | n x 32-byte hash | zstd bytes`. A new pack is started when
//! appending a frame would take the current one past `pack_target_bytes` (a single larger frame
//! still gets a pack of its own). The catalog holds `GroupRegistered {group, spool_id,
//! seq_base, spool_epoch, volumes}`, `Batch {group, frames, new chunk locations (hash, pack,
//! frame offset, frame length, index in frame), records}` and `GroupControl {group, role,
//! epoch history, keep_through}` entries, each with a 1-byte tag and a 1-byte version. A
//! `GroupControl` is how a group's epoch and role change (failover, fencing, joining another
//! site's timeline); see [`GroupRole`] and [`History`] for why two sites never both accept
//! writes.
//!
//! # Durability protocol (ingest)
//!
//! 1. Verify in memory, before taking the writer lock (frames spread over the cores): every
//!    frame decompresses to exactly its block count and every block hashes to the hash the
//!    sender gave it. Any mismatch refuses the whole batch; nothing is written.
//! 2. Under the writer lock, check the records against the journal: seqs at or below the
//!    group's durable seq are skipped (idempotent resend); the first new seq is durable + 1 and
//!    the rest contiguous; times do not go backwards; volumes belong to the group; blocks lie
//!    inside the volume; every chunk a write names is stored or in this batch.
//! 3. Append the frames holding at least one chunk the store lacks to the current pack, in
//!    one write from the first block boundary at or after its end (`O_DIRECT` where the
//!    filesystem allows, the last block padded with zeros; buffered `pwrite` otherwise), then
//!    **fsync every pack written** (and the packs directory when a pack was created).
//! 4. Append one `Batch` entry to `catalog.log` and **fsync it**. This is the commit point.
//! 5. Only now publish in memory (chunk index, journal, windows) and return the new durable
//!    seq. So `missing()` stops reporting a chunk only once it is durable, and a seq is
//!    acknowledged only once its records and chunks are durable.
//!
//! `register_group` appends a `GroupRegistered` entry and fsyncs it the same way (only when
//! something changed). If a write in steps 3-4 fails, the files are truncated back to where the
//! batch started and the error is returned: the batch never happened. If an fsync fails, or
//! the truncation does, the durable state of the files is unknown: the store refuses further
//! writes ([`StoreError::Poisoned`]) until it is reopened, which recovers as below.
//!
//! # Recovery rules (open)
//!
//! * `catalog.log` is replayed with [`framed::scan_file`]. A torn tail (an entry cut short, or a
//!   bad entry with nothing valid after it) is a batch whose fsync never returned, so it was
//!   never acknowledged: it is truncated away (`set_len` + fsync). A bad entry followed by a
//!   valid one means acknowledged bytes changed: corruption; the store refuses to open and says
//!   where. An entry that decodes badly or contradicts the journal is refused the same way.
//! * Each pack is truncated to the first block boundary at or after the end of the last frame
//!   the catalog references: zeros up to there may pad the last committed batch, and bytes
//!   after it belong to batches that never committed. Pack files past the last referenced one are
//!   emptied. A pack shorter than the catalog says, or missing, is logged and left alone: only
//!   reads of the frames it lost fail, and new frames go to a fresh pack.
//! * Packs are never scanned. A damaged pack byte does not stop the collector from starting;
//!   it fails reads of what it damaged: every block read back is checked against its blake3
//!   (the entry CRC alone decides nothing), so a frame that no longer decompresses fails all
//!   its blocks and a frame that decompresses to a wrong block fails that block. The errors name
//!   the pack file and the frame's byte offset; a restore adds the volume and the block's
//!   offset in it.
//!
//! # Invariants
//!
//! * No chunk is in the index, and no seq is acknowledged, before its frame and its catalog
//!   entry were fsynced.
//! * Nothing is rewritten in place: files are appended to, and truncated only at open
//!   (recovery) or to undo a batch whose write failed.
//! * A group's journal is seq-contiguous from 1 with non-decreasing times, so a point in time
//!   is a prefix of it.
//! * Nothing read from disk is trusted: catalog entries are checksummed and every length and
//!   reference in them checked; chunk bytes are checked against their hash on every read.
//!
//! # Restore
//!
//! [`Store::plan`] replays the group's journal from its start up to the point, under the state
//! read lock (image layers, periodic block maps, will bound that replay); [`materialise`] and
//! [`extents`] then read the blocks in volume order through the frame cache.
//!
//! # Limits
//!
//! One catalog entry (one batch) is at most [`framed::MAX_ENTRY_BODY_BYTES`]: a bigger batch is
//! refused ([`StoreError::BatchTooLarge`]) before anything is written. A frame holds 1 to
//! [`MAX_FRAME_BLOCKS`] blocks. The frame cache holds at most `frame_cache_frames` (<= 65536)
//! frames of up to 1 MiB each.
//!
//! # Memory
//!
//! The chunk index (hash -> pack, offset, length, index: about 64 bytes a chunk), every
//! group's records (32 bytes per written block), and the frame cache. Pack files are opened on
//! first read and kept open: one descriptor per pack read since open.

mod catalog;
mod chunk_index;
mod epoch;
mod grouping;
mod journal;
mod materialise;
mod pack;
#[cfg(test)]
mod tests;

pub use epoch::{Abandoned, EpochStart, GroupRole, History};
pub use materialise::{
    extents, for_each_extent, for_each_stored_frame, materialise, plan_block_ranges,
    plan_data_bytes, Extents, MaterialiseStats, StoredFrame, MATERIALISE_EXTENT_BYTES,
};
pub use pack::{FrameBytes, PackId, PACKS_DIR};

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use crate::direct::{self, AlignedBuf, DirectWriter};
use crate::frame::{self, FrameError, MAX_FRAME_BLOCKS};
use crate::framed::{self, ScanError, ENTRY_HEADER_BYTES, MAX_ENTRY_BODY_BYTES};
use crate::record::{Record, RecordKind, MAX_BLOCKS_PER_RECORD};
pub use crate::spool::Succession;
use crate::types::{
    BlockNo, ChunkHash, Epoch, GroupName, Seq, SeqBase, TimeNs, VolumeName, BLOCK_SIZE,
    BLOCK_SIZE_BYTES,
};

use catalog::{Batch, Entry, FramePos, GroupControl, GroupRegistered, NewChunk};
use journal::{GroupState, Marker, MarkerKind, VolumeState};
use pack::{ChunkLoc, FrameCache, FrameEntry, LoadedFrame, Packs};

/// Name of the catalog log inside the store directory.
pub const CATALOG_FILE: &str = "catalog.log";
/// Name of the lock file inside the store directory.
pub const LOCK_FILE: &str = "lock";
/// Pack writes are staged in a buffer of this size, kept between batches: an agent's batch
/// holds at most 8 MiB of blocks, compressed into less.
const STAGING_KEPT_BYTES: usize = 16 << 20;

/// Default for [`StoreConfig::pack_target_bytes`].
pub const DEFAULT_PACK_TARGET_BYTES: u64 = 64 << 20;
/// Default for [`StoreConfig::frame_cache_frames`].
pub const DEFAULT_FRAME_CACHE_FRAMES: usize = 32;

/// How to open a [`Store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store directory; created if missing.
    pub dir: PathBuf,
    /// A new pack file is started when a frame would take the current one past this size.
    /// Default 64 MiB.
    pub pack_target_bytes: u64,
    /// Decompressed frames kept in memory (each up to 1 MiB); 0 disables the cache. Default 32.
    pub frame_cache_frames: usize,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            pack_target_bytes: DEFAULT_PACK_TARGET_BYTES,
            frame_cache_frames: DEFAULT_FRAME_CACHE_FRAMES,
        }
    }

    pub fn validate(&self) -> Result<(), StoreError> {
        if self.pack_target_bytes == 0 {
            return Err(StoreError::InvalidConfig(
                "pack_target_bytes must be at least 1 (default 64 MiB)".into(),
            ));
        }
        if self.frame_cache_frames > 1 << 16 {
            return Err(StoreError::InvalidConfig(format!(
                "frame_cache_frames is {}, but each frame may take 1 MiB of memory; use at most 65536 (default 32)",
                self.frame_cache_frames
            )));
        }
        Ok(())
    }
}

/// A protected volume as its agent registers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeMeta {
    pub name: VolumeName,
    pub size_bytes: u64,
}

/// A stored frame, as [`Store::frames_holding`] read it: every hash it holds (in frame order),
/// its compressed bytes as stored, its blocks (decompressed and checked against those hashes),
/// and how many of the hashes asked for it holds.
#[derive(Debug)]
pub struct HeldFrame {
    pub hashes: Vec<ChunkHash>,
    pub zstd: FrameBytes,
    pub data: Vec<u8>,
    pub asked: usize,
}

/// What [`Store::register_agent`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRegistration {
    /// The group's durable seq (journal seq, not spool seq).
    pub durable: Seq,
    /// Journal seq = `seq_base` + spool seq.
    pub seq_base: SeqBase,
    /// The record at `durable` when the registering spool sent it (journal seq). The agent
    /// compares it with its spool's record at that seq: a power loss can take shipped records
    /// from the spool and new writes reuse their seqs, which no count of seqs reveals.
    pub durable_record: Option<Record>,
}

/// What the primary site says about a group when it starts replicating it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaOffer {
    pub history: History,
    pub spool_id: u64,
    pub seq_base: SeqBase,
    pub spool_epoch: Epoch,
    pub volumes: Vec<VolumeMeta>,
}

/// A group as [`Store::group_info`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: GroupName,
    pub role: GroupRole,
    pub epoch: Epoch,
    pub history: History,
    pub durable_seq: Seq,
    pub newest_record_time: Option<TimeNs>,
    pub spool_id: u64,
    pub seq_base: SeqBase,
    pub spool_epoch: Epoch,
    pub volumes: Vec<VolumeMeta>,
    /// Fork seq and record count of the timeline this site set aside, if any.
    pub abandoned: Option<(Seq, u64)>,
}

impl GroupInfo {
    /// What to offer a replica of this group.
    pub fn offer(&self) -> ReplicaOffer {
        ReplicaOffer {
            history: self.history.clone(),
            spool_id: self.spool_id,
            seq_base: self.seq_base,
            spool_epoch: self.spool_epoch,
            volumes: self.volumes.clone(),
        }
    }
}

/// What [`Store::take_over`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakeOver {
    pub epoch: Epoch,
    /// The journal continues after this record.
    pub seq: Seq,
    pub time: TimeNs,
    /// Records after `seq` that were set aside.
    pub dropped_records: u64,
}

/// The state a [`Store::diff`] starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffBase {
    /// After every record up to this seq of the journal.
    Seq(Seq),
    /// The end of the timeline this site set aside when it last joined another site's: what
    /// the volumes at this site held when it was fenced.
    Abandoned,
}

/// Blocks to write to turn a volume at a [`DiffBase`] into the volume at a point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDiff {
    pub volume: VolumeName,
    pub size_bytes: u64,
    pub seq: Seq,
    pub time: TimeNs,
    /// Sorted by block; `None`: the block reads as zeroes.
    pub changes: Vec<(BlockNo, Option<ChunkHash>)>,
}

/// A compressed frame received with a batch: `hashes[i]` names block `i` of the decompressed
/// data. Untrusted until [`Store::ingest`] has verified it.
#[derive(Clone, Copy, Debug)]
pub struct IncomingFrame<'a> {
    pub hashes: &'a [ChunkHash],
    pub zstd_data: &'a [u8],
}

/// Which points [`Store::points`] lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointKinds {
    FlushesAndCheckpoints,
    CheckpointsOnly,
}

/// Which state of a volume to restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointInTime {
    /// After every durable record.
    Latest,
    /// After every record with time <= T.
    Time(TimeNs),
    /// After every record with seq <= S.
    Seq(Seq),
}

impl fmt::Display for PointInTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointInTime::Latest => f.write_str("the latest point"),
            PointInTime::Time(t) => write!(f, "time {} ns", t.0),
            PointInTime::Seq(s) => write!(f, "{s}"),
        }
    }
}

/// What [`Store::volumes`] reports about one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSummary {
    pub name: VolumeName,
    pub group: GroupName,
    pub size_bytes: u64,
    /// The group's durable seq.
    pub durable_seq: Seq,
    /// Time of the group's newest durable record (any kind): the volume is known up to there,
    /// so RPO = now - this.
    pub newest_record_time: Option<TimeNs>,
    /// Times of the oldest and the newest restorable record. Points in a gap inside the window
    /// are not restorable; [`Store::plan`] says so.
    pub window: Option<(TimeNs, TimeNs)>,
    /// A Complete record was seen and no Gap followed it: the latest point is restorable.
    pub complete: bool,
}

/// The block map of a volume at a point in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePlan {
    pub volume: VolumeName,
    pub size_bytes: u64,
    /// Seq of the newest record applied (of any kind, in the volume's group).
    pub seq: Seq,
    /// Time of that record.
    pub time: TimeNs,
    /// The non-zero blocks, sorted by block number.
    pub blocks: Vec<(BlockNo, ChunkHash)>,
}

/// Sizes of the chunk store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Distinct chunks stored.
    pub chunk_count: u64,
    /// `chunk_count * 4096`: what the chunks take uncompressed.
    pub logical_chunk_bytes: u64,
    /// zstd bytes of the stored frames.
    pub stored_bytes: u64,
    /// Bytes of all pack files (frames plus their headers and hash lists).
    pub pack_file_bytes: u64,
}

/// Why a chunk could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ChunkReadError {
    #[error("chunk {hash} is not in the store")]
    Unknown { hash: ChunkHash },
    #[error("pack {pack} byte {offset}: {reason}")]
    Corrupt {
        pack: String,
        offset: u64,
        reason: String,
    },
    #[error("read pack {pack} byte {offset}: {source}")]
    Io {
        pack: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Everything that can go wrong in the store, each saying what, where and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    InvalidConfig(String),
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("store directory {dir} is in use by another process (it holds {dir}/{LOCK_FILE}); stop that collector first, or give this one another store directory")]
    Locked { dir: String },
    #[error("open the store's catalog: {0}")]
    Catalog(#[source] ScanError),
    #[error("group {group} is not registered at the collector; the agent registers it when it connects, so reconnect it")]
    UnknownGroup { group: GroupName },
    #[error("volume {volume} is not known to this collector; `tideline volumes` lists the protected volumes")]
    UnknownVolume { volume: VolumeName },
    #[error("volume {volume} already belongs to group {existing} at the collector, not {requested}; a volume is in one group only: keep its original group, or protect it under a new volume name")]
    VolumeInOtherGroup {
        volume: VolumeName,
        existing: GroupName,
        requested: GroupName,
    },
    #[error("volume {volume} was registered with {registered_bytes} bytes and now reports {reported_bytes}; a protected volume cannot change size: protect the resized volume under a new name")]
    VolumeSizeChanged {
        volume: VolumeName,
        registered_bytes: u64,
        reported_bytes: u64,
    },
    #[error("group {group} at the collector was written by another agent spool; restart the agent with its original --spool-dir, or protect under a new group name")]
    SpoolMismatch {
        group: GroupName,
        registered_spool_id: u64,
        offered_spool_id: u64,
    },
    #[error("cannot register group {group}: {reason}")]
    InvalidRegistration { group: GroupName, reason: String },
    #[error("frame {frame} of the batch is unusable ({reason}); nothing from the batch was stored: resend it")]
    BadFrame { frame: usize, reason: String },
    #[error("frame {frame}, block {block} does not match its hash {expected}; nothing from the batch was stored: resend it (its bytes were damaged in the agent's spool or on the way)")]
    ChunkMismatch {
        frame: usize,
        block: usize,
        expected: ChunkHash,
    },
    #[error("group {group}: expected {expected} next but got {got}; the agent must resume from the collector's durable seq (register_group returns it)")]
    SeqGap {
        group: GroupName,
        expected: Seq,
        got: Seq,
    },
    #[error("group {group}, {seq}: the agent resent it with other contents than this site holds (time {resent_time} ns, the stored one's {stored_time} ns): its spool lost records that were shipped (a power loss) and gave their seqs to new writes; nothing from the batch was stored. Reconnect the agent: it compares its spool with this site's and continues as a successor spool")]
    ResendDiffers {
        group: GroupName,
        seq: Seq,
        stored_time: i64,
        resent_time: i64,
    },
    #[error("group {group}, {seq}: time {time} ns is before the previous record's {previous} ns; record times must not go backwards (the agent makes its clock monotonic)")]
    TimeWentBackwards {
        group: GroupName,
        seq: Seq,
        time: i64,
        previous: i64,
    },
    #[error("group {group}, {seq}: volume {volume} is not a member of the group; register it with the group before sending its records")]
    ForeignVolume {
        group: GroupName,
        seq: Seq,
        volume: VolumeName,
    },
    #[error("{seq}: blocks {first}..{end} lie outside volume {volume}, which has {size_bytes} bytes ({blocks} blocks)")]
    OutOfRange {
        seq: Seq,
        volume: VolumeName,
        first: u64,
        end: u64,
        size_bytes: u64,
        blocks: u64,
    },
    #[error("{seq} is malformed: {reason}")]
    InvalidRecord { seq: Seq, reason: String },
    #[error("{seq} names chunk {hash}, which is neither stored nor in the batch's frames; send the chunks `missing` reports with the records that name them")]
    MissingChunk { hash: ChunkHash, seq: Seq },
    #[error("the batch would take a {bytes}-byte catalog entry, over the {max}-byte limit; send fewer records per batch")]
    BatchTooLarge { bytes: usize, max: u32 },
    #[error("volume {volume} cannot be restored there: {reason}")]
    NotRestorable { volume: VolumeName, reason: String },
    #[error("volume {volume}: block at offset {offset_bytes} is corrupt: {source}; the pack changed on disk after it was written: check the disk, and restore from a replica site if there is one")]
    CorruptBlock {
        volume: VolumeName,
        offset_bytes: u64,
        #[source]
        source: ChunkReadError,
    },
    #[error("volume {volume}: read block at offset {offset_bytes}: {source}")]
    ReadBlock {
        volume: VolumeName,
        offset_bytes: u64,
        #[source]
        source: ChunkReadError,
    },
    #[error("the store refuses writes since an earlier failure ({0}); restart the collector so that it recovers from its files")]
    Poisoned(String),
    #[error("group {group} is fenced at this site: another site took it over at {by} (this site last held it at {epoch}), so its writes are accepted there only; point the agent at that site, or bring the group home with `tideline failback`")]
    Fenced {
        group: GroupName,
        epoch: Epoch,
        by: Epoch,
    },
    #[error("group {group} is fenced for agents at this site: it is a replica here at {epoch}, fed by replication from its primary site, and agents must stream it there (or run `tideline failover` here to make this site primary)")]
    NotPrimary { group: GroupName, epoch: Epoch },
    #[error("group {group}: refused a replication stream at {offered}, because this site holds the group at {current} ({role}); the sending site is fenced")]
    StaleEpoch {
        group: GroupName,
        offered: Epoch,
        current: Epoch,
        role: GroupRole,
    },
    #[error("group {group} is primary at both sites at {epoch}: two unrelated groups share the name, or a site was restored from an old copy; rename one of them")]
    BothPrimary { group: GroupName, epoch: Epoch },
    #[error("group {group} is already primary at this site ({epoch}); run the failover at the site that should take over")]
    AlreadyPrimary { group: GroupName, epoch: Epoch },
    #[error("group {group}: spool {spool_id:#x} fed the group before a failover, and its unshipped records belong to an abandoned timeline; start the agent with a fresh --spool-dir (the volumes are baselined again, and only changed blocks travel)")]
    RetiredSpool { group: GroupName, spool_id: u64 },
    #[error("group {group} cannot move to {requested}: this site already knows {known}")]
    EpochTooLow {
        group: GroupName,
        requested: Epoch,
        known: Epoch,
    },
    #[error("group {group}: {reason}")]
    NoSuchPoint { group: GroupName, reason: String },
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let action = action.into();
    move |source| StoreError::Io { action, source }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Everything the store knows, rebuilt from the catalog at open.
#[derive(Default)]
struct State {
    groups: BTreeMap<GroupName, GroupState>,
    volumes: BTreeMap<VolumeName, VolumeState>,
    chunks: chunk_index::ChunkIndex,
    /// zstd bytes of all referenced frames.
    stored_bytes: u64,
    /// Length of every pack file.
    pack_lens: BTreeMap<PackId, u64>,
    /// End of the last referenced frame of every pack (recovery truncates packs to it).
    referenced_ends: BTreeMap<PackId, u64>,
}

impl State {
    /// Applies a group registration. Checks everything before changing anything.
    fn apply_registration(&mut self, reg: &GroupRegistered) -> Result<(), String> {
        for v in &reg.volumes {
            if let Some(existing) = self.volumes.get(&v.name) {
                if existing.group != reg.group {
                    return Err(format!(
                        "volume {} is registered to group {} and to group {}",
                        v.name, existing.group, reg.group
                    ));
                }
            }
        }
        let group = self
            .groups
            .entry(reg.group.clone())
            .or_insert_with(|| GroupState::new(reg.spool_id));
        if group.spool_id != reg.spool_id {
            if group.durable() > Seq::ZERO && !group.retired_spools.contains(&group.spool_id) {
                group.retired_spools.push(group.spool_id);
            }
            group.spool_id = reg.spool_id;
            group.spool_since = group.durable();
        }
        group.seq_base = reg.seq_base;
        group.spool_epoch = reg.spool_epoch;
        for v in &reg.volumes {
            if !group.volumes.contains(&v.name) {
                group.volumes.push(v.name.clone());
            }
            let state = self
                .volumes
                .entry(v.name.clone())
                .or_insert_with(|| VolumeState {
                    group: reg.group.clone(),
                    size_bytes: v.size_bytes,
                    markers: Vec::new(),
                });
            state.size_bytes = v.size_bytes;
        }
        Ok(())
    }

    /// Applies a committed batch. Checks everything before changing anything, so that a
    /// refused entry leaves the state as it was.
    fn apply_batch(&mut self, batch: &Batch) -> Result<(), String> {
        let group = self.groups.get(&batch.group).ok_or_else(|| {
            format!(
                "batch for group {}, which was never registered",
                batch.group
            )
        })?;
        let mut expected = group.durable().next();
        for record in &batch.records {
            if record.seq != expected {
                return Err(format!(
                    "batch of group {} holds {} where {expected} was expected",
                    batch.group, record.seq
                ));
            }
            if let Some(volume) = record.kind.volume() {
                if self.volumes.get(volume).map(|v| &v.group) != Some(&batch.group) {
                    return Err(format!(
                        "{} of group {} names volume {volume}, which is not in the group",
                        record.seq, batch.group
                    ));
                }
            }
            expected = expected.next();
        }
        for chunk in &batch.chunks {
            let Some(frame) = batch.frames.get(chunk.frame as usize) else {
                return Err(format!("chunk {} refers to a missing frame", chunk.hash));
            };
            if chunk.index >= frame.block_count {
                return Err(format!("chunk {} is outside its frame", chunk.hash));
            }
        }

        for frame in &batch.frames {
            let end = frame.offset + u64::from(frame.entry_len);
            let slot = self.referenced_ends.entry(frame.pack).or_insert(0);
            *slot = (*slot).max(end);
            let overhead = ENTRY_HEADER_BYTES as usize
                + pack::frame_header_bytes(usize::from(frame.block_count));
            self.stored_bytes += (frame.entry_len as usize).saturating_sub(overhead) as u64;
        }
        for chunk in &batch.chunks {
            let frame = batch.frames[chunk.frame as usize];
            self.chunks.insert_new(
                chunk.hash,
                ChunkLoc {
                    pack: frame.pack,
                    offset: frame.offset,
                    entry_len: frame.entry_len,
                    index: chunk.index,
                },
            );
        }
        for record in &batch.records {
            let marker = match &record.kind {
                RecordKind::Complete { volume } => Some((volume, MarkerKind::Complete)),
                RecordKind::Gap { volume } => Some((volume, MarkerKind::Gap)),
                _ => None,
            };
            if let Some((volume, kind)) = marker {
                if let Some(state) = self.volumes.get_mut(volume) {
                    state.markers.push(Marker {
                        seq: record.seq,
                        kind,
                    });
                }
            }
        }
        if let Some(group) = self.groups.get_mut(&batch.group) {
            group.records.extend(batch.records.iter().cloned());
        }
        Ok(())
    }

    /// Applies a role and history change, setting the journal's tail aside at a fork.
    fn apply_control(&mut self, control: &GroupControl) -> Result<(), String> {
        control.history.validate()?;
        let group = self
            .groups
            .entry(control.group.clone())
            .or_insert_with(|| GroupState::new(0));
        if let Some(keep) = control.keep_through {
            let keep = keep.min(group.durable());
            let cut = group.prefix_len(PointInTime::Seq(keep));
            let tail = group.records.split_off(cut);
            for name in &group.volumes {
                if let Some(volume) = self.volumes.get_mut(name) {
                    volume.markers.retain(|m| m.seq <= keep);
                }
            }
            group.abandoned = Some(Abandoned { fork: keep, tail });
        }
        group.role = control.role;
        group.history = control.history.clone();
        Ok(())
    }

    fn apply(&mut self, entry: &Entry) -> Result<(), String> {
        match entry {
            Entry::GroupRegistered(reg) => self.apply_registration(reg),
            Entry::Batch(batch) => self.apply_batch(batch),
            Entry::GroupControl(control) => self.apply_control(control),
        }
    }
}

/// The append side: current pack and catalog, serialised by the writer mutex.
struct Writer {
    catalog: File,
    catalog_len: u64,
    pack: PackId,
    pack_file: Arc<File>,
    /// Where the current pack's frames end.
    pack_len: u64,
    /// The current pack file's length: past `pack_len` by the zeros that pad a direct write.
    pack_file_len: u64,
    /// The current pack opened for direct writes; `None` where its filesystem has no
    /// `O_DIRECT`, or once a direct write was refused.
    pack_direct: Option<DirectWriter>,
    /// Where a batch's frames are laid out, aligned, for one direct write; reused.
    staging: AlignedBuf,
    /// Set when a failed fsync (or a failed undo) left the files in an unknown state.
    poisoned: Option<String>,
}

/// A pack a batch appended to: where its frames ended and how long its file was before the
/// batch (what an undo goes back to), and the file's length after it.
struct Touched {
    pack: PackId,
    file: Arc<File>,
    frames_end_before: u64,
    file_len_before: u64,
    file_len: u64,
}

/// A write-path failure, and whether the files' durable state is now unknown.
struct WriteFailure {
    error: StoreError,
    durability_unknown: bool,
}

fn write_failed(
    action: String,
    durability_unknown: bool,
) -> impl FnOnce(io::Error) -> WriteFailure {
    move |source| WriteFailure {
        error: StoreError::Io { action, source },
        durability_unknown,
    }
}

/// The collector's chunk store and journal index. See the module documentation.
pub struct Store {
    dir: PathBuf,
    pack_target_bytes: u64,
    writer: Mutex<Writer>,
    state: RwLock<State>,
    packs: Packs,
    cache: FrameCache,
    /// Holds the directory's flock for the Store's lifetime.
    _lock: File,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What an ingest will write, worked out before writing anything.
struct PreparedBatch {
    durable: Seq,
    records: Vec<Record>,
    /// Indexes into the incoming frames of those to store (they hold a chunk the store lacks).
    frames: Vec<usize>,
    /// New chunks; `frame` indexes `frames`.
    chunks: Vec<NewChunk>,
}

impl Store {
    /// Opens (creating if needed) the store in `config.dir` and recovers from a crash: see the
    /// module documentation for the rules.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        config.validate()?;
        let dir = config.dir.clone();
        let packs = Packs::new(&dir);
        std::fs::create_dir_all(packs.dir()).map_err(io_error(format!(
            "create store directory {}",
            packs.dir().display()
        )))?;
        let lock_file = lock_dir(&dir)?;

        let catalog_path = dir.join(CATALOG_FILE);
        let catalog = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&catalog_path)
            .map_err(io_error(format!("open {}", catalog_path.display())))?;
        sync_dir(&dir)?;
        sync_dir(packs.dir())?;

        let mut state = State {
            chunks: chunk_index::ChunkIndex::loading(),
            ..State::default()
        };
        let end = framed::scan_file(&catalog_path, |_offset, body| {
            let entry = Entry::decode(body)?;
            state.apply(&entry).map_err(|reason| {
                format!("{reason}; the catalog contradicts itself: move the store aside and restore it from a replica")
            })
        })
        .map_err(StoreError::Catalog)?;
        state
            .chunks
            .finish_loading()
            .map_err(io_error("allocate the chunk index"))?;
        if end.torn_bytes > 0 {
            tracing::warn!(
                catalog = %catalog_path.display(),
                valid_bytes = end.valid_len_bytes,
                torn_bytes = end.torn_bytes,
                "catalog ends with a torn entry (a batch whose fsync never returned, so never acknowledged); truncating it"
            );
            catalog
                .set_len(end.valid_len_bytes)
                .and_then(|()| catalog.sync_all())
                .map_err(io_error(format!(
                    "truncate the torn tail of {}",
                    catalog_path.display()
                )))?;
        }

        let (pack, pack_file, pack_len) = recover_packs(&packs, &mut state)?;
        packs.insert(pack, Arc::clone(&pack_file));
        tracing::info!(
            dir = %dir.display(),
            groups = state.groups.len(),
            volumes = state.volumes.len(),
            chunks = state.chunks.len(),
            "store opened"
        );
        Ok(Store {
            dir,
            pack_target_bytes: config.pack_target_bytes,
            writer: Mutex::new(Writer {
                catalog,
                catalog_len: end.valid_len_bytes,
                pack,
                pack_direct: DirectWriter::open(&packs.path(pack)),
                pack_file,
                pack_len,
                pack_file_len: pack_len,
                staging: AlignedBuf::zeroed(0),
                poisoned: None,
            }),
            state: RwLock::new(state),
            packs,
            cache: FrameCache::new(config.frame_cache_frames),
            _lock: lock_file,
        })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers (or re-registers after a reconnect) `group` with its volumes and the agent
    /// spool that feeds it; returns the group's durable seq (`Seq(0)` if new). Volumes missing
    /// from `volumes` but registered before stay in the group. See [`Store::register_agent`].
    pub fn register_group(
        &self,
        group: &GroupName,
        spool_id: u64,
        volumes: &[VolumeMeta],
    ) -> Result<Seq, StoreError> {
        self.register_agent(group, spool_id, None, volumes)
            .map(|r| r.durable)
    }

    /// Registers an agent's spool for `group`. Refused unless this site is the group's primary.
    /// A spool other than the registered one takes over a group with history only in a later
    /// epoch than the registered spool's (after a failover), and never a spool that fed the
    /// group before; its seqs are then offset by the group's durable seq
    /// ([`AgentRegistration::seq_base`]). A spool that `succeeds` the registered one (it lost
    /// records this site holds, see [`Succession`]) takes over too: its seqs after
    /// `resume_after` follow the durable seq.
    pub fn register_agent(
        &self,
        group: &GroupName,
        spool_id: u64,
        succeeds: Option<Succession>,
        volumes: &[VolumeMeta],
    ) -> Result<AgentRegistration, StoreError> {
        check_volume_list(group, volumes)?;
        let mut writer = lock(&self.writer);
        let (registration, answer) = {
            let state = self.read_state();
            check_volumes(&state, group, volumes)?;
            match state.groups.get(group) {
                None => (
                    Some(GroupRegistered {
                        group: group.clone(),
                        spool_id,
                        seq_base: SeqBase::ZERO,
                        spool_epoch: Epoch::FIRST,
                        volumes: volumes.to_vec(),
                    }),
                    AgentRegistration {
                        durable: Seq::ZERO,
                        seq_base: SeqBase::ZERO,
                        durable_record: None,
                    },
                ),
                Some(g) => {
                    match g.role {
                        GroupRole::Primary => {}
                        GroupRole::Replica => {
                            return Err(StoreError::NotPrimary {
                                group: group.clone(),
                                epoch: g.epoch(),
                            })
                        }
                        GroupRole::Fenced { by } => {
                            return Err(StoreError::Fenced {
                                group: group.clone(),
                                epoch: g.epoch(),
                                by,
                            })
                        }
                    }
                    let durable = g.durable();
                    let succession = succeeds.filter(|s| s.predecessor == g.spool_id);
                    let (seq_base, spool_epoch) = if g.spool_id == spool_id {
                        (g.seq_base, g.spool_epoch)
                    } else if g.retired_spools.contains(&spool_id) {
                        return Err(StoreError::RetiredSpool {
                            group: group.clone(),
                            spool_id,
                        });
                    } else if let Some(succession) = succession {
                        // Its records after `resume_after` follow the newest durable one.
                        let base = SeqBase::placing(succession.resume_after, durable);
                        tracing::warn!(%group, predecessor = format_args!("{:016x}", succession.predecessor),
                            resume_after = succession.resume_after.0, durable = durable.0,
                            "a spool that lost records this site holds continues the group's journal");
                        (base, g.spool_epoch)
                    } else if durable == Seq::ZERO {
                        (SeqBase::ZERO, g.epoch())
                    } else if g.spool_epoch < g.epoch() {
                        (SeqBase::placing(Seq::ZERO, durable), g.epoch())
                    } else {
                        return Err(StoreError::SpoolMismatch {
                            group: group.clone(),
                            registered_spool_id: g.spool_id,
                            offered_spool_id: spool_id,
                        });
                    };
                    let new_volume = volumes.iter().any(|v| !g.volumes.contains(&v.name));
                    let changed = g.spool_id != spool_id
                        || g.seq_base != seq_base
                        || g.spool_epoch != spool_epoch
                        || new_volume;
                    // A spool taking over has sent nothing yet.
                    let durable_record = (g.spool_id == spool_id)
                        .then(|| g.record_of_current_spool(durable).cloned())
                        .flatten();
                    let answer = AgentRegistration {
                        durable,
                        seq_base,
                        durable_record,
                    };
                    let registration = changed.then(|| GroupRegistered {
                        group: group.clone(),
                        spool_id,
                        seq_base,
                        spool_epoch,
                        volumes: volumes.to_vec(),
                    });
                    (registration, answer)
                }
            }
        };
        if let Some(registration) = registration {
            self.commit(&mut writer, &[], |_| Entry::GroupRegistered(registration))?;
            tracing::info!(%group, spool_id, seq_base = answer.seq_base.0, volumes = volumes.len(), "group registered");
        }
        Ok(answer)
    }

    /// Registers `group` as a replica of the primary site that offers it, joining the offered
    /// timeline: if this site's journal parts ways with it (see [`History::common_prefix`]),
    /// the part after the common prefix is set aside ([`Abandoned`]). Refused when the offer's
    /// epoch is older than one this site knows (the offering site is fenced), or when both
    /// sites claim to be primary at the same epoch. Returns the durable seq to resume after.
    pub fn register_replica(
        &self,
        group: &GroupName,
        offer: &ReplicaOffer,
    ) -> Result<Seq, StoreError> {
        check_volume_list(group, &offer.volumes)?;
        offer
            .history
            .validate()
            .map_err(|reason| StoreError::InvalidRegistration {
                group: group.clone(),
                reason,
            })?;
        let offered = offer.history.current();
        let mut writer = lock(&self.writer);
        let (control, registration, durable) = {
            let state = self.read_state();
            check_volumes(&state, group, &offer.volumes)?;
            let registration = GroupRegistered {
                group: group.clone(),
                spool_id: offer.spool_id,
                seq_base: offer.seq_base,
                spool_epoch: offer.spool_epoch,
                volumes: offer.volumes.clone(),
            };
            match state.groups.get(group) {
                None => (
                    Some(GroupControl {
                        group: group.clone(),
                        role: GroupRole::Replica,
                        history: offer.history.clone(),
                        keep_through: None,
                    }),
                    Some(registration),
                    Seq::ZERO,
                ),
                Some(g) => {
                    let mine = g.epoch();
                    let known = match g.role {
                        GroupRole::Fenced { by } => by.max(mine),
                        _ => mine,
                    };
                    if offered < known {
                        return Err(StoreError::StaleEpoch {
                            group: group.clone(),
                            offered,
                            current: known,
                            role: g.role,
                        });
                    }
                    if offered == mine && g.role == GroupRole::Primary {
                        return Err(StoreError::BothPrimary {
                            group: group.clone(),
                            epoch: mine,
                        });
                    }
                    let durable = g.durable();
                    let keep = g
                        .history
                        .common_prefix(&offer.history)
                        .map(|c| c.min(durable));
                    let control = (g.role != GroupRole::Replica
                        || g.history != offer.history
                        || keep.is_some())
                    .then(|| GroupControl {
                        group: group.clone(),
                        role: GroupRole::Replica,
                        history: offer.history.clone(),
                        keep_through: keep,
                    });
                    let new_volume = offer.volumes.iter().any(|v| !g.volumes.contains(&v.name));
                    let registration = (g.spool_id != offer.spool_id
                        || g.seq_base != offer.seq_base
                        || g.spool_epoch != offer.spool_epoch
                        || new_volume)
                        .then_some(registration);
                    (control, registration, keep.unwrap_or(durable))
                }
            }
        };
        if let Some(control) = control {
            tracing::warn!(%group, epoch = offered.0, keep_through = ?control.keep_through.map(|s| s.0), "joining the primary site's timeline as a replica");
            self.commit(&mut writer, &[], |_| Entry::GroupControl(control))?;
        }
        if let Some(registration) = registration {
            self.commit(&mut writer, &[], |_| Entry::GroupRegistered(registration))?;
        }
        Ok(durable)
    }

    /// This site learned that another site holds `group` at epoch `by`: unless it knows that
    /// already, it stops being primary (persisted). Returns true when something changed.
    pub fn fence(&self, group: &GroupName, by: Epoch) -> Result<bool, StoreError> {
        let mut writer = lock(&self.writer);
        let control = {
            let state = self.read_state();
            let Some(g) = state.groups.get(group) else {
                return Ok(false);
            };
            let already = match g.role {
                GroupRole::Fenced { by: known } => known >= by,
                GroupRole::Replica => true,
                GroupRole::Primary => by <= g.epoch(),
            };
            if already {
                return Ok(false);
            }
            GroupControl {
                group: group.clone(),
                role: GroupRole::Fenced { by },
                history: g.history.clone(),
                keep_through: None,
            }
        };
        self.commit(&mut writer, &[], |_| Entry::GroupControl(control))?;
        tracing::error!(%group, by = by.0, "group fenced: another site holds it at a newer epoch; refusing its agents from now on");
        Ok(true)
    }

    /// Makes this site primary for `group` at a new epoch (`epoch`, or one above every epoch
    /// this site knows), continuing its journal after `point`: records after it are set aside.
    /// Refused at a site that is primary already.
    pub fn take_over(
        &self,
        group: &GroupName,
        point: PointInTime,
        epoch: Option<Epoch>,
    ) -> Result<TakeOver, StoreError> {
        let mut writer = lock(&self.writer);
        let (control, result) = {
            let state = self.read_state();
            let g = state
                .groups
                .get(group)
                .ok_or_else(|| StoreError::UnknownGroup {
                    group: group.clone(),
                })?;
            let known = match g.role {
                GroupRole::Primary => {
                    return Err(StoreError::AlreadyPrimary {
                        group: group.clone(),
                        epoch: g.epoch(),
                    })
                }
                GroupRole::Fenced { by } => by.max(g.epoch()),
                GroupRole::Replica => g.epoch(),
            };
            let epoch = epoch.unwrap_or(known.next());
            if epoch <= known {
                return Err(StoreError::EpochTooLow {
                    group: group.clone(),
                    requested: epoch,
                    known,
                });
            }
            let durable = g.durable();
            if let PointInTime::Seq(seq) = point {
                if seq > durable {
                    return Err(StoreError::NoSuchPoint {
                        group: group.clone(),
                        reason: format!("{seq} is not here yet: this site holds the group through {durable}; wait for replication to catch up"),
                    });
                }
            }
            let applied = g.prefix_len(point);
            let Some(last) = applied.checked_sub(1).map(|i| &g.records[i]) else {
                return Err(StoreError::NoSuchPoint {
                    group: group.clone(),
                    reason: format!("{point} is before the group's first record"),
                });
            };
            let result = TakeOver {
                epoch,
                seq: last.seq,
                time: last.time,
                dropped_records: durable.0 - last.seq.0,
            };
            (
                GroupControl {
                    group: group.clone(),
                    role: GroupRole::Primary,
                    history: g.history.with(epoch, last.seq),
                    keep_through: (last.seq < durable).then_some(last.seq),
                },
                result,
            )
        };
        self.commit(&mut writer, &[], |_| Entry::GroupControl(control))?;
        tracing::warn!(%group, epoch = result.epoch.0, seq = result.seq.0, "this site is now primary for the group");
        Ok(result)
    }

    /// Hands `group` over to the other site: this site stops being primary and records the
    /// next epoch as starting after its durable seq, which the other site then takes over with
    /// [`Store::take_over`] at exactly that seq. Idempotent once handed over.
    pub fn hand_over(&self, group: &GroupName) -> Result<(Epoch, Seq), StoreError> {
        let mut writer = lock(&self.writer);
        let (control, epoch, durable) = {
            let state = self.read_state();
            let g = state
                .groups
                .get(group)
                .ok_or_else(|| StoreError::UnknownGroup {
                    group: group.clone(),
                })?;
            let durable = g.durable();
            if g.role == GroupRole::Replica {
                return Ok((g.epoch(), durable));
            }
            if let GroupRole::Fenced { by } = g.role {
                return Err(StoreError::Fenced {
                    group: group.clone(),
                    epoch: g.epoch(),
                    by,
                });
            }
            let epoch = g.epoch().next();
            (
                GroupControl {
                    group: group.clone(),
                    role: GroupRole::Replica,
                    history: g.history.with(epoch, durable),
                    keep_through: None,
                },
                epoch,
                durable,
            )
        };
        self.commit(&mut writer, &[], |_| Entry::GroupControl(control))?;
        tracing::warn!(%group, epoch = epoch.0, seq = durable.0, "group handed over: this site is a replica now");
        Ok((epoch, durable))
    }

    /// Everything about `group` that replication and status reports need.
    pub fn group_info(&self, group: &GroupName) -> Option<GroupInfo> {
        let state = self.read_state();
        let g = state.groups.get(group)?;
        Some(group_info(&state, group, g))
    }

    /// Time of the record at `seq` of `group`, if the journal holds it.
    pub fn record_time(&self, group: &GroupName, seq: Seq) -> Option<TimeNs> {
        let state = self.read_state();
        state.groups.get(group)?.record(seq).map(|r| r.time)
    }

    /// Every group, sorted by name.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let state = self.read_state();
        state
            .groups
            .iter()
            .map(|(name, g)| group_info(&state, name, g))
            .collect()
    }

    /// Records of `group` after seq `after`, in order: at most `max_records`, and no more
    /// than `max_block_bytes` of written blocks (but at least one record when there is one).
    pub fn records_after(
        &self,
        group: &GroupName,
        after: Seq,
        max_records: usize,
        max_block_bytes: u64,
    ) -> Vec<Record> {
        let state = self.read_state();
        let Some(g) = state.groups.get(group) else {
            return Vec::new();
        };
        let start = g.prefix_len(PointInTime::Seq(after));
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for record in &g.records[start..] {
            let size = record.kind.block_count() * BLOCK_SIZE_BYTES;
            if !out.is_empty() && (out.len() >= max_records || bytes + size > max_block_bytes) {
                break;
            }
            bytes += size;
            out.push(record.clone());
        }
        out
    }

    /// The blocks of `volume` whose content at `target` differs from `base`: what must be
    /// written to a copy of the volume as it was at `base` to make it equal the volume at
    /// `target`. `None` in a change is a block that reads as zeroes at `target`.
    pub fn diff(
        &self,
        volume: &VolumeName,
        base: DiffBase,
        target: PointInTime,
    ) -> Result<BlockDiff, StoreError> {
        let plan = self.plan(volume, target)?;
        let state = self.read_state();
        let unknown = || StoreError::UnknownVolume {
            volume: volume.clone(),
        };
        let vol = state.volumes.get(volume).ok_or_else(unknown)?;
        let group = state.groups.get(&vol.group).ok_or_else(unknown)?;
        let base_blocks = match base {
            DiffBase::Seq(seq) => {
                let n = group.prefix_len(PointInTime::Seq(seq));
                journal::replay(group.records[..n].iter(), volume)
            }
            DiffBase::Abandoned => {
                let abandoned = group.abandoned.as_ref().ok_or_else(|| StoreError::NoSuchPoint {
                    group: vol.group.clone(),
                    reason: "this site never set a timeline of the group aside (it was never fenced and then fed by the site that took over), so there is nothing to roll back from".into(),
                })?;
                let n = group.prefix_len(PointInTime::Seq(abandoned.fork));
                journal::replay(group.records[..n].iter().chain(&abandoned.tail), volume)
            }
        };
        let changes = diff_blocks(&base_blocks, &plan.blocks);
        Ok(BlockDiff {
            volume: volume.clone(),
            size_bytes: plan.size_bytes,
            seq: plan.seq,
            time: plan.time,
            changes,
        })
    }

    /// Indexes (into `hashes`) of the chunks the store does not hold durably.
    pub fn missing(&self, hashes: &[ChunkHash]) -> Vec<u32> {
        let state = self.read_state();
        (0u32..)
            .zip(hashes)
            .filter(|(_, hash)| !state.chunks.contains_key(hash))
            .map(|(i, _)| i)
            .collect()
    }

    /// Makes a batch of records and the frames carrying their chunks durable, and returns the
    /// group's new durable seq. See the module documentation for the checks and the order of
    /// writes; on any error nothing of the batch is stored.
    pub fn ingest(
        &self,
        group: &GroupName,
        records: &[Record],
        frames: &[IncomingFrame<'_>],
    ) -> Result<Seq, StoreError> {
        self.ingest_from(group, Source::Agent, records, frames)
    }

    /// [`Store::ingest`] for a batch replicated from the group's primary site at `epoch`:
    /// accepted only while this site is the group's replica at that very epoch.
    pub fn ingest_replica(
        &self,
        group: &GroupName,
        epoch: Epoch,
        records: &[Record],
        frames: &[IncomingFrame<'_>],
    ) -> Result<Seq, StoreError> {
        self.ingest_from(group, Source::Replica(epoch), records, frames)
    }

    fn ingest_from(
        &self,
        group: &GroupName,
        source: Source,
        records: &[Record],
        frames: &[IncomingFrame<'_>],
    ) -> Result<Seq, StoreError> {
        verify_all(frames)?;
        let mut writer = lock(&self.writer);
        if let Some(reason) = &writer.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        let prepared = self.prepare(group, source, records, frames)?;
        if prepared.records.is_empty() && prepared.frames.is_empty() {
            return Ok(prepared.durable);
        }
        let new_durable = prepared.records.last().map_or(prepared.durable, |r| r.seq);
        let bodies: Vec<FrameEntry<'_>> = prepared
            .frames
            .iter()
            .map(|&i| FrameEntry::new(frames[i].hashes, frames[i].zstd_data))
            .collect();
        let mut batch = Batch {
            group: group.clone(),
            // Placeholders: positions are fixed-width, so they give the entry's final size.
            frames: bodies
                .iter()
                .map(|frame| FramePos {
                    pack: PackId(0),
                    offset: 0,
                    entry_len: 0,
                    block_count: frame.block_count(),
                })
                .collect(),
            chunks: prepared.chunks,
            records: prepared.records,
        };
        let mut encoded = Vec::new();
        batch.encode_into(&mut encoded);
        let size = encoded.len();
        if size > MAX_ENTRY_BODY_BYTES as usize {
            return Err(StoreError::BatchTooLarge {
                bytes: size,
                max: MAX_ENTRY_BODY_BYTES,
            });
        }
        self.commit(&mut writer, &bodies, |positions| {
            batch.frames = positions;
            Entry::Batch(batch)
        })?;
        Ok(new_durable)
    }

    /// Checks a batch against the journal and the chunk index; works out what to store.
    fn prepare(
        &self,
        group: &GroupName,
        source: Source,
        records: &[Record],
        frames: &[IncomingFrame<'_>],
    ) -> Result<PreparedBatch, StoreError> {
        let state = self.read_state();
        let journal = state
            .groups
            .get(group)
            .ok_or_else(|| StoreError::UnknownGroup {
                group: group.clone(),
            })?;
        check_source(group, journal, source)?;
        let durable = journal.durable();
        let incoming: HashSet<&ChunkHash> = frames.iter().flat_map(|f| f.hashes).collect();
        let mut expected = durable.next();
        let mut previous_time = journal.records.last().map(|r| r.time);
        let mut new_records = Vec::new();
        for record in records {
            if record.seq <= durable {
                check_resend(group, journal, record)?;
                continue; // already durable: an idempotent resend
            }
            if record.seq != expected {
                return Err(StoreError::SeqGap {
                    group: group.clone(),
                    expected,
                    got: record.seq,
                });
            }
            if let Some(previous) = previous_time.filter(|p| record.time < *p) {
                return Err(StoreError::TimeWentBackwards {
                    group: group.clone(),
                    seq: record.seq,
                    time: record.time.0,
                    previous: previous.0,
                });
            }
            check_record(&state, group, record, &incoming)?;
            new_records.push(record.clone());
            expected = expected.next();
            previous_time = Some(record.time);
        }

        let mut new_hashes = HashSet::new();
        let mut stored_frames = Vec::new();
        let mut chunks = Vec::new();
        for (index, incoming) in frames.iter().enumerate() {
            let slot = stored_frames.len() as u32;
            let before = chunks.len();
            for (block, hash) in (0u16..).zip(incoming.hashes) {
                if !state.chunks.contains_key(hash) && new_hashes.insert(*hash) {
                    chunks.push(NewChunk {
                        hash: *hash,
                        frame: slot,
                        index: block,
                    });
                }
            }
            if chunks.len() > before {
                stored_frames.push(index);
            }
        }
        Ok(PreparedBatch {
            durable,
            records: new_records,
            frames: stored_frames,
            chunks,
        })
    }

    /// Steps 3 to 5 of the durability protocol: appends `frames` (whole pack entries) to packs
    /// and fsyncs them, appends the catalog entry `make_entry` builds from their positions and
    /// fsyncs it, then applies the entry in memory.
    fn commit(
        &self,
        writer: &mut Writer,
        frames: &[FrameEntry<'_>],
        make_entry: impl FnOnce(Vec<FramePos>) -> Entry,
    ) -> Result<(), StoreError> {
        if let Some(reason) = &writer.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        let catalog_before = writer.catalog_len;
        let mut touched: Vec<Touched> = Vec::new();
        let entry = match self.try_write(writer, frames, make_entry, &mut touched) {
            Ok(entry) => entry,
            Err(failure) => {
                let undone = self.undo(writer, catalog_before, &touched);
                let reason = match (&undone, failure.durability_unknown) {
                    (Err(undo_error), _) => Some(format!("{}; then {undo_error}", failure.error)),
                    (Ok(()), true) => Some(failure.error.to_string()),
                    (Ok(()), false) => None,
                };
                if let Some(reason) = reason {
                    tracing::error!(%reason, "store write failed with unknown durable state; refusing writes until reopened");
                    writer.poisoned = Some(reason);
                }
                return Err(failure.error);
            }
        };
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if let Err(reason) = state.apply(&entry) {
            // The entry was checked before it was written, so this is a bug; the reopened store
            // will refuse the entry and say where.
            let reason = format!("a committed catalog entry does not apply: {reason}");
            writer.poisoned = Some(reason.clone());
            return Err(StoreError::Poisoned(reason));
        }
        for t in &touched {
            state.pack_lens.insert(t.pack, t.file_len);
        }
        Ok(())
    }

    fn try_write(
        &self,
        writer: &mut Writer,
        frames: &[FrameEntry<'_>],
        make_entry: impl FnOnce(Vec<FramePos>) -> Entry,
        touched: &mut Vec<Touched>,
    ) -> Result<Entry, WriteFailure> {
        let mut positions = Vec::with_capacity(frames.len());
        let mut rest = frames;
        while !rest.is_empty() {
            let fitting = self.frames_fitting(writer.pack_len, rest);
            if fitting == 0 {
                self.start_pack(writer)?;
                continue;
            }
            let (these, later) = rest.split_at(fitting);
            touched.push(Touched {
                pack: writer.pack,
                file: Arc::clone(&writer.pack_file),
                frames_end_before: writer.pack_len,
                file_len_before: writer.pack_file_len,
                file_len: writer.pack_file_len,
            });
            positions.extend(self.append_frames(writer, these)?);
            if let Some(t) = touched.last_mut() {
                t.file_len = writer.pack_file_len;
            }
            rest = later;
        }
        for t in touched.iter() {
            t.file.sync_data().map_err(write_failed(
                format!("fsync {}", self.packs.path(t.pack).display()),
                true,
            ))?;
        }

        let entry = make_entry(positions);
        let mut bytes = Vec::new();
        framed::encode_entry(&mut bytes, &entry.encode());
        let catalog_path = self.dir.join(CATALOG_FILE);
        writer
            .catalog
            .write_all_at(&bytes, writer.catalog_len)
            .map_err(write_failed(
                format!("append to {}", catalog_path.display()),
                false,
            ))?;
        writer.catalog_len += bytes.len() as u64;
        writer.catalog.sync_data().map_err(write_failed(
            format!("fsync {}", catalog_path.display()),
            true,
        ))?;
        Ok(entry)
    }

    /// How many of `frames`, from the first, the current pack takes, padding included: none
    /// when it already holds data and the first would take it past `pack_target_bytes` (a
    /// frame larger than that still gets an empty pack of its own).
    fn frames_fitting(&self, pack_len: u64, frames: &[FrameEntry<'_>]) -> usize {
        let mut end = direct::align_up(pack_len);
        let fitting = frames
            .iter()
            .take_while(|frame| {
                end += frame.len() as u64;
                direct::align_up(end) <= self.pack_target_bytes
            })
            .count();
        if pack_len == 0 {
            fitting.max(1)
        } else {
            fitting
        }
    }

    /// Appends `frames` to the current pack, one after another from the first block boundary
    /// at or after its end: around the page cache where the pack's filesystem allows, the last
    /// block padded with zeros. Packs are never scanned, so the gaps are never read. The frames
    /// are staged and written [`STAGING_KEPT_BYTES`] at a time, each write ending at a block
    /// boundary (the bytes past it start the next), so a group commit of many batches reuses
    /// one buffer: staging a 64 MiB group commit in a buffer of its own, zeroed and dropped each
    /// time, was a quarter of the collector's CPU in an ingest of random data. Returns where
    /// each frame went.
    fn append_frames(
        &self,
        writer: &mut Writer,
        frames: &[FrameEntry<'_>],
    ) -> Result<Vec<FramePos>, WriteFailure> {
        let start = direct::align_up(writer.pack_len);
        let mut positions = Vec::with_capacity(frames.len());
        // The staged bytes go to the pack from `staged_at`.
        let (mut staged, mut staged_at) = (0usize, start);
        for frame in frames {
            // At least one whole block to write: a frame the buffer cannot take is staged
            // after what is there, the buffer grown for it.
            if staged >= direct::DIRECT_ALIGN && staged + frame.len() > STAGING_KEPT_BYTES {
                let whole = staged - staged % direct::DIRECT_ALIGN;
                self.write_staged(writer, staged_at, whole, whole)?;
                writer.staging.copy_within(whole..staged, 0);
                (staged, staged_at) = (staged - whole, staged_at + whole as u64);
            }
            stage_room(&mut writer.staging, staged, staged + frame.len());
            frame.write_to(&mut writer.staging[staged..]);
            positions.push(FramePos {
                pack: writer.pack,
                offset: staged_at + staged as u64,
                entry_len: frame.len() as u32,
                block_count: frame.block_count(),
            });
            staged += frame.len();
        }
        let padded = direct::align_up(staged as u64) as usize;
        stage_room(&mut writer.staging, staged, padded);
        writer.staging[staged..padded].fill(0);
        let went_direct = self.write_staged(writer, staged_at, staged, padded)?;
        writer.pack_len = staged_at + staged as u64;
        writer.pack_file_len = staged_at + if went_direct { padded } else { staged } as u64;
        if writer.staging.len() > STAGING_KEPT_BYTES {
            // A frame far larger than usual does not keep its buffer.
            writer.staging = AlignedBuf::zeroed(0);
        }
        Ok(positions)
    }

    /// Writes the staged bytes to the current pack at `offset`: the first `padded_len` (whole
    /// blocks) directly while the pack takes direct writes, else the first `len` through the
    /// page cache, from then on. Returns whether the write went directly.
    fn write_staged(
        &self,
        writer: &mut Writer,
        offset: u64,
        len: usize,
        padded_len: usize,
    ) -> Result<bool, WriteFailure> {
        let action = || {
            format!(
                "append frames to {}",
                self.packs.path(writer.pack).display()
            )
        };
        let went_direct = match writer.pack_direct.as_mut() {
            Some(pack) => pack
                .write_pieces(&[&writer.staging[..padded_len]], offset)
                .map_err(write_failed(action(), false))?,
            None => false,
        };
        if !went_direct {
            writer.pack_direct = None;
            writer
                .pack_file
                .write_all_at(&writer.staging[..len], offset)
                .map_err(write_failed(action(), false))?;
        }
        Ok(went_direct)
    }

    /// Creates the next pack file and makes it the one appended to.
    fn start_pack(&self, writer: &mut Writer) -> Result<(), WriteFailure> {
        let id = PackId(writer.pack.0 + 1);
        let path = self.packs.path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(write_failed(
                format!("create pack {}", path.display()),
                false,
            ))?;
        sync_dir(self.packs.dir()).map_err(|error| WriteFailure {
            error,
            durability_unknown: true,
        })?;
        let file = Arc::new(file);
        self.packs.insert(id, Arc::clone(&file));
        writer.pack = id;
        writer.pack_file = file;
        writer.pack_len = 0;
        writer.pack_file_len = 0;
        writer.pack_direct = DirectWriter::open(&path);
        Ok(())
    }

    /// Truncates the files a failed batch wrote to back to where it started (keeping the
    /// padding of the batch before).
    fn undo(
        &self,
        writer: &mut Writer,
        catalog_len: u64,
        touched: &[Touched],
    ) -> Result<(), StoreError> {
        for t in touched {
            let len = t.file_len_before;
            t.file.set_len(len).map_err(io_error(format!(
                "undo a failed batch: truncate {} to {len} bytes",
                self.packs.path(t.pack).display()
            )))?;
            if t.pack == writer.pack {
                writer.pack_len = t.frames_end_before;
                writer.pack_file_len = len;
            }
        }
        writer
            .catalog
            .set_len(catalog_len)
            .map_err(io_error(format!(
                "undo a failed batch: truncate {} to {catalog_len} bytes",
                self.dir.join(CATALOG_FILE).display()
            )))?;
        writer.catalog_len = catalog_len;
        Ok(())
    }

    /// Every volume, sorted by name.
    pub fn volumes(&self) -> Vec<VolumeSummary> {
        let state = self.read_state();
        state
            .volumes
            .iter()
            .filter_map(|(name, volume)| {
                let group = state.groups.get(&volume.group)?;
                Some(VolumeSummary {
                    name: name.clone(),
                    group: volume.group.clone(),
                    size_bytes: volume.size_bytes,
                    durable_seq: group.durable(),
                    newest_record_time: group.records.last().map(|r| r.time),
                    window: volume.window(group),
                    complete: volume.complete(),
                })
            })
            .collect()
    }

    /// The group `volume` belongs to.
    pub fn group_of(&self, volume: &VolumeName) -> Option<GroupName> {
        self.read_state()
            .volumes
            .get(volume)
            .map(|v| v.group.clone())
    }

    /// Volumes of `group` in registration order, if it is registered.
    pub fn group_volumes(&self, group: &GroupName) -> Option<Vec<VolumeName>> {
        self.read_state()
            .groups
            .get(group)
            .map(|g| g.volumes.clone())
    }

    /// The newest `limit` flush points and checkpoints of `group`, oldest first.
    pub fn points(
        &self,
        group: &GroupName,
        kinds: PointKinds,
        limit: usize,
    ) -> Option<Vec<Record>> {
        let state = self.read_state();
        let records = &state.groups.get(group)?.records;
        let mut points: Vec<Record> = records
            .iter()
            .rev()
            .filter(|r| match r.kind {
                RecordKind::Checkpoint { .. } => true,
                RecordKind::Flush => kinds == PointKinds::FlushesAndCheckpoints,
                _ => false,
            })
            .take(limit)
            .cloned()
            .collect();
        points.reverse();
        Some(points)
    }

    /// The seq of the checkpoint called `name` in `group`.
    pub fn checkpoint_seq(&self, group: &GroupName, name: &str) -> Option<Seq> {
        let state = self.read_state();
        state
            .groups
            .get(group)?
            .records
            .iter()
            .rev()
            .find_map(|r| match &r.kind {
                RecordKind::Checkpoint { name: n, .. } if n.as_str() == name => Some(r.seq),
                _ => None,
            })
    }

    /// The durable seq of `group`, if it is registered.
    pub fn durable_seq(&self, group: &GroupName) -> Option<Seq> {
        self.read_state().groups.get(group).map(GroupState::durable)
    }

    /// The block map of `volume` after every record of its group up to `point`.
    pub fn plan(&self, volume: &VolumeName, point: PointInTime) -> Result<RestorePlan, StoreError> {
        let state = self.read_state();
        let unknown = || StoreError::UnknownVolume {
            volume: volume.clone(),
        };
        let vol = state.volumes.get(volume).ok_or_else(unknown)?;
        let group = state.groups.get(&vol.group).ok_or_else(unknown)?;
        let applied = group.prefix_len(point);
        let last = applied.checked_sub(1).map(|i| &group.records[i]);
        let not_restorable = |reason| StoreError::NotRestorable {
            volume: volume.clone(),
            reason,
        };
        vol.check_restorable(group, point, last.map(|r| r.seq))
            .map_err(not_restorable)?;
        let Some(last) = last else {
            return Err(not_restorable(format!(
                "{point} is before the group's first record"
            )));
        };
        Ok(RestorePlan {
            volume: volume.clone(),
            size_bytes: vol.size_bytes,
            seq: last.seq,
            time: last.time,
            blocks: journal::replay(&group.records[..applied], volume),
        })
    }

    /// The frame holding chunk `hash`, from the cache or read, decompressed and verified.
    fn frame_of(&self, hash: &ChunkHash) -> Result<(Arc<LoadedFrame>, ChunkLoc), ChunkReadError> {
        let loc = self
            .read_state()
            .chunks
            .get(hash)
            .ok_or(ChunkReadError::Unknown { hash: *hash })?;
        let key = (loc.pack, loc.offset);
        if let Some(frame) = self.cache.get(key) {
            return Ok((frame, loc));
        }
        let frame = Arc::new(self.load_frame(&loc)?);
        self.cache.insert(key, Arc::clone(&frame));
        Ok((frame, loc))
    }

    /// Reads, decompresses and verifies the frame holding `loc`, bypassing the frame cache.
    fn load_frame(&self, loc: &ChunkLoc) -> Result<LoadedFrame, ChunkReadError> {
        let (file, path) = self.pack_of(loc)?;
        pack::load_frame(&file, &path, loc)
    }

    /// Reads `len` bytes of the pack holding `loc` from `loc`'s frame on, directly where the
    /// filesystem allows (see [`pack::read_direct`]).
    fn read_window(
        &self,
        loc: &ChunkLoc,
        len: usize,
    ) -> Result<Arc<pack::PackWindow>, ChunkReadError> {
        let (file, path) = self.pack_of(loc)?;
        if let Some(direct) = self.packs.direct_file(loc.pack) {
            match pack::read_direct(&direct, loc.offset, len) {
                Ok(window) => return Ok(Arc::new(window)),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(pack = %path.display(), error = %e,
                        "direct pack read refused: this pack is read through the page cache from now on");
                    self.packs.refuse_direct(loc.pack);
                }
                Err(source) => return Err(pack::io_error(&path, loc, source)),
            }
        }
        pack::read_buffered(&file, loc.offset, len)
            .map(Arc::new)
            .map_err(|source| pack::io_error(&path, loc, source))
    }

    /// The open pack file holding `loc`, and its path (for messages).
    fn pack_of(&self, loc: &ChunkLoc) -> Result<(Arc<File>, PathBuf), ChunkReadError> {
        let path = self.packs.path(loc.pack);
        let file = self
            .packs
            .file(loc.pack)
            .map_err(|source| ChunkReadError::Io {
                pack: path.display().to_string(),
                offset: loc.offset,
                source,
            })?;
        Ok((file, path))
    }

    /// Appends the verified 4096 bytes of chunk `hash` to `out`.
    pub(crate) fn append_chunk(
        &self,
        hash: &ChunkHash,
        out: &mut Vec<u8>,
    ) -> Result<(), ChunkReadError> {
        let (frame, loc) = self.frame_of(hash)?;
        let block = frame
            .block(loc.index, hash)
            .map_err(|reason| ChunkReadError::Corrupt {
                pack: self.packs.path(loc.pack).display().to_string(),
                offset: loc.offset,
                reason,
            })?;
        out.extend_from_slice(block);
        Ok(())
    }

    /// Reads one chunk (4096 bytes) and checks it against its hash.
    pub fn read_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, ChunkReadError> {
        let mut out = Vec::with_capacity(BLOCK_SIZE);
        self.append_chunk(hash, &mut out)?;
        Ok(out)
    }

    /// The stored frames holding `hashes`, each once, in pack order, read one at a time as the
    /// iterator is advanced (the caller keeps what it needs of each, so memory stays bounded by
    /// that), with their compressed bytes as stored, so a replicator can forward them instead of
    /// compressing their blocks again. Each frame is decompressed and every block checked
    /// against its hash (a damaged pack fails here, naming it, not at the receiver).
    pub fn frames_holding(
        &self,
        hashes: &[ChunkHash],
    ) -> Result<impl Iterator<Item = Result<HeldFrame, ChunkReadError>> + '_, ChunkReadError> {
        let mut frames: BTreeMap<(PackId, u64), (ChunkLoc, usize)> = BTreeMap::new();
        {
            let state = self.read_state();
            for hash in hashes {
                let loc = state
                    .chunks
                    .get(hash)
                    .ok_or(ChunkReadError::Unknown { hash: *hash })?;
                frames.entry((loc.pack, loc.offset)).or_insert((loc, 0)).1 += 1;
            }
        }
        Ok(frames.into_values().map(|(loc, asked)| {
            let path = self.packs.path(loc.pack);
            let window = self.read_window(&loc, loc.entry_len as usize)?;
            let (hashes, zstd) = pack::frame_in_window(&window, &path, &loc)?;
            let data = frame::open(zstd.as_ref(), &hashes)
                .map_err(|e| pack::corrupt(&path, &loc, e.to_string()))?;
            Ok(HeldFrame {
                hashes,
                zstd,
                data,
                asked,
            })
        }))
    }

    pub fn stats(&self) -> StoreStats {
        let state = self.read_state();
        let chunk_count = state.chunks.len() as u64;
        StoreStats {
            chunk_count,
            logical_chunk_bytes: chunk_count * BLOCK_SIZE_BYTES,
            stored_bytes: state.stored_bytes,
            pack_file_bytes: state.pack_lens.values().sum(),
        }
    }
}

/// [`verify_incoming`] for every frame, spread over the machine's cores (each frame costs a
/// decompression and a blake3 per block, the largest CPU cost of an ingest). Returns the error
/// of the first bad frame.
fn verify_all(frames: &[IncomingFrame<'_>]) -> Result<(), StoreError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(frames.len());
    if threads <= 1 {
        return frames
            .iter()
            .enumerate()
            .try_for_each(|(index, incoming)| verify_incoming(index, incoming));
    }
    let per_thread = frames.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = frames
            .chunks(per_thread)
            .enumerate()
            .map(|(part, chunk)| {
                scope.spawn(move || {
                    chunk.iter().enumerate().try_for_each(|(i, incoming)| {
                        verify_incoming(part * per_thread + i, incoming)
                    })
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

/// Decompresses an incoming frame and checks every block against its hash.
fn verify_incoming(index: usize, incoming: &IncomingFrame<'_>) -> Result<(), StoreError> {
    let n = incoming.hashes.len();
    let bad = |reason: String| StoreError::BadFrame {
        frame: index,
        reason,
    };
    if n == 0 || n > MAX_FRAME_BLOCKS {
        return Err(bad(format!(
            "it names {n} blocks; 1 to {MAX_FRAME_BLOCKS} are allowed"
        )));
    }
    let body_len = pack::frame_header_bytes(n) + incoming.zstd_data.len();
    if body_len > MAX_ENTRY_BODY_BYTES as usize {
        return Err(bad(format!(
            "{} compressed bytes is too large",
            incoming.zstd_data.len()
        )));
    }
    match frame::open(incoming.zstd_data, incoming.hashes) {
        Ok(_) => Ok(()),
        Err(FrameError::HashMismatch {
            index: block,
            expected,
        }) => Err(StoreError::ChunkMismatch {
            frame: index,
            block,
            expected,
        }),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Checks one new record against the group's volumes and the chunks at hand.
fn check_record(
    state: &State,
    group: &GroupName,
    record: &Record,
    incoming: &HashSet<&ChunkHash>,
) -> Result<(), StoreError> {
    let seq = record.seq;
    let Some(volume) = record.kind.volume() else {
        return Ok(());
    };
    let vol = state
        .volumes
        .get(volume)
        .filter(|v| v.group == *group)
        .ok_or_else(|| StoreError::ForeignVolume {
            group: group.clone(),
            seq,
            volume: volume.clone(),
        })?;
    let invalid = |reason: &str| StoreError::InvalidRecord {
        seq,
        reason: reason.to_string(),
    };
    let range = match &record.kind {
        RecordKind::Write { first, blocks, .. } => {
            if blocks.is_empty() || blocks.len() as u64 > MAX_BLOCKS_PER_RECORD {
                return Err(invalid("a write must carry 1 to 16384 blocks"));
            }
            Some((*first, blocks.len() as u64))
        }
        RecordKind::Trim { first, count, .. } | RecordKind::WriteZeroes { first, count, .. } => {
            if *count == 0 {
                return Err(invalid(
                    "a trim or write-zeroes must cover at least one block",
                ));
            }
            Some((*first, *count))
        }
        _ => None,
    };
    if let Some((first, count)) = range {
        let blocks = vol.block_count();
        let end = first.0.checked_add(count);
        if end.is_none_or(|end| end > blocks) {
            return Err(StoreError::OutOfRange {
                seq,
                volume: volume.clone(),
                first: first.0,
                end: end.unwrap_or(u64::MAX),
                size_bytes: vol.size_bytes,
                blocks,
            });
        }
    }
    if let RecordKind::Write { blocks, .. } = &record.kind {
        // The batch's own chunks first: a small set, where an ingest of new data finds every
        // hash, while a look in the chunk index, far larger than the caches, misses them.
        for hash in blocks.iter().flatten() {
            if !incoming.contains(hash) && !state.chunks.contains_key(hash) {
                return Err(StoreError::MissingChunk { hash: *hash, seq });
            }
        }
    }
    Ok(())
}

/// Who sent a batch: the group's agent (this site must be primary) or the primary site.
#[derive(Clone, Copy, Debug)]
enum Source {
    Agent,
    Replica(Epoch),
}

/// A record resent with a seq the journal holds must be the record stored there: a spool that
/// lost records to a power loss hands their seqs to new writes, and skipping those as resends
/// would lose them.
fn check_resend(group: &GroupName, g: &GroupState, resent: &Record) -> Result<(), StoreError> {
    match g.record_of_current_spool(resent.seq) {
        Some(stored) if stored != resent => Err(StoreError::ResendDiffers {
            group: group.clone(),
            seq: resent.seq,
            stored_time: stored.time.0,
            resent_time: resent.time.0,
        }),
        _ => Ok(()),
    }
}

fn check_source(group: &GroupName, g: &GroupState, source: Source) -> Result<(), StoreError> {
    let epoch = g.epoch();
    match (source, g.role) {
        (Source::Agent, GroupRole::Primary) => Ok(()),
        (Source::Agent, GroupRole::Fenced { by }) => Err(StoreError::Fenced {
            group: group.clone(),
            epoch,
            by,
        }),
        (Source::Agent, GroupRole::Replica) => Err(StoreError::NotPrimary {
            group: group.clone(),
            epoch,
        }),
        (Source::Replica(offered), GroupRole::Replica) if offered == epoch => Ok(()),
        (Source::Replica(offered), role) => Err(StoreError::StaleEpoch {
            group: group.clone(),
            offered,
            current: match role {
                GroupRole::Fenced { by } => by.max(epoch),
                _ => epoch,
            },
            role,
        }),
    }
}

/// Checks a registration's own volume list.
fn check_volume_list(group: &GroupName, volumes: &[VolumeMeta]) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::InvalidRegistration {
        group: group.clone(),
        reason,
    };
    if volumes.is_empty() {
        return Err(invalid("a group needs at least one volume".into()));
    }
    let mut seen = HashSet::new();
    for v in volumes {
        if !seen.insert(&v.name) {
            return Err(invalid(format!("volume {} is listed twice", v.name)));
        }
        if v.size_bytes == 0 {
            return Err(invalid(format!("volume {} has a size of 0 bytes", v.name)));
        }
    }
    Ok(())
}

/// Checks registered volumes against what the store knows of them.
fn check_volumes(
    state: &State,
    group: &GroupName,
    volumes: &[VolumeMeta],
) -> Result<(), StoreError> {
    for v in volumes {
        if let Some(existing) = state.volumes.get(&v.name) {
            if existing.group != *group {
                return Err(StoreError::VolumeInOtherGroup {
                    volume: v.name.clone(),
                    existing: existing.group.clone(),
                    requested: group.clone(),
                });
            }
            if existing.size_bytes != v.size_bytes {
                return Err(StoreError::VolumeSizeChanged {
                    volume: v.name.clone(),
                    registered_bytes: existing.size_bytes,
                    reported_bytes: v.size_bytes,
                });
            }
        }
    }
    Ok(())
}

fn group_info(state: &State, name: &GroupName, g: &GroupState) -> GroupInfo {
    GroupInfo {
        name: name.clone(),
        role: g.role,
        epoch: g.epoch(),
        history: g.history.clone(),
        durable_seq: g.durable(),
        newest_record_time: g.records.last().map(|r| r.time),
        spool_id: g.spool_id,
        seq_base: g.seq_base,
        spool_epoch: g.spool_epoch,
        volumes: g
            .volumes
            .iter()
            .filter_map(|v| {
                state.volumes.get(v).map(|s| VolumeMeta {
                    name: v.clone(),
                    size_bytes: s.size_bytes,
                })
            })
            .collect(),
        abandoned: g.abandoned.as_ref().map(|a| (a.fork, a.tail.len() as u64)),
    }
}

/// Blocks whose content differs between two sorted block maps, with their content in `to`.
fn diff_blocks(
    from: &[(BlockNo, ChunkHash)],
    to: &[(BlockNo, ChunkHash)],
) -> Vec<(BlockNo, Option<ChunkHash>)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        match (from.get(i), to.get(j)) {
            (Some(a), Some(b)) if a.0 == b.0 => {
                if a.1 != b.1 {
                    out.push((b.0, Some(b.1)));
                }
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a.0 < b.0 => {
                out.push((a.0, None));
                i += 1;
            }
            (Some(a), None) => {
                out.push((a.0, None));
                i += 1;
            }
            (_, Some(b)) => {
                out.push((b.0, Some(b.1)));
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}

/// Takes the store directory's lock, so that two processes never append to the same files.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error(format!("open {}", path.display())))?;
    // SAFETY: flock takes a descriptor number and flags, and `file` keeps the descriptor open
    // for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(StoreError::Locked {
                dir: dir.display().to_string(),
            });
        }
        return Err(io_error(format!("lock {}", path.display()))(error));
    }
    Ok(file)
}

/// Makes `staging` at least `needed` bytes long, keeping its first `kept` bytes.
fn stage_room(staging: &mut AlignedBuf, kept: usize, needed: usize) {
    if staging.len() < needed {
        let mut larger = AlignedBuf::zeroed(needed.next_power_of_two());
        larger[..kept].copy_from_slice(&staging[..kept]);
        *staging = larger;
    }
}

/// fsyncs a directory, making the creation of the files in it durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("fsync directory {}", dir.display())))
}

/// Recovery of the pack files after the catalog was replayed: truncates every pack to the end
/// of its last referenced frame and picks the pack to append to. Fills `state.pack_lens`.
fn recover_packs(packs: &Packs, state: &mut State) -> Result<(PackId, Arc<File>, u64), StoreError> {
    let dir = packs.dir();
    let mut existing = BTreeMap::new();
    for dirent in std::fs::read_dir(dir).map_err(io_error(format!("list {}", dir.display())))? {
        let dirent = dirent.map_err(io_error(format!("list {}", dir.display())))?;
        if let Some(id) = dirent.file_name().to_str().and_then(PackId::from_file_name) {
            existing.insert(id, dirent.path());
        }
    }
    let mut damaged = HashSet::new();
    for (id, path) in &existing {
        let referenced = state.referenced_ends.get(id).copied().unwrap_or(0);
        let len = std::fs::metadata(path)
            .map_err(io_error(format!("stat {}", path.display())))?
            .len();
        // Batches start at block boundaries: zeros up to the next one may pad the last
        // committed batch, and what lies beyond belongs to a batch that never committed.
        let keep = direct::align_up(referenced);
        let len = if len > keep {
            tracing::warn!(
                pack = %path.display(),
                dropped_bytes = len - keep,
                "pack ends with frames no committed batch references (a batch whose catalog fsync never returned); truncating them"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_error(format!("open {}", path.display())))?;
            file.set_len(keep)
                .and_then(|()| file.sync_all())
                .map_err(io_error(format!(
                    "truncate {} to {keep} bytes",
                    path.display()
                )))?;
            keep
        } else {
            if len < referenced {
                tracing::error!(
                    pack = %path.display(),
                    len,
                    referenced,
                    "pack is shorter than the catalog says: reads of the frames past its end will fail"
                );
                damaged.insert(*id);
            }
            len
        };
        state.pack_lens.insert(*id, len);
    }
    for id in state.referenced_ends.keys() {
        if !existing.contains_key(id) {
            tracing::error!(pack = %packs.path(*id).display(), "pack file referenced by the catalog is missing: reads of its chunks will fail");
        }
    }
    let last_existing = existing.keys().next_back().copied();
    let last_referenced = state.referenced_ends.keys().next_back().copied();
    let highest = last_existing.max(last_referenced);
    let reuse = match highest {
        Some(id) if Some(id) == last_existing && !damaged.contains(&id) => Some(id),
        _ => None,
    };
    let (id, create) = match (reuse, highest) {
        (Some(id), _) => (id, false),
        (None, Some(id)) => (PackId(id.0 + 1), true),
        (None, None) => (PackId::FIRST, true),
    };
    let path = packs.path(id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(&path)
        .map_err(io_error(format!("open pack {}", path.display())))?;
    if create {
        sync_dir(dir)?;
    }
    let len = file
        .metadata()
        .map_err(io_error(format!("stat {}", path.display())))?
        .len();
    state.pack_lens.insert(id, len);
    Ok((id, Arc::new(file), len))
}
