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
    for extent in store::extents(store, plan, RESTORE_EXTENT_BYTES) {
        let message = match extent {
            Ok((offset_bytes, data)) => Ok(v1::RestoreMessage {
                msg: Some(Msg::Extent(v1::Extent {
                    offset_bytes,
                    data: data.into(),
                })),
            }),
            Err(e) => {
                tracing::error!(volume = %plan.volume, error = %e, "restore failed");
                Err(Status::data_loss(e.to_string()))
            }
        };
        let failed = message.is_err();
        if tx.blocking_send(message).is_err() || failed {
            return;
        }
    }
}
