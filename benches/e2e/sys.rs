//! Small system helpers: running commands under a time limit, file allocation, process CPU and
//! memory from /proc, the page cache.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Runs `command` to completion within `limit`, returning its stdout; fails on a non-zero exit.
pub fn run(command: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let description = format!("{command:?}");
    let output = tideline_testkit::try_run_within(command, limit).map_err(anyhow::Error::msg)?;
    if !output.success() {
        bail!(
            "{description} failed:\n{}\n{}",
            output.stderr,
            output.stdout
        );
    }
    Ok(output.stdout)
}

/// Bytes `path` takes on disk.
pub fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

/// Sum of the apparent sizes of every file under `dir`.
pub fn tree_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Bytes written so far by the block device holding `path` (its `/sys/dev/block` counters, which
/// count every writer on the machine); None where the filesystem has no block device (tmpfs,
/// overlay). What the disk wrote during a run shows whether the disk, rather than the CPU,
/// bounded it: a journal writes each byte more than once.
pub fn device_written_bytes(path: &Path) -> Option<u64> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    // The seventh field counts 512-byte sectors written.
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

/// Writes back dirty pages and empties the page cache, so that reads come from the disk.
pub fn drop_caches() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("warning: could not drop the page cache ({e}); restores may read cached data");
    }
}

/// fsyncs a file or every file under a directory.
pub fn sync_tree(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        File::open(path)?.sync_all()?;
    }
    Ok(())
}

/// Removes and recreates a directory, and waits until the filesystem has committed the
/// removal: on ext4 mounted with `discard`, the frees of a previous run's gigabytes are
/// discarded at the next journal commit, and fsyncs of the run that starts meanwhile wait for it.
pub fn fresh_dir(path: &Path) -> anyhow::Result<PathBuf> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))?;
    }
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    let dir = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs on a descriptor that stays open for the call; no memory is passed.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(error).with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(path.to_owned())
}

/// CPU time and peak resident memory of a running process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcUsage {
    pub cpu_seconds: f64,
    pub peak_rss_bytes: u64,
}

/// Reads `/proc/PID/stat` (utime + stime) and `/proc/PID/status` (VmHWM).
pub fn proc_usage(pid: u32) -> anyhow::Result<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `fields[0]` is field 3.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))
    };
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_seconds = (ticks(11)? + ticks(12)?) as f64 / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .with_context(|| format!("/proc/{pid}/status has no VmHWM line"))?;
    Ok(ProcUsage {
        cpu_seconds,
        peak_rss_bytes: peak_kib * 1024,
    })
}

pub use tideline_testkit::tool_path;

/// Polls `condition` every 10 ms until it returns Some, failing after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// True when two files hold the same bytes (holes read as zeroes).
pub fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
