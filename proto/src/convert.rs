use bytes::{BufMut, Bytes, BytesMut};
use tideline_core::record::{Record, RecordKind, WriteOrigin, MAX_BLOCKS_PER_RECORD};
use tideline_core::store::{EpochStart, History, ReplicaOffer, VolumeMeta};
use tideline_core::{
    BlockNo, CheckpointName, ChunkHash, Epoch, GroupName, Seq, SeqBase, SiteName, TimeNs,
    VolumeName, BLOCK_SIZE_BYTES,
};

use crate::v1;

/// A wire message that does not describe a valid core value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> WireError {
    WireError::Invalid {
        field,
        message: message.into(),
    }
}

pub fn volume_name(field: &'static str, name: &str) -> Result<VolumeName, WireError> {
    VolumeName::new(name).map_err(|e| invalid(field, e.to_string()))
}

/// A 32-byte hash; `allow_zero` accepts the empty hash as the all-zero block (`None`).
pub fn chunk_hash(
    field: &'static str,
    raw: &[u8],
    allow_zero: bool,
) -> Result<Option<ChunkHash>, WireError> {
    if raw.is_empty() && allow_zero {
        return Ok(None);
    }
    ChunkHash::from_slice(raw)
        .map(Some)
        .ok_or_else(|| invalid(field, format!("hash must be 32 bytes, got {}", raw.len())))
}

const HASH_LEN: usize = std::mem::size_of::<ChunkHash>();

/// Chunk hashes in wire form, `None` (the all-zero block) as the empty hash. They are slices of
/// one shared buffer: a batch carries a hash per block, and one allocation (and one free) for
/// each of them was about 2 % of the agent's CPU in an ingest.
pub fn wire_hashes<'a>(hashes: impl IntoIterator<Item = Option<&'a ChunkHash>>) -> Vec<Bytes> {
    let hashes: Vec<Option<&ChunkHash>> = hashes.into_iter().collect();
    let mut all = BytesMut::with_capacity(hashes.iter().flatten().count() * HASH_LEN);
    hashes.iter().flatten().for_each(|h| all.put_slice(&h.0));
    let all = all.freeze();
    let mut at = 0;
    hashes
        .iter()
        .map(|h| match h {
            Some(_) => {
                at += HASH_LEN;
                all.slice(at - HASH_LEN..at)
            }
            None => Bytes::new(),
        })
        .collect()
}

fn first_block(field: &'static str, offset_bytes: u64) -> Result<BlockNo, WireError> {
    if !offset_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(invalid(
            field,
            format!("offset {offset_bytes} is not a multiple of {BLOCK_SIZE_BYTES}"),
        ));
    }
    Ok(BlockNo(offset_bytes / BLOCK_SIZE_BYTES))
}

fn block_range(
    field: &'static str,
    range: &v1::BlockRange,
) -> Result<(VolumeName, BlockNo, u64), WireError> {
    let volume = volume_name(field, &range.volume)?;
    let first = first_block(field, range.offset_bytes)?;
    if range.len_bytes == 0 || !range.len_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
        return Err(invalid(
            field,
            format!(
                "length {} is not a positive multiple of {BLOCK_SIZE_BYTES}",
                range.len_bytes
            ),
        ));
    }
    Ok((volume, first, range.len_bytes / BLOCK_SIZE_BYTES))
}

impl TryFrom<&v1::Record> for Record {
    type Error = WireError;

    fn try_from(wire: &v1::Record) -> Result<Record, WireError> {
        use v1::record::Kind;
        if wire.seq == 0 {
            return Err(invalid("record.seq", "sequence numbers start at 1"));
        }
        let kind = match wire
            .kind
            .as_ref()
            .ok_or(WireError::Missing("record.kind"))?
        {
            Kind::Write(w) => {
                let count = w.block_hashes.len() as u64;
                if count == 0 || count > MAX_BLOCKS_PER_RECORD {
                    return Err(invalid(
                        "write.block_hashes",
                        format!("{count} blocks; 1 to {MAX_BLOCKS_PER_RECORD} allowed"),
                    ));
                }
                RecordKind::Write {
                    volume: volume_name("write.volume", &w.volume)?,
                    first: first_block("write.offset_bytes", w.offset_bytes)?,
                    blocks: w
                        .block_hashes
                        .iter()
                        .map(|h| chunk_hash("write.block_hashes", h, true))
                        .collect::<Result<_, _>>()?,
                    origin: if w.resync {
                        WriteOrigin::Resync
                    } else {
                        WriteOrigin::Client
                    },
                }
            }
            Kind::Trim(r) => {
                let (volume, first, count) = block_range("trim", r)?;
                RecordKind::Trim {
                    volume,
                    first,
                    count,
                }
            }
            Kind::WriteZeroes(r) => {
                let (volume, first, count) = block_range("write_zeroes", r)?;
                RecordKind::WriteZeroes {
                    volume,
                    first,
                    count,
                }
            }
            Kind::Flush(_) => RecordKind::Flush,
            Kind::Checkpoint(c) => RecordKind::Checkpoint {
                name: CheckpointName::new(c.name.as_str())
                    .map_err(|e| invalid("checkpoint.name", e.to_string()))?,
                app_consistent: c.app_consistent,
            },
            Kind::Complete(m) => RecordKind::Complete {
                volume: volume_name("complete.volume", &m.volume)?,
            },
            Kind::Gap(m) => RecordKind::Gap {
                volume: volume_name("gap.volume", &m.volume)?,
            },
        };
        Ok(Record {
            seq: Seq(wire.seq),
            time: TimeNs(wire.time_ns),
            kind,
        })
    }
}

fn wire_range(volume: &VolumeName, first: BlockNo, count: u64) -> v1::BlockRange {
    v1::BlockRange {
        volume: volume.to_string(),
        offset_bytes: first.offset_bytes(),
        len_bytes: count * BLOCK_SIZE_BYTES,
    }
}

impl From<&Record> for v1::Record {
    fn from(record: &Record) -> v1::Record {
        use v1::record::Kind;
        let kind = match &record.kind {
            RecordKind::Write {
                volume,
                first,
                blocks,
                origin,
            } => Kind::Write(v1::WriteRecord {
                volume: volume.to_string(),
                offset_bytes: first.offset_bytes(),
                block_hashes: wire_hashes(blocks.iter().map(Option::as_ref)),
                resync: *origin == WriteOrigin::Resync,
            }),
            RecordKind::Trim {
                volume,
                first,
                count,
            } => Kind::Trim(wire_range(volume, *first, *count)),
            RecordKind::WriteZeroes {
                volume,
                first,
                count,
            } => Kind::WriteZeroes(wire_range(volume, *first, *count)),
            RecordKind::Flush => Kind::Flush(v1::FlushRecord {}),
            RecordKind::Checkpoint {
                name,
                app_consistent,
            } => Kind::Checkpoint(v1::CheckpointRecord {
                name: name.to_string(),
                app_consistent: *app_consistent,
            }),
            RecordKind::Complete { volume } => Kind::Complete(v1::VolumeMark {
                volume: volume.to_string(),
            }),
            RecordKind::Gap { volume } => Kind::Gap(v1::VolumeMark {
                volume: volume.to_string(),
            }),
        };
        v1::Record {
            seq: record.seq.0,
            time_ns: record.time.0,
            kind: Some(kind),
        }
    }
}

/// A frame received from an agent, with its hashes validated (not yet its bytes).
#[derive(Debug, Clone)]
pub struct WireFrame {
    pub hashes: Vec<ChunkHash>,
    pub zstd_data: Bytes,
}

impl TryFrom<v1::Frame> for WireFrame {
    type Error = WireError;

    fn try_from(frame: v1::Frame) -> Result<WireFrame, WireError> {
        let count = frame.hashes.len();
        if count == 0 || count > tideline_core::frame::MAX_FRAME_BLOCKS {
            return Err(invalid(
                "frame.hashes",
                format!(
                    "{count} blocks; 1 to {} allowed",
                    tideline_core::frame::MAX_FRAME_BLOCKS
                ),
            ));
        }
        let hashes = frame
            .hashes
            .iter()
            .map(|h| chunk_hash("frame.hashes", h, false).map(|h| h.unwrap_or(ChunkHash([0; 32]))))
            .collect::<Result<_, _>>()?;
        Ok(WireFrame {
            hashes,
            zstd_data: frame.zstd_data,
        })
    }
}

/// gRPC metadata key naming the epoch at which a site holds a group, sent with the
/// FAILED_PRECONDITION status that refuses a fenced site or its agent.
pub const FENCED_EPOCH_KEY: &str = "tideline-fenced-epoch";

/// A FAILED_PRECONDITION status saying the receiver is fenced: another site holds the group
/// at `epoch`.
pub fn fenced_status(message: String, epoch: Epoch) -> tonic::Status {
    let mut status = tonic::Status::failed_precondition(message);
    if let Ok(value) = epoch.0.to_string().parse() {
        status.metadata_mut().insert(FENCED_EPOCH_KEY, value);
    }
    status
}

/// The epoch a fenced-refusal status names, if `status` is one.
pub fn fenced_epoch(status: &tonic::Status) -> Option<Epoch> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let value = status.metadata().get(FENCED_EPOCH_KEY)?.to_str().ok()?;
    value.parse().ok().map(Epoch)
}

/// Volumes of a hello: names valid, sizes positive block multiples.
pub fn volume_metas(volumes: &[v1::VolumeInfo]) -> Result<Vec<VolumeMeta>, WireError> {
    if volumes.is_empty() {
        return Err(invalid("volumes", "a group needs at least one volume"));
    }
    volumes
        .iter()
        .map(|v| {
            let name = volume_name("volumes.name", &v.name)?;
            if v.size_bytes == 0 || !v.size_bytes.is_multiple_of(BLOCK_SIZE_BYTES) {
                return Err(invalid(
                    "volumes.size_bytes",
                    format!(
                        "volume {name} size {} is not a positive multiple of {BLOCK_SIZE_BYTES}",
                        v.size_bytes
                    ),
                ));
            }
            Ok(VolumeMeta {
                name,
                size_bytes: v.size_bytes,
            })
        })
        .collect()
}

/// A replication hello, validated: the sending site, the group and what it offers.
#[derive(Debug, Clone)]
pub struct ReplicaHello {
    pub site: SiteName,
    pub group: GroupName,
    pub offer: ReplicaOffer,
}

impl TryFrom<v1::ReplicaHello> for ReplicaHello {
    type Error = WireError;

    fn try_from(hello: v1::ReplicaHello) -> Result<ReplicaHello, WireError> {
        let site =
            SiteName::new(hello.site.as_str()).map_err(|e| invalid("hello.site", e.to_string()))?;
        let group = GroupName::new(hello.group.as_str())
            .map_err(|e| invalid("hello.group", e.to_string()))?;
        let history = History(
            hello
                .history
                .iter()
                .map(|e| EpochStart {
                    epoch: Epoch(e.epoch),
                    after: Seq(e.after_seq),
                })
                .collect(),
        );
        history
            .validate()
            .map_err(|e| invalid("hello.history", e))?;
        if hello.spool_epoch == 0 {
            return Err(invalid("hello.spool_epoch", "epochs start at 1"));
        }
        Ok(ReplicaHello {
            site,
            group,
            offer: ReplicaOffer {
                history,
                spool_id: hello.spool_id,
                seq_base: SeqBase(hello.seq_base),
                spool_epoch: Epoch(hello.spool_epoch),
                volumes: volume_metas(&hello.volumes)?,
            },
        })
    }
}

impl From<&ReplicaHello> for v1::ReplicaHello {
    fn from(hello: &ReplicaHello) -> v1::ReplicaHello {
        v1::ReplicaHello {
            site: hello.site.to_string(),
            group: hello.group.to_string(),
            volumes: hello
                .offer
                .volumes
                .iter()
                .map(|v| v1::VolumeInfo {
                    name: v.name.to_string(),
                    size_bytes: v.size_bytes,
                })
                .collect(),
            spool_id: hello.offer.spool_id,
            seq_base: hello.offer.seq_base.0,
            spool_epoch: hello.offer.spool_epoch.0,
            history: hello
                .offer
                .history
                .0
                .iter()
                .map(|e| v1::EpochStart {
                    epoch: e.epoch.0,
                    after_seq: e.after.0,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_wire() {
        let record = Record {
            seq: Seq(9),
            time: TimeNs(123),
            kind: RecordKind::Write {
                volume: VolumeName::new("v").unwrap(),
                first: BlockNo(3),
                blocks: vec![None, Some(ChunkHash::of(b"x"))],
                origin: WriteOrigin::Client,
            },
        };
        let wire = v1::Record::from(&record);
        assert_eq!(Record::try_from(&wire).unwrap(), record);
    }

    #[test]
    fn wire_hashes_are_each_hash_in_order_and_empty_for_a_zero_block() {
        let hashes: Vec<Option<ChunkHash>> = (0..300u32)
            .map(|i| (i % 7 != 3).then(|| ChunkHash::of(&i.to_le_bytes())))
            .collect();
        let wire = wire_hashes(hashes.iter().map(Option::as_ref));
        let back: Vec<Option<ChunkHash>> = wire
            .iter()
            .map(|raw| chunk_hash("hashes", raw, true).unwrap())
            .collect();
        assert_eq!(back, hashes);
        assert!(wire_hashes([]).is_empty());
    }

    #[test]
    fn replica_hellos_round_trip_and_bad_histories_are_refused() {
        let hello = ReplicaHello {
            site: SiteName::new("a").unwrap(),
            group: GroupName::new("g").unwrap(),
            offer: ReplicaOffer {
                history: History::default().with(Epoch(2), Seq(9)),
                spool_id: 7,
                seq_base: SeqBase(9),
                spool_epoch: Epoch(2),
                volumes: vec![VolumeMeta {
                    name: VolumeName::new("v").unwrap(),
                    size_bytes: 4096,
                }],
            },
        };
        let mut wire = v1::ReplicaHello::from(&hello);
        let back = ReplicaHello::try_from(wire.clone()).unwrap();
        assert_eq!(back.offer, hello.offer);
        wire.history.reverse();
        assert!(ReplicaHello::try_from(wire).is_err());
    }

    #[test]
    fn fenced_statuses_carry_their_epoch() {
        let status = fenced_status("fenced".into(), Epoch(4));
        assert_eq!(fenced_epoch(&status), Some(Epoch(4)));
        assert_eq!(fenced_epoch(&tonic::Status::failed_precondition("x")), None);
    }

    #[test]
    fn lies_are_refused() {
        let mut wire = v1::Record {
            seq: 1,
            time_ns: 1,
            kind: Some(v1::record::Kind::Trim(v1::BlockRange {
                volume: "v".into(),
                offset_bytes: 4095,
                len_bytes: 4096,
            })),
        };
        assert!(Record::try_from(&wire)
            .unwrap_err()
            .to_string()
            .contains("not a multiple"));
        wire.kind = Some(v1::record::Kind::Write(v1::WriteRecord {
            volume: "../x".into(),
            offset_bytes: 0,
            block_hashes: vec![Bytes::from_static(b"short")],
            resync: false,
        }));
        assert!(Record::try_from(&wire).is_err());
        wire.kind = None;
        assert_eq!(
            Record::try_from(&wire),
            Err(WireError::Missing("record.kind"))
        );
    }
}
