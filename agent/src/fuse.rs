//! FUSE export: a protected volume as one regular file, so that `losetup` can turn it into a real
//! kernel block device for `mkfs` and `mount`.
//!
//! ```text
//!  ext4 / xfs / PostgreSQL ...           (page cache of the *upper* filesystem only)
//!    |
//!  /dev/loopN  (losetup [--direct-io=on] FILE)
//!    |  REQ_OP_READ/WRITE -> read/write     REQ_OP_FLUSH -> vfs_fsync -> FUSE_FSYNC
//!    |  REQ_OP_DISCARD / WRITE_ZEROES -> fallocate(PUNCH_HOLE | ZERO_RANGE, KEEP_SIZE)
//!  FILE  (a FUSE mount whose root inode *is* the file: S_IFREG, size = volume size)
//!    |  /dev/fuse, FUSE_THREADS worker threads (each with its own cloned fd)
//!  ExportFs ──> BlockExport (VolumeExport: every change journalled in the group's order)
//! ```
//!
//! [`mount`] mounts `FILE` and serves it until [`FuseMount::unmount`] (or drop). The agent mounts
//! one for every `--volume NAME=PATH,fuse=FILE`.
//!
//! # The operations
//!
//! | FUSE | what the export does |
//! |---|---|
//! | `open` | replies `FOPEN_DIRECT_IO \| FOPEN_PARALLEL_DIRECT_WRITES` (read-only handles add `FOPEN_NOFLUSH`); `EROFS` for a writable open of a read-only export |
//! | `read` | `BlockExport::read`, clipped at the end of the volume (a read at or past it returns 0 bytes) |
//! | `write` | `BlockExport::write`; a write crossing the end is clipped (short write), one starting at or past it fails with `ENOSPC`, as on a block device; `O_SYNC`/`O_DSYNC` handles write with FUA |
//! | `fsync` | `BlockExport::flush`: the durability barrier, journalled as a flush point |
//! | `flush` (every `close`) | `BlockExport::flush` if the handle was writable and anything was written since the last barrier; nothing otherwise (see below) |
//! | `fallocate` | `PUNCH_HOLE\|KEEP_SIZE` -> `trim`; `ZERO_RANGE[\|KEEP_SIZE]` (and `WRITE_ZEROES`) -> `write_zeroes(may_punch = false)`; mode 0 / `KEEP_SIZE` (preallocate) -> nothing to do inside the volume, `ENOSPC` past its end; anything else `EOPNOTSUPP` |
//! | `lseek` | `SEEK_DATA` / `SEEK_HOLE` answered from `BlockExport::block_status` |
//! | `getattr` / `setattr` | `S_IFREG`, size fixed: changing the size fails with `EPERM`; mode, owner and times are kept in memory |
//! | `statfs` | 4 KiB blocks (loop takes its discard granularity from `f_bsize`) |
//!
//! No request is ever answered `ENOSYS` by an implemented operation: for `fsync` the kernel would
//! set `no_fsync` and from then on report every fsync as successful without asking
//! (fs/fuse/file.c), silently dropping the only durability barrier loop has. An error that
//! carries `ENOSYS` (or no errno at all) is answered `EIO`.
//!
//! # Why direct I/O, and no writeback cache
//!
//! Loop on FUSE is the classic double-caching deadlock: the upper filesystem's dirty pages are
//! written back into the FUSE file's page cache, whose writeback needs this daemon, which may
//! itself be throttled in `balance_dirty_pages` waiting for that same writeback (Szeredi,
//! LKML 2007). With `FOPEN_DIRECT_IO` on every open and `FUSE_WRITEBACK_CACHE` never requested,
//! the FUSE file has no page cache at all: every loop request becomes exactly one FUSE request,
//! answered after the change is applied to the volume and appended to the spool. Only the upper
//! filesystem caches. `FOPEN_PARALLEL_DIRECT_WRITES` lets the kernel send concurrent writes
//! (otherwise it serialises them on the inode lock), `FUSE_ASYNC_DIO` lets it split a large
//! direct request into parallel ones, and several worker threads serve them: writes still meet
//! in the group lock, which orders the journal, but reads take no lock.
//!
//! `losetup --direct-io=on` additionally keeps loop itself from caching in the FUSE file's
//! mapping; whether loop accepts direct I/O on a FUSE file depends on the kernel (check with
//! `losetup -l -O NAME,DIO`). Either way the daemon sees no cached writes.
//!
//! # Why `PR_SET_IO_FLUSHER`
//!
//! The FUSE worker threads are part of the block I/O path of the loop device. The session thread
//! calls `prctl(PR_SET_IO_FLUSHER, 1)` before starting them (they inherit it): their memory
//! allocations then never recurse into I/O (`PF_MEMALLOC_NOIO`), and they are throttled only
//! on their own writeback, not on the global dirty limit that the loop filesystem's dirty pages
//! count towards (`PF_LOCAL_THROTTLE`). It needs `CAP_SYS_RESOURCE` (Linux 5.6+); without it the
//! export still works and a warning is logged. The agent's resync thread of a group with a FUSE
//! volume sets it too, because it holds the group lock that loop's writes wait for. Per-thread
//! buffers for reads are allocated on a thread's first read and then reused, so steady-state
//! reads allocate nothing.
//!
//! # fsync and FUSE flush semantics
//!
//! loop declares a volatile write cache without FUA when its backing file has `fsync`: every
//! `REQ_OP_FLUSH` (and every FUA, emulated with flushes) of the upper filesystem reaches this
//! daemon as `FUSE_FSYNC`. `fsync` (and `fdatasync`: there is no metadata to skip) calls
//! [`BlockExport::flush`]: the backing volume is fdatasynced, a Flush record is appended to the
//! group's journal and the spool is fdatasynced, all before the reply. Every write acknowledged
//! before the fsync started is then durable in the volume and the spool, and restorable from the
//! flush point on.
//!
//! FUSE `flush` is sent on every `close(2)` of a descriptor (and of each `dup`). The decision:
//! it is a barrier, like `fsync`, **only for a handle opened for writing and only when some
//! write, trim or zero reached the export since the last barrier**. So a tool that writes and
//! closes without fsync (`dd` without `conv=fsync`, `cp`) still leaves a durable flush point,
//! as with qemu-storage-daemon, and close errors are reported to the writer; but readers
//! (`blkid`, `file`, `cmp`, monitoring) get `FOPEN_NOFLUSH` and cost nothing, and closing an
//! idle writable handle does not append a Flush record to the journal each time. Loop holds
//! its descriptor open for its whole life, so this never runs on the loop I/O path.
//!
//! # Mount and unmount rules
//!
//! - FILE must be a regular file (created empty, mode 0600, if missing); its mode and owner
//!   become those of the export. Anything else is refused.
//! - FILE must not already be a mount point (looked up in `/proc/self/mountinfo`): a stale
//!   FUSE mount left by a killed agent is refused with the recovery steps below, never mounted
//!   over.
//! - Mounting uses `mount(2)` directly (fuser's pure-Rust path); run as root no `fusermount` is
//!   needed. `AutoUnmount` is not used (it always goes through fusermount). Options:
//!   `default_permissions,allow_other,nodev,nosuid,noexec,noatime`, `ro` for a read-only export;
//!   the kernel enforces FILE's mode bits.
//! - Unmount (agent shutdown, SIGTERM): `umount(2)`; the session threads see the connection
//!   end and are joined (bounded wait). If FILE is busy — a loop device or an open descriptor
//!   still uses it — the mount is detached lazily (`umount2(MNT_DETACH)`) and an error is
//!   logged: the export keeps serving until the agent exits, after which further I/O on the
//!   loop device fails. Detach loop devices (`umount` the filesystem, `losetup -d`) before
//!   stopping the agent.
//!
//! # Recovery after the agent was killed (SIGKILL) while loop-mounted
//!
//! Writes acknowledged before the last fsync are durable in the volume and in the spool; the
//! restarted agent ships them. The dead FUSE mount answers `ENOTCONN` ("Transport endpoint is
//! not connected") and the loop device and upper filesystem see I/O errors. Then:
//!
//! 1. `umount /mnt/upper` (or `umount -l /mnt/upper` if it hangs or is busy) — the filesystem
//!    on the loop device; it cannot write back anything more.
//! 2. `losetup -d /dev/loopN` — detach the loop device from FILE.
//! 3. `umount FILE` (or `umount -l FILE`) — remove the dead FUSE mount; the agent refuses to
//!    start while FILE is still a mount point.
//! 4. Restart the agent with the same configuration: it reopens the spool (truncating a torn
//!    tail that was never acknowledged), remounts FILE, and resumes shipping.
//! 5. `losetup [--direct-io=on] FILE`, `fsck` the filesystem (ext4 replays its journal on
//!    mount) and mount it again.

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow,
    WriteFlags,
};
use tideline_core::direct::direct_buffer;

use crate::nbd::BlockExport;

/// Worker threads serving one FUSE export (each reads its own cloned `/dev/fuse` descriptor).
/// Loop keeps several requests in flight; reads proceed in parallel, writes meet in the group
/// lock. Four keeps two cores busy while some threads wait in fsync.
pub const FUSE_THREADS: usize = 4;

/// How long the kernel may cache the attributes (the size never changes).
const ATTR_TTL: Duration = Duration::from_secs(1);

/// How long [`FuseMount::unmount`] waits for the worker threads after a successful `umount(2)`.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Window of one `block_status` call while answering `SEEK_DATA` / `SEEK_HOLE`.
const SEEK_WINDOW_BYTES: u64 = 1 << 30;

/// Block size reported by `stat` and `statfs`, and the journal's block size.
const BLOCK_BYTES: u32 = 4096;

/// `prctl(PR_SET_IO_FLUSHER, ...)`, Linux 5.6+ (not exported by the libc crate for Linux).
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// fallocate modes (linux/falloc.h). `WRITE_ZEROES` is Linux 6.17+.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const FALLOC_FL_WRITE_ZEROES: i32 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error(
        "{path} is already a mount point; refusing to mount the FUSE export over it. If an earlier \
         agent was killed, recover: unmount the filesystem on its loop device, `losetup -d` the \
         loop device, then `umount {path}` (or `umount -l {path}`), and start the agent again"
    )]
    AlreadyMounted { path: String },
    #[error(
        "{path} is not a regular file (it is {kind}); the FUSE export is mounted over a regular \
         file (created empty if missing)"
    )]
    NotRegularFile { path: String, kind: &'static str },
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "mount FUSE export at {path}: {source} (needs /dev/fuse and root, or CAP_SYS_ADMIN; \
         fuser falls back to fusermount3 only when mount(2) is not permitted)"
    )]
    Mount {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("unmount FUSE export at {path}: {source}")]
    Unmount {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FuseError + 'a {
    move |source| FuseError::Io {
        context,
        path: path.display().to_string(),
        source,
    }
}

/// How an unmount went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// `umount(2)` succeeded and the worker threads stopped.
    Clean,
    /// FILE was busy (a loop device or an open descriptor): it was detached lazily and the
    /// export keeps serving its remaining users until the agent exits.
    Detached,
}

/// A mounted FUSE export. Unmounts on [`FuseMount::unmount`] or, failing that, on drop.
pub struct FuseMount {
    /// Canonical path of FILE.
    file: PathBuf,
    unmounter: Option<fuser::SessionUnmounter>,
    session: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("file", &self.file)
            .field("mounted", &self.unmounter.is_some())
            .finish()
    }
}

impl FuseMount {
    /// The mount point: FILE, canonicalised.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Unmounts FILE: `umount(2)`, retried for up to 300 ms while it is busy, then a lazy
    /// detach (logged). Blocks briefly; call it from a thread that may block.
    pub fn unmount(mut self) -> Result<Unmounted, FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<Unmounted, FuseError> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(Unmounted::Clean);
        };
        let path = self.file.display().to_string();
        match unmounter.unmount() {
            Ok(()) => Ok(self.unmounted_cleanly()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let unmounted =
                    unmount_when_idle(&self.file).map_err(|source| FuseError::Unmount {
                        path: path.clone(),
                        source,
                    })?;
                if unmounted {
                    return Ok(self.unmounted_cleanly());
                }
                tracing::error!(
                    file = %path,
                    "FUSE export is busy (a loop device or an open file still uses it): detaching it \
                     lazily; I/O through it fails once the agent exits. Detach loop devices \
                     (`umount` their filesystem, `losetup -d`) before stopping the agent"
                );
                detach(&self.file).map_err(|source| FuseError::Unmount {
                    path: path.clone(),
                    source,
                })?;
                // The worker threads serve the remaining users until the last one lets go.
                drop(self.session.take());
                Ok(Unmounted::Detached)
            }
            Err(source) => Err(FuseError::Unmount { path, source }),
        }
    }

    /// FILE is unmounted: waits (bounded) for the session's threads to end.
    fn unmounted_cleanly(&mut self) -> Unmounted {
        if let Some(session) = self.session.take() {
            join_bounded(session, &self.file);
        }
        tracing::info!(file = %self.file.display(), "FUSE export unmounted");
        Unmounted::Clean
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::error!(error = %e, "FUSE export left mounted");
        }
    }
}

fn join_bounded(session: JoinHandle<io::Result<()>>, file: &Path) {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while !session.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(file = %file.display(),
                "FUSE worker threads still running after unmount; leaving them");
            return;
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
    match session.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(file = %file.display(), error = %e, "FUSE session ended with an error")
        }
        Err(_) => tracing::error!(file = %file.display(), "FUSE session thread panicked"),
    }
}

fn detach(file: &Path) -> io::Result<()> {
    umount2(file, libc::MNT_DETACH)
}

/// How long a busy export is retried before it is detached lazily: a descriptor can outlive
/// its user by a moment (a child another thread forked holds copies until it execs).
const BUSY_RETRY: Duration = Duration::from_millis(300);

/// `umount(2)` of FILE, retried while it is busy for at most [`BUSY_RETRY`]; true once it is
/// unmounted, false if it stayed busy.
fn unmount_when_idle(file: &Path) -> io::Result<bool> {
    let deadline = Instant::now() + BUSY_RETRY;
    let mut pause = Duration::from_millis(5);
    loop {
        match umount2(file, 0) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

fn umount2(file: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(file.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `prctl(PR_SET_IO_FLUSHER, 1)` for the calling thread (threads it starts later inherit it).
/// Returns false, after logging a warning, when the kernel or the capabilities refuse.
pub fn set_io_flusher() -> bool {
    // SAFETY: prctl with integer arguments only; it changes flags of the calling thread.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        return true;
    }
    tracing::warn!(
        error = %io::Error::last_os_error(),
        "prctl(PR_SET_IO_FLUSHER) failed (needs Linux 5.6+ and CAP_SYS_RESOURCE); a loop device \
         on the FUSE export may deadlock under memory pressure"
    );
    false
}

/// Mounts `export` as the regular file `file` and serves it on [`FUSE_THREADS`] threads until
/// the returned [`FuseMount`] is unmounted or dropped. Blocks for the mount and the FUSE
/// handshake; call it from a thread that may block.
pub fn mount(export: Arc<dyn BlockExport>, file: &Path) -> Result<FuseMount, FuseError> {
    let file = prepare_mount_point(file)?;
    let meta = std::fs::metadata(&file).map_err(io_err("stat", &file))?;
    let read_only = export.read_only();
    let fs = ExportFs::new(export, &meta);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("tideline".to_owned()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // The kernel enforces FILE's mode bits (default_permissions); allow_other only stops fuser
    // from refusing requests the kernel sends on behalf of other uids (loop's workers).
    config.acl = SessionACL::All;
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    let mut session =
        fuser::Session::new(fs, &file, &config).map_err(|source| FuseError::Mount {
            path: file.display().to_string(),
            source,
        })?;
    let unmounter = session.unmount_callable();
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(10).collect::<String>())
        .unwrap_or_default();
    let spawned = std::thread::Builder::new()
        .name(format!("fuse-{name}"))
        .spawn(move || {
            // Before the workers start: they inherit it.
            set_io_flusher();
            session.run()
        });
    let session = match spawned {
        Ok(handle) => handle,
        Err(source) => {
            // The session was dropped with the closure, which unmounted FILE.
            return Err(FuseError::Io {
                context: "start FUSE session thread for",
                path: file.display().to_string(),
                source,
            });
        }
    };
    tracing::info!(file = %file.display(), read_only, threads = FUSE_THREADS, "FUSE export mounted");
    Ok(FuseMount {
        file,
        unmounter: Some(unmounter),
        session: Some(session),
    })
}

/// Checks FILE (or creates it) and returns its canonical path.
fn prepare_mount_point(file: &Path) -> Result<PathBuf, FuseError> {
    let name = file.file_name().ok_or_else(|| FuseError::NotRegularFile {
        path: file.display().to_string(),
        kind: "not a file name",
    })?;
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Resolve the directory only: stat-ing FILE itself hangs or fails (ENOTCONN) when it is a
    // dead FUSE mount, which mountinfo recognises first.
    let dir = parent
        .canonicalize()
        .map_err(io_err("resolve directory of", file))?;
    let lexical = dir.join(name);
    if is_mount_point(&lexical).map_err(io_err("read /proc/self/mountinfo for", file))? {
        return Err(FuseError::AlreadyMounted {
            path: lexical.display().to_string(),
        });
    }
    match std::fs::symlink_metadata(&lexical) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lexical)
                .map_err(io_err("create mount point", &lexical))?;
            return Ok(lexical);
        }
        Err(e) => return Err(io_err("stat", &lexical)(e)),
        Ok(meta) if meta.file_type().is_symlink() => {}
        Ok(meta) => {
            check_regular(&lexical, &meta)?;
            return Ok(lexical);
        }
    }
    // A symlink: check where it leads the same way.
    let target = lexical
        .canonicalize()
        .map_err(io_err("resolve symlink", &lexical))?;
    if is_mount_point(&target).map_err(io_err("read /proc/self/mountinfo for", file))? {
        return Err(FuseError::AlreadyMounted {
            path: target.display().to_string(),
        });
    }
    let meta = std::fs::metadata(&target).map_err(io_err("stat", &target))?;
    check_regular(&target, &meta)?;
    Ok(target)
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), FuseError> {
    let t = meta.file_type();
    if t.is_file() {
        return Ok(());
    }
    use std::os::unix::fs::FileTypeExt;
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(FuseError::NotRegularFile {
        path: path.display().to_string(),
        kind,
    })
}

/// True if `path` (absolute, as the kernel spells it) is a mount point in this mount namespace.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let table = std::fs::read("/proc/self/mountinfo")?;
    let want = path.as_os_str().as_bytes();
    Ok(table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .any(|field| unescape_mountinfo(field) == want))
}

/// `data` in a buffer of its own, aligned for direct I/O when it is large enough to go that way.
fn copy_for_direct_io(data: &[u8]) -> Bytes {
    let mut buf = direct_buffer(data.len());
    buf.put_slice(data);
    buf.freeze()
}

/// Undoes the octal escapes (`\040` for a space, `\011`, `\012`, `\134`) of mountinfo fields.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let digits = &field[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(byte) = u8::try_from(value) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

// ---- the filesystem ---------------------------------------------------------------------------

thread_local! {
    /// Read buffer of one worker thread, grown to the largest request once and then reused.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One regular file, the root inode, backed by a [`BlockExport`].
struct ExportFs {
    export: Arc<dyn BlockExport>,
    size_bytes: u64,
    read_only: bool,
    attr: Mutex<FileAttr>,
    next_fh: AtomicU64,
    /// Changes (write, trim, zero) that reached the export.
    changes: AtomicU64,
    /// Value of `changes` when the last successful barrier started: every change counted up to
    /// it is durable.
    barrier: AtomicU64,
}

impl ExportFs {
    fn new(export: Arc<dyn BlockExport>, mount_point: &std::fs::Metadata) -> ExportFs {
        let size_bytes = export.size_bytes();
        let now = SystemTime::now();
        let attr = FileAttr {
            ino: INodeNo::ROOT,
            size: size_bytes,
            blocks: size_bytes.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: (mount_point.mode() & 0o7777) as u16,
            nlink: 1,
            uid: mount_point.uid(),
            gid: mount_point.gid(),
            rdev: 0,
            blksize: BLOCK_BYTES,
            flags: 0,
        };
        ExportFs {
            read_only: export.read_only(),
            export,
            size_bytes,
            attr: Mutex::new(attr),
            next_fh: AtomicU64::new(1),
            changes: AtomicU64::new(0),
            barrier: AtomicU64::new(0),
        }
    }

    fn attr(&self) -> FileAttr {
        *self.attr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The durability barrier: [`BlockExport::flush`].
    fn barrier(&self) -> io::Result<()> {
        let covered = self.changes.load(Ordering::Acquire);
        self.export.flush()?;
        self.barrier.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Runs the barrier and answers the kernel: ok, or the errno of what failed (logged).
    fn barrier_then_reply(&self, operation: &str, reply: ReplyEmpty) {
        match self.barrier() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "FUSE export: {operation} failed");
                reply.error(errno(&e))
            }
        }
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// `[offset, offset + len)` clipped to the volume; `None` if it starts at or past the end.
    fn clip(&self, offset: u64, len: u64) -> Option<u64> {
        (offset < self.size_bytes).then(|| len.min(self.size_bytes - offset))
    }

    fn fallocate_inner(&self, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        // Without KEEP_SIZE a range past the end would grow the file: a volume cannot grow.
        if !keep_size && end > self.size_bytes {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let len = match self.clip(offset, len) {
            Some(len) if len > 0 => len,
            _ => return Ok(()),
        };
        match mode & !FALLOC_FL_KEEP_SIZE {
            // Preallocation: every block of the volume already exists.
            0 => Ok(()),
            FALLOC_FL_PUNCH_HOLE if keep_size => {
                self.export.trim(offset, len, false)?;
                self.changed();
                Ok(())
            }
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_WRITE_ZEROES => {
                self.export.write_zeroes(offset, len, false, false)?;
                self.changed();
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    fn seek(&self, offset: i64, whence: i32) -> io::Result<i64> {
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let start = u64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::ENXIO))?;
        if start >= self.size_bytes {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        let mut pos = start;
        while pos < self.size_bytes {
            let window = SEEK_WINDOW_BYTES.min(self.size_bytes - pos);
            for (len, is_hole) in self.export.block_status(pos, window)? {
                if is_hole != want_data {
                    return to_off(pos);
                }
                pos += len;
            }
        }
        if want_data {
            Err(io::Error::from_raw_os_error(libc::ENXIO))
        } else {
            // The end of the file is a hole.
            to_off(self.size_bytes)
        }
    }
}

fn to_off(value: u64) -> io::Result<i64> {
    i64::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// The errno to answer with. Never `ENOSYS`: for fsync (and fallocate, flush) the kernel would
/// stop asking for good.
fn errno(e: &io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) if code > 0 && code != libc::ENOSYS => Errno::from_i32(code),
        _ => Errno::EIO,
    }
}

fn writable(fh: FileHandle) -> bool {
    fh.0 & 1 == 1
}

impl Filesystem for ExportFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Large direct requests may be split into parallel FUSE requests.
        if config
            .capabilities()
            .contains(fuser::InitFlags::FUSE_ASYNC_DIO)
        {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The root is a regular file: nothing to look up.
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&ATTR_TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        if size.is_some_and(|s| s != self.size_bytes) {
            // A protected volume has a fixed size (this also refuses O_TRUNC).
            return reply.error(Errno::EPERM);
        }
        let now = SystemTime::now();
        let time = |t: TimeOrNow| match t {
            TimeOrNow::SpecificTime(t) => t,
            TimeOrNow::Now => now,
        };
        let mut attr = self.attr.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mode) = mode {
            attr.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            attr.uid = uid;
        }
        if let Some(gid) = gid {
            attr.gid = gid;
        }
        if let Some(t) = atime {
            attr.atime = time(t);
        }
        if let Some(t) = mtime {
            attr.mtime = time(t);
        }
        attr.ctime = now;
        let attr = *attr;
        reply.attr(&ATTR_TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let wants_write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if wants_write && self.read_only {
            return reply.error(Errno::EROFS);
        }
        let id = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let fh = FileHandle((id << 1) | u64::from(wants_write));
        let mut open_flags = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        if !wants_write {
            open_flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        reply.opened(fh, open_flags);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOTDIR);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(len) = self.clip(offset, u64::from(size)) else {
            return reply.data(&[]);
        };
        // `len` <= `size`, a u32.
        let len = len as usize;
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len, 0);
            }
            match self.export.read(offset, &mut buf[..len]) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => {
                    tracing::warn!(offset, len, error = %e, "FUSE export: read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only || !writable(fh) {
            return reply.error(Errno::EBADF);
        }
        let Some(len) = self.clip(offset, data.len() as u64) else {
            return reply.error(Errno::ENOSPC);
        };
        // `len` <= `data.len()`.
        let data = &data[..len as usize];
        // O_SYNC includes the O_DSYNC bit.
        let fua = flags.0 & libc::O_DSYNC != 0;
        match self.export.write(offset, copy_for_direct_io(data), fua) {
            Ok(()) => {
                self.changed();
                reply.written(len as u32)
            }
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "FUSE export: write failed");
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let dirty = self.changes.load(Ordering::Acquire) > self.barrier.load(Ordering::Acquire);
        if !writable(fh) || !dirty {
            return reply.ok();
        }
        self.barrier_then_reply("flush on close", reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.barrier_then_reply("fsync", reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTDIR);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size_bytes / u64::from(BLOCK_BYTES);
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK_BYTES, 255, BLOCK_BYTES);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // No extended attributes (the kernel asks for security.* on every write).
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.read_only || !writable(fh) {
            return reply.error(Errno::EBADF);
        }
        match self.fallocate_inner(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => {
                // Refusals of the request itself are the caller's business, not ours.
                if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSPC)) {
                    tracing::warn!(offset, length, mode, error = %e, "FUSE export: fallocate failed");
                }
                reply.error(errno(&e))
            }
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.seek(offset, whence) {
            Ok(pos) => reply.offset(pos),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(br"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(br"/a\134b\011"), b"/a\\b\t");
        assert_eq!(unescape_mountinfo(br"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(br"/trail\04"), br"/trail\04");
        assert_eq!(unescape_mountinfo(br"/x\999"), br"/x\999");
    }

    #[test]
    fn root_is_a_mount_point_and_a_temp_file_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().canonicalize().unwrap().join("f");
        assert!(!is_mount_point(&file).unwrap());
    }

    #[test]
    fn mount_point_checks() {
        let dir = tempfile::tempdir().unwrap();
        // Missing: created empty.
        let created = prepare_mount_point(&dir.path().join("vol")).unwrap();
        assert!(created.is_file());
        assert_eq!(std::fs::metadata(&created).unwrap().len(), 0);
        // A regular file is accepted again, a directory is not.
        prepare_mount_point(&created).unwrap();
        let err = prepare_mount_point(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // A symlink to a regular file resolves to its target.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&created, &link).unwrap();
        assert_eq!(prepare_mount_point(&link).unwrap(), created);
    }

    #[test]
    fn errno_never_enosys() {
        let e = io::Error::from_raw_os_error(libc::ENOSYS);
        assert_eq!(errno(&e), Errno::EIO);
        assert_eq!(errno(&io::Error::other("x")), Errno::EIO);
        assert_eq!(
            errno(&io::Error::from_raw_os_error(libc::ENOSPC)),
            Errno::ENOSPC
        );
    }
}
