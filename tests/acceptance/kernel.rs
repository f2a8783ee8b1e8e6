//! Real kernel parts for the acceptance tests: root, `/dev/fuse`, loop devices and mounts, each
//! released by a guard even when a test fails.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{self, run, run_ok, tool};

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
    harness::skip_or_fail(missing) && harness::require_tools(tools)
}

/// A loop device over a file, with direct I/O when the kernel grants it; `losetup -d` on drop.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let output = run_ok(
            Command::new(tool("losetup"))
                .args(["--find", "--show", "--direct-io=on"])
                .arg(file),
        );
        let device = output.trim().to_owned();
        assert!(
            device.starts_with("/dev/loop"),
            "losetup printed {device:?}"
        );
        LoopDevice {
            device: PathBuf::from(device),
        }
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

/// A mounted filesystem; `umount` (lazily if busy) on drop.
pub struct Mounted {
    pub dir: PathBuf,
    active: bool,
}

impl Mounted {
    pub fn mount(options: &[&str], source: &Path, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).expect("create mount directory");
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

    pub fn unmount(&mut self) {
        if std::mem::take(&mut self.active) {
            run_ok(Command::new(tool("umount")).arg(&self.dir));
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

/// True when `path` is a mount point now.
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    tideline_agent::fuse::is_mount_point(&path).expect("read /proc/self/mountinfo")
}
