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
use tideline_core::store::{IncomingFrame, Store, StoreError, Succession, VolumeMeta};
use tideline_core::{GroupName, Seq, SeqBase, TimeNs, BLOCK_SIZE_BYTES};
use tideline_proto::v1::{self, agent_message::Msg as In, collector_message::Msg as Out};
use tideline_proto::{volume_name, WireFrame};

use crate::live::Live;
use crate::stream::{blocking_status, have_reply, pump, OrderedStream};

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
        StoreError::Fenced { by, .. } => tideline_proto::fenced_status(message, by),
        StoreError::NotPrimary { epoch, .. } => tideline_proto::fenced_status(message, epoch),
        StoreError::StaleEpoch { current, .. } => tideline_proto::fenced_status(message, current),
        StoreError::UnknownVolume { .. } => Status::not_found(message),
        StoreError::NotRestorable { .. } => Status::failed_precondition(message),
        _ => Status::failed_precondition(message),
    }
}

/// What a Hello registers.
struct Hello {
    group: GroupName,
    volumes: Vec<VolumeMeta>,
    spool_id: u64,
    succeeds: Option<Succession>,
}

fn parse_hello(hello: v1::Hello) -> Result<Hello, Status> {
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
    let succeeds = hello.succeeds.map(|s| Succession {
        predecessor: s.predecessor_spool_id,
        resume_after: Seq(s.resume_after),
    });
    Ok(Hello {
        group,
        volumes,
        spool_id: hello.spool_id,
        succeeds,
    })
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
        let Hello {
            group,
            volumes,
            spool_id,
            succeeds,
        } = parse_hello(hello)?;
        if self.live.is_draining(&group) {
            return Err(draining_status(&group));
        }
        let store = self.store.clone();
        let g = group.clone();
        let registration = tokio::task::spawn_blocking(move || {
            store.register_agent(&g, spool_id, succeeds, &volumes)
        })
        .await
        .map_err(blocking_status)?
        .map_err(|e| {
            tracing::warn!(%group, %agent, error = %e, "journal stream refused");
            store_status(e)
        })?;
        let (durable, seq_base) = (registration.durable, registration.seq_base);
        let durable_record = registration.durable_record.map(|mut record| {
            record.seq = Seq(seq_base.spool_seq(record.seq));
            v1::Record::from(&record)
        });
        tracing::info!(%group, %agent, durable = durable.0, seq_base = seq_base.0, "journal stream opened");
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(reply(Out::Welcome(v1::Welcome {
                durable_seq: seq_base.spool_seq(durable),
                durable_record,
            })))
            .await;
        let stream_id = self.live.attach(&group, tx.clone());
        let (batches, queue) = mpsc::channel(MAX_QUEUED_BATCHES);
        let writer = Writer {
            store: self.store.clone(),
            live: self.live.clone(),
            group: group.clone(),
            seq_base,
            replies: tx.clone(),
        };
        let stream = JournalStream {
            store: self.store.clone(),
            live: self.live.clone(),
            group,
            seq_base,
            replies: tx,
            batches,
        };
        tokio::spawn(async move {
            let (live, group) = (stream.live.clone(), stream.group.clone());
            let writing = tokio::spawn(writer.run(queue));
            // The reader ends first and drops its end of the queue; the writer finishes what is
            // queued before the stream is detached.
            pump(stream, inbound).await;
            let _ = writing.await;
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
    /// Journal seq = the agent spool's seq + seq_base.
    seq_base: SeqBase,
    replies: Replies,
    batches: mpsc::Sender<Pending>,
}

/// A batch converted into core types (seqs already in the group's journal), waiting for the
/// writer.
struct Pending {
    records: Vec<Record>,
    frames: Vec<WireFrame>,
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
                // The agent numbers records in its spool; the journal's seq adds the base.
                let answer = if done.error.is_empty() {
                    let seq = self.seq_base.journal_seq(done.seq).ok_or_else(|| {
                        Status::invalid_argument("checkpoint_done.seq: outside the group's journal")
                    })?;
                    Ok((seq, TimeNs(done.time_ns)))
                } else {
                    Err(done.error)
                };
                self.live
                    .checkpoint_done(&self.group, done.request_id, answer);
                Ok(())
            }
            In::Heartbeat(hb) => {
                self.live.heartbeat(
                    &self.group,
                    self.seq_base.journal_seq(hb.last_seq).unwrap_or(Seq::ZERO),
                    TimeNs(hb.time_ns),
                );
                Ok(())
            }
        }
    }
}

impl JournalStream {
    /// Converts a batch and queues it for the writer.
    async fn ingest(&self, batch: v1::Batch) -> Result<(), Status> {
        if self.live.is_draining(&self.group) {
            return Err(draining_status(&self.group));
        }
        let records = batch
            .records
            .iter()
            .map(|wire| {
                let mut record = Record::try_from(wire)?;
                record.seq = self.seq_base.journal_seq(record.seq.0).ok_or_else(|| {
                    Status::invalid_argument("record.seq: outside the group's journal")
                })?;
                Ok(record)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let frames = batch
            .frames
            .into_iter()
            .map(WireFrame::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        // Fails only once the writer stopped, after it sent the reason to the agent.
        self.batches
            .send(Pending { records, frames })
            .await
            .map_err(|_| Status::aborted("an earlier batch of this stream was refused"))
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
    seq_base: SeqBase,
    replies: Replies,
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

    /// Makes `pending` durable and answers `Durable` with the newest seq (in the agent's
    /// numbering).
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
            .send(reply(Out::Durable(v1::Durable {
                seq: self.seq_base.spool_seq(durable),
            })))
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
