//! Concurrent writers: nbdcopy on four connections, then four qemu-io processes at once, each
//! on its own connection; the latest restore must equal the reference.

use std::os::unix::fs::FileExt;
use std::process::Command;

use crate::harness::{self, Rig, MIB};

const SIZE: u64 = 64 * MIB;

/// A 64 MiB source: random MiBs, all-zero MiBs left as holes, and MiBs half random, half zero.
fn make_source(path: &std::path::Path) {
    harness::sparse_file(path, SIZE);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for mib in 0..SIZE / MIB {
        let offset = mib * MIB;
        let data = harness::random_bytes(mib, MIB as usize);
        match mib % 5 {
            2 => {}
            4 => file
                .write_all_at(&data[..MIB as usize / 2 + 12_345], offset)
                .unwrap(),
            _ => file.write_all_at(&data, offset).unwrap(),
        }
    }
}

/// Commands of qemu-io writer `k`: unaligned writes spread over its own quarter of the volume.
fn writer_commands(k: u64) -> Vec<String> {
    let base = k * (SIZE / 4);
    (0..12u64)
        .map(|i| {
            let offset = base + i * MIB + 777 * (i + 1) * (k + 1);
            let len = 65_536 + 4_001 * i;
            format!("write -P {:#x} {offset} {len}", 0xa0 + k * 8 + i % 8)
        })
        .chain(std::iter::once("flush".to_owned()))
        .collect()
}

#[test]
fn four_concurrent_connections_restore_identical() {
    if !harness::require_tools(&["qemu-io", "qemu-img", "nbdcopy", "nbdinfo"]) {
        return;
    }
    let rig = Rig::new("multi", SIZE);
    let uri = rig.uri();

    let info = harness::run_ok(Command::new(harness::tool("nbdinfo")).args(["--json", &uri]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["exports"][0]["can_multi_conn"],
        serde_json::Value::Bool(true),
        "the export must advertise CAN_MULTI_CONN, or nbdcopy uses one connection: {info:#}"
    );

    let source = rig.path("source.img");
    make_source(&source);
    // nbdcopy caps connections at its thread count (the number of cores by default).
    let copy = harness::run(
        Command::new(harness::tool("nbdcopy"))
            .args([
                "--connections=4",
                "--threads=4",
                "--requests=16",
                "--flush",
                "-v",
            ])
            .arg(&source)
            .arg(&uri),
    );
    assert!(copy.success(), "nbdcopy: {}", copy.status);
    let connections: std::collections::BTreeSet<&str> = copy
        .stderr
        .lines()
        .filter(|l| l.contains(": nbd_connect_uri: enter"))
        .filter_map(|l| l.split(':').nth(2))
        .collect();
    assert_eq!(
        connections.len(),
        4,
        "nbdcopy should write on 4 connections; it opened {connections:?}"
    );
    let reference = rig.path("reference.img");
    harness::copy_file(&source, &reference);

    // Four qemu-io processes at once, each with its own connection, disjoint regions.
    let writers: Vec<_> = (0..4)
        .map(|k| (k, harness::qemu_io_spawn(&uri, &writer_commands(k))))
        .collect();
    for (k, child) in writers {
        harness::wait_ok(child, &format!("qemu-io writer {k}"));
    }
    for k in 0..4 {
        let commands = writer_commands(k);
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        harness::qemu_io(reference.to_str().unwrap(), &commands);
    }
    assert!(harness::images_differ(&source, &reference));

    rig.wait_now();
    let restored = rig.restore_latest("restored.img");
    harness::assert_same_image(&restored, &reference, "latest after concurrent writers");
    // The backing volume holds the same, so nothing was lost on the way into the journal either.
    harness::assert_same_image(&rig.volume_path, &reference, "agent's backing volume");

    // Overlapping concurrent writers: which one wins each byte is up to the race, but the
    // journal must record the changes in the order they reached the volume, so the restore
    // equals the backing volume.
    let writers: Vec<_> = (0..4u64)
        .map(|k| {
            let commands: Vec<String> = (0..16u64)
                .map(|i| {
                    let offset = 5 * MIB + i * 300_000 + k * 1_111;
                    format!("write -P {:#x} {offset} 1000000", 0x10 + k * 16 + i)
                })
                .collect();
            (k, harness::qemu_io_spawn(&uri, &commands))
        })
        .collect();
    for (k, child) in writers {
        harness::wait_ok(child, &format!("overlapping qemu-io writer {k}"));
    }
    rig.wait_now();
    let restored = rig.restore_latest("restored-overlapping.img");
    assert!(harness::images_differ(&restored, &reference));
    harness::assert_same_image(
        &restored,
        &rig.volume_path,
        "latest after overlapping writers",
    );
}
