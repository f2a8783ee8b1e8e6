//! Bad input, against the real processes: out-of-range NBD requests get the errors the NBD spec
//! names and the connection goes on; malformed and oversized requests cost only their own
//! connection; a damaged pack makes restore fail naming the volume and the offset; a gRPC client
//! sending bytes that do not match their hash, or resending a seq with other contents, is
//! refused and nothing is stored.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tideline_agent::nbd::proto::{CMD_READ, CMD_WRITE};
use tideline_core::ChunkHash;
use tideline_proto::v1;

use crate::harness::{self, Collector, Rig, MIB};

const SIZE: u64 = 8 * MIB;

fn errno(result: std::io::Result<()>) -> Option<i32> {
    result.expect_err("the request must fail").raw_os_error()
}

/// Reads (and discards) from a connection the server should close; true once it has (EOF or
/// reset), false if it keeps it open or keeps sending.
fn closed_by_server(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(harness::STARTUP_TIMEOUT))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MIB as usize {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => total += n,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
    false
}

/// A fresh connection still reads and writes: the agent survived.
fn agent_serves(rig: &mut Rig, offset: u64, data: &[u8]) {
    assert!(rig.agent.is_running(), "the agent died");
    let mut client = rig.agent.nbd(&rig.volume);
    client.write(offset, data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read(offset, &mut back).unwrap();
    assert!(back == data, "read back what was written");
    client.disconnect().unwrap();
}

#[test]
fn out_of_range_requests_get_spec_errors_and_the_connection_goes_on() {
    let mut rig = Rig::new("range", SIZE);
    let mut client = rig.agent.nbd(&rig.volume);
    assert_eq!(client.size_bytes(), SIZE);
    let mut buf = vec![0u8; 8192];

    assert_eq!(
        errno(client.read(SIZE - 4096, &mut buf)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(client.read(u64::MAX - 4095, &mut buf[..4096])),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(client.write(SIZE - 100, &[0x99; 4096], false)),
        Some(libc::ENOSPC)
    );
    assert_eq!(
        errno(client.write(SIZE, &[0x99; 1], false)),
        Some(libc::ENOSPC)
    );
    assert_eq!(errno(client.trim(SIZE, 4096)), Some(libc::EINVAL));
    assert_eq!(
        errno(client.write_zeroes(SIZE - 4096, 8192)),
        Some(libc::EINVAL)
    );
    // An unknown command is refused the same way.
    let cookie = client.send_request(0x7f, 0, 0, 0, &[]).unwrap();
    let reply = client.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.error), (cookie, libc::EINVAL as u32));
    // A READ longer than the advertised maximum payload: EINVAL, no data, connection goes on.
    let cookie = client.send_request(CMD_READ, 0, 0, 1 << 30, &[]).unwrap();
    let reply = client.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.error), (cookie, libc::EINVAL as u32));

    // The same connection still works, and the refused write changed nothing.
    client.read(SIZE - 8192, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a refused write left data");
    let data = harness::random_bytes(7, 64 * 1024);
    client.write(4096, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read(4096, &mut back).unwrap();
    assert!(back == data);
    client.disconnect().unwrap();

    // The journal holds exactly the write that succeeded.
    rig.wait_now();
    let restored = rig.restore_latest("restored.img");
    let image = std::fs::read(&restored).unwrap();
    assert_eq!(image.len() as u64, SIZE);
    assert!(image[4096..4096 + data.len()] == data[..]);
    assert!(image[..4096].iter().all(|&b| b == 0));
    assert!(image[4096 + data.len()..].iter().all(|&b| b == 0));
    agent_serves(&mut rig, 0, &[1; 4096]);
}

#[test]
fn malformed_and_oversized_requests_cost_only_their_connection() {
    let mut rig = Rig::new("malformed", SIZE);

    // A request header with a bad magic: the connection is dropped without a reply.
    let mut client = rig.agent.nbd(&rig.volume);
    client.stream_mut().write_all(&[0xab; 28]).unwrap();
    assert!(
        closed_by_server(client.stream_mut()),
        "a bad magic must close the connection"
    );
    agent_serves(&mut rig, 0, &[2; 4096]);

    // A WRITE header announcing 1 GiB: refused with EINVAL before any payload is read, then
    // the connection is closed (the payload cannot be skipped safely).
    let mut client = rig.agent.nbd(&rig.volume);
    let cookie = client.send_request(CMD_WRITE, 0, 0, 1 << 30, &[]).unwrap();
    let reply = client.recv_reply().unwrap();
    assert_eq!((reply.cookie, reply.error), (cookie, libc::EINVAL as u32));
    assert!(
        closed_by_server(client.stream_mut()),
        "an oversized write must close the connection"
    );
    agent_serves(&mut rig, 8192, &[3; 4096]);

    // Garbage instead of a handshake.
    let mut raw = UnixStream::connect(&rig.agent.socket).unwrap();
    raw.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = raw.write_all(&[0xff; 4096]);
    assert!(
        closed_by_server(&mut raw),
        "a bad handshake must close the connection"
    );
    agent_serves(&mut rig, 16384, &[4; 4096]);
}

/// The pack files of a collector's data directory.
fn packs(data_dir: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = std::fs::read_dir(data_dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    packs.sort();
    packs
}

/// Frames of a pack (`magic | len | crc32c | u16 n | n hashes | zstd`): (offset of the zstd
/// bytes, their length). Each batch's frames start at a block boundary, after zeros.
fn zstd_ranges(pack: &[u8]) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while at + 14 <= pack.len() {
        if pack[at..at + 4] == [0; 4] {
            at = (at + 1).next_multiple_of(4096);
            continue;
        }
        let len = u32::from_le_bytes(pack[at + 4..at + 8].try_into().unwrap()) as usize;
        let blocks = u16::from_le_bytes(pack[at + 12..at + 14].try_into().unwrap()) as usize;
        let zstd_start = at + 12 + 2 + 32 * blocks;
        let end = at + 12 + len;
        assert!(
            end <= pack.len() && zstd_start < end,
            "pack layout as documented"
        );
        ranges.push((zstd_start, end - zstd_start));
        at = end;
    }
    ranges
}

#[test]
fn flipped_byte_in_a_pack_fails_restore_naming_volume_and_offset() {
    let mut rig = Rig::new("flipped", SIZE);
    // Random data: zstd stores it as raw blocks, so a flipped byte changes one block's bytes.
    let data = harness::random_bytes(99, 4 * MIB as usize);
    let mut client = rig.agent.nbd(&rig.volume);
    client.write(MIB, &data, true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();
    let good = rig.restore_latest("good.img");
    let image = std::fs::read(&good).unwrap();
    assert!(
        image[MIB as usize..5 * MIB as usize] == data[..],
        "the restore before the damage differs from what was written"
    );

    rig.collector.kill9();
    let pack = packs(&rig.collector.data_dir).pop().expect("a pack file");
    let mut bytes = std::fs::read(&pack).unwrap();
    let frames = zstd_ranges(&bytes);
    let (start, len) = frames[frames.len() / 2];
    bytes[start + len / 2] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    rig.collector.restart();

    let out = rig.path("damaged.img");
    let output = harness::tideline(
        &rig.url(),
        &[
            "restore",
            "--volume",
            &rig.volume,
            "--latest",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        !output.success(),
        "restore from a damaged pack must fail: {output}"
    );
    assert!(
        output.stderr.contains(&rig.volume) && output.stderr.contains("offset"),
        "the error must name the volume and the offset: {output}"
    );
    assert!(!out.exists(), "a failed restore left {}", out.display());
    assert!(
        !rig.path("damaged.img.partial").exists(),
        "a failed restore left its partial file"
    );
    assert!(
        rig.collector.is_running(),
        "the collector survives a damaged pack"
    );
    println!("damaged pack: {}", output.stderr.trim());
}

/// Opens a journal stream for group g (volume v, 1 MiB) as spool 42: the sender, the replies,
/// and the Welcome.
async fn open_journal(
    collector: &Collector,
) -> (
    tokio::sync::mpsc::Sender<v1::AgentMessage>,
    tonic::Streaming<v1::CollectorMessage>,
    v1::Welcome,
) {
    let mut client = v1::ingest_client::IngestClient::connect(collector.url())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(message(v1::agent_message::Msg::Hello(v1::Hello {
        agent_id: "liar".into(),
        group: "g".into(),
        volumes: vec![v1::VolumeInfo {
            name: "v".into(),
            size_bytes: MIB,
        }],
        spool_id: 42,
        succeeds: None,
    })))
    .await
    .unwrap();
    let mut inbound = client
        .journal(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match inbound.message().await.unwrap() {
        Some(v1::CollectorMessage {
            msg: Some(v1::collector_message::Msg::Welcome(w)),
        }) => (tx, inbound, w),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The status that ends the stream; fails if the collector acknowledges anything first.
async fn refusal(inbound: &mut tonic::Streaming<v1::CollectorMessage>) -> tonic::Status {
    loop {
        match inbound.message().await {
            Ok(Some(v1::CollectorMessage {
                msg: Some(v1::collector_message::Msg::Durable(d)),
            })) => panic!("the collector acknowledged a lying batch through {}", d.seq),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => return status,
        }
    }
}

fn message(msg: v1::agent_message::Msg) -> v1::AgentMessage {
    v1::AgentMessage { msg: Some(msg) }
}

fn write_record(seq: u64, offset_bytes: u64, hash: &ChunkHash) -> v1::Record {
    v1::Record {
        seq,
        time_ns: tideline_core::TimeNs::now().0,
        kind: Some(v1::record::Kind::Write(v1::WriteRecord {
            volume: "v".into(),
            offset_bytes,
            block_hashes: vec![hash.0.to_vec().into()],
            resync: false,
        })),
    }
}

#[test]
fn grpc_chunk_not_matching_its_hash_is_refused_and_nothing_stored() {
    use v1::agent_message::Msg;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path());
    let before = collector.stats();

    let honest = vec![0x11u8; 4096];
    let claimed = vec![0x22u8; 4096];
    let sent = vec![0x33u8; 4096];
    let (honest_hash, claimed_hash) = (ChunkHash::of(&honest), ChunkHash::of(&claimed));

    let status = harness::block_on(async {
        let (tx, mut inbound, welcome) = open_journal(&collector).await;
        assert_eq!(welcome.durable_seq, 0);
        // One honest frame and one whose bytes are not what its hash names.
        let batch = v1::Batch {
            records: vec![
                write_record(1, 0, &honest_hash),
                write_record(2, 4096, &claimed_hash),
            ],
            frames: vec![
                v1::Frame {
                    hashes: vec![honest_hash.0.to_vec().into()],
                    zstd_data: zstd::bulk::compress(&honest, 3).unwrap().into(),
                },
                v1::Frame {
                    hashes: vec![claimed_hash.0.to_vec().into()],
                    zstd_data: zstd::bulk::compress(&sent, 3).unwrap().into(),
                },
            ],
        };
        tx.send(message(Msg::Batch(batch))).await.unwrap();
        refusal(&mut inbound).await
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    println!("lying client refused: {}", status.message());

    let after = collector.stats();
    assert_eq!(after.chunk_count, before.chunk_count, "chunks were stored");
    assert_eq!(
        after.stored_bytes, before.stored_bytes,
        "chunk bytes were stored"
    );
    let v = collector
        .volume("v")
        .expect("the volume was registered by Hello");
    assert_eq!(v.durable_seq, 0, "records of the refused batch were stored");
    assert!(!v.complete);
}

/// A spool that lost shipped records to a power loss hands their seqs to new writes. The
/// collector names its newest record in Welcome so an agent can tell, and a resend that is not
/// the record it holds is refused, not skipped.
#[test]
fn grpc_resend_with_other_contents_is_refused_and_welcome_names_the_newest_record() {
    use v1::agent_message::Msg;
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path());
    let data = vec![0x11u8; 4096];
    let hash = ChunkHash::of(&data);
    let first = write_record(1, 0, &hash);

    let (welcome, status) = harness::block_on(async {
        let (tx, mut inbound, _) = open_journal(&collector).await;
        let batch = v1::Batch {
            records: vec![first.clone()],
            frames: vec![v1::Frame {
                hashes: vec![hash.0.to_vec().into()],
                zstd_data: zstd::bulk::compress(&data, 3).unwrap().into(),
            }],
        };
        tx.send(message(Msg::Batch(batch))).await.unwrap();
        loop {
            match inbound.message().await.unwrap() {
                Some(v1::CollectorMessage {
                    msg: Some(v1::collector_message::Msg::Durable(d)),
                }) if d.seq == 1 => break,
                Some(_) => continue,
                None => panic!("the stream ended before seq 1 was durable"),
            }
        }
        drop((tx, inbound));

        let (tx, mut inbound, welcome) = open_journal(&collector).await;
        let mut other = first.clone();
        other.time_ns += 1;
        let resend = v1::Batch {
            records: vec![other],
            frames: Vec::new(),
        };
        tx.send(message(Msg::Batch(resend))).await.unwrap();
        (welcome, refusal(&mut inbound).await)
    });
    assert_eq!(welcome.durable_seq, 1);
    assert_eq!(
        welcome.durable_record,
        Some(first),
        "the newest record, as sent"
    );
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("resent it with other contents")
            && status.message().contains("power loss"),
        "{}",
        status.message()
    );
    println!("differing resend refused: {}", status.message());
    let v = collector.volume("v").unwrap();
    assert_eq!(v.durable_seq, 1, "the refused resend changed the journal");
}
