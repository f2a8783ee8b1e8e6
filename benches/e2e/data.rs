//! Test data: an ext4 image holding system files (realistic), random data, and the rewrites
//! that give a volume its history.
//!
//! Images are cached in `target/bench/cache` by size: they are deterministic (the same files,
//! in the same order), so every run and every tool sees the same bytes.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use rand::{Rng, RngCore, SeedableRng};

use crate::sys;

/// Directories whose files fill the realistic image: text, documentation, binaries, libraries.
const SYSTEM_DIRS: [&str; 3] = ["/usr/share", "/usr/lib", "/usr/bin"];

/// An ext4 image of `size_bytes` whose files (hard links to system files, in a fixed shuffled
/// order) add up to about `fill` of its size. Cached.
pub fn ext4_image(cache: &Path, size_bytes: u64, fill: f64) -> anyhow::Result<PathBuf> {
    let image = cache.join(format!("ext4-{}MiB.img", size_bytes >> 20));
    if image.exists() {
        return Ok(image);
    }
    std::fs::create_dir_all(cache)?;
    let staging = sys::fresh_dir(&cache.join("staging"))?;
    stage_system_files(&staging, (size_bytes as f64 * fill) as u64)?;
    let partial = image.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    sys::run(
        Command::new(sys::tool_path("mkfs.ext4").unwrap_or_else(|| "mkfs.ext4".into()))
            .args(["-q", "-F", "-b", "4096", "-E", "nodiscard", "-d"])
            .arg(&staging)
            .arg(&partial)
            .arg(format!("{}k", size_bytes >> 10)),
        Duration::from_secs(1800),
    )?;
    std::fs::rename(&partial, &image)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(image)
}

/// Hard-links (or copies) regular files from [`SYSTEM_DIRS`] into `dest` until `budget` bytes.
fn stage_system_files(dest: &Path, budget: u64) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for dir in SYSTEM_DIRS {
        walk(Path::new(dir), &mut files);
    }
    // A fixed shuffle mixes text, binaries and libraries the same way on every run.
    files.sort_by_key(|(path, _)| blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex());
    let mut used = 0u64;
    for (i, (path, len)) in files.iter().enumerate() {
        if used + len > budget {
            continue;
        }
        let target = dest.join(format!("{:03}", i % 512)).join(format!("{i}"));
        std::fs::create_dir_all(target.parent().context("staging path")?)?;
        if std::fs::hard_link(path, &target).is_err() && std::fs::copy(path, &target).is_err() {
            continue;
        }
        used += len;
    }
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            walk(&entry.path(), out);
        } else if meta.is_file() && meta.len() > 0 {
            out.push((entry.path(), meta.len()));
        }
    }
}

/// A file of `bytes` pseudo-random (incompressible, never repeating) bytes. Cached.
pub fn random_file(cache: &Path, bytes: u64) -> anyhow::Result<PathBuf> {
    let path = cache.join(format!("random-{}MiB.img", bytes >> 20));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache)?;
    let partial = path.with_extension("partial");
    let file = File::create(&partial)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7_1de);
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < bytes {
        let n = buf.len().min((bytes - offset) as usize);
        rng.fill_bytes(&mut buf[..n]);
        file.write_all_at(&buf[..n], offset)?;
        offset += n as u64;
    }
    file.sync_all()?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// The data extents of a sparse file: (offset, length) from SEEK_DATA / SEEK_HOLE.
pub fn data_extents(path: &Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let fd = file.as_raw_fd();
    // ext4 reports the cached pages of unwritten (preallocated) extents as data, so without
    // this the extents would follow the page cache: the ext4 image had 2621 MB of data with
    // none of it cached and 2688 MB with all of it. Dropping the file's clean pages first
    // leaves what is written on disk.
    // SAFETY: posix_fadvise on a descriptor that `file` keeps open; no memory is passed.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a descriptor that `file` keeps open; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only holes follow
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole as u64 };
        extents.push((data as u64, end - data as u64));
        at = end;
    }
    Ok(extents)
}

/// Bytes of `path` that are not holes.
pub fn data_bytes(path: &Path) -> anyhow::Result<u64> {
    Ok(data_extents(path)?.iter().map(|(_, len)| len).sum())
}

/// The writes of one round of rewrites: `total` bytes in runs of `run` bytes at random
/// block-aligned places inside the volume's data extents, each block slightly edited (32 bytes
/// at a random place), as files edited in place are. Reads the current bytes from `volume`.
pub fn rewrites(
    volume: &Path,
    total: u64,
    run: u64,
    seed: u64,
) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let extents = data_extents(volume)?;
    let data: u64 = extents.iter().map(|(_, len)| len).sum();
    anyhow::ensure!(
        data >= run,
        "volume {} holds too little data",
        volume.display()
    );
    let file = File::open(volume)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut writes = Vec::new();
    let mut written = 0;
    while written < total {
        let (offset, len) = pick(&extents, rng.gen_range(0..data), run);
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, offset)?;
        for block in bytes.chunks_mut(4096) {
            let at = rng.gen_range(0..block.len().saturating_sub(32).max(1));
            for b in block.iter_mut().skip(at).take(32) {
                *b = rng.gen_range(b' '..=b'~');
            }
        }
        written += len;
        writes.push((offset, bytes));
    }
    Ok(writes)
}

/// The block-aligned run of at most `run` bytes starting at the `nth` data byte.
fn pick(extents: &[(u64, u64)], mut nth: u64, run: u64) -> (u64, u64) {
    for &(offset, len) in extents {
        if nth < len {
            let start = (offset + nth) & !4095;
            let start = start.max(offset);
            let end = (start + run).min(offset + len) & !4095;
            return (start, (end.max(start + 4096)) - start);
        }
        nth -= len;
    }
    let (offset, _) = extents[0];
    (offset, 4096)
}
