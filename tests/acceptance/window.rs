//! The restorable window: a volume that already holds data is baselined while writes continue,
//! and a full spool opens a gap that a resync closes. Points before the baseline or inside the
//! gap are refused with a message saying so; every other point restores exactly.

use std::os::unix::fs::FileExt;

use crate::harness::{self, Agent, AgentSpec, Collector, MIB};

const SIZE: u64 = 64 * MIB;

#[test]
fn volume_holding_data_is_baselined_while_writes_continue() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("prefilled.img");
    harness::sparse_file(&volume, SIZE);
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&volume)
            .unwrap();
        file.write_all_at(&harness::random_bytes(5, 8 * MIB as usize), 0)
            .unwrap();
        file.write_all_at(&[0x5e; MIB as usize], 20 * MIB).unwrap();
        file.write_all_at(&harness::random_bytes(6, 3 * MIB as usize / 2), 62 * MIB)
            .unwrap();
    }
    let reference = dir.path().join("reference.img");
    harness::copy_file(&volume, &reference);

    let before = harness::now_rfc3339();
    let collector = Collector::start(dir.path());
    let agent = Agent::start(
        dir.path(),
        &collector.url(),
        AgentSpec::one("prefilled", &volume),
    );
    // Written while the baseline runs (or just after): overlapping baselined extents and holes.
    let commands = [
        "write -P 0x77 4M 8M",
        "write -P 0x78 30M 1M",
        "discard 20M 512K",
        "write -P 0x79 63M 4097",
        "flush",
    ];
    harness::qemu_io(&agent.uri("prefilled"), &commands);
    harness::qemu_io(reference.to_str().unwrap(), &commands);

    collector.wait_complete("prefilled");
    harness::wait_durable(&collector.url(), "prefilled", &harness::now_rfc3339());
    let restored = dir.path().join("restored.img");
    harness::restore(&collector.url(), "prefilled", None, &restored);
    harness::assert_same_image(&restored, &reference, "latest after the baseline");

    let early = dir.path().join("early.img");
    let output = harness::tideline(
        &collector.url(),
        &[
            "restore",
            "--volume",
            "prefilled",
            "--at",
            &before,
            "--out",
            early.to_str().unwrap(),
        ],
    );
    assert!(
        !output.success(),
        "restored a point before protection began: {output}"
    );
    assert!(output.stderr.contains("baseline"), "{output}");
    assert!(!early.exists());
}

#[test]
fn full_spool_opens_a_gap_that_resync_closes() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("gappy.img");
    harness::sparse_file(&volume, SIZE);
    let reference = dir.path().join("reference.img");
    harness::sparse_file(&reference, SIZE);
    let mut collector = Collector::start(dir.path());
    let spec = AgentSpec {
        spool_max_bytes: Some(16 * MIB),
        ..AgentSpec::one("gappy", &volume)
    };
    let agent = Agent::start(dir.path(), &collector.url(), spec);
    collector.wait_complete("gappy");
    let uri = agent.uri("gappy");
    let both = |commands: &[&str]| {
        harness::qemu_io(&uri, commands);
        harness::qemu_io(reference.to_str().unwrap(), commands);
    };

    both(&["write -P 0x0a 0 1M", "flush"]);
    let before_gap = harness::now_rfc3339();
    harness::wait_durable(&collector.url(), "gappy", &before_gap);
    let reference_before_gap = dir.path().join("reference-before-gap.img");
    harness::copy_file(&reference, &reference_before_gap);

    // With the collector away, 40 MiB overflow the 16 MiB spool: the agent keeps serving.
    // Written half a KiB off the block grid, so the record carries its data (aligned writes of
    // 64 KiB or more leave it on the volume).
    collector.kill9();
    both(&["write -P 0x0b 2097664 40M", "flush"]);
    let in_gap = harness::now_rfc3339();
    both(&["write -P 0x0c 50M 1M", "write -P 0x0d 100 200", "flush"]);
    collector.restart();

    // Once everything stamped until now is durable the collector has seen the Gap record, so
    // `complete` is true again only after the resync's Complete record.
    harness::wait_durable(&collector.url(), "gappy", &harness::now_rfc3339());
    collector.wait_complete("gappy");
    harness::wait_durable(&collector.url(), "gappy", &harness::now_rfc3339());

    let restored = dir.path().join("restored.img");
    harness::restore(&collector.url(), "gappy", None, &restored);
    harness::assert_same_image(&restored, &reference, "latest after the resync");
    harness::assert_same_image(&restored, &volume, "latest vs the agent's volume");

    let restored = dir.path().join("restored-before-gap.img");
    harness::restore(&collector.url(), "gappy", Some(&before_gap), &restored);
    harness::assert_same_image(&restored, &reference_before_gap, "the point before the gap");

    let refused = dir.path().join("in-gap.img");
    let output = harness::tideline(
        &collector.url(),
        &[
            "restore",
            "--volume",
            "gappy",
            "--at",
            &in_gap,
            "--out",
            refused.to_str().unwrap(),
        ],
    );
    assert!(
        !output.success(),
        "restored a point inside the gap: {output}"
    );
    assert!(output.stderr.contains("gap"), "{output}");
    assert!(!refused.exists());
}
