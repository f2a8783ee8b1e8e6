//! `tideline demo`: the whole pipeline in one process, verified.
//!
//! Starts a collector (gRPC on a loopback port) and an agent (NBD on a Unix socket) in a
//! temporary directory, writes through the real NBD protocol at several moments while keeping a
//! reference copy in memory, restores every moment over gRPC, and checks each restored image
//! byte for byte. Exits 0 only if every restore verified.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use tideline_agent::config::{AgentConfig, GroupSpec, VolumeSpec};
use tideline_agent::nbd::NbdClient;
use tideline_core::{GroupName, TimeNs, VolumeName};
use tideline_proto::v1;
use tokio::sync::oneshot;

use crate::{restore, timefmt, CatalogClient};

const VOLUME_BYTES: u64 = 64 << 20;
const VOLUME: &str = "demo";

/// One moment of the demo: what was done, when, and what the volume held afterwards.
struct Moment {
    what: &'static str,
    time_ns: i64,
    image_hash: blake3::Hash,
}

pub async fn run() -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir().context("create temporary directory")?;
    println!("tideline demo in {}", dir.path().display());
    let (collector_url, stop_collector, collector) = start_collector(dir.path()).await?;
    let (stop_agent, agent, socket) = start_agent(dir.path(), &collector_url).await?;
    println!(
        "  collector at {collector_url}, agent serving NBD export {VOLUME:?} on {}",
        socket.display()
    );

    let moments = tokio::task::spawn_blocking(move || write_moments(&socket))
        .await
        .context("writer task")??;
    let client = crate::catalog(&collector_url).await?;
    let outcome = verify(client, &moments, dir.path()).await;

    let _ = stop_agent.send(());
    let _ = stop_collector.send(());
    agent.await.context("agent task")??;
    collector.await.context("collector task")??;
    match outcome {
        Ok(()) => {
            println!("demo passed: every restored moment matched the reference byte for byte");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("demo FAILED: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

type Task = tokio::task::JoinHandle<anyhow::Result<()>>;

async fn start_collector(dir: &Path) -> anyhow::Result<(String, oneshot::Sender<()>, Task)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let config = tideline_collector::config::CollectorConfig::new(dir.join("collector"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(tideline_collector::run(config, listener, async {
        let _ = stopped.await;
    }));
    Ok((url, stop, task))
}

async fn start_agent(
    dir: &Path,
    collector_url: &str,
) -> anyhow::Result<(oneshot::Sender<()>, Task, std::path::PathBuf)> {
    let volume_path = dir.join("demo.img");
    std::fs::File::create(&volume_path)?.set_len(VOLUME_BYTES)?;
    let socket = dir.join("nbd.sock");
    let name = VolumeName::new(VOLUME)?;
    let config = AgentConfig {
        groups: vec![GroupSpec {
            name: GroupName::new(VOLUME)?,
            volumes: vec![VolumeSpec {
                name,
                path: volume_path,
                fuse: None,
            }],
        }],
        nbd_unix: Some(socket.clone()),
        nbd_tcp: None,
        spool_dir: dir.join("spool"),
        spool_max_bytes: 1 << 30,
        max_lag: Some(tideline_agent::config::DEFAULT_MAX_LAG),
        zstd_level: tideline_core::frame::DEFAULT_ZSTD_LEVEL,
        collector_url: collector_url.to_owned(),
        agent_id: "demo".into(),
        hooks: Default::default(),
    };
    let listeners = tideline_agent::Listeners::bind(&config).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(tideline_agent::run(config, listeners, async {
        let _ = stopped.await;
    }));
    Ok((stop, task, socket))
}

/// Text-like data that compresses and deduplicates the way files do.
fn realistic(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "block",
        "journal",
        "tideline",
        "volume",
        "restore",
        "collector",
        "agent",
        "chunk",
        "seq",
        "flush",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while out.len() < len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(state >> 33) as usize % words.len()].as_bytes());
        out.push(if (state >> 20).is_multiple_of(9) {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(len);
    out
}

fn write_moments(socket: &Path) -> anyhow::Result<Vec<Moment>> {
    let mut nbd =
        NbdClient::connect_unix(socket, VOLUME).context("connect to the agent's NBD export")?;
    let mut reference = vec![0u8; VOLUME_BYTES as usize];
    let mut moments = Vec::new();
    let mut step = |what: &'static str,
                    nbd: &mut NbdClient<_>,
                    reference: &mut Vec<u8>,
                    act: &dyn Fn(&mut NbdClient<_>, &mut Vec<u8>) -> std::io::Result<()>|
     -> anyhow::Result<()> {
        act(nbd, reference).with_context(|| format!("NBD: {what}"))?;
        nbd.flush().context("NBD flush")?;
        moments.push(Moment {
            what,
            time_ns: TimeNs::now().0,
            image_hash: blake3::hash(reference),
        });
        println!("  wrote: {what}");
        Ok(())
    };
    step(
        "1 MiB of 0xab at offset 0",
        &mut nbd,
        &mut reference,
        &|nbd, r| {
            r[..1 << 20].fill(0xab);
            nbd.write(0, &r[..1 << 20], false)
        },
    )?;
    step(
        "unaligned 10000 bytes of 0x5c at offset 1 MiB + 123",
        &mut nbd,
        &mut reference,
        &|nbd, r| {
            let at = (1 << 20) + 123;
            r[at..at + 10_000].fill(0x5c);
            nbd.write(at as u64, &vec![0x5c; 10_000], false)
        },
    )?;
    step(
        "8 MiB of text at offset 8 MiB",
        &mut nbd,
        &mut reference,
        &|nbd, r| {
            let data = realistic(8 << 20, 1);
            r[8 << 20..16 << 20].copy_from_slice(&data);
            nbd.write(8 << 20, &data, false)
        },
    )?;
    step(
        "discard 256 KiB at 0, write-zeroes 4 KiB + 17 at 9 MiB",
        &mut nbd,
        &mut reference,
        &|nbd, r| {
            r[..256 << 10].fill(0);
            nbd.trim(0, 256 << 10)?;
            let at = 9 << 20;
            r[at..at + 4096 + 17].fill(0);
            nbd.write_zeroes(at as u64, 4096 + 17)
        },
    )?;
    step(
        "the same 8 MiB of text again at offset 40 MiB (dedup)",
        &mut nbd,
        &mut reference,
        &|nbd, r| {
            let data = realistic(8 << 20, 1);
            r[40 << 20..48 << 20].copy_from_slice(&data);
            nbd.write(40 << 20, &data, true)
        },
    )?;
    nbd.disconnect().context("NBD disconnect")?;
    Ok(moments)
}

async fn verify(mut client: CatalogClient, moments: &[Moment], dir: &Path) -> anyhow::Result<()> {
    let last = moments.last().map(|m| m.time_ns).unwrap_or_default();
    let waited = Instant::now();
    let reached = client
        .wait_durable(v1::WaitDurableRequest {
            volume: VOLUME.into(),
            until_time_ns: last,
            timeout_ms: 30_000,
        })
        .await
        .map_err(|s| anyhow::anyhow!("wait: {}", s.message()))?
        .into_inner();
    if !reached.reached {
        bail!("the collector did not make the last write durable within 30 s");
    }
    println!(
        "  last write durable at the collector {:.0} ms after it was acknowledged",
        waited.elapsed().as_secs_f64() * 1e3
    );
    let mut slowest_mb_s = f64::MAX;
    for (i, moment) in moments.iter().enumerate() {
        let out = dir.join(format!("restore-{i}.img"));
        let point = v1::restore_request::Point::AtTimeNs(moment.time_ns);
        let report = restore::to_file(client.clone().into(), VOLUME, point, &out, false).await?;
        let restored = blake3::hash(&std::fs::read(&out)?);
        if restored != moment.image_hash {
            bail!(
                "moment {} ({}) restored to different bytes",
                i + 1,
                moment.what
            );
        }
        slowest_mb_s = slowest_mb_s.min(report.mb_per_s());
        println!(
            "  restored moment {} at {}: identical ({:.0} MB/s)",
            i + 1,
            timefmt::format(moment.time_ns),
            report.mb_per_s()
        );
        std::fs::remove_file(&out)?;
    }
    let listing = client
        .list_volumes(v1::ListVolumesRequest {})
        .await?
        .into_inner();
    let status = listing
        .volumes
        .iter()
        .find(|v| v.name == VOLUME)
        .context("demo volume not listed")?;
    let stats = client.stats(v1::StatsRequest {}).await?.into_inner();
    let written: u64 = (1 << 20) + 12_288 + (8 << 20) + (8 << 20);
    println!("  points restored: {}", moments.len());
    println!(
        "  RPO now: {} ms (newest durable point vs collector clock)",
        status.lag_ms
    );
    println!(
        "  dedup: {} of non-zero blocks written, {} unique ({:.2}x)",
        crate::human_bytes(written),
        crate::human_bytes(stats.unique_chunk_bytes),
        written as f64 / stats.unique_chunk_bytes.max(1) as f64
    );
    println!(
        "  compression: {} unique stored in {} ({:.2}x)",
        crate::human_bytes(stats.unique_chunk_bytes),
        crate::human_bytes(stats.stored_bytes),
        stats.unique_chunk_bytes as f64 / stats.stored_bytes.max(1) as f64
    );
    println!(
        "  slowest restore: {slowest_mb_s:.0} MB/s of {} images",
        crate::human_bytes(VOLUME_BYTES)
    );
    Ok(())
}
