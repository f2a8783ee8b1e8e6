//! External tools: where they are, which Debian package has them, and the skip rule.

use std::io::Write;
use std::path::PathBuf;

/// The Debian package that provides `tool`, for the skip message.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-io" | "qemu-img" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "mkfs.ext4" | "e2fsck" => "e2fsprogs",
        "losetup" | "mount" | "umount" | "fsfreeze" | "runuser" => "util-linux",
        "pgbench" | "psql" => "postgresql-15",
        _ => "the package providing it",
    }
}

/// Where `tool` is: on PATH, or in /usr/sbin, /sbin or /usr/bin.
pub fn tool_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/bin".into()])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Path of a tool (also found in /usr/sbin and /sbin when they are not on PATH).
pub fn tool(tool: &str) -> PathBuf {
    tool_path(tool).unwrap_or_else(|| PathBuf::from(tool))
}

/// True when every tool is installed. A missing tool fails the test under `CI=true` (a skip in
/// CI would hide a regression); elsewhere the test is skipped, loudly.
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<String> = tools
        .iter()
        .filter(|t| tool_path(t).is_none())
        .map(|t| format!("{t} (apt-get install -y {})", package_of(t)))
        .collect();
    skip_or_fail(missing)
}

/// True when nothing is missing. Otherwise panics under `CI=true`, and elsewhere prints a
/// SKIPPED line straight to the process's stderr: the test harness captures `eprintln!` of a
/// passing test, and a skip must not read as a pass.
pub fn skip_or_fail(missing: Vec<String>) -> bool {
    if missing.is_empty() {
        return true;
    }
    let message = format!("missing {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message}; CI=true, so a skip is a failure");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED ({}): {message} ***\n",
        std::thread::current().name().unwrap_or("a test")
    );
    false
}
