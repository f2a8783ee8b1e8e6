//! Acceptance tests of the FUSE export against a recording export, with real kernel parts
//! (`/dev/fuse`, a loop device, bind mounts):
//!
//! - `fuse_export_semantics`: fsync and close barriers, fallocate mapping, SEEK_DATA/SEEK_HOLE,
//!   EOF clipping, fixed size, and the unmount rules (clean when idle, lazy detach while a loop
//!   device holds the file).
//! - `refuses_a_mount_point_and_a_directory`: the library and the real `tideline-agent` binary.
//!
//! They have a test binary of their own and take turns ([`SERIAL`]) because the first counts
//! barriers exactly: a child forked by another test of the same process holds copies of this
//! test's descriptors until it execs, and the close of such a copy is a FLUSH (and keeps the
//! mount busy for that moment).
//!
//! They need root, `/dev/fuse` and loop devices. Without them a test prints a loud `SKIPPED:`
//! line on stderr and passes, except under `CI=true`, where it fails.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tideline_agent::fuse::{self, FuseError, Unmounted};
use tideline_agent::nbd::BlockExport;
use tideline_testkit::kernel::{require_kernel_parts as kernel_parts, LoopDevice, Mounted};

mod common;
use common::{is_mounted, run_agent, volume_image, MIB};

/// Held by each test of this binary for its whole run: no test forks while another has
/// descriptors open on its export.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---- FUSE semantics against a recording export -------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Write {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        may_punch: bool,
    },
    Flush,
}

/// An in-memory volume that records every change and barrier.
struct Recording {
    data: Mutex<Vec<u8>>,
    calls: Mutex<Vec<Call>>,
}

impl Recording {
    fn new(size: u64) -> Arc<Recording> {
        Arc::new(Recording {
            data: Mutex::new(vec![0; size as usize]),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().expect("calls"))
    }

    fn record(&self, call: Call) {
        self.calls.lock().expect("calls").push(call);
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut data = self.data.lock().expect("data");
        data[offset as usize..(offset + len) as usize].fill(0);
    }
}

impl BlockExport for Recording {
    fn size_bytes(&self) -> u64 {
        self.data.lock().expect("data").len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock().expect("data");
        let start = offset as usize;
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, buf: bytes::Bytes, fua: bool) -> io::Result<()> {
        let mut data = self.data.lock().expect("data");
        let start = offset as usize;
        data[start..start + buf.len()].copy_from_slice(&buf);
        drop(data);
        self.record(Call::Write {
            offset,
            len: buf.len() as u64,
            fua,
        });
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.zero(offset, len);
        self.record(Call::Trim { offset, len });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, may_punch: bool) -> io::Result<()> {
        self.zero(offset, len);
        self.record(Call::Zero {
            offset,
            len,
            may_punch,
        });
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.record(Call::Flush);
        Ok(())
    }

    /// All-zero 4 KiB blocks are holes.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        let data = self.data.lock().expect("data");
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let end = ((pos / 4096 + 1) * 4096).min(offset + len);
            let hole = data[pos as usize..end as usize].iter().all(|&b| b == 0);
            match runs.last_mut() {
                Some((n, h)) if *h == hole => *n += end - pos,
                _ => runs.push((end - pos, hole)),
            }
            pos = end;
        }
        Ok(runs)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek only reads its integer arguments; the descriptor is owned by `file`.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if pos < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pos as u64)
    }
}

#[test]
fn fuse_export_semantics() {
    let _serial = one_at_a_time();
    if !kernel_parts(&["losetup"]) {
        return;
    }
    tideline_testkit::init_tracing("warn,fuser=error");
    const SIZE: u64 = 4 * MIB;
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("export");
    let export = Recording::new(SIZE);
    let mount = fuse::mount(export.clone(), &file).expect("mount FUSE export");
    assert!(is_mounted(&file));
    let meta = std::fs::metadata(&file).expect("stat");
    assert!(meta.is_file(), "the root of the export is a regular file");
    assert_eq!(meta.len(), SIZE);

    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .expect("open rw");
    // write, read back, fsync = one barrier.
    rw.write_all_at(b"hello", 8192).expect("write");
    let mut back = [0u8; 5];
    rw.read_exact_at(&mut back, 8192).expect("read");
    assert_eq!(&back, b"hello");
    rw.sync_all().expect("fsync");
    rw.sync_data().expect("fdatasync");
    assert_eq!(
        export.take_calls(),
        [
            Call::Write {
                offset: 8192,
                len: 5,
                fua: false
            },
            Call::Flush,
            Call::Flush
        ]
    );

    // EOF: reads and writes are clipped; a write starting at the end is ENOSPC.
    let mut tail = [0u8; 10];
    assert_eq!(rw.read_at(&mut tail, SIZE - 2).expect("read at end"), 2);
    assert_eq!(rw.read_at(&mut tail, SIZE).expect("read past end"), 0);
    assert_eq!(rw.write_at(b"abcd", SIZE - 2).expect("write across end"), 2);
    let past = rw.write_at(b"x", SIZE).expect_err("write at the end");
    assert_eq!(past.raw_os_error(), Some(libc::ENOSPC), "{past}");
    assert_eq!(
        export.take_calls(),
        [Call::Write {
            offset: SIZE - 2,
            len: 2,
            fua: false
        }]
    );

    // fallocate mapping.
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&rw, libc::FALLOC_FL_PUNCH_HOLE | keep, 4096, 8192).expect("punch hole");
    fallocate(&rw, libc::FALLOC_FL_ZERO_RANGE, 65536, 4096).expect("zero range");
    fallocate(&rw, libc::FALLOC_FL_ZERO_RANGE | keep, 65536, 4096).expect("zero range, keep size");
    fallocate(&rw, 0, 0, MIB).expect("preallocate inside the volume");
    fallocate(&rw, keep, SIZE - 4096, 2 * MIB).expect("preallocate past the end, keep size");
    let grow = fallocate(&rw, 0, SIZE - 4096, 8192).expect_err("preallocate past the end");
    assert_eq!(grow.raw_os_error(), Some(libc::ENOSPC), "{grow}");
    let collapse = fallocate(&rw, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096).expect_err("collapse");
    assert_eq!(
        collapse.raw_os_error(),
        Some(libc::EOPNOTSUPP),
        "{collapse}"
    );
    assert_eq!(
        export.take_calls(),
        [
            Call::Trim {
                offset: 4096,
                len: 8192
            },
            Call::Zero {
                offset: 65536,
                len: 4096,
                may_punch: false
            },
            Call::Zero {
                offset: 65536,
                len: 4096,
                may_punch: false
            },
        ]
    );

    // SEEK_DATA / SEEK_HOLE from block status. The punch zeroed "hello"; data is now only the
    // last block (the clipped write), so add a block at 1 MiB.
    rw.write_all_at(&[7u8; 4096], MIB)
        .expect("write a data block");
    export.take_calls();
    assert_eq!(seek(&rw, 0, libc::SEEK_DATA).expect("SEEK_DATA"), MIB);
    assert_eq!(
        seek(&rw, MIB, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        MIB + 4096
    );
    assert_eq!(
        seek(&rw, 2 * MIB, libc::SEEK_DATA).expect("SEEK_DATA"),
        SIZE - 4096
    );
    assert_eq!(
        seek(&rw, SIZE - 4096, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        SIZE
    );
    let enxio = seek(&rw, SIZE, libc::SEEK_DATA).expect_err("SEEK_DATA at the end");
    assert_eq!(enxio.raw_os_error(), Some(libc::ENXIO));

    // The size is fixed.
    let truncate = rw.set_len(MIB).expect_err("truncate");
    assert_eq!(truncate.raw_os_error(), Some(libc::EPERM), "{truncate}");

    // close: a barrier for a writable handle with changes since the last barrier, else nothing.
    rw.write_all_at(b"dirty", 0).expect("write");
    drop(rw);
    assert_eq!(
        export.take_calls(),
        [
            Call::Write {
                offset: 0,
                len: 5,
                fua: false
            },
            Call::Flush
        ]
    );
    let idle = OpenOptions::new().write(true).open(&file).expect("open");
    drop(idle);
    assert_eq!(export.take_calls(), []);
    let writer = OpenOptions::new().write(true).open(&file).expect("open");
    writer.write_all_at(b"x", 0).expect("write");
    let reader = File::open(&file).expect("open read-only");
    drop(reader);
    assert_eq!(
        export.take_calls(),
        [Call::Write {
            offset: 0,
            len: 1,
            fua: false
        }]
    );
    writer.sync_all().expect("fsync");
    drop(writer);
    assert_eq!(export.take_calls(), [Call::Flush]);

    // O_DSYNC writes carry FUA; O_DIRECT works (loop's direct I/O uses it).
    let dsync = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(&file)
        .expect("open O_DSYNC");
    dsync.write_all_at(b"sync", 0).expect("write O_DSYNC");
    drop(dsync);
    let calls = export.take_calls();
    assert!(
        calls.first()
            == Some(&Call::Write {
                offset: 0,
                len: 4,
                fua: true
            }),
        "O_DSYNC write: {calls:?}"
    );
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file)
        .expect("open O_DIRECT");
    let mut aligned = vec![0u8; 8192];
    let block = {
        let off = aligned.as_ptr().align_offset(4096);
        &mut aligned[off..off + 4096]
    };
    direct.read_exact_at(block, MIB).expect("O_DIRECT read");
    assert!(block.iter().all(|&b| b == 7));
    drop(direct);

    // Unmount while idle: clean, and FILE is a plain file again.
    assert_eq!(mount.unmount().expect("unmount"), Unmounted::Clean);
    assert!(!is_mounted(&file));

    // Unmount while a loop device holds FILE: detached lazily; gone once the loop device is.
    let mount = fuse::mount(export.clone(), &file).expect("mount again");
    let loop_dev = LoopDevice::attach(&file);
    let mut first = [0u8; 4096];
    File::open(&loop_dev.device)
        .and_then(|d| d.read_exact_at(&mut first, MIB))
        .expect("read through the loop device");
    assert!(first.iter().all(|&b| b == 7));
    assert_eq!(mount.unmount().expect("unmount busy"), Unmounted::Detached);
    assert!(
        !is_mounted(&file),
        "a detached mount leaves mountinfo at once"
    );
    drop(loop_dev);
}

#[test]
fn refuses_a_mount_point_and_a_directory() {
    let _serial = one_at_a_time();
    if !kernel_parts(&["mount", "umount"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = volume_image(dir.path());
    let file = dir.path().join("export");
    let other = dir.path().join("other");
    File::create(&file).expect("create FILE");
    File::create(&other).expect("create other");
    let mut bind = Mounted::mount(&["--bind"], &other, &file);
    assert!(is_mounted(&file));

    // The library says so...
    let err = fuse::mount(Recording::new(MIB), &file).expect_err("mount over a mount point");
    assert!(matches!(err, FuseError::AlreadyMounted { .. }), "{err}");
    // ...and so does the agent, naming the file and the way out.
    let spool = dir.path().join("spool");
    let out = run_agent("v", &image, &file, &spool, "http://127.0.0.1:1");
    assert!(
        !out.status.success(),
        "agent started over a mount point: {}",
        out.text()
    );
    assert!(
        out.text().contains("is already a mount point"),
        "{}",
        out.text()
    );
    assert!(
        out.text().contains(&format!("umount {}", file.display())),
        "{}",
        out.text()
    );
    bind.unmount();

    // A directory is not a regular file.
    let directory = dir.path().join("dir");
    std::fs::create_dir(&directory).expect("mkdir");
    let err = fuse::mount(Recording::new(MIB), &directory).expect_err("mount over a directory");
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
