//! Real kernel parts for the acceptance tests: the shared guards, and mount points as the
//! agent's FUSE export sees them.

use std::path::Path;

pub use tideline_testkit::kernel::{require_kernel_parts, LoopDevice, Mounted};

/// True when `path` is a mount point now.
pub fn is_mount_point(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    tideline_agent::fuse::is_mount_point(&path).expect("read /proc/self/mountinfo")
}
