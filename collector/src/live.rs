//! What the collector knows beyond the store: how recent "everything" is for each group.
//!
//! A group's *durable-through time* is the latest moment T such that every record the agent
//! stamped at or before T is durable here. It advances with each durable batch (to the newest
//! record's time) and with agent heartbeats ("as of T my newest record is S"), which count once
//! S is durable. It drives `tideline wait`, the restorable window's newest end, and the RPO.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use tideline_proto::v1;

use tideline_core::store::Store;
use tideline_core::{GroupName, Seq, TimeNs};

/// Heartbeats waiting for their seq to become durable; older ones are dropped past this.
const MAX_PENDING_HEARTBEATS: usize = 64;

#[derive(Debug, Clone, Default)]
pub struct GroupLive {
    pub durable_seq: Seq,
    pub durable_through: TimeNs,
    pending_heartbeats: VecDeque<(Seq, TimeNs)>,
}

impl GroupLive {
    fn settle_heartbeats(&mut self) {
        while let Some(&(seq, time)) = self.pending_heartbeats.front() {
            if seq > self.durable_seq {
                break;
            }
            self.durable_through = self.durable_through.max(time);
            self.pending_heartbeats.pop_front();
        }
    }
}

/// The reply channel of the journal stream currently attached for a group.
struct Attached {
    stream_id: u64,
    replies: mpsc::Sender<Result<v1::CollectorMessage, Status>>,
}

#[derive(Default)]
struct Orders {
    next_id: u64,
    next_stream_id: u64,
    streams: HashMap<GroupName, Attached>,
    pending: HashMap<u64, PendingOrder>,
}

/// A checkpoint order waiting for the agent of `group` to answer.
struct PendingOrder {
    group: GroupName,
    answer: oneshot::Sender<CheckpointAnswer>,
}

/// An agent's answer to a checkpoint order: the checkpoint record's seq in the group's journal
/// and its time, or why the agent could not take it.
pub type CheckpointAnswer = Result<(Seq, TimeNs), String>;

/// The caller's end of a checkpoint order. Dropping it (answered, timed out, or the caller went
/// away) forgets the order, so unanswered orders do not pile up.
pub struct CheckpointOrdered<'a> {
    live: &'a Live,
    request_id: u64,
    answer: oneshot::Receiver<CheckpointAnswer>,
}

impl CheckpointOrdered<'_> {
    /// The answer; `None` if the agent's stream ended first.
    pub async fn answer(&mut self) -> Option<CheckpointAnswer> {
        (&mut self.answer).await.ok()
    }
}

impl Drop for CheckpointOrdered<'_> {
    fn drop(&mut self) {
        self.live.orders().pending.remove(&self.request_id);
    }
}

/// Replication of one group from this site to the other, as the replicator last saw it.
#[derive(Debug, Clone, Default)]
pub struct ReplicaLive {
    pub site: String,
    pub url: String,
    pub connected: bool,
    pub durable_seq: Seq,
    pub durable_through: TimeNs,
    pub bytes_sent: u64,
    pub chunk_bytes_sent: u64,
    pub chunks_sent: u64,
    pub records_sent: u64,
    pub last_error: Option<String>,
}

pub struct Live {
    groups: Mutex<HashMap<GroupName, GroupLive>>,
    changed: watch::Sender<u64>,
    orders: Mutex<Orders>,
    replicas: Mutex<HashMap<GroupName, ReplicaLive>>,
    /// Groups being handed over: their agents are refused meanwhile.
    draining: Mutex<std::collections::HashSet<GroupName>>,
}

impl Live {
    pub fn from_store(store: &Store) -> Live {
        let mut groups: HashMap<GroupName, GroupLive> = HashMap::new();
        for volume in store.volumes() {
            let entry = groups.entry(volume.group.clone()).or_default();
            entry.durable_seq = entry.durable_seq.max(volume.durable_seq);
            if let Some(time) = volume.newest_record_time {
                entry.durable_through = entry.durable_through.max(time);
            }
        }
        Live {
            groups: Mutex::new(groups),
            changed: watch::channel(0).0,
            orders: Mutex::new(Orders::default()),
            replicas: Mutex::new(HashMap::new()),
            draining: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// Changes to durability, for waiters.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The journal was forked: durability goes back to `seq`, stamped `time`.
    pub fn reset(&self, group: &GroupName, seq: Seq, time: TimeNs) {
        self.update(group, |g| {
            g.durable_seq = seq;
            g.durable_through = time;
            g.pending_heartbeats.clear();
        });
    }

    /// Updates what is known of `group`'s replication.
    /// Updates the replication state of `group`. Waiters are woken only when what they wait
    /// for moved (the replica's durable seq or time, or the connection); counters do not wake
    /// them, or a replicator that waits for news would wake itself with every byte it sends.
    pub fn replica<R>(&self, group: &GroupName, f: impl FnOnce(&mut ReplicaLive) -> R) -> R {
        let progress = |r: &ReplicaLive| (r.durable_seq, r.durable_through, r.connected);
        let (result, moved) = {
            let mut replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
            let replica = replicas.entry(group.clone()).or_default();
            let before = progress(replica);
            let result = f(replica);
            (result, progress(replica) != before)
        };
        if moved {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        result
    }

    pub fn replica_status(&self, group: &GroupName) -> Option<ReplicaLive> {
        let replicas = self.replicas.lock().unwrap_or_else(|p| p.into_inner());
        replicas.get(group).cloned()
    }

    /// Refuses `group`'s agents until the guard is dropped (however the handover ends, also
    /// when its caller goes away mid-wait).
    pub fn drain(&self, group: &GroupName) -> Draining<'_> {
        let mut set = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(group.clone());
        Draining {
            live: self,
            group: group.clone(),
        }
    }

    pub fn is_draining(&self, group: &GroupName) -> bool {
        let set = self.draining.lock().unwrap_or_else(|p| p.into_inner());
        set.contains(group)
    }

    /// Ends the journal stream of `group`'s agent, if one is attached, with `status`.
    pub fn kick(&self, group: &GroupName, status: Status) {
        let replies = self.orders().streams.remove(group).map(|a| a.replies);
        if let Some(replies) = replies {
            let _ = replies.try_send(Err(status));
        }
    }

    fn orders(&self) -> std::sync::MutexGuard<'_, Orders> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A journal stream for `group` opened: orders for the group go to it from now on.
    pub fn attach(
        &self,
        group: &GroupName,
        replies: mpsc::Sender<Result<v1::CollectorMessage, Status>>,
    ) -> u64 {
        let mut orders = self.orders();
        orders.next_stream_id += 1;
        let stream_id = orders.next_stream_id;
        orders
            .streams
            .insert(group.clone(), Attached { stream_id, replies });
        stream_id
    }

    /// The stream `stream_id` of `group` ended (a newer stream may have replaced it already).
    /// The stream is gone: so are the answers to the orders it carried (their callers learn the
    /// agent went away).
    pub fn detach(&self, group: &GroupName, stream_id: u64) {
        let mut orders = self.orders();
        if orders
            .streams
            .get(group)
            .is_some_and(|a| a.stream_id == stream_id)
        {
            orders.streams.remove(group);
            orders.pending.retain(|_, order| order.group != *group);
        }
    }

    /// Sends a checkpoint order to the agent streaming `group`; the receiver yields its answer.
    pub async fn order_checkpoint(
        &self,
        group: &GroupName,
        name: &str,
        app_consistent: bool,
    ) -> Result<CheckpointOrdered<'_>, Status> {
        let (done_tx, done_rx) = oneshot::channel();
        let (request_id, replies) = {
            let mut orders = self.orders();
            let replies = orders.streams.get(group).map(|a| a.replies.clone()).ok_or_else(|| {
                Status::unavailable(format!(
                    "no agent is streaming group {group} to this collector; checkpoints travel over the agent's journal stream"
                ))
            })?;
            orders.next_id += 1;
            let id = orders.next_id;
            orders.pending.insert(
                id,
                PendingOrder {
                    group: group.clone(),
                    answer: done_tx,
                },
            );
            (id, replies)
        };
        let order = v1::CheckpointOrder {
            request_id,
            name: name.to_owned(),
            app_consistent,
        };
        let message = v1::CollectorMessage {
            msg: Some(v1::collector_message::Msg::CheckpointOrder(order)),
        };
        let ordered = CheckpointOrdered {
            live: self,
            request_id,
            answer: done_rx,
        };
        if replies.send(Ok(message)).await.is_err() {
            return Err(Status::unavailable(format!(
                "the agent streaming group {group} went away"
            )));
        }
        Ok(ordered)
    }

    /// The agent streaming `group` answered order `request_id`. An answer to another group's
    /// order is ignored.
    pub fn checkpoint_done(&self, group: &GroupName, request_id: u64, answer: CheckpointAnswer) {
        let mut orders = self.orders();
        if orders
            .pending
            .get(&request_id)
            .is_some_and(|order| order.group == *group)
        {
            if let Some(order) = orders.pending.remove(&request_id) {
                let _ = order.answer.send(answer);
            }
        }
    }

    /// Waits until `group`'s durable seq reaches `seq`, or `timeout` passes.
    pub async fn wait_seq(&self, group: &GroupName, seq: Seq, timeout: Duration) -> bool {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.get(group).durable_seq >= seq {
                return true;
            }
            if !matches!(
                tokio::time::timeout_at(deadline, changes.changed()).await,
                Ok(Ok(()))
            ) {
                return self.get(group).durable_seq >= seq;
            }
        }
    }

    fn update<R>(&self, group: &GroupName, f: impl FnOnce(&mut GroupLive) -> R) -> R {
        let result = {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            f(groups.entry(group.clone()).or_default())
        };
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        result
    }

    pub fn get(&self, group: &GroupName) -> GroupLive {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups.get(group).cloned().unwrap_or_default()
    }

    /// Records up to `seq`, the newest stamped `time`, are durable.
    pub fn durable(&self, group: &GroupName, seq: Seq, time: TimeNs) {
        self.update(group, |g| {
            g.durable_seq = g.durable_seq.max(seq);
            g.durable_through = g.durable_through.max(time);
            g.settle_heartbeats();
        });
    }

    pub fn heartbeat(&self, group: &GroupName, last_seq: Seq, time: TimeNs) {
        self.update(group, |g| {
            if g.pending_heartbeats.len() == MAX_PENDING_HEARTBEATS {
                g.pending_heartbeats.pop_front();
            }
            g.pending_heartbeats.push_back((last_seq, time));
            g.settle_heartbeats();
        });
    }

    /// Waits until the group is durable through `until`, or `timeout` passes.
    pub async fn wait_durable(
        &self,
        group: &GroupName,
        until: TimeNs,
        timeout: Duration,
    ) -> GroupLive {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let live = self.get(group);
            if live.durable_through >= until {
                return live;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return self.get(group),
            }
        }
    }
}

/// A group being handed over; see [`Live::drain`].
pub struct Draining<'a> {
    live: &'a Live,
    group: GroupName,
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        let mut set = self.live.draining.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.group);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn heartbeats_count_only_once_their_seq_is_durable() {
        let live = Live {
            groups: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            orders: Mutex::new(Orders::default()),
            replicas: Mutex::new(HashMap::new()),
            draining: Mutex::new(std::collections::HashSet::new()),
        };
        let g = GroupName::new("g").unwrap();
        live.durable(&g, Seq(5), TimeNs(100));
        live.heartbeat(&g, Seq(7), TimeNs(300));
        assert_eq!(live.get(&g).durable_through, TimeNs(100));
        live.durable(&g, Seq(7), TimeNs(250));
        assert_eq!(live.get(&g).durable_through, TimeNs(300));
        live.heartbeat(&g, Seq(7), TimeNs(400));
        assert_eq!(live.get(&g).durable_through, TimeNs(400));
    }
}
