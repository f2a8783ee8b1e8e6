//! Store tests: the durability contract, recovery, errors, a model-based test and a golden
//! fixture of the on-disk format.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::*;
use crate::frame::{compress, DEFAULT_ZSTD_LEVEL};
use crate::record::{BlockChange, WriteOrigin};
use crate::types::CheckpointName;

fn vol(name: &str) -> VolumeName {
    VolumeName::new(name).unwrap()
}

fn grp(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

fn meta(name: &str, size_bytes: u64) -> VolumeMeta {
    VolumeMeta {
        name: vol(name),
        size_bytes,
    }
}

/// A compressible, non-zero block that differs for every `seed`.
fn block(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_SIZE];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = ((i as u64 / 64 + seed * 31) % 251) as u8 ^ (seed as u8) | 1;
    }
    out[..8].copy_from_slice(&seed.to_le_bytes());
    out
}

/// An incompressible block: zstd stores it raw, so a flipped byte changes only this block.
fn random_block(rng: &mut StdRng) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK_SIZE];
    rng.fill_bytes(&mut out);
    out
}

/// An owned frame: hashes and zstd bytes.
struct OwnedFrame {
    hashes: Vec<ChunkHash>,
    zstd: Vec<u8>,
}

impl OwnedFrame {
    fn new(blocks: &[&[u8]]) -> OwnedFrame {
        let data: Vec<u8> = blocks.concat();
        OwnedFrame {
            hashes: blocks.iter().map(|b| ChunkHash::of(b)).collect(),
            zstd: compress(&data, DEFAULT_ZSTD_LEVEL),
        }
    }
    fn incoming(&self) -> IncomingFrame<'_> {
        IncomingFrame {
            hashes: &self.hashes,
            zstd_data: &self.zstd,
        }
    }
}

fn incoming(frames: &[OwnedFrame]) -> Vec<IncomingFrame<'_>> {
    frames.iter().map(OwnedFrame::incoming).collect()
}

fn write(seq: u64, time: i64, volume: &str, first: u64, blocks: &[Option<&[u8]>]) -> Record {
    Record {
        seq: Seq(seq),
        time: TimeNs(time),
        kind: RecordKind::Write {
            volume: vol(volume),
            first: BlockNo(first),
            blocks: blocks.iter().map(|b| b.map(ChunkHash::of)).collect(),
            origin: WriteOrigin::Client,
        },
    }
}

fn rec(seq: u64, time: i64, kind: RecordKind) -> Record {
    Record {
        seq: Seq(seq),
        time: TimeNs(time),
        kind,
    }
}

fn complete(seq: u64, time: i64, volume: &str) -> Record {
    rec(
        seq,
        time,
        RecordKind::Complete {
            volume: vol(volume),
        },
    )
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir)
}

fn open(dir: &Path) -> Store {
    Store::open(config(dir)).unwrap()
}

/// Materialises `plan` into a temporary file and reads the whole image back.
fn image_of(store: &Store, plan: &RestorePlan) -> Result<Vec<u8>, StoreError> {
    let out = tempfile::tempfile().unwrap();
    let stats = materialise(store, plan, &out)?;
    assert_eq!(stats.blocks, plan.blocks.len() as u64);
    assert_eq!(stats.bytes_written, plan_data_bytes(plan));
    assert_eq!(out.metadata().unwrap().len(), plan.size_bytes);
    let mut bytes = vec![0u8; plan.size_bytes as usize];
    out.read_exact_at(&mut bytes, 0).unwrap();
    Ok(bytes)
}

fn image(store: &Store, volume: &str, point: PointInTime) -> Vec<u8> {
    let plan = store.plan(&vol(volume), point).unwrap();
    image_of(store, &plan).unwrap()
}

/// The image of extents, as a stream consumer would assemble it.
fn image_from_extents(store: &Store, plan: &RestorePlan, max_extent_bytes: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; plan.size_bytes as usize];
    let mut last_end = 0;
    for extent in extents(store, plan, max_extent_bytes) {
        let (offset, data) = extent.unwrap();
        assert!(offset >= last_end, "extents are in increasing order");
        assert!(data.len() <= max_extent_bytes.max(BLOCK_SIZE));
        bytes[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        last_end = offset + data.len() as u64;
    }
    bytes
}

/// Reference image: `blocks` placed at their block numbers in a zeroed volume.
fn reference(size_bytes: u64, blocks: &[(u64, &[u8])]) -> Vec<u8> {
    let mut bytes = vec![0u8; size_bytes as usize];
    for (at, data) in blocks {
        let start = (*at as usize) * BLOCK_SIZE;
        let end = (start + BLOCK_SIZE).min(bytes.len());
        bytes[start..end].copy_from_slice(&data[..end - start]);
    }
    bytes
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn pack_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(PACKS_DIR).join(PackId(id).file_name())
}

const MIB: u64 = 1 << 20;

/// A store with group "g" holding volume "data" (1 MiB) and "other" (256 KiB).
fn setup(dir: &Path) -> Store {
    let store = open(dir);
    let seq = store
        .register_group(&grp("g"), 7, &[meta("data", MIB), meta("other", 256 << 10)])
        .unwrap();
    assert_eq!(seq, Seq(0));
    store
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn ingest_plan_materialise_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b, c) = (block(1), block(2), block(3));
    let hashes = [ChunkHash::of(&a), ChunkHash::of(&b), ChunkHash::of(&c)];
    assert_eq!(store.missing(&hashes), vec![0, 1, 2]);
    let frames = [OwnedFrame::new(&[&a, &b]), OwnedFrame::new(&[&c])];
    let records = vec![
        write(1, 100, "data", 2, &[Some(&a), None, Some(&b)]),
        complete(2, 100, "data"),
        write(3, 200, "data", 254, &[Some(&c), Some(&a)]),
        rec(4, 300, RecordKind::Flush),
        rec(
            5,
            400,
            RecordKind::Trim {
                volume: vol("data"),
                first: BlockNo(4),
                count: 1,
            },
        ),
    ];
    assert_eq!(
        store
            .ingest(&grp("g"), &records, &incoming(&frames))
            .unwrap(),
        Seq(5)
    );
    assert!(store.missing(&hashes).is_empty());
    assert_eq!(store.read_chunk(&hashes[2]).unwrap(), c);

    let plan = store.plan(&vol("data"), PointInTime::Latest).unwrap();
    assert_eq!(
        (plan.seq, plan.time, plan.size_bytes),
        (Seq(5), TimeNs(400), MIB)
    );
    assert_eq!(
        plan.blocks,
        vec![
            (BlockNo(2), hashes[0]),
            (BlockNo(254), hashes[2]),
            (BlockNo(255), hashes[0])
        ]
    );
    let expected = reference(MIB, &[(2, &a), (254, &c), (255, &a)]);
    let out = tempfile::NamedTempFile::new().unwrap();
    let stats = materialise(&store, &plan, out.as_file()).unwrap();
    assert_eq!(
        stats,
        MaterialiseStats {
            bytes_written: 3 * 4096,
            blocks: 3
        }
    );
    assert_eq!(std::fs::read(out.path()).unwrap(), expected);
    // Holes everywhere else: far fewer bytes allocated than the volume's size.
    assert!(out.as_file().metadata().unwrap().blocks() * 512 < MIB / 2);
    assert_eq!(image_from_extents(&store, &plan, 4096), expected);
    assert_eq!(image_from_extents(&store, &plan, 1 << 20), expected);
    let extents: Vec<_> = extents(&store, &plan, 1 << 20)
        .map(|e| e.unwrap().0)
        .collect();
    assert_eq!(
        extents,
        vec![2 * 4096, 254 * 4096],
        "consecutive blocks are coalesced"
    );

    // Earlier points, by seq and by time.
    assert_eq!(
        image(&store, "data", PointInTime::Seq(Seq(2))),
        reference(MIB, &[(2, &a), (4, &b)])
    );
    assert_eq!(
        image(&store, "data", PointInTime::Time(TimeNs(399))),
        reference(MIB, &[(2, &a), (4, &b), (254, &c), (255, &a)])
    );
    let plan = store
        .plan(&vol("data"), PointInTime::Time(TimeNs(250)))
        .unwrap();
    assert_eq!((plan.seq, plan.time), (Seq(3), TimeNs(200)));

    let stats = store.stats();
    assert_eq!(stats.chunk_count, 3);
    assert_eq!(stats.logical_chunk_bytes, 3 * 4096);
    assert!(
        stats.stored_bytes > 0 && stats.stored_bytes < 3 * 4096,
        "{stats:?}"
    );
    assert_eq!(stats.pack_file_bytes, file_len(&pack_path(dir.path(), 1)));

    let summaries = store.volumes();
    assert_eq!(summaries.len(), 2);
    let data = &summaries[0];
    assert_eq!(data.name, vol("data"));
    assert_eq!(data.group, grp("g"));
    assert_eq!(data.durable_seq, Seq(5));
    assert_eq!(data.newest_record_time, Some(TimeNs(400)));
    assert_eq!(data.window, Some((TimeNs(100), TimeNs(400))));
    assert!(data.complete);
    assert!(!summaries[1].complete);
    assert_eq!(summaries[1].window, None);
    assert_eq!(store.group_of(&vol("other")), Some(grp("g")));
    assert_eq!(store.group_of(&vol("nope")), None);
    assert!(matches!(
        store.plan(&vol("nope"), PointInTime::Latest),
        Err(StoreError::UnknownVolume { .. })
    ));
}

#[test]
fn resending_a_batch_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = (block(1), block(2));
    let frames = [OwnedFrame::new(&[&a])];
    let records = vec![write(1, 1, "data", 0, &[Some(&a)]), complete(2, 1, "data")];
    assert_eq!(
        store
            .ingest(&grp("g"), &records, &incoming(&frames))
            .unwrap(),
        Seq(2)
    );
    let catalog = dir.path().join(CATALOG_FILE);
    let (catalog_len, pack_len) = (file_len(&catalog), file_len(&pack_path(dir.path(), 1)));
    assert_eq!(
        store
            .ingest(&grp("g"), &records, &incoming(&frames))
            .unwrap(),
        Seq(2)
    );
    assert_eq!(file_len(&catalog), catalog_len, "a resend writes nothing");
    assert_eq!(file_len(&pack_path(dir.path(), 1)), pack_len);
    // A resend that overlaps the durable seq and carries new records stores only the new ones.
    let frames = [OwnedFrame::new(&[&a, &b])];
    let mut more = records.clone();
    more.push(write(3, 2, "data", 1, &[Some(&b)]));
    assert_eq!(
        store.ingest(&grp("g"), &more, &incoming(&frames)).unwrap(),
        Seq(3)
    );
    assert_eq!(store.stats().chunk_count, 2);
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b)])
    );
    assert_eq!(store.ingest(&grp("g"), &[], &[]).unwrap(), Seq(3));
}

#[test]
fn seq_gaps_and_disorder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let g = grp("g");
    let err = store
        .ingest(&g, &[complete(2, 1, "data")], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::SeqGap {
                expected: Seq(1),
                got: Seq(2),
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("expected seq 1 next but got seq 2"),
        "{err}"
    );
    store.ingest(&g, &[complete(1, 1, "data")], &[]).unwrap();
    let err = store
        .ingest(&g, &[complete(2, 1, "data"), complete(2, 1, "data")], &[])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::SeqGap {
                expected: Seq(3),
                got: Seq(2),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store.durable_seq(&g),
        Some(Seq(1)),
        "a refused batch stores nothing"
    );
    let err = store
        .ingest(&g, &[complete(2, 0, "data")], &[])
        .unwrap_err();
    assert!(matches!(err, StoreError::TimeWentBackwards { .. }), "{err}");
    let err = store
        .ingest(&grp("nope"), &[complete(1, 1, "data")], &[])
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownGroup { .. }), "{err}");
}

#[test]
fn a_chunk_mismatch_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    store
        .ingest(&grp("g"), &[complete(1, 1, "data")], &[])
        .unwrap();
    let catalog = dir.path().join(CATALOG_FILE);
    let (catalog_len, pack_len) = (file_len(&catalog), file_len(&pack_path(dir.path(), 1)));
    let (a, b, c) = (block(1), block(2), block(3));
    let good = OwnedFrame::new(&[&a]);
    let mut bad = OwnedFrame::new(&[&b, &c]);
    bad.hashes[1] = ChunkHash::of(b"something else");
    let hashes = [ChunkHash::of(&a), ChunkHash::of(&b), ChunkHash::of(&c)];
    let records = [write(2, 2, "data", 0, &[Some(&a), Some(&b)])];
    let err = store
        .ingest(&grp("g"), &records, &[good.incoming(), bad.incoming()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::ChunkMismatch {
                frame: 1,
                block: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("frame 1, block 1 does not match its hash"),
        "{err}"
    );
    assert_eq!(file_len(&catalog), catalog_len);
    assert_eq!(file_len(&pack_path(dir.path(), 1)), pack_len);
    assert_eq!(store.missing(&hashes), vec![0, 1, 2]);
    assert_eq!(store.durable_seq(&grp("g")), Some(Seq(1)));

    let garbage = IncomingFrame {
        hashes: &hashes[..1],
        zstd_data: b"not zstd",
    };
    let err = store.ingest(&grp("g"), &records, &[garbage]).unwrap_err();
    assert!(
        matches!(err, StoreError::BadFrame { frame: 0, .. }),
        "{err}"
    );
    let empty = IncomingFrame {
        hashes: &[],
        zstd_data: b"",
    };
    assert!(matches!(
        store.ingest(&grp("g"), &records, &[empty]),
        Err(StoreError::BadFrame { .. })
    ));
    assert_eq!(file_len(&catalog), catalog_len);
}

#[test]
fn a_missing_chunk_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = (block(1), block(2));
    let frames = [OwnedFrame::new(&[&a])];
    let records = [
        complete(1, 1, "data"),
        write(2, 1, "data", 0, &[Some(&a), None, Some(&b)]),
    ];
    let err = store
        .ingest(&grp("g"), &records, &incoming(&frames))
        .unwrap_err();
    match &err {
        StoreError::MissingChunk { hash, seq } => {
            assert_eq!((*hash, *seq), (ChunkHash::of(&b), Seq(2)));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&ChunkHash::of(&b).to_hex()));
    assert_eq!(store.durable_seq(&grp("g")), Some(Seq(0)));
    assert_eq!(store.missing(&[ChunkHash::of(&a)]), vec![0]);
}

#[test]
fn records_must_fit_their_group_and_volume() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    store
        .register_group(&grp("h"), 1, &[meta("elsewhere", 4096)])
        .unwrap();
    let a = block(1);
    let frames = [OwnedFrame::new(&[&a])];
    let g = grp("g");
    let err = store
        .ingest(
            &g,
            &[write(1, 1, "elsewhere", 0, &[Some(&a)])],
            &incoming(&frames),
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::ForeignVolume { .. }), "{err}");
    let err = store
        .ingest(&g, &[complete(1, 1, "unknown")], &[])
        .unwrap_err();
    assert!(matches!(err, StoreError::ForeignVolume { .. }), "{err}");
    let err = store
        .ingest(
            &g,
            &[write(1, 1, "data", 256, &[Some(&a)])],
            &incoming(&frames),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::OutOfRange {
                first: 256,
                end: 257,
                ..
            }
        ),
        "{err}"
    );
    let trim = |first, count| {
        rec(
            1,
            1,
            RecordKind::Trim {
                volume: vol("data"),
                first: BlockNo(first),
                count,
            },
        )
    };
    assert!(matches!(
        store.ingest(&g, &[trim(1, u64::MAX)], &[]),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        store.ingest(&g, &[trim(1, 0)], &[]),
        Err(StoreError::InvalidRecord { .. })
    ));
    store.ingest(&g, &[trim(0, 256)], &[]).unwrap();
    assert_eq!(store.durable_seq(&g), Some(Seq(1)));
}

#[test]
fn registration_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let g = grp("g");
    let catalog = dir.path().join(CATALOG_FILE);
    let len = file_len(&catalog);
    assert_eq!(
        store.register_group(&g, 7, &[meta("data", MIB)]).unwrap(),
        Seq(0)
    );
    assert_eq!(
        file_len(&catalog),
        len,
        "an unchanged registration writes nothing"
    );
    // Before anything is durable another spool may take the group over.
    assert_eq!(
        store.register_group(&g, 8, &[meta("data", MIB)]).unwrap(),
        Seq(0)
    );
    store.ingest(&g, &[complete(1, 1, "data")], &[]).unwrap();
    let err = store
        .register_group(&g, 9, &[meta("data", MIB)])
        .unwrap_err();
    assert!(matches!(err, StoreError::SpoolMismatch { .. }));
    assert_eq!(
        err.to_string(),
        "group g at the collector was written by another agent spool; restart the agent with its original --spool-dir, or protect under a new group name"
    );
    let err = store
        .register_group(&g, 8, &[meta("data", 2 * MIB)])
        .unwrap_err();
    assert!(matches!(err, StoreError::VolumeSizeChanged { .. }), "{err}");
    let err = store
        .register_group(&grp("h"), 1, &[meta("data", MIB)])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::VolumeInOtherGroup { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("already belongs to group g"),
        "{err}"
    );
    let err = store
        .register_group(&grp("h"), 1, &[meta("x", 4096), meta("x", 4096)])
        .unwrap_err();
    assert!(
        matches!(err, StoreError::InvalidRegistration { .. }),
        "{err}"
    );
    assert!(store.register_group(&grp("h"), 1, &[meta("x", 0)]).is_err());
    assert!(store.register_group(&grp("h"), 1, &[]).is_err());
    // A reconnect may add a volume.
    assert_eq!(
        store.register_group(&g, 8, &[meta("new", 8192)]).unwrap(),
        Seq(1)
    );
    assert_eq!(store.group_of(&vol("new")), Some(g.clone()));
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.register_group(&g, 8, &[meta("data", MIB)]).unwrap(),
        Seq(1)
    );
    assert!(matches!(
        store.register_group(&g, 7, &[meta("data", MIB)]),
        Err(StoreError::SpoolMismatch { .. })
    ));
    assert_eq!(store.volumes().len(), 3);
}

/// A spool that lost records the store holds continues the group's journal as a successor of
/// the registered spool, whether its own seqs are below the store's or above them; the
/// predecessor is retired, and the registration survives a reopen.
#[test]
fn a_successor_spool_continues_the_journal_after_its_resume_point() {
    for resume_after in [1u64, 2, 9] {
        let dir = tempfile::tempdir().unwrap();
        let store = setup(dir.path());
        let g = grp("g");
        store
            .ingest(
                &g,
                &[complete(1, 1, "data"), rec(2, 2, RecordKind::Flush)],
                &[],
            )
            .unwrap();
        let succession = Succession {
            predecessor: 7,
            resume_after: Seq(resume_after),
        };
        let stranger = Succession {
            predecessor: 5,
            ..succession
        };
        assert!(matches!(
            store.register_agent(&g, 8, Some(stranger), &[meta("data", MIB)]),
            Err(StoreError::SpoolMismatch { .. })
        ));
        let reg = store
            .register_agent(&g, 8, Some(succession), &[meta("data", MIB)])
            .unwrap();
        assert_eq!(reg.durable, Seq(2));
        assert_eq!(reg.seq_base.spool_seq(reg.durable), resume_after);
        assert_eq!(reg.seq_base.journal_seq(resume_after + 1), Some(Seq(3)));
        assert_eq!(
            reg.durable_record, None,
            "the durable record is the predecessor's: nothing for the successor to compare"
        );
        drop(store);
        let store = open(dir.path());
        let reg = store
            .register_agent(&g, 8, Some(succession), &[meta("data", MIB)])
            .unwrap();
        assert_eq!(reg.durable_record, None, "nor after a reopen");
        store
            .ingest(&g, &[rec(3, 3, RecordKind::Flush)], &[])
            .unwrap();
        assert!(matches!(
            store.register_agent(&g, 7, None, &[meta("data", MIB)]),
            Err(StoreError::RetiredSpool { .. })
        ));
        drop(store);
        let store = open(dir.path());
        let again = store
            .register_agent(&g, 8, Some(succession), &[meta("data", MIB)])
            .unwrap();
        assert_eq!(
            again.seq_base, reg.seq_base,
            "an accepted succession is not applied twice"
        );
        assert_eq!(again.seq_base.spool_seq(again.durable), resume_after + 1);
        assert_eq!(again.durable_record, Some(rec(3, 3, RecordKind::Flush)));
    }
}

/// A power loss can take shipped records from an agent's spool; new writes then get their
/// seqs. The collector names its newest record when the spool sent it, so the agent can tell,
/// and refuses a resend that is not the record it holds.
#[test]
fn a_registration_names_the_newest_record_and_a_resend_must_match_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let g = grp("g");
    let a = block(1);
    let frames = [OwnedFrame::new(&[&a])];
    let records = vec![complete(1, 1, "data"), write(2, 2, "data", 0, &[Some(&a)])];
    store.ingest(&g, &records, &incoming(&frames)).unwrap();
    let reg = store
        .register_agent(&g, 7, None, &[meta("data", MIB)])
        .unwrap();
    assert_eq!(reg.durable_record.as_ref(), Some(&records[1]));

    let catalog = dir.path().join(CATALOG_FILE);
    let catalog_len = file_len(&catalog);
    let mut new_write = write(2, 5, "data", 0, &[Some(&a)]);
    let refused = store.ingest(&g, &[new_write.clone()], &incoming(&frames));
    assert!(
        matches!(
            refused,
            Err(StoreError::ResendDiffers {
                seq: Seq(2),
                stored_time: 2,
                resent_time: 5,
                ..
            })
        ),
        "{refused:?}"
    );
    let message = refused.unwrap_err().to_string();
    assert!(message.contains("power loss"), "{message}");
    new_write.time = TimeNs(2);
    new_write.kind = RecordKind::Flush;
    assert!(matches!(
        store.ingest(&g, &[new_write], &[]),
        Err(StoreError::ResendDiffers { .. })
    ));
    assert_eq!(
        file_len(&catalog),
        catalog_len,
        "a refused resend writes nothing"
    );
    assert_eq!(
        store.ingest(&g, &records, &incoming(&frames)).unwrap(),
        Seq(2)
    );
}

#[test]
fn a_seq_base_places_spool_seqs_on_either_side_of_the_journals() {
    let below = SeqBase::placing(Seq(3), Seq(10));
    assert_eq!(below.journal_seq(4), Some(Seq(11)));
    assert_eq!(below.spool_seq(Seq(10)), 3);
    let above = SeqBase::placing(Seq(10), Seq(3));
    assert_eq!(above.journal_seq(11), Some(Seq(4)));
    assert_eq!(above.spool_seq(Seq(3)), 10);
    assert_eq!(above.journal_seq(2), None, "before the journal's start");
    assert_eq!(above.spool_seq(Seq(0)), 7);
    assert_eq!(SeqBase::ZERO.journal_seq(u64::MAX), None, "past 2^63");
    assert_eq!(below.spool_seq(Seq(1)), 0);
}

/// Where the frames written to the current pack end: the pack's file may go on with zeros
/// to the next block boundary.
fn frames_end(store: &Store) -> u64 {
    store.writer.lock().unwrap().pack_len
}

/// Two batches: seqs 1-3 then 4-5, with chunks in both.
fn two_batches(store: &Store) -> (Vec<u8>, Vec<u8>) {
    let (a, b) = (block(1), block(2));
    let first = [
        write(1, 10, "data", 0, &[Some(&a)]),
        complete(2, 10, "data"),
        rec(3, 11, RecordKind::Flush),
    ];
    store
        .ingest(&grp("g"), &first, &incoming(&[OwnedFrame::new(&[&a])]))
        .unwrap();
    let second = [
        write(4, 20, "data", 1, &[Some(&b)]),
        rec(5, 21, RecordKind::Flush),
    ];
    store
        .ingest(&grp("g"), &second, &incoming(&[OwnedFrame::new(&[&b])]))
        .unwrap();
    (a, b)
}

#[test]
fn batches_start_at_block_boundaries_whether_written_direct_or_buffered() {
    for direct in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = setup(dir.path());
        if !direct {
            store.writer.lock().unwrap().pack_direct = None;
        }
        let (a, b) = two_batches(&store);
        let end = frames_end(&store);
        let pack = pack_path(dir.path(), 1);
        let (len, stats) = (file_len(&pack), store.stats());
        assert!(end > 4096 && !end.is_multiple_of(4096), "{end}");
        // The direct write padded the last block; the buffered one wrote only the frames.
        assert_eq!(
            len,
            if direct {
                end.next_multiple_of(4096)
            } else {
                end
            }
        );
        assert_eq!(stats.pack_file_bytes, len);
        drop(store);
        let store = open(dir.path());
        assert_eq!(
            file_len(&pack),
            len,
            "reopening keeps the padding (direct: {direct})"
        );
        assert_eq!(store.stats(), stats);
        assert_eq!(
            image(&store, "data", PointInTime::Latest),
            reference(MIB, &[(0, &a), (1, &b)])
        );
    }
}

#[test]
fn a_batch_larger_than_the_staging_buffer_is_written_in_pieces_back_to_back() {
    const FRAMES: usize = 20;
    let blocks_per_frame = crate::frame::MAX_FRAME_BLOCKS;
    let volume_bytes = (FRAMES * blocks_per_frame * BLOCK_SIZE) as u64;
    let mut rng = StdRng::seed_from_u64(5);
    let frames: Vec<Vec<Vec<u8>>> = (0..FRAMES)
        .map(|_| {
            (0..blocks_per_frame)
                .map(|_| random_block(&mut rng))
                .collect()
        })
        .collect();
    let owned: Vec<OwnedFrame> = frames
        .iter()
        .map(|f| OwnedFrame::new(&f.iter().map(Vec::as_slice).collect::<Vec<_>>()))
        .collect();
    let staged: usize = owned.iter().map(|f| f.zstd.len()).sum();
    assert!(
        staged > STAGING_KEPT_BYTES,
        "{staged} bytes fit one staging buffer"
    );
    let records: Vec<Record> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let blocks: Vec<Option<&[u8]>> = f.iter().map(|b| Some(b.as_slice())).collect();
            write(
                i as u64 + 1,
                10,
                "big",
                (i * blocks_per_frame) as u64,
                &blocks,
            )
        })
        .chain([complete(FRAMES as u64 + 1, 10, "big")])
        .collect();
    let expected: Vec<u8> = frames.concat().concat();
    for direct in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .register_group(&grp("g"), 7, &[meta("big", volume_bytes)])
            .unwrap();
        if !direct {
            store.writer.lock().unwrap().pack_direct = None;
        }
        // A small batch first, so the big one starts at a block boundary after padding.
        let a = block(1);
        let small = [write(1, 5, "big", 0, &[Some(&a)])];
        store
            .ingest(&grp("g"), &small, &incoming(&[OwnedFrame::new(&[&a])]))
            .unwrap();
        let start = frames_end(&store).next_multiple_of(4096);
        let renumbered: Vec<Record> = records
            .iter()
            .map(|r| Record {
                seq: r.seq.next(),
                ..r.clone()
            })
            .collect();
        store
            .ingest(&grp("g"), &renumbered, &incoming(&owned))
            .unwrap();
        let end = frames_end(&store);
        let entries: u64 = owned
            .iter()
            .map(|f| FrameEntry::new(&f.hashes, &f.zstd).len() as u64)
            .sum();
        assert_eq!(
            end - start,
            entries,
            "frames back to back (direct: {direct})"
        );
        assert!(store.writer.lock().unwrap().staging.len() <= STAGING_KEPT_BYTES);
        let pack_len = file_len(&pack_path(dir.path(), 1));
        assert_eq!(
            pack_len,
            if direct {
                end.next_multiple_of(4096)
            } else {
                end
            }
        );
        drop(store);
        let store = open(dir.path());
        let image = image(&store, "big", PointInTime::Latest);
        assert!(image == expected, "the image differs (direct: {direct})");
    }
}

#[test]
fn a_batch_whose_catalog_append_fails_is_undone_down_to_the_padding_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = two_batches(&store);
    let pack = pack_path(dir.path(), 1);
    let (len, stats) = (file_len(&pack), store.stats());
    assert_eq!(stats.pack_file_bytes, len);
    // A read-only catalog handle: the frames reach the pack, the commit point never does (and
    // the catalog's undo fails too, so the store refuses writes until reopened).
    let catalog = std::fs::File::open(dir.path().join(CATALOG_FILE)).unwrap();
    store.writer.lock().unwrap().catalog = catalog;
    let c = block(3);
    let third = [write(6, 30, "data", 2, &[Some(&c)])];
    let frames = [OwnedFrame::new(&[&c])];
    let err = store
        .ingest(&grp("g"), &third, &incoming(&frames))
        .unwrap_err();
    assert!(err.to_string().contains("catalog.log"), "{err}");
    assert_eq!(file_len(&pack), len, "the pack is back to where it was");
    assert_eq!(store.stats(), stats);
    drop(store);
    let store = open(dir.path());
    assert_eq!(file_len(&pack), len);
    store.ingest(&grp("g"), &third, &incoming(&frames)).unwrap();
    assert_eq!(store.stats().pack_file_bytes, file_len(&pack));
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats().pack_file_bytes, file_len(&pack));
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b), (2, &c)])
    );
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = two_batches(&store);
    let (volumes, stats) = (store.volumes(), store.stats());
    let plan = store.plan(&vol("data"), PointInTime::Latest).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.volumes(), volumes);
    assert_eq!(store.stats(), stats);
    assert_eq!(store.plan(&vol("data"), PointInTime::Latest).unwrap(), plan);
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b)])
    );
    // And writing continues where it stopped.
    assert_eq!(
        store
            .register_group(&grp("g"), 7, &[meta("data", MIB)])
            .unwrap(),
        Seq(5)
    );
    let c = block(3);
    store
        .ingest(
            &grp("g"),
            &[write(6, 30, "data", 2, &[Some(&c)])],
            &incoming(&[OwnedFrame::new(&[&c])]),
        )
        .unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b), (2, &c)])
    );
    assert_eq!(
        image(&store, "data", PointInTime::Seq(Seq(3))),
        reference(MIB, &[(0, &a)])
    );
}

#[test]
fn garbage_after_the_catalog_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = two_batches(&store);
    drop(store);
    let catalog = dir.path().join(CATALOG_FILE);
    let len = file_len(&catalog);
    let mut bytes = std::fs::read(&catalog).unwrap();
    bytes.extend_from_slice(&[0x31, 0x45, 0x4c, 0x54, 9, 9, 9]);
    std::fs::write(&catalog, &bytes).unwrap();
    let store = open(dir.path());
    assert_eq!(file_len(&catalog), len, "the torn tail is truncated");
    assert_eq!(store.durable_seq(&grp("g")), Some(Seq(5)));
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b)])
    );
}

#[test]
fn a_cut_last_catalog_entry_drops_that_batch_and_its_frames() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let catalog = dir.path().join(CATALOG_FILE);
    let pack = pack_path(dir.path(), 1);
    let a = block(1);
    store
        .ingest(
            &grp("g"),
            &[
                write(1, 10, "data", 0, &[Some(&a)]),
                complete(2, 10, "data"),
            ],
            &incoming(&[OwnedFrame::new(&[&a])]),
        )
        .unwrap();
    let (catalog_len, pack_len) = (file_len(&catalog), file_len(&pack));
    let b = block(2);
    let second = [write(3, 20, "data", 1, &[Some(&b)])];
    let frames = [OwnedFrame::new(&[&b])];
    store
        .ingest(&grp("g"), &second, &incoming(&frames))
        .unwrap();
    drop(store);
    // The crash came while the last catalog entry was being written.
    let full = file_len(&catalog);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&catalog)
        .unwrap()
        .set_len(full - 5)
        .unwrap();
    let store = open(dir.path());
    assert_eq!(file_len(&catalog), catalog_len);
    assert_eq!(
        file_len(&pack),
        pack_len,
        "the uncommitted frame is cut from the pack"
    );
    assert_eq!(store.durable_seq(&grp("g")), Some(Seq(2)));
    assert_eq!(
        store.missing(&[ChunkHash::of(&a), ChunkHash::of(&b)]),
        vec![1]
    );
    assert_eq!(store.stats().pack_file_bytes, pack_len);
    // The agent resends from the durable seq.
    assert_eq!(
        store
            .ingest(&grp("g"), &second, &incoming(&frames))
            .unwrap(),
        Seq(3)
    );
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b)])
    );
}

#[test]
fn a_damaged_catalog_entry_before_a_valid_one_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    two_batches(&store);
    drop(store);
    let catalog = dir.path().join(CATALOG_FILE);
    let mut bytes = std::fs::read(&catalog).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&catalog, &bytes).unwrap();
    let err = Store::open(config(dir.path())).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(
            err,
            StoreError::Catalog(ScanError::Corrupt { offset: 0, .. })
        ),
        "{message}"
    );
    assert!(
        message.contains("catalog.log is corrupt at byte 0"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&catalog).unwrap(),
        bytes,
        "nothing is truncated"
    );
}

#[test]
fn frames_holding_chunks_come_as_stored_once_each_in_pack_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b, c) = (block(1), block(2), block(3));
    let frames = [OwnedFrame::new(&[&a, &b]), OwnedFrame::new(&[&c])];
    let records = [write(1, 1, "data", 0, &[Some(&a), Some(&b), Some(&c)])];
    store
        .ingest(&grp("g"), &records, &incoming(&frames))
        .unwrap();
    let asked = [ChunkHash::of(&c), ChunkHash::of(&b), ChunkHash::of(&a)];
    let held: Vec<HeldFrame> = store
        .frames_holding(&asked)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(held.len(), 2);
    let contents = [[a.as_slice(), b.as_slice()].concat(), c.to_vec()];
    for ((held, contents), (frame, asked)) in held
        .iter()
        .zip(contents)
        .zip([(&frames[0], 2), (&frames[1], 1)])
    {
        assert_eq!(held.hashes, frame.hashes);
        assert!(held.data == contents, "the frame's blocks, decompressed");
        assert_eq!(
            held.zstd.as_ref(),
            frame.zstd.as_slice(),
            "the bytes as stored"
        );
        assert_eq!(held.asked, asked);
    }
    assert!(matches!(
        store.frames_holding(&[ChunkHash::of(b"never stored")]),
        Err(ChunkReadError::Unknown { .. })
    ));
}

#[test]
fn a_flipped_pack_byte_fails_reads_but_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let mut rng = StdRng::seed_from_u64(3);
    let blocks: Vec<Vec<u8>> = (0..4).map(|_| random_block(&mut rng)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    let other = block(9);
    let frames = [OwnedFrame::new(&[&other]), OwnedFrame::new(&refs)];
    let records = [
        write(1, 1, "data", 0, &[Some(&other)]),
        write(
            2,
            1,
            "data",
            200,
            &refs.iter().map(|b| Some(*b)).collect::<Vec<_>>(),
        ),
        complete(3, 1, "data"),
    ];
    store
        .ingest(&grp("g"), &records, &incoming(&frames))
        .unwrap();
    let end = frames_end(&store) as usize;
    drop(store);

    // The second frame starts where the first ends; flip a byte 100 bytes before its end,
    // inside block 3 (zstd stored the random blocks raw).
    let pack = pack_path(dir.path(), 1);
    let first_frame_len = ENTRY_HEADER_BYTES as usize + 2 + 32 + frames[0].zstd.len();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = end - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();

    let store = open(dir.path());
    let plan = store.plan(&vol("data"), PointInTime::Latest).unwrap();
    let err = image_of(&store, &plan).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, StoreError::CorruptBlock { offset_bytes, .. } if offset_bytes == 203 * 4096),
        "{message}"
    );
    let expected = format!(
        "volume data: block at offset {} is corrupt: pack {} byte {first_frame_len}: block 3 does not match its hash",
        203 * 4096,
        pack.display()
    );
    assert!(
        message.starts_with(&expected),
        "{message}\nwanted: {expected}"
    );
    assert!(message.contains("packs/000001.pack"));
    let err = extents(&store, &plan, 1 << 20)
        .find_map(Result::err)
        .unwrap();
    assert!(matches!(err, StoreError::CorruptBlock { .. }), "{err}");
    // Other blocks, in the same frame and elsewhere, still read.
    assert_eq!(
        store.read_chunk(&ChunkHash::of(&blocks[2])).unwrap(),
        blocks[2]
    );
    assert_eq!(store.read_chunk(&ChunkHash::of(&other)).unwrap(), other);
    let err = store.read_chunk(&ChunkHash::of(&blocks[3])).unwrap_err();
    assert!(
        matches!(err, ChunkReadError::Corrupt { offset, .. } if offset == first_frame_len as u64),
        "{err}"
    );
    assert!(matches!(
        store.read_chunk(&ChunkHash::of(b"never stored")),
        Err(ChunkReadError::Unknown { .. })
    ));
    // Forwarding the frame as stored checks it whole: the damage fails it, naming it.
    let err = store
        .frames_holding(&[ChunkHash::of(&blocks[0])])
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_err();
    assert!(
        matches!(err, ChunkReadError::Corrupt { offset, .. } if offset == first_frame_len as u64),
        "{err}"
    );
    assert_eq!(
        store
            .frames_holding(&[ChunkHash::of(&other)])
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
            .len(),
        1
    );

    // A frame that no longer decompresses fails the same way, naming the frame.
    drop(store);
    let mut bytes = std::fs::read(&pack).unwrap();
    let zstd_start = first_frame_len + ENTRY_HEADER_BYTES as usize + 2 + 4 * 32;
    bytes[zstd_start] ^= 0xff; // the zstd magic number
    std::fs::write(&pack, &bytes).unwrap();
    let store = open(dir.path());
    let err = store.read_chunk(&ChunkHash::of(&blocks[0])).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "byte {first_frame_len}: frame does not decompress"
        )),
        "{err}"
    );
}

#[test]
fn a_truncated_pack_fails_reads_and_new_frames_go_to_a_new_pack() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = two_batches(&store);
    let end = frames_end(&store);
    drop(store);
    let pack = pack_path(dir.path(), 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack)
        .unwrap()
        .set_len(end - 10)
        .unwrap();
    let store = open(dir.path());
    assert_eq!(store.read_chunk(&ChunkHash::of(&a)).unwrap(), a);
    let err = store.read_chunk(&ChunkHash::of(&b)).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let plan = store.plan(&vol("data"), PointInTime::Latest).unwrap();
    let err = image_from_stored_frames(&store, &plan).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let c = block(3);
    store
        .ingest(
            &grp("g"),
            &[write(6, 30, "data", 2, &[Some(&c)])],
            &incoming(&[OwnedFrame::new(&[&c])]),
        )
        .unwrap();
    assert!(pack_path(dir.path(), 2).exists());
    assert_eq!(store.read_chunk(&ChunkHash::of(&c)).unwrap(), c);
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.read_chunk(&ChunkHash::of(&c)).unwrap(), c);
}

/// The image a restore client builds from `for_each_stored_frame`: it decompresses each frame
/// and checks every block it uses against the hash sent with it.
fn image_from_stored_frames(store: &Store, plan: &RestorePlan) -> Result<Vec<u8>, StoreError> {
    let mut image = vec![0u8; plan.size_bytes as usize];
    for_each_stored_frame::<StoreError>(store, plan, |frame| {
        let data = crate::frame::decompress(frame.zstd.as_ref(), frame.block_count).unwrap();
        for (index, block, hash) in frame.blocks {
            let bytes = &data[usize::from(index) * BLOCK_SIZE..][..BLOCK_SIZE];
            assert_eq!(
                ChunkHash::of(bytes),
                hash,
                "block {block:?} of {}",
                frame.pack
            );
            let at = block.0 as usize * BLOCK_SIZE;
            let len = BLOCK_SIZE.min(image.len() - at);
            image[at..at + len].copy_from_slice(&bytes[..len]);
        }
        Ok(())
    })?;
    Ok(image)
}

#[test]
fn stored_frames_read_several_at_a_time_rebuild_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let g = grp("g");
    let blocks_per_frame = 64u64;
    let frame_count = 40u64;
    let size = blocks_per_frame * frame_count * BLOCK_SIZE as u64;
    store.register_group(&g, 7, &[meta("big", size)]).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let write_frame = |seq: u64, first: u64, rng: &mut StdRng| {
        let data: Vec<Vec<u8>> = (0..blocks_per_frame).map(|_| random_block(rng)).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let named: Vec<Option<&[u8]>> = refs.iter().map(|b| Some(*b)).collect();
        let record = write(seq, seq as i64, "big", first, &named);
        store
            .ingest(&g, &[record], &incoming(&[OwnedFrame::new(&refs)]))
            .unwrap();
    };
    // 40 incompressible frames of 256 KiB each fill 10 MiB of pack: more than one read's worth.
    for f in 0..frame_count {
        write_frame(f + 1, f * blocks_per_frame, &mut rng);
    }
    let mut seq = frame_count + 1;
    store
        .ingest(&g, &[complete(seq, seq as i64, "big")], &[])
        .unwrap();
    // Rewriting every third frame's blocks leaves holes in the pack that reads skip over.
    for f in (0..frame_count).step_by(3) {
        seq += 1;
        write_frame(seq, f * blocks_per_frame, &mut rng);
    }
    let plan = store.plan(&vol("big"), PointInTime::Latest).unwrap();
    assert_eq!(
        image_from_stored_frames(&store, &plan).unwrap(),
        image_of(&store, &plan).unwrap()
    );
    // A consumer that stops at its first frame (a client gone) stops the reads ahead with it.
    let mut taken = 0;
    let stopped = for_each_stored_frame::<anyhow::Error>(&store, &plan, |_| {
        taken += 1;
        anyhow::bail!("enough")
    });
    assert_eq!(stopped.unwrap_err().to_string(), "enough");
    assert_eq!(taken, 1);
}

#[test]
fn points_before_complete_or_inside_a_gap_are_not_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let (a, b) = (block(1), block(2));
    let g = grp("g");
    let data = || vol("data");
    store
        .ingest(
            &g,
            &[write(1, 10, "data", 0, &[Some(&a)])],
            &incoming(&[OwnedFrame::new(&[&a, &b])]),
        )
        .unwrap();
    let err = store.plan(&data(), PointInTime::Latest).unwrap_err();
    assert!(matches!(err, StoreError::NotRestorable { .. }));
    assert!(
        err.to_string().contains("baseline has not finished"),
        "{err}"
    );
    assert!(!store.volumes()[0].complete);

    let records = [
        write(2, 20, "data", 1, &[Some(&b)]),
        complete(3, 30, "data"),
        write(4, 40, "data", 2, &[Some(&a)]),
        rec(5, 50, RecordKind::Gap { volume: data() }),
    ];
    store.ingest(&g, &records, &[]).unwrap();
    let summary = &store.volumes()[0];
    assert!(!summary.complete);
    assert_eq!(summary.window, Some((TimeNs(30), TimeNs(40))));
    let err = store.plan(&data(), PointInTime::Latest).unwrap_err();
    assert!(
        err.to_string().contains("wait for the agent's resync"),
        "{err}"
    );
    store
        .ingest(
            &g,
            &[
                write(6, 60, "data", 3, &[Some(&a)]),
                complete(7, 70, "data"),
                write(8, 80, "data", 4, &[Some(&b)]),
            ],
            &[],
        )
        .unwrap();
    let summary = &store.volumes()[0];
    assert!(summary.complete);
    assert_eq!(summary.window, Some((TimeNs(30), TimeNs(80))));

    for seq in [0, 1, 2] {
        let err = store.plan(&data(), PointInTime::Seq(Seq(seq))).unwrap_err();
        assert!(matches!(err, StoreError::NotRestorable { .. }), "seq {seq}");
        assert!(
            err.to_string()
                .contains("before the volume's baseline finished at seq 3"),
            "{err}"
        );
    }
    for seq in [5, 6] {
        let err = store.plan(&data(), PointInTime::Seq(Seq(seq))).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("journal gap that starts at seq 5"),
            "{message}"
        );
        assert!(message.contains("from seq 7 (time 70 ns) on"), "{message}");
    }
    assert!(store.plan(&data(), PointInTime::Time(TimeNs(65))).is_err());
    assert!(store.plan(&data(), PointInTime::Time(TimeNs(29))).is_err());
    assert!(store.plan(&data(), PointInTime::Time(TimeNs(5))).is_err());
    for seq in [3, 4, 7, 8, 100] {
        store.plan(&data(), PointInTime::Seq(Seq(seq))).unwrap();
    }
    assert_eq!(
        image(&store, "data", PointInTime::Time(TimeNs(45))),
        reference(MIB, &[(0, &a), (1, &b), (2, &a)])
    );
    assert_eq!(
        image(&store, "data", PointInTime::Latest),
        reference(MIB, &[(0, &a), (1, &b), (2, &a), (3, &a), (4, &b)])
    );
    // The other volume of the group never completed.
    assert!(store.plan(&vol("other"), PointInTime::Latest).is_err());
}

#[test]
fn the_same_content_elsewhere_stores_no_new_chunk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    store
        .register_group(&grp("h"), 2, &[meta("far", MIB)])
        .unwrap();
    let (a, b) = (block(1), block(2));
    store
        .ingest(
            &grp("g"),
            &[
                write(1, 1, "data", 0, &[Some(&a), Some(&b)]),
                complete(2, 1, "data"),
            ],
            &incoming(&[OwnedFrame::new(&[&a, &b])]),
        )
        .unwrap();
    let before = store.stats();
    let hashes = [ChunkHash::of(&a), ChunkHash::of(&b)];
    assert!(store.missing(&hashes).is_empty());
    store
        .ingest(
            &grp("g"),
            &[
                write(3, 2, "other", 5, &[Some(&b), Some(&a)]),
                complete(4, 2, "other"),
            ],
            &[],
        )
        .unwrap();
    store
        .ingest(
            &grp("h"),
            &[write(1, 2, "far", 0, &[Some(&a)]), complete(2, 2, "far")],
            // A sender that sends a chunk anyway: verified, but not stored again.
            &incoming(&[OwnedFrame::new(&[&a])]),
        )
        .unwrap();
    let after = store.stats();
    assert_eq!(after.chunk_count, before.chunk_count);
    assert_eq!(after.stored_bytes, before.stored_bytes);
    assert_eq!(after.pack_file_bytes, before.pack_file_bytes);
    assert_eq!(file_len(&pack_path(dir.path(), 1)), before.pack_file_bytes);
    assert_eq!(
        image(&store, "other", PointInTime::Latest),
        reference(256 << 10, &[(5, &b), (6, &a)])
    );
    assert_eq!(
        image(&store, "far", PointInTime::Latest),
        reference(MIB, &[(0, &a)])
    );
}

#[test]
fn packs_roll_over_at_the_target_size() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        // Two frames of a random block each, padded to a block boundary, fit; three do not.
        pack_target_bytes: 13_000,
        frame_cache_frames: 1,
        ..StoreConfig::new(dir.path())
    };
    let store = Store::open(config.clone()).unwrap();
    store
        .register_group(&grp("g"), 1, &[meta("data", MIB)])
        .unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let blocks: Vec<Vec<u8>> = (0..6).map(|_| random_block(&mut rng)).collect();
    let mut seq = 0;
    for (i, pair) in blocks.chunks(2).enumerate() {
        let refs: Vec<&[u8]> = pair.iter().map(Vec::as_slice).collect();
        let frames: Vec<OwnedFrame> = refs.iter().map(|b| OwnedFrame::new(&[b])).collect();
        let records = [write(
            seq + 1,
            1,
            "data",
            2 * i as u64,
            &[Some(refs[0]), Some(refs[1])],
        )];
        seq = store
            .ingest(&grp("g"), &records, &incoming(&frames))
            .unwrap()
            .0;
    }
    store
        .ingest(&grp("g"), &[complete(seq + 1, 1, "data")], &[])
        .unwrap();
    let packs: Vec<u64> = (1..=3)
        .map(|i| file_len(&pack_path(dir.path(), i)))
        .collect();
    assert!(
        packs.iter().all(|len| *len > 4096 && *len <= 13_000),
        "{packs:?}"
    );
    assert!(!pack_path(dir.path(), 4).exists());
    assert_eq!(store.stats().pack_file_bytes, packs.iter().sum::<u64>());
    let placed: Vec<(u64, &[u8])> = (0..).zip(blocks.iter().map(Vec::as_slice)).collect();
    let expected = reference(MIB, &placed);
    assert_eq!(image(&store, "data", PointInTime::Latest), expected);
    drop(store);
    let store = Store::open(config).unwrap();
    assert_eq!(image(&store, "data", PointInTime::Latest), expected);
    assert_eq!(store.stats().pack_file_bytes, packs.iter().sum::<u64>());
}

#[test]
fn a_partial_last_block_is_cut_at_the_volume_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let size = 3 * 4096 + 100;
    store
        .register_group(&grp("g"), 1, &[meta("odd", size)])
        .unwrap();
    let bs: Vec<Vec<u8>> = (1..=4).map(block).collect();
    let refs: Vec<Option<&[u8]>> = bs.iter().map(|b| Some(b.as_slice())).collect();
    let frame = OwnedFrame::new(&bs.iter().map(Vec::as_slice).collect::<Vec<_>>());
    store
        .ingest(
            &grp("g"),
            &[write(1, 1, "odd", 0, &refs), complete(2, 1, "odd")],
            &[frame.incoming()],
        )
        .unwrap();
    assert!(matches!(
        store.ingest(&grp("g"), &[write(3, 1, "odd", 4, &refs[..1])], &[]),
        Err(StoreError::OutOfRange { .. })
    ));
    let plan = store.plan(&vol("odd"), PointInTime::Latest).unwrap();
    assert_eq!(plan_data_bytes(&plan), size);
    let placed: Vec<(u64, &[u8])> = (0..).zip(bs.iter().map(Vec::as_slice)).collect();
    let expected = reference(size, &placed);
    assert_eq!(image_of(&store, &plan).unwrap(), expected);
    let got: Vec<(u64, usize)> = extents(&store, &plan, 8192)
        .map(|e| e.map(|(offset, data)| (offset, data.len())).unwrap())
        .collect();
    assert_eq!(got, vec![(0, 8192), (8192, 4196)]);
    assert_eq!(image_from_extents(&store, &plan, 1), expected);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(store);
    open(dir.path());
    assert!(Store::open(StoreConfig {
        pack_target_bytes: 0,
        ..config(dir.path())
    })
    .is_err());
}

#[test]
fn concurrent_readers_and_an_ingester() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    store
        .ingest(&grp("g"), &[complete(1, 0, "data")], &[])
        .unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..50u64 {
                let b = block(i + 100);
                let record = write(i + 2, i as i64, "data", i, &[Some(&b)]);
                store
                    .ingest(&grp("g"), &[record], &incoming(&[OwnedFrame::new(&[&b])]))
                    .unwrap();
            }
        });
        for _ in 0..2 {
            // Each reader reads until it has seen every block, checking every image on the way.
            let (store, deadline) = (
                &store,
                std::time::Instant::now() + std::time::Duration::from_secs(60),
            );
            s.spawn(move || loop {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the ingester never finished"
                );
                let plan = store.plan(&vol("data"), PointInTime::Latest).unwrap();
                let bytes = image_of(store, &plan).unwrap();
                let blocks = (plan.seq.0 - 1) as usize;
                for i in 0..blocks {
                    assert_eq!(
                        &bytes[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
                        &block(i as u64 + 100)[..]
                    );
                }
                if blocks == 50 {
                    break;
                }
            });
        }
    });
    assert_eq!(store.durable_seq(&grp("g")), Some(Seq(51)));
}

// ---------------------------------------------------------------------------------------------
// Model-based test
// ---------------------------------------------------------------------------------------------

/// Content alphabet: pattern 0 is the zero block, 1..=PATTERNS are distinct non-zero blocks.
const PATTERNS: u8 = 6;

fn pattern(id: u8) -> Vec<u8> {
    block(1000 + u64::from(id))
}

fn pattern_hash(id: u8) -> Option<ChunkHash> {
    (id != 0).then(|| ChunkHash::of(&pattern(id)))
}

const MODEL_VOLUMES: [&str; 2] = ["m0", "m1"];
const MODEL_SIZES: [u64; 2] = [40 * 4096, 24 * 4096 - 1000];

/// The trivial model: every volume's blocks (block -> pattern) after each seq.
struct Model {
    /// `states[s][v]`: blocks of volume v after seq s (s = 0: before any record).
    states: Vec<[BTreeMap<u64, u8>; 2]>,
    times: Vec<i64>,
    /// `(seq, is_complete)` markers per volume.
    markers: [Vec<(u64, bool)>; 2],
}

impl Model {
    fn restorable(&self, v: usize, seq: u64) -> bool {
        self.markers[v]
            .iter()
            .rev()
            .find(|(s, _)| *s <= seq)
            .is_some_and(|(_, complete)| *complete)
    }

    fn image(&self, v: usize, seq: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; MODEL_SIZES[v] as usize];
        for (&at, &id) in &self.states[seq as usize][v] {
            let start = at as usize * BLOCK_SIZE;
            let end = (start + BLOCK_SIZE).min(bytes.len());
            bytes[start..end].copy_from_slice(&pattern(id)[..end - start]);
        }
        bytes
    }

    /// The last seq (<= `durable`) whose time is <= `time`.
    fn seq_at_time(&self, time: i64, durable: u64) -> u64 {
        (1..=durable)
            .rev()
            .find(|&s| self.times[s as usize] <= time)
            .unwrap_or(0)
    }
}

struct Harness {
    config: StoreConfig,
    store: Option<Store>,
    model: Model,
    /// Records not yet acknowledged by the store (still in the agent's spool).
    pending: Vec<Record>,
    last_batch: Option<(Vec<Record>, Vec<OwnedFrame>)>,
    time: i64,
}

impl Harness {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn next_seq(&self) -> u64 {
        self.model.states.len() as u64
    }

    fn push(&mut self, kind: RecordKind, rng: &mut StdRng) {
        self.time += rng.gen_range(0..3) * 1000;
        let seq = self.next_seq();
        let mut state = self.model.states.last().unwrap().clone();
        let index = |v: &VolumeName| MODEL_VOLUMES.iter().position(|n| *n == v.as_str()).unwrap();
        match &kind {
            RecordKind::Write {
                volume,
                first,
                blocks,
                ..
            } => {
                let v = index(volume);
                for (at, chunk) in (first.0..).zip(blocks) {
                    match chunk {
                        Some(hash) => {
                            let id = (1..=PATTERNS)
                                .find(|&id| pattern_hash(id) == Some(*hash))
                                .unwrap();
                            state[v].insert(at, id);
                        }
                        None => {
                            state[v].remove(&at);
                        }
                    }
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
                let v = index(volume);
                for at in first.0..first.0 + count {
                    state[v].remove(&at);
                }
            }
            RecordKind::Complete { volume } => self.model.markers[index(volume)].push((seq, true)),
            RecordKind::Gap { volume } => self.model.markers[index(volume)].push((seq, false)),
            _ => {}
        }
        self.model.states.push(state);
        self.model.times.push(self.time);
        self.pending.push(Record {
            seq: Seq(seq),
            time: TimeNs(self.time),
            kind,
        });
    }

    /// Ships the first `count` pending records, with frames carrying the chunks `missing`
    /// reports (plus, sometimes, one the store already has).
    fn ship(&mut self, count: usize, rng: &mut StdRng) {
        let batch: Vec<Record> = self.pending.drain(..count).collect();
        let mut wanted = Vec::new();
        for record in &batch {
            if let RecordKind::Write { blocks, .. } = &record.kind {
                for hash in blocks.iter().flatten() {
                    if !wanted.contains(hash) {
                        wanted.push(*hash);
                    }
                }
            }
        }
        let mut to_send: Vec<ChunkHash> = self
            .store()
            .missing(&wanted)
            .iter()
            .map(|&i| wanted[i as usize])
            .collect();
        if rng.gen_bool(0.2) {
            if let Some(extra) = wanted.iter().find(|h| !to_send.contains(h)) {
                to_send.push(*extra);
            }
        }
        let mut frames = Vec::new();
        while !to_send.is_empty() {
            let n = rng.gen_range(1..=4).min(to_send.len());
            let content: Vec<Vec<u8>> = to_send
                .drain(..n)
                .map(|h| {
                    pattern(
                        (1..=PATTERNS)
                            .find(|&id| pattern_hash(id) == Some(h))
                            .unwrap(),
                    )
                })
                .collect();
            frames.push(OwnedFrame::new(
                &content.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            ));
        }
        let expected = batch.last().map_or(self.durable(), |r| r.seq.0);
        let got = self
            .store()
            .ingest(&grp("mg"), &batch, &incoming(&frames))
            .unwrap();
        assert_eq!(got, Seq(expected));
        self.last_batch = Some((batch, frames));
    }

    fn durable(&self) -> u64 {
        self.next_seq() - 1 - self.pending.len() as u64
    }

    fn reopen(&mut self) {
        let before = self.store().stats();
        self.store = None;
        self.store = Some(Store::open(self.config.clone()).unwrap());
        assert_eq!(self.store().stats(), before);
        let registered = self
            .store()
            .register_group(&grp("mg"), 42, &model_volumes())
            .unwrap();
        assert_eq!(registered, Seq(self.durable()));
    }

    /// Ships a batch, then "crashes" before the catalog fsync returned: the catalog is cut
    /// somewhere inside the batch's entry and its frames stay in the pack. On reopen the batch
    /// must be gone (its records pending again in the agent) and everything earlier intact.
    fn crash_during_ship(&mut self, rng: &mut StdRng) {
        if self.pending.is_empty() {
            return;
        }
        let catalog = self.config.dir.join(CATALOG_FILE);
        let before = file_len(&catalog);
        let count = rng.gen_range(1..=self.pending.len());
        let unacknowledged: Vec<Record> = self.pending[..count].to_vec();
        self.ship(count, rng);
        let after = file_len(&catalog);
        assert!(after > before);
        self.store = None;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&catalog)
            .unwrap()
            .set_len(rng.gen_range(before..after))
            .unwrap();
        self.pending.splice(0..0, unacknowledged);
        self.last_batch = None;
        self.store = Some(Store::open(self.config.clone()).unwrap());
        assert_eq!(file_len(&catalog), before);
        let registered = self
            .store()
            .register_group(&grp("mg"), 42, &model_volumes())
            .unwrap();
        assert_eq!(registered, Seq(self.durable()));
    }

    fn check(&self, v: usize, point: PointInTime) {
        let durable = self.durable();
        let seq = match point {
            PointInTime::Latest => durable,
            PointInTime::Seq(s) => s.0.min(durable),
            PointInTime::Time(t) => self.model.seq_at_time(t.0, durable),
        };
        let result = self.store().plan(&vol(MODEL_VOLUMES[v]), point);
        if seq == 0 || !self.model.restorable(v, seq) {
            assert!(
                matches!(result, Err(StoreError::NotRestorable { .. })),
                "{point} of volume {v} (seq {seq}) must not be restorable: {result:?}"
            );
            return;
        }
        let plan = result.unwrap_or_else(|e| panic!("{point} of volume {v}: {e}"));
        assert_eq!(plan.seq, Seq(seq));
        assert_eq!(plan.time, TimeNs(self.model.times[seq as usize]));
        let expected = self.model.image(v, seq);
        assert!(
            image_of(self.store(), &plan).unwrap() == expected,
            "{point} of volume {v}"
        );
        assert!(image_from_extents(self.store(), &plan, 3 * 4096) == expected);
    }
}

fn model_volumes() -> Vec<VolumeMeta> {
    MODEL_VOLUMES
        .iter()
        .zip(MODEL_SIZES)
        .map(|(n, s)| meta(n, s))
        .collect()
}

fn run_model(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        pack_target_bytes: 16 << 10,
        frame_cache_frames: 3,
        ..StoreConfig::new(dir.path())
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = Harness {
        store: Some(Store::open(config.clone()).unwrap()),
        config,
        model: Model {
            states: vec![[BTreeMap::new(), BTreeMap::new()]],
            times: vec![0],
            markers: [Vec::new(), Vec::new()],
        },
        pending: Vec::new(),
        last_batch: None,
        time: 1_700_000_000_000_000_000,
    };
    h.store()
        .register_group(&grp("mg"), 42, &model_volumes())
        .unwrap();
    for _ in 0..steps {
        let v = rng.gen_range(0..2);
        let volume = vol(MODEL_VOLUMES[v]);
        let blocks = journal::block_count(MODEL_SIZES[v]);
        let first = rng.gen_range(0..blocks);
        let max_len = (blocks - first).min(6);
        match rng.gen_range(0..100) {
            0..=39 => {
                let n = rng.gen_range(1..=max_len);
                let chunks = (0..n)
                    .map(|_| pattern_hash(rng.gen_range(0..=PATTERNS)))
                    .collect();
                let kind = RecordKind::Write {
                    volume,
                    first: BlockNo(first),
                    blocks: chunks,
                    origin: WriteOrigin::Client,
                };
                h.push(kind, &mut rng);
            }
            40..=47 => {
                let count = rng.gen_range(1..=max_len);
                h.push(
                    RecordKind::Trim {
                        volume,
                        first: BlockNo(first),
                        count,
                    },
                    &mut rng,
                );
            }
            48..=53 => {
                let count = rng.gen_range(1..=max_len);
                h.push(
                    RecordKind::WriteZeroes {
                        volume,
                        first: BlockNo(first),
                        count,
                    },
                    &mut rng,
                );
            }
            54..=57 => h.push(RecordKind::Flush, &mut rng),
            58..=59 => {
                let name = CheckpointName::new(format!("cp{}", h.next_seq())).unwrap();
                h.push(
                    RecordKind::Checkpoint {
                        name,
                        app_consistent: rng.gen(),
                    },
                    &mut rng,
                );
            }
            60..=65 => {
                let in_gap = !h.model.markers[v]
                    .last()
                    .is_some_and(|(_, complete)| *complete);
                if in_gap || rng.gen_bool(0.3) {
                    let kind = if in_gap {
                        RecordKind::Complete { volume }
                    } else {
                        RecordKind::Gap { volume }
                    };
                    h.push(kind, &mut rng);
                }
            }
            66..=67 => h.reopen(),
            68..=69 => h.crash_during_ship(&mut rng),
            70..=73 => {
                if let Some((records, frames)) = h.last_batch.take() {
                    let got = h
                        .store()
                        .ingest(&grp("mg"), &records, &incoming(&frames))
                        .unwrap();
                    assert_eq!(got, Seq(h.durable()), "a resend is idempotent");
                    h.last_batch = Some((records, frames));
                }
            }
            74..=87 => {
                if !h.pending.is_empty() {
                    let count = rng.gen_range(1..=h.pending.len());
                    h.ship(count, &mut rng);
                }
            }
            _ => {
                let durable = h.durable();
                let seq = rng.gen_range(0..=durable + 1);
                h.check(v, PointInTime::Seq(Seq(seq)));
                let time =
                    h.model.times[rng.gen_range(0..=durable) as usize] + rng.gen_range(-1..=1);
                h.check(v, PointInTime::Time(TimeNs(time)));
                h.check(v, PointInTime::Latest);
            }
        }
    }
    let remaining = h.pending.len();
    if remaining > 0 {
        h.ship(remaining, &mut rng);
    }
    h.reopen();
    for seq in 0..=h.durable() {
        for v in 0..2 {
            h.check(v, PointInTime::Seq(Seq(seq)));
        }
    }
    let stats = h.store().stats();
    assert!(stats.chunk_count <= u64::from(PATTERNS));
}

#[test]
fn model_random_histories_restore_like_the_model() {
    // TIDELINE_STORE_MODEL_SEEDS=1000 for a longer soak.
    let seeds = std::env::var("TIDELINE_STORE_MODEL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64);
    for seed in 0..seeds {
        run_model(seed, 300);
    }
}

// ---------------------------------------------------------------------------------------------
// Golden fixture of the on-disk format
// ---------------------------------------------------------------------------------------------

const FIXTURE: &str = "tests/fixtures/store-v1";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE)
}

const GOLDEN_VOLUMES: [(&str, u64); 2] = [("disk0", 16 * 4096), ("disk1", 8 * 4096 - 512)];

/// The deterministic history stored in the fixture: (records, the frames' blocks).
fn golden_history() -> (Vec<Record>, Vec<Vec<Vec<u8>>>) {
    let p = |i: u64| block(500 + i);
    let t = |i: i64| 1_700_000_000_000_000_000 + i * 1_000_000_000;
    let records = vec![
        write(
            1,
            t(1),
            "disk0",
            0,
            &[Some(&p(1)), Some(&p(2)), None, Some(&p(3))],
        ),
        write(2, t(1), "disk1", 7, &[Some(&p(4))]),
        complete(3, t(2), "disk0"),
        complete(4, t(2), "disk1"),
        rec(5, t(3), RecordKind::Flush),
        write(6, t(4), "disk0", 1, &[Some(&p(1)), Some(&p(5))]),
        rec(
            7,
            t(5),
            RecordKind::Trim {
                volume: vol("disk0"),
                first: BlockNo(3),
                count: 10,
            },
        ),
        rec(
            8,
            t(6),
            RecordKind::Checkpoint {
                name: CheckpointName::new("nightly").unwrap(),
                app_consistent: true,
            },
        ),
        rec(
            9,
            t(7),
            RecordKind::Gap {
                volume: vol("disk1"),
            },
        ),
        write(10, t(8), "disk1", 0, &[Some(&p(2))]),
        rec(
            11,
            t(8),
            RecordKind::WriteZeroes {
                volume: vol("disk1"),
                first: BlockNo(7),
                count: 1,
            },
        ),
        complete(12, t(9), "disk1"),
    ];
    let frames = vec![vec![p(1), p(2), p(3)], vec![p(4)], vec![p(5)]];
    (records, frames)
}

/// Writes the golden history into a store: two batches.
fn write_golden(store: &Store) {
    let volumes: Vec<VolumeMeta> = GOLDEN_VOLUMES.iter().map(|(n, s)| meta(n, *s)).collect();
    store
        .register_group(&grp("golden"), 0x7469_6465, &volumes)
        .unwrap();
    let (records, frames) = golden_history();
    let frames: Vec<OwnedFrame> = frames
        .iter()
        .map(|blocks| OwnedFrame::new(&blocks.iter().map(Vec::as_slice).collect::<Vec<_>>()))
        .collect();
    store
        .ingest(&grp("golden"), &records[..5], &incoming(&frames[..2]))
        .unwrap();
    store
        .ingest(&grp("golden"), &records[5..], &incoming(&frames[2..]))
        .unwrap();
}

/// Expected image of a golden volume after `seq`, by a replay independent of the store.
fn golden_image(volume: &str, seq: u64) -> Vec<u8> {
    let (records, frames) = golden_history();
    let content: HashMap<ChunkHash, Vec<u8>> = frames
        .into_iter()
        .flatten()
        .map(|b| (ChunkHash::of(&b), b))
        .collect();
    let size = GOLDEN_VOLUMES.iter().find(|(n, _)| *n == volume).unwrap().1 as usize;
    let mut bytes = vec![0u8; journal::block_count(size as u64) as usize * BLOCK_SIZE];
    let name = VolumeName::new(volume).unwrap();
    for record in records.iter().take(seq as usize) {
        match record.kind.block_change(&name) {
            Some(BlockChange::Write { first, blocks }) => {
                for (at, chunk) in (first.0 as usize..).zip(blocks) {
                    let range = at * BLOCK_SIZE..(at + 1) * BLOCK_SIZE;
                    match chunk {
                        Some(hash) => bytes[range].copy_from_slice(&content[hash]),
                        None => bytes[range].fill(0),
                    }
                }
            }
            Some(BlockChange::Zero { first, count }) => {
                let start = first.0 as usize * BLOCK_SIZE;
                bytes[start..start + count as usize * BLOCK_SIZE].fill(0);
            }
            None => {}
        }
    }
    bytes.truncate(size);
    bytes
}

/// Regenerates the fixture. Run only after a deliberate format change (with a version bump and
/// a new fixture directory): `cargo test -p tideline-core generate_store_v1_fixture -- --ignored`.
#[test]
#[ignore]
fn generate_store_v1_fixture() {
    let scratch = tempfile::tempdir().unwrap();
    let store = open(scratch.path());
    write_golden(&store);
    drop(store);
    let fixture = fixture_dir();
    let _ = std::fs::remove_dir_all(&fixture);
    std::fs::create_dir_all(fixture.join(PACKS_DIR)).unwrap();
    std::fs::copy(
        scratch.path().join(CATALOG_FILE),
        fixture.join(CATALOG_FILE),
    )
    .unwrap();
    let pack = Path::new(PACKS_DIR).join(PackId(1).file_name());
    std::fs::copy(scratch.path().join(&pack), fixture.join(&pack)).unwrap();
    assert!(!scratch
        .path()
        .join(PACKS_DIR)
        .join(PackId(2).file_name())
        .exists());
}

/// Copies the fixture to a scratch directory (opening a store may truncate its files).
fn fixture_copy() -> tempfile::TempDir {
    let scratch = tempfile::tempdir().unwrap();
    let fixture = fixture_dir();
    std::fs::create_dir_all(scratch.path().join(PACKS_DIR)).unwrap();
    std::fs::copy(
        fixture.join(CATALOG_FILE),
        scratch.path().join(CATALOG_FILE),
    )
    .unwrap();
    let pack = Path::new(PACKS_DIR).join(PackId(1).file_name());
    std::fs::copy(fixture.join(&pack), scratch.path().join(&pack)).unwrap();
    scratch
}

#[test]
fn golden_store_v1_fixture_still_restores() {
    let scratch = fixture_copy();
    let store = open(scratch.path());
    let golden = grp("golden");
    assert_eq!(store.durable_seq(&golden), Some(Seq(12)));
    assert_eq!(store.stats().chunk_count, 5);
    // The fixture's spool id still owns the group.
    assert!(matches!(
        store.register_group(&golden, 1, &[meta("disk0", 16 * 4096)]),
        Err(StoreError::SpoolMismatch { .. })
    ));
    for (name, size) in GOLDEN_VOLUMES {
        for seq in 0..=12 {
            let result = store.plan(&vol(name), PointInTime::Seq(Seq(seq)));
            let restorable = match name {
                "disk0" => seq >= 3,
                _ => (4..9).contains(&seq) || seq >= 12,
            };
            if !restorable {
                assert!(
                    matches!(result, Err(StoreError::NotRestorable { .. })),
                    "{name} at {seq}"
                );
                continue;
            }
            let plan = result.unwrap();
            assert_eq!(plan.size_bytes, size);
            assert_eq!(
                image_of(&store, &plan).unwrap(),
                golden_image(name, seq),
                "{name} at seq {seq}"
            );
        }
    }
    let summaries = store.volumes();
    assert_eq!(summaries.len(), 2);
    assert!(summaries
        .iter()
        .all(|s| s.complete && s.durable_seq == Seq(12)));

    // Encoding is stable too: every catalog entry re-encodes to the very bytes on disk.
    framed::scan_file(&scratch.path().join(CATALOG_FILE), |_, body| {
        let entry = Entry::decode(body)?;
        assert_eq!(entry.encode(), body);
        Ok(())
    })
    .unwrap();
}

#[test]
fn golden_fixture_with_a_torn_catalog_opens_at_the_previous_batch() {
    let scratch = fixture_copy();
    let catalog = scratch.path().join(CATALOG_FILE);
    let len = file_len(&catalog);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&catalog)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let store = open(scratch.path());
    assert_eq!(store.durable_seq(&grp("golden")), Some(Seq(5)));
    assert_eq!(store.stats().chunk_count, 4);
    assert_eq!(
        image(&store, "disk0", PointInTime::Latest),
        golden_image("disk0", 5)
    );
}

// ---------------------------------------------------------------------------------------------
// Epochs: replication, failover, fencing, failback (two stores standing for two sites)
// ---------------------------------------------------------------------------------------------

/// Copies every record of `group` after the replica's durable seq from `from` to `to`.
fn replicate(from: &Store, to: &Store, group: &GroupName) -> Result<Seq, StoreError> {
    let info = from.group_info(group).unwrap();
    let durable = to.register_replica(group, &info.offer())?;
    let records = from.records_after(group, durable, usize::MAX, u64::MAX);
    let mut hashes: Vec<ChunkHash> = Vec::new();
    for r in &records {
        if let RecordKind::Write { blocks, .. } = &r.kind {
            hashes.extend(blocks.iter().flatten());
        }
    }
    hashes.sort();
    hashes.dedup();
    let missing: Vec<ChunkHash> = to
        .missing(&hashes)
        .iter()
        .map(|&i| hashes[i as usize])
        .collect();
    let blocks: Vec<Vec<u8>> = missing
        .iter()
        .map(|h| from.read_chunk(h).unwrap())
        .collect();
    let frames: Vec<OwnedFrame> = blocks
        .chunks(crate::frame::MAX_FRAME_BLOCKS)
        .map(|c| OwnedFrame::new(&c.iter().map(Vec::as_slice).collect::<Vec<_>>()))
        .collect();
    to.ingest_replica(group, info.epoch, &records, &incoming(&frames))
}

#[test]
fn failover_fences_the_old_primary_and_failback_diffs_only_changed_blocks() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (open(dir_a.path()), open(dir_b.path()));
    let g = grp("g");
    a.register_group(&g, 7, &[meta("v", 16 * 4096)]).unwrap();
    let (p1, p2, p3, p4) = (block(1), block(2), block(3), block(4));
    let frames = [OwnedFrame::new(&[&p1, &p2])];
    a.ingest(
        &g,
        &[
            write(1, 10, "v", 0, &[Some(&p1), Some(&p2)]),
            complete(2, 11, "v"),
        ],
        &incoming(&frames),
    )
    .unwrap();
    assert_eq!(replicate(&a, &b, &g).unwrap(), Seq(2));
    assert!(matches!(
        b.register_group(&g, 7, &[meta("v", 16 * 4096)]),
        Err(StoreError::NotPrimary { .. })
    ));

    // A writes seq 3 that never reaches B; B takes over at its latest point.
    a.ingest(
        &g,
        &[write(3, 12, "v", 5, &[Some(&p3)])],
        &incoming(&[OwnedFrame::new(&[&p3])]),
    )
    .unwrap();
    let taken = b.take_over(&g, PointInTime::Latest, None).unwrap();
    assert_eq!((taken.epoch, taken.seq), (Epoch(2), Seq(2)));

    // A's replication at epoch 1 is refused: A is fenced, and so is its agent.
    assert!(matches!(
        replicate(&a, &b, &g),
        Err(StoreError::StaleEpoch {
            current: Epoch(2),
            ..
        })
    ));
    assert!(a.fence(&g, Epoch(2)).unwrap());
    assert!(matches!(
        a.ingest(&g, &[write(4, 13, "v", 6, &[None])], &[]),
        Err(StoreError::Fenced { by: Epoch(2), .. })
    ));

    // A new spool protects the volume at B; its records continue after seq 2.
    let reg = b
        .register_agent(&g, 99, None, &[meta("v", 16 * 4096)])
        .unwrap();
    assert_eq!(reg.seq_base, SeqBase(2));
    b.ingest(
        &g,
        &[write(3, 20, "v", 1, &[Some(&p4)])],
        &incoming(&[OwnedFrame::new(&[&p4])]),
    )
    .unwrap();

    // B replicates back: A joins B's timeline, setting its seq 3 aside; reopening keeps that.
    assert_eq!(replicate(&b, &a, &g).unwrap(), Seq(3));
    drop(a);
    let a = open(dir_a.path());
    let info = a.group_info(&g).unwrap();
    assert_eq!((info.role, info.epoch), (GroupRole::Replica, Epoch(2)));
    assert_eq!(info.abandoned, Some((Seq(2), 1)));
    assert!(matches!(
        a.register_group(&g, 7, &[meta("v", 16 * 4096)]),
        Err(StoreError::NotPrimary { .. })
    ));

    // Failback: only block 1 (written at B) and block 5 (written at A after the fork) differ.
    let (epoch, seq) = b.hand_over(&g).unwrap();
    let back = a.take_over(&g, PointInTime::Seq(seq), Some(epoch)).unwrap();
    assert_eq!(back.epoch, Epoch(3));
    let diff = a
        .diff(&vol("v"), DiffBase::Abandoned, PointInTime::Latest)
        .unwrap();
    assert_eq!(
        diff.changes,
        vec![(BlockNo(1), Some(ChunkHash::of(&p4))), (BlockNo(5), None)]
    );
    // The old agent spool of A belongs to the abandoned timeline: refused for good.
    assert!(matches!(
        a.register_group(&g, 7, &[meta("v", 16 * 4096)]),
        Err(StoreError::RetiredSpool { .. })
    ));
    assert_eq!(replicate(&a, &b, &g).unwrap(), Seq(3));
    assert_eq!(b.group_info(&g).unwrap().epoch, Epoch(3));
}
