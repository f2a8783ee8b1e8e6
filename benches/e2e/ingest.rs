//! Ingest: new data written through the agent's NBD export (nbdcopy, which skips holes and
//! zero blocks) until all of it is durable at the collector, for an ext4 image of system files
//! and for random data. Throughput is data bytes (the source's non-hole bytes) over the time
//! from the first write to durability; CPU is utime + stime of agent and collector over the
//! same span, and the disk's written bytes are read from the block device's counters over it:
//! each data byte reaches the disk in the volume, in a pack (compressed) and, when the shipper
//! falls behind, in the spool too, so on a slow disk this figure, not the CPU, sets the pace.
//!
//! The source is read into the page cache before each run, so that every run's client costs
//! the same and the figure is the agent's and collector's: read from this machine's disk,
//! `nbdcopy` of the ext4 image took 4.7 s of system CPU instead of 0.55 and competed with the
//! agent for the disk (by hand: durable after 10.8-11.3 s instead of 9.2).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::data;
use crate::procs::{now_ns, Agent, Collector, Grpc};
use crate::report::{Goal, Row};
use crate::sys;
use crate::Settings;

const MIB: f64 = (1u64 << 20) as f64;

/// One ingest run's figures.
struct Sample {
    mb_per_s: f64,
    cpu_s_per_gb: f64,
    agent_rss_mib: f64,
    collector_rss_mib: f64,
    /// Bytes the disk wrote from the first write to durability, per data byte (NaN where the
    /// work directory has no block device).
    disk_bytes_per_data_byte: f64,
    /// The same bytes over the same time.
    disk_mb_per_s: f64,
}

/// One run of `source`, which holds `data_bytes` of data.
fn run_once(s: &Settings, source: &Path, data_bytes: u64) -> anyhow::Result<Sample> {
    let work = sys::fresh_dir(&s.work.join("ingest"))?;
    let volume = work.join("volume.img");
    let size = std::fs::metadata(source)?.len();
    std::fs::File::create(&volume)?.set_len(size)?;
    std::io::copy(&mut std::fs::File::open(source)?, &mut std::io::sink())?;
    let collector = Collector::start(&s.bin_dir, &work)?;
    let agent = Agent::start(s, &work, &collector, &volume, None)?;
    let mut grpc = Grpc::connect(&collector.url)?;
    let cpu_before = agent.proc.usage()?.cpu_seconds + collector.proc.usage()?.cpu_seconds;
    let disk_before = sys::device_written_bytes(&work);
    let started = Instant::now();
    sys::run(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(source)
            .arg(agent.uri()),
        Duration::from_secs(3600),
    )?;
    grpc.wait_durable(&agent.volume, now_ns())?;
    let seconds = started.elapsed().as_secs_f64();
    let disk_bytes = match (disk_before, sys::device_written_bytes(&work)) {
        (Some(before), Some(after)) => (after - before) as f64,
        _ => f64::NAN,
    };
    let (a, c) = (agent.proc.usage()?, collector.proc.usage()?);
    let cpu = a.cpu_seconds + c.cpu_seconds - cpu_before;
    Ok(Sample {
        mb_per_s: data_bytes as f64 / 1e6 / seconds,
        cpu_s_per_gb: cpu / (data_bytes as f64 / 1e9),
        agent_rss_mib: a.peak_rss_bytes as f64 / MIB,
        collector_rss_mib: c.peak_rss_bytes as f64 / MIB,
        disk_bytes_per_data_byte: disk_bytes / data_bytes as f64,
        disk_mb_per_s: disk_bytes / 1e6 / seconds,
    })
}

fn rows_for(
    s: &Settings,
    label: &str,
    source: &Path,
    goal: Option<f64>,
) -> anyhow::Result<Vec<Row>> {
    let mut samples = Vec::new();
    // Counted once: counting drops the source's cached pages, which each run reads back.
    let data_bytes = data::data_bytes(source)?;
    for run in 0..s.runs {
        eprintln!("ingest ({label}): run {}/{}", run + 1, s.runs);
        samples.push(run_once(s, source, data_bytes)?);
    }
    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let data_mb = data_bytes as f64 / 1e6;
    let mut throughput = Row::new(
        "ingest",
        &format!("{label}: NBD write to durable at collector"),
        "MB/s",
        &col(|x| x.mb_per_s),
    )
    .note(format!("{data_mb:.0} MB of data"));
    if let Some(goal) = goal {
        throughput = throughput.goal(Goal::AtLeast(goal));
    }
    Ok(vec![
        throughput,
        Row::new(
            "ingest",
            &format!("{label}: CPU of agent + collector"),
            "s/GB",
            &col(|x| x.cpu_s_per_gb),
        ),
        Row::new(
            "ingest",
            &format!("{label}: bytes the disk wrote per data byte (volume, spool, packs)"),
            "×",
            &col(|x| x.disk_bytes_per_data_byte),
        ),
        Row::new(
            "ingest",
            &format!("{label}: the disk's write rate meanwhile"),
            "MB/s",
            &col(|x| x.disk_mb_per_s),
        )
        .note("compare the ceiling's fio rows"),
        Row::new(
            "memory",
            &format!("agent peak RSS, ingest {label}"),
            "MiB",
            &col(|x| x.agent_rss_mib),
        )
        .goal(Goal::AtMost(256.0)),
        Row::new(
            "memory",
            &format!("collector peak RSS, ingest {label}"),
            "MiB",
            &col(|x| x.collector_rss_mib),
        ),
    ])
}

pub fn rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let ext4 = data::ext4_image(&s.cache, s.history_volume_bytes, crate::EXT4_FILL)?;
    let random = data::random_file(&s.cache, s.random_bytes)?;
    let mut rows = rows_for(s, "ext4 of system files", &ext4, Some(400.0))?;
    rows.extend(rows_for(s, "random data", &random, None)?);
    Ok(rows)
}
