//! The hash + compress ceiling of this machine, from the criterion hot-path benchmarks run on
//! the realistic image's data (`TIDELINE_BENCH_SAMPLE`).
//!
//! Criterion's own statistics give one figure per benchmark (the median time per iteration);
//! the ceilings are derived from them: one core hashing then compressing every byte is
//! `1 / (1/hash + 1/compress)`; all cores multiply that. The whole pipeline also decompresses
//! and re-hashes every byte at the collector (it verifies every block), so its ceiling is
//! `cores / (1/hash + 1/compress + 1/open)`.
//!
//! The disk's own speed is measured too, with fio on a plain file beside the other scenarios'
//! files: the tap, ingest and restore figures are bounded by it as much as by the CPU, and the
//! disk of a shared host can be several times faster one day than the next.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::fio::{self, Job, Target};
use crate::report::Row;
use crate::sys;
use crate::{Settings, KIB, MIB};

/// (criterion group, benchmark) pairs read back.
const HASH: (&str, &str) = ("block", "blake3_4k_blocks_side_by_side");
const COMPRESS: (&str, &str) = ("frame", "compress_1mib_default_level");
const OPEN: (&str, &str) = ("frame", "open_1mib_decompress_verify");

/// MB/s of one criterion benchmark: its throughput bytes over its median time.
fn rate(criterion_dir: &Path, (group, bench): (&str, &str)) -> anyhow::Result<f64> {
    let dir = criterion_dir.join(group).join(bench).join("new");
    let read = |name: &str| -> anyhow::Result<Value> {
        let path = dir.join(name);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let ns = read("estimates.json")?["median"]["point_estimate"]
        .as_f64()
        .context("median in estimates.json")?;
    let bytes = read("benchmark.json")?["throughput"]["Bytes"]
        .as_f64()
        .context("throughput bytes in benchmark.json")?;
    Ok(bytes / ns * 1e3)
}

pub fn rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut rows = cpu_rows(s)?;
    rows.extend(disk_rows(s)?);
    Ok(rows)
}

/// fio straight to a plain file with `O_DIRECT`, no Tideline and no peer in the way.
fn disk_rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let work = sys::fresh_dir(&s.work.join("disk"))?;
    let target = Target::Device(work.join("plain.img").display().to_string());
    let region = s.tap_region_bytes;
    let seconds = s.tap_seconds.min(10);
    let (mut seq_write, mut rand_write, mut seq_read) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..s.runs {
        seq_write.push(fio::run(&Job::new("write", MIB, 16, region), &target, &work)?.mb_per_s);
        let random = Job::new("randwrite", 4 * KIB, 16, region).seconds(seconds);
        rand_write.push(fio::run(&random, &target, &work)?.iops);
        seq_read.push(fio::run(&Job::new("read", MIB, 16, region), &target, &work)?.mb_per_s);
    }
    std::fs::remove_dir_all(&work)?;
    let note = "fio, libaio, O_DIRECT on a plain file";
    Ok(vec![
        Row::new(
            "ceiling",
            "disk: 1 MiB sequential write QD16",
            "MB/s",
            &seq_write,
        )
        .note(note),
        Row::new(
            "ceiling",
            "disk: 4 KiB random write QD16",
            "IOPS",
            &rand_write,
        )
        .note(note),
        Row::new(
            "ceiling",
            "disk: 1 MiB sequential read QD16",
            "MB/s",
            &seq_read,
        )
        .note(note),
    ])
}

/// The CPU's ceilings, from criterion's figures.
fn cpu_rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let sample = crate::data::ext4_image(&s.cache, s.history_volume_bytes, crate::EXT4_FILL)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&s.root)
        .args(["bench", "--bench", "hot_paths", "--", "--noplot"])
        .env("TIDELINE_BENCH_SAMPLE", &sample);
    if s.quick {
        command.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    command.arg("^(block|frame)/");
    sys::run(&mut command, Duration::from_secs(3600))?;
    let dir = s.root.join("target").join("criterion");
    let (hash, compress, open) = (rate(&dir, HASH)?, rate(&dir, COMPRESS)?, rate(&dir, OPEN)?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let one_core = 1.0 / (1.0 / hash + 1.0 / compress);
    let pipeline = cores / (1.0 / hash + 1.0 / compress + 1.0 / open);
    let note = "criterion median on the ext4 image's data";
    Ok(vec![
        Row::new("ceiling", "blake3 of 4 KiB blocks, sixteen side by side, one core", "MB/s", &[hash]).note(note),
        Row::new("ceiling", "zstd compress 1 MiB frames (level -1), one core", "MB/s", &[compress]).note(note),
        Row::new("ceiling", "zstd decompress + blake3 verify 1 MiB frames, one core", "MB/s", &[open]).note(note),
        Row::new("ceiling", "hash + compress, one core", "MB/s", &[one_core]),
        Row::new("ceiling", &format!("hash + compress, {cores} cores"), "MB/s", &[one_core * cores]),
        Row::new("ceiling", &format!("whole pipeline (agent hash + compress, collector decompress + verify), {cores} cores"), "MB/s", &[pipeline]),
    ])
}
