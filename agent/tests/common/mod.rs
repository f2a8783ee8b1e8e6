//! Helpers shared by the FUSE acceptance tests (`fuse_loop_ext4.rs`, `fuse_semantics.rs`).

use std::fs::File;
use std::path::{Path, PathBuf};

use tideline_agent::fuse;

pub const MIB: u64 = 1 << 20;
/// Size of the volumes the FUSE tests export.
pub const VOLUME_BYTES: u64 = 64 * MIB;

/// True when `path` is a mount point (as the agent checks it).
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    fuse::is_mount_point(&path).expect("read /proc/self/mountinfo")
}

/// Creates `DIR/volume.img`, a sparse volume of [`VOLUME_BYTES`], and returns its path.
pub fn volume_image(dir: &Path) -> PathBuf {
    let image = dir.join("volume.img");
    File::create(&image)
        .and_then(|f| f.set_len(VOLUME_BYTES))
        .expect("create volume");
    image
}

/// Runs the real agent once, exporting `image` as volume `name` over FUSE at `file`, and
/// returns what it printed and how it exited (the tests expect it to refuse).
pub fn run_agent(
    name: &str,
    image: &Path,
    file: &Path,
    spool: &Path,
    collector: &str,
) -> tideline_testkit::Output {
    tideline_testkit::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_tideline-agent"))
            .arg(format!(
                "--volume={name}={},fuse={}",
                image.display(),
                file.display()
            ))
            .arg(format!("--spool-dir={}", spool.display()))
            .arg(format!("--collector={collector}"))
            .env("RUST_BACKTRACE", "0"),
    )
}
