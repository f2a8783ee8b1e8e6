//! Entries of `catalog.log`, the store-wide append-only log that commits everything.
//!
//! Every entry body starts with a 1-byte tag and a 1-byte version; all integers are
//! little-endian, a name is `u8 len | UTF-8 bytes`:
//!
//! ```text
//! GroupRegistered  tag 1 | ver 1 | group name | u64 spool_id | u32 n |
//!                  n x (volume name | u64 size_bytes)
//!                  tag 1 | ver 2 | group name | u64 spool_id | u64 seq_base | u64 spool_epoch |
//!                  u32 n | n x (volume name | u64 size_bytes)
//! Batch            tag 2 | ver 1 | group name |
//!                  u32 f | f x (u32 pack id | u64 entry offset | u32 entry len | u16 block count)
//!                  u32 c | c x (32-byte hash | u32 frame index (into the f frames) | u16 block index)
//!                  u32 r | r x (u32 len | record, as `Record::encode` writes it)
//! GroupControl     tag 3 | ver 1 | group name | u8 role (1 primary, 2 replica, 3 fenced) |
//!                  u64 fenced_by | u64 keep_through (u64::MAX: keep all) |
//!                  u32 n | n x (u64 epoch | u64 starts after seq)
//! ```
//!
//! `GroupRegistered` is written as version 1 while its seq base is 0 and its spool epoch 1
//! (so a store that never failed over stays byte-identical to older ones), else version 2. A `GroupControl` sets the group's role and epoch history and, when `keep_through`
//! is below the durable seq, sets the journal's tail after it aside (a fork): it is ordered with
//! the batches in the same log, so a replay drops exactly the records the fork dropped and
//! keeps the ones appended after it.
//!
//! A `Batch` lists the frames it appended to packs once, and each new chunk's location as a
//! reference into that list: (hash, pack, frame offset, frame length, index in frame).
//! Decoding checks every length and reference, so bytes from disk never cause a panic.

use crate::record::Record;
use crate::types::{ChunkHash, GroupName, SeqBase, VolumeName};

use super::epoch::{EpochStart, GroupRole, History};
use super::pack::PackId;
use super::VolumeMeta;
use crate::types::{Epoch, Seq};

pub(crate) const TAG_GROUP_REGISTERED: u8 = 1;
pub(crate) const TAG_BATCH: u8 = 2;
pub(crate) const TAG_GROUP_CONTROL: u8 = 3;
pub(crate) const VERSION_1: u8 = 1;
pub(crate) const VERSION_2: u8 = 2;

/// A group was registered or re-registered (new spool id, more volumes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupRegistered {
    pub group: GroupName,
    pub spool_id: u64,
    /// Journal seq of the spool's seq 0.
    pub seq_base: SeqBase,
    /// Epoch in which the spool took over the group.
    pub spool_epoch: Epoch,
    pub volumes: Vec<VolumeMeta>,
}

/// A group's role and epoch history changed, possibly forking its journal after `keep_through`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupControl {
    pub group: GroupName,
    pub role: GroupRole,
    pub history: History,
    pub keep_through: Option<Seq>,
}

/// A frame appended to a pack by a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FramePos {
    pub pack: PackId,
    pub offset: u64,
    pub entry_len: u32,
    pub block_count: u16,
}

/// A chunk first stored by a batch: block `index` of the batch's frame number `frame`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewChunk {
    pub hash: ChunkHash,
    pub frame: u32,
    pub index: u16,
}

/// One ingest made durable: the frames it stored, the chunks they made available, the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Batch {
    pub group: GroupName,
    pub frames: Vec<FramePos>,
    pub chunks: Vec<NewChunk>,
    pub records: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    GroupRegistered(GroupRegistered),
    Batch(Batch),
    GroupControl(GroupControl),
}

impl Batch {
    /// Appends the entry body of this batch to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[TAG_BATCH, VERSION_1]);
        put_name(out, self.group.as_str());
        out.extend_from_slice(&(self.frames.len() as u32).to_le_bytes());
        for f in &self.frames {
            out.extend_from_slice(&f.pack.0.to_le_bytes());
            out.extend_from_slice(&f.offset.to_le_bytes());
            out.extend_from_slice(&f.entry_len.to_le_bytes());
            out.extend_from_slice(&f.block_count.to_le_bytes());
        }
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.hash.0);
            out.extend_from_slice(&c.frame.to_le_bytes());
            out.extend_from_slice(&c.index.to_le_bytes());
        }
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        let mut record = Vec::new();
        for r in &self.records {
            record.clear();
            r.encode(&mut record);
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.extend_from_slice(&record);
        }
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // Names are validated to at most 64 bytes, so the length fits a byte.
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Entry::GroupRegistered(g) => {
                // Version 1 while the new fields hold their defaults, so stores that never
                // failed over stay byte-identical to older ones.
                let v1 = g.seq_base == SeqBase::ZERO && g.spool_epoch == Epoch::FIRST;
                let version = if v1 { VERSION_1 } else { VERSION_2 };
                out.extend_from_slice(&[TAG_GROUP_REGISTERED, version]);
                put_name(&mut out, g.group.as_str());
                out.extend_from_slice(&g.spool_id.to_le_bytes());
                if !v1 {
                    out.extend_from_slice(&g.seq_base.0.to_le_bytes());
                    out.extend_from_slice(&g.spool_epoch.0.to_le_bytes());
                }
                out.extend_from_slice(&(g.volumes.len() as u32).to_le_bytes());
                for v in &g.volumes {
                    put_name(&mut out, v.name.as_str());
                    out.extend_from_slice(&v.size_bytes.to_le_bytes());
                }
            }
            Entry::Batch(b) => b.encode_into(&mut out),
            Entry::GroupControl(c) => {
                out.extend_from_slice(&[TAG_GROUP_CONTROL, VERSION_1]);
                put_name(&mut out, c.group.as_str());
                let (role, by) = c.role.code();
                out.push(role);
                out.extend_from_slice(&by.to_le_bytes());
                out.extend_from_slice(&c.keep_through.map_or(u64::MAX, |s| s.0).to_le_bytes());
                out.extend_from_slice(&(c.history.0.len() as u32).to_le_bytes());
                for e in &c.history.0 {
                    out.extend_from_slice(&e.epoch.0.to_le_bytes());
                    out.extend_from_slice(&e.after.0.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes one entry body. The error says what is wrong, for the operator.
    pub fn decode(body: &[u8]) -> Result<Entry, String> {
        let mut r = Reader { bytes: body, at: 0 };
        let tag = r.u8()?;
        let version = r.u8()?;
        if !matches!(tag, TAG_GROUP_REGISTERED | TAG_BATCH | TAG_GROUP_CONTROL) {
            return Err(format!(
                "unknown catalog entry type {tag}: the store was written by a newer Tideline; run that version"
            ));
        }
        let known = version == VERSION_1 || (tag == TAG_GROUP_REGISTERED && version == VERSION_2);
        if !known {
            return Err(format!(
                "catalog entry type {tag} has version {version}, this build reads version {VERSION_1}: the store was written by a newer Tideline; run that version"
            ));
        }
        let entry = if tag == TAG_GROUP_CONTROL {
            let group = r.group()?;
            let code = r.u8()?;
            let by = r.u64()?;
            let role = GroupRole::from_code(code, by)
                .ok_or_else(|| format!("group control names unknown role {code}"))?;
            let keep = r.u64()?;
            let n = r.count(16)?;
            let mut history = Vec::with_capacity(n);
            for _ in 0..n {
                let epoch = Epoch(r.u64()?);
                let after = Seq(r.u64()?);
                history.push(EpochStart { epoch, after });
            }
            let history = History(history);
            history.validate()?;
            Entry::GroupControl(GroupControl {
                group,
                role,
                history,
                keep_through: (keep != u64::MAX).then_some(Seq(keep)),
            })
        } else if tag == TAG_GROUP_REGISTERED {
            let group = r.group()?;
            let spool_id = r.u64()?;
            let (seq_base, spool_epoch) = if version == VERSION_2 {
                (SeqBase(r.u64()?), Epoch(r.u64()?))
            } else {
                (SeqBase::ZERO, Epoch::FIRST)
            };
            let n = r.count(1 + 8)?;
            let mut volumes = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.volume()?;
                let size_bytes = r.u64()?;
                volumes.push(VolumeMeta { name, size_bytes });
            }
            Entry::GroupRegistered(GroupRegistered {
                group,
                spool_id,
                seq_base,
                spool_epoch,
                volumes,
            })
        } else {
            let group = r.group()?;
            let n = r.count(4 + 8 + 4 + 2)?;
            let mut frames = Vec::with_capacity(n);
            for _ in 0..n {
                let pack = PackId(r.u32()?);
                let offset = r.u64()?;
                let entry_len = r.u32()?;
                let block_count = r.u16()?;
                if block_count == 0 || usize::from(block_count) > crate::frame::MAX_FRAME_BLOCKS {
                    return Err(format!("batch frame names {block_count} blocks"));
                }
                frames.push(FramePos {
                    pack,
                    offset,
                    entry_len,
                    block_count,
                });
            }
            let n = r.count(32 + 4 + 2)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let hash = ChunkHash(r.array()?);
                let frame = r.u32()?;
                let index = r.u16()?;
                let Some(pos) = frames.get(frame as usize) else {
                    return Err(format!(
                        "chunk {hash} refers to frame {frame} of a batch of {} frames",
                        frames.len()
                    ));
                };
                if index >= pos.block_count {
                    return Err(format!(
                        "chunk {hash} is block {index} of a frame of {} blocks",
                        pos.block_count
                    ));
                }
                chunks.push(NewChunk { hash, frame, index });
            }
            let n = r.count(4)?;
            let mut records = Vec::with_capacity(n);
            for i in 0..n {
                let len = r.u32()? as usize;
                let raw = r.take(len)?;
                let record =
                    Record::decode(raw).map_err(|e| format!("record {i} of the batch: {e}"))?;
                records.push(record);
            }
            Entry::Batch(Batch {
                group,
                frames,
                chunks,
                records,
            })
        };
        if r.at != body.len() {
            return Err(format!(
                "{} unexpected bytes after the catalog entry",
                body.len() - r.at
            ));
        }
        Ok(entry)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        match self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
        {
            Some(end) => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            None => Err(format!(
                "catalog entry ends early: {n} bytes needed at byte {}, {} left",
                self.at,
                self.bytes.len() - self.at
            )),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A `u32` count of items of at least `min_item_bytes` each, checked against the bytes left
    /// so that a damaged count cannot cause a huge allocation.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        let left = self.bytes.len() - self.at;
        if n.saturating_mul(min_item_bytes) > left {
            return Err(format!(
                "catalog entry claims {n} items but only {left} bytes remain"
            ));
        }
        Ok(n)
    }
    fn name(&mut self) -> Result<&'a str, String> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| "name in catalog entry is not UTF-8".to_string())
    }
    fn group(&mut self) -> Result<GroupName, String> {
        GroupName::new(self.name()?).map_err(|e| e.to_string())
    }
    fn volume(&mut self) -> Result<VolumeName, String> {
        VolumeName::new(self.name()?).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::record::{RecordKind, WriteOrigin};
    use crate::types::{BlockNo, Seq, TimeNs};

    fn samples() -> Vec<Entry> {
        let vol = VolumeName::new("vol-a").unwrap();
        vec![
            Entry::GroupControl(GroupControl {
                group: GroupName::new("g1").unwrap(),
                role: GroupRole::Fenced { by: Epoch(3) },
                history: History::default().with(Epoch(2), Seq(40)),
                keep_through: Some(Seq(40)),
            }),
            Entry::GroupRegistered(GroupRegistered {
                group: GroupName::new("g1").unwrap(),
                spool_id: 0xdead_beef,
                seq_base: SeqBase(17),
                spool_epoch: Epoch(2),
                volumes: vec![
                    VolumeMeta {
                        name: vol.clone(),
                        size_bytes: 1 << 30,
                    },
                    VolumeMeta {
                        name: VolumeName::new("vol-b").unwrap(),
                        size_bytes: 4096,
                    },
                ],
            }),
            Entry::Batch(Batch {
                group: GroupName::new("g1").unwrap(),
                frames: vec![
                    FramePos {
                        pack: PackId(1),
                        offset: 0,
                        entry_len: 100,
                        block_count: 2,
                    },
                    FramePos {
                        pack: PackId(2),
                        offset: 7,
                        entry_len: 50,
                        block_count: 1,
                    },
                ],
                chunks: vec![
                    NewChunk {
                        hash: ChunkHash::of(b"x"),
                        frame: 0,
                        index: 1,
                    },
                    NewChunk {
                        hash: ChunkHash::of(b"y"),
                        frame: 1,
                        index: 0,
                    },
                ],
                records: vec![
                    Record {
                        seq: Seq(1),
                        time: TimeNs(10),
                        kind: RecordKind::Write {
                            volume: vol.clone(),
                            first: BlockNo(3),
                            blocks: vec![Some(ChunkHash::of(b"x")), None],
                            origin: WriteOrigin::Client,
                        },
                    },
                    Record {
                        seq: Seq(2),
                        time: TimeNs(11),
                        kind: RecordKind::Complete { volume: vol },
                    },
                ],
            }),
            Entry::Batch(Batch {
                group: GroupName::new("g1").unwrap(),
                frames: vec![],
                chunks: vec![],
                records: vec![],
            }),
        ]
    }

    #[test]
    fn entries_round_trip() {
        for entry in samples() {
            assert_eq!(Entry::decode(&entry.encode()).unwrap(), entry);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for entry in samples() {
            let bytes = entry.encode();
            for cut in 0..bytes.len() {
                assert!(
                    Entry::decode(&bytes[..cut]).is_err(),
                    "cut {cut} of {entry:?}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Entry::decode(&longer).is_err());
        }
    }

    #[test]
    fn newer_formats_are_refused_with_a_hint() {
        let mut bytes = samples()[0].encode();
        bytes[1] = 2;
        assert!(Entry::decode(&bytes)
            .unwrap_err()
            .contains("newer Tideline"));
        bytes[0] = 9;
        assert!(Entry::decode(&bytes)
            .unwrap_err()
            .contains("unknown catalog entry type 9"));
    }

    #[test]
    fn bad_references_are_errors() {
        let Entry::Batch(mut batch) = samples()[2].clone() else {
            unreachable!()
        };
        batch.chunks[0].frame = 5;
        assert!(Entry::decode(&Entry::Batch(batch.clone()).encode()).is_err());
        batch.chunks[0].frame = 1;
        batch.chunks[0].index = 1;
        assert!(Entry::decode(&Entry::Batch(batch).encode()).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let valid = samples()[2].encode();
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            bytes.truncate(rng.gen_range(0..=valid.len()));
            let _ = Entry::decode(&bytes);
        }
    }
}
