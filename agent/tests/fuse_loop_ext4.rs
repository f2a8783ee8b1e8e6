//! Acceptance tests of the FUSE export with real kernel parts: `/dev/fuse`, loop devices, ext4.
//!
//! - `ext4_on_loop_on_fuse_restores_every_moment`: a collector and an agent run in-process; the
//!   agent exports a volume over FUSE; the test puts ext4 on a loop device on that file, creates,
//!   modifies and deletes files with fsync at four moments, and restores the volume at each
//!   moment through the Catalog `Restore` RPC. Every moment is checked twice: at a crash-
//!   consistent point taken right after the fsyncs (the restored image's ext4 journal is replayed
//!   on the copy) and at a quiesced point taken inside `fsfreeze` (checked as is). Each image
//!   passes `e2fsck -fn` and, mounted `ro,noload`, holds exactly the files and contents of that
//!   moment. Stopping the agent unmounts the export.
//! - `sigterm_unmounts`, `sigkill_then_documented_recovery`: the real `tideline-agent` binary.
//!
//! These need root, `/dev/fuse` and loop devices. Without them a test prints a loud `SKIPPED:`
//! line on stderr and passes, except under `CI=true`, where it fails. Every wait is bounded
//! (polling a condition against a deadline); loop devices, mounts and frozen filesystems are
//! released by guards even when a test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use tideline_agent::config::AgentArgs;
use tideline_collector::config::CollectorConfig;
use tideline_core::TimeNs;
use tideline_proto::v1::{self, restore_message::Msg};
use tideline_testkit::noise_bytes;

mod common;
use common::{is_mounted, run_agent, volume_image, MIB, VOLUME_BYTES};
/// Bound for things that take well under a second on an idle machine (it may be compiling).
const SHORT: Duration = Duration::from_secs(60);
/// How long a test waits for the collector's graceful shutdown before aborting it.
const COLLECTOR_STOP: Duration = Duration::from_secs(2);

// ---- helpers --------------------------------------------------------------------------------

use tideline_testkit::kernel::{require_kernel_parts as kernel_parts, LoopDevice, Mounted};
use tideline_testkit::{run, run_ok, tool, wait_for};

/// Waits (bounded) for a child's exit.
fn wait_child(mut child: Child, timeout: Duration, what: &str) -> ExitStatus {
    wait_for(what, timeout, || child.try_wait().expect("poll child"))
}

// ---- guards -----------------------------------------------------------------------------------

/// `fsfreeze -f`; `fsfreeze -u` on drop, so a failing test never leaves a frozen filesystem.
struct Frozen<'a>(&'a Path);

impl<'a> Frozen<'a> {
    fn freeze(dir: &'a Path) -> Frozen<'a> {
        run_ok(Command::new(tool("fsfreeze")).arg("-f").arg(dir));
        Frozen(dir)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let out = run(Command::new(tool("fsfreeze")).arg("-u").arg(self.0));
        if !out.status.success() {
            eprintln!("fsfreeze -u {} failed: {}", self.0.display(), out.text());
        }
    }
}

/// A collector and (optionally) an agent running in-process on one tokio runtime.
struct Services {
    rt: tokio::runtime::Runtime,
    collector_url: String,
    collector_stop: Option<tokio::sync::oneshot::Sender<()>>,
    collector: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    agent_stop: Option<tokio::sync::oneshot::Sender<()>>,
    agent: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Services {
    fn start_collector(data_dir: &Path) -> Services {
        tideline_testkit::init_tracing("warn,fuser=error");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind collector listener");
        let addr = listener.local_addr().expect("collector address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let collector = rt.spawn(tideline_collector::run(
            CollectorConfig::new(data_dir),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        Services {
            rt,
            collector_url: format!("http://{addr}"),
            collector_stop: Some(stop),
            collector: Some(collector),
            agent_stop: None,
            agent: None,
        }
    }

    fn start_agent(&mut self, args: &[String]) {
        let mut argv = vec![
            "tideline-agent".to_owned(),
            format!("--collector={}", self.collector_url),
        ];
        argv.extend(args.iter().cloned());
        let config = AgentArgs::parse_from(argv)
            .resolve()
            .expect("agent configuration");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        self.agent = Some(self.rt.spawn(tideline_agent::run(
            config,
            tideline_agent::Listeners::default(),
            async {
                let _ = stopped.await;
            },
        )));
        self.agent_stop = Some(stop);
    }

    /// Stops the agent and returns what `run` returned.
    fn stop_agent(&mut self) -> anyhow::Result<()> {
        let Some(agent) = self.agent.take() else {
            return Ok(());
        };
        if let Some(stop) = self.agent_stop.take() {
            let _ = stop.send(());
        }
        self.rt
            .block_on(async { tokio::time::timeout(SHORT, agent).await })
            .map_err(|_| anyhow::anyhow!("agent did not stop within {SHORT:?}"))?
            .map_err(|e| anyhow::anyhow!("agent task: {e}"))?
    }

    /// Panics if the agent's `run` already returned (with its error).
    fn assert_agent_running(&mut self) {
        if self.agent.as_ref().is_some_and(|a| a.is_finished()) {
            let result = self.stop_agent();
            panic!("the agent stopped early: {result:?}");
        }
    }

    fn catalog(&self) -> v1::catalog_client::CatalogClient<tonic::transport::Channel> {
        let url = self.collector_url.clone();
        self.rt.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .expect("collector URL")
                .connect()
                .await
                .expect("connect to the collector");
            v1::catalog_client::CatalogClient::new(channel).max_decoding_message_size(96 << 20)
        })
    }

    /// Waits (bounded) until the collector holds every record of `volume` stamped at or
    /// before `at`.
    fn wait_durable(&self, volume: &str, at: TimeNs) {
        let mut client = self.catalog();
        let response = self
            .rt
            .block_on(client.wait_durable(v1::WaitDurableRequest {
                volume: volume.to_owned(),
                until_time_ns: at.0,
                timeout_ms: 120_000,
            }))
            .expect("WaitDurable")
            .into_inner();
        assert!(
            response.reached,
            "{volume} not durable through {} within 120 s (durable through {})",
            at.0, response.durable_time_ns
        );
    }

    /// Restores `volume` as of `at` into `out` through the Catalog Restore RPC, as plain
    /// extents (the form a tool of a user's own would ask for; the CLI asks for frames).
    fn restore(&self, volume: &str, at: TimeNs, out: &Path) {
        let mut client = self.catalog();
        let file = File::create(out).expect("create restored image");
        self.rt.block_on(async {
            let mut stream = client
                .restore(v1::RestoreRequest {
                    volume: volume.to_owned(),
                    point: Some(v1::restore_request::Point::AtTimeNs(at.0)),
                    frames: false,
                    data_extents: false,
                })
                .await
                .unwrap_or_else(|s| panic!("restore {volume} at {}: {}", at.0, s.message()))
                .into_inner();
            let header = match stream.message().await {
                Ok(Some(v1::RestoreMessage {
                    msg: Some(Msg::Header(h)),
                })) => h,
                other => panic!("no restore header: {other:?}"),
            };
            assert_eq!(header.size_bytes, VOLUME_BYTES);
            while let Some(message) = stream.message().await.expect("restore stream") {
                match message.msg {
                    Some(Msg::Extent(e)) => file
                        .write_all_at(&e.data, e.offset_bytes)
                        .expect("write restored extent"),
                    other => panic!("unexpected restore message {other:?}"),
                }
            }
            file.set_len(header.size_bytes)
                .expect("size restored image");
        });
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        if let Err(e) = self.stop_agent() {
            eprintln!("stopping the agent: {e:#}");
        }
        if let Some(stop) = self.collector_stop.take() {
            let _ = stop.send(());
        }
        if let Some(collector) = self.collector.take() {
            // Graceful shutdown waits for open journal streams; the test does not depend on it.
            let abort = collector.abort_handle();
            let stopped = self
                .rt
                .block_on(async { tokio::time::timeout(COLLECTOR_STOP, collector).await });
            if stopped.is_err() {
                eprintln!("collector did not stop within {COLLECTOR_STOP:?} (a stream still open); aborting it");
                abort.abort();
            }
        }
    }
}

/// The real agent binary as a child process: SIGKILL and a lazy unmount of its FUSE file on
/// drop, so a failing test leaves no dead mount behind.
struct AgentProcess {
    child: Option<Child>,
    fuse_file: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    fn start(
        volume: &str,
        image: &Path,
        fuse_file: &Path,
        spool: &Path,
        collector: &str,
        log: &Path,
    ) -> AgentProcess {
        let log_file = File::create(log).expect("create agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_tideline-agent"))
            .arg(format!(
                "--volume={volume}={},fuse={}",
                image.display(),
                fuse_file.display()
            ))
            .arg(format!("--spool-dir={}", spool.display()))
            .arg(format!("--collector={collector}"))
            .env("RUST_LOG", "info,fuser=warn")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone log handle"))
            .stderr(log_file)
            .spawn()
            .expect("start tideline-agent");
        AgentProcess {
            child: Some(child),
            fuse_file: fuse_file.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_mounted(&mut self) {
        let file = self.fuse_file.clone();
        let child = self.child.as_mut().expect("agent child");
        wait_for("the FUSE export or the agent's exit", SHORT, || {
            (is_mounted(&file) || child.try_wait().ok().flatten().is_some()).then_some(())
        });
        assert!(
            is_mounted(&file),
            "{} was not mounted; agent log:\n{}",
            file.display(),
            self.log()
        );
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().expect("agent child").id();
        // SAFETY: kill only reads its integer arguments; the pid is our own child, not reaped.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.take().expect("agent child");
        wait_child(child, SHORT, "tideline-agent")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.fuse_file) {
            let _ = run(Command::new(tool("umount")).arg("-l").arg(&self.fuse_file));
        }
    }
}

// ---- file-tree model ---------------------------------------------------------------------------

/// The files (path -> contents) and directories of the test filesystem, kept in step with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tree {
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
}

fn fsync_dir(dir: &Path) {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync directory {}: {e}", dir.display()));
}

/// Applies changes to the mounted filesystem and to the model, fsyncing each file and the
/// directories whose entries changed.
struct Writer<'a> {
    root: &'a Path,
    tree: Tree,
}

impl Writer<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn parent_of(&self, rel: &str) -> PathBuf {
        self.path(rel).parent().expect("parent").to_path_buf()
    }

    fn mkdir(&mut self, rel: &str) {
        std::fs::create_dir(self.path(rel)).expect("mkdir");
        fsync_dir(&self.parent_of(rel));
        self.tree.dirs.insert(rel.to_owned());
    }

    fn write(&mut self, rel: &str, data: &[u8]) {
        let path = self.path(rel);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create file");
        file.write_all_at(data, 0).expect("write file");
        file.sync_all().expect("fsync file");
        fsync_dir(&self.parent_of(rel));
        self.tree.files.insert(rel.to_owned(), data.to_vec());
    }

    fn append(&mut self, rel: &str, data: &[u8]) {
        let file = OpenOptions::new()
            .append(true)
            .open(self.path(rel))
            .expect("open for append");
        std::io::Write::write_all(&mut &file, data).expect("append");
        file.sync_all().expect("fsync file");
        self.tree
            .files
            .get_mut(rel)
            .expect("known file")
            .extend_from_slice(data);
    }

    fn overwrite_at(&mut self, rel: &str, offset: usize, data: &[u8]) {
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(rel))
            .expect("open for write");
        file.write_all_at(data, offset as u64).expect("pwrite");
        file.sync_all().expect("fsync file");
        let model = self.tree.files.get_mut(rel).expect("known file");
        model[offset..offset + data.len()].copy_from_slice(data);
    }

    fn truncate(&mut self, rel: &str, len: usize) {
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(rel))
            .expect("open for truncate");
        file.set_len(len as u64).expect("truncate");
        file.sync_all().expect("fsync file");
        self.tree
            .files
            .get_mut(rel)
            .expect("known file")
            .truncate(len);
    }

    fn remove(&mut self, rel: &str) {
        std::fs::remove_file(self.path(rel)).expect("unlink");
        fsync_dir(&self.parent_of(rel));
        self.tree.files.remove(rel);
    }

    fn rename(&mut self, from: &str, to: &str) {
        std::fs::rename(self.path(from), self.path(to)).expect("rename");
        fsync_dir(&self.parent_of(from));
        fsync_dir(&self.parent_of(to));
        let data = self.tree.files.remove(from).expect("known file");
        self.tree.files.insert(to.to_owned(), data);
    }
}

/// What a mounted filesystem holds (lost+found aside).
fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read directory")
            .map(|e| e.expect("directory entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if rel == "lost+found" {
                continue;
            }
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                tree.dirs.insert(rel);
                walk(root, &path, tree);
            } else {
                assert!(kind.is_file(), "{rel} is neither a file nor a directory");
                tree.files
                    .insert(rel, std::fs::read(&path).expect("read restored file"));
            }
        }
    }
    let mut tree = Tree::default();
    walk(root, root, &mut tree);
    tree
}

fn describe(tree: &Tree) -> String {
    let files: Vec<String> = tree
        .files
        .iter()
        .map(|(k, v)| format!("{k} ({} bytes, fnv {})", v.len(), fnv_hex(v)))
        .collect();
    format!("dirs {:?}, files {files:?}", tree.dirs)
}

/// FNV-1a of the contents, to tell files apart in failure messages.
fn fnv_hex(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// One recorded moment: the expected tree, a crash-consistent point right after the fsyncs
/// and a quiesced point inside a freeze.
struct Moment {
    label: &'static str,
    crash_point: TimeNs,
    frozen_point: TimeNs,
    tree: Tree,
}

/// Checks a restored image: ext4 journal replayed first if asked (a crash-consistent point),
/// then `e2fsck -fn` exits 0, then mounted `ro,noload` it holds exactly `expected`.
fn check_image(image: &Path, mount_dir: &Path, expected: &Tree, replay_journal: bool, what: &str) {
    if replay_journal {
        let out = run(Command::new(tool("e2fsck"))
            .args(["-E", "journal_only", "-y"])
            .arg(image));
        assert!(
            matches!(out.code(), Some(0 | 1)),
            "{what}: journal replay failed ({}): {}",
            out.status,
            out.text()
        );
    }
    let fsck = run(Command::new(tool("e2fsck")).arg("-fn").arg(image));
    assert_eq!(
        fsck.code(),
        Some(0),
        "{what}: e2fsck -fn failed ({}):\n{}",
        fsck.status,
        fsck.text()
    );
    let mut mounted = Mounted::mount(&["-o", "loop,ro,noload"], image, mount_dir);
    let got = read_tree(mount_dir);
    mounted.unmount();
    assert!(
        got == *expected,
        "{what}: restored tree differs\n  expected {}\n  restored {}",
        describe(expected),
        describe(&got)
    );
}

// ---- the acceptance test -----------------------------------------------------------------------

#[test]
fn ext4_on_loop_on_fuse_restores_every_moment() {
    if !kernel_parts(&[
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "umount",
        "fsfreeze",
        "fstrim",
    ]) {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = volume_image(dir.path());
    let fuse_file = dir.path().join("volume.fuse");
    let mut services = Services::start_collector(&dir.path().join("collector"));
    services.start_agent(&[
        format!(
            "--volume=vol={},fuse={}",
            image.display(),
            fuse_file.display()
        ),
        format!("--spool-dir={}", dir.path().join("spool").display()),
    ]);
    wait_for("the FUSE export or the agent's exit", SHORT, || {
        (services.agent.as_ref().is_some_and(|a| a.is_finished()) || is_mounted(&fuse_file))
            .then_some(())
    });
    services.assert_agent_running();
    let meta = std::fs::metadata(&fuse_file).expect("stat FUSE file");
    assert!(meta.is_file());
    assert_eq!(meta.len(), VOLUME_BYTES);

    let mut moments = Vec::new();
    let direct_io = {
        let loop_dev = LoopDevice::attach(&fuse_file);
        run_ok(
            Command::new(tool("mkfs.ext4"))
                .arg("-q")
                .arg(&loop_dev.device),
        );
        let mnt = dir.path().join("mnt");
        let mut fs = Mounted::mount(&[], &loop_dev.device, &mnt);
        let mut w = Writer {
            root: &mnt,
            tree: Tree::default(),
        };
        let mut record = |w: &Writer<'_>, label: &'static str| {
            // Every change above was fsynced: a crash at this instant loses none of it.
            let crash_point = TimeNs::now();
            let frozen_point = {
                let _frozen = Frozen::freeze(&mnt);
                // Frozen: the journal is checkpointed and nothing reaches the device. Flush it
                // anyway, as a filesystem would: FUSE_FSYNC -> a journalled flush point.
                loop_dev.flush();
                TimeNs::now()
            };
            moments.push(Moment {
                label,
                crash_point,
                frozen_point,
                tree: w.tree.clone(),
            });
        };

        // Moment 1: create.
        w.write("a.txt", b"alpha, version 1\n");
        w.write("b.bin", &noise_bytes(1, 300_000));
        w.mkdir("docs");
        w.write("docs/c.txt", b"charlie\n");
        eprintln!("[{:.1?}] mkfs and mount done", started.elapsed());
        record(&w, "1: created a.txt, b.bin, docs/c.txt");

        // Moment 2: modify, grow, add a larger file.
        w.write(
            "a.txt",
            b"alpha, version 2: rewritten and longer than before\n",
        );
        w.append("b.bin", &noise_bytes(2, 100_000));
        w.write("docs/d.bin", &noise_bytes(3, MIB as usize + 17));
        record(&w, "2: rewrote a.txt, appended to b.bin, added docs/d.bin");

        // Moment 3: delete, rename, overwrite in place, and discard the freed blocks (fstrim
        // reaches the export as fallocate(PUNCH_HOLE), journalled as trims).
        w.remove("b.bin");
        w.rename("docs/c.txt", "c-renamed.txt");
        w.overwrite_at("docs/d.bin", 500_000, &noise_bytes(4, 4096));
        run_ok(Command::new(tool("fstrim")).arg(&mnt));
        record(
            &w,
            "3: deleted b.bin, renamed docs/c.txt, patched docs/d.bin, fstrim",
        );

        // Moment 4: big file, truncate, delete, empty directory.
        w.write("big.bin", &noise_bytes(5, 3 * MIB as usize));
        w.truncate("docs/d.bin", 10_000);
        w.remove("a.txt");
        w.mkdir("empty");
        record(
            &w,
            "4: added big.bin, truncated docs/d.bin, deleted a.txt, made empty/",
        );

        // The live filesystem holds the last moment too.
        assert_eq!(
            read_tree(&mnt),
            w.tree,
            "live filesystem differs from the model"
        );
        fs.unmount();
        let direct_io = loop_dev.direct_io;
        drop(loop_dev);
        services.assert_agent_running();
        direct_io
    };

    // Everything up to the last moment reaches the collector; then stopping the agent unmounts
    // the export.
    let last = moments.last().expect("moments").frozen_point;
    eprintln!("[{:.1?}] moments recorded", started.elapsed());
    services.wait_durable("vol", last);
    eprintln!("[{:.1?}] durable at the collector", started.elapsed());
    services
        .stop_agent()
        .expect("agent run() returned an error");
    assert!(
        !is_mounted(&fuse_file),
        "agent stopped but {} is still mounted",
        fuse_file.display()
    );

    let check_dir = dir.path().join("check");
    for (i, moment) in moments.iter().enumerate() {
        for (point, replay, kind) in [
            (moment.frozen_point, false, "quiesced"),
            (moment.crash_point, true, "crash-consistent"),
        ] {
            let what = format!("moment {} ({kind})", moment.label);
            let restored = dir.path().join(format!("restored-{i}-{kind}.img"));
            services.restore("vol", point, &restored);
            check_image(&restored, &check_dir, &moment.tree, replay, &what);
            std::fs::remove_file(&restored).expect("remove restored image");
            eprintln!("[{:.1?}] ok: {what}", started.elapsed());
        }
    }
    eprintln!(
        "all {} moments restored exactly (loop direct I/O {})",
        moments.len(),
        if direct_io {
            "on"
        } else {
            "off: losetup fell back to buffered I/O"
        }
    );
}

// ---- the real binary ---------------------------------------------------------------------------

#[test]
fn sigterm_unmounts() {
    if !kernel_parts(&["mount", "umount"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = volume_image(dir.path());
    let file = dir.path().join("export");
    // No collector: the agent journals into its spool and retries meanwhile.
    let mut agent = AgentProcess::start(
        "v",
        &image,
        &file,
        &dir.path().join("spool"),
        "http://127.0.0.1:1",
        &dir.path().join("agent.log"),
    );
    agent.wait_mounted();
    let export = OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open export");
    export
        .write_all_at(&noise_bytes(9, 8192), 4096)
        .expect("write through FUSE");
    export.sync_all().expect("fsync through FUSE");
    drop(export);
    let on_disk = std::fs::read(&image).expect("read volume");
    assert_eq!(&on_disk[4096..12288], &noise_bytes(9, 8192)[..]);

    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit();
    assert!(
        status.success(),
        "agent exit {status}; log:\n{}",
        agent.log()
    );
    assert!(
        !is_mounted(&file),
        "{} still mounted after SIGTERM",
        file.display()
    );
    assert!(
        agent.log().contains("FUSE export unmounted"),
        "{}",
        agent.log()
    );
}

#[test]
fn sigkill_then_documented_recovery() {
    if !kernel_parts(&["losetup", "mkfs.ext4", "e2fsck", "mount", "umount"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = volume_image(dir.path());
    let file = dir.path().join("export");
    let spool = dir.path().join("spool");
    let services = Services::start_collector(&dir.path().join("collector"));
    let url = services.collector_url.clone();
    let start = |log: &str| {
        let mut agent =
            AgentProcess::start("vol", &image, &file, &spool, &url, &dir.path().join(log));
        agent.wait_mounted();
        agent
    };
    let mnt = dir.path().join("mnt");
    let flushed = noise_bytes(11, 200_000);

    let mut agent = start("agent-1.log");
    let flushed_at = {
        let loop_dev = LoopDevice::attach(&file);
        run_ok(
            Command::new(tool("mkfs.ext4"))
                .arg("-q")
                .arg(&loop_dev.device),
        );
        let mut fs = Mounted::mount(&[], &loop_dev.device, &mnt);
        let mut w = Writer {
            root: &mnt,
            tree: Tree::default(),
        };
        w.write("flushed.bin", &flushed);
        let flushed_at = TimeNs::now();

        // Killed while loop-mounted: the FUSE file is now a dead mount.
        agent.signal(libc::SIGKILL);
        agent.wait_exit();
        let dead = std::fs::metadata(&file).expect_err("stat a dead FUSE mount");
        assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");

        // A new agent refuses the stale mount point, naming the way out.
        let refused = run_agent("vol", &image, &file, &spool, &url);
        assert!(!refused.status.success());
        assert!(
            refused.text().contains("is already a mount point"),
            "{}",
            refused.text()
        );

        // The documented recovery: 1. umount the filesystem (lazily if it will not go),
        // 2. losetup -d, and wait until no loop device uses FILE (the kernel lets go once
        // nothing has the device open), 3. umount FILE.
        fs.disown();
        if !run(Command::new(tool("umount")).arg(&mnt)).status.success() {
            run_ok(Command::new(tool("umount")).arg("-l").arg(&mnt));
        }
        drop(loop_dev);
        wait_for("no loop device on FILE", SHORT, || {
            let users = run_ok(Command::new(tool("losetup")).arg("-j").arg(&file));
            users.trim().is_empty().then_some(())
        });
        run_ok(Command::new(tool("umount")).arg(&file));
        assert!(!is_mounted(&file));
        flushed_at
    };

    // 4. Restart the agent: the export comes back and protection resumes.
    let mut agent = start("agent-2.log");
    {
        // 5. losetup, mount (ext4 replays its journal): the flushed file is intact.
        let loop_dev = LoopDevice::attach(&file);
        let out = run(Command::new(tool("e2fsck"))
            .arg("-fy")
            .arg(&loop_dev.device));
        assert!(
            matches!(out.code(), Some(0 | 1)),
            "e2fsck after recovery: {}",
            out.text()
        );
        let mut fs = Mounted::mount(&[], &loop_dev.device, &mnt);
        assert_eq!(
            std::fs::read(mnt.join("flushed.bin")).expect("read flushed file"),
            flushed
        );
        let mut w = Writer {
            root: &mnt,
            tree: read_tree(&mnt),
        };
        w.write("after.txt", b"written after the recovery\n");
        let after_at = TimeNs::now();
        let expected = w.tree.clone();
        fs.unmount();
        drop(loop_dev);

        // The collector holds both: the flushed write from before the kill, and the new one.
        services.wait_durable("vol", after_at);
        let restored = dir.path().join("restored.img");
        services.restore("vol", flushed_at, &restored);
        let mut before = Tree::default();
        before.files.insert("flushed.bin".into(), flushed.clone());
        check_image(
            &restored,
            &dir.path().join("check"),
            &before,
            true,
            "before the kill",
        );
        std::fs::remove_file(&restored).expect("remove restored image");
        services.restore("vol", after_at, &restored);
        check_image(
            &restored,
            &dir.path().join("check"),
            &expected,
            true,
            "after the recovery",
        );
    }
    agent.signal(libc::SIGTERM);
    let status = agent.wait_exit();
    assert!(
        status.success(),
        "agent exit {status}; log:\n{}",
        agent.log()
    );
    assert!(!is_mounted(&file));
}
