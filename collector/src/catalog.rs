//! The Catalog service: list volumes, wait for durability, restore a point in time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use tideline_core::store::{self, PointInTime, RestorePlan, Store};
use tideline_core::{Seq, TimeNs, VolumeName};
use tideline_proto::v1::{self, restore_request::Point};
use tideline_proto::volume_name;

use crate::ingest::store_status;
use crate::live::Live;

/// Largest extent sent in one restore message.
pub const RESTORE_EXTENT_BYTES: usize = 4 << 20;
/// Restore messages buffered ahead of the network.
const RESTORE_QUEUE: usize = 8;
const MAX_WAIT: Duration = Duration::from_secs(3600);

pub struct CatalogService {
    store: Arc<Store>,
    live: Arc<Live>,
}

impl CatalogService {
    pub fn new(store: Arc<Store>, live: Arc<Live>) -> CatalogService {
        CatalogService { store, live }
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
        let volumes = summaries
            .into_iter()
            .map(|v| {
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
        let points = self.store.points(&group, limit).unwrap_or_default();
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
        let done = self
            .live
            .order_checkpoint(&group, name.as_str(), request.app_consistent)
            .await?;
        let done = tokio::time::timeout(timeout, done)
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the agent did not take checkpoint {name} within {} s",
                    timeout.as_secs()
                ))
            })?
            .map_err(|_| {
                Status::unavailable(format!(
                    "the agent streaming group {group} went away before answering"
                ))
            })?;
        if !done.error.is_empty() {
            return Err(Status::aborted(format!(
                "checkpoint {name} of group {group} failed: {}",
                done.error
            )));
        }
        if !self.live.wait_seq(&group, Seq(done.seq), timeout).await {
            return Err(Status::deadline_exceeded(format!(
                "checkpoint {name} was taken at seq {} but is not durable here after {} s",
                done.seq,
                timeout.as_secs()
            )));
        }
        Ok(Response::new(v1::CheckpointResponse {
            seq: done.seq,
            time_ns: done.time_ns,
        }))
    }

    type RestoreStream = ReceiverStream<Result<v1::RestoreMessage, Status>>;

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
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
        tokio::task::spawn_blocking(move || stream_plan(&store, &plan, &tx));
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

/// Sends the header and every non-zero extent of `plan`, verified, in offset order.
fn stream_plan(
    store: &Store,
    plan: &RestorePlan,
    tx: &mpsc::Sender<Result<v1::RestoreMessage, Status>>,
) {
    use v1::restore_message::Msg;
    let header = v1::RestoreHeader {
        size_bytes: plan.size_bytes,
        seq: plan.seq.0,
        time_ns: plan.time.0,
    };
    if tx
        .blocking_send(Ok(v1::RestoreMessage {
            msg: Some(Msg::Header(header)),
        }))
        .is_err()
    {
        return;
    }
    let sent = store::for_each_extent(store, plan, RESTORE_EXTENT_BYTES, |offset_bytes, data| {
        let message = v1::RestoreMessage {
            msg: Some(Msg::Extent(v1::Extent {
                offset_bytes,
                data: data.into(),
            })),
        };
        tx.blocking_send(Ok(message))
            .map_err(|_| StreamEnd::ClientGone)
    });
    if let Err(StreamEnd::Failed(e)) = sent {
        tracing::error!(volume = %plan.volume, error = %e, "restore failed");
        let _ = tx.blocking_send(Err(Status::data_loss(e.to_string())));
    }
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
