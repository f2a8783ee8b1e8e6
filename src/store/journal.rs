//! The in-memory journal index: every record of every group, by seq and by time, and for each
//! volume the seqs where its journal became complete or lost track (its restore windows).
//!
//! Records of a group are held in seq order; seqs are contiguous and times non-decreasing
//! (ingest refuses anything else), so a point in time is a prefix found by binary search.
//! A restore replays the prefix from the start of the journal; image layers (periodic block
//! maps) will bound that replay once they exist.

use std::collections::BTreeMap;

use crate::record::{BlockChange, Record};
use crate::types::{BlockNo, ChunkHash, Epoch, GroupName, Seq, SeqBase, TimeNs, VolumeName};

use super::epoch::{Abandoned, GroupRole, History};
use super::PointInTime;

/// One consistency group: its agent spool, its volumes, its journal and its epoch.
#[derive(Debug)]
pub(crate) struct GroupState {
    pub spool_id: u64,
    /// Journal seq = `seq_base` + the agent spool's own seq (non-zero once a new spool took over
    /// the group after a failover).
    pub seq_base: SeqBase,
    /// The epoch in which the current spool was registered: a new spool may take over the
    /// group only in a later epoch.
    pub spool_epoch: Epoch,
    /// Spools that fed the group before the current one: never accepted again.
    pub retired_spools: Vec<u64>,
    /// The durable seq when the current spool was registered: the records after it are the
    /// ones this spool sent (kept in memory only; replay sets it again).
    pub spool_since: Seq,
    pub role: GroupRole,
    pub history: History,
    /// What this site set aside when it last joined a newer timeline.
    pub abandoned: Option<Abandoned>,
    /// Member volumes, in the order they were first registered.
    pub volumes: Vec<VolumeName>,
    /// Every durable record, seq-contiguous, time non-decreasing.
    pub records: Vec<Record>,
}

impl GroupState {
    pub fn new(spool_id: u64) -> GroupState {
        GroupState {
            spool_id,
            seq_base: SeqBase::ZERO,
            spool_epoch: Epoch::FIRST,
            retired_spools: Vec::new(),
            spool_since: Seq::ZERO,
            role: GroupRole::Primary,
            history: History::default(),
            abandoned: None,
            volumes: Vec::new(),
            records: Vec::new(),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.history.current()
    }

    pub fn durable(&self) -> Seq {
        self.records.last().map_or(Seq::ZERO, |r| r.seq)
    }

    /// The record with `seq`, if the journal holds it and the current spool sent it.
    pub fn record_of_current_spool(&self, seq: Seq) -> Option<&Record> {
        (seq > self.spool_since).then(|| self.record(seq)).flatten()
    }

    /// The record with `seq`, if the journal holds it.
    pub fn record(&self, seq: Seq) -> Option<&Record> {
        let first = self.records.first()?.seq;
        let index = seq.0.checked_sub(first.0)?;
        self.records.get(usize::try_from(index).ok()?)
    }

    /// How many records a restore at `point` applies.
    pub fn prefix_len(&self, point: PointInTime) -> usize {
        match point {
            PointInTime::Latest => self.records.len(),
            PointInTime::Seq(seq) => self.records.partition_point(|r| r.seq <= seq),
            PointInTime::Time(time) => self.records.partition_point(|r| r.time <= time),
        }
    }

    fn describe(&self, seq: Seq) -> String {
        match self.record(seq) {
            Some(r) => format!("{seq} (time {} ns)", r.time.0),
            None => seq.to_string(),
        }
    }
}

/// Where a volume's journal became complete (baseline or resync finished) or lost track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkerKind {
    Complete,
    Gap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub seq: Seq,
    pub kind: MarkerKind,
}

#[derive(Debug)]
pub(crate) struct VolumeState {
    pub group: GroupName,
    pub size_bytes: u64,
    /// Complete and Gap records naming this volume, in seq order.
    pub markers: Vec<Marker>,
}

impl VolumeState {
    /// Blocks in the volume, counting a partial last block.
    pub fn block_count(&self) -> u64 {
        block_count(self.size_bytes)
    }

    /// True when the newest marker is a Complete: the latest point is restorable.
    pub fn complete(&self) -> bool {
        matches!(self.markers.last(), Some(m) if m.kind == MarkerKind::Complete)
    }

    /// Why the state after applying every record up to `last_applied` (None: no record at
    /// all) cannot be restored, or Ok.
    pub fn check_restorable(
        &self,
        group: &GroupState,
        point: PointInTime,
        last_applied: Option<Seq>,
    ) -> Result<(), String> {
        let first_complete = self.markers.iter().find(|m| m.kind == MarkerKind::Complete);
        let upto = last_applied.map_or(0, |seq| self.markers.partition_point(|m| m.seq <= seq));
        let Some(last) = upto.checked_sub(1).map(|i| self.markers[i]) else {
            return Err(match first_complete {
                None => format!(
                    "its baseline has not finished yet: no point is restorable until the agent's first full copy of the volume reaches the collector (a Complete record; {} records of the group so far)",
                    group.records.len()
                ),
                Some(c) => format!(
                    "{point} is before the volume's baseline finished at {}; the oldest restorable point is that one",
                    group.describe(c.seq)
                ),
            });
        };
        match last.kind {
            MarkerKind::Complete => Ok(()),
            MarkerKind::Gap => {
                let resumed = self.markers[upto..]
                    .iter()
                    .find(|m| m.kind == MarkerKind::Complete);
                let after = match resumed {
                    Some(c) => format!(
                        ", or one from {} on, when the resync had finished",
                        group.describe(c.seq)
                    ),
                    None => ", or wait for the agent's resync to finish".to_string(),
                };
                Err(format!(
                    "{point} falls inside a journal gap that starts at {}: changes in it were not journalled one by one (the agent's spool overflowed, the agent lost records in a power loss, or data of a write before it shipped) and a resync journals the blocks again; restore a point before the gap{after}",
                    group.describe(last.seq)
                ))
            }
        }
    }

    /// Times of the oldest and the newest restorable record.
    pub fn window(&self, group: &GroupState) -> Option<(TimeNs, TimeNs)> {
        let first_complete = self
            .markers
            .iter()
            .find(|m| m.kind == MarkerKind::Complete)?;
        let oldest = group.record(first_complete.seq)?.time;
        let last_complete = self
            .markers
            .iter()
            .rposition(|m| m.kind == MarkerKind::Complete)?;
        let newest = match self.markers[last_complete..]
            .iter()
            .find(|m| m.kind == MarkerKind::Gap)
        {
            // The Complete at `last_complete` is before the gap, so seq - 1 is still restorable.
            Some(gap) => group.record(Seq(gap.seq.0.saturating_sub(1)))?.time,
            None => group.records.last()?.time,
        };
        Some((oldest, newest))
    }
}

/// Blocks in a volume of `size_bytes`, counting a partial last block.
pub(crate) fn block_count(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(crate::types::BLOCK_SIZE_BYTES)
}

/// The non-zero blocks of `volume` after applying `records` in order, sorted by block.
///
/// Replayed newest first: the newest record that touches a block decides it, so every block is
/// settled once and older records only fill what is still open. The settled blocks are kept as
/// intervals, so a record costs a few interval operations however many blocks it covers (a
/// 1 MiB write is one operation, not 256 map inserts), and the surviving pieces of write
/// records, disjoint by construction, are put in order by their first block alone.
pub(crate) fn replay<'a, I>(records: I, volume: &VolumeName) -> Vec<(BlockNo, ChunkHash)>
where
    I: IntoIterator<Item = &'a Record>,
    I::IntoIter: DoubleEndedIterator,
{
    let mut settled = SettledBlocks::default();
    // (first block, the record's chunks for the blocks from there) of each surviving piece.
    let mut pieces: Vec<(u64, &'a [Option<ChunkHash>])> = Vec::new();
    for record in records.into_iter().rev() {
        match record.kind.block_change(volume) {
            Some(BlockChange::Write { first, blocks }) => {
                let end = first.0.saturating_add(blocks.len() as u64);
                settled.settle(first.0, end, |from, to| {
                    let at = (from - first.0) as usize;
                    pieces.push((from, &blocks[at..at + (to - from) as usize]));
                });
            }
            Some(BlockChange::Zero { first, count }) => {
                settled.settle(first.0, first.0.saturating_add(count), |_, _| {})
            }
            None => {}
        }
    }
    pieces.sort_unstable_by_key(|&(first, _)| first);
    let mut out = Vec::with_capacity(pieces.iter().map(|(_, chunks)| chunks.len()).sum());
    for (first, chunks) in pieces {
        let present = (first..)
            .zip(chunks)
            .filter_map(|(b, c)| c.map(|h| (BlockNo(b), h)));
        out.extend(present);
    }
    out
}

/// Blocks whose final state is known, as disjoint, non-touching `[start, end)` intervals keyed
/// by start.
#[derive(Default)]
struct SettledBlocks {
    intervals: BTreeMap<u64, u64>,
    /// Starts of the intervals one `settle` merges away (kept to reuse the allocation).
    merged: Vec<u64>,
}

impl SettledBlocks {
    /// Settles `[start, end)`, calling `open(from, to)` for each part of it, in increasing
    /// order, that was not settled before.
    fn settle(&mut self, start: u64, end: u64, mut open: impl FnMut(u64, u64)) {
        if start >= end {
            return;
        }
        self.merged.clear();
        let (mut merged_start, mut merged_end, mut cursor) = (start, end, start);
        if let Some((&s, &e)) = self.intervals.range(..=start).next_back() {
            if e >= start {
                self.merged.push(s);
                (merged_start, merged_end, cursor) = (s, e.max(end), e.max(start));
            }
        }
        let later = (
            std::ops::Bound::Excluded(start),
            std::ops::Bound::Included(end),
        );
        for (&s, &e) in self.intervals.range(later) {
            if cursor < s {
                open(cursor, s);
            }
            self.merged.push(s);
            cursor = cursor.max(e);
            merged_end = merged_end.max(e);
        }
        if cursor < end {
            open(cursor, end);
        }
        for s in &self.merged {
            self.intervals.remove(s);
        }
        self.intervals.insert(merged_start, merged_end);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::record::{RecordKind, WriteOrigin};

    fn vol(name: &str) -> VolumeName {
        VolumeName::new(name).unwrap()
    }

    fn h(n: u8) -> ChunkHash {
        ChunkHash::of(&[n])
    }

    #[test]
    fn replay_applies_writes_trims_and_zeroes_of_one_volume_only() {
        let (a, b) = (vol("a"), vol("b"));
        let kinds = vec![
            RecordKind::Write {
                volume: a.clone(),
                first: BlockNo(2),
                blocks: vec![Some(h(1)), Some(h(2)), Some(h(3)), Some(h(4))],
                origin: WriteOrigin::Client,
            },
            RecordKind::Write {
                volume: b.clone(),
                first: BlockNo(0),
                blocks: vec![Some(h(9))],
                origin: WriteOrigin::Client,
            },
            RecordKind::Trim {
                volume: a.clone(),
                first: BlockNo(3),
                count: 1,
            },
            RecordKind::Write {
                volume: a.clone(),
                first: BlockNo(5),
                blocks: vec![None, Some(h(6))],
                origin: WriteOrigin::Resync,
            },
            RecordKind::WriteZeroes {
                volume: b.clone(),
                first: BlockNo(0),
                count: u64::MAX,
            },
        ];
        let records: Vec<Record> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Record {
                seq: Seq(i as u64 + 1),
                time: TimeNs(i as i64),
                kind,
            })
            .collect();
        assert_eq!(
            replay(&records, &a),
            vec![(BlockNo(2), h(1)), (BlockNo(4), h(3)), (BlockNo(6), h(6))]
        );
        assert_eq!(replay(&records[..2], &b), vec![(BlockNo(0), h(9))]);
        assert_eq!(replay(&records, &b), vec![]);
    }

    /// The obvious replay, oldest first into a map of every block: the model [`replay`] must
    /// agree with.
    fn replay_by_map(records: &[Record], volume: &VolumeName) -> Vec<(BlockNo, ChunkHash)> {
        let mut map = BTreeMap::new();
        for record in records {
            match record.kind.block_change(volume) {
                Some(BlockChange::Write { first, blocks }) => {
                    for (block, chunk) in (first.0..).zip(blocks) {
                        match chunk {
                            Some(hash) => map.insert(block, *hash),
                            None => map.remove(&block),
                        };
                    }
                }
                Some(BlockChange::Zero { first, count }) => {
                    let end = first.0.saturating_add(count);
                    map.retain(|block, _| !(first.0..end).contains(block));
                }
                None => {}
            }
        }
        map.into_iter().map(|(b, h)| (BlockNo(b), h)).collect()
    }

    fn random_kind(rng: &mut impl rand::Rng, volumes: &[VolumeName]) -> RecordKind {
        let volume = volumes[rng.gen_range(0..volumes.len())].clone();
        let first = BlockNo(rng.gen_range(0..48));
        let count = match rng.gen_range(0..10) {
            0 => u64::MAX,
            _ => rng.gen_range(0..20),
        };
        match rng.gen_range(0..8) {
            0 => RecordKind::Trim {
                volume,
                first,
                count,
            },
            1 => RecordKind::WriteZeroes {
                volume,
                first,
                count,
            },
            _ => RecordKind::Write {
                volume,
                first,
                blocks: (0..rng.gen_range(1..20))
                    .map(|_| rng.gen_bool(0.9).then(|| h(rng.gen())))
                    .collect(),
                origin: WriteOrigin::Client,
            },
        }
    }

    #[test]
    fn replay_agrees_with_applying_every_record_to_a_map() {
        use rand::{Rng, SeedableRng};
        let volumes = [vol("a"), vol("b")];
        for seed in 0..2000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let records: Vec<Record> = (0..rng.gen_range(0..40))
                .map(|i| Record {
                    seq: Seq(i + 1),
                    time: TimeNs(i as i64),
                    kind: random_kind(&mut rng, &volumes),
                })
                .collect();
            for volume in &volumes {
                for n in [records.len() / 2, records.len()] {
                    assert_eq!(
                        replay(&records[..n], volume),
                        replay_by_map(&records[..n], volume),
                        "seed {seed}, {n} records of volume {volume}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_count_rounds_up() {
        assert_eq!(block_count(0), 0);
        assert_eq!(block_count(1), 1);
        assert_eq!(block_count(4096), 1);
        assert_eq!(block_count(4097), 2);
    }
}
