//! The replicator: streams every group this site is primary for to the other site's collector.
//!
//! A supervisor starts one task per primary group (and notices new groups and role changes).
//! Each task opens a `Replication.Stream`, says which epoch history it offers, learns the
//! replica's durable seq and streams the store's records after it, with only the chunks the
//! replica lacks (a `HaveQuery` per batch, as the agent does): a stored frame of which at least
//! half the blocks are wanted goes as it is stored (checked against its hashes, not compressed
//! again), the other wanted chunks are compressed into new zstd frames.
//! Records keep their seqs and agent times; the replica skips seqs it holds, so a resend after
//! either side was killed applies nothing twice. While caught up it forwards this site's
//! durable-through time as heartbeats, so the replica knows how recent its copy is.
//!
//! Bounded: at most [`MAX_BATCHES_IN_FLIGHT`] unacknowledged batches of at most
//! [`BATCH_MAX_BLOCK_BYTES`] of block data each. After a failure the task reconnects with
//! capped exponential backoff. If the replica refuses the hello because it holds the group at a
//! newer epoch, this site is fenced: the fence is persisted, the group's agent stream is cut,
//! and the task ends.
//!
//! A chunk crosses the link once, whichever group names it: a chunk one group's batch is
//! sending is *claimed* until that batch is acknowledged, and a batch of another group that
//! needs it waits for the claim to go, then asks again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;

use tideline_core::frame::{self, DEFAULT_ZSTD_LEVEL, MAX_FRAME_BLOCKS};
use tideline_core::record::{Record, RecordKind};
use tideline_core::store::{GroupRole, Store};
use tideline_core::{ChunkHash, Epoch, GroupName, Seq, SiteName, TimeNs, BLOCK_SIZE};
use tideline_proto::v1::{self, replica_message::Msg as Out, replica_reply::Msg as In};
use tideline_proto::ReplicaHello;

use crate::live::Live;
use crate::MAX_MESSAGE_BYTES;

/// Most block data (4 KiB per written block, zero blocks included) in one replicated batch.
pub const BATCH_MAX_BLOCK_BYTES: u64 = 8 << 20;
/// Most records in one replicated batch.
pub const BATCH_MAX_RECORDS: usize = 4096;
/// Unacknowledged batches per group.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const CLAIM_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    pub site: SiteName,
    pub peer_url: String,
}

/// Runs until `shutdown` flips to true.
pub async fn run(
    store: Arc<Store>,
    live: Arc<Live>,
    config: ReplicatorConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(peer = %config.peer_url, site = %config.site, "replicating primary groups");
    let claims = Arc::new(Claims::default());
    let mut tasks: HashMap<GroupName, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tasks.retain(|_, task| !task.is_finished());
        let groups = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.groups())
                .await
                .unwrap_or_default()
        };
        for info in groups {
            if info.role != GroupRole::Primary || tasks.contains_key(&info.name) {
                continue;
            }
            let task = GroupReplicator {
                store: store.clone(),
                live: live.clone(),
                config: config.clone(),
                group: info.name.clone(),
                claims: claims.clone(),
            };
            tasks.insert(info.name, tokio::spawn(task.run(shutdown.clone())));
        }
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISE_EVERY) => {}
            _ = shutdown.wait_for(|&stop| stop) => break,
        }
    }
    for (_, task) in tasks {
        let _ = task.await;
    }
}

/// Chunks being sent by some group's unacknowledged batch.
#[derive(Default)]
struct Claims {
    held: Mutex<Held>,
    released: Notify,
}

/// Releases remembered, so that a have-reply older than a release can be recognised as stale.
const REMEMBERED_RELEASES: usize = 64;

#[derive(Default)]
struct Held {
    claimed: HashSet<ChunkHash>,
    /// Counts releases; a have-query remembers the count it was asked at.
    generation: u64,
    /// The newest releases: (generation after it, the chunks it released).
    recent: VecDeque<(u64, Vec<ChunkHash>)>,
}

/// What [`Claims::try_claim`] found.
enum ClaimOutcome {
    Claimed(Claim),
    /// Another batch is sending some of the chunks: wait for a release, then ask again.
    Busy,
    /// A batch holding some of the chunks was acknowledged after the replica answered: the
    /// answer may be out of date, ask again.
    Stale,
}

/// Chunks one batch claimed; released when dropped (acknowledged, or the session ended).
struct Claim {
    claims: Arc<Claims>,
    hashes: Vec<ChunkHash>,
}

impl Claims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The release count now; pass it to [`Claims::try_claim`] for a query asked after this.
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Claims all of `hashes` for one batch, or none: if another batch holds any of them, or if
    /// a batch released since `asked_at` (the replica's answer predates its acknowledgement)
    /// held any of them.
    fn try_claim(self: &Arc<Self>, hashes: &[ChunkHash], asked_at: u64) -> ClaimOutcome {
        let mut held = self.lock();
        if hashes.iter().any(|h| held.claimed.contains(h)) {
            return ClaimOutcome::Busy;
        }
        if held.generation != asked_at && released_since(&held, asked_at, hashes) {
            return ClaimOutcome::Stale;
        }
        held.claimed.extend(hashes.iter().copied());
        ClaimOutcome::Claimed(Claim {
            claims: self.clone(),
            hashes: hashes.to_vec(),
        })
    }
}

/// True if a release after `asked_at` may have held one of `hashes` (also when that history
/// is no longer remembered).
fn released_since(held: &Held, asked_at: u64, hashes: &[ChunkHash]) -> bool {
    let remembered_from = held.recent.front().map_or(u64::MAX, |(g, _)| *g);
    if remembered_from > asked_at + 1 {
        return true;
    }
    let wanted: HashSet<&ChunkHash> = hashes.iter().collect();
    held.recent
        .iter()
        .filter(|(g, _)| *g > asked_at)
        .any(|(_, released)| released.iter().any(|h| wanted.contains(h)))
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut held = self.claims.lock();
        for h in &self.hashes {
            held.claimed.remove(h);
        }
        held.generation += 1;
        let generation = held.generation;
        held.recent
            .push_back((generation, std::mem::take(&mut self.hashes)));
        while held.recent.len() > REMEMBERED_RELEASES {
            held.recent.pop_front();
        }
        drop(held);
        self.claims.released.notify_waiters();
    }
}

/// Why a replication session ended.
enum End {
    /// The replica holds the group at a newer epoch.
    Fenced(Epoch, String),
    /// This site is no longer primary for the group.
    NotPrimary,
    Failed(String),
}

impl From<String> for End {
    fn from(e: String) -> End {
        End::Failed(e)
    }
}

struct GroupReplicator {
    store: Arc<Store>,
    live: Arc<Live>,
    config: ReplicatorConfig,
    group: GroupName,
    claims: Arc<Claims>,
}

impl GroupReplicator {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        self.live
            .replica(&self.group, |r| r.url = self.config.peer_url.clone());
        loop {
            let end = tokio::select! {
                end = self.session() => end,
                _ = shutdown.wait_for(|&stop| stop) => return,
            };
            let message = match end {
                End::NotPrimary => {
                    tracing::info!(group = %self.group, "not primary here any more; replication of the group stops");
                    self.live.replica(&self.group, |r| r.connected = false);
                    return;
                }
                End::Fenced(epoch, message) => {
                    self.fence(epoch, message).await;
                    return;
                }
                End::Failed(message) => message,
            };
            let was_connected = self.live.replica(&self.group, |r| {
                let was = r.connected;
                r.connected = false;
                r.last_error = Some(message.clone());
                was
            });
            if was_connected {
                backoff = BACKOFF_MIN;
            }
            tracing::warn!(group = %self.group, peer = %self.config.peer_url, error = %message, retry_in_ms = backoff.as_millis() as u64, "replication stream ended");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|&stop| stop) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// The other site holds the group at `epoch`: stop accepting its writes here.
    async fn fence(&self, epoch: Epoch, message: String) {
        tracing::error!(group = %self.group, epoch = epoch.0, %message, "the other site refused replication: this site is fenced for the group");
        let (store, group) = (self.store.clone(), self.group.clone());
        match tokio::task::spawn_blocking(move || store.fence(&group, epoch)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(group = %self.group, error = %e, "could not persist the fence")
            }
            Err(e) => tracing::error!(group = %self.group, error = %e, "fence task failed"),
        }
        self.live.kick(
            &self.group,
            tideline_proto::fenced_status(
                format!(
                    "group {} is fenced at this site: another site took it over at {epoch}; its writes are accepted there only",
                    self.group
                ),
                epoch,
            ),
        );
        self.live.replica(&self.group, |r| {
            r.connected = false;
            r.last_error = Some(format!("fenced: {message}"));
        });
    }

    fn is_primary(&self) -> bool {
        self.store
            .group_info(&self.group)
            .is_some_and(|g| g.role == GroupRole::Primary)
    }

    async fn session(&self) -> End {
        let Some(info) = self.store.group_info(&self.group) else {
            return End::NotPrimary;
        };
        if info.role != GroupRole::Primary {
            return End::NotPrimary;
        }
        let endpoint = match tideline_proto::http2::endpoint(&self.config.peer_url) {
            Ok(e) => e,
            Err(e) => return End::Failed(format!("bad --replicate-to URL: {e}")),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return End::Failed(format!("connect to {}: {e}", self.config.peer_url)),
        };
        let mut client = v1::replication_client::ReplicationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        let hello = ReplicaHello {
            site: self.config.site.clone(),
            group: self.group.clone(),
            offer: info.offer(),
        };
        let epoch = info.epoch;
        if let Err(e) = send(&tx, Out::Hello(v1::ReplicaHello::from(&hello))).await {
            return e.into();
        }
        let refused = |status: tonic::Status| match tideline_proto::fenced_epoch(&status) {
            Some(epoch) => End::Fenced(epoch, status.message().to_owned()),
            None => End::Failed(format!("replica refused the group: {}", status.message())),
        };
        let mut inbound = match client.stream(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return refused(status),
        };
        let (peer_site, durable) = match inbound.message().await {
            Ok(Some(v1::ReplicaReply {
                msg: Some(In::Welcome(w)),
            })) => (w.site, Seq(w.durable_seq)),
            Ok(_) => return End::Failed("replica did not answer the hello".into()),
            Err(status) => return refused(status),
        };
        tracing::info!(group = %self.group, peer = %peer_site, epoch = epoch.0, durable = durable.0, "replication stream open");
        let peer_time = self.store.record_time(&self.group, durable);
        self.live.replica(&self.group, |r| {
            r.site = peer_site;
            r.connected = true;
            r.last_error = None;
            r.durable_seq = durable;
            if let Some(t) = peer_time {
                r.durable_through = r.durable_through.max(t);
            }
        });
        let (reply_tx, reply_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
        let (durable_tx, durable_rx) = watch::channel(durable);
        let (fail_tx, fail_rx) = watch::channel(None);
        let _receiver = AbortOnDrop(tokio::spawn(receive(
            inbound, reply_tx, durable_tx, fail_tx,
        )));
        let end = self.pump(durable, &tx, reply_rx, durable_rx).await;
        // A refusal the receiver saw explains the end better than the closed channel did.
        let failure = fail_rx.borrow().clone();
        match failure {
            Some(status) => refused(status),
            None => end,
        }
    }

    async fn pump(
        &self,
        durable: Seq,
        tx: &mpsc::Sender<v1::ReplicaMessage>,
        mut replies: mpsc::Receiver<Vec<u32>>,
        mut durable_rx: watch::Receiver<Seq>,
    ) -> End {
        let mut changes = self.live.subscribe();
        let mut next_after = durable;
        let mut in_flight: VecDeque<(Seq, TimeNs, Option<Claim>)> = VecDeque::new();
        let mut query_id = 0u64;
        loop {
            let acked = *durable_rx.borrow_and_update();
            let mut acked_time = None;
            while in_flight.front().is_some_and(|(s, _, _)| *s <= acked) {
                if let Some((_, time, _claim)) = in_flight.pop_front() {
                    acked_time = Some(time);
                }
            }
            self.live.replica(&self.group, |r| {
                r.durable_seq = r.durable_seq.max(acked);
                if let Some(t) = acked_time {
                    r.durable_through = r.durable_through.max(t);
                }
            });
            if !self.is_primary() {
                return End::NotPrimary;
            }
            if in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
                if durable_rx.changed().await.is_err() {
                    return End::Failed("replica stream closed".into());
                }
                continue;
            }
            let records = {
                let (store, group) = (self.store.clone(), self.group.clone());
                match tokio::task::spawn_blocking(move || {
                    store.records_after(
                        &group,
                        next_after,
                        BATCH_MAX_RECORDS,
                        BATCH_MAX_BLOCK_BYTES,
                    )
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => return End::Failed(e.to_string()),
                }
            };
            let Some(last) = records.last().map(|r| (r.seq, r.time)) else {
                // Caught up: tell the replica how recent everything is, then wait for news.
                let local = self.live.get(&self.group);
                if local.durable_seq <= next_after && local.durable_through.0 > 0 {
                    let heartbeat = v1::Heartbeat {
                        last_seq: local.durable_seq.0,
                        time_ns: local.durable_through.0,
                    };
                    if let Err(e) = self.send_counted(tx, Out::Heartbeat(heartbeat)).await {
                        return e;
                    }
                    if acked >= local.durable_seq {
                        self.live.replica(&self.group, |r| {
                            r.durable_through = r.durable_through.max(local.durable_through)
                        });
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                    r = changes.changed() => { if r.is_err() { return End::Failed("shutting down".into()); } }
                    r = durable_rx.changed() => { if r.is_err() { return End::Failed("replica stream closed".into()); } }
                }
                continue;
            };
            let chunks = unique_chunks(&records);
            let (missing, claim) = match self
                .query_and_claim(tx, &mut replies, &mut query_id, &chunks)
                .await
            {
                Ok(x) => x,
                Err(e) => return e,
            };
            let batch = {
                let store = self.store.clone();
                let wanted: Vec<ChunkHash> = missing.iter().map(|&i| chunks[i as usize]).collect();
                match tokio::task::spawn_blocking(move || build_batch(&store, records, &wanted))
                    .await
                {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => return End::Failed(e),
                    Err(e) => return End::Failed(e.to_string()),
                }
            };
            let chunk_bytes: u64 = batch.frames.iter().map(|f| f.zstd_data.len() as u64).sum();
            let records_sent = batch.records.len() as u64;
            if let Err(e) = self.send_counted(tx, Out::Batch(batch)).await {
                return e;
            }
            self.live.replica(&self.group, |r| {
                r.chunk_bytes_sent += chunk_bytes;
                r.chunks_sent += missing.len() as u64;
                r.records_sent += records_sent;
            });
            in_flight.push_back((last.0, last.1, claim));
            next_after = last.0;
        }
    }

    /// Asks which chunks the replica lacks and claims them; waits (and asks again) while
    /// another group's unacknowledged batch is sending some of them.
    async fn query_and_claim(
        &self,
        tx: &mpsc::Sender<v1::ReplicaMessage>,
        replies: &mut mpsc::Receiver<Vec<u32>>,
        query_id: &mut u64,
        chunks: &[ChunkHash],
    ) -> Result<(Vec<u32>, Option<Claim>), End> {
        if chunks.is_empty() {
            return Ok((Vec::new(), None));
        }
        loop {
            let asked_at = self.claims.generation();
            *query_id += 1;
            let hashes = chunks
                .iter()
                .map(|h| Bytes::copy_from_slice(&h.0))
                .collect();
            self.send_counted(
                tx,
                Out::HaveQuery(v1::HaveQuery {
                    query_id: *query_id,
                    hashes,
                }),
            )
            .await?;
            let missing = replies
                .recv()
                .await
                .ok_or_else(|| End::Failed("replica stream closed".into()))?;
            if missing.iter().any(|&i| i as usize >= chunks.len()) {
                return Err(End::Failed(
                    "replica answered a have-query with an index out of range".into(),
                ));
            }
            let wanted: Vec<ChunkHash> = missing.iter().map(|&i| chunks[i as usize]).collect();
            let released = self.claims.released.notified();
            match self.claims.try_claim(&wanted, asked_at) {
                ClaimOutcome::Claimed(claim) => return Ok((missing, Some(claim))),
                ClaimOutcome::Stale => continue,
                ClaimOutcome::Busy => {
                    let _ = tokio::time::timeout(CLAIM_WAIT, released).await;
                }
            }
        }
    }

    async fn send_counted(
        &self,
        tx: &mpsc::Sender<v1::ReplicaMessage>,
        msg: Out,
    ) -> Result<(), End> {
        let message = v1::ReplicaMessage { msg: Some(msg) };
        let bytes = message.encoded_len() as u64;
        tx.send(message)
            .await
            .map_err(|_| End::Failed("replication stream closed".into()))?;
        self.live.replica(&self.group, |r| r.bytes_sent += bytes);
        Ok(())
    }
}

async fn send(tx: &mpsc::Sender<v1::ReplicaMessage>, msg: Out) -> Result<(), String> {
    tx.send(v1::ReplicaMessage { msg: Some(msg) })
        .await
        .map_err(|_| "replication stream closed".to_owned())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dispatches the replica's answers: have-replies to the pump, durable seqs to a watch, a
/// refusal to `failed`.
async fn receive(
    mut inbound: tonic::Streaming<v1::ReplicaReply>,
    replies: mpsc::Sender<Vec<u32>>,
    durable: watch::Sender<Seq>,
    failed: watch::Sender<Option<tonic::Status>>,
) {
    loop {
        match inbound.message().await {
            Ok(Some(v1::ReplicaReply {
                msg: Some(In::HaveReply(reply)),
            })) => {
                if replies.send(reply.missing).await.is_err() {
                    return;
                }
            }
            Ok(Some(v1::ReplicaReply {
                msg: Some(In::Durable(d)),
            })) => durable.send_modify(|s| *s = (*s).max(Seq(d.seq))),
            Ok(Some(_)) => tracing::warn!("unexpected message from the replica ignored"),
            Ok(None) => return,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "replica ended the stream");
                let _ = failed.send(Some(status));
                return;
            }
        }
    }
}

/// Distinct non-zero chunks the records name, in first-seen order.
fn unique_chunks(records: &[Record]) -> Vec<ChunkHash> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for record in records {
        if let RecordKind::Write { blocks, .. } = &record.kind {
            for hash in blocks.iter().flatten() {
                if seen.insert(*hash) {
                    out.push(*hash);
                }
            }
        }
    }
    out
}

/// Builds the batch: the stored frames of which at least half the blocks are wanted go as they
/// are stored (checked, not compressed again: for fresh writes that is nearly every frame);
/// the other wanted chunks are taken from the frames as they are read and checked, and
/// compressed into new frames. Each frame is read once, and only what the batch needs of it is
/// kept: at most twice the wanted blocks' bytes.
fn build_batch(
    store: &Store,
    records: Vec<Record>,
    wanted: &[ChunkHash],
) -> Result<v1::Batch, String> {
    let read_error = |e| format!("read chunks to replicate them: {e}");
    let mut frames = Vec::new();
    let mut pending: HashSet<ChunkHash> = wanted.iter().copied().collect();
    let (mut rest_hashes, mut rest_data) = (Vec::new(), Vec::new());
    for held in store.frames_holding(wanted).map_err(read_error)? {
        let held = held.map_err(read_error)?;
        if 2 * held.asked >= held.hashes.len() {
            for hash in &held.hashes {
                pending.remove(hash);
            }
            frames.push(v1::Frame {
                hashes: held
                    .hashes
                    .iter()
                    .map(|h| Bytes::copy_from_slice(&h.0))
                    .collect(),
                zstd_data: Bytes::from_owner(held.zstd),
            });
            continue;
        }
        for (hash, block) in held.hashes.iter().zip(held.data.chunks_exact(BLOCK_SIZE)) {
            if pending.remove(hash) {
                rest_hashes.push(Bytes::copy_from_slice(&hash.0));
                rest_data.extend_from_slice(block);
            }
        }
    }
    for (hashes, raw) in rest_hashes
        .chunks(MAX_FRAME_BLOCKS)
        .zip(rest_data.chunks(MAX_FRAME_BLOCKS * BLOCK_SIZE))
    {
        frames.push(v1::Frame {
            hashes: hashes.to_vec(),
            zstd_data: Bytes::from(frame::compress(raw, DEFAULT_ZSTD_LEVEL)),
        });
    }
    Ok(v1::Batch {
        records: records.iter().map(v1::Record::from).collect(),
        frames,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hash(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    /// A block unlike any other seed's, and compressible.
    fn block(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE).map(|i| seed ^ (i / 64) as u8).collect()
    }

    #[test]
    fn a_batch_forwards_mostly_wanted_frames_as_stored_and_recompresses_the_rest() {
        use tideline_core::record::WriteOrigin;
        use tideline_core::store::{IncomingFrame, StoreConfig, VolumeMeta};
        use tideline_core::{BlockNo, VolumeName};

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(dir.path())).unwrap();
        let (group, volume) = (GroupName::new("g").unwrap(), VolumeName::new("v").unwrap());
        let meta = VolumeMeta {
            name: volume.clone(),
            size_bytes: 1 << 20,
        };
        store.register_group(&group, 1, &[meta]).unwrap();
        let blocks: Vec<Vec<u8>> = (1..=8).map(block).collect();
        let hashes: Vec<ChunkHash> = blocks.iter().map(|b| ChunkHash::of(b)).collect();
        // Two stored frames of four blocks each.
        let zstd: Vec<Vec<u8>> = blocks
            .chunks(4)
            .map(|four| frame::compress(&four.concat(), DEFAULT_ZSTD_LEVEL))
            .collect();
        let incoming: Vec<IncomingFrame> = (0..2)
            .map(|i| IncomingFrame {
                hashes: &hashes[4 * i..4 * i + 4],
                zstd_data: &zstd[i],
            })
            .collect();
        let record = Record {
            seq: Seq(1),
            time: TimeNs(1),
            kind: RecordKind::Write {
                volume,
                first: BlockNo(0),
                blocks: hashes.iter().copied().map(Some).collect(),
                origin: WriteOrigin::Client,
            },
        };
        store.ingest(&group, &[record], &incoming).unwrap();

        // All of the first frame is wanted, one block of the second.
        let wanted = [hashes[2], hashes[0], hashes[6], hashes[1], hashes[3]];
        let batch = build_batch(&store, Vec::new(), &wanted).unwrap();
        assert_eq!(batch.frames.len(), 2);
        assert_eq!(
            batch.frames[0].zstd_data.as_ref(),
            zstd[0].as_slice(),
            "the first frame goes as it is stored"
        );
        let recompressed = &batch.frames[1];
        assert_eq!(recompressed.hashes, [Bytes::copy_from_slice(&hashes[6].0)]);
        assert_eq!(
            frame::decompress(&recompressed.zstd_data, 1).unwrap(),
            blocks[6],
            "only the wanted block of the second frame, in a frame of its own"
        );
    }

    #[test]
    fn an_answer_older_than_a_release_of_the_same_chunks_is_stale() {
        let claims = Arc::new(Claims::default());
        let ClaimOutcome::Claimed(first) = claims.try_claim(&[hash(1), hash(2)], 0) else {
            panic!("nothing held yet");
        };
        // Another group asks while the first batch is in flight: busy.
        let asked_at = claims.generation();
        assert!(matches!(
            claims.try_claim(&[hash(2), hash(3)], asked_at),
            ClaimOutcome::Busy
        ));
        // The first batch is acknowledged before the second group claims: its answer said
        // chunk 2 was missing, which may no longer be true.
        drop(first);
        assert!(matches!(
            claims.try_claim(&[hash(2), hash(3)], asked_at),
            ClaimOutcome::Stale
        ));
        // Chunks the release did not hold can be claimed on that answer.
        assert!(matches!(
            claims.try_claim(&[hash(3)], asked_at),
            ClaimOutcome::Claimed(_)
        ));
        // An answer asked after the release is current.
        assert!(matches!(
            claims.try_claim(&[hash(2)], claims.generation()),
            ClaimOutcome::Claimed(_)
        ));
    }

    #[test]
    fn a_release_older_than_the_remembered_history_counts_as_stale() {
        let claims = Arc::new(Claims::default());
        let asked_at = claims.generation();
        for n in 0..=REMEMBERED_RELEASES as u8 {
            let ClaimOutcome::Claimed(claim) = claims.try_claim(&[hash(n)], claims.generation())
            else {
                panic!("free chunk");
            };
            drop(claim);
        }
        assert!(matches!(
            claims.try_claim(&[hash(200)], asked_at),
            ClaimOutcome::Stale
        ));
    }
}
