//! The shipper: streams one group's spool to the collector over a gRPC bidirectional stream.
//!
//! Per batch of spooled records: hash every 4 KiB block (blake3) and drop all-zero blocks, ask
//! the collector which of the remaining chunks it lacks (`HaveQuery`), compress only those into
//! multi-block zstd frames (spread over the cores), and send the records with the frames. The
//! stages overlap: while one batch is compressed the next is queried and the one after it read.
//! The collector answers `Durable(seq)` once records and chunks are on its disk; only then is
//! spool space released.
//!
//! The collector answers a query at once, while earlier batches may still be on their way to
//! its disk; so chunks carried by this session's unacknowledged batches are not asked about
//! (they are never sent twice). That is safe because the collector makes a stream's batches
//! durable in order and stops the stream at the first one it refuses.
//!
//! Bounded: at most [`MAX_BATCHES_IN_FLIGHT`] unacknowledged batches of at most
//! [`BATCH_MAX_BYTES`] of block data each; the outbound channel holds a handful of messages.
//! After a disconnect the shipper reconnects with capped exponential backoff and resumes after
//! the collector's durable seq; the collector skips records it already has, so nothing is lost
//! or applied twice.
//!
//! Fencing: when the collector refuses the stream with FAILED_PRECONDITION and the
//! `tideline-fenced-epoch` trailer, another site holds the group at a newer epoch (a failover
//! happened). Shipping would be split brain, so the shipper stops for good, logs the collector's
//! message, and reports it on `ShipperConfig::on_fenced`; the agent then shuts down and exits
//! with [`crate::EXIT_FENCED`].

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use bytes::Bytes;
use tideline_core::record::{Record, RecordKind};
use tideline_core::spool::{SpoolEntry, SpoolOp, SpoolReader};
use tideline_core::{block, ChunkHash, Seq, BLOCK_SIZE};
use tideline_proto::v1::{self, agent_message::Msg as Out, collector_message::Msg as In};

use crate::compress::{self, BatchChunks};
use crate::group::{Group, OnVolumeError};

pub const BATCH_MAX_BYTES: usize = 8 << 20;
pub const MAX_BATCHES_IN_FLIGHT: usize = 8;
/// A batch with less block data than this waits up to [`LINGER`] for more records. Every batch
/// costs the collector a commit (two fsyncs) and both sides a query round trip; without the
/// wait, 4 KiB random writes went out about 30 to a batch, 700 batches a second.
pub const LINGER_MIN_BYTES: usize = 1 << 20;
/// The longest a record waits for company before it is shipped; it adds at most this to the
/// recovery point.
pub const LINGER: Duration = Duration::from_millis(10);
/// Largest gRPC message either side accepts (a 32 MiB NBD write plus framing fits).
pub const MAX_MESSAGE_BYTES: usize = 96 << 20;
/// Writes of a batch read back from the volume at once: each read waits for the disk (they go
/// around the page cache, so nothing reads ahead), and one at a time a shipper behind its
/// writers read random data back at half the rate they wrote it.
const READ_BACK_THREADS: usize = 4;
const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ShipperConfig {
    pub collector_url: String,
    pub agent_id: String,
    pub hooks: crate::checkpoint::Hooks,
    /// zstd level of the frames sent.
    pub zstd_level: i32,
    /// Where to report that the group is fenced (the collector's message).
    pub on_fenced: mpsc::Sender<String>,
}

/// What the shipper reports about itself.
#[derive(Debug, Clone, Default)]
pub struct ShipperStatus {
    pub connected: bool,
    pub durable_seq: Seq,
    pub last_error: Option<String>,
    /// Set once the collector said another site holds the group: shipping has stopped.
    pub fenced: Option<String>,
}

/// Records and the unique non-zero chunks they name, ready to query and send.
struct PreparedBatch {
    records: Vec<v1::Record>,
    last_seq: Seq,
    /// Unique chunks in first-seen order, and where their bytes are.
    chunks: BatchChunks,
}

/// Runs until `shutdown` flips to true, reconnecting as needed.
pub async fn run(
    group: Arc<Group>,
    volumes: Vec<v1::VolumeInfo>,
    config: ShipperConfig,
    status: watch::Sender<ShipperStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let fenced: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    loop {
        let session = Session {
            group: group.clone(),
            volumes: volumes.clone(),
            config: config.clone(),
            status: status.clone(),
            fenced: fenced.clone(),
        };
        let result = tokio::select! {
            r = session.run() => r,
            _ = shutdown.wait_for(|&stop| stop) => return,
        };
        let message = match result {
            Ok(()) => "collector closed the stream".to_owned(),
            Err(e) => e,
        };
        let fence = fenced.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(fence) = fence {
            tracing::error!(group = %group.name, message = %fence, "FENCED: the collector says another site holds this group at a newer epoch; this agent stops shipping it (its volumes' later writes are not protected)");
            status.send_modify(|s| {
                s.connected = false;
                s.fenced = Some(fence.clone());
                s.last_error = Some(fence.clone());
            });
            let _ = config.on_fenced.send(fence).await;
            return;
        }
        // A session that got as far as streaming starts the back-off over; one that never
        // connected doubles it.
        let was_connected = status.borrow().connected;
        if was_connected {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(group = %group.name, error = %message, retry_in_ms = backoff.as_millis() as u64, "journal stream to collector ended");
        status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(message);
        });
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|&stop| stop) => return,
        }
        if !was_connected {
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

struct Session {
    group: Arc<Group>,
    volumes: Vec<v1::VolumeInfo>,
    config: ShipperConfig,
    status: watch::Sender<ShipperStatus>,
    fenced: Arc<std::sync::Mutex<Option<String>>>,
}

/// Remembers a refusal that says the group is fenced.
fn note_fenced(slot: &std::sync::Mutex<Option<String>>, status: &tonic::Status) {
    if tideline_proto::fenced_epoch(status).is_some() {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.message().to_owned());
    }
}

type SessionResult = Result<(), String>;

/// A batch being read from the spool and hashed, with the reader to continue from.
type PreparedNext = tokio::task::JoinHandle<Result<(SpoolReader, Option<PreparedBatch>), String>>;

impl Session {
    async fn run(self) -> SessionResult {
        let endpoint = tideline_proto::http2::endpoint(&self.config.collector_url)
            .map_err(|e| format!("bad collector URL {:?}: {e}", self.config.collector_url))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect to {}: {e}", self.config.collector_url))?;
        let mut client = v1::ingest_client::IngestClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(4);
        let hello = v1::Hello {
            agent_id: self.config.agent_id.clone(),
            group: self.group.name.to_string(),
            volumes: self.volumes.clone(),
            spool_id: self.group.spool.spool_id(),
            succeeds: self.group.spool.succession().map(|s| v1::Succession {
                predecessor_spool_id: s.predecessor,
                resume_after: s.resume_after.0,
            }),
        };
        send(&tx, Out::Hello(hello)).await?;
        let mut inbound = client
            .journal(ReceiverStream::new(rx))
            .await
            .map_err(|s| {
                note_fenced(&self.fenced, &s);
                format!("open journal stream: {}", s.message())
            })?
            .into_inner();
        let (durable, durable_record) = match inbound.message().await {
            Ok(Some(v1::CollectorMessage {
                msg: Some(In::Welcome(w)),
            })) => (Seq(w.durable_seq), w.durable_record),
            Ok(_) => return Err("collector did not answer Hello with Welcome".into()),
            Err(s) => {
                note_fenced(&self.fenced, &s);
                return Err(format!("collector refused the group: {}", s.message()));
            }
        };
        // A power loss can take records the collector already holds. Releasing would then drop
        // records never shipped, and the collector would skip the seqs this spool hands out
        // again as resends: continue as a successor spool instead. The spool may end before
        // the collector's seq, or reach past it again with records appended since the loss (a
        // resync, new writes, also made durable before a restart): then the collector's newest
        // record differs from the spool's at that seq.
        let last = self.group.spool.last_seq();
        if durable > last {
            let why = format!("the collector holds this group through {durable}, but this agent's spool ends at {last}; a power loss took spooled records the collector already had");
            return Err(self.continue_after_loss(why).await);
        }
        // The other way round: the collector lacks records this spool has freed, because the
        // collector that acknowledged them is gone (a failover to a site that was behind it).
        // Waiting would not bring them back, so the journal continues after a gap. A spool that
        // holds no record starts at the seq it appends next.
        let first = self.group.spool.first_seq().unwrap_or(last.next());
        if first > durable.next() {
            let why = format!("the collector holds this group through {durable}, but this agent's spool starts at {first}: the records in between were acknowledged, by a collector that has since lost them or by the site that held the group before a failover, and freed here");
            return Err(self.continue_after_loss(why).await);
        }
        if let Some(why) = self.spool_differs_at(durable, durable_record).await? {
            return Err(self.continue_after_loss(why).await);
        }
        if self.group.spool.succession().is_some() {
            let group = self.group.clone();
            tokio::task::spawn_blocking(move || group.spool.succession_accepted())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tracing::info!(group = %self.group.name, "the collector accepted this spool as the successor of the one that lost records");
        }
        tracing::info!(group = %self.group.name, durable = durable.0, "journal stream open");
        self.release(durable).await?;
        self.status.send_modify(|s| {
            s.connected = true;
            s.durable_seq = durable;
            s.last_error = None;
        });
        let (reply_tx, reply_rx) = mpsc::channel(MAX_BATCHES_IN_FLIGHT);
        let (durable_tx, durable_rx) = watch::channel(durable);
        let orders = Orders {
            group: self.group.clone(),
            hooks: self.config.hooks.clone(),
            tx: tx.clone(),
        };
        // Aborted when this session ends for any reason, including being dropped at shutdown,
        // so no task keeps the stream (or its outbound sender) open.
        let _receiver = AbortOnDrop(tokio::spawn(receive(
            inbound,
            reply_tx,
            durable_tx,
            orders,
            self.fenced.clone(),
        )));
        let _paced = PacedWhileConnected::new(&self.group);
        self.pump(durable, &tx, reply_rx, durable_rx).await
    }

    async fn release(&self, durable: Seq) -> SessionResult {
        let group = self.group.clone();
        tokio::task::spawn_blocking(move || group.release_through(durable))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Compares the collector's record at its durable seq (when this spool sent it) with the
    /// spool's own record at that seq; says how they differ, if they do.
    async fn spool_differs_at(
        &self,
        durable: Seq,
        theirs: Option<v1::Record>,
    ) -> Result<Option<String>, String> {
        let Some(theirs) = theirs else {
            return Ok(None);
        };
        let theirs = Record::try_from(&theirs)
            .map_err(|e| format!("the collector's Welcome carries a malformed record: {e}"))?;
        if theirs.seq != durable {
            return Err(format!(
                "the collector's Welcome names {durable} as durable but carries the record of {}",
                theirs.seq
            ));
        }
        let group = self.group.clone();
        let ours = tokio::task::spawn_blocking(move || {
            group.spool.reader(durable).next_entry(&group.spool)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("read {durable} from the spool: {e}"))?;
        // Not in the spool: released once the collector acknowledged it, nothing to compare.
        let Some(ours) = ours else {
            return Ok(None);
        };
        let is_on_volume = matches!(ours.op, SpoolOp::OnVolume(_));
        let ours = record_of(ours).0;
        // A write whose data was lost before it shipped went out as a gap of its volume.
        let shipped_as_gap = matches!(
            (&ours.kind, &theirs.kind),
            (RecordKind::Write { volume: ours, .. }, RecordKind::Gap { volume: theirs })
                if ours == theirs && is_on_volume
        );
        Ok((ours != theirs && !shipped_as_gap).then(|| {
            format!(
                "the collector's record at {durable} (time {} ns) is not this spool's (time {} ns); a power loss took spooled records the collector already had, and their seqs were given to new writes",
                theirs.time.0, ours.time.0
            )
        }))
    }

    /// The collector's journal and this spool cannot be joined (`why` says how that showed): a
    /// power loss took spooled records that were already shipped, or the collector lacks
    /// records the spool has freed. Journals a gap and a whole
    /// resync of every volume, and records a succession that the next session offers; what to
    /// say about it.
    async fn continue_after_loss(&self, why: String) -> String {
        let group = self.group.clone();
        let continued = tokio::task::spawn_blocking(move || group.continue_after_loss()).await;
        match continued {
            Ok(Ok(succession)) => {
                let message = format!(
                    "{why}. Journalled a gap and a whole resync of every volume; the spool continues the group's journal after {} (the collector is asked to accept it as the successor of spool {:016x})",
                    succession.resume_after, succession.predecessor
                );
                tracing::error!(group = %self.group.name, "{message}");
                message
            }
            Ok(Err(e)) => format!(
                "{why} (a power loss took records already shipped), and continuing after it failed: {e}; nothing is released"
            ),
            Err(e) => e.to_string(),
        }
    }

    /// Sends batches forever, releasing spool space as acknowledgements arrive.
    async fn pump(
        &self,
        durable: Seq,
        tx: &mpsc::Sender<v1::AgentMessage>,
        mut replies: mpsc::Receiver<Vec<u32>>,
        mut durable_rx: watch::Receiver<Seq>,
    ) -> SessionResult {
        // The session checked that the spool reaches back to here (releasing `durable` keeps
        // the segment holding the next record).
        let start = durable.next();
        // Three batches overlap: the next one is read and hashed, the current one is queried,
        // and the one before it is compressed. Queried and compressed in turn, an ingest of
        // the ext4 image spent 2.3 s waiting for answers to queries besides 4.6 s compressing.
        let mut next = self.prepare(self.group.spool.reader(start));
        // Last seq of each unacknowledged batch, and the chunks it carries.
        let mut in_flight: VecDeque<(Seq, HashSet<ChunkHash>)> = VecDeque::new();
        let mut building: Option<Building> = None;
        let mut query_id = 0u64;
        let mut released = durable;
        // Highest seq the collector may acknowledge: what it had, or what this session sent.
        let mut sent_through = durable;
        loop {
            let acked = *durable_rx.borrow_and_update();
            if acked > sent_through {
                return Err(format!(
                    "the collector acknowledged seq {acked}, but only seqs through {sent_through} were sent: refusing to release spool space on its word"
                ));
            }
            while in_flight.front().is_some_and(|(s, _)| *s <= acked) {
                in_flight.pop_front();
            }
            if acked > released {
                self.release(acked).await?;
                released = acked;
                self.status.send_modify(|s| s.durable_seq = acked);
            }
            if in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
                send_built(tx, &mut building, &mut sent_through).await?;
                durable_rx
                    .changed()
                    .await
                    .map_err(|_| "collector stream closed".to_owned())?;
                continue;
            }
            if !next.is_finished() {
                // The next batch is still being read, or waits for company: the one built
                // meanwhile goes out now rather than after it (the recovery point at low rates).
                send_built(tx, &mut building, &mut sent_through).await?;
            }
            let (reader, prepared) = next.await.map_err(|e| e.to_string())??;
            let Some(batch) = prepared else {
                send_built(tx, &mut building, &mut sent_through).await?;
                self.idle(tx, &reader, &mut durable_rx).await?;
                next = self.prepare(reader);
                continue;
            };
            next = self.prepare(reader);
            query_id += 1;
            let missing = self
                .query(tx, &mut replies, query_id, &batch, &in_flight)
                .await?;
            let last_seq = batch.last_seq;
            let sent: HashSet<ChunkHash> = missing
                .iter()
                .map(|&i| batch.chunks.hashes()[i as usize])
                .collect();
            in_flight.push_back((last_seq, sent));
            // Batches go out in order: the one before this is sent before this one is built.
            send_built(tx, &mut building, &mut sent_through).await?;
            let level = self.config.zstd_level;
            let build = tokio::task::spawn_blocking(move || build_batch(batch, &missing, level));
            building = Some(Building { build, last_seq });
        }
    }

    /// Reads and hashes the next batch on a blocking thread.
    fn prepare(&self, mut reader: SpoolReader) -> PreparedNext {
        let group = self.group.clone();
        tokio::task::spawn_blocking(move || {
            let batch = prepare_batch(&group, &mut reader)?;
            Ok((reader, batch))
        })
    }

    /// Nothing to send: wait for new records, sending a heartbeat meanwhile so the collector
    /// knows how recent "everything" is.
    async fn idle(
        &self,
        tx: &mpsc::Sender<v1::AgentMessage>,
        reader: &SpoolReader,
        durable_rx: &mut watch::Receiver<Seq>,
    ) -> SessionResult {
        let (last_seq, time_ns) = self.group.spool.heartbeat();
        send(
            tx,
            Out::Heartbeat(v1::Heartbeat {
                last_seq: last_seq.0,
                time_ns: time_ns.0,
            }),
        )
        .await?;
        let waiting_for = Seq(reader.next_seq().0 - 1);
        let group = self.group.clone();
        let wait = tokio::task::spawn_blocking(move || {
            group.spool.wait_beyond(waiting_for, HEARTBEAT_EVERY)
        });
        tokio::select! {
            r = wait => { r.map_err(|e| e.to_string())?; }
            r = durable_rx.changed() => { r.map_err(|_| "collector stream closed".to_owned())?; }
        }
        Ok(())
    }

    /// Indexes into `batch.chunks` of the chunks to send: those the collector lacks and no
    /// unacknowledged batch carries.
    async fn query(
        &self,
        tx: &mpsc::Sender<v1::AgentMessage>,
        replies: &mut mpsc::Receiver<Vec<u32>>,
        query_id: u64,
        batch: &PreparedBatch,
        in_flight: &VecDeque<(Seq, HashSet<ChunkHash>)>,
    ) -> Result<Vec<u32>, String> {
        let asked: Vec<u32> = (0u32..)
            .zip(batch.chunks.hashes())
            .filter(|(_, h)| !in_flight.iter().any(|(_, sent)| sent.contains(*h)))
            .map(|(i, _)| i)
            .collect();
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let hashes = tideline_proto::wire_hashes(
            asked
                .iter()
                .map(|&i| Some(&batch.chunks.hashes()[i as usize])),
        );
        send(tx, Out::HaveQuery(v1::HaveQuery { query_id, hashes })).await?;
        let missing = replies.recv().await.ok_or("collector stream closed")?;
        missing
            .iter()
            .map(|&i| asked.get(i as usize).copied())
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| "collector answered a have-query with an index out of range".into())
    }
}

/// Large writes are paced to this session's shipper (see [`crate::recent`]) until it ends,
/// however it ends.
struct PacedWhileConnected<'g>(&'g Group);

impl<'g> PacedWhileConnected<'g> {
    fn new(group: &'g Group) -> Self {
        group.recent.shipper_connected(true);
        PacedWhileConnected(group)
    }
}

impl Drop for PacedWhileConnected<'_> {
    fn drop(&mut self) {
        self.0.recent.shipper_connected(false);
    }
}

/// A batch being compressed on the blocking pool, and the last seq it carries.
struct Building {
    build: tokio::task::JoinHandle<v1::Batch>,
    last_seq: Seq,
}

/// Waits for the batch being built, if any, and sends it.
async fn send_built(
    tx: &mpsc::Sender<v1::AgentMessage>,
    building: &mut Option<Building>,
    sent_through: &mut Seq,
) -> SessionResult {
    if let Some(Building { build, last_seq }) = building.take() {
        let message = build.await.map_err(|e| e.to_string())?;
        send(tx, Out::Batch(message)).await?;
        *sent_through = last_seq;
    }
    Ok(())
}

async fn send(tx: &mpsc::Sender<v1::AgentMessage>, msg: Out) -> SessionResult {
    tx.send(v1::AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| "journal stream closed".to_owned())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the receiver needs to carry out the collector's checkpoint orders.
struct Orders {
    group: Arc<Group>,
    hooks: crate::checkpoint::Hooks,
    tx: mpsc::Sender<v1::AgentMessage>,
}

impl Orders {
    /// Takes the checkpoint on a blocking thread (hooks may take a while) and answers.
    fn carry_out(&self, order: v1::CheckpointOrder) {
        let (group, hooks, tx) = (self.group.clone(), self.hooks.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || {
                let name = tideline_core::CheckpointName::new(order.name.as_str())
                    .map_err(|e| e.to_string())?;
                crate::checkpoint::take(&group, &name, order.app_consistent, &hooks)
            })
            .await
            .unwrap_or_else(|e| Err(format!("checkpoint task failed: {e}")));
            let done = match result {
                Ok((seq, time)) => v1::CheckpointDone {
                    request_id: order.request_id,
                    seq: seq.0,
                    time_ns: time.0,
                    error: String::new(),
                },
                Err(error) => v1::CheckpointDone {
                    request_id: order.request_id,
                    error,
                    ..Default::default()
                },
            };
            let _ = send(&tx, Out::CheckpointDone(done)).await;
        });
    }
}

/// Dispatches what the collector sends: have-replies to the pump, durable seqs to a watch,
/// checkpoint orders to a task of their own.
async fn receive(
    mut inbound: tonic::Streaming<v1::CollectorMessage>,
    replies: mpsc::Sender<Vec<u32>>,
    durable: watch::Sender<Seq>,
    orders: Orders,
    fenced: Arc<std::sync::Mutex<Option<String>>>,
) {
    loop {
        match inbound.message().await {
            Ok(Some(v1::CollectorMessage {
                msg: Some(In::HaveReply(reply)),
            })) => {
                if replies.send(reply.missing).await.is_err() {
                    return;
                }
            }
            Ok(Some(v1::CollectorMessage {
                msg: Some(In::Durable(d)),
            })) => {
                durable.send_modify(|s| *s = (*s).max(Seq(d.seq)));
            }
            Ok(Some(v1::CollectorMessage {
                msg: Some(In::CheckpointOrder(order)),
            })) => orders.carry_out(order),
            Ok(Some(_)) => tracing::warn!("unexpected message from collector ignored"),
            Ok(None) => return,
            Err(status) => {
                tracing::error!(code = ?status.code(), message = status.message(), "collector rejected the journal stream");
                note_fenced(&fenced, &status);
                return;
            }
        }
    }
}

/// Reads spooled entries into a batch of at most [`BATCH_MAX_BYTES`] of block data (at least
/// one entry), hashing blocks and dropping zero blocks. A batch under [`LINGER_MIN_BYTES`]
/// waits up to [`LINGER`] for more entries before it goes.
fn prepare_batch(group: &Group, reader: &mut SpoolReader) -> Result<Option<PreparedBatch>, String> {
    let mut batch = PreparedBatch {
        records: Vec::new(),
        last_seq: Seq(0),
        chunks: BatchChunks::default(),
    };
    let mut seen: HashSet<ChunkHash> = HashSet::new();
    let mut data_bytes = 0usize;
    let deadline = Instant::now() + LINGER;
    loop {
        let mut entries = Vec::new();
        while data_bytes < BATCH_MAX_BYTES {
            let Some(entry) = reader.next_entry(&group.spool).map_err(|e| e.to_string())? else {
                break;
            };
            data_bytes += entry_data_len(&entry);
            entries.push(record_of(entry));
        }
        for with_data in all_with_data(group, entries)? {
            let record = to_record(with_data, &mut seen, &mut batch);
            batch.last_seq = record.seq;
            batch.records.push(v1::Record::from(&record));
        }
        let now = Instant::now();
        if batch.records.is_empty() || data_bytes >= LINGER_MIN_BYTES || now >= deadline {
            return Ok((!batch.records.is_empty()).then_some(batch));
        }
        std::thread::sleep(deadline - now);
    }
}

fn entry_data_len(entry: &SpoolEntry) -> usize {
    match &entry.op {
        SpoolOp::Write { data, .. } => data.len(),
        SpoolOp::OnVolume(kind) => kind.block_count() as usize * BLOCK_SIZE,
        SpoolOp::Other(_) => 64,
    }
}

/// The record a spooled entry journals, and the data of a write spooled with its data.
fn record_of(entry: SpoolEntry) -> (Record, Option<Bytes>) {
    let (kind, data) = match entry.op {
        SpoolOp::Other(kind) | SpoolOp::OnVolume(kind) => (kind, None),
        SpoolOp::Write {
            volume,
            first,
            data,
            origin,
        } => {
            let blocks = block::chunks_of(&data);
            let kind = RecordKind::Write {
                volume,
                first,
                blocks,
                origin,
            };
            (kind, Some(data))
        }
    };
    let record = Record {
        seq: entry.seq,
        time: entry.time,
        kind,
    };
    (record, data)
}

/// [`with_data`] of each of `records`, in order. Writes to read back from the volume are split
/// into runs of neighbouring records, read on up to [`READ_BACK_THREADS`] threads at once.
fn all_with_data(
    group: &Group,
    records: Vec<(Record, Option<Bytes>)>,
) -> Result<Vec<(Record, Option<Bytes>)>, String> {
    let to_read = records.iter().filter(|r| needs_read_back(r)).count();
    if to_read < 2 {
        return records.into_iter().map(|r| with_data(group, r)).collect();
    }
    let share = records.len().div_ceil(READ_BACK_THREADS);
    let mut records = records.into_iter();
    let runs: Vec<Vec<_>> = std::iter::from_fn(|| {
        let run: Vec<_> = records.by_ref().take(share).collect();
        (!run.is_empty()).then_some(run)
    })
    .collect();
    std::thread::scope(|scope| {
        let readers: Vec<_> = runs
            .into_iter()
            .map(|run| {
                scope.spawn(move || {
                    run.into_iter()
                        .map(|r| with_data(group, r))
                        .collect::<Result<Vec<_>, String>>()
                })
            })
            .collect();
        let mut all = Vec::new();
        for reader in readers {
            let run = reader
                .join()
                .map_err(|_| "a thread reading writes back from the volume panicked")?;
            all.extend(run?);
        }
        Ok(all)
    })
}

/// True for a write spooled without its data.
fn needs_read_back((record, data): &(Record, Option<Bytes>)) -> bool {
    data.is_none() && matches!(record.kind, RecordKind::Write { .. })
}

/// A record and its write's data, read back from the volume for a write spooled without it. If
/// that data was lost (the volume changed and the blocks were not saved), the record is
/// shipped as a `Gap` of its volume instead, and a resync journals the blocks again.
fn with_data(
    group: &Group,
    spooled: (Record, Option<Bytes>),
) -> Result<(Record, Option<Bytes>), String> {
    if !needs_read_back(&spooled) {
        return Ok(spooled);
    }
    let (record, _) = spooled;
    match group.on_volume_data(&record) {
        Ok(data) => Ok((record, Some(data))),
        Err(OnVolumeError::Lost {
            volume,
            first,
            count,
            ..
        }) => {
            tracing::error!(group = %group.name, %volume, seq = %record.seq, first = first.0, count,
                "blocks of a write changed before it was shipped and were not saved: journalling a gap and resyncing them");
            group.resync_lost(&volume, first, count);
            let gap = Record {
                kind: RecordKind::Gap { volume },
                ..record
            };
            Ok((gap, None))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A record and its write's data: the write's blocks not yet in the batch join its chunks.
fn to_record(
    (record, data): (Record, Option<Bytes>),
    seen: &mut HashSet<ChunkHash>,
    batch: &mut PreparedBatch,
) -> Record {
    if let (Some(data), RecordKind::Write { blocks, .. }) = (data, &record.kind) {
        let new_chunks = blocks.iter().enumerate().filter_map(|(k, chunk)| {
            chunk
                .filter(|hash| seen.insert(*hash))
                .map(|hash| (k * BLOCK_SIZE, hash))
        });
        batch.chunks.add_write(data, new_chunks);
    }
    record
}

/// Compresses the chunks the collector lacks into frames (spread over the cores) and builds
/// the batch message, at zstd level `level`.
fn build_batch(batch: PreparedBatch, missing: &[u32], level: i32) -> v1::Batch {
    v1::Batch {
        records: batch.records,
        frames: compress::frames(Arc::new(batch.chunks), missing, level),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_core::record::WriteOrigin;
    use tideline_core::spool::{Spool, SpoolConfig};
    use tideline_core::types::{BlockNo, GroupName, VolumeName};

    fn group_in(dir: &std::path::Path) -> Group {
        let spool = Spool::open(SpoolConfig::new(dir, 64 << 20)).unwrap();
        Group::new(GroupName::new("g").unwrap(), spool, Vec::new())
    }

    fn write(group: &Group, first: u64, blocks: usize, fill: u8) {
        let op = SpoolOp::Write {
            volume: VolumeName::new("v").unwrap(),
            first: BlockNo(first),
            data: vec![fill; blocks * BLOCK_SIZE].into(),
            origin: WriteOrigin::Client,
        };
        group.spool.append(op).unwrap();
    }

    #[test]
    fn a_small_batch_waits_for_company_and_takes_everything_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let group = group_in(dir.path());
        for n in 0..3u8 {
            write(&group, u64::from(n), 1, n + 1);
        }
        let mut reader = group.spool.reader(Seq(1));
        let started = Instant::now();
        let batch = prepare_batch(&group, &mut reader).unwrap().unwrap();
        assert!(started.elapsed() >= LINGER, "{:?}", started.elapsed());
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.last_seq, Seq(3));
        assert_eq!(batch.chunks.hashes().len(), 3);
        assert!(prepare_batch(&group, &mut reader).unwrap().is_none());
    }

    #[test]
    fn batches_stop_at_the_byte_limit_and_carry_each_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let group = group_in(dir.path());
        let per_write = LINGER_MIN_BYTES / BLOCK_SIZE;
        let writes = BATCH_MAX_BYTES / LINGER_MIN_BYTES + 1;
        for n in 0..writes {
            write(&group, (n * per_write) as u64, per_write, 7);
        }
        let mut reader = group.spool.reader(Seq(1));
        let first = prepare_batch(&group, &mut reader).unwrap().unwrap();
        assert_eq!(first.records.len(), BATCH_MAX_BYTES / LINGER_MIN_BYTES);
        assert_eq!(
            first.chunks.hashes().len(),
            1,
            "every block holds the same bytes"
        );
        let rest = prepare_batch(&group, &mut reader).unwrap().unwrap();
        assert_eq!(rest.records.len(), 1);
        assert_eq!(rest.last_seq, Seq(writes as u64));
    }

    #[test]
    fn writes_read_back_from_the_volume_side_by_side_come_back_in_order_with_their_bytes() {
        use crate::group::tests::{fresh_bytes, one_volume_group};
        use crate::group::Change;
        let Some((_dir, group)) = one_volume_group() else {
            return;
        };
        // Large writes, each of its own bytes, kept on the volume alone once memory forgets them.
        let len = 256 << 10;
        let writes: Vec<Bytes> = (0..12).map(|n| fresh_bytes(n, len)).collect();
        for (n, data) in writes.iter().enumerate() {
            let offset = (n * len) as u64;
            group
                .journalled(0, offset, Change::Write(data.clone()))
                .unwrap();
        }
        group.recent.forget_all();
        let mut reader = group.spool.reader(Seq(1));
        let mut spooled = Vec::new();
        while let Some(entry) = reader.next_entry(&group.spool).unwrap() {
            spooled.push(record_of(entry));
        }
        let read_back = spooled.iter().filter(|r| needs_read_back(r)).count();
        assert_eq!(
            read_back,
            writes.len(),
            "every write was kept on the volume"
        );
        let all = all_with_data(&group, spooled).unwrap();
        let data: Vec<&Bytes> = all.iter().filter_map(|(_, data)| data.as_ref()).collect();
        assert_eq!(data.len(), writes.len());
        for (n, (got, wrote)) in data.iter().zip(&writes).enumerate() {
            assert!(*got == wrote, "write {n} came back with other bytes");
        }
        let seqs: Vec<u64> = all.iter().map(|(record, _)| record.seq.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "out of order: {seqs:?}"
        );
    }
}
