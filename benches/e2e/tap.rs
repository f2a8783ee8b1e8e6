//! Tap overhead: fio through the agent's NBD export (journalling to a live collector) against
//! qemu-nbd serving the same kind of file; and the agent's FUSE file under a loop device
//! against a loop device on a plain file.
//!
//! Each run starts from fresh sparse files and fresh processes. Per server the jobs run in one
//! order: a 1 MiB sequential write covering the region once (so the reads later find data),
//! 4 KiB random writes, 4 KiB random reads; write jobs end with an fsync (NBD FLUSH), which is
//! counted. Tideline and its peer alternate within a run.
//!
//! Each job starts with nothing of the one before still in flight, as the peer's do: after a
//! job, the collector is let catch up with it before the next starts, and how long that took
//! after fio finished is reported beside the job (the writes the tap let through faster than
//! the collector, on the same disk, could take them). Without that wait, the random writes
//! would be measured while the sequential pass's backlog is shipped and the blocks they
//! overwrite are saved first.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::fio::{self, Job, Target};
use crate::procs::{now_ns, Agent, Collector, Grpc, QemuNbd};
use crate::report::{Goal, Row};
use crate::sys::{self, ProcUsage};
use crate::{Settings, KIB, MIB};

/// Figures of one server in one run: job label -> (IOPS, MB/s, p99 µs).
type Figures = BTreeMap<&'static str, fio::Outcome>;

/// Per job, seconds from fio's end until the collector held every write of it.
type Backlogs = BTreeMap<&'static str, f64>;

fn jobs(s: &Settings) -> Vec<(&'static str, Job)> {
    let region = s.tap_region_bytes;
    vec![
        ("seqwrite", Job::new("write", MIB, 16, region)),
        (
            "randwrite",
            Job::new("randwrite", 4 * KIB, 16, region).seconds(s.tap_seconds),
        ),
        (
            "randread",
            Job::new("randread", 4 * KIB, 16, region).seconds(s.tap_seconds),
        ),
    ]
}

fn run_jobs(s: &Settings, target: &Target, work: &Path) -> anyhow::Result<Figures> {
    let mut figures = Figures::new();
    for (label, job) in jobs(s) {
        figures.insert(label, fio::run(&job, target, work)?);
    }
    Ok(figures)
}

/// [`run_jobs`] through the agent, the collector let catch up after each job.
fn run_jobs_settled(
    s: &Settings,
    target: &Target,
    work: &Path,
    collector: &Collector,
    agent: &Agent,
) -> anyhow::Result<(Figures, Backlogs)> {
    let mut grpc = Grpc::connect(&collector.url)?;
    let (mut figures, mut backlogs) = (Figures::new(), Backlogs::new());
    for (label, job) in jobs(s) {
        figures.insert(label, fio::run(&job, target, work)?);
        let done = Instant::now();
        grpc.wait_durable(&agent.volume, now_ns())?;
        backlogs.insert(label, done.elapsed().as_secs_f64());
    }
    Ok((figures, backlogs))
}

fn sparse(path: &Path, len: u64) -> anyhow::Result<()> {
    std::fs::File::create(path)?.set_len(len)?;
    Ok(())
}

/// One run through NBD: Tideline's figures, its processes' usage, qemu-nbd's figures, and
/// Tideline's backlogs.
fn nbd_run(s: &Settings) -> anyhow::Result<(Figures, [ProcUsage; 2], Figures, Backlogs)> {
    let work = sys::fresh_dir(&s.work.join("tap"))?;
    let volume = work.join("volume.img");
    sparse(&volume, s.tap_volume_bytes)?;
    let collector = Collector::start(&s.bin_dir, &work)?;
    let agent = Agent::start(s, &work, &collector, &volume, None)?;
    let (ours, backlogs) =
        run_jobs_settled(s, &Target::Nbd(agent.uri()), &work, &collector, &agent)?;
    let usage = [agent.proc.usage()?, collector.proc.usage()?];
    drop(agent);
    drop(collector);

    let plain = work.join("plain.img");
    sparse(&plain, s.tap_volume_bytes)?;
    let qemu = QemuNbd::start(&work, &plain)?;
    let theirs = run_jobs(s, &Target::Nbd(qemu.uri()), &work)?;
    Ok((ours, usage, theirs, backlogs))
}

/// Rows for the NBD comparison, plus the agent's and collector's peak memory.
pub fn nbd(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut runs = Vec::new();
    for run in 0..s.runs {
        eprintln!("tap (NBD): run {}/{}", run + 1, s.runs);
        runs.push(nbd_run(s)?);
    }
    let pick = |ours: bool, label: &str, f: fn(&fio::Outcome) -> f64| -> Vec<f64> {
        runs.iter()
            .map(|r| f(&(if ours { &r.0 } else { &r.2 })[label]))
            .collect()
    };
    let (ours, theirs) = (true, false);
    let peer = "qemu-nbd --cache=none --aio=threads";
    let iops = |o: &fio::Outcome| o.iops;
    let mbs = |o: &fio::Outcome| o.mb_per_s;
    let p99 = |o: &fio::Outcome| o.p99_latency_us;
    let mut rows = vec![
        Row::new(
            "tap NBD",
            "4 KiB random write QD16",
            "IOPS",
            &pick(ours, "randwrite", iops),
        )
        .peer(peer, &pick(theirs, "randwrite", iops))
        .goal(Goal::RatioAtLeast(1.0)),
        Row::new(
            "tap NBD",
            "4 KiB random write QD16 p99 latency",
            "µs",
            &pick(ours, "randwrite", p99),
        )
        .peer(peer, &pick(theirs, "randwrite", p99)),
        Row::new(
            "tap NBD",
            "1 MiB sequential write QD16",
            "MB/s",
            &pick(ours, "seqwrite", mbs),
        )
        .peer(peer, &pick(theirs, "seqwrite", mbs))
        .goal(Goal::RatioAtLeast(1.0)),
        Row::new(
            "tap NBD",
            "1 MiB sequential write QD16: bytes the disk wrote per byte written (volume, spool, packs)",
            "×",
            &pick(ours, "seqwrite", |o| o.disk_bytes_per_io_byte),
        )
        .peer(peer, &pick(theirs, "seqwrite", |o| o.disk_bytes_per_io_byte))
        .note("while fio ran, its final fsync included; the collector shares the disk"),
        backlog_row("tap NBD", &runs.iter().map(|r| &r.3).collect::<Vec<_>>(), "seqwrite"),
        backlog_row("tap NBD", &runs.iter().map(|r| &r.3).collect::<Vec<_>>(), "randwrite"),
        Row::new(
            "tap NBD",
            "4 KiB random read QD16",
            "IOPS",
            &pick(ours, "randread", iops),
        )
        .peer(peer, &pick(theirs, "randread", iops)),
        Row::new(
            "tap NBD",
            "4 KiB random read QD16 p99 latency",
            "µs",
            &pick(ours, "randread", p99),
        )
        .peer(peer, &pick(theirs, "randread", p99)),
    ];
    let rss = |i: usize| -> Vec<f64> {
        runs.iter()
            .map(|r| r.1[i].peak_rss_bytes as f64 / MIB as f64)
            .collect()
    };
    rows.push(
        Row::new(
            "memory",
            "agent peak RSS during the NBD tap runs",
            "MiB",
            &rss(0),
        )
        .goal(Goal::AtMost(256.0)),
    );
    rows.push(Row::new(
        "memory",
        "collector peak RSS during the NBD tap runs",
        "MiB",
        &rss(1),
    ));
    Ok(rows)
}

/// How long after job `label` ended the collector held all of it.
fn backlog_row(section: &str, runs: &[&Backlogs], label: &str) -> Row {
    let job = match label {
        "seqwrite" => "1 MiB sequential write QD16",
        _ => "4 KiB random write QD16",
    };
    let seconds: Vec<f64> = runs.iter().map(|b| b[label]).collect();
    Row::new(
        section,
        &format!("{job}: from fio's end until the collector held every write"),
        "s",
        &seconds,
    )
    .note("the next job starts after it; the collector shares the disk")
}

/// A loop device over `file` with direct I/O; detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> anyhow::Result<Loop> {
        let out = sys::run(
            Command::new(sys::tool_path("losetup").unwrap_or_else(|| "losetup".into()))
                .args(["--find", "--show", "--direct-io=on"])
                .arg(file),
            Duration::from_secs(60),
        )?;
        Ok(Loop(out.trim().to_owned()))
    }

    /// Whether the kernel really does direct I/O on the backing file.
    fn direct_io(&self) -> String {
        let out = Command::new(sys::tool_path("losetup").unwrap_or_else(|| "losetup".into()))
            .args(["-n", "-O", "DIO", "-l", &self.0])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(sys::tool_path("losetup").unwrap_or_else(|| "losetup".into()))
            .args(["-d", &self.0])
            .status();
    }
}

fn fuse_run(s: &Settings) -> anyhow::Result<(Figures, Figures, String, Backlogs)> {
    let work = sys::fresh_dir(&s.work.join("fuse"))?;
    let volume = work.join("volume.img");
    sparse(&volume, s.tap_volume_bytes)?;
    let fuse_file = work.join("fuse-export");
    let collector = Collector::start(&s.bin_dir, &work)?;
    let agent = Agent::start(s, &work, &collector, &volume, Some(&fuse_file))?;
    let device = Loop::attach(&fuse_file)?;
    let dio = device.direct_io();
    let target = Target::Device(device.0.clone());
    let (ours, backlogs) = run_jobs_settled(s, &target, &work, &collector, &agent)?;
    drop(device);
    drop(agent);
    drop(collector);

    let plain = work.join("plain.img");
    sparse(&plain, s.tap_volume_bytes)?;
    let device = Loop::attach(&plain)?;
    let theirs = run_jobs(s, &Target::Device(device.0.clone()), &work)?;
    Ok((ours, theirs, dio, backlogs))
}

/// Rows for FUSE + loop against loop on a plain file (needs root and /dev/fuse).
pub fn fuse(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut runs = Vec::new();
    for run in 0..s.runs {
        eprintln!("tap (FUSE + loop): run {}/{}", run + 1, s.runs);
        runs.push(fuse_run(s)?);
    }
    let col = |ours: bool, label: &str, f: fn(&fio::Outcome) -> f64| -> Vec<f64> {
        runs.iter()
            .map(|r| f(&(if ours { &r.0 } else { &r.1 })[label]))
            .collect()
    };
    let dio = runs.first().map(|r| r.2.clone()).unwrap_or_default();
    let note = format!("loop DIO on the FUSE file: {dio}");
    let peer = "loop on a plain file";
    Ok(vec![
        Row::new(
            "tap FUSE",
            "4 KiB random write QD16",
            "IOPS",
            &col(true, "randwrite", |o| o.iops),
        )
        .peer(peer, &col(false, "randwrite", |o| o.iops))
        .note(note),
        Row::new(
            "tap FUSE",
            "4 KiB random write QD16 p99 latency",
            "µs",
            &col(true, "randwrite", |o| o.p99_latency_us),
        )
        .peer(peer, &col(false, "randwrite", |o| o.p99_latency_us)),
        Row::new(
            "tap FUSE",
            "1 MiB sequential write QD16",
            "MB/s",
            &col(true, "seqwrite", |o| o.mb_per_s),
        )
        .peer(peer, &col(false, "seqwrite", |o| o.mb_per_s)),
        backlog_row(
            "tap FUSE",
            &runs.iter().map(|r| &r.3).collect::<Vec<_>>(),
            "seqwrite",
        ),
        backlog_row(
            "tap FUSE",
            &runs.iter().map(|r| &r.3).collect::<Vec<_>>(),
            "randwrite",
        ),
        Row::new(
            "tap FUSE",
            "4 KiB random read QD16",
            "IOPS",
            &col(true, "randread", |o| o.iops),
        )
        .peer(peer, &col(false, "randread", |o| o.iops)),
    ])
}
