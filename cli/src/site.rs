//! The second site from the operator's side: `status`, `failover` and `failback`.
//!
//! A failover is one RPC at the site that takes over (it raises the group's epoch there, which
//! fences the other site) followed by an ordinary group restore at the new fork point. A
//! failback is a handover at the site that holds the group (it waits until the home site has
//! everything, then steps down), a take-over at the home site at exactly that seq and epoch, and
//! a delta restore into the home site's own volumes: only blocks whose content differs between
//! what those volumes held when the home site was fenced and the group's latest point travel.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use tideline_proto::v1::{self, restore_message::Msg};
use tokio::task::block_in_place;

use crate::{catalog, human_bytes, restore, timefmt};

fn lag_text(ms: u64, through_ns: i64) -> String {
    if through_ns <= 0 {
        "-".into()
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

pub async fn status(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = catalog(url).await?;
    let status = client
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
        .into_inner();
    if json {
        let groups: Vec<_> = status
            .groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "group": g.group, "volumes": g.volumes, "role": g.role, "epoch": g.epoch,
                    "fenced_by": (g.fenced_by > 0).then_some(g.fenced_by),
                    "durable_seq": g.durable_seq, "durable_through_ns": g.durable_through_ns,
                    "durable_through": (g.durable_through_ns > 0).then(|| timefmt::format(g.durable_through_ns)),
                    "lag_ms": g.lag_ms,
                    "abandoned_records": g.abandoned_records, "fork_seq": g.fork_seq,
                    "replicas": g.replicas.iter().map(|r| serde_json::json!({
                        "site": r.site, "url": r.url, "connected": r.connected,
                        "durable_seq": r.durable_seq, "durable_through_ns": r.durable_through_ns,
                        "lag_ms": r.lag_ms, "bytes_sent": r.bytes_sent,
                        "chunk_bytes_sent": r.chunk_bytes_sent, "chunks_sent": r.chunks_sent,
                        "records_sent": r.records_sent,
                        "last_error": (!r.last_error.is_empty()).then_some(&r.last_error),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "site": status.site, "replicate_to": (!status.replicate_to.is_empty()).then_some(&status.replicate_to),
            "groups": groups,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "site {}{}",
        status.site,
        if status.replicate_to.is_empty() {
            String::new()
        } else {
            format!(", replicating primary groups to {}", status.replicate_to)
        }
    );
    println!(
        "{:<16} {:<8} {:<8} {:>6} {:>10}  {:<31} {:>9}",
        "GROUP", "SITE", "ROLE", "EPOCH", "SEQ", "DURABLE THROUGH", "LAG"
    );
    for g in &status.groups {
        let through = |ns: i64| {
            if ns > 0 {
                timefmt::format(ns)
            } else {
                "-".into()
            }
        };
        let role = if g.fenced_by > 0 {
            format!("fenced({})", g.fenced_by)
        } else {
            g.role.clone()
        };
        println!(
            "{:<16} {:<8} {:<8} {:>6} {:>10}  {:<31} {:>9}",
            g.group,
            status.site,
            role,
            g.epoch,
            g.durable_seq,
            through(g.durable_through_ns),
            lag_text(g.lag_ms, g.durable_through_ns)
        );
        for r in &g.replicas {
            let site = if r.site.is_empty() { "?" } else { &r.site };
            println!(
                "{:<16} {:<8} {:<8} {:>6} {:>10}  {:<31} {:>9}  {} sent{}",
                "",
                site,
                if r.connected { "replica" } else { "offline" },
                "",
                r.durable_seq,
                through(r.durable_through_ns),
                lag_text(r.lag_ms, r.durable_through_ns),
                human_bytes(r.bytes_sent),
                if r.last_error.is_empty() {
                    String::new()
                } else {
                    format!("; {}", r.last_error)
                }
            );
        }
        if g.abandoned_records > 0 {
            println!(
                "{:<16} set aside {} records after seq {} when it joined the other site's timeline",
                "", g.abandoned_records, g.fork_seq
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn failover(
    url: &str,
    group: &str,
    point: v1::failover_request::Point,
    out_dir: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = catalog(url).await?;
    let before = client
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
        .into_inner();
    let held = before.groups.iter().find(|g| g.group == group);
    let response = client
        .failover(v1::FailoverRequest {
            group: group.to_owned(),
            point: Some(point),
            epoch: 0,
        })
        .await
        .map_err(|s| anyhow::anyhow!("failover of group {group}: {}", s.message()))?
        .into_inner();
    println!(
        "site {} is now primary for group {group} at epoch {}; the journal continues after seq {} ({})",
        before.site,
        response.epoch,
        response.seq,
        timefmt::format(response.time_ns)
    );
    if response.dropped_records > 0 {
        println!(
            "{} newer records held here were set aside (the failover point is older than the newest)",
            response.dropped_records
        );
    }
    if let Some(held) = held {
        let now = timefmt::now_ns();
        let through = held.durable_through_ns.max(response.time_ns);
        println!(
            "this site held group {group} durable through {}: anything the old primary acknowledged after that is lost; data-loss window at most {:.3} s before now",
            timefmt::format(through),
            (now - through).max(0) as f64 / 1e9
        );
    }
    println!("the other site is fenced for group {group}: its agents are refused from now on");
    if let Some(dir) = out_dir {
        let reports = restore::run(
            client.into(),
            restore::Target::Group(group.to_owned()),
            v1::restore_request::Point::AtSeq(response.seq),
            None,
            Some(dir),
            force,
        )
        .await?;
        for report in reports {
            println!("{report}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where each volume of the group lives at the home site.
pub struct VolumePaths {
    pub explicit: Vec<(String, PathBuf)>,
    pub dir: Option<PathBuf>,
}

impl VolumePaths {
    fn path(&self, volume: &str) -> anyhow::Result<PathBuf> {
        if let Some((_, path)) = self.explicit.iter().find(|(v, _)| v == volume) {
            return Ok(path.clone());
        }
        match &self.dir {
            Some(dir) => Ok(dir.join(format!("{volume}.img"))),
            None => bail!(
                "no path for volume {volume}: give --volume {volume}=PATH or --volume-dir DIR"
            ),
        }
    }
}

pub async fn failback(
    home_url: &str,
    from_url: &str,
    group: &str,
    volumes: VolumePaths,
    timeout_s: f64,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut home = catalog(home_url).await?;
    let mut away = catalog(from_url).await?;
    let home_status = home
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("status of {home_url}: {}", s.message()))?
        .into_inner();
    let Some(held) = home_status.groups.iter().find(|g| g.group == group) else {
        bail!(
            "site {} ({home_url}) does not hold group {group}",
            home_status.site
        );
    };
    if held.role == "primary" {
        bail!(
            "site {} is already primary for group {group} (epoch {}); nothing to fail back",
            home_status.site,
            held.epoch
        );
    }
    // Resolve every output before changing anything.
    let away_status = away
        .status(v1::StatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("status of {from_url}: {}", s.message()))?
        .into_inner();
    let away_group = away_status.groups.iter().find(|g| g.group == group);
    let reverse_bytes = away_group
        .and_then(|g| g.replicas.first())
        .map_or(0, |r| r.bytes_sent);
    let paths: Vec<(String, PathBuf)> = held
        .volumes
        .iter()
        .map(|v| volumes.path(v).map(|p| (v.clone(), p)))
        .collect::<anyhow::Result<_>>()?;
    for (volume, path) in &paths {
        if !path.exists() {
            bail!(
                "{} (volume {volume} at the home site) does not exist; failback writes only the blocks that differ into the home site's own copy",
                path.display()
            );
        }
    }

    let handed = away
        .handover(v1::HandoverRequest {
            group: group.to_owned(),
            timeout_ms: (timeout_s.max(0.0) * 1000.0) as u64,
        })
        .await
        .map_err(|s| anyhow::anyhow!("hand group {group} over at {from_url}: {}", s.message()))?
        .into_inner();
    println!(
        "site {} handed group {group} over after seq {} (epoch {})",
        away_status.site, handed.seq, handed.epoch
    );
    let taken = home
        .failover(v1::FailoverRequest {
            group: group.to_owned(),
            point: Some(v1::failover_request::Point::AtSeq(handed.seq)),
            epoch: handed.epoch,
        })
        .await
        .map_err(|s| anyhow::anyhow!("take group {group} over at {home_url}: {}", s.message()))?
        .into_inner();
    println!(
        "site {} is primary for group {group} again at epoch {}",
        home_status.site, taken.epoch
    );

    let mut shipped = 0u64;
    let mut changed_blocks = 0u64;
    for (volume, path) in &paths {
        let report = apply_delta(home.clone(), volume, path, taken.seq).await?;
        println!(
            "volume {volume}: {} blocks differed ({}); shipped {} bytes of data, zeroed {} bytes, into {}",
            report.changed_blocks,
            human_bytes(report.changed_blocks * 4096),
            report.data_bytes,
            report.zero_bytes,
            path.display()
        );
        shipped += report.data_bytes;
        changed_blocks += report.changed_blocks;
    }
    let after = away
        .status(v1::StatusRequest {})
        .await
        .ok()
        .map(|r| r.into_inner());
    let reverse_after = after
        .as_ref()
        .and_then(|s| s.groups.iter().find(|g| g.group == group))
        .and_then(|g| g.replicas.first())
        .map_or(reverse_bytes, |r| r.bytes_sent);
    println!(
        "failback of group {group}: shipped {shipped} bytes for {changed_blocks} changed blocks ({} changed bytes); replication from {} to {} had sent {reverse_after} bytes; {:.2} s",
        changed_blocks * 4096,
        away_status.site,
        home_status.site,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

struct DeltaReport {
    changed_blocks: u64,
    data_bytes: u64,
    zero_bytes: u64,
}

/// Writes the blocks of `volume` that differ between what the home site held when it was
/// fenced and seq `seq` into `path`, then fsyncs it.
async fn apply_delta(
    mut client: crate::CatalogClient,
    volume: &str,
    path: &Path,
    seq: u64,
) -> anyhow::Result<DeltaReport> {
    let mut stream = client
        .restore_delta(v1::RestoreDeltaRequest {
            volume: volume.to_owned(),
            base: Some(v1::restore_delta_request::Base::BaseAbandoned(true)),
            point: Some(v1::restore_delta_request::Point::AtSeq(seq)),
        })
        .await
        .map_err(|s| anyhow::anyhow!("delta of {volume}: {}", s.message()))?
        .into_inner()
        .into();
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let header = crate::restore::read_header(&mut stream, &format!("delta of {volume}")).await?;
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    if len != header.size_bytes {
        bail!(
            "{} is {len} bytes but volume {volume} has {} bytes",
            path.display(),
            header.size_bytes
        );
    }
    let mut report = DeltaReport {
        changed_blocks: header.changed_blocks,
        data_bytes: 0,
        zero_bytes: 0,
    };
    loop {
        match stream.message().await {
            Ok(Some(v1::RestoreMessage {
                msg: Some(Msg::Extent(e)),
            })) => {
                let data_len = e.data.len() as u64;
                let end = e.offset_bytes.checked_add(data_len.max(e.zero_len_bytes));
                if end.is_none_or(|end| end > header.size_bytes) {
                    bail!("collector sent an extent past the end of volume {volume}");
                }
                // The disk may make these wait: block_in_place lets the runtime move the
                // stream's other tasks off this worker meanwhile.
                if data_len > 0 {
                    block_in_place(|| file.write_all_at(&e.data, e.offset_bytes)).with_context(
                        || format!("write {} at {}", path.display(), e.offset_bytes),
                    )?;
                    report.data_bytes += data_len;
                } else if e.zero_len_bytes > 0 {
                    block_in_place(|| zero_range(&file, e.offset_bytes, e.zero_len_bytes))
                        .with_context(|| {
                            format!("zero {} at {}", path.display(), e.offset_bytes)
                        })?;
                    report.zero_bytes += e.zero_len_bytes;
                }
            }
            Ok(Some(_)) => bail!("unexpected message in delta stream"),
            Ok(None) => break,
            Err(s) => bail!("delta of {volume} failed: {}", s.message()),
        }
    }
    block_in_place(|| file.sync_all()).with_context(|| format!("fsync {}", path.display()))?;
    Ok(report)
}

/// Makes a range read as zeroes: a hole punched in a file (or, where that is refused, zeroes
/// written).
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor that stays open for the call; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeroes = vec![0u8; len.min(4 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
