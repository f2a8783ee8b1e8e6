//! Space: a volume holding an ext4 file system full of real files is stored in less than its
//! allocated bytes, and writing the same image again at another offset adds almost nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{self, Rig, MIB};

const GIB: u64 = 1 << 30;
/// Most data copied into the file system (it must fit in 1 GiB with ext4's overhead).
const SOURCE_BUDGET_BYTES: u64 = 640 * MIB;
/// Entries of /usr/share left out: `man` holds directories of thousands of small files, which
/// `mkfs.ext4 -d` populates very slowly (tens of seconds) without adding anything distinctive.
const SKIPPED: &[&str] = &["man"];

fn du_bytes(path: &Path) -> u64 {
    let out = harness::run_ok(Command::new("du").arg("-sb").arg(path));
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du -sb {} printed {out:?}", path.display()))
}

/// A directory of real files from /usr/share (hard links where possible, so nothing is copied),
/// at most [`SOURCE_BUDGET_BYTES`].
fn source_tree(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir(&tree).unwrap();
    let mut entries: Vec<PathBuf> = std::fs::read_dir("/usr/share")
        .expect("read /usr/share")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !SKIPPED.contains(&n))
        })
        .collect();
    entries.sort();
    let mut total = 0;
    for entry in entries {
        let size = du_bytes(&entry);
        if total + size > SOURCE_BUDGET_BYTES {
            continue;
        }
        let linked = harness::run(Command::new("cp").arg("-al").arg(&entry).arg(&tree)).success();
        if !linked {
            let _ = std::fs::remove_dir_all(tree.join(entry.file_name().unwrap()));
            if !harness::run(Command::new("cp").arg("-a").arg(&entry).arg(&tree)).success() {
                continue;
            }
        }
        total += size;
    }
    assert!(
        total > 100 * MIB,
        "/usr/share gave only {total} bytes of files; not realistic enough"
    );
    tree
}

/// `qemu-img compare` of `[offset, offset + len)` of `restored` with all of `image`.
fn assert_window_equals(restored: &Path, offset: u64, len: u64, image: &Path) {
    let output = harness::run(
        Command::new(harness::tool("qemu-img"))
            .args(["compare", "--image-opts"])
            .arg(format!(
                "driver=raw,offset={offset},size={len},file.driver=file,file.filename={}",
                restored.display()
            ))
            .arg(format!(
                "driver=raw,file.driver=file,file.filename={}",
                image.display()
            )),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "restored bytes at {offset} differ from the image: {output}"
    );
}

#[test]
fn realistic_data_is_stored_compressed_and_deduplicated() {
    if !harness::require_tools(&["mkfs.ext4", "qemu-img", "nbdcopy"]) {
        return;
    }
    let rig = Rig::new("space", 2 * GIB);
    let image = rig.path("ext4.img");
    let tree = source_tree(rig.dir.path());
    harness::run_ok(
        Command::new(harness::tool("mkfs.ext4"))
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("1G"),
    );
    let allocated = harness::allocated_bytes(&image);
    assert!(
        allocated > 100 * MIB,
        "ext4 image holds only {allocated} bytes"
    );

    // First copy at offset 0.
    let before = rig.collector.stats();
    harness::run_ok(
        Command::new(harness::tool("nbdcopy"))
            .arg("--flush")
            .arg(&image)
            .arg(rig.uri()),
    );
    rig.wait_now();
    let first = rig.collector.stats();
    let stored = first
        .stored_bytes
        .checked_sub(before.stored_bytes)
        .expect("stored bytes never shrink");
    assert!(
        stored < allocated,
        "stored {stored} bytes for an image of {allocated} allocated bytes"
    );
    assert!(
        first.pack_file_bytes < allocated,
        "pack files take {} bytes for an image of {allocated} allocated bytes",
        first.pack_file_bytes
    );
    println!(
        "space: allocated {allocated}, stored {stored} (packs {}), ratio {:.3} (unique chunk bytes {})",
        first.pack_file_bytes,
        stored as f64 / allocated as f64,
        first.unique_chunk_bytes
    );

    // The same image again, at 1 GiB.
    harness::run_ok(
        Command::new(harness::tool("qemu-img"))
            .args(["convert", "-n", "-f", "raw"])
            .arg(&image)
            .arg("--target-image-opts")
            .arg(format!(
                "driver=raw,offset={GIB},file.driver=nbd,file.path={},file.export={}",
                rig.agent.socket.display(),
                rig.volume
            )),
    );
    rig.wait_now();
    let second = rig.collector.stats();
    let added = second
        .stored_bytes
        .checked_sub(first.stored_bytes)
        .expect("stored bytes never shrink");
    let added_pack = second
        .pack_file_bytes
        .checked_sub(first.pack_file_bytes)
        .expect("pack files never shrink");
    println!(
        "space: second copy added {added} stored bytes ({added_pack} pack bytes, {} chunks), {:.4}% of the allocated bytes; overall ratio {:.3}",
        second.chunk_count - first.chunk_count,
        added as f64 * 100.0 / allocated as f64,
        second.stored_bytes as f64 / (2 * allocated) as f64
    );
    assert!(
        added * 100 < allocated,
        "the second copy added {added} stored bytes, over 1% of {allocated}"
    );
    assert!(
        added_pack * 100 < allocated,
        "the second copy added {added_pack} pack bytes, over 1% of {allocated}"
    );

    // Both copies restore from the shared chunks, into an image that allocates no more than
    // the two copies' blocks (the restore allocates the non-zero ranges up front).
    let restored = rig.restore_latest("restored.img");
    assert_window_equals(&restored, 0, GIB, &image);
    assert_window_equals(&restored, GIB, GIB, &image);
    let restored_allocated = harness::allocated_bytes(&restored);
    assert!(
        restored_allocated <= 2 * allocated + 2 * allocated / 100,
        "the restored image allocates {restored_allocated} bytes for two copies of an image of {allocated} allocated bytes"
    );
}
