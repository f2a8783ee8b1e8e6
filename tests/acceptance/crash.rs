//! Crashes: kill -9 of the agent right after a flushed write, and of the collector while the
//! agent streams; after restarts every acknowledged write must be restorable.

use std::process::{Command, Stdio};

use crate::harness::{self, Rig, MIB};

/// Writes with qemu-io to the export and to the reference file, flushing the export.
fn write_both(rig: &Rig, reference: &std::path::Path, commands: &[&str]) {
    let mut with_flush = commands.to_vec();
    with_flush.push("flush");
    harness::qemu_io(&rig.uri(), &with_flush);
    harness::qemu_io(reference.to_str().unwrap(), &with_flush);
}

#[test]
fn agent_killed_after_flushed_write_restores_it_from_its_spool() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    let mut rig = Rig::new("crashagent", SIZE);
    let reference = rig.path("reference.img");
    harness::sparse_file(&reference, SIZE);

    // 1. With the collector down, the flushed write can only live in the agent's spool (and its
    //    backing volume, which is not journalled again after a restart: no baseline runs).
    write_both(&rig, &reference, &["write -P 0x5a 0 1M"]);
    rig.wait_now();
    rig.collector.kill9();
    write_both(
        &rig,
        &reference,
        &["write -P 0xc3 3M 2M", "write -P 0x3c 123457 7777"],
    );
    rig.agent.kill9();
    rig.collector.restart();
    rig.agent.restart();
    rig.wait_now();
    let restored = rig.restore_latest("restored-1.img");
    harness::assert_same_image(
        &restored,
        &reference,
        "after kill -9 of agent and collector",
    );

    // 2. With both up: kill the agent right after the flush returns.
    write_both(
        &rig,
        &reference,
        &["write -P 0x77 10M 5M", "discard 3M 1M", "write -z 100 5000"],
    );
    rig.agent.kill9();
    rig.agent.restart();
    rig.wait_now();
    let restored = rig.restore_latest("restored-2.img");
    harness::assert_same_image(&restored, &reference, "after kill -9 of the agent alone");
}

#[test]
fn collector_killed_mid_stream_loses_nothing_acknowledged() {
    if !harness::require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 256 * MIB;
    let mut rig = Rig::new("crashcoll", SIZE);
    let source = rig.path("source.img");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&source).unwrap();
        for mib in 0..SIZE / MIB {
            file.write_all(&harness::random_bytes(1000 + mib, MIB as usize))
                .unwrap();
        }
    }
    let copy = Command::new(harness::tool("nbdcopy"))
        .arg("--flush")
        .arg(&source)
        .arg(rig.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Kill the collector once part, not all, of the data is stored there.
    let stored_before_kill = harness::wait_for(
        "the collector to store the first 16 MiB",
        harness::STARTUP_TIMEOUT,
        || {
            let stats = rig.collector.stats();
            (stats.unique_chunk_bytes >= 16 * MIB).then_some(stats.unique_chunk_bytes)
        },
    );
    rig.collector.kill9();
    assert!(
        stored_before_kill < SIZE,
        "the collector stored everything ({stored_before_kill} bytes) before it was killed: not mid-stream"
    );
    harness::wait_ok(copy, "nbdcopy");

    rig.collector.restart();
    rig.wait_now();
    let restored = rig.restore_latest("restored-1.img");
    harness::assert_same_image(
        &restored,
        &source,
        "after kill -9 of the collector mid-stream",
    );
    // `wait` returned, so the agent reconnected by itself and sent everything.
    let durable = rig.collector.volume(&rig.volume).unwrap().durable_seq;

    // Acknowledged means on disk: a second crash of the collector alone changes nothing.
    std::fs::remove_file(&restored).unwrap();
    rig.collector.kill9();
    rig.collector.restart();
    let after = rig.collector.volume(&rig.volume).unwrap().durable_seq;
    assert!(
        after >= durable,
        "durable seq went back from {durable} to {after} across a collector restart"
    );
    let restored = rig.restore_latest("restored-2.img");
    harness::assert_same_image(&restored, &source, "after a second collector restart");
    println!(
        "collector killed with {} MiB of 256 stored; durable seq {durable} before and {after} after a second restart",
        stored_before_kill / MIB
    );
}
