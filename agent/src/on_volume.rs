//! Which blocks of a volume are, for now, the only copy of a spooled write's data.
//!
//! A large write is spooled without its data ([`tideline_core::spool::SpoolOp::OnVolume`]):
//! the volume already holds it, and writing it to the spool as well made the disk write every
//! byte twice. Until the collector holds the record, the volume's blocks *are* its data. So
//! before any change touches such blocks, the group saves them to the spool
//! ([`tideline_core::spool::Spool::save_blocks`]) and takes them out of this map; once the
//! collector acknowledges the record, its blocks are forgotten here too.

use std::collections::BTreeMap;

use tideline_core::Seq;

/// Disjoint block ranges `[first, end)`, each holding the data of one unshipped record.
#[derive(Debug, Default)]
pub struct OnVolumeMap {
    /// First block → (end block, record).
    by_block: BTreeMap<u64, (u64, Seq)>,
    /// Record → the range it was inserted with (parts of it may have been taken since).
    by_seq: BTreeMap<Seq, (u64, u64)>,
}

impl OnVolumeMap {
    /// Blocks `[first, end)` now hold record `seq`'s data. Whatever the map held for them
    /// before is dropped (the caller has saved it).
    pub fn insert(&mut self, first: u64, end: u64, seq: Seq) {
        self.take_overlapping(first, end);
        self.by_block.insert(first, (end, seq));
        self.by_seq.insert(seq, (first, end));
    }

    /// The parts of ranges inside `[first, end)`, as `(first, end, seq)` in block order.
    pub fn overlapping(&self, first: u64, end: u64) -> Vec<(u64, u64, Seq)> {
        let before = self
            .by_block
            .range(..first)
            .next_back()
            .filter(|(_, &(e, _))| e > first);
        before
            .into_iter()
            .chain(self.by_block.range(first..end))
            .map(|(&f, &(e, s))| (f.max(first), e.min(end), s))
            .collect()
    }

    /// Whether any range has blocks inside `[first, end)` (without collecting them).
    pub fn overlaps(&self, first: u64, end: u64) -> bool {
        if first >= end {
            return false;
        }
        let before = self.by_block.range(..first).next_back();
        before.is_some_and(|(_, &(e, _))| e > first)
            || self.by_block.range(first..end).next().is_some()
    }

    /// Removes and returns the parts of ranges inside `[first, end)`, as `(first, end, seq)`
    /// in block order; parts outside it stay.
    pub fn take_overlapping(&mut self, first: u64, end: u64) -> Vec<(u64, u64, Seq)> {
        let before = self
            .by_block
            .range(..first)
            .next_back()
            .filter(|(_, &(e, _))| e > first)
            .map(|(&f, _)| f);
        let starts: Vec<u64> = before
            .into_iter()
            .chain(self.by_block.range(first..end).map(|(&f, _)| f))
            .collect();
        let mut taken = Vec::with_capacity(starts.len());
        for start in starts {
            let Some((stop, seq)) = self.by_block.remove(&start) else {
                continue;
            };
            if start < first {
                self.by_block.insert(start, (first, seq));
            }
            if stop > end {
                self.by_block.insert(end, (stop, seq));
            }
            taken.push((start.max(first), stop.min(end), seq));
        }
        taken
    }

    /// The parts of record `seq` still in the map, as `(first, end)` in block order.
    pub fn parts_of(&self, seq: Seq) -> Vec<(u64, u64)> {
        let Some(&(first, end)) = self.by_seq.get(&seq) else {
            return Vec::new();
        };
        self.by_block
            .range(first..end)
            .filter(|(_, &(_, s))| s == seq)
            .map(|(&f, &(e, _))| (f, e))
            .collect()
    }

    /// The first block record `seq` was inserted with.
    pub fn first_block_of(&self, seq: Seq) -> Option<u64> {
        self.by_seq.get(&seq).map(|&(first, _)| first)
    }

    /// Removes every part of record `seq`.
    pub fn remove(&mut self, seq: Seq) {
        for (first, _) in self.parts_of(seq) {
            self.by_block.remove(&first);
        }
        self.by_seq.remove(&seq);
    }

    /// The collector holds every record through `seq`: their blocks are free to change.
    pub fn forget_through(&mut self, seq: Seq) {
        let kept = self.by_seq.split_off(&seq.next());
        let shipped = std::mem::replace(&mut self.by_seq, kept);
        for (record, (first, end)) in shipped {
            let parts: Vec<u64> = self
                .by_block
                .range(first..end)
                .filter(|(_, &(_, s))| s == record)
                .map(|(&f, _)| f)
                .collect();
            for part in parts {
                self.by_block.remove(&part);
            }
        }
    }

    /// Every range, in block order: `(first, end, seq)`.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, Seq)> + '_ {
        self.by_block.iter().map(|(&f, &(e, s))| (f, e, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map as a per-block model: `model[b]` is the record block `b` holds, if any.
    fn blocks(map: &OnVolumeMap, len: u64) -> Vec<Option<Seq>> {
        let mut model = vec![None; len as usize];
        for (first, end, seq) in map.ranges() {
            assert!(first < end, "empty range {first}..{end}");
            for b in first..end {
                assert!(model[b as usize].is_none(), "ranges overlap at block {b}");
                model[b as usize] = Some(seq);
            }
        }
        model
    }

    #[test]
    fn matches_a_per_block_model_through_random_inserts_takes_and_forgets() {
        const LEN: u64 = 64;
        let mut map = OnVolumeMap::default();
        let mut model: Vec<Option<Seq>> = vec![None; LEN as usize];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut seq = 0u64;
        for _ in 0..5_000 {
            let first = next() % LEN;
            let end = (first + 1 + next() % 16).min(LEN);
            match next() % 5 {
                4 => {
                    let victim = Seq(seq.saturating_sub(next() % 8));
                    let parts = map.parts_of(victim);
                    let expected: Vec<u64> = (0..LEN)
                        .filter(|&b| model[b as usize] == Some(victim))
                        .collect();
                    let got: Vec<u64> = parts.iter().flat_map(|&(f, e)| f..e).collect();
                    assert_eq!(got, expected);
                    map.remove(victim);
                    for slot in &mut model {
                        if *slot == Some(victim) {
                            *slot = None;
                        }
                    }
                }
                0 | 1 => {
                    seq += 1;
                    map.insert(first, end, Seq(seq));
                    model[first as usize..end as usize].fill(Some(Seq(seq)));
                }
                2 => {
                    let taken = map.take_overlapping(first, end);
                    let mut expected = Vec::new();
                    for b in first..end {
                        if let Some(s) = model[b as usize].take() {
                            expected.push((b, s));
                        }
                    }
                    let got: Vec<(u64, Seq)> = taken
                        .iter()
                        .flat_map(|&(f, e, s)| (f..e).map(move |b| (b, s)))
                        .collect();
                    assert_eq!(got, expected);
                }
                _ => {
                    let through = Seq(seq.saturating_sub(next() % 8));
                    map.forget_through(through);
                    for slot in &mut model {
                        if slot.is_some_and(|s| s <= through) {
                            *slot = None;
                        }
                    }
                }
            }
            assert_eq!(blocks(&map, LEN), model);
            let (first, end) = (next() % LEN, next() % LEN);
            let any = (first..end).any(|b| model[b as usize].is_some());
            assert_eq!(map.overlaps(first, end), any, "[{first}, {end})");
        }
    }
}
