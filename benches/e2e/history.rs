//! A volume with a history, restored at a moment in the middle, against restic and borg
//! holding the same versions: restore speed, stored bytes, and allocation of the restored image.
//!
//! Per run: a fresh sparse volume behind a fresh agent and collector; version 0 is the ext4
//! image of system files written through NBD (nbdcopy); each further version rewrites 5 % of
//! the volume in 256 KiB runs of slightly edited blocks inside its data, then flushes. After
//! every version the moment is noted once it is durable, and restic (`backup`, compression
//! auto = zstd) and borg (`create --compression zstd,1 --chunker-params fixed,4194304
//! --sparse`, what borg's documentation recommends for images) store the volume file.
//!
//! The middle version is then restored by each tool into a fresh file, with the page cache
//! dropped before and the output fsynced inside the timing: `tideline restore --at T`,
//! `restic restore`, `borg extract --sparse`; then, with the agent and collector stopped,
//! `tideline restore --store DIR --at T`, which reads the store directory itself as restic
//! and borg read their repositories. Each restored image is compared byte for byte with a copy
//! of the volume taken at that moment. MB/s is the volume's size over the time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tideline_agent::nbd::NbdClient;

use crate::data;
use crate::procs::{now_ns, Agent, Collector, Grpc};
use crate::report::{Goal, Row};
use crate::sys::{self, ProcUsage};
use crate::Settings;

const MIB: f64 = (1u64 << 20) as f64;
const LONG: Duration = Duration::from_secs(3600);

/// restic with a repository, password and cache inside the run's work directory.
fn restic(work: &Path) -> Command {
    let mut command = Command::new("restic");
    command
        .env("RESTIC_REPOSITORY", work.join("restic-repo"))
        .env("RESTIC_PASSWORD", "tideline-bench")
        .env("RESTIC_CACHE_DIR", work.join("restic-cache"))
        .arg("--quiet");
    command
}

/// borg with its base directory (cache, keys) inside the run's work directory.
fn borg(work: &Path) -> Command {
    let mut command = Command::new("borg");
    command
        .env("BORG_BASE_DIR", work.join("borg-base"))
        .env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
        .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
    command
}

fn borg_repo(work: &Path) -> PathBuf {
    work.join("borg-repo")
}

/// Stores the volume file as version `k` in both peers; returns restic's snapshot id.
fn peer_backup(work: &Path, volume: &Path, k: usize) -> anyhow::Result<String> {
    let out = sys::run(
        restic(work)
            .args(["backup", "--json", "--force", "--host", "bench"])
            .arg(volume),
        LONG,
    )?;
    let snapshot = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["snapshot_id"].as_str().map(str::to_owned))
        .context("restic backup printed no snapshot id")?;
    sys::run(
        borg(work)
            .args([
                "create",
                "--compression",
                "zstd,1",
                "--chunker-params",
                "fixed,4194304",
                "--sparse",
            ])
            .arg(format!("{}::v{k}", borg_repo(work).display()))
            .arg(volume),
        LONG,
    )?;
    Ok(snapshot)
}

/// Rewrites `total` bytes of the volume through NBD and flushes.
fn rewrite_round(agent: &Agent, volume: &Path, total: u64, seed: u64) -> anyhow::Result<()> {
    let writes = data::rewrites(volume, total, 256 * 1024, seed)?;
    let mut nbd = NbdClient::connect_unix(&agent.socket, &agent.volume)?;
    for (offset, bytes) in &writes {
        nbd.write(*offset, bytes, false)?;
    }
    nbd.flush()?;
    nbd.disconnect()?;
    Ok(())
}

/// Figures of one run.
struct Sample {
    /// Tideline through the collector, restic, borg, Tideline from the store directory.
    restore_mb_s: [f64; 4],
    stored_bytes: [f64; 3],
    allocated_bytes: [f64; 3],
    source_allocated: f64,
    usage: [ProcUsage; 2],
}

fn rfc3339(ns: i64) -> anyhow::Result<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))?;
    Ok(t.format(&time::format_description::well_known::Rfc3339)?)
}

/// Times `command` plus an fsync of what it wrote under `output`, from a cold page cache.
fn timed_restore(command: &mut Command, output: &Path) -> anyhow::Result<f64> {
    sys::drop_caches();
    let started = Instant::now();
    sys::run(command, LONG)?;
    sys::sync_tree(output)?;
    Ok(started.elapsed().as_secs_f64())
}

fn build_history(
    s: &Settings,
    work: &Path,
    agent: &Agent,
    grpc: &mut Grpc,
    volume: &Path,
) -> anyhow::Result<(Vec<(i64, String)>, u64)> {
    let image = data::ext4_image(&s.cache, s.history_volume_bytes, crate::EXT4_FILL)?;
    let mid = s.history_rounds / 2;
    let mut versions = Vec::new();
    let mut source_allocated = 0;
    for k in 0..=s.history_rounds {
        eprintln!("  version {k}");
        if k == 0 {
            sys::run(
                Command::new("nbdcopy")
                    .arg("--flush")
                    .arg(&image)
                    .arg(agent.uri()),
                LONG,
            )?;
        } else {
            let total = (s.history_volume_bytes as f64 * s.rewrite_fraction) as u64;
            rewrite_round(agent, volume, total, k as u64)?;
        }
        let moment = now_ns();
        grpc.wait_durable(&agent.volume, moment)?;
        let snapshot = peer_backup(work, volume, k)?;
        if k == mid {
            source_allocated = sys::allocated_bytes(volume)?;
            sys::run(
                Command::new("cp")
                    .arg("--sparse=always")
                    .arg(volume)
                    .arg(work.join("reference.img")),
                LONG,
            )?;
        }
        versions.push((moment, snapshot));
    }
    Ok((versions, source_allocated))
}

fn run_once(s: &Settings) -> anyhow::Result<Sample> {
    let work = sys::fresh_dir(&s.work.join("history"))?;
    let volume = work.join("volume.img");
    std::fs::File::create(&volume)?.set_len(s.history_volume_bytes)?;
    let mut collector = Collector::start(&s.bin_dir, &work)?;
    let mut agent = Agent::start(s, &work, &collector, &volume, None)?;
    let mut grpc = Grpc::connect(&collector.url)?;
    sys::run(
        restic(&work).args(["init", "--repository-version", "2"]),
        LONG,
    )?;
    sys::run(
        borg(&work)
            .args(["init", "-e", "none"])
            .arg(borg_repo(&work)),
        LONG,
    )?;
    let (versions, source_allocated) = build_history(s, &work, &agent, &mut grpc, &volume)?;
    let mid = s.history_rounds / 2;
    let (moment, snapshot) = &versions[mid];
    let reference = work.join("reference.img");

    let at = rfc3339(*moment)?;
    let name = agent.volume.clone();
    let restore_at = |out: &Path| {
        let mut command = Command::new(s.bin_dir.join("tideline"));
        command
            .args(["restore", "--volume", &name, "--at", &at, "--out"])
            .arg(out);
        command
    };
    let ours = work.join("restored-tideline.img");
    let ours_s = timed_restore(
        restore_at(&ours).arg("--collector").arg(&collector.url),
        &ours,
    )?;
    let restic_dir = sys::fresh_dir(&work.join("restored-restic"))?;
    let restic_s = timed_restore(
        restic(&work)
            .args(["restore", snapshot, "--target"])
            .arg(&restic_dir),
        &restic_dir,
    )?;
    let borg_dir = sys::fresh_dir(&work.join("restored-borg"))?;
    let borg_s = timed_restore(
        borg(&work)
            .current_dir(&borg_dir)
            .args(["extract", "--sparse"])
            .arg(format!("{}::v{mid}", borg_repo(&work).display())),
        &borg_dir,
    )?;
    let usage = [agent.proc.usage()?, collector.proc.usage()?];
    agent.proc.stop();
    collector.proc.stop();
    let from_store = work.join("restored-tideline-store.img");
    let from_store_s = timed_restore(
        restore_at(&from_store)
            .arg("--store")
            .arg(&collector.data_dir),
        &from_store,
    )?;
    let relative = volume.strip_prefix("/").unwrap_or(&volume);
    let images = [
        ours.clone(),
        restic_dir.join(relative),
        borg_dir.join(relative),
        from_store,
    ];
    for image in &images {
        if !sys::same_content(image, &reference)? {
            bail!("{} differs from the volume at that moment", image.display());
        }
    }
    let size = s.history_volume_bytes as f64 / 1e6;
    Ok(Sample {
        restore_mb_s: [
            size / ours_s,
            size / restic_s,
            size / borg_s,
            size / from_store_s,
        ],
        stored_bytes: [
            sys::tree_bytes(&collector.data_dir)? as f64,
            sys::tree_bytes(&work.join("restic-repo"))? as f64,
            sys::tree_bytes(&borg_repo(&work))? as f64,
        ],
        allocated_bytes: [
            sys::allocated_bytes(&images[0])? as f64,
            sys::allocated_bytes(&images[1])? as f64,
            sys::allocated_bytes(&images[2])? as f64,
        ],
        source_allocated: source_allocated as f64,
        usage,
    })
}

pub fn rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut samples = Vec::new();
    for run in 0..s.runs {
        eprintln!("history, restore, space: run {}/{}", run + 1, s.runs);
        samples.push(run_once(s)?);
    }
    let col = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let gib = s.history_volume_bytes as f64 / (1u64 << 30) as f64;
    let what = format!(
        "{gib} GiB volume, {} versions, {:.0} % rewritten per version",
        s.history_rounds + 1,
        s.rewrite_fraction * 100.0
    );
    let mib = |i: usize| move |x: &Sample| x.stored_bytes[i] / MIB;
    let alloc = |i: usize| move |x: &Sample| x.allocated_bytes[i] / MIB;
    let source = col(&|x| x.source_allocated / MIB);
    Ok(vec![
        Row::new(
            "restore",
            "middle moment to a file",
            "MB/s",
            &col(&|x| x.restore_mb_s[0]),
        )
        .peer("restic restore", &col(&|x| x.restore_mb_s[1]))
        .goal(Goal::RatioAtLeast(2.0))
        .goal(Goal::AtLeast(1000.0))
        .note(what.clone()),
        Row::new(
            "restore",
            "middle moment to a file",
            "MB/s",
            &col(&|x| x.restore_mb_s[0]),
        )
        .peer("borg extract --sparse", &col(&|x| x.restore_mb_s[2])),
        Row::new(
            "restore",
            "middle moment to a file, read from the store directory (collector stopped)",
            "MB/s",
            &col(&|x| x.restore_mb_s[3]),
        )
        .peer("restic restore", &col(&|x| x.restore_mb_s[1]))
        .goal(Goal::RatioAtLeast(2.0))
        .goal(Goal::AtLeast(1000.0)),
        Row::new(
            "space",
            "bytes stored for the history",
            "MiB",
            &col(&mib(0)),
        )
        .peer("restic (zstd auto)", &col(&mib(1)))
        .goal(Goal::RatioAtMost(1.0))
        .note(what),
        Row::new(
            "space",
            "bytes stored for the history",
            "MiB",
            &col(&mib(0)),
        )
        .peer("borg (zstd,1, fixed 4 MiB)", &col(&mib(2))),
        Row::new(
            "thin",
            "allocation of Tideline's restored image",
            "MiB",
            &col(&alloc(0)),
        )
        .peer("source volume at that moment", &source)
        .goal(Goal::RatioAtMost(1.01)),
        Row::new(
            "thin",
            "allocation of restic's restored image",
            "MiB",
            &col(&alloc(1)),
        )
        .peer("source volume at that moment", &source),
        Row::new(
            "thin",
            "allocation of borg's restored image",
            "MiB",
            &col(&alloc(2)),
        )
        .peer("source volume at that moment", &source),
        Row::new(
            "memory",
            "agent peak RSS, history",
            "MiB",
            &col(&|x| x.usage[0].peak_rss_bytes as f64 / MIB),
        )
        .goal(Goal::AtMost(256.0)),
        Row::new(
            "memory",
            "collector peak RSS, history and restore",
            "MiB",
            &col(&|x| x.usage[1].peak_rss_bytes as f64 / MIB),
        ),
    ])
}
