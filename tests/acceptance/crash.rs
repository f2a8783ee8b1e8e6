//! Crashes: kill -9 of the agent right after a flushed write, and of the collector while the
//! agent streams; after restarts every acknowledged write must be restorable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::harness::{self, Rig, MIB};

/// A 32 MiB volume under protection, and a sparse reference image of the same size beside it
/// that the tests write the same commands to.
fn rig_and_reference(volume: &str) -> (Rig, std::path::PathBuf) {
    const SIZE: u64 = 32 * MIB;
    let rig = Rig::new(volume, SIZE);
    let reference = rig.path("reference.img");
    harness::sparse_file(&reference, SIZE);
    (rig, reference)
}

/// Runs qemu-io commands on the reference image.
fn write_reference(reference: &std::path::Path, commands: &[&str]) {
    harness::qemu_io(reference.to_str().unwrap(), commands);
}

/// Runs qemu-io commands on the agent's export, then on the reference image.
fn write_both(rig: &Rig, reference: &std::path::Path, commands: &[&str]) {
    harness::qemu_io(&rig.uri(), commands);
    write_reference(reference, commands);
}

/// qemu-io commands plus a final flush.
fn flushed<'a>(commands: &[&'a str]) -> Vec<&'a str> {
    let mut all = commands.to_vec();
    all.push("flush");
    all
}

#[test]
fn agent_killed_after_flushed_write_restores_it_from_its_spool() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let (mut rig, reference) = rig_and_reference("crashagent");

    let first = flushed(&["write -P 0x5a 0 1M"]);
    write_both(&rig, &reference, &first);
    rig.wait_now();

    // 1. With the collector down, the flushed write lives only in the agent's spool (and in its
    //    backing volume, which is not journalled again after a restart: no baseline runs).
    rig.collector.kill9();
    let second = flushed(&["write -P 0xc3 3M 2M", "write -P 0x3c 123457 7777"]);
    harness::qemu_io(&rig.uri(), &second);
    let acknowledged = harness::now_rfc3339();
    rig.agent.kill9();
    write_reference(&reference, &second);
    rig.collector.restart();
    rig.agent.restart();
    rig.wait_now();
    // Restoring the moment the flush returned proves the records kept their original times:
    // they came from the spool, not from re-reading the volume after the restart.
    let restored = rig.path("restored-1.img");
    harness::restore(&rig.url(), &rig.volume, Some(&acknowledged), &restored);
    harness::assert_same_image(
        &restored,
        &reference,
        "after kill -9 of agent and collector",
    );

    // 2. With both up: kill the agent right after the flush returns.
    let third = flushed(&["write -P 0x77 10M 5M", "discard 3M 1M", "write -z 100 5000"]);
    harness::qemu_io(&rig.uri(), &third);
    rig.agent.kill9();
    write_reference(&reference, &third);
    rig.agent.restart();
    rig.wait_now();
    let restored = rig.restore_latest("restored-2.img");
    harness::assert_same_image(&restored, &reference, "after kill -9 of the agent alone");
}

/// Large writes are spooled without their data, which the volume holds until it ships; a change
/// to those blocks first saves them to the spool. With the collector away, rounds of large
/// writes overwrite the previous rounds' blocks, across a kill -9 and restart of the agent (the
/// blocks still to be saved are found again from the spool); every round's moment then
/// restores exactly.
#[test]
fn writes_overwritten_before_they_shipped_restore_at_every_moment_across_a_kill() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    let (mut rig, reference) = rig_and_reference("overwritten");
    rig.collector.kill9();
    let mut moments = Vec::new();
    for round in 0..6u32 {
        if round == 3 {
            rig.agent.kill9();
            rig.agent.restart();
        }
        let pattern = 0x11 * (round + 1);
        let shift = round * 256;
        let commands = [
            format!("write -P {pattern} 0 4M"),
            format!("write -P {} {}K 1M", pattern + 1, 1024 + shift),
            format!("write -P {} {}K 8K", pattern + 2, 2048 + shift),
            format!("write -P {} {}K 256K", pattern + 3, 3072 - shift),
            format!("discard {}K 64K", 512 + shift),
        ];
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        write_both(&rig, &reference, &flushed(&commands));
        let moment = harness::now_rfc3339();
        let copy = rig.path(&format!("reference-{round}.img"));
        harness::copy_file(&reference, &copy);
        moments.push((moment, copy));
    }
    let saved = std::fs::read_dir(rig.agent.spool_dir.join(&rig.volume))
        .unwrap()
        .filter(|e| {
            let path = e.as_ref().unwrap().path();
            path.extension().is_some_and(|x| x == "saved")
        })
        .count();
    assert!(
        saved > 0,
        "no blocks were saved before an overwrite: no write was kept on the volume"
    );
    rig.agent.kill9();
    rig.collector.restart();
    rig.agent.restart();
    rig.wait_now();
    for (round, (moment, copy)) in moments.iter().enumerate() {
        let restored = rig.path(&format!("restored-{round}.img"));
        harness::restore(&rig.url(), &rig.volume, Some(moment), &restored);
        harness::assert_same_image(&restored, copy, &format!("round {round} at {moment}"));
    }
}

/// A large write's data waits on the volume until it ships. Changed there behind the agent's
/// back meanwhile (and no longer in the agent's memory, after a restart), it is lost to the
/// journal: the agent says so, ships a gap instead of wrong data, and resyncs the blocks. The
/// moment before stays restorable, and the latest image comes to equal the volume.
#[test]
fn a_write_changed_behind_the_agents_back_before_it_shipped_becomes_a_gap_and_a_resync() {
    if !harness::require_tools(&["qemu-io"]) {
        return;
    }
    let (mut rig, reference) = rig_and_reference("behind");
    write_both(&rig, &reference, &flushed(&["write -P 0x21 0 1M"]));
    rig.wait_now();
    let before = harness::now_rfc3339();
    rig.collector.kill9();
    write_both(&rig, &reference, &flushed(&["write -P 0x22 4M 1M"]));
    rig.agent.kill9();
    let volume = std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.volume_path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&volume, &[0x99; 4096], 4 * MIB + 8192).unwrap();
    volume.sync_all().unwrap();
    rig.agent.restart();
    rig.collector.restart();
    // Once everything stamped until now is durable the collector has the gap, so the volume
    // is complete again only after the resync's Complete record.
    rig.wait_now();
    rig.collector.wait_complete(&rig.volume);
    rig.wait_now();
    let log = rig.agent.log_text();
    assert!(
        log.contains("changed before it was shipped"),
        "the agent says what it lost:\n{log}"
    );
    let latest = rig.restore_latest("latest.img");
    harness::assert_same_image(
        &latest,
        &rig.volume_path,
        "latest vs the volume after the resync",
    );
    let out = rig.path("before.img");
    harness::restore(&rig.url(), &rig.volume, Some(&before), &out);
    let expected = rig.path("expected-before.img");
    harness::sparse_file(&expected, 32 * MIB);
    write_reference(&expected, &["write -P 0x21 0 1M"]);
    harness::assert_same_image(&out, &expected, "the moment before the lost write");
}

#[test]
fn collector_killed_mid_stream_loses_nothing_acknowledged() {
    if !harness::require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 256 * MIB;
    let mut rig = Rig::new("crashcoll", SIZE);
    let source = rig.path("source.img");
    harness::random_file(&source, SIZE, 1000);
    let copy = harness::spawn(
        Command::new(harness::tool("nbdcopy"))
            .arg("--flush")
            .arg(&source)
            .arg(rig.uri()),
    );

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

/// An agent streams for as long as it runs; SIGTERM must still stop the collector (after a
/// bounded grace for open streams), and what it acknowledged must be there after a restart.
#[test]
fn collector_stops_on_sigterm_while_an_agent_streams() {
    let mut rig = Rig::new("sigterm", 4 * MIB);
    let data = harness::random_bytes(77, MIB as usize);
    let mut client = rig.agent.nbd(&rig.volume);
    client.write(0, &data, true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();

    let started = Instant::now();
    let status = rig.collector.terminate();
    let took = started.elapsed();
    assert!(status.success(), "collector exit after SIGTERM: {status}");
    assert!(
        took < 3 * tideline_collector::SHUTDOWN_GRACE,
        "collector took {took:?} to stop after SIGTERM"
    );
    assert!(
        rig.collector
            .log_text()
            .contains("streams still open at shutdown"),
        "the agent's stream was not the one cut: {}",
        rig.collector.log_text()
    );

    rig.collector.restart();
    rig.wait_now();
    let restored = rig.restore_latest("restored.img");
    let image = std::fs::read(&restored).unwrap();
    assert_eq!(&image[..MIB as usize], &data[..], "acknowledged write lost");
    println!(
        "collector stopped {:.2} s after SIGTERM",
        took.as_secs_f64()
    );
}

/// Regression: the agent applied a change to its volume and was killed before the change's
/// record reached the spool. The write was never acknowledged, so either content is allowed,
/// but the journal must not silently disagree with the volume from then on: restore latest
/// used to differ from the volume forever after such a kill.
#[test]
fn agent_killed_mid_write_leaves_journal_equal_to_volume() {
    if !harness::require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 256 * MIB;
    let mut rig = Rig::new("midwrite", SIZE);
    let source = rig.path("source.img");
    harness::random_file(&source, SIZE, 5000);
    // Kills at different points of a stream of 32 MiB writes, until one lands between the
    // volume write and the spool append (the agent says so when it recovers): a test whose
    // kills all missed that window would prove nothing.
    const MAX_ROUNDS: u64 = 12;
    let interrupted = |rig: &Rig| {
        rig.agent
            .log_text()
            .matches("between changing the volume and journalling the change")
            .count()
    };
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        rounds = round + 1;
        let copy = harness::spawn(
            Command::new(harness::tool("nbdcopy"))
                .args(["--request-size=33554432", "--connections=1"])
                .arg(&source)
                .arg(rig.uri()),
        );
        let allocated_before = harness::allocated_bytes(&rig.volume_path);
        let target = (allocated_before + (24 + 16 * round) * MIB).min(SIZE - 8 * MIB);
        harness::wait_for(
            "nbdcopy to write into the volume",
            harness::STARTUP_TIMEOUT,
            || (harness::allocated_bytes(&rig.volume_path) >= target).then_some(()),
        );
        rig.agent.kill9();
        // nbdcopy fails when its server dies; what it wrote is what the volume holds.
        let _ = copy.finish();
        rig.agent.restart();
        rig.wait_now();
        rig.collector.wait_complete(&rig.volume);
        rig.wait_now();
        let restored = rig.restore_latest(&format!("restored-{round}.img"));
        harness::assert_same_image(
            &restored,
            &rig.volume_path,
            &format!("round {round}: latest vs the agent's volume after kill -9 mid-write"),
        );
        std::fs::remove_file(&restored).unwrap();
        if interrupted(&rig) > 0 && round >= 1 {
            break;
        }
    }
    let interrupted = interrupted(&rig);
    assert!(
        interrupted > 0,
        "none of {rounds} kills landed between a volume write and its journal record"
    );
    println!(
        "kill -9 mid-write: {interrupted} of {rounds} kills interrupted a change; journal equals volume"
    );
}

/// A host crash can cost the spool records it had already shipped (they were read from the
/// page cache before any fsync). The collector then holds seqs the spool would hand out again
/// for new writes, and would skip those as resends. The agent must notice, journal a gap and a
/// whole resync, and continue the group's journal as a successor spool: every moment before
/// the loss stays restorable, and the journal comes to equal the volume again, also across a
/// later restart.
#[test]
fn a_spool_that_lost_shipped_records_continues_the_journal_as_its_successor() {
    const SIZE: u64 = 8 * MIB;
    let mut rig = Rig::new("spoollost", SIZE);
    let mut client = rig.agent.nbd("spoollost");
    client.write(0, &[0x42; MIB as usize], true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();
    let (before, before_at) = (rig.restore_latest("before.img"), harness::now_rfc3339());

    // Power loss, simulated: the agent dies and its spool loses every record.
    rig.agent.kill9();
    empty_every_spool_segment(&rig, "spoollost");
    rig.agent.restart();
    wait_for_the_succession(&rig);
    let mut client = rig.agent.nbd("spoollost");
    client.write(2 * MIB, &[0x77; MIB as usize], true).unwrap();
    client.disconnect().unwrap();
    assert_journal_equals_volume(&rig, "after.img");
    assert_moment_kept(&rig, &before_at, &before);

    // A restart afterwards streams on as the successor the collector accepted.
    rig.agent.restart();
    let mut client = rig.agent.nbd("spoollost");
    client.write(4 * MIB, &[0x55; MIB as usize], true).unwrap();
    client.disconnect().unwrap();
    assert_journal_equals_volume(&rig, "restarted.img");
}

/// The same loss, but the agent comes back while the collector is away: the whole-volume
/// resync the loss calls for and new writes take the spool past the collector's seq before the
/// two meet. Compared with the spool as it is then, the collector would look behind, and it
/// would skip the new records up to its seq as resends (the gap marker among them). The agent
/// must find that its record at the collector's seq is not the collector's, and continue as a
/// successor.
#[test]
fn a_spool_that_lost_shipped_records_continues_after_new_records_pass_the_collectors_seq() {
    let mut rig = Rig::new("spoolpast", 8 * MIB);
    let (before, before_at) = loss_then_writes_while_the_collector_is_away(&mut rig);
    rig.collector.restart();
    wait_for_the_succession(&rig);
    assert_journal_equals_volume(&rig, "after.img");
    assert_moment_kept(&rig, &before_at, &before);
}

/// The loss again, but the records written after it are made durable (the client flushes)
/// while the collector is away, and the agent restarts once more before the two meet: its
/// spool then reaches past the collector's seq from the moment it opens, and no count of seqs
/// shows the loss. The collector names its newest record; the agent must find that its own
/// record at that seq differs, and continue as a successor.
#[test]
fn a_spool_that_lost_shipped_records_and_restarted_past_the_collectors_seq_continues() {
    let mut rig = Rig::new("spoolagain", 8 * MIB);
    let (before, before_at) = loss_then_writes_while_the_collector_is_away(&mut rig);
    rig.agent.kill9();
    rig.agent.restart();
    rig.collector.restart();
    wait_for_the_succession(&rig);
    assert!(
        rig.agent.log_text().contains("is not this spool's"),
        "the loss was not found by comparing records: {}",
        rig.agent.log_text()
    );
    assert_journal_equals_volume(&rig, "after.img");
    assert_moment_kept(&rig, &before_at, &before);
}

/// Writes 4 MiB and waits until the collector holds it (the moment kept: its image and time);
/// then the agent and the collector die, a power loss empties the agent's spool, and the
/// restarted agent, with the collector still away, overwrites 8 MiB with FUA writes: its new
/// records take the spool past the collector's seq.
fn loss_then_writes_while_the_collector_is_away(rig: &mut Rig) -> (PathBuf, String) {
    let name = rig.volume.clone();
    let mut client = rig.agent.nbd(&name);
    for i in 0..4u64 {
        client.write(i * MIB, &[0x42; MIB as usize], true).unwrap();
    }
    client.disconnect().unwrap();
    rig.wait_now();
    let (before, before_at) = (rig.restore_latest("before.img"), harness::now_rfc3339());

    rig.agent.kill9();
    rig.collector.kill9();
    empty_every_spool_segment(rig, &name);
    rig.agent.restart();
    let mut client = rig.agent.nbd(&name);
    for i in 0..8u64 {
        client.write(i * MIB, &[0x77; MIB as usize], true).unwrap();
    }
    client.disconnect().unwrap();
    (before, before_at)
}

/// A power loss can take a trim the collector never received. The resync after the loss reads
/// the volume's allocated blocks; the trimmed blocks are holes, so they must be accounted for
/// as well, or the journal keeps their old content for good.
#[test]
fn a_trim_lost_with_the_spool_leaves_no_old_data_in_the_journal() {
    let mut rig = rig_holding_2_mib_at_the_collector("losttrim");

    rig.collector.kill9();
    let mut client = rig.agent.nbd("losttrim");
    client.trim(0, MIB as u32).unwrap();
    client.flush().unwrap();
    client.disconnect().unwrap();
    assert_eq!(
        harness::allocated_bytes(&rig.volume_path),
        MIB,
        "the trim punched a hole in the volume"
    );
    rig.agent.kill9();
    empty_every_spool_segment(&rig, "losttrim");
    rig.collector.restart();
    rig.agent.restart();
    wait_for_the_succession(&rig);
    assert_journal_equals_volume(&rig, "after.img");
}

/// Moving a volume's dirty map aside forces a full resync (a baseline), for instance after the
/// volume was changed while the agent was stopped. The baseline reads the allocated blocks; a
/// block the volume no longer holds (a hole) must not keep its old content in the journal.
#[test]
fn a_baseline_over_an_existing_journal_leaves_no_old_data_in_holes() {
    let mut rig = rig_holding_2_mib_at_the_collector("rebase");
    let status = rig.agent.terminate();
    assert!(status.success(), "agent exit after SIGTERM: {status}");

    // Changed while unprotected: the first MiB is a hole now.
    let volume = std::fs::OpenOptions::new()
        .write(true)
        .open(&rig.volume_path)
        .unwrap();
    // SAFETY: plain syscall on a descriptor `volume` keeps open; no memory is passed.
    let punched = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&volume),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            MIB as i64,
        )
    };
    assert_eq!(
        punched,
        0,
        "punch a hole: {}",
        std::io::Error::last_os_error()
    );
    drop(volume);
    let map = rig.agent.spool_dir.join("rebase").join("rebase.dirty");
    std::fs::rename(&map, map.with_extension("dirty.aside")).unwrap();

    rig.agent.restart();
    assert_journal_equals_volume(&rig, "after.img");
}

/// An 8 MiB volume whose first 2 MiB were written and are durable at the collector.
fn rig_holding_2_mib_at_the_collector(name: &str) -> Rig {
    let rig = Rig::new(name, 8 * MIB);
    let mut client = rig.agent.nbd(name);
    client.write(0, &[0x42; 2 * MIB as usize], true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();
    rig
}

fn newest_segment(group_spool: &Path) -> PathBuf {
    std::fs::read_dir(group_spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a spool segment")
}

/// A power loss that took every record of the group's spool, those the collector holds too.
fn empty_every_spool_segment(rig: &Rig, group: &str) {
    // One spool directory per group; a volume outside any group is a group of its own.
    let group_spool = rig.agent.spool_dir.join(group);
    let segments: Vec<_> = std::fs::read_dir(&group_spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert!(
        !segments.is_empty(),
        "no spool segment in {}",
        group_spool.display()
    );
    for segment in &segments {
        std::fs::OpenOptions::new()
            .write(true)
            .open(segment)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
}

fn wait_for_the_succession(rig: &Rig) {
    harness::wait_for(
        "the agent to continue after a collector that is ahead of its spool",
        harness::STARTUP_TIMEOUT,
        || {
            rig.agent
                .log_text()
                .contains("the spool continues the group's journal after seq")
                .then_some(())
        },
    );
}

/// Once the resync is complete, the collector's latest image is the agent's volume. Until the
/// resync's `Complete` record arrives the latest point lies in the gap, and restoring it is
/// refused; waiting for durability first makes sure the gap has arrived.
fn assert_journal_equals_volume(rig: &Rig, name: &str) {
    rig.wait_now();
    let out = rig.path(name);
    let out_s = out.to_str().expect("UTF-8 path");
    harness::wait_for(
        "the resync after the loss to complete (the latest point restorable)",
        harness::STARTUP_TIMEOUT,
        || {
            let args = [
                "restore",
                "--volume",
                &rig.volume,
                "--out",
                out_s,
                "--latest",
            ];
            harness::tideline(&rig.url(), &args).success().then_some(())
        },
    );
    harness::assert_same_image(&out, &rig.volume_path, "the collector's latest image");
}

fn assert_moment_kept(rig: &Rig, at: &str, reference: &Path) {
    let out = rig.path("moment-before-the-loss.img");
    harness::restore(&rig.url(), &rig.volume, Some(at), &out);
    harness::assert_same_image(&out, reference, "the moment before the power loss");
}

/// A power loss can cut off spooled records that were never flushed while the volume kept
/// their changes (large writes go to the volume with `O_DIRECT`, a trim punches a hole at
/// once). Simulated here: the agent dies and its newest spool segment loses everything after
/// the last flush: an unflushed trim of blocks the collector holds, and an unflushed write.
/// The flushed records must survive with their times, and the journal must come to equal the
/// volume again (the agent resyncs the whole volume, since nothing says which blocks the lost
/// records held; the trimmed blocks, holes now, must lose their old content too).
#[test]
fn power_loss_cutting_the_spools_unflushed_tail_resyncs_the_volume() {
    if !harness::require_tools(&["qemu-io"]) {
        return;
    }
    let (mut rig, reference) = rig_and_reference("powercut");
    let first = flushed(&["write -P 0x11 0 4M"]);
    write_both(&rig, &reference, &first);
    rig.wait_now();

    // With the collector down, a flushed write and then unflushed changes stay in the spool.
    rig.collector.kill9();
    let second = flushed(&["write -P 0x22 8M 4M"]);
    write_both(&rig, &reference, &second);
    let flushed_at = harness::now_rfc3339();
    let group_spool = rig.agent.spool_dir.join("powercut");
    let newest = newest_segment(&group_spool);
    let flushed_len = std::fs::metadata(&newest).unwrap().len();
    harness::qemu_io(&rig.uri(), &["discard 0 4M"]);
    harness::qemu_io(&rig.uri(), &["write -P 0x33 16M 4M"]);
    rig.agent.kill9();
    assert_eq!(
        newest_segment(&group_spool),
        newest,
        "the unflushed changes are in the segment that holds the flush"
    );

    // The power loss: the spool keeps the flushed records and a torn piece of the trim's entry.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    let len = file.metadata().unwrap().len();
    // The write's record: its blocks' hashes, its data left on the volume.
    assert!(
        len > flushed_len + 32 * 1024,
        "the unflushed write is in the newest segment"
    );
    file.set_len(flushed_len + 16).unwrap();
    drop(file);

    rig.collector.restart();
    rig.agent.restart();
    rig.collector.wait_complete(&rig.volume);
    rig.wait_now();
    assert!(
        rig.agent.log_text().contains("resyncing the whole volume"),
        "the agent says why it resyncs:\n{}",
        rig.agent.log_text()
    );
    let restored = rig.path("flushed.img");
    harness::restore(&rig.url(), &rig.volume, Some(&flushed_at), &restored);
    harness::assert_same_image(&restored, &reference, "the flushed moment, from the spool");
    let latest = rig.restore_latest("latest.img");
    harness::assert_same_image(&latest, &rig.volume_path, "latest vs the agent's volume");
}
