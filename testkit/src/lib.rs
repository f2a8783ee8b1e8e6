//! Test support shared by Tideline's test suites (the acceptance tests, the agent's NBD
//! conformance and FUSE tests): finding external tools and skipping loudly without them,
//! running commands under a time limit, waiting for conditions with a bound, and guards for
//! loop devices and mounts that release them even when a test fails.
//!
//! Every wait polls a condition against a deadline; nothing here sleeps for a fixed time to
//! let something happen.

#![allow(clippy::unwrap_used)]

pub mod cmd;
pub mod kernel;
pub mod tools;
pub mod wait;

pub use cmd::{run, run_ok, run_within, spawn, try_run_within, Output, Spawned, COMMAND_TIMEOUT};
pub use tools::{require_tools, skip_or_fail, tool, tool_path};
pub use wait::{wait_for, POLL};

use std::fs::{File, OpenOptions};
use std::path::Path;

/// The file at `path`, created or emptied, open for reading and writing and `len_bytes` long
/// (sparse): a volume or an export for a test.
pub fn sized_file(path: &Path, len_bytes: u64) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(len_bytes)
        .unwrap_or_else(|e| panic!("size {} to {len_bytes} bytes: {e}", path.display()));
    file
}

/// `len` bytes no compressor can shrink and no other seed repeats: a xorshift64 stream.
pub fn noise_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// `len` bytes of text-like data: words from a small vocabulary with numbers between them, so
/// matches of every length recur, as in the files a filesystem holds.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let words = [
        "volume", "journal", "block", "chunk", "restore", "flush", "tideline", "seq",
    ];
    let mut out = Vec::with_capacity(len + 32);
    let mut state = seed | 1;
    while out.len() < len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(state >> 33) as usize % words.len()].as_bytes());
        out.extend_from_slice(format!(" {} ", state >> 48).as_bytes());
    }
    out.truncate(len);
    out
}

/// Sends the tracing of code under test to the test's captured output, filtered by `RUST_LOG`
/// or else by `default_filter` (for example `"warn"`). Later calls do nothing.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
