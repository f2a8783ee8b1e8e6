//! The Catalog service: list volumes, wait for durability, restore a point in time, and the
//! operator's side of a second site: status with lag per site, failover, handover (the first
//! half of a failback) and delta restores (its second half).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use tideline_core::store::{
    self, BlockDiff, DiffBase, GroupRole, PointInTime, PointKinds, RestorePlan, Store,
};
use tideline_core::{
    BlockNo, Epoch, GroupName, Seq, SiteName, TimeNs, VolumeName, BLOCK_SIZE, BLOCK_SIZE_BYTES,
};
use tideline_proto::v1::{self, restore_request::Point};
use tideline_proto::volume_name;

use crate::ingest::store_status;
use crate::live::Live;

/// Largest extent sent in one restore message.
pub const RESTORE_EXTENT_BYTES: usize = 4 << 20;
/// Restore messages buffered ahead of the network.
const RESTORE_QUEUE: usize = 8;
/// Block ranges per [`v1::DataExtents`] message: about 1 MiB of it at most.
const DATA_EXTENTS_PER_MESSAGE: usize = 1 << 16;
const MAX_WAIT: Duration = Duration::from_secs(3600);

pub struct CatalogService {
    store: Arc<Store>,
    live: Arc<Live>,
    site: SiteName,
    replicate_to: Option<String>,
}

impl CatalogService {
    pub fn new(
        store: Arc<Store>,
        live: Arc<Live>,
        site: SiteName,
        replicate_to: Option<String>,
    ) -> CatalogService {
        CatalogService {
            store,
            live,
            site,
            replicate_to,
        }
    }

    fn group(name: &str) -> Result<GroupName, Status> {
        GroupName::new(name).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn group_of(&self, volume: &VolumeName) -> Result<tideline_core::GroupName, Status> {
        self.store
            .group_of(volume)
            .ok_or_else(|| Status::not_found(format!("no volume {volume} at this collector")))
    }

    /// Resolves the requested point, refusing a time the collector cannot yet vouch for.
    fn point(&self, volume: &VolumeName, point: Option<Point>) -> Result<PointInTime, Status> {
        let group = self.group_of(volume)?;
        match point {
            None | Some(Point::Latest(_)) => Ok(PointInTime::Latest),
            Some(Point::AtSeq(seq)) => Ok(PointInTime::Seq(Seq(seq))),
            Some(Point::Checkpoint(name)) => self
                .store
                .checkpoint_seq(&group, &name)
                .map(PointInTime::Seq)
                .ok_or_else(|| Status::not_found(format!("group {group} has no checkpoint named {name:?}; `tideline points --group {group}` lists them"))),
            Some(Point::AtTimeNs(t)) => {
                let live = self.live.get(&group);
                if TimeNs(t) > live.durable_through {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume}: {} is newer than everything durable here (newest restorable point {}); wait with `tideline wait` or pick an earlier time",
                        format_ns(t),
                        format_ns(live.durable_through.0)
                    )));
                }
                Ok(PointInTime::Time(TimeNs(t)))
            }
        }
    }
}

pub fn format_ns(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    format!("{secs}.{nanos:09} s since the epoch")
}

#[tonic::async_trait]
impl v1::catalog_server::Catalog for CatalogService {
    async fn list_volumes(
        &self,
        _: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let store = self.store.clone();
        let summaries = tokio::task::spawn_blocking(move || store.volumes())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let now = TimeNs::now();
        let groups: std::collections::HashMap<GroupName, (GroupRole, Epoch)> = self
            .store
            .groups()
            .into_iter()
            .map(|g| (g.name, (g.role, g.epoch)))
            .collect();
        let volumes = summaries
            .into_iter()
            .map(|v| {
                let (role, epoch) = groups
                    .get(&v.group)
                    .copied()
                    .unwrap_or((GroupRole::Primary, Epoch::FIRST));
                let live = self.live.get(&v.group);
                let (oldest, newest) = match v.window {
                    Some((oldest, newest)) if v.complete => {
                        (oldest, newest.max(live.durable_through))
                    }
                    Some((oldest, newest)) => (oldest, newest),
                    None => (TimeNs(0), TimeNs(0)),
                };
                let lag_reference = if newest.0 > 0 {
                    newest
                } else {
                    live.durable_through
                };
                v1::VolumeStatus {
                    name: v.name.to_string(),
                    group: v.group.to_string(),
                    size_bytes: v.size_bytes,
                    oldest_ns: oldest.0,
                    newest_ns: newest.0,
                    durable_seq: live.durable_seq.max(v.durable_seq).0,
                    lag_ms: if lag_reference.0 > 0 {
                        lag_reference.ms_until(now)
                    } else {
                        0
                    },
                    complete: v.complete,
                    stored_chunk_bytes: 0,
                    site: self.site.to_string(),
                    role: role.name().to_owned(),
                    epoch: epoch.0,
                }
            })
            .collect();
        Ok(Response::new(v1::ListVolumesResponse { volumes }))
    }

    async fn wait_durable(
        &self,
        request: Request<v1::WaitDurableRequest>,
    ) -> Result<Response<v1::WaitDurableResponse>, Status> {
        let request = request.into_inner();
        let volume = volume_name("volume", &request.volume)?;
        let group = self.group_of(&volume)?;
        let timeout = Duration::from_millis(request.timeout_ms).min(MAX_WAIT);
        let live = self
            .live
            .wait_durable(&group, TimeNs(request.until_time_ns), timeout)
            .await;
        Ok(Response::new(v1::WaitDurableResponse {
            reached: live.durable_through >= TimeNs(request.until_time_ns),
            durable_time_ns: live.durable_through.0,
        }))
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.store.stats();
        Ok(Response::new(v1::StatsResponse {
            chunk_count: stats.chunk_count,
            unique_chunk_bytes: stats.logical_chunk_bytes,
            stored_bytes: stats.stored_bytes,
            pack_file_bytes: stats.pack_file_bytes,
        }))
    }

    async fn list_points(
        &self,
        request: Request<v1::ListPointsRequest>,
    ) -> Result<Response<v1::ListPointsResponse>, Status> {
        let request = request.into_inner();
        let group = match (request.volume.is_empty(), request.group.is_empty()) {
            (false, true) => self.group_of(&volume_name("volume", &request.volume)?)?,
            (true, false) => tideline_core::GroupName::new(request.group.as_str())
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            _ => {
                return Err(Status::invalid_argument(
                    "name exactly one of volume or group",
                ))
            }
        };
        let limit = if request.limit == 0 {
            1000
        } else {
            request.limit as usize
        };
        let volumes = self
            .store
            .group_volumes(&group)
            .ok_or_else(|| Status::not_found(format!("no group {group} at this collector")))?;
        let kinds = if request.checkpoints_only {
            PointKinds::CheckpointsOnly
        } else {
            PointKinds::FlushesAndCheckpoints
        };
        let points = self.store.points(&group, kinds, limit).unwrap_or_default();
        let live = self.live.get(&group);
        Ok(Response::new(v1::ListPointsResponse {
            group: group.to_string(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            durable_seq: live.durable_seq.0,
            durable_through_ns: live.durable_through.0,
            points: points.iter().map(point_info).collect(),
        }))
    }

    async fn checkpoint(
        &self,
        request: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::CheckpointResponse>, Status> {
        let request = request.into_inner();
        let group = tideline_core::GroupName::new(request.group.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = tideline_core::CheckpointName::new(request.name.as_str())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.store.group_volumes(&group).is_none() {
            return Err(Status::not_found(format!(
                "no group {group} at this collector"
            )));
        }
        if let Some(seq) = self.store.checkpoint_seq(&group, name.as_str()) {
            return Err(Status::already_exists(format!(
                "group {group} already has a checkpoint named {name} ({seq})"
            )));
        }
        let timeout = Duration::from_millis(if request.timeout_ms == 0 {
            60_000
        } else {
            request.timeout_ms
        })
        .min(MAX_WAIT);
        let mut ordered = self
            .live
            .order_checkpoint(&group, name.as_str(), request.app_consistent)
            .await?;
        let answer = tokio::time::timeout(timeout, ordered.answer())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the agent did not take checkpoint {name} within {} s",
                    timeout.as_secs()
                ))
            })?
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "the agent streaming group {group} went away before answering"
                ))
            })?;
        let (seq, time) = answer.map_err(|error| {
            Status::aborted(format!(
                "checkpoint {name} of group {group} failed: {error}"
            ))
        })?;
        if !self.live.wait_seq(&group, seq, timeout).await {
            return Err(Status::deadline_exceeded(format!(
                "checkpoint {name} was taken at {seq} but is not durable here after {} s",
                timeout.as_secs()
            )));
        }
        Ok(Response::new(v1::CheckpointResponse {
            seq: seq.0,
            time_ns: time.0,
        }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let store = self.store.clone();
        let groups = tokio::task::spawn_blocking(move || store.groups())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let now = TimeNs::now();
        let lag = |t: TimeNs| if t.0 > 0 { t.ms_until(now) } else { 0 };
        let groups = groups
            .into_iter()
            .map(|g| {
                let live = self.live.get(&g.name);
                let replicas = match (g.role, self.live.replica_status(&g.name)) {
                    (GroupRole::Primary, Some(r)) => vec![v1::ReplicaStatus {
                        site: r.site,
                        url: r.url,
                        connected: r.connected,
                        durable_seq: r.durable_seq.0,
                        durable_through_ns: r.durable_through.0,
                        lag_ms: lag(r.durable_through),
                        bytes_sent: r.bytes_sent,
                        chunk_bytes_sent: r.chunk_bytes_sent,
                        chunks_sent: r.chunks_sent,
                        records_sent: r.records_sent,
                        last_error: r.last_error.unwrap_or_default(),
                    }],
                    _ => Vec::new(),
                };
                v1::GroupStatus {
                    group: g.name.to_string(),
                    volumes: g.volumes.iter().map(|v| v.name.to_string()).collect(),
                    role: g.role.name().to_owned(),
                    epoch: g.epoch.0,
                    fenced_by: match g.role {
                        GroupRole::Fenced { by } => by.0,
                        _ => 0,
                    },
                    durable_seq: g.durable_seq.0,
                    durable_through_ns: live.durable_through.0,
                    lag_ms: lag(live.durable_through),
                    fork_seq: g.abandoned.map_or(0, |a| a.0 .0),
                    abandoned_records: g.abandoned.map_or(0, |a| a.1),
                    replicas,
                }
            })
            .collect();
        Ok(Response::new(v1::StatusResponse {
            site: self.site.to_string(),
            replicate_to: self.replicate_to.clone().unwrap_or_default(),
            now_ns: now.0,
            groups,
        }))
    }

    async fn failover(
        &self,
        request: Request<v1::FailoverRequest>,
    ) -> Result<Response<v1::FailoverResponse>, Status> {
        use v1::failover_request::Point as F;
        let request = request.into_inner();
        let group = Self::group(&request.group)?;
        let point = match request.point {
            None | Some(F::Latest(_)) => PointInTime::Latest,
            Some(F::AtSeq(seq)) => PointInTime::Seq(Seq(seq)),
            Some(F::AtTimeNs(t)) => PointInTime::Time(TimeNs(t)),
            Some(F::Checkpoint(name)) => self
                .store
                .checkpoint_seq(&group, &name)
                .map(PointInTime::Seq)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "group {group} has no checkpoint named {name:?} here"
                    ))
                })?,
        };
        let epoch = (request.epoch > 0).then_some(Epoch(request.epoch));
        let store = self.store.clone();
        let g = group.clone();
        let result = tokio::task::spawn_blocking(move || store.take_over(&g, point, epoch))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        if result.dropped_records > 0 {
            self.live.reset(&group, result.seq, result.time);
        }
        let volumes = self.store.group_volumes(&group).unwrap_or_default();
        Ok(Response::new(v1::FailoverResponse {
            epoch: result.epoch.0,
            seq: result.seq.0,
            time_ns: result.time.0,
            dropped_records: result.dropped_records,
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn handover(
        &self,
        request: Request<v1::HandoverRequest>,
    ) -> Result<Response<v1::HandoverResponse>, Status> {
        let request = request.into_inner();
        let group = Self::group(&request.group)?;
        let info = self
            .store
            .group_info(&group)
            .ok_or_else(|| Status::not_found(format!("no group {group} at this collector")))?;
        if self.replicate_to.is_none() && info.role == GroupRole::Primary {
            return Err(Status::failed_precondition(format!(
                "this collector replicates nowhere (no --replicate-to), so no other site holds group {group}"
            )));
        }
        let timeout = Duration::from_millis(if request.timeout_ms == 0 {
            60_000
        } else {
            request.timeout_ms
        })
        .min(MAX_WAIT);
        let _draining = (info.role == GroupRole::Primary).then(|| self.live.drain(&group));
        if info.role == GroupRole::Primary {
            self.live
                .kick(&group, crate::ingest::draining_status(&group));
            let target = self.store.durable_seq(&group).unwrap_or_default();
            let mut changes = self.live.subscribe();
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                let replica = self.live.replica_status(&group).unwrap_or_default();
                if replica.durable_seq >= target {
                    break;
                }
                if !matches!(
                    tokio::time::timeout_at(deadline, changes.changed()).await,
                    Ok(Ok(()))
                ) {
                    return Err(Status::deadline_exceeded(format!(
                        "the other site holds group {group} only through seq {} of {}; is it reachable? The group's agent may reconnect here",
                        replica.durable_seq.0, target.0
                    )));
                }
            }
        }
        let store = self.store.clone();
        let g = group.clone();
        let result = tokio::task::spawn_blocking(move || store.hand_over(&g))
            .await
            .map_err(|e| Status::internal(e.to_string()));
        let (epoch, seq) = result?.map_err(store_status)?;
        let site = self
            .live
            .replica_status(&group)
            .map(|r| r.site)
            .unwrap_or_default();
        Ok(Response::new(v1::HandoverResponse {
            epoch: epoch.0,
            seq: seq.0,
            site,
        }))
    }

    type RestoreDeltaStream = ReceiverStream<Result<v1::RestoreMessage, Status>>;

    async fn restore_delta(
        &self,
        request: Request<v1::RestoreDeltaRequest>,
    ) -> Result<Response<Self::RestoreDeltaStream>, Status> {
        use v1::restore_delta_request::{Base, Point as P};
        let request = request.into_inner();
        let volume = volume_name("volume", &request.volume)?;
        let base = match request.base {
            Some(Base::BaseSeq(seq)) => DiffBase::Seq(Seq(seq)),
            Some(Base::BaseAbandoned(_)) | None => DiffBase::Abandoned,
        };
        let point = match request.point {
            None | Some(P::Latest(_)) => PointInTime::Latest,
            Some(P::AtSeq(seq)) => PointInTime::Seq(Seq(seq)),
            Some(P::AtTimeNs(t)) => self.point(&volume, Some(Point::AtTimeNs(t)))?,
        };
        let store = self.store.clone();
        let diff = tokio::task::spawn_blocking(move || store.diff(&volume, base, point))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || stream_diff(&store, &diff, &tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type RestoreStream = ReceiverStream<Result<v1::RestoreMessage, Status>>;

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let started = std::time::Instant::now();
        let request = request.into_inner();
        let volume = volume_name("volume", &request.volume)?;
        let point = self.point(&volume, request.point)?;
        let store = self.store.clone();
        let plan = tokio::task::spawn_blocking(move || store.plan(&volume, point))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_status)?;
        let (tx, rx) = mpsc::channel(RESTORE_QUEUE);
        let store = self.store.clone();
        if request.frames {
            let ranges = request.data_extents;
            tokio::task::spawn_blocking(move || stream_frames(&store, &plan, ranges, &tx, started));
        } else {
            tokio::task::spawn_blocking(move || stream_plan(&store, &plan, &tx));
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn point_info(record: &tideline_core::record::Record) -> v1::PointInfo {
    use tideline_core::record::RecordKind;
    let (kind, name, app_consistent) = match &record.kind {
        RecordKind::Checkpoint {
            name,
            app_consistent,
        } => ("checkpoint", name.to_string(), *app_consistent),
        _ => ("flush", String::new(), false),
    };
    v1::PointInfo {
        seq: record.seq.0,
        time_ns: record.time.0,
        kind: kind.to_owned(),
        name,
        app_consistent,
    }
}

/// Sends the header and every non-zero extent of `plan`, verified, in no particular order
/// ([`store::for_each_extent`] reads them frame by frame).
fn stream_plan(
    store: &Store,
    plan: &RestorePlan,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
) {
    if send(tx, v1::restore_message::Msg::Header(plan_header(plan))).is_ok() {
        stream_extents(store, plan, tx);
    }
}

/// The header of a full restore of `plan`.
fn plan_header(plan: &RestorePlan) -> v1::RestoreHeader {
    v1::RestoreHeader {
        size_bytes: plan.size_bytes,
        seq: plan.seq.0,
        time_ns: plan.time.0,
        changed_blocks: 0,
    }
}

/// Ends a restore stream that failed reading the store with DATA_LOSS and the store's error,
/// which names the volume, the block and the pack.
fn end_stream(
    plan: &RestorePlan,
    sent: Result<(), StreamEnd>,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
) {
    if let Err(StreamEnd::Failed(e)) = sent {
        tracing::error!(volume = %plan.volume, error = %e, "restore failed");
        let _ = tx.blocking_send(Err(Status::data_loss(e.to_string())));
    }
}

/// Sends the header, the image's block ranges ([`v1::DataExtents`]) when `with_ranges`, and
/// every frame holding blocks of `plan`, as stored: the client decompresses and verifies them
/// ([`v1::RestoreFrame`]).
fn stream_frames(
    store: &Store,
    plan: &RestorePlan,
    with_ranges: bool,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
    started: std::time::Instant,
) {
    if send(tx, v1::restore_message::Msg::Header(plan_header(plan))).is_err() {
        return;
    }
    let ranges = if with_ranges {
        store::plan_block_ranges(plan)
    } else {
        Vec::new()
    };
    for ranges in ranges.chunks(DATA_EXTENTS_PER_MESSAGE) {
        let extents = v1::DataExtents {
            start_block: ranges.iter().map(|r| r.0 .0).collect(),
            block_count: ranges.iter().map(|r| r.1).collect(),
        };
        if send(tx, v1::restore_message::Msg::DataExtents(extents)).is_err() {
            return;
        }
    }
    let (mut frames, mut zstd_bytes, mut first_frame_ms) = (0u64, 0u64, None);
    let sent = store::for_each_stored_frame(store, plan, |frame| {
        first_frame_ms.get_or_insert_with(|| started.elapsed().as_millis());
        frames += 1;
        zstd_bytes += frame.zstd.as_ref().len() as u64;
        send(tx, v1::restore_message::Msg::Frame(restore_frame(frame)))
    });
    tracing::info!(volume = %plan.volume, blocks = plan.blocks.len(), frames, zstd_bytes,
        first_frame_ms, total_ms = started.elapsed().as_millis(), "restore streamed");
    end_stream(plan, sent, tx);
}

fn restore_frame(frame: store::StoredFrame) -> v1::RestoreFrame {
    let zstd_data = bytes::Bytes::from_owner(frame.zstd);
    v1::RestoreFrame {
        zstd_data,
        block_count: frame.block_count as u32,
        index: frame.blocks.iter().map(|b| u32::from(b.0)).collect(),
        volume_block: frame.blocks.iter().map(|b| b.1 .0).collect(),
        hashes: tideline_proto::wire_hashes(frame.blocks.iter().map(|b| Some(&b.2))),
        pack: frame.pack,
        pack_offset: frame.offset,
    }
}

/// Sends the verified non-zero extents of `plan`; a failed read ends the stream with
/// DATA_LOSS and the store's error, which names the volume, the block and the pack.
fn stream_extents(
    store: &Store,
    plan: &RestorePlan,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
) {
    let sent = store::for_each_extent(store, plan, RESTORE_EXTENT_BYTES, |offset_bytes, data| {
        let extent = v1::Extent {
            offset_bytes,
            data: data.into(),
            zero_len_bytes: 0,
        };
        send(tx, v1::restore_message::Msg::Extent(extent))
    });
    end_stream(plan, sent, tx);
}

/// Sends one message of a restore stream from a blocking thread.
fn send(
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
    msg: v1::restore_message::Msg,
) -> Result<(), StreamEnd> {
    tx.blocking_send(Ok(v1::RestoreMessage { msg: Some(msg) }))
        .map_err(|_| StreamEnd::ClientGone)
}

/// Why a restore stream ended early.
enum StreamEnd {
    Failed(tideline_core::store::StoreError),
    ClientGone,
}

impl From<tideline_core::store::StoreError> for StreamEnd {
    fn from(e: tideline_core::store::StoreError) -> StreamEnd {
        StreamEnd::Failed(e)
    }
}

/// Sends the header and the changed blocks of `diff`: runs of blocks that read as zeroes as
/// zero extents, then the blocks with data as verified data extents (in no particular order;
/// the two never overlap).
fn stream_diff(
    store: &Store,
    diff: &BlockDiff,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
) {
    let header = v1::RestoreHeader {
        size_bytes: diff.size_bytes,
        seq: diff.seq.0,
        time_ns: diff.time.0,
        changed_blocks: diff.changes.len() as u64,
    };
    if send(tx, v1::restore_message::Msg::Header(header)).is_err() {
        return;
    }
    for (first, blocks) in zero_runs(diff) {
        let offset_bytes = first.offset_bytes();
        let extent = v1::Extent {
            offset_bytes,
            data: Default::default(),
            zero_len_bytes: (blocks * BLOCK_SIZE_BYTES).min(diff.size_bytes - offset_bytes),
        };
        if send(tx, v1::restore_message::Msg::Extent(extent)).is_err() {
            return;
        }
    }
    let with_data = RestorePlan {
        volume: diff.volume.clone(),
        size_bytes: diff.size_bytes,
        seq: diff.seq,
        time: diff.time,
        blocks: diff
            .changes
            .iter()
            .filter_map(|&(block, hash)| Some((block, hash?)))
            .collect(),
    };
    stream_extents(store, &with_data, tx);
}

/// The runs of consecutive changed blocks of `diff` that read as zeroes, as (first block,
/// block count), each at most `RESTORE_EXTENT_BYTES` long.
fn zero_runs(diff: &BlockDiff) -> Vec<(BlockNo, u64)> {
    let max_run = (RESTORE_EXTENT_BYTES / BLOCK_SIZE) as u64;
    let mut runs: Vec<(BlockNo, u64)> = Vec::new();
    for (block, _) in diff.changes.iter().filter(|(_, hash)| hash.is_none()) {
        match runs.last_mut() {
            Some((first, len)) if first.0 + *len == block.0 && *len < max_run => *len += 1,
            _ => runs.push((*block, 1)),
        }
    }
    runs
}
