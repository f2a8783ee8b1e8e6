//! Restore to a file: stream the volume's frames from the collector into a sparse image,
//! checking every block here (see [`crate::frames`]).
//!
//! The frames come from a collector over gRPC, or from a store directory opened in this process
//! ([`Source::Store`], `tideline restore --store DIR`): then the collector's own restore code
//! runs here on the store, as `restic restore` reads its repository, and the frames are handed
//! over in memory instead of being encoded, sent over a socket and decoded.
//!
//! The image is written to `OUT.partial` next to OUT and renamed into place only after every
//! frame arrived and the file was fsynced, so a failed restore never leaves a plausible-looking
//! but wrong image behind.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tideline_collector::catalog::CatalogService;
use tideline_proto::v1::catalog_server::Catalog;
use tideline_proto::v1::{self, restore_message::Msg};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::frames::{DataBytes, FrameWriter};
use crate::CatalogClient;

pub struct RestoreReport {
    pub out: PathBuf,
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub seq: u64,
    pub time_ns: i64,
    pub seconds: f64,
}

impl RestoreReport {
    pub fn mb_per_s(&self) -> f64 {
        self.size_bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

impl std::fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restored {} ({} of data) as of {} (seq {}) to {} in {:.2} s ({:.0} MB/s)",
            crate::human_bytes(self.size_bytes),
            crate::human_bytes(self.data_bytes),
            crate::timefmt::format(self.time_ns),
            self.seq,
            self.out.display(),
            self.seconds,
            self.mb_per_s()
        )
    }
}

/// Where a restore reads the volume from.
#[derive(Clone)]
pub enum Source {
    /// A collector, over gRPC.
    Collector(CatalogClient),
    /// A store directory opened by this process (no collector may hold it).
    Store(Arc<CatalogService>),
}

impl From<CatalogClient> for Source {
    fn from(client: CatalogClient) -> Source {
        Source::Collector(client)
    }
}

impl Source {
    /// Opens the store in `dir` for this process alone; fails when a collector holds it.
    pub fn open_store(dir: &Path) -> anyhow::Result<Source> {
        use tideline_core::store::{Store, StoreConfig, StoreError, CATALOG_FILE};
        if !dir.join(CATALOG_FILE).is_file() {
            bail!(
                "{} holds no Tideline store (no {CATALOG_FILE}): name a collector's --data-dir",
                dir.display()
            );
        }
        let store = match Store::open(StoreConfig::new(dir)) {
            Ok(store) => Arc::new(store),
            Err(StoreError::Locked { .. }) => bail!(
                "store directory {} is in use by another process, a running collector: restore through it (--collector URL), or stop that collector first",
                dir.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("open the store in {}", dir.display())),
        };
        let live = Arc::new(tideline_collector::live::Live::from_store(&store));
        let site = tideline_collector::config::CollectorConfig::new(dir).site;
        Ok(Source::Store(Arc::new(CatalogService::new(
            store, live, site, None,
        ))))
    }

    pub async fn list_points(
        &mut self,
        request: v1::ListPointsRequest,
    ) -> Result<v1::ListPointsResponse, tonic::Status> {
        let response = match self {
            Source::Collector(client) => client.list_points(request).await?,
            Source::Store(service) => service.list_points(tonic::Request::new(request)).await?,
        };
        Ok(response.into_inner())
    }

    async fn restore(
        &mut self,
        request: v1::RestoreRequest,
    ) -> Result<RestoreStream, tonic::Status> {
        Ok(match self {
            Source::Collector(client) => client.restore(request).await?.into_inner().into(),
            Source::Store(service) => RestoreStream::Local(
                service
                    .restore(tonic::Request::new(request))
                    .await?
                    .into_inner(),
            ),
        })
    }
}

/// The messages of a restore (or delta) stream, from the network or from this process.
pub enum RestoreStream {
    Remote(Box<tonic::Streaming<v1::RestoreMessage>>),
    Local(ReceiverStream<Result<v1::RestoreMessage, tonic::Status>>),
}

impl From<tonic::Streaming<v1::RestoreMessage>> for RestoreStream {
    fn from(stream: tonic::Streaming<v1::RestoreMessage>) -> RestoreStream {
        RestoreStream::Remote(Box::new(stream))
    }
}

impl RestoreStream {
    /// The next message; `None` at the end of the stream.
    pub async fn message(&mut self) -> Result<Option<v1::RestoreMessage>, tonic::Status> {
        match self {
            RestoreStream::Remote(stream) => stream.message().await,
            RestoreStream::Local(stream) => stream.next().await.transpose(),
        }
    }
}

pub async fn to_file(
    mut source: Source,
    volume: &str,
    point: v1::restore_request::Point,
    out: &Path,
    force: bool,
) -> anyhow::Result<RestoreReport> {
    if out.exists() && !force {
        bail!(
            "{} exists; refusing to overwrite it (pass --force to replace it)",
            out.display()
        );
    }
    if out.exists() && !out.is_file() {
        bail!(
            "{} is not a regular file; a restore writes a new image beside it and renames it into place, which would replace a device node: restore to a file, then copy it onto the device (e.g. `dd if=IMAGE of=DEVICE bs=4M conv=sparse,fsync`)",
            out.display()
        );
    }
    let volume_name = tideline_core::VolumeName::new(volume)?;
    let started = Instant::now();
    let partial = partial_path(out);
    let result = receive_image(&mut source, volume_name, point, &partial).await;
    match result {
        Ok((header, data_bytes)) => {
            std::fs::rename(&partial, out)
                .with_context(|| format!("rename into {}", out.display()))?;
            Ok(RestoreReport {
                out: out.to_owned(),
                size_bytes: header.size_bytes,
                data_bytes,
                seq: header.seq,
                time_ns: header.time_ns,
                seconds: started.elapsed().as_secs_f64(),
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Streams the image into `partial`: frames are decompressed, verified and written on every
/// core while the stream is read; then the file is sized and fsynced.
async fn receive_image(
    source: &mut Source,
    volume: tideline_core::VolumeName,
    point: v1::restore_request::Point,
    partial: &Path,
) -> anyhow::Result<(v1::RestoreHeader, u64)> {
    let mut stream = source
        .restore(v1::RestoreRequest {
            volume: volume.to_string(),
            point: Some(point),
            frames: true,
            data_extents: true,
        })
        .await
        .map_err(|s| anyhow::anyhow!("restore {volume}: {}", s.message()))?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(partial)
        .with_context(|| format!("create {}", partial.display()))?;
    let header = read_header(&mut stream, &format!("restore {volume}")).await?;
    // Sized first, so no write extends the file (a direct write that would must wait for the
    // size update).
    file.set_len(header.size_bytes)
        .context("size restored image")?;
    let failed = |e: anyhow::Error| anyhow::anyhow!("restore {volume} failed: {e:#}");
    let mut next = check_room(&mut stream, &file, header.size_bytes)
        .await
        .map_err(failed)?;
    let writer = FrameWriter::start(
        file.try_clone().context("clone restored image handle")?,
        header.size_bytes,
        volume.clone(),
    );
    let ended = loop {
        match next {
            Ok(Some(v1::RestoreMessage {
                msg: Some(Msg::Frame(frame)),
            })) => {
                if !writer.submit(frame).await {
                    break Ok(());
                }
            }
            Ok(Some(_)) => break Err(anyhow::anyhow!("unexpected message in restore stream")),
            Ok(None) => break Ok(()),
            Err(s) => break Err(anyhow::anyhow!("{}", s.message())),
        }
        next = stream.message().await;
    };
    // A worker's error (a corrupt block) explains a stream that stopped early: it comes first.
    let data_bytes = writer.finish().await.map_err(failed)?;
    ended.map_err(failed)?;
    // The fsync waits for the disk: off the runtime's threads.
    tokio::task::spawn_blocking(move || file.sync_all().context("fsync restored image")).await??;
    Ok((header, data_bytes))
}

/// The message after a frames restore's header: a frame, the end, or an error.
type NextMessage = Result<Option<v1::RestoreMessage>, tonic::Status>;

/// Adds up the block ranges the collector lists ahead of the frames and fails, before anything
/// is written, when the image's filesystem has less room; the message after them.
async fn check_room(
    stream: &mut RestoreStream,
    file: &std::fs::File,
    size_bytes: u64,
) -> anyhow::Result<NextMessage> {
    let mut data = DataBytes::default();
    loop {
        let next = stream.message().await;
        let Ok(Some(v1::RestoreMessage {
            msg: Some(Msg::DataExtents(ranges)),
        })) = next
        else {
            data.check_room(file)?;
            return Ok(next);
        };
        data.add(&ranges, size_bytes)?;
    }
}

/// The header a restore (or delta) stream starts with; `what` names the stream in errors.
pub async fn read_header(
    stream: &mut RestoreStream,
    what: &str,
) -> anyhow::Result<v1::RestoreHeader> {
    match stream.message().await {
        Ok(Some(v1::RestoreMessage {
            msg: Some(Msg::Header(h)),
        })) => Ok(h),
        Ok(_) => bail!("{what}: the collector sent no header"),
        Err(s) => bail!("{what}: {}", s.message()),
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// What to restore.
pub enum Target {
    Volume(String),
    Group(String),
}

/// Restores a volume, or every volume of a group at one cut of the group's journal: "latest"
/// is pinned to the group's durable seq once, before the first volume, so later writes cannot
/// make the volumes disagree.
pub async fn run(
    mut source: Source,
    target: Target,
    point: v1::restore_request::Point,
    out: Option<PathBuf>,
    out_dir: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<Vec<RestoreReport>> {
    let (lookup, single) = match &target {
        Target::Volume(v) => ((v.clone(), String::new()), true),
        Target::Group(g) => ((String::new(), g.clone()), false),
    };
    let listing = source
        .list_points(v1::ListPointsRequest {
            volume: lookup.0,
            group: lookup.1,
            limit: 1,
            checkpoints_only: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let volumes: Vec<String> = match target {
        Target::Volume(v) => vec![v],
        Target::Group(_) => listing.volumes.clone(),
    };
    let point = match point {
        v1::restore_request::Point::Latest(_) if !single => {
            v1::restore_request::Point::AtSeq(listing.durable_seq)
        }
        other => other,
    };
    let outputs: Vec<PathBuf> = match (out, out_dir) {
        (Some(out), _) if single => vec![out],
        (Some(_), _) => bail!("--out names one image; use --out-dir DIR for a group"),
        (None, Some(dir)) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            volumes
                .iter()
                .map(|v| dir.join(format!("{v}.img")))
                .collect()
        }
        (None, None) => bail!("name --out FILE or --out-dir DIR"),
    };
    if !force {
        if let Some(existing) = outputs.iter().find(|o| o.exists()) {
            bail!(
                "{} exists; refusing to overwrite it (pass --force to replace it)",
                existing.display()
            );
        }
    }
    let mut reports = Vec::new();
    for (volume, out) in volumes.iter().zip(&outputs) {
        reports.push(to_file(source.clone(), volume, point.clone(), out, force).await?);
    }
    Ok(reports)
}
