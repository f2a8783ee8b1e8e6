//! Journal records: the unit of ordering, shipping and restore.
//!
//! A record is block-aligned by construction: the agent turns an unaligned write, trim or
//! write-zeroes into whole blocks (reading back the edge blocks after applying the change),
//! so that replaying records never needs a byte-level merge.
//!
//! The binary encoding here is shared by the agent's spool and the collector's journal index.
//! It is versioned by the files that hold it (see [`crate::framed`]), little-endian, and every
//! length is checked on decode: a record decoded from disk or the network never panics.

use crate::types::{BlockNo, CheckpointName, ChunkHash, Seq, TimeNs, VolumeName};

/// One entry in a consistency group's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    pub time: TimeNs,
    pub kind: RecordKind,
}

/// Why a block run was written: by a client, or read from the volume by the agent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOrigin {
    /// A client write (NBD WRITE, FUSE write) or the edge blocks of an unaligned trim.
    Client,
    /// Blocks read from the volume during a baseline or a resync after a spool overflow.
    Resync,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// `blocks[i]` is the content of block `first + i`; `None` is the all-zero block.
    Write {
        volume: VolumeName,
        first: BlockNo,
        blocks: Vec<Option<ChunkHash>>,
        origin: WriteOrigin,
    },
    /// Blocks discarded: they read as zeroes from now on.
    Trim {
        volume: VolumeName,
        first: BlockNo,
        count: u64,
    },
    /// Blocks explicitly zeroed.
    WriteZeroes {
        volume: VolumeName,
        first: BlockNo,
        count: u64,
    },
    /// A client flush completed: every earlier record is a crash-consistent point.
    Flush,
    /// A named point, possibly taken with the application quiesced.
    Checkpoint {
        name: CheckpointName,
        app_consistent: bool,
    },
    /// The volume's journal is complete from this record on: every block the volume holds is
    /// accounted for by earlier records. Emitted when a baseline or a resync finishes.
    Complete { volume: VolumeName },
    /// The journal loses track of the volume from here until the next [`RecordKind::Complete`]
    /// (the spool overflowed, records were lost in a power loss, or a write's data was lost
    /// before it shipped). Points in between cannot be restored.
    Gap { volume: VolumeName },
}

/// What a record does to the blocks of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChange<'a> {
    /// Blocks from `first` on now hold these chunks (`None`: zeroes).
    Write {
        first: BlockNo,
        blocks: &'a [Option<ChunkHash>],
    },
    /// `count` blocks from `first` on now read as zeroes (a trim or a write-zeroes).
    Zero { first: BlockNo, count: u64 },
}

impl RecordKind {
    /// What this record does to the blocks of `volume`, if anything.
    pub fn block_change(&self, volume: &VolumeName) -> Option<BlockChange<'_>> {
        match self {
            RecordKind::Write {
                volume: v,
                first,
                blocks,
                ..
            } if v == volume => Some(BlockChange::Write {
                first: *first,
                blocks,
            }),
            RecordKind::Trim {
                volume: v,
                first,
                count,
            }
            | RecordKind::WriteZeroes {
                volume: v,
                first,
                count,
            } if v == volume => Some(BlockChange::Zero {
                first: *first,
                count: *count,
            }),
            _ => None,
        }
    }

    pub fn volume(&self) -> Option<&VolumeName> {
        match self {
            RecordKind::Write { volume, .. }
            | RecordKind::Trim { volume, .. }
            | RecordKind::WriteZeroes { volume, .. }
            | RecordKind::Complete { volume }
            | RecordKind::Gap { volume } => Some(volume),
            RecordKind::Flush | RecordKind::Checkpoint { .. } => None,
        }
    }

    /// Number of block chunk names carried (zero blocks included).
    pub fn block_count(&self) -> u64 {
        match self {
            RecordKind::Write { blocks, .. } => blocks.len() as u64,
            RecordKind::Trim { count, .. } | RecordKind::WriteZeroes { count, .. } => *count,
            _ => 0,
        }
    }
}

/// What is wrong with bytes that should hold a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record ends early: needed {needed} more bytes at byte {at}")]
    Truncated { at: usize, needed: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("invalid name in record: {0}")]
    BadName(String),
    #[error("{0} trailing bytes after record")]
    Trailing(usize),
    #[error("record field out of range: {0}")]
    OutOfRange(&'static str),
}

const KIND_WRITE: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_WRITE_ZEROES: u8 = 3;
const KIND_FLUSH: u8 = 4;
const KIND_CHECKPOINT: u8 = 5;
const KIND_COMPLETE: u8 = 6;
const KIND_GAP: u8 = 7;

/// Upper bound on blocks in one write record (64 MiB of data): keeps decode allocations bounded.
pub const MAX_BLOCKS_PER_RECORD: u64 = 16 * 1024;

impl Record {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.0.to_le_bytes());
        out.extend_from_slice(&self.time.0.to_le_bytes());
        match &self.kind {
            RecordKind::Write {
                volume,
                first,
                blocks,
                origin,
            } => {
                out.push(KIND_WRITE);
                put_name(out, volume.as_str());
                out.extend_from_slice(&first.0.to_le_bytes());
                out.push(match origin {
                    WriteOrigin::Client => 0,
                    WriteOrigin::Resync => 1,
                });
                out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
                for block in blocks {
                    out.extend_from_slice(&block.map(|h| h.0).unwrap_or([0; 32]));
                }
            }
            RecordKind::Trim {
                volume,
                first,
                count,
            }
            | RecordKind::WriteZeroes {
                volume,
                first,
                count,
            } => {
                let is_trim = matches!(self.kind, RecordKind::Trim { .. });
                out.push(if is_trim {
                    KIND_TRIM
                } else {
                    KIND_WRITE_ZEROES
                });
                put_name(out, volume.as_str());
                out.extend_from_slice(&first.0.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            RecordKind::Flush => out.push(KIND_FLUSH),
            RecordKind::Checkpoint {
                name,
                app_consistent,
            } => {
                out.push(KIND_CHECKPOINT);
                put_name(out, name.as_str());
                out.push(u8::from(*app_consistent));
            }
            RecordKind::Complete { volume } => {
                out.push(KIND_COMPLETE);
                put_name(out, volume.as_str());
            }
            RecordKind::Gap { volume } => {
                out.push(KIND_GAP);
                put_name(out, volume.as_str());
            }
        }
    }

    pub fn encode_to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 32 * self.kind.block_count() as usize);
        self.encode(&mut out);
        out
    }

    /// Decodes exactly one record occupying all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let seq = Seq(r.u64()?);
        let time = TimeNs(r.u64()? as i64);
        let kind = match r.u8()? {
            KIND_WRITE => {
                let volume = r.volume()?;
                let first = BlockNo(r.u64()?);
                let origin = match r.u8()? {
                    0 => WriteOrigin::Client,
                    1 => WriteOrigin::Resync,
                    _ => return Err(DecodeError::OutOfRange("write origin")),
                };
                let n = u64::from(r.u32()?);
                if n == 0 || n > MAX_BLOCKS_PER_RECORD {
                    return Err(DecodeError::OutOfRange("block count"));
                }
                let mut blocks = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let raw: [u8; 32] = r.array()?;
                    blocks.push((raw != [0; 32]).then_some(ChunkHash(raw)));
                }
                RecordKind::Write {
                    volume,
                    first,
                    blocks,
                    origin,
                }
            }
            kind @ (KIND_TRIM | KIND_WRITE_ZEROES) => {
                let volume = r.volume()?;
                let first = BlockNo(r.u64()?);
                let count = r.u64()?;
                if count == 0 {
                    return Err(DecodeError::OutOfRange("block count"));
                }
                if kind == KIND_TRIM {
                    RecordKind::Trim {
                        volume,
                        first,
                        count,
                    }
                } else {
                    RecordKind::WriteZeroes {
                        volume,
                        first,
                        count,
                    }
                }
            }
            KIND_FLUSH => RecordKind::Flush,
            KIND_CHECKPOINT => {
                let name = r.name()?;
                let name =
                    CheckpointName::new(name).map_err(|e| DecodeError::BadName(e.to_string()))?;
                let app_consistent = r.u8()? != 0;
                RecordKind::Checkpoint {
                    name,
                    app_consistent,
                }
            }
            KIND_COMPLETE => RecordKind::Complete {
                volume: r.volume()?,
            },
            KIND_GAP => RecordKind::Gap {
                volume: r.volume()?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - r.at));
        }
        Ok(Record { seq, time, kind })
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            None => Err(DecodeError::Truncated {
                at: self.at,
                needed: n - (self.bytes.len() - self.at),
            }),
        }
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = usize::from(self.u8()?);
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::BadName("not UTF-8".into()))
    }
    fn volume(&mut self) -> Result<VolumeName, DecodeError> {
        VolumeName::new(self.name()?).map_err(|e| DecodeError::BadName(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeName {
        VolumeName::new("vol0").unwrap()
    }

    fn samples() -> Vec<Record> {
        let kinds = vec![
            RecordKind::Write {
                volume: vol(),
                first: BlockNo(7),
                blocks: vec![Some(ChunkHash::of(b"a")), None, Some(ChunkHash::of(b"b"))],
                origin: WriteOrigin::Client,
            },
            RecordKind::Trim {
                volume: vol(),
                first: BlockNo(1),
                count: 9,
            },
            RecordKind::WriteZeroes {
                volume: vol(),
                first: BlockNo(0),
                count: 1,
            },
            RecordKind::Flush,
            RecordKind::Checkpoint {
                name: CheckpointName::new("nightly").unwrap(),
                app_consistent: true,
            },
            RecordKind::Complete { volume: vol() },
            RecordKind::Gap { volume: vol() },
        ];
        kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Record {
                seq: Seq(i as u64 + 1),
                time: TimeNs(1_700_000_000_000_000_000 + i as i64),
                kind,
            })
            .collect()
    }

    #[test]
    fn round_trips() {
        for record in samples() {
            let bytes = record.encode_to_vec();
            assert_eq!(Record::decode(&bytes).unwrap(), record);
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for record in samples() {
            let bytes = record.encode_to_vec();
            for cut in 0..bytes.len() {
                assert!(
                    Record::decode(&bytes[..cut]).is_err(),
                    "cut at {cut} of {record:?}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Record::decode(&longer), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if bytes.len() > 16 {
                bytes[16] = rng.gen_range(0..9);
            }
            let _ = Record::decode(&bytes);
        }
    }
}
