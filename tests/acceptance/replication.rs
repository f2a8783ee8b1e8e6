//! Second site (issue 4): two collectors on loopback, A replicating to B. Lag under steady
//! load, restores and a drill at B, kill -9 of either side mid-stream, a chunk crossing once for
//! two volumes of the same data, failover at B with A dead, fencing of A and its agent, a
//! delta failback, and failovers after which the agent outlived A's collector and moves to B
//! with its spool. The figures they measure are printed (run with `--nocapture` to see them).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tideline_agent::nbd::NbdClient;

use crate::harness::{self, Agent, AgentSpec, Collector, MIB, STARTUP_TIMEOUT};

/// Site A replicating to site B (and, with `mutual`, B to A for reverse protection).
fn two_sites(dir: &Path, mutual: bool) -> (Collector, Collector) {
    let (addr_a, addr_b) = (harness::free_addr(), harness::free_addr());
    let (url_a, url_b) = (format!("http://{addr_a}"), format!("http://{addr_b}"));
    let b = Collector::start_site(dir, "b", addr_b, mutual.then_some(url_a.as_str()));
    let a = Collector::start_site(dir, "a", addr_a, Some(&url_b));
    (a, b)
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tideline-replication-")
        .tempdir()
        .unwrap()
}

fn durable_seq(collector: &Collector, group: &str) -> u64 {
    collector.group_status(group).map_or(0, |g| g.durable_seq)
}

/// Waits until B holds every record A holds for `group`.
fn wait_caught_up(a: &Collector, b: &Collector, group: &str) -> u64 {
    harness::wait_for(
        &format!("site B to catch up with site A on group {group}"),
        STARTUP_TIMEOUT,
        || {
            let at_a = durable_seq(a, group);
            (at_a > 0 && durable_seq(b, group) == at_a).then_some(at_a)
        },
    )
}

/// Writes through NBD and into a reference file alike.
struct Writer {
    nbd: NbdClient<std::os::unix::net::UnixStream>,
    reference: File,
}

impl Writer {
    fn new(agent: &Agent, volume: &str, reference: &Path, size: u64) -> Writer {
        if !reference.exists() {
            harness::sparse_file(reference, size);
        }
        Writer {
            nbd: agent.nbd(volume),
            reference: OpenOptions::new().write(true).open(reference).unwrap(),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.nbd.write(offset, data, false).unwrap();
        self.reference.write_all_at(data, offset).unwrap();
    }

    fn flush(&mut self) {
        self.nbd.flush().unwrap();
    }
}

fn copy_of(path: &Path, name: &str) -> PathBuf {
    let out = path.with_file_name(name);
    harness::copy_file(path, &out);
    out
}

fn restore_at(url: &str, volume: &str, at: Option<&str>, out: &Path) {
    harness::restore(url, volume, at, out);
}

#[test]
fn lag_stays_low_under_load_and_restores_at_b_equal_the_reference() {
    if !harness::require_tools(&["qemu-img"]) {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let dir = tempdir();
    let (a, b) = two_sites(dir.path(), false);
    let volume_path = dir.path().join("load.img");
    harness::sparse_file(&volume_path, SIZE);
    let agent = Agent::start(dir.path(), &a.url(), AgentSpec::one("load", &volume_path));
    a.wait_complete("load");
    b.wait_complete("load");

    // Steady load: 256 KiB written and flushed every 50 ms for about 8 s (5 MiB/s), with B's
    // lag sampled after every write.
    let reference = dir.path().join("reference.img");
    let mut writer = Writer::new(&agent, "load", &reference, SIZE);
    let mut lags = Vec::new();
    let mut moments = Vec::new();
    let started = Instant::now();
    let mut round = 0u64;
    // At least three moments to restore, however slow the machine.
    while started.elapsed() < Duration::from_secs(8) || moments.len() < 3 {
        let offset = (round * 7919 % (SIZE / (256 << 10))) * (256 << 10);
        writer.write(offset, &harness::random_bytes(round, 256 << 10));
        writer.flush();
        if round % 40 == 20 {
            moments.push((
                harness::now_rfc3339(),
                copy_of(&reference, &format!("ref-{round}.img")),
            ));
        }
        let status = b.group_status("load").unwrap();
        lags.push(status.lag_ms);
        round += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let max_lag = *lags.iter().max().unwrap();
    let mean_lag = lags.iter().sum::<u64>() as f64 / lags.len() as f64;
    let written = round * (256 << 10);
    println!(
        "FIGURE replication lag at site B under {:.1} MiB/s of flushed writes for {:.1} s: max {max_lag} ms, mean {mean_lag:.0} ms over {} samples",
        written as f64 / MIB as f64 / started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
        lags.len()
    );
    assert!(
        max_lag < 5_000,
        "site B fell {max_lag} ms behind the agent under steady load"
    );

    // Every sampled moment older than B's newest durable time restores at B exactly.
    for (at, expected) in &moments {
        harness::wait_durable(&b.url(), "load", at);
        let out = dir.path().join("restored-at-b.img");
        let _ = std::fs::remove_file(&out);
        restore_at(&b.url(), "load", Some(at), &out);
        harness::assert_same_image(&out, expected, &format!("restore at site B at {at}"));
    }
    harness::wait_durable(&b.url(), "load", &harness::now_rfc3339());
    let latest = dir.path().join("latest-at-b.img");
    restore_at(&b.url(), "load", None, &latest);
    harness::assert_same_image(&latest, &reference, "latest restore at site B");
    let status = harness::tideline(&b.url(), &["status"]);
    assert!(status.success(), "{status}");
    println!("{}", status.stdout);
    let volumes = harness::tideline(&b.url(), &["volumes"]);
    assert!(volumes.stdout.contains("replica"), "{volumes}");
}

#[test]
fn a_drill_at_b_while_a_replicates_succeeds_and_replication_keeps_going() {
    if !harness::require_tools(&["qemu-img"]) {
        return;
    }
    // `tideline drill` at B, its check comparing the restored image with the reference, while
    // A keeps replicating to B.
    const SIZE: u64 = 32 * MIB;
    let dir = tempdir();
    let (a, b) = two_sites(dir.path(), false);
    let volume_path = dir.path().join("drill.img");
    harness::sparse_file(&volume_path, SIZE);
    let agent = Agent::start(dir.path(), &a.url(), AgentSpec::one("drill", &volume_path));
    b.wait_complete("drill");
    let reference = dir.path().join("reference.img");
    let mut writer = Writer::new(&agent, "drill", &reference, SIZE);
    writer.write(0, &harness::random_bytes(1, 8 * MIB as usize));
    writer.flush();
    let at = harness::now_rfc3339();
    let expected = copy_of(&reference, "expected.img");
    harness::wait_durable(&b.url(), "drill", &at);

    // Keep writing while the drill restores at B.
    let report = dir.path().join("drill.md");
    let check = format!(
        "qemu-img compare -q -f raw -F raw {{image:drill}} {}",
        expected.display()
    );
    let args: Vec<String> = [
        "drill", "--group", "drill", "--at", &at, "--check", &check, "--report",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([report.display().to_string()])
    .collect();
    let b_url = b.url();
    let drill = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        harness::tideline(&b_url, &args)
    });
    let before = durable_seq(&b, "drill");
    for i in 0..20u64 {
        writer.write((8 + i) * MIB, &harness::random_bytes(100 + i, MIB as usize));
        writer.flush();
    }
    let output = drill.join().unwrap();
    assert!(output.success(), "drill at B: {output}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["passed"], true, "{json}");
    assert_eq!(json["checks"][0]["passed"], true, "{json}");
    let caught_up = wait_caught_up(&a, &b, "drill");
    assert!(
        caught_up > before,
        "replication did not progress during the drill"
    );
    harness::wait_durable(&b.url(), "drill", &harness::now_rfc3339());
    let latest = dir.path().join("latest.img");
    restore_at(&b.url(), "drill", None, &latest);
    harness::assert_same_image(&latest, &reference, "latest at B after the drill");
    println!("FIGURE drill at site B restored 8 MiB while replication advanced from seq {before} to {caught_up}");
}

#[test]
fn kill9_of_either_site_mid_stream_then_every_record_arrives_once() {
    if !harness::require_tools(&["qemu-img", "nbdcopy"]) {
        return;
    }
    const SIZE: u64 = 128 * MIB;
    let dir = tempdir();
    let (mut a, mut b) = two_sites(dir.path(), false);
    let volume_path = dir.path().join("crash.img");
    harness::sparse_file(&volume_path, SIZE);
    let agent = Agent::start(dir.path(), &a.url(), AgentSpec::one("crash", &volume_path));
    b.wait_complete("crash");
    let source = dir.path().join("source.img");
    harness::random_file(&source, SIZE, 5000);
    let copy = harness::spawn(
        std::process::Command::new(harness::tool("nbdcopy"))
            .arg("--flush")
            .arg(&source)
            .arg(agent.uri("crash")),
    );

    // 1. kill -9 of B once it holds part of the data.
    let at_b = harness::wait_for("B to hold 16 MiB", STARTUP_TIMEOUT, || {
        let s = b.stats();
        (s.unique_chunk_bytes >= 16 * MIB).then_some(s.unique_chunk_bytes)
    });
    b.kill9();
    println!(
        "FIGURE killed B holding {} MiB of {} MiB",
        at_b / MIB,
        SIZE / MIB
    );
    assert!(
        at_b < SIZE,
        "B held everything before it was killed: not mid-stream"
    );
    harness::wait_for("A to get ahead", STARTUP_TIMEOUT, || {
        (a.stats().unique_chunk_bytes >= at_b + 16 * MIB).then_some(())
    });
    b.restart();

    // 2. kill -9 of A while B is behind it.
    let (at_a, at_b) = harness::wait_for("B to resume", STARTUP_TIMEOUT, || {
        let (sa, sb) = (a.stats(), b.stats());
        (sb.unique_chunk_bytes > at_b && sb.unique_chunk_bytes < sa.unique_chunk_bytes)
            .then_some((sa.unique_chunk_bytes, sb.unique_chunk_bytes))
    });
    a.kill9();
    println!(
        "FIGURE killed A holding {} MiB while B held {} MiB",
        at_a / MIB,
        at_b / MIB
    );
    a.restart();
    harness::wait_ok(copy, "nbdcopy");
    harness::wait_durable(&a.url(), "crash", &harness::now_rfc3339());
    let seq = wait_caught_up(&a, &b, "crash");

    // Exactly once: the same records (seq and agent time of every flush point), the same
    // chunks, the same image.
    assert_eq!(a.points("crash"), b.points("crash"), "flush points differ");
    assert_eq!(
        a.stats().chunk_count,
        b.stats().chunk_count,
        "chunk counts differ"
    );
    let restored = dir.path().join("restored.img");
    restore_at(&b.url(), "crash", None, &restored);
    harness::assert_same_image(&restored, &source, "latest at B after both crashes");
    println!("FIGURE after kill -9 of B and of A: B holds seqs 1..={seq}, identical to A");
}

#[test]
fn two_volumes_with_the_same_data_cross_the_link_once() {
    if !harness::require_tools(&["qemu-img"]) {
        return;
    }
    const SIZE: u64 = 32 * MIB;
    const DATA: usize = 16 * MIB as usize;
    let dir = tempdir();
    let (a, b) = two_sites(dir.path(), false);
    let (p1, p2) = (dir.path().join("twin1.img"), dir.path().join("twin2.img"));
    harness::sparse_file(&p1, SIZE);
    harness::sparse_file(&p2, SIZE);
    let spec = AgentSpec {
        volumes: vec![("twin1".into(), p1), ("twin2".into(), p2)],
        ..AgentSpec::default()
    };
    let agent = Agent::start(dir.path(), &a.url(), spec);
    b.wait_complete("twin1");
    b.wait_complete("twin2");
    let data = harness::random_bytes(42, DATA);
    let mut one = agent.nbd("twin1");
    let mut two = agent.nbd("twin2");
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        one.write(i as u64 * MIB, piece, false).unwrap();
        two.write(i as u64 * MIB, piece, false).unwrap();
    }
    one.flush().unwrap();
    two.flush().unwrap();
    harness::wait_durable(&a.url(), "twin1", &harness::now_rfc3339());
    harness::wait_durable(&a.url(), "twin2", &harness::now_rfc3339());
    wait_caught_up(&a, &b, "twin1");
    wait_caught_up(&a, &b, "twin2");
    let status = a.status();
    let sent: u64 = status
        .groups
        .iter()
        .flat_map(|g| &g.replicas)
        .map(|r| r.bytes_sent)
        .sum();
    let chunks: u64 = status
        .groups
        .iter()
        .flat_map(|g| &g.replicas)
        .map(|r| r.chunks_sent)
        .sum();
    println!(
        "FIGURE bytes A->B for two volumes each holding the same {} MiB: {sent} bytes ({:.2} x one volume), {chunks} chunks",
        DATA as u64 / MIB,
        sent as f64 / DATA as f64
    );
    assert_eq!(chunks, DATA as u64 / 4096, "a chunk crossed more than once");
    assert!(
        (sent as f64) < 1.25 * DATA as f64,
        "{sent} bytes crossed for {DATA} bytes of data held twice"
    );
    for name in ["twin1", "twin2"] {
        let out = dir.path().join(format!("{name}-at-b.img"));
        restore_at(&b.url(), name, None, &out);
        let reference = dir.path().join(format!("{name}-ref.img"));
        harness::sparse_file(&reference, SIZE);
        File::options()
            .write(true)
            .open(&reference)
            .unwrap()
            .write_all_at(&data, 0)
            .unwrap();
        harness::assert_same_image(&out, &reference, name);
    }
}

/// Parses "shipped N bytes" from failback's summary line.
fn shipped_bytes(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("failback of group"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.split("shipped ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {line:?}"))
}

/// Sites A and B, and site A's host: an agent protecting volume `db` (group `app`) with A as
/// its collector, complete at B.
struct SiteAHost {
    dir: tempfile::TempDir,
    a: Collector,
    b: Collector,
    /// The host's directory: its volume `db.img`, spool and socket.
    host: PathBuf,
    volume: PathBuf,
    spec: AgentSpec,
    agent: Agent,
}

impl SiteAHost {
    fn start(size: u64, mutual: bool, spool_max_bytes: Option<u64>) -> SiteAHost {
        let dir = tempdir();
        let (a, b) = two_sites(dir.path(), mutual);
        let host = dir.path().join("site-a");
        std::fs::create_dir_all(&host).unwrap();
        let volume = host.join("db.img");
        harness::sparse_file(&volume, size);
        let spec = AgentSpec {
            volumes: vec![("db".into(), volume.clone())],
            groups: vec!["app=db".into()],
            spool_max_bytes,
            ..AgentSpec::default()
        };
        let agent = Agent::start(&host, &a.url(), spec.clone());
        b.wait_complete("db");
        SiteAHost {
            dir,
            a,
            b,
            host,
            volume,
            spec,
            agent,
        }
    }

    /// With A's collector dead: `failover --latest` at B, then the agent, stopped, starts
    /// again with its spool and B as its collector. B's durable seq at the failover, and the
    /// agent.
    fn fail_over_and_move_the_agent(&mut self) -> (u64, Agent) {
        self.b.restart();
        let output = harness::tideline(&self.b.url(), &["failover", "--group", "app", "--latest"]);
        assert!(output.success(), "failover: {output}");
        let seq_at_failover = durable_seq(&self.b, "app");
        assert!(
            self.agent.terminate().success(),
            "agent stopped for the move"
        );
        let moved = Agent::start(&self.host, &self.b.url(), self.spec.clone());
        (seq_at_failover, moved)
    }
}

#[test]
fn failover_at_b_fences_a_and_failback_ships_only_changed_blocks() {
    if !harness::require_tools(&["qemu-img"]) {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let SiteAHost {
        dir,
        mut a,
        mut b,
        host: site_a,
        volume: volume_a,
        spec,
        agent: mut agent_a,
    } = SiteAHost::start(SIZE, true, None);

    // Rounds 1 and 2 reach both sites.
    let reference = dir.path().join("reference.img");
    let mut writer = Writer::new(&agent_a, "db", &reference, SIZE);
    writer.write(0, &harness::random_bytes(1, 16 * MIB as usize));
    writer.flush();
    writer.write(20 * MIB, &harness::random_bytes(2, 4 * MIB as usize));
    writer.flush();
    harness::wait_durable(&a.url(), "db", &harness::now_rfc3339());
    wait_caught_up(&a, &b, "app");
    let at_b = copy_of(&reference, "reference-at-b.img");

    // Round 3 reaches A only (B is down), then site A is lost.
    b.kill9();
    writer.write(4 * MIB, &harness::random_bytes(3, MIB as usize));
    writer.flush();
    let last_ack = tideline_core::TimeNs::now();
    harness::wait_durable(&a.url(), "db", &harness::now_rfc3339());
    drop(writer);
    agent_a.kill9();
    a.kill9();
    b.restart();

    // Failover at B with A dead: the volumes equal the reference at B's newest durable time.
    let b_through = b.group_status("app").unwrap().durable_through_ns;
    let failover_dir = dir.path().join("site-b");
    let output = harness::tideline(
        &b.url(),
        &[
            "failover",
            "--group",
            "app",
            "--latest",
            "--out-dir",
            failover_dir.to_str().unwrap(),
        ],
    );
    assert!(output.success(), "failover: {output}");
    println!("{}", output.stdout);
    let failed_over = failover_dir.join("db.img");
    harness::assert_same_image(&failed_over, &at_b, "failed-over volume at B");
    println!(
        "FIGURE data-loss window of the failover: {:.3} s (last write acknowledged at A minus B's newest durable time)",
        (last_ack.0 - b_through) as f64 / 1e9
    );
    let status_b = b.group_status("app").unwrap();
    assert_eq!((status_b.role.as_str(), status_b.epoch), ("primary", 2));
    let seq_at_failover = status_b.durable_seq;

    // A and its agent come back: both are fenced, and nothing from them reaches B.
    a.restart();
    harness::wait_for(
        "A to learn it no longer holds group app",
        STARTUP_TIMEOUT,
        || {
            let g = a.group_status("app")?;
            (g.role != "primary").then_some(())
        },
    );
    let mut agent_a = Agent::spawn_only(&site_a, &a.url(), spec);
    let exit = agent_a.wait_exit(STARTUP_TIMEOUT);
    let log = agent_a.log_text();
    assert_eq!(
        exit.code(),
        Some(3),
        "fenced agent's exit status; log:\n{log}"
    );
    assert!(
        log.contains("FENCED") && log.contains("group app") && log.contains("epoch 2"),
        "the agent's log does not say clearly that group app is fenced at epoch 2:\n{log}"
    );
    println!(
        "FIGURE fenced agent at A exited with status 3: {}",
        log.lines()
            .find(|l| l.contains("FENCED"))
            .unwrap_or_default()
    );
    assert_eq!(
        durable_seq(&b, "app"),
        seq_at_failover,
        "something from A reached B"
    );
    assert!(
        a.log_text().contains("fenced"),
        "site A's log does not say it is fenced"
    );

    // Reverse protection: an agent at B protects the failed-over volume with B as collector;
    // B replicates the group back to A.
    let site_b_agent = dir.path().join("site-b-agent");
    std::fs::create_dir_all(&site_b_agent).unwrap();
    let spec_b = AgentSpec {
        volumes: vec![("db".into(), failed_over.clone())],
        groups: vec!["app=db".into()],
        ..AgentSpec::default()
    };
    let mut agent_b = Agent::start(&site_b_agent, &b.url(), spec_b);
    b.wait_complete("db");
    let mut nbd = agent_b.nbd("db");
    let changed_at_b = 2 * MIB;
    nbd.write(30 * MIB, &harness::random_bytes(4, MIB as usize), false)
        .unwrap();
    nbd.write(50 * MIB, &harness::random_bytes(5, MIB as usize), false)
        .unwrap();
    nbd.flush().unwrap();
    drop(nbd);
    // A checkpoint through the new agent, whose spool numbers its records from 1 while the
    // group's journal continues after the fork: the answer is the journal's seq.
    let checkpoint = harness::tideline(
        &b.url(),
        &["checkpoint", "--group", "app", "--name", "at-b"],
    );
    assert!(checkpoint.success(), "checkpoint at B: {checkpoint}");
    let listed = harness::tideline(
        &b.url(),
        &["points", "--group", "app", "--checkpoints", "--json"],
    );
    assert!(listed.success(), "{listed}");
    let listing: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let seq = listing["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "at-b")
        .unwrap_or_else(|| panic!("at-b not listed: {listing}"))["seq"]
        .as_u64()
        .unwrap();
    assert!(
        checkpoint.stdout.contains(&format!("(seq {seq})")),
        "checkpoint answered another seq than the journal's {seq}: {checkpoint}"
    );
    harness::wait_durable(&b.url(), "db", &harness::now_rfc3339());
    wait_caught_up(&b, &a, "app");
    agent_b.kill9();
    let status_a = a.group_status("app").unwrap();
    assert_eq!(status_a.role, "replica", "A after joining B's timeline");
    assert!(status_a.abandoned_records > 0, "A set nothing aside");

    let reverse = b
        .group_status("app")
        .unwrap()
        .replicas
        .first()
        .map_or(0, |r| r.bytes_sent);

    // Failback: only the blocks that differ travel into A's own volume.
    let output = harness::tideline(
        &a.url(),
        &[
            "failback",
            "--group",
            "app",
            "--from",
            &b.url(),
            "--volume-dir",
            site_a.to_str().unwrap(),
        ],
    );
    assert!(output.success(), "failback: {output}");
    println!("{}", output.stdout);
    let shipped = shipped_bytes(&output.stdout);
    let rolled_back = MIB; // round 3, written at A after the fork
    let changed = changed_at_b + rolled_back;
    println!(
        "FIGURE failback shipped {shipped} bytes for {changed} changed bytes ({changed_at_b} written at B, {rolled_back} rolled back at A); reverse replication B->A sent {reverse} bytes; volume size {SIZE}"
    );
    assert!(
        shipped >= changed_at_b,
        "failback shipped less than what changed"
    );
    assert!(
        shipped <= 3 * changed,
        "failback shipped {shipped} bytes for {changed} changed"
    );
    assert!(reverse > 0, "no reverse replication was measured");
    assert!(
        reverse <= 3 * changed,
        "reverse replication sent {reverse} bytes for {changed} changed"
    );

    harness::assert_same_image(&volume_a, &failed_over, "A's volume after failback");
    let latest_a = dir.path().join("latest-at-a.img");
    restore_at(&a.url(), "db", None, &latest_a);
    harness::assert_same_image(&latest_a, &failed_over, "latest at A after failback");
    let status_a = a.group_status("app").unwrap();
    assert_eq!((status_a.role.as_str(), status_a.epoch), ("primary", 3));
    harness::wait_for("B to follow A at epoch 3", STARTUP_TIMEOUT, || {
        let g = b.group_status("app")?;
        (g.role == "replica" && g.epoch == 3).then_some(())
    });
}

/// Site A's collector is lost but the hosts survive: after `failover` at B, the agent, pointed
/// at B, continues the group's journal from its spool. Writes that reached only A, and writes
/// made while no collector answered, arrive at B; each moment restores exactly, and no
/// succession (with its resync and gap in the restorable window) happens.
#[test]
fn a_failover_with_the_hosts_alive_continues_the_agents_journal_at_b() {
    const SIZE: u64 = 32 * MIB;
    let mut site = SiteAHost::start(SIZE, false, None);
    let (url_a, url_b) = (site.a.url(), site.b.url());

    // Round 1 reaches both sites; round 2 only A (B is down); round 3 no collector at all.
    let reference = site.dir.path().join("reference.img");
    let mut writer = Writer::new(&site.agent, "db", &reference, SIZE);
    writer.write(0, &harness::random_bytes(11, 8 * MIB as usize));
    writer.flush();
    harness::wait_durable(&url_a, "db", &harness::now_rfc3339());
    wait_caught_up(&site.a, &site.b, "app");
    site.b.kill9();
    writer.write(10 * MIB, &harness::random_bytes(12, MIB as usize));
    writer.flush();
    let after_round_2 = harness::now_rfc3339();
    harness::wait_durable(&url_a, "db", &after_round_2);
    let at_round_2 = copy_of(&reference, "at-round-2.img");
    site.a.kill9();
    writer.write(4 * MIB, &harness::random_bytes(13, MIB as usize));
    writer.flush();
    drop(writer);

    let (seq_at_failover, agent_at_b) = site.fail_over_and_move_the_agent();
    harness::wait_durable(&url_b, "db", &harness::now_rfc3339());
    let log = agent_at_b.log_text();
    assert!(
        !log.contains("successor") && !log.contains("lost records"),
        "the agent started a successor spool at B:\n{log}"
    );
    let status = site.b.group_status("app").unwrap();
    assert_eq!((status.role.as_str(), status.epoch), ("primary", 2));
    assert!(
        status.durable_seq > seq_at_failover,
        "nothing after the failover point arrived at B ({} ≤ {seq_at_failover})",
        status.durable_seq
    );
    let latest = site.dir.path().join("latest-at-b.img");
    restore_at(&url_b, "db", None, &latest);
    harness::assert_same_image(&latest, &reference, "latest at B");
    let round_2 = site.dir.path().join("round-2-at-b.img");
    restore_at(&url_b, "db", Some(&after_round_2), &round_2);
    harness::assert_same_image(&round_2, &at_round_2, "B at the moment only A had held");
}

/// The first seq of the oldest segment in a group's spool directory (segments are named after
/// their first seq).
fn oldest_spool_seq(group_spool: &Path) -> u64 {
    std::fs::read_dir(group_spool)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.extension()? == "seg").then(|| stem.parse::<u64>().ok())?
        })
        .min()
        .expect("a spool segment")
}

/// As above, but the agent's spool has already freed records only site A held: the agent
/// pointed at B cannot resend them, says so, journals a gap and a whole resync, and continues
/// as a successor spool that B accepts. Moments before the gap stay restorable, and the latest
/// image at B is the volume.
#[test]
fn a_failover_to_a_site_behind_the_freed_spool_continues_after_a_gap_and_resync() {
    const SIZE: u64 = 32 * MIB;
    // The smallest spool, of 4 MiB segments, so acknowledged records are freed while the test
    // writes.
    let mut site = SiteAHost::start(SIZE, false, Some(16 * MIB));
    let (url_a, url_b) = (site.a.url(), site.b.url());

    let reference = site.dir.path().join("reference.img");
    let mut writer = Writer::new(&site.agent, "db", &reference, SIZE);
    writer.write(0, &harness::random_bytes(21, 2 * MIB as usize));
    writer.flush();
    let after_round_1 = harness::now_rfc3339();
    harness::wait_durable(&url_a, "db", &after_round_1);
    let seq_at_b = wait_caught_up(&site.a, &site.b, "app");
    let at_round_1 = copy_of(&reference, "at-round-1.img");
    site.b.kill9();
    // Written half a KiB off the block grid, so the records carry their data (aligned writes
    // of 64 KiB or more leave it on the volume) and the segments fill.
    for i in 0..8u64 {
        writer.write(
            (4 + i) * MIB + 512,
            &harness::random_bytes(22 + i, MIB as usize),
        );
        writer.flush();
        harness::wait_durable(&url_a, "db", &harness::now_rfc3339());
    }
    // The spool's seqs are the journal's here (one spool since the start).
    let group_spool = site.agent.spool_dir.join("app");
    harness::wait_for(
        "the spool to free records only site A acknowledged",
        STARTUP_TIMEOUT,
        || (oldest_spool_seq(&group_spool) > seq_at_b + 1).then_some(()),
    );
    site.a.kill9();
    writer.write(16 * MIB, &harness::random_bytes(31, MIB as usize));
    writer.flush();
    drop(writer);

    let (seq_at_failover, agent_at_b) = site.fail_over_and_move_the_agent();
    // The agent journals the gap before B accepts its spool as a successor; once B holds
    // everything up to a moment after that, `complete` can only mean the resync is done (the
    // volume was complete at B before the gap arrived, so waiting for `complete` alone could
    // end before it).
    harness::wait_for(
        "B to accept the agent's spool as a successor",
        STARTUP_TIMEOUT,
        || {
            let log = agent_at_b.log_text();
            log.contains("accepted this spool as the successor")
                .then_some(())
        },
    );
    harness::wait_durable(&url_b, "db", &harness::now_rfc3339());
    harness::wait_for(
        "B to hold the agent's gap and resync",
        STARTUP_TIMEOUT,
        || {
            let v = site.b.volume("db")?;
            (durable_seq(&site.b, "app") > seq_at_failover && v.complete).then_some(())
        },
    );
    harness::wait_durable(&url_b, "db", &harness::now_rfc3339());
    let log = agent_at_b.log_text();
    assert!(
        log.contains("but this agent's spool starts at")
            && log.contains("before a failover")
            && log.contains("accepted this spool as the successor"),
        "the agent's log does not tell the loss and the succession:\n{log}"
    );
    let latest = site.dir.path().join("latest-at-b.img");
    restore_at(&url_b, "db", None, &latest);
    harness::assert_same_image(&latest, &reference, "latest at B after the resync");
    let round_1 = site.dir.path().join("round-1-at-b.img");
    restore_at(&url_b, "db", Some(&after_round_1), &round_1);
    harness::assert_same_image(&round_1, &at_round_1, "B before the gap");
}
