//! Real kernel parts: root, `/dev/fuse`, loop devices and mounts, each released by a guard even
//! when a test fails.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{run, run_ok, try_run_within, COMMAND_TIMEOUT};
use crate::tools::{require_tools, skip_or_fail, tool};
use crate::wait::POLL;

/// True when root, `/dev/fuse`, loop devices and `tools` are all there. Otherwise fails under
/// `CI=true` (a skip in CI would hide a regression) and skips loudly elsewhere.
pub fn require_kernel_parts(tools: &[&str]) -> bool {
    let mut missing: Vec<String> = Vec::new();
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (run the tests as root)".into());
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        missing.push(format!("/dev/fuse ({e}; `modprobe fuse`)"));
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("loop devices (/dev/loop-control; `modprobe loop`)".into());
    }
    skip_or_fail(missing) && require_tools(tools)
}

/// A loop device over a file; `losetup -d` on drop.
pub struct LoopDevice {
    pub device: PathBuf,
    /// Whether the kernel kept direct I/O on (it may refuse it for some backing files).
    pub direct_io: bool,
}

impl LoopDevice {
    /// `losetup --find --show --direct-io=on FILE`, falling back to buffered loop I/O.
    pub fn attach(file: &Path) -> LoopDevice {
        let dio = run(Command::new(tool("losetup"))
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file));
        let (device, requested) = if dio.success() {
            (dio.stdout.trim().to_owned(), true)
        } else {
            eprintln!(
                "losetup --direct-io=on failed ({}); using buffered loop I/O",
                dio.stderr.trim()
            );
            let out = run_ok(
                Command::new(tool("losetup"))
                    .args(["--find", "--show"])
                    .arg(file),
            );
            (out.trim().to_owned(), false)
        };
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        let device = PathBuf::from(device);
        // losetup may accept the option and still fall back: ask the kernel.
        let dio = run_ok(
            Command::new(tool("losetup"))
                .args(["--list", "--noheadings", "--output", "DIO"])
                .arg(&device),
        );
        let direct_io = requested && dio.trim() == "1";
        LoopDevice { device, direct_io }
    }

    /// The barrier a filesystem's flush sends: fsync of the block device.
    pub fn flush(&self) {
        File::open(&self.device)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("fsync {}: {e}", self.device.display()));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let out = run(Command::new(tool("losetup")).arg("-d").arg(&self.device));
        if !out.success() {
            eprintln!("losetup -d {} failed: {out}", self.device.display());
        }
    }
}

/// How long [`Mounted::unmount`] tries a busy filesystem again.
pub const UNMOUNT_BUSY_FOR: Duration = Duration::from_secs(5);

/// A mounted filesystem; `umount` (lazily if busy) on drop.
pub struct Mounted {
    pub dir: PathBuf,
    active: bool,
}

impl Mounted {
    pub fn mount(options: &[&str], source: &Path, dir: &Path) -> Mounted {
        // The target may be a file (a bind mount over the FUSE export's file, say).
        if !dir.exists() {
            std::fs::create_dir_all(dir).expect("create mount directory");
        }
        run_ok(
            Command::new(tool("mount"))
                .args(options)
                .arg(source)
                .arg(dir),
        );
        Mounted {
            dir: dir.to_path_buf(),
            active: true,
        }
    }

    /// The test unmounts it itself (to exercise a documented recovery, say); drop leaves it.
    pub fn disown(&mut self) {
        self.active = false;
    }

    /// Unmounts now, failing the test if the filesystem stays busy for [`UNMOUNT_BUSY_FOR`]
    /// or the unmount fails otherwise. CI once saw "target is busy" right after a test's last
    /// reads of its files, every one of them closed (what held it was not found), so a busy
    /// filesystem is tried again until then; one that something keeps busy still fails the
    /// test, naming what holds it.
    pub fn unmount(&mut self) {
        if !std::mem::take(&mut self.active) {
            return;
        }
        let deadline = Instant::now() + UNMOUNT_BUSY_FOR;
        loop {
            let out = run(Command::new(tool("umount")).arg(&self.dir));
            if out.success() {
                return;
            }
            if !out.text().contains("busy") || Instant::now() >= deadline {
                // Dropped while unwinding: detached lazily then.
                self.active = true;
                let holders = try_run_within(
                    Command::new("fuser").arg("-vm").arg(&self.dir),
                    COMMAND_TIMEOUT,
                )
                .map_or_else(|e| e, |out| out.text());
                panic!(
                    "umount {} failed: {out}\nwhat holds it (fuser -vm): {holders}",
                    self.dir.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !std::mem::take(&mut self.active) {
            return;
        }
        if !run(Command::new(tool("umount")).arg(&self.dir)).success() {
            let out = run(Command::new(tool("umount")).arg("-l").arg(&self.dir));
            eprintln!("umount -l {}: {out}", self.dir.display());
        }
    }
}
