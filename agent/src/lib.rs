//! Tideline agent: sits in the write path of protected volumes, journals every change into a
//! crash-safe spool, and ships the journal to a collector.
//!
//! The pieces: [`nbd`] serves the volumes to clients; [`volume`] and [`group`] apply each change
//! and journal it in one order per consistency group; [`shipper`] streams the spool to the
//! collector; a resync thread per group journals blocks the journal does not yet account for
//! (the baseline of a volume that already held data, or the gap left by a full spool).
//! [`fuse`] exposes a volume as a regular file for `losetup`.
//! [`run`] wires them up and is what the binary and the in-process tests call.

pub mod checkpoint;
mod compress;
pub mod config;
pub mod fuse;
pub mod group;
pub mod nbd;
mod on_volume;
mod recent;
pub mod shipper;
pub mod volume;

use std::fs::OpenOptions;
use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use config::{AgentConfig, GroupSpec};
use group::{Group, ResyncStep, VolumeState};
use tideline_core::record::RecordKind;
use tideline_core::spool::{Spool, SpoolConfig, SpoolOp};
use tideline_core::BLOCK_SIZE_BYTES;
use tideline_proto::v1;

/// Exit status of `tideline-agent` when a group it protects is fenced: another site took the
/// group over (failover), so this agent must not go on shipping its writes. Restarting it will
/// not help; for systemd, `RestartPreventExitStatus=3`.
pub const EXIT_FENCED: u8 = 3;

/// [`run`] ended because the collector fenced a group: its message names group and epoch.
#[derive(Debug, thiserror::Error)]
#[error("fenced: {0}")]
pub struct Fenced(pub String);

/// Where the agent serves NBD. Bound by the caller, so tests can use port 0 and temp sockets.
#[derive(Default)]
pub struct Listeners {
    pub unix: Option<tokio::net::UnixListener>,
    pub tcp: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds what the configuration names (removing a stale Unix socket file first).
    pub async fn bind(config: &AgentConfig) -> anyhow::Result<Listeners> {
        let unix = match &config.nbd_unix {
            Some(path) => {
                if path.exists() {
                    std::fs::remove_file(path)
                        .with_context(|| format!("remove stale socket {}", path.display()))?;
                }
                Some(
                    tokio::net::UnixListener::bind(path)
                        .with_context(|| format!("listen on {}", path.display()))?,
                )
            }
            None => None,
        };
        let tcp = match config.nbd_tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listen on {addr}"))?,
            ),
            None => None,
        };
        Ok(Listeners { unix, tcp })
    }
}

/// A running group: what status surfaces read.
pub struct GroupHandle {
    pub group: Arc<Group>,
    pub shipper: watch::Receiver<shipper::ShipperStatus>,
}

/// Opens every volume and spool, then serves until `shutdown` resolves. On return, spools are
/// synced and background work has stopped.
pub async fn run(
    config: AgentConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (fenced_tx, mut fenced_rx) = tokio::sync::mpsc::channel::<String>(4);
    let mut exports: Vec<(String, Arc<dyn nbd::BlockExport>)> = Vec::new();
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    let mut groups = Vec::new();
    // Dropped on an early return, which unmounts them.
    let mut fuse_mounts = Vec::new();
    for spec in &config.groups {
        let group = Arc::new(open_group(&config, spec)?);
        for (index, volume) in spec.volumes.iter().enumerate() {
            let export: Arc<dyn nbd::BlockExport> =
                Arc::new(volume::VolumeExport::new(group.clone(), index)?);
            if let Some(file) = volume.fuse.clone() {
                let export = export.clone();
                let mount = tokio::task::spawn_blocking(move || fuse::mount(export, &file))
                    .await
                    .context("join FUSE mount task")?
                    .with_context(|| format!("FUSE export of volume {}", volume.name))?;
                fuse_mounts.push(mount);
            }
            exports.push((volume.name.to_string(), export));
        }
        let (status_tx, _status_rx) = watch::channel(shipper::ShipperStatus::default());
        let volumes = volume_infos(&group);
        let shipper_config = shipper::ShipperConfig {
            collector_url: config.collector_url.clone(),
            agent_id: config.agent_id.clone(),
            hooks: config.hooks.clone(),
            zstd_level: config.zstd_level,
            on_fenced: fenced_tx.clone(),
        };
        tasks.push(tokio::spawn(shipper::run(
            group.clone(),
            volumes,
            shipper_config,
            status_tx,
            stop_rx.clone(),
        )));
        let io_flusher = spec.volumes.iter().any(|v| v.fuse.is_some());
        threads.push(spawn_resync(group.clone(), stop_rx.clone(), io_flusher));
        groups.push(group);
    }
    let server = Arc::new(nbd::NbdServer::new(exports));
    let mut servers = Vec::new();
    if let Some(listener) = listeners.unix {
        let mut stop = stop_rx.clone();
        let server = server.clone();
        servers.push(tokio::spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stop.wait_for(|&s| s).await;
                })
                .await
        }));
    }
    if let Some(listener) = listeners.tcp {
        let mut stop = stop_rx.clone();
        let server = server.clone();
        servers.push(tokio::spawn(async move {
            server
                .serve_tcp(listener, async move {
                    let _ = stop.wait_for(|&s| s).await;
                })
                .await
        }));
    }
    tracing::info!(groups = groups.len(), "agent serving");
    let fenced = tokio::select! {
        _ = shutdown => None,
        Some(message) = fenced_rx.recv() => Some(message),
    };
    tracing::info!("agent shutting down");
    // FUSE exports first, while everything behind them still runs (a busy one is detached).
    let unmounted = tokio::task::spawn_blocking(move || {
        for mount in fuse_mounts {
            if let Err(e) = mount.unmount() {
                tracing::error!(error = %e, "FUSE export left mounted");
            }
        }
    });
    let _ = unmounted.await;
    let _ = stop_tx.send(true);
    for server in servers {
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %e, "NBD server stopped with an error");
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    for thread in threads {
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    for group in groups {
        group
            .spool
            .sync()
            .with_context(|| format!("sync spool of group {}", group.name))?;
        let (writes, waited) = group.recent.held_up();
        if writes > 0 {
            tracing::info!(group = %group.name, writes, waited_ms = waited.as_millis() as u64,
                "large writes that waited for the shipper while the agent ran (waited_ms sums each write's wait)");
        }
    }
    match fenced {
        Some(message) => Err(Fenced(message).into()),
        None => Ok(()),
    }
}

fn volume_infos(group: &Group) -> Vec<v1::VolumeInfo> {
    group
        .lock()
        .iter()
        .map(|v| v1::VolumeInfo {
            name: v.name.to_string(),
            size_bytes: v.size_bytes,
        })
        .collect()
}

/// Reads of a volume (the client's, the shipper's read back of large writes, saves) bring
/// only the blocks asked for into the page cache. With readahead the kernel caches large
/// folios, and every later 4 KiB buffered write into one walks all of its buffer heads (Linux
/// 6.18, ext4): fio's 4 KiB random writes after the shipper had read a 2 GiB sequential pass
/// back ran at 10.4-14.2k IOPS, the agent's NBD thread 58 % of its time in
/// `ext4_block_write_begin`; with the page cache dropped first, 35.9k. Large reads come from
/// clients in large requests anyway, and qemu-nbd --cache=none reads ahead nothing either.
/// Advisory: a refusal leaves readahead on, which is only slower.
fn read_without_readahead(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open for as
    // long as `file` is borrowed.
    let refused = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if refused != 0 {
        tracing::debug!(
            errno = refused,
            "posix_fadvise(RANDOM) refused; reads keep readahead"
        );
    }
}

fn open_group(config: &AgentConfig, spec: &GroupSpec) -> anyhow::Result<Group> {
    let dir = config.spool_dir.join(spec.name.as_str());
    let spool = Spool::open(SpoolConfig::new(&dir, config.spool_max_bytes))
        .with_context(|| format!("open spool of group {}", spec.name))?;
    let mut volumes = Vec::new();
    for volume in &spec.volumes {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&volume.path)
            .with_context(|| format!("open volume {} at {}", volume.name, volume.path.display()))?;
        read_without_readahead(&file);
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("size of {}", volume.path.display()))?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
            anyhow::bail!(
                "volume {} at {} is {size_bytes} bytes; Tideline protects volumes whose size is a positive multiple of {BLOCK_SIZE_BYTES} (resize it, e.g. `truncate -s 1G FILE`)",
                volume.name,
                volume.path.display()
            );
        }
        let (mut dirty, opened) = group::open_dirty_map(&dir, &volume.name, &file, size_bytes)?;
        let lost_tail = spool.dropped_unflushed();
        // A baseline can land on a journal the collector already holds for this volume (a
        // fresh spool after a failover, a dirty map moved aside to force a full resync): like
        // a whole resync it starts with a gap and a trim of the whole volume, so blocks the
        // volume no longer holds do not keep their old content in the journal.
        let baseline = opened == tideline_core::dirty::Opened::Created;
        let gap = if lost_tail {
            // A power loss took spooled records the volume may hold: the journal can differ
            // from the volume in any block written since the last flush, and nothing says
            // which, so every allocated block is journalled again as the volume holds it.
            tracing::warn!(group = %spec.name, volume = %volume.name,
                "the spool lost records that were never flushed (power loss); resyncing the whole volume");
            group::mark_allocated(&mut dirty, &file, size_bytes)
                .with_context(|| format!("find allocated extents of {}", volume.path.display()))?;
            true
        } else if baseline {
            true
        } else if !dirty.resync_pending() && dirty.dirty_blocks() > 0 {
            // Write-intent marks left by a change that was applied but never journalled (the
            // agent died in between): the journal has a gap for this volume until a resync
            // has journalled those blocks as the volume now holds them.
            tracing::warn!(group = %spec.name, volume = %volume.name, blocks = dirty.dirty_blocks(),
                "the agent stopped between changing the volume and journalling the change; resyncing the blocks involved");
            true
        } else {
            false
        };
        if gap {
            spool
                .append(SpoolOp::Other(RecordKind::Gap {
                    volume: volume.name.clone(),
                }))
                .with_context(|| format!("journal a gap for volume {}", volume.name))?;
            if lost_tail || baseline {
                spool
                    .append(group::trim_whole(&volume.name, size_bytes))
                    .with_context(|| format!("journal the resync of volume {}", volume.name))?;
            }
            dirty.set_resync_pending(true);
            dirty
                .flush()
                .with_context(|| format!("flush the dirty map of volume {}", volume.name))?;
        }
        volumes.push(VolumeState {
            name: volume.name.clone(),
            path: volume.path.clone(),
            direct: tideline_core::direct::DirectWriter::open(&volume.path)
                .map(tideline_core::direct::DirectWriter::submitting_through_aio),
            file: Arc::new(file),
            size_bytes,
            dirty,
            in_gap: false,
            in_flight: Vec::new(),
            idle_writers: Vec::new(),
            on_volume: Default::default(),
        });
    }
    Ok(Group::new(spec.name.clone(), spool, volumes).pacing_writes(config.max_lag))
}

/// Journals dirty blocks in the background until `stop` flips.
/// `io_flusher`: the group has a FUSE export, so this thread (which takes the group lock that
/// loop's writes wait for) is in a block device's I/O path; see [`fuse`].
fn spawn_resync(
    group: Arc<Group>,
    stop: watch::Receiver<bool>,
    io_flusher: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("resync-{}", group.name))
        .spawn(move || {
            if io_flusher {
                fuse::set_io_flusher();
            }
            loop {
                if *stop.borrow() {
                    return;
                }
                match group.resync_step() {
                    Ok(ResyncStep::Journalled(_)) => continue,
                    Ok(ResyncStep::SpoolBusy) | Ok(ResyncStep::Idle) => {}
                    Err(e) => {
                        tracing::error!(group = %group.name, error = %e, "resync step failed; retrying")
                    }
                }
                // Idle: look again shortly (new gaps open only when the spool fills).
                std::thread::park_timeout(Duration::from_millis(100));
            }
        })
        .unwrap_or_else(|e| panic!("cannot start resync thread: {e}"))
}
