//! What an agent's journal stream and another site's replication stream share: one task per
//! stream reading messages in order, the chunk-presence query, and batches made durable on the
//! blocking pool (the store fsyncs, which must never stall a runtime thread).

use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use tideline_core::store::{IncomingFrame, Store};
use tideline_core::{ChunkHash, GroupName};
use tideline_proto::v1;
use tideline_proto::WireFrame;

/// One side of a bidirectional stream whose messages are handled one at a time, in order.
pub(crate) trait OrderedStream {
    /// The wire message the peer sends.
    type Wire;
    /// Its payload.
    type In;
    /// The reply type sent back.
    type Reply;
    /// Names the stream in logs ("journal stream", "replication stream").
    const WHAT: &'static str;

    fn payload(wire: Self::Wire) -> Option<Self::In>;
    fn group(&self) -> &GroupName;
    fn replies(&self) -> &mpsc::Sender<Result<Self::Reply, Status>>;
    /// Handles one message; an error ends the stream and is sent to the peer as its status.
    async fn handle(&self, message: Self::In) -> Result<(), Status>;
}

/// Reads `inbound` until the peer ends it, it breaks, or a message is refused. A batch is
/// durable before the next message is read, so HTTP/2 flow control pushes back on the peer.
pub(crate) async fn pump<S: OrderedStream>(stream: S, mut inbound: Streaming<S::Wire>) {
    loop {
        let message = match inbound.message().await {
            Ok(Some(wire)) => match S::payload(wire) {
                Some(message) => message,
                None => continue,
            },
            Ok(None) => break,
            Err(status) => {
                tracing::info!(group = %stream.group(), message = status.message(), "{} broken", S::WHAT);
                break;
            }
        };
        if let Err(status) = stream.handle(message).await {
            tracing::warn!(group = %stream.group(), code = ?status.code(), message = status.message(), "{} refused", S::WHAT);
            let _ = stream.replies().send(Err(status)).await;
            break;
        }
    }
}

/// Answers a HaveQuery: the indexes of the hashes this store lacks.
pub(crate) async fn have_reply(
    store: &Arc<Store>,
    query: v1::HaveQuery,
) -> Result<v1::HaveReply, Status> {
    let hashes = query
        .hashes
        .iter()
        .map(|h| {
            tideline_proto::chunk_hash("have_query.hashes", h, false)
                .map(|h| h.unwrap_or(ChunkHash([0; 32])))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let store = store.clone();
    let missing = tokio::task::spawn_blocking(move || store.missing(&hashes))
        .await
        .map_err(blocking_status)?;
    Ok(v1::HaveReply {
        query_id: query.query_id,
        missing,
    })
}

/// Runs `ingest` over `frames` on the blocking pool.
pub(crate) async fn on_blocking_pool<T: Send + 'static>(
    frames: Vec<WireFrame>,
    ingest: impl FnOnce(&[IncomingFrame<'_>]) -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(move || {
        let incoming: Vec<IncomingFrame<'_>> = frames
            .iter()
            .map(|f| IncomingFrame {
                hashes: &f.hashes,
                zstd_data: &f.zstd_data,
            })
            .collect();
        ingest(&incoming)
    })
    .await
    .map_err(blocking_status)
}

pub(crate) fn blocking_status(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("store task failed: {e}"))
}
