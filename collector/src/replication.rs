//! The Replication service: the receiving end of another site's replicator.
//!
//! One stream per group, handled like an agent's journal stream (one task, messages in order,
//! a batch made durable before the next message is read, so HTTP/2 flow control pushes back on
//! the sender) with two differences: the hello carries the sender's epoch history, which decides
//! whether this site joins the sender's timeline or refuses it as fenced
//! ([`Store::register_replica`]); and records keep the seqs and times the sender gives them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use tideline_core::record::Record;
use tideline_core::store::{Store, StoreError};
use tideline_core::{Epoch, GroupName, Seq, SiteName, TimeNs};
use tideline_proto::v1::{self, replica_message::Msg as In, replica_reply::Msg as Out};
use tideline_proto::{ReplicaHello, WireFrame};

use crate::ingest::store_status;
use crate::live::Live;
use crate::stream::{have_reply, on_blocking_pool, pump, OrderedStream};

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ReplicationService {
    store: Arc<Store>,
    live: Arc<Live>,
    site: SiteName,
}

impl ReplicationService {
    pub fn new(store: Arc<Store>, live: Arc<Live>, site: SiteName) -> ReplicationService {
        ReplicationService { store, live, site }
    }
}

type Replies = mpsc::Sender<Result<v1::ReplicaReply, Status>>;

fn reply(msg: Out) -> Result<v1::ReplicaReply, Status> {
    Ok(v1::ReplicaReply { msg: Some(msg) })
}

fn replica_status(e: StoreError) -> Status {
    match e {
        StoreError::BothPrimary { .. } => Status::failed_precondition(e.to_string()),
        other => store_status(other),
    }
}

#[tonic::async_trait]
impl v1::replication_server::Replication for ReplicationService {
    type StreamStream = ReceiverStream<Result<v1::ReplicaReply, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<v1::ReplicaMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no ReplicaHello within 30 s"))??;
        let Some(v1::ReplicaMessage {
            msg: Some(In::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a replication stream must be ReplicaHello",
            ));
        };
        let hello = ReplicaHello::try_from(hello)?;
        if hello.site == self.site {
            return Err(Status::invalid_argument(format!(
                "site {} is replicating to itself: give the two collectors different --site names and point --replicate-to at the other one",
                self.site
            )));
        }
        let group = hello.group.clone();
        let epoch = hello.offer.history.current();
        let before = self.store.group_info(&group);
        let store = self.store.clone();
        let (g, offer) = (group.clone(), hello.offer.clone());
        let durable = tokio::task::spawn_blocking(move || store.register_replica(&g, &offer))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(|e| {
                tracing::warn!(%group, from = %hello.site, error = %e, "replication stream refused");
                replica_status(e)
            })?;
        if let Some(before) = before {
            if before.durable_seq != durable
                || before.role != tideline_core::store::GroupRole::Replica
            {
                // Joined the sender's timeline: this site's agent (if any) must stop, and
                // durability restarts from the common prefix.
                let time = self.store.record_time(&group, durable).unwrap_or_default();
                self.live.reset(&group, durable, time);
                self.live.kick(
                    &group,
                    tideline_proto::fenced_status(
                        format!(
                            "group {group} is fenced at this site: site {} holds it at {epoch}",
                            hello.site
                        ),
                        epoch,
                    ),
                );
            }
        }
        tracing::info!(%group, from = %hello.site, epoch = epoch.0, durable = durable.0, "replication stream opened");
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(reply(Out::Welcome(v1::ReplicaWelcome {
                site: self.site.to_string(),
                durable_seq: durable.0,
            })))
            .await;
        let stream = ReplicaStream {
            store: self.store.clone(),
            live: self.live.clone(),
            group,
            epoch,
            replies: tx,
        };
        tokio::spawn(pump(stream, inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct ReplicaStream {
    store: Arc<Store>,
    live: Arc<Live>,
    group: GroupName,
    epoch: Epoch,
    replies: Replies,
}

impl OrderedStream for ReplicaStream {
    type Wire = v1::ReplicaMessage;
    type In = In;
    type Reply = v1::ReplicaReply;
    const WHAT: &'static str = "replication stream";

    fn payload(wire: v1::ReplicaMessage) -> Option<In> {
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
            In::Hello(_) => Err(Status::invalid_argument("ReplicaHello sent twice")),
            In::HaveQuery(query) => {
                let reply = have_reply(&self.store, query).await?;
                self.send(Out::HaveReply(reply)).await
            }
            In::Batch(batch) => self.ingest(batch).await,
            In::Heartbeat(hb) => {
                self.live
                    .heartbeat(&self.group, Seq(hb.last_seq), TimeNs(hb.time_ns));
                Ok(())
            }
        }
    }
}

impl ReplicaStream {
    async fn ingest(&self, batch: v1::Batch) -> Result<(), Status> {
        let records = batch
            .records
            .iter()
            .map(Record::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let frames = batch
            .frames
            .into_iter()
            .map(WireFrame::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let newest_time = records.last().map(|r| r.time).unwrap_or_default();
        let (store, group, epoch) = (self.store.clone(), self.group.clone(), self.epoch);
        let durable = on_blocking_pool(frames, move |incoming| {
            store.ingest_replica(&group, epoch, &records, incoming)
        })
        .await?
        .map_err(replica_status)?;
        self.live.durable(&self.group, durable, newest_time);
        self.send(Out::Durable(v1::Durable { seq: durable.0 }))
            .await
    }

    async fn send(&self, msg: Out) -> Result<(), Status> {
        self.replies
            .send(reply(msg))
            .await
            .map_err(|_| Status::cancelled("sending site went away"))
    }
}
