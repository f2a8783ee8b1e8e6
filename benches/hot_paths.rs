//! Criterion benchmarks of the hot paths: block hashing and zero detection, frame compression
//! and decompression, spool append, chunk-store ingest and read, materialisation, restore
//! planning.
//!
//! Data is text-like and compressible, as file-system blocks are; figures are per byte of
//! uncompressed block data. With `TIDELINE_BENCH_SAMPLE=FILE` (the end-to-end benchmark sets it
//! to its ext4 image of system files), hashing and compression run on the non-zero blocks of
//! FILE instead, so the ceiling derived from them is the one of that data.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;

use tideline_core::frame::{self, DEFAULT_ZSTD_LEVEL, MAX_FRAME_BLOCKS};
use tideline_core::record::{Record, RecordKind, WriteOrigin};
use tideline_core::spool::{Spool, SpoolConfig, SpoolOp};
use tideline_core::store::{self, IncomingFrame, PointInTime, Store, StoreConfig, VolumeMeta};
use tideline_core::{block, BlockNo, ChunkHash, GroupName, Seq, TimeNs, VolumeName, BLOCK_SIZE};

const MIB: usize = 1 << 20;

/// `len` bytes of non-zero blocks taken from 1 MiB windows spread evenly over
/// `TIDELINE_BENCH_SAMPLE`, or of [`tideline_testkit::text_bytes`] when it is not set.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let Some(path) = std::env::var_os("TIDELINE_BENCH_SAMPLE") else {
        return tideline_testkit::text_bytes(seed, len);
    };
    let file = std::fs::File::open(&path).expect("open TIDELINE_BENCH_SAMPLE");
    let file_len = file.metadata().expect("stat TIDELINE_BENCH_SAMPLE").len();
    let windows = (len / MIB).max(1) as u64 * 4;
    let step = (file_len / windows).max(MIB as u64) & !(BLOCK_SIZE as u64 - 1);
    let mut out = Vec::with_capacity(len);
    let mut window = vec![0u8; MIB];
    let mut at = 0;
    while out.len() < len && at < file_len {
        let n = file
            .read_at(&mut window, at)
            .expect("read TIDELINE_BENCH_SAMPLE");
        for block in window[..n - n % BLOCK_SIZE].chunks_exact(BLOCK_SIZE) {
            if !block::is_zero(block) && out.len() < len {
                out.extend_from_slice(block);
            }
        }
        at += step;
    }
    assert!(!out.is_empty(), "TIDELINE_BENCH_SAMPLE holds no data");
    while out.len() < len {
        out.extend_from_within(..(len - out.len()).min(out.len()));
    }
    out
}

fn hashing(c: &mut Criterion) {
    let data = sample(8 * MIB, 1);
    let zeroes = vec![0u8; 8 * MIB];
    let mut group = c.benchmark_group("block");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("blake3_4k_blocks", |b| {
        b.iter(|| black_box(block::chunks_of(&data)))
    });
    group.bench_function("blake3_4k_blocks_side_by_side", |b| {
        b.iter(|| black_box(block::hash_blocks(&data)))
    });
    group.bench_function("zero_detect_4k_blocks", |b| {
        b.iter(|| {
            black_box(
                zeroes
                    .chunks(BLOCK_SIZE)
                    .filter(|c| block::is_zero(c))
                    .count(),
            )
        })
    });
    group.finish();
}

fn compression(c: &mut Criterion) {
    let frame_bytes = MAX_FRAME_BLOCKS * BLOCK_SIZE;
    // Several frames from across the sample, so that one odd frame does not decide the figure.
    let frames = if std::env::var_os("TIDELINE_BENCH_SAMPLE").is_some() {
        16
    } else {
        1
    };
    let data = sample(frames * frame_bytes, 2);
    let hashes: Vec<ChunkHash> = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
    let compressed: Vec<Vec<u8>> = data
        .chunks(frame_bytes)
        .map(|f| frame::compress(f, DEFAULT_ZSTD_LEVEL))
        .collect();
    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("compress_1mib_default_level", |b| {
        b.iter(|| {
            for f in data.chunks(frame_bytes) {
                black_box(frame::compress(f, DEFAULT_ZSTD_LEVEL));
            }
        })
    });
    group.bench_function("open_1mib_decompress_verify", |b| {
        b.iter(|| {
            for (z, h) in compressed.iter().zip(hashes.chunks(MAX_FRAME_BLOCKS)) {
                black_box(frame::open(z, h).expect("open"));
            }
        })
    });
    group.finish();
}

fn spool_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = Spool::open(SpoolConfig::new(dir.path(), 1 << 40)).expect("open spool");
    let volume = VolumeName::new("v").expect("name");
    // Shared, as the tap hands a write's buffer to the spool: a clone is not a copy.
    let data = bytes::Bytes::from(tideline_testkit::text_bytes(3, MIB));
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Bytes(data.len() as u64));
    let mut next = 0u64;
    group.bench_function("append_1mib_write", |b| {
        b.iter(|| {
            next += 1;
            let (seq, _) = spool
                .append(SpoolOp::Write {
                    volume: volume.clone(),
                    first: BlockNo(next % 1024 * 256),
                    data: data.clone(),
                    origin: WriteOrigin::Client,
                })
                .expect("append");
            if seq.0 % 64 == 0 {
                spool.release_through(seq).expect("release");
            }
        })
    });
    group.finish();
}

/// A store holding `mib` MiB of distinct blocks written to volume "v" as 1 MiB records.
fn filled_store(dir: &std::path::Path, mib: u64) -> (Store, VolumeName) {
    let store = Store::open(StoreConfig::new(dir)).expect("open store");
    let group = GroupName::new("g").expect("name");
    let volume = VolumeName::new("v").expect("name");
    let meta = [VolumeMeta {
        name: volume.clone(),
        size_bytes: mib * MIB as u64,
    }];
    store.register_group(&group, 1, &meta).expect("register");
    for i in 0..mib {
        let data = tideline_testkit::text_bytes(100 + i, MIB);
        let hashes: Vec<ChunkHash> = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
        let compressed = frame::compress(&data, DEFAULT_ZSTD_LEVEL);
        let record = Record {
            seq: Seq(i + 1),
            time: TimeNs(i as i64 + 1),
            kind: RecordKind::Write {
                volume: volume.clone(),
                first: BlockNo(i * 256),
                blocks: hashes.iter().copied().map(Some).collect(),
                origin: WriteOrigin::Client,
            },
        };
        let records = vec![record];
        let frames = [IncomingFrame {
            hashes: &hashes,
            zstd_data: &compressed,
        }];
        store.ingest(&group, &records, &frames).expect("ingest");
    }
    let complete = Record {
        seq: Seq(mib + 1),
        time: TimeNs(mib as i64 + 1),
        kind: RecordKind::Complete {
            volume: volume.clone(),
        },
    };
    store.ingest(&group, &[complete], &[]).expect("complete");
    (store, volume)
}

fn chunk_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(16 * MIB as u64));
    group.bench_function("ingest_16mib_fsynced", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("temp dir"),
            |dir| black_box(filled_store(dir.path(), 16)),
            BatchSize::PerIteration,
        )
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, volume) = filled_store(dir.path(), 64);
    let plan = store.plan(&volume, PointInTime::Latest).expect("plan");
    group.throughput(Throughput::Bytes(64 * MIB as u64));
    group.bench_function("extents_64mib_verified", |b| {
        b.iter(|| {
            for extent in store::extents(&store, &plan, 4 * MIB) {
                black_box(extent.expect("extent"));
            }
        })
    });
    let out_dir = tempfile::tempdir().expect("temp dir");
    group.bench_function("materialise_64mib_to_file", |b| {
        b.iter(|| {
            let out = std::fs::File::create(out_dir.path().join("image")).expect("create");
            black_box(store::materialise(&store, &plan, &out).expect("materialise"))
        })
    });
    group.finish();
}

/// A store whose journal has the shape of the end-to-end history scenario: a 4 GiB volume
/// filled with 2.4 GiB of data in 1 MiB writes, then 5 rounds each rewriting 5 % of it in
/// 64 KiB writes at random places. Its records name 256 distinct chunks over and over (planning
/// looks at records only), so setting it up costs one frame instead of 2.4 GiB of compression.
fn history_store(dir: &std::path::Path) -> (Store, VolumeName, Seq) {
    const VOLUME_BLOCKS: u64 = (4 << 30) / BLOCK_SIZE as u64;
    const FILLED_BLOCKS: u64 = VOLUME_BLOCKS * 6 / 10;
    let store = Store::open(StoreConfig::new(dir)).expect("open store");
    let (group, volume) = (
        GroupName::new("g").expect("name"),
        VolumeName::new("v").expect("name"),
    );
    let meta = [VolumeMeta {
        name: volume.clone(),
        size_bytes: VOLUME_BLOCKS * BLOCK_SIZE as u64,
    }];
    store.register_group(&group, 1, &meta).expect("register");
    let data = tideline_testkit::text_bytes(7, MAX_FRAME_BLOCKS * BLOCK_SIZE);
    let hashes: Vec<ChunkHash> = data.chunks(BLOCK_SIZE).map(ChunkHash::of).collect();
    let compressed = frame::compress(&data, DEFAULT_ZSTD_LEVEL);
    let frame = [IncomingFrame {
        hashes: &hashes,
        zstd_data: &compressed,
    }];
    let mut rng_state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = move |below: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % below
    };
    let fill: Vec<(u64, u64)> = (0..FILLED_BLOCKS).step_by(256).map(|b| (b, 256)).collect();
    let round_writes = VOLUME_BLOCKS / 20 / 16;
    let rounds = (0..5 * round_writes).map(|_| (random(VOLUME_BLOCKS / 16) * 16, 16));
    // The moment restored: after the third of the five rounds (the Complete record is seq 1).
    let middle = Seq(1 + fill.len() as u64 + 3 * round_writes);
    let writes: Vec<(u64, u64)> = fill.into_iter().chain(rounds).collect();
    let mut seq = 0u64;
    let mut next_record = |kind| {
        seq += 1;
        Record {
            seq: Seq(seq),
            time: TimeNs(seq as i64),
            kind,
        }
    };
    // The volume was empty when it was registered, so its journal is complete from the start.
    let mut records = vec![next_record(RecordKind::Complete {
        volume: volume.clone(),
    })];
    for (first, count) in writes {
        records.push(next_record(RecordKind::Write {
            volume: volume.clone(),
            first: BlockNo(first),
            blocks: (first..first + count)
                .map(|b| Some(hashes[b as usize % hashes.len()]))
                .collect(),
            origin: WriteOrigin::Client,
        }));
    }
    for (i, batch) in records.chunks(4096).enumerate() {
        let frames: &[IncomingFrame] = if i == 0 { &frame } else { &[] };
        store.ingest(&group, batch, frames).expect("ingest");
    }
    (store, volume, middle)
}

fn restore_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, volume, middle) = history_store(dir.path());
    group.bench_function("plan_4gib_history_middle", |b| {
        b.iter(|| black_box(store.plan(&volume, PointInTime::Seq(middle)).expect("plan")))
    });
    group.finish();
}

criterion_group!(
    benches,
    hashing,
    compression,
    spool_append,
    chunk_store,
    restore_plan
);
criterion_main!(benches);
