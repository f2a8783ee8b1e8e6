//! The Ingest service: one bidirectional journal stream per agent group.
//!
//! Each stream is handled by two tasks. The reader takes messages in order, converts them,
//! answers have-queries at once (from the durable chunk index) and hands batches to the writer
//! through a channel of [`MAX_QUEUED_BATCHES`]; when that is full the reader stops reading, so
//! HTTP/2 flow control pushes back on the agent (backpressure, not buffering). The writer makes
//! batches durable in order. Batches that queued up while it was busy are committed together
//! (group commit: one pack fsync and one catalog fsync for all of them, one `Durable` for the
//! newest seq), so the agent's next batch is prepared while the previous ones are verified and
//! written. Replies go through a bounded channel.
//!
//! A have-query answered while earlier batches are still queued may name chunks those batches
//! carry as missing; the agent does not ask about chunks of its unacknowledged batches, and a
//! chunk sent twice is stored once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use tideline_core::record::Record;
use tideline_core::store::{IncomingFrame, Store, StoreError, VolumeMeta};
use tideline_core::{GroupName, Seq, TimeNs, BLOCK_SIZE_BYTES};
use tideline_proto::v1::{self, agent_message::Msg as In, collector_message::Msg as Out};
use tideline_proto::{volume_name, WireFrame};

use crate::live::Live;

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Batches received and not yet durable, per stream.
pub const MAX_QUEUED_BATCHES: usize = 4;
/// Most batches committed together.
const MAX_GROUP_COMMIT: usize = 8;

pub struct IngestService {
    store: Arc<Store>,
    live: Arc<Live>,
}

impl IngestService {
    pub fn new(store: Arc<Store>, live: Arc<Live>) -> IngestService {
        IngestService { store, live }
    }
}

type Replies = mpsc::Sender<Result<v1::CollectorMessage, Status>>;

fn reply(msg: Out) -> Result<v1::CollectorMessage, Status> {
    Ok(v1::CollectorMessage { msg: Some(msg) })
}

/// Maps a store error to the status an agent (or a lying client) receives.
pub fn store_status(e: StoreError) -> Status {
    let message = e.to_string();
    match e {
        StoreError::ChunkMismatch { .. } | StoreError::MissingChunk { .. } => {
            Status::invalid_argument(message)
        }
        StoreError::SeqGap { .. } => Status::out_of_range(message),
        StoreError::UnknownVolume { .. } => Status::not_found(message),
        StoreError::NotRestorable { .. } => Status::failed_precondition(message),
        _ => Status::failed_precondition(message),
    }
}

fn blocking_status(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("store task failed: {e}"))
}

fn parse_hello(hello: v1::Hello) -> Result<(GroupName, Vec<VolumeMeta>, u64), Status> {
    let group = GroupName::new(hello.group.as_str())
        .map_err(|e| Status::invalid_argument(format!("hello.group: {e}")))?;
    if hello.volumes.is_empty() {
        return Err(Status::invalid_argument(
            "hello.volumes: a group needs at least one volume",
        ));
    }
    let mut volumes = Vec::new();
    for v in &hello.volumes {
        let name = volume_name("hello.volumes.name", &v.name)?;
        if v.size_bytes == 0 || !v.size_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
            return Err(Status::invalid_argument(format!(
                "hello.volumes: volume {name} size {} is not a positive multiple of {BLOCK_SIZE_BYTES}",
                v.size_bytes
            )));
        }
        volumes.push(VolumeMeta {
            name,
            size_bytes: v.size_bytes,
        });
    }
    Ok((group, volumes, hello.spool_id))
}

#[tonic::async_trait]
impl v1::ingest_server::Ingest for IngestService {
    type JournalStream = ReceiverStream<Result<v1::CollectorMessage, Status>>;

    async fn journal(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::JournalStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30 s"))??;
        let Some(v1::AgentMessage {
            msg: Some(In::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a journal stream must be Hello",
            ));
        };
        let agent = hello.agent_id.clone();
        let (group, volumes, spool_id) = parse_hello(hello)?;
        let store = self.store.clone();
        let g = group.clone();
        let durable =
            tokio::task::spawn_blocking(move || store.register_group(&g, spool_id, &volumes))
                .await
                .map_err(blocking_status)?
                .map_err(store_status)?;
        tracing::info!(%group, %agent, durable = durable.0, "journal stream opened");
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(reply(Out::Welcome(v1::Welcome {
                durable_seq: durable.0,
            })))
            .await;
        let stream_id = self.live.attach(&group, tx.clone());
        let stream = JournalStream {
            store: self.store.clone(),
            live: self.live.clone(),
            group,
            replies: tx,
        };
        tokio::spawn(async move {
            let (live, group) = (stream.live.clone(), stream.group.clone());
            stream.run(inbound).await;
            live.detach(&group, stream_id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct JournalStream {
    store: Arc<Store>,
    live: Arc<Live>,
    group: GroupName,
    replies: Replies,
}

/// A batch converted into core types, waiting for the writer.
struct Pending {
    records: Vec<Record>,
    frames: Vec<WireFrame>,
}

impl JournalStream {
    async fn run(self, mut inbound: Streaming<v1::AgentMessage>) {
        let (batches, queue) = mpsc::channel(MAX_QUEUED_BATCHES);
        let writer = tokio::spawn(Writer::from(&self).run(queue));
        loop {
            let message = match inbound.message().await {
                Ok(Some(v1::AgentMessage { msg: Some(m) })) => m,
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(group = %self.group, message = status.message(), "journal stream broken");
                    break;
                }
            };
            if let Err(status) = self.handle(message, &batches).await {
                tracing::warn!(group = %self.group, code = ?status.code(), message = status.message(), "journal stream refused");
                let _ = self.replies.send(Err(status)).await;
                break;
            }
        }
        drop(batches);
        let _ = writer.await;
    }

    async fn handle(&self, message: In, batches: &mpsc::Sender<Pending>) -> Result<(), Status> {
        match message {
            In::Hello(_) => Err(Status::invalid_argument("Hello sent twice")),
            In::HaveQuery(query) => {
                let hashes = query
                    .hashes
                    .iter()
                    .map(|h| {
                        tideline_proto::chunk_hash("have_query.hashes", h, false)
                            .map(|h| h.unwrap_or(tideline_core::ChunkHash([0; 32])))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let missing = self.store.missing(&hashes);
                self.send(Out::HaveReply(v1::HaveReply {
                    query_id: query.query_id,
                    missing,
                }))
                .await
            }
            In::Batch(batch) => {
                let pending = Pending {
                    records: batch
                        .records
                        .iter()
                        .map(Record::try_from)
                        .collect::<Result<Vec<_>, _>>()?,
                    frames: batch
                        .frames
                        .into_iter()
                        .map(WireFrame::try_from)
                        .collect::<Result<Vec<_>, _>>()?,
                };
                // Fails only once the writer stopped, after it sent the reason to the agent.
                batches
                    .send(pending)
                    .await
                    .map_err(|_| Status::aborted("an earlier batch of this stream was refused"))
            }
            In::CheckpointDone(done) => {
                self.live.checkpoint_done(done);
                Ok(())
            }
            In::Heartbeat(hb) => {
                self.live
                    .heartbeat(&self.group, Seq(hb.last_seq), TimeNs(hb.time_ns));
                Ok(())
            }
        }
    }

    async fn send(&self, msg: Out) -> Result<(), Status> {
        self.replies
            .send(reply(msg))
            .await
            .map_err(|_| Status::cancelled("agent went away"))
    }
}

/// The stream's writer: makes queued batches durable, in order, committing together those
/// that queued up while it was busy.
struct Writer {
    store: Arc<Store>,
    live: Arc<Live>,
    group: GroupName,
    replies: Replies,
}

impl From<&JournalStream> for Writer {
    fn from(stream: &JournalStream) -> Writer {
        Writer {
            store: stream.store.clone(),
            live: stream.live.clone(),
            group: stream.group.clone(),
            replies: stream.replies.clone(),
        }
    }
}

impl Writer {
    async fn run(self, mut queue: mpsc::Receiver<Pending>) {
        while let Some(first) = queue.recv().await {
            let mut pending = vec![first];
            while pending.len() < MAX_GROUP_COMMIT {
                match queue.try_recv() {
                    Ok(next) => pending.push(next),
                    Err(_) => break,
                }
            }
            if let Err(status) = self.commit(pending).await {
                tracing::warn!(group = %self.group, code = ?status.code(), message = status.message(), "journal stream refused");
                let _ = self.replies.send(Err(status)).await;
                return;
            }
        }
    }

    /// Makes `pending` durable and answers `Durable` with the newest seq.
    async fn commit(&self, pending: Vec<Pending>) -> Result<(), Status> {
        let newest_time = pending
            .iter()
            .rev()
            .find_map(|p| p.records.last())
            .map(|r| r.time)
            .unwrap_or_default();
        let store = self.store.clone();
        let group = self.group.clone();
        let durable = tokio::task::spawn_blocking(move || ingest_group(&store, &group, &pending))
            .await
            .map_err(blocking_status)?
            .map_err(store_status)?;
        self.live.durable(&self.group, durable, newest_time);
        self.replies
            .send(reply(Out::Durable(v1::Durable { seq: durable.0 })))
            .await
            .map_err(|_| Status::cancelled("agent went away"))
    }
}

/// Ingests consecutive batches as one (one catalog entry, two fsyncs). If that is refused, they
/// are ingested one by one, so that the batches before a bad one are still stored and the error
/// is the bad batch's own.
fn ingest_group(store: &Store, group: &GroupName, pending: &[Pending]) -> Result<Seq, StoreError> {
    if pending.len() > 1 {
        let all: Vec<&Pending> = pending.iter().collect();
        let records: Vec<Record> = all.iter().flat_map(|p| p.records.iter().cloned()).collect();
        if let Ok(durable) = store.ingest(group, &records, &incoming(&all)) {
            return Ok(durable);
        }
    }
    let mut durable = Seq::ZERO;
    for p in pending {
        durable = store.ingest(group, &p.records, &incoming(&[p]))?;
    }
    Ok(durable)
}

/// The frames of `pending`, in order, as the store takes them.
fn incoming<'a>(pending: &[&'a Pending]) -> Vec<IncomingFrame<'a>> {
    pending
        .iter()
        .flat_map(|p| &p.frames)
        .map(|f| IncomingFrame {
            hashes: &f.hashes,
            zstd_data: &f.zstd_data,
        })
        .collect()
}
