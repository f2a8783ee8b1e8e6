//! The agent's spool: a crash-safe, bounded, local journal of one consistency group.
//!
//! Every write is appended here *before* the client is answered, so a record survives the agent
//! being killed (the bytes are in the kernel's page cache) and, after the next flush, a power
//! loss (the segment is fsynced). The shipper reads the spool in `seq` order and the agent
//! deletes whole segments once the collector says their records are durable.
//!
//! Layout of `DIR` (one directory per group):
//! * `spool.id`: the spool's random 64-bit id, written once (temp file, fsync, rename, fsync dir).
//! * `NNNNNNNNNNNNNNNNNNNN.seg`: segments named after their first `seq`, each a sequence of
//!   [`crate::framed`] entries holding one [`SpoolEntry`] each.
//! * `NNNNNNNNNNNNNNNNNNNN.saved`: beside a segment, blocks of its [`SpoolOp::OnVolume`]
//!   writes saved before the volume was overwritten ([`Spool::save_blocks`]), one framed entry
//!   per save (record seq, first block, the blocks). Each save is fdatasynced before the
//!   overwrite it precedes (saves made at the same time share one fdatasync); deleted with the
//!   segment.
//!
//! A large aligned write's data is not spooled at all: its record ([`SpoolOp::OnVolume`]) holds
//! the blocks' hashes, the volume holds the data, and the agent saves those blocks here before
//! anything overwrites them while the record is unshipped ([`Spool::save_blocks`]).
//!
//! Nothing is written to the disk on the spool's own account: entries stay in the page cache
//! until a FLUSH (or a checkpoint) makes them durable, or the kernel writes them back on its
//! own. Entries the collector holds before either happens are deleted with their segment and
//! never reach the disk, so a volume's bytes are written once, not twice, while the collector
//! keeps up. A closed segment is fdatasynced by the next [`Spool::append_durable`], before the
//! marker it appends, so a durable marker proves that everything before it is durable too.
//!
//! Recovery on open: segments are scanned in order. Where they stop short (an entry cut off or
//! damaged with nothing valid after it in its segment, or a segment whose successor does not
//! start at the next seq) and no later segment holds a durable marker (`Flush`, `Checkpoint`),
//! the rest is the unflushed tail a power loss left: it is cut off and the spool reports
//! [`Spool::dropped_unflushed`], so the agent resyncs its volumes. Damage before a durable
//! marker is corruption and refuses to open, naming the file and offset.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::framed::{self, ENTRY_HEADER_BYTES, ENTRY_MAGIC, MAX_ENTRY_BODY_BYTES};
use crate::record::{DecodeError, Record, RecordKind, WriteOrigin};
use crate::types::{BlockNo, Seq, TimeNs, VolumeName, BLOCK_SIZE};

/// Default size at which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Room kept free past the limit for small control records (gap markers, flushes).
const CONTROL_RESERVE_BYTES: u64 = 1 << 20;
/// A closed segment with this much appended after it has waited longer for the collector than
/// a stream that keeps pace makes it wait: its writeback is started, so a flush while the
/// collector is behind or away finds at most about this much (and the active segment) left to
/// write. It also paces writers that outrun the shipper: at 256 MiB, flat-out writes through
/// the tap settled at a lag of 1.2-1.8 s; at 64 MiB, 64-216 ms, with more written per second.
const WRITEBACK_LAG_BYTES: u64 = 64 << 20;

/// The spool's id, in hexadecimal.
const ID_FILE: &str = "spool.id";
/// A succession the collector has not yet accepted: the predecessor's id and `resume_after`.
const SUCCESSION_FILE: &str = "spool.succession";

/// A spool that lost records the collector already holds (a power loss took them from the
/// page cache) continues the group's journal under a new id: its records after `resume_after`
/// follow the collector's newest. Pending until the collector has accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Succession {
    pub predecessor: u64,
    pub resume_after: Seq,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Most bytes the spool may hold; an append past it fails with [`SpoolError::Full`].
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.into(),
            max_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES.min(max_bytes / 4).max(1 << 20),
        }
    }
}

/// What the spool holds for one journal record. Writes carry their block data, which the
/// shipper hashes and compresses off the write path, except large aligned writes, whose data
/// stays on the volume ([`SpoolOp::OnVolume`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolEntry {
    pub seq: Seq,
    pub time: TimeNs,
    pub op: SpoolOp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpoolOp {
    /// Whole blocks starting at `first`; `data.len()` is a multiple of [`BLOCK_SIZE`].
    Write {
        volume: VolumeName,
        first: BlockNo,
        /// Shared, not copied, between the tap, the spool and the shipper: a large write's
        /// buffer is the one its bytes arrived in, aligned for direct I/O.
        data: Bytes,
        origin: WriteOrigin,
    },
    /// A write whose data stays on the volume: its journal record (a `RecordKind::Write`, its
    /// blocks' hashes included) without the blocks. The shipper reads them back from the
    /// volume, or from the copy saved before they were overwritten ([`Spool::save_blocks`]),
    /// and checks them against the hashes.
    OnVolume(RecordKind),
    /// Any record kind other than `Write`, spooled as its journal record.
    Other(RecordKind),
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir} is full ({used_bytes} of {max_bytes} bytes): the collector is behind or unreachable")]
    Full {
        dir: String,
        used_bytes: u64,
        max_bytes: u64,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Scan(#[from] framed::ScanError),
    #[error("spool {dir}: segment {segment} starts at {found} but {expected} was expected; records are missing. Move the spool directory aside to start afresh (a full resync follows)")]
    Gap {
        dir: String,
        segment: String,
        expected: Seq,
        found: Seq,
    },
    #[error("spool entry at {segment} byte {offset}: {source}")]
    Decode {
        segment: String,
        offset: u64,
        #[source]
        source: DecodeError,
    },
}

/// Writes all of `slices` with `writev`, resuming after a short write.
fn write_all_vectored(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SpoolError {
    let context = context.into();
    move |source| SpoolError::Io { context, source }
}

const TAG_WRITE: u8 = 1;
const TAG_RECORD: u8 = 2;
const TAG_ON_VOLUME: u8 = 3;

impl SpoolEntry {
    /// Appends the entry's body to `out` up to its block data, which [`SpoolEntry::block_data`]
    /// gives: the spool writes that with `writev` from the op's own buffer.
    fn encode_head(&self, out: &mut Vec<u8>) {
        match &self.op {
            SpoolOp::Write {
                volume,
                first,
                origin,
                ..
            } => {
                out.push(TAG_WRITE);
                out.extend_from_slice(&self.seq.0.to_le_bytes());
                out.extend_from_slice(&self.time.0.to_le_bytes());
                out.push(u8::from(*origin == WriteOrigin::Resync));
                out.push(volume.as_str().len() as u8);
                out.extend_from_slice(volume.as_str().as_bytes());
                out.extend_from_slice(&first.0.to_le_bytes());
            }
            SpoolOp::Other(kind) | SpoolOp::OnVolume(kind) => {
                let tag = match self.op {
                    SpoolOp::OnVolume(_) => TAG_ON_VOLUME,
                    _ => TAG_RECORD,
                };
                out.push(tag);
                Record {
                    seq: self.seq,
                    time: self.time,
                    kind: kind.clone(),
                }
                .encode(out);
            }
        }
    }

    /// Decodes an entry's body; a write's block data is a slice of `body`, not a copy.
    fn decode(body: Bytes) -> Result<SpoolEntry, DecodeError> {
        let (&tag, rest) = body
            .split_first()
            .ok_or(DecodeError::Truncated { at: 0, needed: 1 })?;
        match tag {
            TAG_RECORD => {
                let record = Record::decode(rest)?;
                Ok(SpoolEntry {
                    seq: record.seq,
                    time: record.time,
                    op: SpoolOp::Other(record.kind),
                })
            }
            TAG_WRITE => decode_write(body.slice(1..)),
            TAG_ON_VOLUME => match Record::decode(rest)? {
                Record {
                    seq,
                    time,
                    kind: kind @ RecordKind::Write { .. },
                } => Ok(SpoolEntry {
                    seq,
                    time,
                    op: SpoolOp::OnVolume(kind),
                }),
                _ => Err(DecodeError::OutOfRange(
                    "a write on the volume that is not a write",
                )),
            },
            other => Err(DecodeError::UnknownKind(other)),
        }
    }

    /// The block data that ends a write's body; empty for other records.
    fn block_data(&self) -> &[u8] {
        match &self.op {
            SpoolOp::Write { data, .. } => data,
            SpoolOp::OnVolume(_) | SpoolOp::Other(_) => &[],
        }
    }

    /// Bytes this entry occupies in a segment.
    fn encoded_len(&self) -> u64 {
        let body = match &self.op {
            SpoolOp::Write { volume, data, .. } => {
                1 + 8 + 8 + 1 + 1 + volume.as_str().len() + 8 + data.len()
            }
            SpoolOp::OnVolume(kind) => 64 + 33 * kind.block_count() as usize,
            SpoolOp::Other(_) => 256,
        };
        ENTRY_HEADER_BYTES + body as u64
    }
}

/// Decodes a write's body after its tag; the block data is a slice of `rest`.
fn decode_write(rest: Bytes) -> Result<SpoolEntry, DecodeError> {
    let fixed = 8 + 8 + 1 + 1;
    if rest.len() < fixed {
        return Err(DecodeError::Truncated {
            at: 1,
            needed: fixed - rest.len(),
        });
    }
    let word = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&rest[at..at + 8]);
        raw
    };
    let seq = Seq(u64::from_le_bytes(word(0)));
    let time = TimeNs(i64::from_le_bytes(word(8)));
    let origin = if rest[16] == 0 {
        WriteOrigin::Client
    } else {
        WriteOrigin::Resync
    };
    let name_len = usize::from(rest[17]);
    let data_at = fixed + name_len + 8;
    if rest.len() < data_at {
        return Err(DecodeError::Truncated {
            at: rest.len(),
            needed: data_at - rest.len(),
        });
    }
    let name = std::str::from_utf8(&rest[fixed..fixed + name_len])
        .map_err(|_| DecodeError::BadName("not UTF-8".into()))?;
    let volume = VolumeName::new(name).map_err(|e| DecodeError::BadName(e.to_string()))?;
    let first = BlockNo(u64::from_le_bytes(word(fixed + name_len)));
    let data = rest.slice(data_at..);
    if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) {
        return Err(DecodeError::OutOfRange("write data length"));
    }
    Ok(SpoolEntry {
        seq,
        time,
        op: SpoolOp::Write {
            volume,
            first,
            data,
            origin,
        },
    })
}

#[derive(Debug)]
struct Segment {
    first_seq: Seq,
    /// Newest seq in the segment; `first_seq - 1` while empty.
    last_seq: Seq,
    path: PathBuf,
    len_bytes: u64,
    /// A closed segment not yet fdatasynced keeps its handle here until a sync has.
    unsynced: Option<Arc<File>>,
    /// Writeback of this closed segment has been started (see [`WRITEBACK_LAG_BYTES`]).
    writeback_started: bool,
    /// Bytes of its `.saved` file.
    saved_bytes: u64,
}

impl Segment {
    fn new(first_seq: Seq, path: PathBuf) -> Segment {
        Segment {
            first_seq,
            last_seq: Seq(first_seq.0 - 1),
            path,
            len_bytes: 0,
            unsynced: None,
            writeback_started: false,
            saved_bytes: 0,
        }
    }
}

struct Inner {
    segments: VecDeque<Segment>,
    active: Arc<File>,
    /// Segments created so far, and how many of them the last directory fsync covered: a
    /// new segment's name is durable only once the directory is.
    segments_created: u64,
    dir_synced_through: u64,
    next_seq: Seq,
    last_time: TimeNs,
    used_bytes: u64,
    /// Newest seq the collector has made durable (segments at or below it can go).
    released_through: Seq,
    encode_buf: Vec<u8>,
    /// Threads in [`Spool::wait_beyond`]. An append wakes them only when there are any: a
    /// condvar notify is a futex call even when nobody waits, and appends come once per write.
    waiters: usize,
    /// Blocks saved for records still spooled, by record.
    saved: BTreeMap<Seq, Vec<SavedRun>>,
}

/// `count` blocks from volume block `first`, saved for one record at `data_offset` of `path`.
#[derive(Debug, Clone)]
struct SavedRun {
    first: BlockNo,
    count: u64,
    path: PathBuf,
    data_offset: u64,
}

/// Bytes of a saved entry's body before its blocks: the record's seq and the first block.
const SAVED_HEAD_BYTES: usize = 16;

impl Inner {
    /// Every closed segment and every segment name is durable.
    fn all_closed_synced(&self) -> bool {
        self.segments.iter().all(|s| s.unsynced.is_none())
            && self.segments_created <= self.dir_synced_through
    }
}

/// One group's spool. Appends are serialised by an internal mutex; readers (the shipper) use
/// [`SpoolReader`] and never block writers for longer than a length check.
pub struct Spool {
    config: SpoolConfig,
    identity: Mutex<Identity>,
    inner: Mutex<Inner>,
    appended: Condvar,
    dropped_unflushed: bool,
    /// The [`SpoolOp::OnVolume`] records found at open, until taken.
    recovered_on_volume: Mutex<Vec<(Seq, RecordKind)>>,
    /// Held by [`Spool::save_blocks`] while it writes, so saves do not interleave.
    saving: Mutex<()>,
    /// Which saves are durable; notified after each sync of them.
    save_sync: Mutex<SaveSync>,
    saves_synced: Condvar,
}

/// Blocks of an unshipped record to save before the volume overwrites them
/// ([`Spool::save_blocks`]).
#[derive(Debug, Clone)]
pub struct BlockSave {
    /// The record whose data the blocks are.
    pub seq: Seq,
    /// The volume block the data starts at.
    pub first: BlockNo,
    /// Whole blocks.
    pub data: Bytes,
}

/// Where a save's entry went: its file and offset, or nowhere (its record was released).
type SavedAt = Option<(PathBuf, u64)>;

/// Group commit of saves: batches are numbered as they are written; a sync covers every batch
/// written before it started.
#[derive(Default)]
struct SaveSync {
    written_batches: u64,
    synced_batches: u64,
    syncing: bool,
    /// `.saved` files written since the last sync.
    dirty: Vec<(PathBuf, File)>,
    /// A `.saved` file was created since the last sync: its name needs the directory synced.
    new_files: bool,
    /// What failed, once a sync has.
    failed: Option<String>,
}

/// The spool's id, and the succession the collector has yet to accept (they change together).
#[derive(Clone, Copy)]
struct Identity {
    spool_id: u64,
    pending: Option<Succession>,
}

/// Asks the kernel to start writing all of `file` back, without waiting for it. Advisory: if
/// it fails, the next fdatasync writes those bytes instead.
fn start_writeback(file: &File) {
    // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open for as
    // long as `file` is borrowed. Offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn saved_path(segment: &Path) -> PathBuf {
    segment.with_extension("saved")
}

fn segment_path(dir: &Path, first: Seq) -> PathBuf {
    dir.join(format!("{:020}.seg", first.0))
}

fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync directory {}", dir.display())))
}

fn load_or_create_id(dir: &Path) -> Result<u64, SpoolError> {
    let path = dir.join(ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16).map_err(|_| SpoolError::Io {
            context: format!("read {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidData, "not a hexadecimal spool id"),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_new_id(dir),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

/// Takes a new random spool id and stores it durably.
fn write_new_id(dir: &Path) -> Result<u64, SpoolError> {
    let id = random_u64();
    write_small_file(dir, ID_FILE, &format!("{id:016x}\n"))?;
    Ok(id)
}

/// Replaces `dir/name` with `text` so that a crash leaves the old or the new content: a
/// temporary file, fsync, rename, fsync of the directory.
fn write_small_file(dir: &Path, name: &str, text: &str) -> Result<(), SpoolError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(io_err(format!("write {}", path.display())))?;
    fsync_dir(dir)
}

/// The pending succession in `dir`, if any (see [`Succession`]).
fn load_succession(dir: &Path) -> Result<Option<Succession>, SpoolError> {
    let path = dir.join(SUCCESSION_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("read {}", path.display()))(e)),
    };
    let bad = || SpoolError::Io {
        context: format!("read {}", path.display()),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            "expected a hexadecimal spool id and a seq",
        ),
    };
    let mut words = text.split_whitespace();
    let predecessor = words
        .next()
        .and_then(|w| u64::from_str_radix(w, 16).ok())
        .ok_or_else(bad)?;
    let resume_after = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    Ok(Some(Succession {
        predecessor,
        resume_after: Seq(resume_after),
    }))
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let now = TimeNs::now().0 as u64;
        bytes = (now ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

impl Spool {
    /// Opens (or creates) the spool in `config.dir`, recovering from a crash as the module
    /// documentation describes.
    pub fn open(config: SpoolConfig) -> Result<Spool, SpoolError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir)
            .map_err(io_err(format!("create spool directory {}", dir.display())))?;
        let mut spool_id = load_or_create_id(&dir)?;
        let succession = load_succession(&dir)?;
        if succession.is_some_and(|s| s.predecessor == spool_id) {
            // The succession was recorded and the new id was not: take one now.
            spool_id = write_new_id(&dir)?;
        }
        let mut firsts = list_segments(&dir)?;
        firsts.sort();
        let Recovered {
            mut segments,
            next_seq,
            last_time,
            dropped_unflushed,
            on_volume,
        } = recover_segments(&dir, &firsts)?;
        let saved = recover_saved(&dir, &mut segments)?;
        if segments.is_empty() {
            let path = segment_path(&dir, next_seq);
            File::create(&path).map_err(io_err(format!("create {}", path.display())))?;
            fsync_dir(&dir)?;
            segments.push_back(Segment::new(next_seq, path));
        }
        let active_path = &segments.back().map(|s| s.path.clone()).unwrap_or_default();
        let active = OpenOptions::new()
            .append(true)
            .open(active_path)
            .map_err(io_err(format!("open {}", active_path.display())))?;
        let used_bytes = segments.iter().map(|s| s.len_bytes + s.saved_bytes).sum();
        Ok(Spool {
            config,
            identity: Mutex::new(Identity {
                spool_id,
                pending: succession,
            }),
            inner: Mutex::new(Inner {
                segments,
                active: Arc::new(active),
                segments_created: 0,
                dir_synced_through: 0,
                next_seq,
                last_time,
                used_bytes,
                released_through: Seq(0),
                encode_buf: Vec::new(),
                waiters: 0,
                saved,
            }),
            appended: Condvar::new(),
            dropped_unflushed,
            recovered_on_volume: Mutex::new(on_volume),
            saving: Mutex::new(()),
            save_sync: Mutex::default(),
            saves_synced: Condvar::new(),
        })
    }

    /// Whether opening cut off an unflushed tail a power loss left behind (see the module
    /// documentation). Those records are gone while the volume may hold their data, so the
    /// journal can differ from the volume anywhere written since the last flush.
    pub fn dropped_unflushed(&self) -> bool {
        self.dropped_unflushed
    }

    /// The [`SpoolOp::OnVolume`] records the spool held when it was opened, in seq order (once;
    /// later calls get none): the writes whose blocks the volume must keep until they ship.
    pub fn take_recovered_on_volume(&self) -> Vec<(Seq, RecordKind)> {
        std::mem::take(
            &mut *self
                .recovered_on_volume
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Saves blocks of unshipped [`SpoolOp::OnVolume`] records before the volume overwrites
    /// them; the shipper takes these blocks instead of the volume's. Durable when this returns.
    /// A save for a record already released needs nothing and gets nothing. All of `saves`
    /// fit in the spool or none is made ([`SpoolError::Full`]).
    ///
    /// Saves made at the same time share their fdatasyncs (group commit): the writers of
    /// 16 random 4 KiB writes that each overwrite a different unshipped large write wait for
    /// one sync between them, not one after another.
    pub fn save_blocks(&self, saves: &[BlockSave]) -> Result<(), SpoolError> {
        let entries: Vec<Vec<u8>> = saves.iter().map(saved_entry_head).collect();
        let lens: Vec<u64> = saves
            .iter()
            .zip(&entries)
            .map(|(save, head)| (head.len() + save.data.len()) as u64)
            .collect();
        let reserved: u64 = lens.iter().sum();
        let batch = self.write_saves(saves, &entries, reserved);
        let synced = batch.and_then(|(batch, offsets)| {
            self.sync_saves(batch)?;
            Ok(offsets)
        });
        let offsets = match synced {
            Ok(offsets) => offsets,
            Err(e) => {
                if !matches!(e, SpoolError::Full { .. }) {
                    self.lock().used_bytes -= reserved;
                }
                return Err(e);
            }
        };
        let mut inner = self.lock();
        let mut orphans = Vec::new();
        for (((save, head), len), at) in saves.iter().zip(&entries).zip(&lens).zip(offsets) {
            let Some((path, at)) = at else {
                inner.used_bytes -= len;
                continue;
            };
            let segment = inner
                .segments
                .iter_mut()
                .find(|s| s.first_seq <= save.seq && save.seq <= s.last_seq);
            let Some(segment) = segment else {
                // Released meanwhile: the collector holds the record, nothing needs the copy.
                inner.used_bytes -= len;
                orphans.push(path);
                continue;
            };
            segment.saved_bytes += len;
            inner.saved.entry(save.seq).or_default().push(SavedRun {
                first: save.first,
                count: (save.data.len() / BLOCK_SIZE) as u64,
                path,
                data_offset: at + head.len() as u64,
            });
        }
        drop(inner);
        orphans.dedup();
        for path in orphans {
            let _ = fs::remove_file(&path);
        }
        Ok(())
    }

    /// Reserves `reserved` bytes and appends each save's entry to its segment's `.saved` file,
    /// unsynced; returns the batch to sync and where each entry went (none for a record
    /// already released). One batch writes at a time, so entries do not interleave.
    fn write_saves(
        &self,
        saves: &[BlockSave],
        entries: &[Vec<u8>],
        reserved: u64,
    ) -> Result<(u64, Vec<SavedAt>), SpoolError> {
        let _writing = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let paths: Vec<Option<PathBuf>> = {
            let mut inner = self.lock();
            if inner.used_bytes + reserved > self.config.max_bytes {
                return Err(SpoolError::Full {
                    dir: self.config.dir.display().to_string(),
                    used_bytes: inner.used_bytes,
                    max_bytes: self.config.max_bytes,
                });
            }
            inner.used_bytes += reserved;
            saves
                .iter()
                .map(|save| {
                    let segment = inner
                        .segments
                        .iter()
                        .find(|s| s.first_seq <= save.seq && save.seq <= s.last_seq)?;
                    Some(saved_path(&segment.path))
                })
                .collect()
        };
        let mut offsets = Vec::with_capacity(saves.len());
        let mut written = Vec::new();
        for ((save, head), path) in saves.iter().zip(entries).zip(paths) {
            let Some(path) = path else {
                offsets.push(None);
                continue;
            };
            let slices = [IoSlice::new(head), IoSlice::new(&save.data)];
            let (file, at) = append_unsynced(&path, &slices)?;
            if !written.iter().any(|(p, _, _)| *p == path) {
                written.push((path.clone(), file, at == 0));
            }
            offsets.push(Some((path, at)));
        }
        let mut sync = self.save_sync();
        sync.written_batches += 1;
        for (path, file, created) in written {
            sync.new_files |= created;
            if !sync.dirty.iter().any(|(p, _)| *p == path) {
                sync.dirty.push((path, file));
            }
        }
        Ok((sync.written_batches, offsets))
    }

    /// Returns once batch `batch` of saves is durable: the first writer to find it unsynced
    /// syncs every `.saved` file written since the last sync (and the directory, for new
    /// ones) for every batch written so far; the others wait for it. A failed sync fails
    /// every save from then on: after an fdatasync error the kernel may have dropped the
    /// pages, and a later sync would report success over them.
    fn sync_saves(&self, batch: u64) -> Result<(), SpoolError> {
        let mut sync = self.save_sync();
        loop {
            if sync.synced_batches >= batch {
                return Ok(());
            }
            if let Some(failed) = &sync.failed {
                return Err(SpoolError::Io {
                    context: failed.clone(),
                    source: io::Error::other("an earlier sync of saved blocks failed"),
                });
            }
            if !sync.syncing {
                break;
            }
            sync = self
                .saves_synced
                .wait(sync)
                .unwrap_or_else(|p| p.into_inner());
        }
        sync.syncing = true;
        let target = sync.written_batches;
        let dirty = std::mem::take(&mut sync.dirty);
        let new_files = std::mem::take(&mut sync.new_files);
        drop(sync);
        let synced = dirty
            .iter()
            .try_for_each(|(path, file)| {
                file.sync_data()
                    .map_err(io_err(format!("fdatasync {}", path.display())))
            })
            .and_then(|()| match new_files {
                true => fsync_dir(&self.config.dir),
                false => Ok(()),
            });
        let mut sync = self.save_sync();
        sync.syncing = false;
        match &synced {
            Ok(()) => sync.synced_batches = target,
            Err(e) => sync.failed = Some(e.to_string()),
        }
        self.saves_synced.notify_all();
        synced
    }

    fn save_sync(&self) -> MutexGuard<'_, SaveSync> {
        self.save_sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where blocks were saved for record `seq`: (first block, count), in the order saved.
    pub fn saved_ranges(&self, seq: Seq) -> Vec<(BlockNo, u64)> {
        let inner = self.lock();
        let runs = inner.saved.get(&seq).map(Vec::as_slice).unwrap_or_default();
        runs.iter().map(|run| (run.first, run.count)).collect()
    }

    /// The blocks saved for record `seq`, in the order they were saved: (first block, blocks).
    pub fn saved_blocks(&self, seq: Seq) -> Result<Vec<(BlockNo, Bytes)>, SpoolError> {
        let runs = self.lock().saved.get(&seq).cloned().unwrap_or_default();
        runs.into_iter()
            .map(|run| {
                let shown = run.path.display().to_string();
                let mut data = BytesMut::zeroed(run.count as usize * BLOCK_SIZE);
                File::open(&run.path)
                    .and_then(|f| f.read_exact_at(&mut data, run.data_offset))
                    .map_err(io_err(format!("read saved blocks of {seq} from {shown}")))?;
                Ok((run.first, data.freeze()))
            })
            .collect()
    }

    fn identity(&self) -> MutexGuard<'_, Identity> {
        self.identity.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn spool_id(&self) -> u64 {
        self.identity().spool_id
    }

    /// The succession the collector has yet to accept, if any.
    pub fn succession(&self) -> Option<Succession> {
        self.identity().pending
    }

    /// Continues the journal as a successor of this spool, after `resume_after` (see
    /// [`Succession`]): records the succession, then takes a new id, each durably. The records
    /// after `resume_after` must be durable before this is called: the collector will wait
    /// for them.
    pub fn succeed(&self, resume_after: Seq) -> Result<Succession, SpoolError> {
        let dir = &self.config.dir;
        let mut identity = self.identity();
        let succession = Succession {
            predecessor: identity.spool_id,
            resume_after,
        };
        write_small_file(
            dir,
            SUCCESSION_FILE,
            &format!("{:016x} {}\n", succession.predecessor, resume_after.0),
        )?;
        *identity = Identity {
            spool_id: write_new_id(dir)?,
            pending: Some(succession),
        };
        Ok(succession)
    }

    /// The collector accepted this spool's id: no succession is pending any more.
    pub fn succession_accepted(&self) -> Result<(), SpoolError> {
        let mut identity = self.identity();
        if identity.pending.take().is_some() {
            let path = self.config.dir.join(SUCCESSION_FILE);
            fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
            fsync_dir(&self.config.dir)?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only fully written entries behind (the file is
        // append-only and the lengths are updated last), so the state is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Oldest seq still held (the shipper starts here after a restart), or `None` when empty.
    pub fn first_seq(&self) -> Option<Seq> {
        let inner = self.lock();
        inner
            .segments
            .iter()
            .find(|s| s.last_seq >= s.first_seq)
            .map(|s| s.first_seq)
    }

    /// Newest seq appended, `Seq(0)` when nothing ever was.
    pub fn last_seq(&self) -> Seq {
        Seq(self.lock().next_seq.0 - 1)
    }

    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.config.max_bytes
    }

    /// Newest seq and the time as of which it is the newest: what a heartbeat reports.
    pub fn heartbeat(&self) -> (Seq, TimeNs) {
        let mut inner = self.lock();
        // Later appends are stamped strictly after this time, so "as of this time the newest
        // record is this seq" stays true.
        inner.last_time = TimeNs::now().max(inner.last_time);
        (Seq(inner.next_seq.0 - 1), inner.last_time)
    }

    /// Appends one entry, stamping it with the next `seq` and a time that never goes backwards.
    /// The entry is in the page cache when this returns (safe against the process dying); call
    /// [`Spool::sync`] to make it durable against power loss.
    pub fn append(&self, op: SpoolOp) -> Result<(Seq, TimeNs), SpoolError> {
        let mut inner = self.lock();
        let lagging = self.rotate_if_needed(&mut inner)?;
        let appended = self.append_locked(&mut inner, op);
        self.after_append(inner, lagging);
        appended
    }

    /// Releases the lock, wakes the shipper if it waits, and starts the writeback a rotation
    /// asked for.
    fn after_append(&self, inner: MutexGuard<'_, Inner>, lagging: Vec<Arc<File>>) {
        let wake = inner.waiters > 0;
        drop(inner);
        if wake {
            self.appended.notify_all();
        }
        for file in lagging {
            start_writeback(&file);
        }
    }

    /// Appends a durability marker (a flush or a checkpoint) and makes it and every entry
    /// before it durable. Closed segments are synced *before* the marker is appended, so a
    /// marker found after a power loss proves every older segment whole: recovery tells
    /// corruption from an unflushed tail by it.
    pub fn append_durable(&self, op: SpoolOp) -> Result<(Seq, TimeNs), SpoolError> {
        let appended = loop {
            self.sync_closed()?;
            let mut inner = self.lock();
            // Rotate first, so the marker never lands in a segment created after this check.
            let lagging = self.rotate_if_needed(&mut inner)?;
            if inner.all_closed_synced() {
                let appended = self.append_locked(&mut inner, op)?;
                self.after_append(inner, lagging);
                break appended;
            }
            self.after_append(inner, lagging);
        };
        self.sync()?;
        Ok(appended)
    }

    /// Writes one entry to the active segment (which the caller has rotated if it was full).
    fn append_locked(&self, inner: &mut Inner, op: SpoolOp) -> Result<(Seq, TimeNs), SpoolError> {
        let seq = inner.next_seq;
        let time = TimeNs::now().max(TimeNs(inner.last_time.0 + 1));
        let entry = SpoolEntry { seq, time, op };
        let limit = match entry.op {
            SpoolOp::Write { .. } | SpoolOp::OnVolume(_) => self.config.max_bytes,
            SpoolOp::Other(_) => self.config.max_bytes + CONTROL_RESERVE_BYTES,
        };
        if inner.used_bytes + entry.encoded_len() > limit {
            return Err(SpoolError::Full {
                dir: self.config.dir.display().to_string(),
                used_bytes: inner.used_bytes,
                max_bytes: self.config.max_bytes,
            });
        }
        let mut head = std::mem::take(&mut inner.encode_buf);
        head.clear();
        let data = entry.block_data();
        let body_len = framed::encode_entry_head(&mut head, |out| entry.encode_head(out), data);
        if body_len > MAX_ENTRY_BODY_BYTES as usize {
            inner.encode_buf = head;
            return Err(SpoolError::Io {
                context: "append to spool".into(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "entry larger than the spool's limit",
                ),
            });
        }
        let slices = &mut [IoSlice::new(&head), IoSlice::new(data)];
        let result = write_all_vectored(&inner.active, slices);
        let written = (head.len() + data.len()) as u64;
        inner.encode_buf = head;
        if let Err(e) = result {
            // Cut off whatever part of the entry reached the file, so the next append starts
            // on an entry boundary.
            let keep = inner.segments.back().map(|s| s.len_bytes).unwrap_or(0);
            let _ = inner.active.set_len(keep);
            return Err(io_err("append to spool")(e));
        }
        inner.next_seq = seq.next();
        inner.last_time = time;
        inner.used_bytes += written;
        if let Some(active) = inner.segments.back_mut() {
            active.last_seq = seq;
            active.len_bytes += written;
        }
        Ok((seq, time))
    }

    /// Closes a full active segment and starts the next. Nothing is synced here: the closed
    /// segment keeps its handle until a flush syncs it, and the new name is made durable by
    /// the next directory fsync. Returns the closed segments the collector is far behind on
    /// (see [`WRITEBACK_LAG_BYTES`]), for the caller to start writing back with the lock
    /// released.
    fn rotate_if_needed(&self, inner: &mut Inner) -> Result<Vec<Arc<File>>, SpoolError> {
        let Some(active) = inner.segments.back() else {
            return Ok(Vec::new());
        };
        if active.len_bytes < self.config.segment_bytes {
            return Ok(Vec::new());
        }
        let path = segment_path(&self.config.dir, inner.next_seq);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(format!("create {}", path.display())))?;
        let closed = std::mem::replace(&mut inner.active, Arc::new(file));
        inner.segments_created += 1;
        if let Some(segment) = inner.segments.back_mut() {
            segment.unsynced = Some(closed);
        }
        let mut lagging = Vec::new();
        let mut appended_after = 0;
        for segment in inner.segments.iter_mut().rev() {
            if appended_after >= WRITEBACK_LAG_BYTES && !segment.writeback_started {
                if let Some(file) = &segment.unsynced {
                    lagging.push(Arc::clone(file));
                    segment.writeback_started = true;
                }
            }
            appended_after += segment.len_bytes;
        }
        inner.segments.push_back(Segment::new(inner.next_seq, path));
        Ok(lagging)
    }

    /// Makes every entry appended before this call durable: closed segments not yet synced,
    /// oldest first, the directory if segments were created since its last fsync, then the
    /// segment that was active when this was called.
    pub fn sync(&self) -> Result<(), SpoolError> {
        let active = Arc::clone(&self.lock().active);
        self.sync_closed()?;
        // fsync outside the lock so appends continue meanwhile; whatever was appended before
        // this call is covered.
        active.sync_data().map_err(io_err("fsync spool segment"))
    }

    /// Syncs every closed segment not yet synced and, if segments were created since, the
    /// directory; appends go on meanwhile.
    fn sync_closed(&self) -> Result<(), SpoolError> {
        let (closed, created, dir_behind) = {
            let inner = self.lock();
            let closed: Vec<Arc<File>> = inner
                .segments
                .iter()
                .filter_map(|s| s.unsynced.clone())
                .collect();
            let created = inner.segments_created;
            (closed, created, created > inner.dir_synced_through)
        };
        for file in &closed {
            file.sync_data().map_err(io_err("fsync spool segment"))?;
        }
        if dir_behind {
            fsync_dir(&self.config.dir)?;
        }
        let mut inner = self.lock();
        for segment in inner.segments.iter_mut() {
            let synced = segment
                .unsynced
                .as_ref()
                .is_some_and(|file| closed.iter().any(|c| Arc::ptr_eq(c, file)));
            if synced {
                segment.unsynced = None;
            }
        }
        if dir_behind {
            inner.dir_synced_through = inner.dir_synced_through.max(created);
        }
        Ok(())
    }

    /// The collector holds everything up to `seq` durably: drop segments wholly at or below it.
    pub fn release_through(&self, seq: Seq) -> Result<(), SpoolError> {
        let mut released = Vec::new();
        {
            let mut inner = self.lock();
            inner.released_through = inner.released_through.max(seq);
            while inner.segments.len() > 1
                && inner.segments.front().is_some_and(|s| s.last_seq <= seq)
            {
                if let Some(oldest) = inner.segments.pop_front() {
                    inner.used_bytes -= oldest.len_bytes + oldest.saved_bytes;
                    if oldest.saved_bytes > 0 {
                        released.push(saved_path(&oldest.path));
                    }
                    released.push(oldest.path);
                }
            }
            let kept = inner.saved.split_off(&seq.next());
            inner.saved = kept;
        }
        // Unlinked with the lock released, so appends do not wait while a segment's blocks
        // are freed (4 KiB random writes through the tap, three alternating runs: 36.6-39.6k
        // IOPS with the unlink under the lock, 41.7-50.1k without). Oldest first, stopping at a
        // failure, so what is left on disk stays contiguous; the next open finds it again, its
        // records already held by the collector.
        for path in released {
            fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
        }
        Ok(())
    }

    /// Blocks until an entry newer than `seq` exists or `timeout` passes; returns the newest seq.
    pub fn wait_beyond(&self, seq: Seq, timeout: Duration) -> Seq {
        let mut inner = self.lock();
        inner.waiters += 1;
        let (mut inner, _) = self
            .appended
            .wait_timeout_while(inner, timeout, |inner| inner.next_seq.0 - 1 <= seq.0)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.waiters -= 1;
        Seq(inner.next_seq.0 - 1)
    }

    /// Where to find the entry with this seq: (segment path, byte offset to start scanning,
    /// readable length of that segment). `None` when it was released or not yet written.
    fn locate(&self, seq: Seq) -> Option<(PathBuf, Seq, u64)> {
        let inner = self.lock();
        inner
            .segments
            .iter()
            .find(|s| s.first_seq <= seq && seq <= s.last_seq)
            .map(|s| (s.path.clone(), s.first_seq, s.len_bytes))
    }

    /// A reader positioned at `from` (which must still be in the spool).
    pub fn reader(&self, from: Seq) -> SpoolReader {
        SpoolReader {
            next: from,
            current: None,
        }
    }
}

fn list_segments(dir: &Path) -> Result<Vec<Seq>, SpoolError> {
    let mut firsts = Vec::new();
    let entries = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("list {}", dir.display())))?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        if let Ok(first) = stem.parse::<u64>() {
            firsts.push(Seq(first));
        }
    }
    Ok(firsts)
}

/// What recovery found: the segments to keep and where appending resumes.
struct Recovered {
    segments: VecDeque<Segment>,
    next_seq: Seq,
    last_time: TimeNs,
    dropped_unflushed: bool,
    on_volume: Vec<(Seq, RecordKind)>,
}

/// Scans the segments (named by their first seqs, in order) as the module documentation
/// describes: cuts off an unflushed tail, refuses corruption, and syncs what it keeps (after a
/// process crash it may still be only in the page cache, and no later sync would cover a
/// segment that is already closed).
fn recover_segments(dir: &Path, firsts: &[Seq]) -> Result<Recovered, SpoolError> {
    let mut found = Recovered {
        segments: VecDeque::new(),
        next_seq: Seq(1),
        last_time: TimeNs(0),
        dropped_unflushed: false,
        on_volume: Vec::new(),
    };
    for (i, &first) in firsts.iter().enumerate() {
        let path = segment_path(dir, first);
        if i > 0 && first != found.next_seq {
            // The previous segment stops short of this one: a tail never flushed, unless a
            // durable marker follows (or the segments overlap, which no crash explains).
            if first < found.next_seq || durable_marker_in(dir, &firsts[i..])? {
                return Err(SpoolError::Gap {
                    dir: dir.display().to_string(),
                    segment: path.display().to_string(),
                    expected: found.next_seq,
                    found: first,
                });
            }
            drop_unflushed_tail(dir, &firsts[i..], "a spool segment stops short of the next")?;
            found.dropped_unflushed = true;
            break;
        }
        let scanned = scan_segment(&path, first, &mut found.on_volume)?;
        if let Some(time) = scanned.newest_time {
            found.last_time = found.last_time.max(time);
        }
        found.next_seq = scanned.last_seq.next();
        let mut segment = Segment::new(first, path.clone());
        segment.last_seq = scanned.last_seq;
        segment.len_bytes = scanned.valid_len_bytes;
        found.segments.push_back(segment);
        if scanned.torn_bytes > 0 {
            let later = &firsts[i + 1..];
            if durable_marker_in(dir, later)? {
                return Err(SpoolError::Scan(framed::ScanError::Corrupt {
                    path: path.display().to_string(),
                    offset: scanned.valid_len_bytes,
                    reason:
                        "a damaged entry before a flush that a later segment records as durable",
                }));
            }
            let why = "truncating the torn tail of a spool segment (entries never flushed)";
            truncate_torn(&path, scanned.valid_len_bytes, scanned.torn_bytes, why)?;
            drop_unflushed_tail(dir, later, "a spool segment ends in a torn entry")?;
            found.dropped_unflushed = true;
            break;
        }
    }
    for segment in &found.segments {
        File::open(&segment.path)
            .and_then(|f| f.sync_data())
            .map_err(io_err(format!("fsync {}", segment.path.display())))?;
    }
    Ok(found)
}

/// One segment's valid entries: its last seq, their length, the newest time, and the length of
/// whatever follows them (a torn entry, or zeros a power loss left).
struct ScannedSegment {
    last_seq: Seq,
    valid_len_bytes: u64,
    torn_bytes: u64,
    newest_time: Option<TimeNs>,
}

/// Scans one segment; its [`SpoolOp::OnVolume`] records join `on_volume`.
fn scan_segment(
    path: &Path,
    first: Seq,
    on_volume: &mut Vec<(Seq, RecordKind)>,
) -> Result<ScannedSegment, SpoolError> {
    let mut expected = first;
    let mut newest_time = None;
    let end = framed::scan_file(path, |_, body| {
        let entry = SpoolEntry::decode(Bytes::copy_from_slice(body)).map_err(|e| e.to_string())?;
        if entry.seq != expected {
            return Err(format!(
                "holds {} where {} was expected",
                entry.seq, expected
            ));
        }
        expected = expected.next();
        newest_time = Some(entry.time);
        if let SpoolOp::OnVolume(kind) = entry.op {
            on_volume.push((entry.seq, kind));
        }
        Ok(())
    })?;
    Ok(ScannedSegment {
        last_seq: Seq(expected.0 - 1),
        valid_len_bytes: end.valid_len_bytes,
        torn_bytes: end.torn_bytes,
        newest_time,
    })
}

/// Whether any of these segments holds a valid flush or checkpoint record (entries after
/// damage are not looked at).
fn durable_marker_in(dir: &Path, firsts: &[Seq]) -> Result<bool, SpoolError> {
    for &first in firsts {
        let mut found = false;
        let scanned = framed::scan_file(&segment_path(dir, first), |_, body| {
            let op = SpoolEntry::decode(Bytes::copy_from_slice(body)).map(|e| e.op);
            found = matches!(
                op,
                Ok(SpoolOp::Other(
                    RecordKind::Flush | RecordKind::Checkpoint { .. }
                ))
            );
            // Stops the scan at the first marker.
            if found {
                Err(String::new())
            } else {
                Ok(())
            }
        });
        if found {
            return Ok(true);
        }
        if let Err(framed::ScanError::Io { path, source }) = scanned {
            return Err(io_err(format!("read {path}"))(source));
        }
    }
    Ok(false)
}

/// Appends `slices` to the file at `path` (created if missing) and fdatasyncs it; returns the
/// offset they start at. A failed append is cut off again.
fn append_unsynced(path: &Path, slices: &[IoSlice<'_>]) -> Result<(File, u64), SpoolError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(format!("open {shown}")))?;
    let at = file
        .metadata()
        .map_err(io_err(format!("stat {shown}")))?
        .len();
    let mut slices = slices.to_vec();
    if let Err(e) = write_all_vectored(&file, &mut slices) {
        let _ = file.set_len(at);
        return Err(io_err(format!("append to {shown}"))(e));
    }
    Ok((file, at))
}

/// The framing of a saved entry up to its blocks: the record's seq and the first block.
fn saved_entry_head(save: &BlockSave) -> Vec<u8> {
    let mut head = [0u8; SAVED_HEAD_BYTES];
    head[..8].copy_from_slice(&save.seq.0.to_le_bytes());
    head[8..].copy_from_slice(&save.first.0.to_le_bytes());
    let mut entry = Vec::with_capacity(64);
    framed::encode_entry_head(&mut entry, |out| out.extend_from_slice(&head), &save.data);
    entry
}

/// Finds the saved blocks of the kept segments (entries from the first torn one on are cut
/// off: their sync never returned, so the overwrites they were to precede never started) and
/// removes `.saved` files whose segment is gone.
fn recover_saved(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
) -> Result<BTreeMap<Seq, Vec<SavedRun>>, SpoolError> {
    let mut saved: BTreeMap<Seq, Vec<SavedRun>> = BTreeMap::new();
    for segment in segments.iter_mut() {
        let path = saved_path(&segment.path);
        if !path.exists() {
            continue;
        }
        let range = segment.first_seq..=segment.last_seq;
        // Saves are synced in groups, so the unsynced tail can hold several, any of them torn.
        let end = framed::scan_file_to_first_damage(&path, |offset, body| {
            let (seq, first, data_len) = parse_saved(body)?;
            if !range.contains(&seq) {
                return Err(format!(
                    "blocks saved for {seq}, which is not in its segment"
                ));
            }
            saved.entry(seq).or_default().push(SavedRun {
                first,
                count: (data_len / BLOCK_SIZE) as u64,
                path: path.clone(),
                data_offset: offset + ENTRY_HEADER_BYTES + SAVED_HEAD_BYTES as u64,
            });
            Ok(())
        })?;
        if end.torn_bytes > 0 {
            let why = "truncating saves of blocks from the first torn one on (their sync never \
                returned, so the changes they were to precede never started; were it damage to \
                a synced save, its records ship as gaps and are resynced)";
            truncate_torn(&path, end.valid_len_bytes, end.torn_bytes, why)?;
        }
        segment.saved_bytes = end.valid_len_bytes;
    }
    let entries = fs::read_dir(dir).map_err(io_err(format!("list {}", dir.display())))?;
    for entry in entries {
        let path = entry
            .map_err(io_err(format!("list {}", dir.display())))?
            .path();
        let orphan = path.extension().is_some_and(|e| e == "saved")
            && !segments.iter().any(|s| saved_path(&s.path) == path);
        if orphan {
            fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
        }
    }
    Ok(saved)
}

/// A saved entry's record seq, first block and length of its blocks.
fn parse_saved(body: &[u8]) -> Result<(Seq, BlockNo, usize), String> {
    let (head, data) = body
        .split_first_chunk::<SAVED_HEAD_BYTES>()
        .ok_or("saved entry shorter than its head")?;
    let word = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(raw)
    };
    if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) {
        return Err(format!(
            "saved blocks of {} bytes, not whole blocks",
            data.len()
        ));
    }
    Ok((Seq(word(0)), BlockNo(word(8)), data.len()))
}

/// Cuts the file at `path` back to its valid entries, saying `why` in the log.
fn truncate_torn(
    path: &Path,
    valid_len: u64,
    torn_bytes: u64,
    why: &str,
) -> Result<(), SpoolError> {
    let shown = path.display().to_string();
    tracing::warn!(file = %shown, torn_bytes, "{why}");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(format!("open {shown}")))?;
    file.set_len(valid_len)
        .and_then(|_| file.sync_all())
        .map_err(io_err(format!("truncate {shown}")))
}

/// Removes segments after the point where the spool stops short, newest first (a crash
/// midway leaves the same situation for the next open to finish).
fn drop_unflushed_tail(dir: &Path, firsts: &[Seq], why: &str) -> Result<(), SpoolError> {
    for &first in firsts.iter().rev() {
        let path = segment_path(dir, first);
        tracing::warn!(segment = %path.display(), reason = why,
            "removing a spool segment after the point where the spool stops short (entries never flushed)");
        fs::remove_file(&path).map_err(io_err(format!("remove {}", path.display())))?;
    }
    if !firsts.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Reads spool entries in `seq` order, for the shipper. Holds its own file handle, so segment
/// removal by [`Spool::release_through`] never disturbs an open read (Unix semantics).
pub struct SpoolReader {
    next: Seq,
    current: Option<ReaderSegment>,
}

struct ReaderSegment {
    file: File,
    path: PathBuf,
    offset: u64,
    ahead: ReadAhead,
}

/// Bytes read ahead per `pread` (an entry larger than this is read whole).
const READ_AHEAD_BYTES: u64 = 4 << 20;
/// Earlier windows kept for reuse while the reader works through a backlog. A batch being
/// hashed, queried and compressed holds parts of two or three windows, and the shipper has
/// several such batches at a time; with eight kept, new windows were still allocated often
/// enough to show in the agent's page faults.
const RETIRED_WINDOWS: usize = 16;

/// A window of a segment read in one `pread`: below the readable length a segment never
/// changes, so the window stays valid. Small entries (a 4 KiB write is one) took two `pread`s
/// each before. Entries are slices of the window, not copies, so a window lives on while any
/// entry read from it does; once none does, its memory is read into again.
#[derive(Default)]
struct ReadAhead {
    /// The segment's bytes from `start`.
    window: Bytes,
    start: u64,
    /// Windows read before, oldest first; taken back once no entry shares them.
    retired: VecDeque<Bytes>,
}

impl ReadAhead {
    /// `len` bytes of `file` at `at`; fails if they would reach past `readable_len`.
    fn bytes_at(&mut self, file: &File, at: u64, len: u64, readable_len: u64) -> io::Result<Bytes> {
        let end = self.start + self.window.len() as u64;
        if at < self.start || at + len > end {
            let want = len
                .max(READ_AHEAD_BYTES)
                .min(readable_len.saturating_sub(at)) as usize;
            if (want as u64) < len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut buffer = self.reusable_buffer(want);
            // Bytes of the window at and after `at` are kept, not read again.
            let kept = if (self.start..end).contains(&at) {
                let tail = &self.window[(at - self.start) as usize..];
                buffer[..tail.len()].copy_from_slice(tail);
                tail.len()
            } else {
                0
            };
            file.read_exact_at(&mut buffer[kept..], at + kept as u64)?;
            let old = std::mem::replace(&mut self.window, buffer.freeze());
            self.start = at;
            // A window grown for one large entry is let go, not kept at that size.
            if !old.is_empty() && old.len() <= READ_AHEAD_BYTES as usize {
                self.retired.push_back(old);
                if self.retired.len() > RETIRED_WINDOWS {
                    self.retired.pop_front();
                }
            }
        }
        let from = (at - self.start) as usize;
        Ok(self.window.slice(from..from + len as usize))
    }

    /// A buffer of exactly `len` bytes: a retired window no entry shares any more if one is
    /// large enough (its old bytes are overwritten, not cleared), else a new one.
    fn reusable_buffer(&mut self, len: usize) -> BytesMut {
        for _ in 0..self.retired.len() {
            let Some(old) = self.retired.pop_front() else {
                break;
            };
            match old.try_into_mut() {
                Ok(mut buffer) if buffer.capacity() >= len => {
                    buffer.resize(len, 0);
                    return buffer;
                }
                // Too small: let it go.
                Ok(_) => {}
                Err(shared) => self.retired.push_back(shared),
            }
        }
        BytesMut::zeroed(len)
    }
}

impl SpoolReader {
    pub fn next_seq(&self) -> Seq {
        self.next
    }

    /// The next entry, or `None` when the reader has caught up with the writer.
    pub fn next_entry(&mut self, spool: &Spool) -> Result<Option<SpoolEntry>, SpoolError> {
        let Some((path, _first, readable_len)) = spool.locate(self.next) else {
            return Ok(None);
        };
        let stale = self
            .current
            .as_ref()
            .map(|c| c.path != path)
            .unwrap_or(true);
        if stale {
            let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
            self.current = Some(ReaderSegment {
                file,
                path,
                offset: 0,
                ahead: ReadAhead::default(),
            });
        }
        let Some(current) = self.current.as_mut() else {
            return Ok(None);
        };
        loop {
            if current.offset >= readable_len {
                // Caught up: windows kept for a backlog are not kept while idle.
                current.ahead.retired.clear();
                return Ok(None);
            }
            let (entry, len) = read_entry_at(current, readable_len)?;
            current.offset += len;
            if entry.seq == self.next {
                self.next = entry.seq.next();
                return Ok(Some(entry));
            }
            // Skip entries before the requested seq (first read after a restart).
        }
    }
}

fn read_entry_at(
    current: &mut ReaderSegment,
    readable_len: u64,
) -> Result<(SpoolEntry, u64), SpoolError> {
    let ReaderSegment {
        file,
        path,
        offset,
        ahead,
    } = current;
    let (path, offset) = (&*path, *offset);
    let shown = || path.display().to_string();
    let damaged = || {
        SpoolError::Scan(framed::ScanError::Corrupt {
            path: shown(),
            offset,
            reason: "entry header damaged after it was written",
        })
    };
    let header = match ahead.bytes_at(file, offset, ENTRY_HEADER_BYTES, readable_len) {
        Ok(header) => header,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(damaged()),
        Err(e) => return Err(io_err(format!("read {}", shown()))(e)),
    };
    let word =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (magic, len, crc) = (word(0), word(4), word(8));
    let total = ENTRY_HEADER_BYTES + u64::from(len);
    if magic != ENTRY_MAGIC || len > MAX_ENTRY_BODY_BYTES || offset + total > readable_len {
        return Err(damaged());
    }
    let body = ahead
        .bytes_at(
            file,
            offset + ENTRY_HEADER_BYTES,
            u64::from(len),
            readable_len,
        )
        .map_err(io_err(format!("read {}", shown())))?;
    if crc32c::crc32c(&body) != crc {
        return Err(SpoolError::Scan(framed::ScanError::Corrupt {
            path: shown(),
            offset,
            reason: "entry checksum mismatch after it was written",
        }));
    }
    let entry = SpoolEntry::decode(body).map_err(|source| SpoolError::Decode {
        segment: shown(),
        offset,
        source,
    })?;
    Ok((entry, total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vol() -> VolumeName {
        VolumeName::new("v").unwrap()
    }

    fn write(n: u8) -> SpoolOp {
        SpoolOp::Write {
            volume: vol(),
            first: BlockNo(u64::from(n)),
            data: vec![n; BLOCK_SIZE].into(),
            origin: WriteOrigin::Client,
        }
    }

    fn small(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: 3 * (BLOCK_SIZE as u64 + 64),
        }
    }

    fn read_all(spool: &Spool, from: Seq) -> Vec<SpoolEntry> {
        let mut reader = spool.reader(from);
        let mut out = Vec::new();
        while let Some(e) = reader.next_entry(spool).unwrap() {
            out.push(e);
        }
        out
    }

    fn on_volume(first: u64, count: usize) -> RecordKind {
        RecordKind::Write {
            volume: vol(),
            first: BlockNo(first),
            blocks: vec![Some(crate::ChunkHash([first as u8; 32])); count],
            origin: WriteOrigin::Client,
        }
    }

    fn save(seq: Seq, first: u64, data: &Bytes) -> BlockSave {
        BlockSave {
            seq,
            first: BlockNo(first),
            data: data.clone(),
        }
    }

    #[test]
    fn writes_on_the_volume_and_their_saved_blocks_survive_a_reopen_and_go_with_their_segment() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let (kept, _) = spool.append(SpoolOp::OnVolume(on_volume(8, 4))).unwrap();
        let blocks = Bytes::from(vec![5u8; 2 * BLOCK_SIZE]);
        spool.save_blocks(&[save(kept, 9, &blocks)]).unwrap();
        let one_block = Bytes::from(vec![6u8; BLOCK_SIZE]);
        spool.save_blocks(&[save(kept, 8, &one_block)]).unwrap();
        let expected = vec![(BlockNo(9), blocks), (BlockNo(8), one_block)];
        assert_eq!(spool.saved_blocks(kept).unwrap(), expected);
        let used = spool.used_bytes();
        drop(spool);
        // A save cut short (the crash came before its fdatasync returned, so before the
        // overwrite it was for) is cut off on open.
        let saved_file = saved_path(&segment_path(dir.path(), kept));
        let whole_len = fs::metadata(&saved_file).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(&saved_file)
            .unwrap()
            .write_all(&ENTRY_MAGIC.to_le_bytes())
            .unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        assert_eq!(fs::metadata(&saved_file).unwrap().len(), whole_len);
        assert_eq!(spool.take_recovered_on_volume(), [(kept, on_volume(8, 4))]);
        assert!(spool.take_recovered_on_volume().is_empty(), "taken once");
        assert_eq!(spool.saved_blocks(kept).unwrap(), expected);
        assert_eq!(spool.saved_ranges(kept), [(BlockNo(9), 2), (BlockNo(8), 1)]);
        assert_eq!(spool.used_bytes(), used);
        // Released with the segment: the saved blocks go too, space and file.
        for n in 0..6 {
            spool.append(write(n)).unwrap();
        }
        spool.release_through(spool.last_seq()).unwrap();
        assert!(!saved_file.exists());
        assert!(spool.saved_blocks(kept).unwrap().is_empty());
        let files: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let id_file = fs::metadata(dir.path().join(ID_FILE)).unwrap().len();
        assert_eq!(spool.used_bytes(), files - id_file);
        // Nothing to save for a record that is gone.
        let gone = save(kept, 8, &Bytes::from(vec![1u8; BLOCK_SIZE]));
        spool.save_blocks(&[gone]).unwrap();
        assert!(spool.saved_ranges(kept).is_empty());
    }

    #[test]
    fn saved_blocks_whose_segment_is_gone_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Spool::open(small(dir.path())).unwrap());
        let orphan = saved_path(&segment_path(dir.path(), Seq(999)));
        fs::write(&orphan, b"left by a crash between two unlinks").unwrap();
        drop(Spool::open(small(dir.path())).unwrap());
        assert!(!orphan.exists());
    }

    #[test]
    fn saves_count_against_the_spools_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let (seq, _) = spool.append(SpoolOp::OnVolume(on_volume(0, 512))).unwrap();
        let too_much = Bytes::from(vec![1u8; 1 << 20]);
        assert!(matches!(
            spool.save_blocks(&[save(seq, 0, &too_much)]),
            Err(SpoolError::Full { .. })
        ));
        assert!(spool.saved_ranges(seq).is_empty());
    }

    #[test]
    fn saves_from_the_first_torn_one_on_are_cut_off_even_with_whole_ones_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let (seq, _) = spool.append(SpoolOp::OnVolume(on_volume(0, 3))).unwrap();
        let block = |n: u8| Bytes::from(vec![n; BLOCK_SIZE]);
        spool.save_blocks(&[save(seq, 0, &block(1))]).unwrap();
        let saved_file = saved_path(&segment_path(dir.path(), seq));
        let synced_len = fs::metadata(&saved_file).unwrap().len();
        // Two saves written for one sync; the power went before it returned, and only the
        // second one's pages had reached the disk whole.
        let pair = [save(seq, 1, &block(2)), save(seq, 2, &block(3))];
        spool.save_blocks(&pair).unwrap();
        drop(spool);
        let file = OpenOptions::new().write(true).open(&saved_file).unwrap();
        file.write_all_at(&[0xff; 64], synced_len + 100).unwrap();
        drop(file);
        let spool = Spool::open(small(dir.path())).unwrap();
        assert_eq!(spool.saved_blocks(seq).unwrap(), [(BlockNo(0), block(1))]);
        assert_eq!(fs::metadata(&saved_file).unwrap().len(), synced_len);
    }

    #[test]
    fn a_batch_of_saves_that_does_not_fit_saves_none_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let (a, _) = spool.append(SpoolOp::OnVolume(on_volume(0, 1))).unwrap();
        let (b, _) = spool.append(SpoolOp::OnVolume(on_volume(1, 512))).unwrap();
        let used = spool.used_bytes();
        let batch = [
            save(a, 0, &Bytes::from(vec![1u8; BLOCK_SIZE])),
            save(b, 1, &Bytes::from(vec![2u8; 1 << 20])),
        ];
        let err = spool.save_blocks(&batch).unwrap_err();
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        assert!(spool.saved_ranges(a).is_empty());
        assert!(spool.saved_ranges(b).is_empty());
        assert_eq!(spool.used_bytes(), used);
    }

    #[test]
    fn saves_made_at_once_from_many_threads_all_land_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = small(dir.path());
        config.max_bytes = 64 << 20;
        let spool = Spool::open(config.clone()).unwrap();
        let seqs: Vec<Seq> = (0..64)
            .map(|n| {
                spool
                    .append(SpoolOp::OnVolume(on_volume(n * 4, 4)))
                    .unwrap()
                    .0
            })
            .collect();
        let data = |n: usize| Bytes::from(vec![n as u8 + 1; 2 * BLOCK_SIZE]);
        std::thread::scope(|scope| {
            for chunk in seqs.chunks(8).enumerate() {
                let spool = &spool;
                scope.spawn(move || {
                    let (c, seqs) = chunk;
                    for (i, &seq) in seqs.iter().enumerate() {
                        let n = c * 8 + i;
                        spool
                            .save_blocks(&[save(seq, n as u64 * 4, &data(n))])
                            .unwrap();
                    }
                });
            }
        });
        drop(spool);
        let spool = Spool::open(config).unwrap();
        for (n, &seq) in seqs.iter().enumerate() {
            let expected = vec![(BlockNo(n as u64 * 4), data(n))];
            assert_eq!(spool.saved_blocks(seq).unwrap(), expected, "record {seq}");
        }
    }

    #[test]
    fn append_read_reopen_release() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let id = spool.spool_id();
        for n in 1..=10u8 {
            let (seq, _) = spool.append(write(n)).unwrap();
            assert_eq!(seq, Seq(u64::from(n)));
        }
        spool.append(SpoolOp::Other(RecordKind::Flush)).unwrap();
        assert_eq!(read_all(&spool, Seq(1)).len(), 11);
        drop(spool);

        let spool = Spool::open(small(dir.path())).unwrap();
        assert_eq!(spool.spool_id(), id);
        assert_eq!(spool.last_seq(), Seq(11));
        spool.append(write(12)).unwrap();
        let entries = read_all(&spool, Seq(4));
        assert_eq!(entries.first().unwrap().seq, Seq(4));
        assert_eq!(entries.first().unwrap().op, write(4));
        let before = spool.used_bytes();
        spool.release_through(Seq(7)).unwrap();
        assert!(spool.used_bytes() < before);
        assert!(spool.first_seq().unwrap() <= Seq(8));
        assert_eq!(read_all(&spool, Seq(8)).len(), 5);
        let times: Vec<_> = read_all(&spool, spool.first_seq().unwrap())
            .iter()
            .map(|e| e.time)
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_succession_is_offered_across_reopens_until_the_collector_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        let old = spool.spool_id();
        let succession = spool.succeed(Seq(4)).unwrap();
        assert_eq!(
            succession,
            Succession {
                predecessor: old,
                resume_after: Seq(4)
            }
        );
        let new = spool.spool_id();
        assert_ne!(new, old);
        drop(spool);

        let spool = Spool::open(small(dir.path())).unwrap();
        assert_eq!(
            (spool.spool_id(), spool.succession()),
            (new, Some(succession))
        );
        spool.succession_accepted().unwrap();
        drop(spool);
        let spool = Spool::open(small(dir.path())).unwrap();
        assert_eq!((spool.spool_id(), spool.succession()), (new, None));
        drop(spool);

        // A crash after the succession was written and before the new id was: one is taken.
        fs::write(dir.path().join(SUCCESSION_FILE), format!("{new:016x} 9\n")).unwrap();
        let spool = Spool::open(small(dir.path())).unwrap();
        assert_ne!(spool.spool_id(), new);
        assert_eq!(
            spool.succession(),
            Some(Succession {
                predecessor: new,
                resume_after: Seq(9)
            })
        );
        drop(spool);

        fs::write(dir.path().join(SUCCESSION_FILE), "not a succession").unwrap();
        let err = Spool::open(small(dir.path())).err().unwrap();
        assert!(err.to_string().contains("spool.succession"), "{err}");
    }

    fn big(n: u8) -> SpoolOp {
        SpoolOp::Write {
            volume: vol(),
            first: BlockNo(u64::from(n) * 256),
            data: vec![n; 256 * BLOCK_SIZE].into(),
            origin: WriteOrigin::Client,
        }
    }

    /// A spool of 1 MiB writes in 2 MiB segments: `count` writes, none synced.
    fn unsynced_segments(dir: &Path, count: u8) -> SpoolConfig {
        let config = SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 1 << 30,
            segment_bytes: 2 << 20,
        };
        let spool = Spool::open(config.clone()).unwrap();
        for n in 1..=count {
            spool.append(big(n)).unwrap();
        }
        config
    }

    fn ops(spool: &Spool) -> Vec<SpoolOp> {
        read_all(spool, spool.first_seq().unwrap())
            .into_iter()
            .map(|e| e.op)
            .collect()
    }

    #[test]
    fn segments_closed_without_a_sync_read_back_whole_and_a_durable_append_syncs_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = unsynced_segments(dir.path(), 12);
        let spool = Spool::open(config.clone()).unwrap();
        assert!(!spool.dropped_unflushed());
        for n in 13..=15 {
            spool.append(big(n)).unwrap();
        }
        assert!(!spool.lock().all_closed_synced(), "rotation syncs nothing");
        let (seq, _) = spool
            .append_durable(SpoolOp::Other(RecordKind::Flush))
            .unwrap();
        assert_eq!(seq, Seq(16));
        assert!(spool.lock().all_closed_synced());
        let mut expected: Vec<SpoolOp> = (1..=15).map(big).collect();
        expected.push(SpoolOp::Other(RecordKind::Flush));
        assert_eq!(ops(&spool), expected);
        assert!(list_segments(dir.path()).unwrap().len() >= 6, "rotated");
        drop(spool);
        let spool = Spool::open(config).unwrap();
        assert_eq!(ops(&spool), expected);
        assert!(!spool.dropped_unflushed());
    }

    #[test]
    fn only_closed_segments_far_behind_have_their_writeback_started() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(unsynced_segments(dir.path(), 0)).unwrap();
        for n in 1..=(WRITEBACK_LAG_BYTES >> 20) as u8 + 8 {
            spool.append(big(n)).unwrap();
        }
        let inner = spool.lock();
        let mut appended_after = 0;
        for segment in inner.segments.iter().rev().skip(1) {
            let far_behind = appended_after >= WRITEBACK_LAG_BYTES + (2 << 20);
            let near = appended_after < WRITEBACK_LAG_BYTES;
            if far_behind {
                assert!(segment.writeback_started, "{segment:?}");
            }
            if near {
                assert!(!segment.writeback_started, "{segment:?}");
            }
            appended_after += segment.len_bytes;
        }
        assert!(
            appended_after > WRITEBACK_LAG_BYTES + (4 << 20),
            "enough rotated"
        );
    }

    /// Cuts segment `index` (in seq order) to `len(its length)` bytes, as a power loss could.
    fn cut_segment(dir: &Path, index: usize, len: impl Fn(u64) -> u64) {
        let mut firsts = list_segments(dir).unwrap();
        firsts.sort();
        let path = segment_path(dir, firsts[index]);
        let now = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len(now))
            .unwrap();
    }

    #[test]
    fn an_older_segment_cut_short_with_no_flush_after_it_is_an_unflushed_tail() {
        // Segment 1 holds writes 3 and 4: cut inside write 4 (a torn entry) or before write 3
        // (a tail missing at an entry boundary).
        for (cut, kept) in [(1_500_000, 3), (0, 2)] {
            let dir = tempfile::tempdir().unwrap();
            let config = unsynced_segments(dir.path(), 8);
            cut_segment(dir.path(), 1, |_| cut);
            let spool = Spool::open(config).unwrap();
            assert!(spool.dropped_unflushed());
            assert_eq!(spool.last_seq(), Seq(kept));
            assert_eq!(spool.append(big(9)).unwrap().0, Seq(kept + 1));
            let mut expected: Vec<SpoolOp> = (1..=kept as u8).map(big).collect();
            expected.push(big(9));
            assert_eq!(ops(&spool), expected);
        }
    }

    #[test]
    fn damage_before_a_durable_flush_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = unsynced_segments(dir.path(), 6);
        let spool = Spool::open(config.clone()).unwrap();
        spool
            .append_durable(SpoolOp::Other(RecordKind::Flush))
            .unwrap();
        drop(spool);
        cut_segment(dir.path(), 1, |len| len - 100);
        let err = Spool::open(config.clone()).err().unwrap().to_string();
        assert!(err.contains("damaged entry before a flush"), "{err}");
        assert!(err.contains(".seg"), "names the file: {err}");
        cut_segment(dir.path(), 1, |_| 0);
        let err = Spool::open(config).err().unwrap().to_string();
        assert!(err.contains("records are missing"), "{err}");
    }

    #[test]
    fn torn_tail_is_truncated_and_seq_continues() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
        spool.append(write(1)).unwrap();
        spool.append(write(2)).unwrap();
        drop(spool);
        let seg = segment_path(dir.path(), Seq(1));
        let len = fs::metadata(&seg).unwrap().len();
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - 100).unwrap();
        let spool = Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap();
        assert!(spool.dropped_unflushed());
        assert_eq!(spool.last_seq(), Seq(1));
        assert_eq!(spool.append(write(9)).unwrap().0, Seq(2));
        assert_eq!(read_all(&spool, Seq(1)).len(), 2);
    }

    #[test]
    fn full_spool_refuses_writes_but_keeps_room_for_control_records() {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig {
            dir: dir.path().to_owned(),
            max_bytes: 3 * BLOCK_SIZE as u64,
            segment_bytes: 1 << 20,
        };
        let spool = Spool::open(config).unwrap();
        spool.append(write(1)).unwrap();
        spool.append(write(2)).unwrap();
        let err = spool.append(write(3)).unwrap_err();
        assert!(err.to_string().contains("is full"), "{err}");
        spool
            .append(SpoolOp::Other(RecordKind::Gap { volume: vol() }))
            .unwrap();
    }

    #[test]
    fn wait_beyond_wakes_on_append() {
        let dir = tempfile::tempdir().unwrap();
        let spool =
            std::sync::Arc::new(Spool::open(SpoolConfig::new(dir.path(), 1 << 30)).unwrap());
        let writer = {
            let spool = spool.clone();
            std::thread::spawn(move || spool.append(write(1)).unwrap())
        };
        let newest = spool.wait_beyond(Seq(0), Duration::from_secs(10));
        assert_eq!(newest, Seq(1));
        writer.join().unwrap();
    }

    #[test]
    fn read_ahead_returns_the_bytes_asked_for_and_never_reads_past_the_readable_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let content: Vec<u8> = (0..(9 << 20) as u32)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let readable = content.len() as u64 - 1000;
        let mut ahead = ReadAhead::default();
        // Small steps, a jump back, entries straddling the window, one larger than the window.
        let asks = [
            (0, 12),
            (12, 4096),
            (4108, 12),
            ((4 << 20) - 6, 12),
            ((4 << 20) + 6, (4 << 20) + 100),
            (100, 3),
            (readable - 12, 12),
        ];
        for (at, len) in asks {
            let got = ahead.bytes_at(&file, at, len, readable).unwrap();
            assert_eq!(
                got,
                &content[at as usize..(at + len) as usize],
                "at {at} len {len}"
            );
        }
        let past = ahead
            .bytes_at(&file, readable - 4, 12, readable)
            .unwrap_err();
        assert_eq!(past.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_window_is_read_into_again_only_once_no_entry_holds_a_part_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segment");
        let window = READ_AHEAD_BYTES as usize;
        let content: Vec<u8> = (0..(3 * window) as u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = File::open(&path).unwrap();
        let readable = content.len() as u64;
        let mut ahead = ReadAhead::default();
        let held = ahead.bytes_at(&file, 100, 4096, readable).unwrap();
        let held_window = ahead.window.as_ptr();
        let mut windows = vec![held_window];
        // Back and forth between the second and third windows, more often than windows are
        // kept: the held one must never be read into.
        for round in 0..3 * RETIRED_WINDOWS {
            let at = if round % 2 == 0 { window } else { 2 * window } as u64;
            let got = ahead.bytes_at(&file, at, 4096, readable).unwrap();
            assert_eq!(got, &content[at as usize..at as usize + 4096]);
            assert_ne!(ahead.window.as_ptr(), held_window, "round {round}");
            windows.push(ahead.window.as_ptr());
        }
        assert_eq!(held, &content[100..4196]);
        let distinct: std::collections::HashSet<_> = windows.iter().collect();
        assert!(
            distinct.len() <= 3,
            "windows are reused: {} allocations",
            distinct.len()
        );
        drop(held);
        let reused = (0..=RETIRED_WINDOWS).any(|round| {
            let at = if round % 2 == 0 { 0 } else { window } as u64;
            ahead.bytes_at(&file, at, 4096, readable).unwrap();
            ahead.window.as_ptr() == held_window
        });
        assert!(reused, "the window let go of is read into again");
    }
}
