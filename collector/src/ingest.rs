//! The Ingest service: one bidirectional journal stream per agent group.
//!
//! Each stream is handled by one task that processes messages in order; while a batch is being
//! made durable the task does not read the next message, so HTTP/2 flow control pushes back on
//! the agent (backpressure, not buffering). Replies go through a bounded channel.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use tideline_core::record::Record;
use tideline_core::store::{Store, StoreError, VolumeMeta};
use tideline_core::{GroupName, Seq, TimeNs, BLOCK_SIZE_BYTES};
use tideline_proto::v1::{self, agent_message::Msg as In, collector_message::Msg as Out};
use tideline_proto::{volume_name, WireFrame};

use crate::live::Live;
use crate::stream::{blocking_status, have_reply, on_blocking_pool, pump, OrderedStream};

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

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
        StoreError::Fenced { by, .. } => tideline_proto::fenced_status(message, by),
        StoreError::NotPrimary { epoch, .. } => tideline_proto::fenced_status(message, epoch),
        StoreError::StaleEpoch { current, .. } => tideline_proto::fenced_status(message, current),
        StoreError::UnknownVolume { .. } => Status::not_found(message),
        StoreError::NotRestorable { .. } => Status::failed_precondition(message),
        _ => Status::failed_precondition(message),
    }
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
        if self.live.is_draining(&group) {
            return Err(draining_status(&group));
        }
        let store = self.store.clone();
        let g = group.clone();
        let registration =
            tokio::task::spawn_blocking(move || store.register_agent(&g, spool_id, &volumes))
                .await
                .map_err(blocking_status)?
                .map_err(|e| {
                    tracing::warn!(%group, %agent, error = %e, "journal stream refused");
                    store_status(e)
                })?;
        let (durable, seq_base) = (registration.durable, registration.seq_base);
        tracing::info!(%group, %agent, durable = durable.0, seq_base = seq_base.0, "journal stream opened");
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(reply(Out::Welcome(v1::Welcome {
                durable_seq: durable.0.saturating_sub(seq_base.0),
            })))
            .await;
        let stream_id = self.live.attach(&group, tx.clone());
        let stream = JournalStream {
            store: self.store.clone(),
            live: self.live.clone(),
            group,
            seq_base,
            replies: tx,
        };
        tokio::spawn(async move {
            let (live, group) = (stream.live.clone(), stream.group.clone());
            pump(stream, inbound).await;
            live.detach(&group, stream_id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The status an agent gets while its group is being handed over to the other site.
pub fn draining_status(group: &GroupName) -> Status {
    Status::failed_precondition(format!(
        "group {group} is being handed over to the other site (failback); its agent is refused here"
    ))
}

struct JournalStream {
    store: Arc<Store>,
    live: Arc<Live>,
    group: GroupName,
    /// Journal seq = seq_base + the agent spool's seq.
    seq_base: Seq,
    replies: Replies,
}

impl OrderedStream for JournalStream {
    type Wire = v1::AgentMessage;
    type In = In;
    type Reply = v1::CollectorMessage;
    const WHAT: &'static str = "journal stream";

    fn payload(wire: v1::AgentMessage) -> Option<In> {
        wire.msg
    }

    fn group(&self) -> &GroupName {
        &self.group
    }

    fn replies(&self) -> &Replies {
        &self.replies
    }

    async fn handle(&self, message: In) -> Result<(), Status> {
        match message {
            In::Hello(_) => Err(Status::invalid_argument("Hello sent twice")),
            In::HaveQuery(query) => {
                let reply = have_reply(&self.store, query).await?;
                self.send(Out::HaveReply(reply)).await
            }
            In::Batch(batch) => self.ingest(batch).await,
            In::CheckpointDone(done) => {
                self.live.checkpoint_done(done);
                Ok(())
            }
            In::Heartbeat(hb) => {
                self.live.heartbeat(
                    &self.group,
                    Seq(hb.last_seq.saturating_add(self.seq_base.0)),
                    TimeNs(hb.time_ns),
                );
                Ok(())
            }
        }
    }
}

impl JournalStream {
    async fn ingest(&self, batch: v1::Batch) -> Result<(), Status> {
        if self.live.is_draining(&self.group) {
            return Err(draining_status(&self.group));
        }
        let base = self.seq_base.0;
        let records = batch
            .records
            .iter()
            .map(|wire| {
                let mut record = Record::try_from(wire)?;
                record.seq = Seq(record.seq.0.checked_add(base).ok_or_else(|| {
                    Status::invalid_argument("record.seq: too large for the group's journal")
                })?);
                Ok(record)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let frames = batch
            .frames
            .into_iter()
            .map(WireFrame::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let newest_time = records.last().map(|r| r.time).unwrap_or_default();
        let store = self.store.clone();
        let group = self.group.clone();
        let durable = on_blocking_pool(frames, move |incoming| {
            store.ingest(&group, &records, incoming)
        })
        .await?
        .map_err(store_status)?;
        self.live.durable(&self.group, durable, newest_time);
        self.send(Out::Durable(v1::Durable {
            seq: durable.0.saturating_sub(base),
        }))
        .await
    }

    async fn send(&self, msg: Out) -> Result<(), Status> {
        self.replies
            .send(reply(msg))
            .await
            .map_err(|_| Status::cancelled("agent went away"))
    }
}
