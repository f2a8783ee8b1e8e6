//! fio jobs and the figures read from its JSON output.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::sys;

/// Where fio sends its I/O.
#[derive(Debug, Clone)]
pub enum Target {
    /// An NBD URI, through fio's nbd ioengine (libnbd).
    Nbd(String),
    /// A block device or a plain file, with libaio and O_DIRECT.
    Device(String),
}

/// One fio job.
#[derive(Debug, Clone)]
pub struct Job {
    pub rw: &'static str,
    pub block_bytes: u64,
    pub iodepth: u32,
    /// Bytes of the target the job covers, from offset 0.
    pub region_bytes: u64,
    /// Run for this long (looping over the region); None: cover the region once.
    pub seconds: Option<u64>,
    /// Bytes per second, if limited.
    pub rate: Option<u64>,
    /// Fill every buffer afresh, half compressible, so no block repeats.
    pub fresh_compressible_data: bool,
}

impl Job {
    pub fn new(rw: &'static str, block_bytes: u64, iodepth: u32, region_bytes: u64) -> Job {
        Job {
            rw,
            block_bytes,
            iodepth,
            region_bytes,
            seconds: None,
            rate: None,
            fresh_compressible_data: false,
        }
    }

    pub fn seconds(mut self, seconds: u64) -> Job {
        self.seconds = Some(seconds);
        self
    }
}

/// What fio measured for the job's direction (read or write).
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub iops: f64,
    pub mb_per_s: f64,
    pub p99_latency_us: f64,
    /// Bytes the disk holding the work directory wrote while fio ran, per byte fio moved (NaN
    /// where the work directory has no block device).
    pub disk_bytes_per_io_byte: f64,
}

/// Runs `job` against `target`, with its JSON output written into `work`.
pub fn run(job: &Job, target: &Target, work: &Path) -> anyhow::Result<Outcome> {
    let output = work.join(format!("fio-{}-{}.json", job.rw, job.block_bytes));
    let mut command = Command::new("fio");
    command
        .arg("--name=bench")
        .arg("--output-format=json")
        .arg(format!("--output={}", output.display()))
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.block_bytes))
        .arg(format!("--iodepth={}", job.iodepth))
        .arg(format!("--size={}", job.region_bytes))
        .arg("--randrepeat=0");
    match target {
        Target::Nbd(uri) => command.arg("--ioengine=nbd").arg(format!("--uri={uri}")),
        Target::Device(dev) => command
            .args(["--ioengine=libaio", "--direct=1"])
            .arg(format!("--filename={dev}")),
    };
    if job.rw.contains("write") {
        command.arg("--end_fsync=1");
    }
    if let Some(seconds) = job.seconds {
        command.args(["--time_based", &format!("--runtime={seconds}")]);
    }
    if let Some(rate) = job.rate {
        command.arg(format!("--rate={rate}"));
    }
    if job.fresh_compressible_data {
        command.args(["--refill_buffers=1", "--buffer_compress_percentage=50"]);
    }
    let limit = Duration::from_secs(job.seconds.unwrap_or(0) + 900);
    let disk_before = sys::device_written_bytes(work);
    sys::run(&mut command, limit)?;
    let disk_after = sys::device_written_bytes(work);
    let text = std::fs::read_to_string(&output)?;
    let (mut outcome, io_bytes) = parse(&text, job.rw.contains("read"))
        .with_context(|| format!("parse {}", output.display()))?;
    if let (Some(before), Some(after)) = (disk_before, disk_after) {
        outcome.disk_bytes_per_io_byte = (after - before) as f64 / io_bytes;
    }
    Ok(outcome)
}

/// fio's figures, and the bytes it moved.
fn parse(text: &str, read: bool) -> anyhow::Result<(Outcome, f64)> {
    // fio may print warnings before the JSON document.
    let start = text.find('{').context("no JSON in fio output")?;
    let doc: Value = serde_json::from_str(&text[start..])?;
    let side = &doc["jobs"][0][if read { "read" } else { "write" }];
    let number = |v: &Value| v.as_f64().context("missing figure in fio output");
    let p99_ns = side["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let outcome = Outcome {
        iops: number(&side["iops"])?,
        mb_per_s: number(&side["bw_bytes"])? / 1e6,
        p99_latency_us: p99_ns / 1e3,
        disk_bytes_per_io_byte: f64::NAN,
    };
    Ok((outcome, number(&side["io_bytes"])?))
}
