//! Conformance tests for the agent's NBD server.
//!
//! The server runs in-process (tokio runtime, Unix socket in a temp dir plus TCP on 127.0.0.1:0)
//! over a file-backed export, and is driven by the real clients people will point at it —
//! `qemu-io`, `qemu-img`, `nbdinfo`, `nbdcopy` — and by [`NbdClient`] for the malformed,
//! pipelined and out-of-order cases no real client will send.
//!
//! A missing tool skips its test with a loud `SKIPPED:` line on stderr, except when `CI=true`,
//! where it fails. Every wait is bounded; nothing sleeps for a fixed time.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tideline_agent::nbd::proto::*;
use tideline_agent::nbd::{BlockExport, NbdClient, NbdLimits, NbdServer};

const MIB: u64 = 1024 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---- a file-backed export ----------------------------------------------------------------------

/// pread/pwrite on a sparse file; PUNCH_HOLE for trim; SEEK_DATA/SEEK_HOLE for block status.
struct FileExport {
    file: File,
    size: u64,
}

impl FileExport {
    fn create(path: &Path, size: u64) -> Arc<FileExport> {
        let file = tideline_testkit::sized_file(path, size);
        Arc::new(FileExport { file, size })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (to_off(offset)?, to_off(len)?);
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek only reads its integer arguments. It moves the shared file position,
        // which nothing here uses (all I/O is positional).
        let pos = unsafe { libc::lseek(self.file.as_raw_fd(), to_off(offset)?, whence) };
        if pos >= 0 {
            return Ok(Some(pos as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    }

    fn sync_if(&self, fua: bool) -> io::Result<()> {
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl BlockExport for FileExport {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset_bytes)
    }

    fn write(&self, offset_bytes: u64, data: bytes::Bytes, fua: bool) -> io::Result<()> {
        self.file.write_all_at(&data, offset_bytes)?;
        self.sync_if(fua)
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate(mode, offset_bytes, len_bytes)?;
        self.sync_if(fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> io::Result<()> {
        if may_punch {
            return self.trim(offset, len, fua);
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if let Err(err) = self.fallocate(mode, offset, len) {
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
            let zeroes = vec![0u8; len as usize];
            self.file.write_all_at(&zeroes, offset)?;
        }
        self.sync_if(fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<Vec<(u64, bool)>> {
        let end = offset_bytes + len_bytes;
        let mut runs = Vec::new();
        let mut pos = offset_bytes;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            if data > pos {
                runs.push((data - pos, true));
            }
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            runs.push((hole - data, false));
            pos = hole;
        }
        Ok(runs)
    }
}

/// Wraps an export so reads at `GATE_OFFSET` block until the test opens the gate.
struct GatedExport {
    inner: Arc<FileExport>,
    state: Mutex<Gate>,
    changed: Condvar,
}

#[derive(Default)]
struct Gate {
    entered: u32,
    open: bool,
}

const GATE_OFFSET: u64 = 0;

impl GatedExport {
    fn new(inner: Arc<FileExport>) -> Arc<GatedExport> {
        Arc::new(GatedExport {
            inner,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    fn wait_entered(&self, count: u32) {
        let state = self.state.lock().expect("gate lock");
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, IO_TIMEOUT, |g| g.entered < count)
            .expect("gate lock");
        assert!(
            !timeout.timed_out(),
            "request never reached the export ({} entered)",
            state.entered
        );
    }

    fn open(&self) {
        self.state.lock().expect("gate lock").open = true;
        self.changed.notify_all();
    }

    /// A request at [`GATE_OFFSET`] waits here until the gate opens.
    fn pass_gate(&self, offset_bytes: u64) -> io::Result<()> {
        if offset_bytes != GATE_OFFSET {
            return Ok(());
        }
        let mut state = self.state.lock().expect("gate lock");
        state.entered += 1;
        self.changed.notify_all();
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, IO_TIMEOUT, |g| !g.open)
            .expect("gate lock");
        drop(state);
        match timeout.timed_out() {
            true => Err(io::Error::other("gate never opened")),
            false => Ok(()),
        }
    }
}

impl BlockExport for GatedExport {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.pass_gate(offset_bytes)?;
        self.inner.read(offset_bytes, buf)
    }

    fn write(&self, offset_bytes: u64, data: bytes::Bytes, fua: bool) -> io::Result<()> {
        self.pass_gate(offset_bytes)?;
        self.inner.write(offset_bytes, data, fua)
    }

    fn change_waits_on_disk(&self, offset_bytes: u64, _len_bytes: u64) -> bool {
        offset_bytes == GATE_OFFSET
    }

    fn trim(&self, offset_bytes: u64, len_bytes: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset_bytes, len_bytes, fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_punch: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, fua, may_punch)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Every call fails, each with a different error, to check the errno mapping.
struct FailingExport;

impl BlockExport for FailingExport {
    fn size_bytes(&self) -> u64 {
        MIB
    }
    fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
        Err(io::Error::other("disk on fire"))
    }
    fn write(&self, offset: u64, _: bytes::Bytes, _: bool) -> io::Result<()> {
        if offset == 4096 {
            panic!("write exploded")
        }
        Err(io::Error::from_raw_os_error(libc::EDQUOT))
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io::ErrorKind::PermissionDenied.into())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn flush(&self) -> io::Result<()> {
        panic!("flush exploded")
    }
}

struct ReadOnlyExport(Arc<FileExport>);

impl BlockExport for ReadOnlyExport {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
    fn read(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read(offset_bytes, buf)
    }
    fn write(&self, _: u64, _: bytes::Bytes, _: bool) -> io::Result<()> {
        unreachable!("the server must refuse writes to a read-only export")
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        unreachable!("the server must refuse trims on a read-only export")
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        unreachable!("the server must refuse zeroing on a read-only export")
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        true
    }
    fn description(&self) -> Option<String> {
        Some("a read-only test volume".to_owned())
    }
}

// ---- the server under test ---------------------------------------------------------------------

struct TestServer {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    sock: PathBuf,
    tcp: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<io::Result<()>>>,
}

impl TestServer {
    fn start(exports: Vec<(&str, Arc<dyn BlockExport>)>) -> TestServer {
        TestServer::start_in(tempfile::tempdir().expect("temp dir"), exports)
    }

    fn start_in(dir: tempfile::TempDir, exports: Vec<(&str, Arc<dyn BlockExport>)>) -> TestServer {
        TestServer::start_with(dir, exports, NbdLimits::default())
    }

    fn start_with(
        dir: tempfile::TempDir,
        exports: Vec<(&str, Arc<dyn BlockExport>)>,
        limits: NbdLimits,
    ) -> TestServer {
        tideline_testkit::init_tracing("warn");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let exports = exports
            .into_iter()
            .map(|(n, e)| (n.to_owned(), e))
            .collect();
        let server = Arc::new(NbdServer::with_limits(exports, limits).expect("limits"));
        let sock = dir.path().join("nbd.sock");
        let (unix, tcp) = rt.block_on(async {
            let unix = tokio::net::UnixListener::bind(&sock).expect("bind unix socket");
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind tcp");
            (unix, tcp)
        });
        let tcp_addr = tcp.local_addr().expect("tcp address");
        let (stop, rx) = tokio::sync::watch::channel(false);
        let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let tasks = vec![
            rt.spawn(server.clone().serve_unix(unix, signal(rx.clone()))),
            rt.spawn(server.serve_tcp(tcp, signal(rx))),
        ];
        TestServer {
            rt,
            dir,
            sock,
            tcp: tcp_addr,
            stop,
            tasks,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn client(&self, export: &str) -> NbdClient<UnixStream> {
        let client = NbdClient::connect_unix(&self.sock, export).expect("connect");
        with_timeouts(client)
    }

    /// Signals shutdown and waits (bounded) for both accept loops to return.
    fn shutdown(&mut self) {
        self.stop.send_replace(true);
        for task in self.tasks.drain(..) {
            let joined = self
                .rt
                .block_on(async { tokio::time::timeout(IO_TIMEOUT, task).await });
            let result = joined
                .expect("server did not shut down in time")
                .expect("server task");
            result.expect("server returned an error");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.shutdown();
        }
    }
}

fn with_timeouts(mut client: NbdClient<UnixStream>) -> NbdClient<UnixStream> {
    let stream = client.stream_mut();
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    client
}

fn file_export(server_dir: &Path, name: &str, size: u64) -> Arc<FileExport> {
    FileExport::create(&server_dir.join(name), size)
}

// ---- external tools ----------------------------------------------------------------------------

use tideline_testkit::require_tools as tools_available;

/// Runs a tool with the shared time limit; the child is killed if it overruns.
fn run(program: &str, args: &[&str]) -> tideline_testkit::Output {
    tideline_testkit::run(Command::new(tideline_testkit::tool(program)).args(args))
}

/// Runs a tool that must succeed; returns its stdout.
fn run_ok(program: &str, args: &[&str]) -> String {
    tideline_testkit::run_ok(Command::new(tideline_testkit::tool(program)).args(args))
}

/// `qemu-io -f raw -c CMD... TARGET`.
fn qemu_io(target: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(target);
    run_ok("qemu-io", &args)
}

fn assert_same_bytes(a: &Path, b: &Path) {
    let (a_bytes, b_bytes) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert_eq!(
        a_bytes.len(),
        b_bytes.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = a_bytes.iter().zip(&b_bytes).position(|(x, y)| x != y) {
        panic!("{} and {} differ at byte {at}", a.display(), b.display());
    }
}

fn make_sparse(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create sparse file");
}

// ---- real clients ------------------------------------------------------------------------------

/// Writes of every kind through qemu's NBD client leave the export byte-identical to the same
/// commands applied to a plain file, and read back with the expected patterns.
#[test]
fn qemu_io_writes_match_a_reference_file() {
    if !tools_available(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let export = file_export(dir.path(), "vol.img", 8 * MIB);
    let server = TestServer::start_in(dir, vec![("vol", export)]);
    let reference = server.path("reference.img");
    make_sparse(&reference, 8 * MIB);

    let writes = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1234567 7777",
        "write -P 0x11 4095 2",
        "write -P 0x22 3M 1M",
        "discard 3M 512k",
        "write -P 0x33 5M 1M",
        "write -z 5M 256k",
        "write -z -u 5376k 256k",
        "write -f -P 0x77 7M 4k",
        "write -P 0x44 8388607 1",
        "flush",
    ];
    qemu_io(&server.uri("vol"), &writes);
    qemu_io(reference.to_str().expect("utf-8 path"), &writes);

    let checks = [
        "read -P 0xab 0 4095",
        "read -P 0x11 4095 2",
        "read -P 0xab 4097 1044479",
        "read -P 0xcd 1234567 7777",
        "read -P 0 3M 512k",
        "read -P 0x22 3584k 512k",
        "read -P 0 5M 512k",
        "read -P 0x33 5632k 512k",
        "read -P 0x77 7M 4k",
        "read -P 0x44 8388607 1",
        "read -P 0 8388000 607",
    ];
    qemu_io(&server.uri("vol"), &checks);
    let dump = qemu_io(&server.uri("vol"), &["read -v 7M 16"]);
    assert!(dump.contains("77 77 77 77"), "unexpected hex dump:\n{dump}");

    let compared = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().expect("path"),
            &server.uri("vol"),
        ],
    );
    assert!(
        compared.contains("identical"),
        "qemu-img compare: {compared}"
    );
    assert_same_bytes(&server.path("vol.img"), &reference);
}

/// `qemu-img convert` into and out of the export (many requests in flight, out-of-order
/// writes), `qemu-img compare`, and `qemu-img map` over base:allocation.
#[test]
fn qemu_img_convert_round_trip_and_map() {
    if !tools_available(&["qemu-io", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let export = file_export(dir.path(), "vol.img", 16 * MIB);
    let server = TestServer::start_in(dir, vec![("vol", export)]);
    let source = server.path("source.img");
    make_sparse(&source, 16 * MIB);
    let source_s = source.to_str().expect("path");
    qemu_io(
        source_s,
        &[
            "write -P 0x5a 0 3M",
            "write -P 0xa5 6M 1M",
            "write -P 0x01 9437183 4097",
            "write -P 0xee 15M 1M",
        ],
    );

    let uri = server.uri("vol");
    run_ok(
        "qemu-img",
        &[
            "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", source_s, &uri,
        ],
    );
    let compared = run_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", source_s, &uri],
    );
    assert!(
        compared.contains("identical"),
        "qemu-img compare: {compared}"
    );

    let copy = server.path("copy.img");
    let copy_s = copy.to_str().expect("path");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &uri, copy_s],
    );
    assert_same_bytes(&source, &copy);

    // A fresh region: trim it, then the map must show it as a zero hole next to data.
    qemu_io(&uri, &["discard 10M 4M"]);
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert!(
        map.contains("\"data\": true"),
        "map has no data extent:\n{map}"
    );
    assert!(
        map.contains("\"data\": false"),
        "map has no hole extent:\n{map}"
    );
    assert!(
        map.contains("\"zero\": true"),
        "map has no zero extent:\n{map}"
    );
}

/// nbdinfo: export listing (OPT_LIST + OPT_INFO), flags, block sizes, meta contexts, and map.
#[test]
fn nbdinfo_lists_exports_and_reports_flags_and_map() {
    if !tools_available(&["nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let vol = file_export(dir.path(), "vol.img", 8 * MIB);
    let other = file_export(dir.path(), "other.img", 4 * MIB);
    vol.write(0, vec![0x42u8; 1 << 20].into(), false)
        .expect("seed data");
    let ro: Arc<dyn BlockExport> = Arc::new(ReadOnlyExport(other));
    let server = TestServer::start_in(dir, vec![("vol", vol), ("archive", ro)]);

    let list = run_ok("nbdinfo", &["--list", &server.uri("")]);
    assert!(list.contains("export=\"vol\""), "--list:\n{list}");
    assert!(list.contains("export=\"archive\""), "--list:\n{list}");
    assert!(list.contains("a read-only test volume"), "--list:\n{list}");

    let info = run_ok("nbdinfo", &[&server.uri("vol")]);
    for expected in [
        "export-size: 8388608",
        "can_flush: true",
        "can_fua: true",
        "can_multi_conn: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_cache: true",
        "can_df: true",
        "is_read_only: false",
        "base:allocation",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
    ] {
        assert!(
            info.contains(expected),
            "nbdinfo lacks {expected:?}:\n{info}"
        );
    }
    let ro_info = run_ok("nbdinfo", &[&server.uri("archive")]);
    assert!(
        ro_info.contains("is_read_only: true"),
        "read-only export:\n{ro_info}"
    );

    let size = run_ok("nbdinfo", &["--size", &server.tcp_uri("vol")]);
    assert_eq!(size.trim(), "8388608");

    let map = run_ok("nbdinfo", &["--map", &server.uri("vol")]);
    let lines: Vec<&str> = map.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.contains("data") && l.contains("1048576")),
        "map:\n{map}"
    );
    assert!(
        lines.last().is_some_and(|l| l.contains("hole,zero")),
        "map:\n{map}"
    );

    let unknown = run("nbdinfo", &[&server.uri("nope")]);
    assert!(
        !unknown.status.success(),
        "nbdinfo on an unknown export must fail"
    );
}

/// nbdcopy uses 4 connections (CAN_MULTI_CONN) and many requests per connection; a random
/// 64 MiB image must survive the round trip bit for bit.
#[test]
fn nbdcopy_round_trips_64_mib_over_multiple_connections() {
    if !tools_available(&["nbdcopy"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let export = file_export(dir.path(), "vol.img", 64 * MIB);
    let server = TestServer::start_in(dir, vec![("vol", export)]);
    let source = server.path("random.bin");
    let mut data = vec![0u8; (64 * MIB) as usize];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7),
        &mut data,
    );
    std::fs::write(&source, &data).expect("write random source");

    let uri = server.uri("vol");
    // nbdcopy caps connections at its thread count (the core count by default), and drops to
    // one connection unless the server advertises CAN_MULTI_CONN; ask for 4 of each.
    let source_s = source.to_str().expect("path");
    let args = [
        "--verbose",
        "--flush",
        "--connections=4",
        "--threads=4",
        source_s,
        &uri,
    ];
    let out = run("nbdcopy", &args);
    let log = &out.stderr;
    assert!(out.status.success(), "nbdcopy to NBD failed:\n{log}");
    let summary = log.lines().find(|l| l.starts_with("nbdcopy: connections="));
    assert!(
        summary.is_some_and(|l| l.contains("connections=4 ")),
        "nbdcopy did not use 4 connections: {summary:?}"
    );
    let connected = log
        .lines()
        .filter(|l| l.contains("nbd_connect_uri: leave: ret=0"))
        .count();
    assert_eq!(connected, 4, "NBD connections opened by nbdcopy");
    assert_same_bytes(&source, &server.path("vol.img"));

    let back = server.path("back.bin");
    make_sparse(&back, 64 * MIB);
    run_ok(
        "nbdcopy",
        &[&server.tcp_uri("vol"), back.to_str().expect("path")],
    );
    assert_same_bytes(&source, &back);
}

// ---- raw requests ------------------------------------------------------------------------------

fn assert_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, what: &str) {
    match result {
        Err(err) => assert_eq!(err.raw_os_error(), Some(errno), "{what}: wrong error {err}"),
        Ok(v) => panic!("{what}: expected errno {errno}, got Ok({v:?})"),
    }
}

fn one_export(size: u64) -> TestServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let export = file_export(dir.path(), "vol.img", size);
    TestServer::start_in(dir, vec![("vol", export)])
}

/// Reads `len` bytes of READ payload after a successful simple reply.
fn read_payload(client: &mut NbdClient<UnixStream>, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    client
        .stream_mut()
        .read_exact(&mut buf)
        .expect("read payload");
    buf
}

fn assert_round_trip(client: &mut NbdClient<UnixStream>, offset: u64) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    client.write(offset, &data, true).expect("write");
    let mut back = vec![0u8; data.len()];
    client.read(offset, &mut back).expect("read");
    assert_eq!(back, data, "round trip at {offset}");
}

#[test]
fn read_past_end_is_einval_and_the_connection_survives() {
    let server = one_export(MIB);
    let mut client = server.client("vol");
    assert_eq!(client.size_bytes(), MIB);
    let mut buf = vec![0u8; 20];
    assert_errno(
        client.read(MIB - 10, &mut buf),
        libc::EINVAL,
        "read across the end",
    );
    assert_errno(
        client.read(u64::MAX - 5, &mut buf),
        libc::EINVAL,
        "read with offset overflow",
    );
    assert_errno(client.trim(MIB, 1), libc::EINVAL, "trim past the end");
    assert_errno(
        client.write_zeroes(MIB - 1, 2),
        libc::EINVAL,
        "write_zeroes past the end",
    );
    assert_round_trip(&mut client, 0);
    client
        .read(MIB - 20, &mut buf)
        .expect("read up to the last byte");
    client.disconnect().expect("disconnect");
}

#[test]
fn write_past_end_is_enospc_and_the_connection_survives() {
    let server = one_export(MIB);
    let mut client = server.client("vol");
    assert_errno(
        client.write(MIB - 1, &[1, 2], false),
        libc::ENOSPC,
        "write across the end",
    );
    assert_errno(
        client.write(MIB, &[1], false),
        libc::ENOSPC,
        "write at the end",
    );
    assert_round_trip(&mut client, MIB - 4096);
    client.flush().expect("flush");
}

#[test]
fn unknown_commands_and_flags_are_einval_and_the_connection_survives() {
    let server = one_export(MIB);
    let mut client = server.client("vol");
    let cases: [(u16, u16, &str); 5] = [
        (42, 0, "unknown command"),
        (CMD_READ, 0x8000, "unknown flag"),
        (CMD_READ, CMD_FLAG_DF, "DF without structured replies"),
        (CMD_TRIM, CMD_FLAG_NO_HOLE, "NO_HOLE on TRIM"),
        (CMD_BLOCK_STATUS, 0, "BLOCK_STATUS without a meta context"),
    ];
    for (kind, flags, what) in cases {
        let cookie = client.send_request(kind, flags, 0, 512, &[]).expect("send");
        let reply = client.recv_reply().expect("reply");
        assert_eq!(
            reply,
            SimpleReply {
                error: libc::EINVAL as u32,
                cookie
            },
            "{what}"
        );
    }
    // FUA is accepted on any command, FAST_ZERO is advertised but never fast here.
    let cookie = client
        .send_request(CMD_READ, CMD_FLAG_FUA, 0, 8, &[])
        .expect("send");
    assert_eq!(
        client.recv_reply().expect("reply"),
        SimpleReply { error: 0, cookie }
    );
    assert_eq!(read_payload(&mut client, 8), vec![0u8; 8]);
    let cookie = client
        .send_request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512, &[])
        .expect("send");
    assert_eq!(
        client.recv_reply().expect("reply").error,
        libc::ENOTSUP as u32
    );
    let cookie2 = client
        .send_request(CMD_CACHE, 0, 0, 4096, &[])
        .expect("send");
    assert_eq!(
        client.recv_reply().expect("reply"),
        SimpleReply {
            error: 0,
            cookie: cookie2
        }
    );
    assert_ne!(cookie, cookie2);
    assert_round_trip(&mut client, 8192);
}

#[test]
fn zero_length_requests_succeed_without_payload() {
    let server = one_export(MIB);
    let mut client = server.client("vol");
    for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE] {
        let cookie = client.send_request(kind, 0, 4096, 0, &[]).expect("send");
        assert_eq!(
            client.recv_reply().expect("reply"),
            SimpleReply { error: 0, cookie },
            "kind {kind}"
        );
    }
    assert_round_trip(&mut client, 0);
}

#[test]
fn bad_magic_drops_only_that_connection() {
    let server = one_export(MIB);
    let mut bystander = server.client("vol");
    let mut bad = server.client("vol");
    bad.stream_mut()
        .write_all(&[0xde; RequestHeader::LEN])
        .expect("send garbage");
    assert_closed(bad.stream_mut(), "after a bad request magic");
    assert_round_trip(&mut bystander, 0);
    assert_round_trip(&mut server.client("vol"), 4096);
}

#[test]
fn oversized_write_is_refused_and_the_server_keeps_serving() {
    let server = one_export(MIB);
    let mut bystander = server.client("vol");
    let mut big = server.client("vol");
    // The server answers EINVAL and hangs up (the payload cannot be skipped safely); it may hang
    // up while the payload is still being sent, or the reply may be lost to the reset. Either
    // way the connection must end and nothing else may break.
    let cookie = 77;
    if let Err(err) = big.send_raw(&request(CMD_WRITE, cookie, 0, 1 << 30), &[0u8; 4096]) {
        assert!(is_disconnect(&err), "sending the oversized write: {err}");
    }
    match big.recv_reply() {
        Ok(reply) => {
            let einval = SimpleReply {
                error: libc::EINVAL as u32,
                cookie,
            };
            assert_eq!(reply, einval);
            assert_closed(big.stream_mut(), "after an oversized write");
        }
        Err(err) => assert!(
            is_disconnect(&err),
            "expected EINVAL or a hang-up, got {err}"
        ),
    }
    assert_round_trip(&mut bystander, 0);
    assert_round_trip(&mut server.client("vol"), 4096);
}

#[test]
fn oversized_read_is_einval_and_the_connection_survives() {
    let server = one_export(64 * MIB);
    let mut client = server.client("vol");
    let cookie = client
        .send_request(CMD_READ, 0, 0, 33 * MIB as u32, &[])
        .expect("send");
    assert_eq!(
        client.recv_reply().expect("reply"),
        SimpleReply {
            error: libc::EINVAL as u32,
            cookie
        }
    );
    // The client splits large reads at the advertised maximum payload.
    let mut big = vec![1u8; 40 * MIB as usize];
    client.read(0, &mut big).expect("split read");
    assert!(big.iter().all(|b| *b == 0));
}

/// A request sent without waiting, with the reply it must get.
struct Pipelined {
    header: RequestHeader,
    payload: Vec<u8>,
    error: u32,
}

/// Sends every request before reading any reply, while another thread collects the replies.
/// Checks each cookie is answered exactly once with the expected error; returns READ data.
fn pipeline(client: &mut NbdClient<UnixStream>, requests: &[Pipelined]) -> HashMap<u64, Vec<u8>> {
    let mut replies = client.stream_mut().try_clone().expect("clone stream");
    let expected: HashMap<u64, (u32, usize)> = requests
        .iter()
        .map(|r| {
            let reads = r.header.kind == CMD_READ && r.error == 0;
            (
                r.header.cookie,
                (r.error, if reads { r.header.len as usize } else { 0 }),
            )
        })
        .collect();
    assert_eq!(expected.len(), requests.len(), "cookies must be unique");
    let collector = std::thread::spawn(move || {
        let mut seen = HashMap::new();
        for _ in 0..expected.len() {
            let mut header = [0u8; SimpleReply::LEN];
            replies.read_exact(&mut header).expect("reply header");
            let reply = SimpleReply::parse(&header).expect("reply magic");
            let (error, data_len) = expected.get(&reply.cookie).copied().expect("known cookie");
            assert_eq!(reply.error, error, "cookie {}", reply.cookie);
            let mut data = vec![0u8; data_len];
            replies.read_exact(&mut data).expect("reply data");
            let first = seen.insert(reply.cookie, data).is_none();
            assert!(first, "cookie {} answered twice", reply.cookie);
        }
        seen
    });
    for request in requests {
        client
            .send_raw(&request.header, &request.payload)
            .expect("send request");
    }
    collector.join().expect("collector thread")
}

fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> RequestHeader {
    RequestHeader {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    }
}

/// Hundreds of requests written before any reply is read (far more than the server's in-flight
/// limit, so backpressure kicks in): every cookie is answered exactly once, errors land on the
/// right cookies, and the data comes back right.
#[test]
fn pipelined_requests_are_all_answered() {
    const N: u64 = 300;
    let server = one_export(4 * MIB);
    let mut client = server.client("vol");
    let pattern = |i: u64| vec![(i % 253) as u8 + 1; 4096];
    let mut cookies = 1000..;
    let mut next = move || cookies.next().expect("cookies");
    let mut writes = Vec::new();
    for i in 0..N {
        let header = request(CMD_WRITE, next(), i * 4096, 4096);
        writes.push(Pipelined {
            header,
            payload: pattern(i),
            error: 0,
        });
        if i % 10 == 0 {
            let header = request(CMD_READ, next(), 4 * MIB, 512);
            writes.push(Pipelined {
                header,
                payload: Vec::new(),
                error: libc::EINVAL as u32,
            });
            let header = request(CMD_READ, next(), 0, 0);
            writes.push(Pipelined {
                header,
                payload: Vec::new(),
                error: 0,
            });
        }
    }
    pipeline(&mut client, &writes);
    // Reads go out only once every write has been answered: pipelined requests are unordered.
    let reads: Vec<Pipelined> = (0..N)
        .map(|i| {
            let header = request(CMD_READ, next(), i * 4096, 4096);
            Pipelined {
                header,
                payload: Vec::new(),
                error: 0,
            }
        })
        .collect();
    let seen = pipeline(&mut client, &reads);
    for (i, read) in reads.iter().enumerate() {
        assert_eq!(seen[&read.header.cookie], pattern(i as u64), "read {i}");
    }
    assert_round_trip(&mut client, 0);
}

/// A slow request does not hold up a fast one behind it: replies go out in completion order.
#[test]
fn replies_are_sent_out_of_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gated = GatedExport::new(file_export(dir.path(), "vol.img", MIB));
    let server = TestServer::start_in(dir, vec![("vol", gated.clone())]);
    let mut client = server.client("vol");
    let slow = client
        .send_request(CMD_READ, 0, GATE_OFFSET, 512, &[])
        .expect("send slow");
    gated.wait_entered(1);
    let fast = client
        .send_request(CMD_READ, 0, 4096, 512, &[])
        .expect("send fast");
    assert_eq!(
        client.recv_reply().expect("first reply"),
        SimpleReply {
            error: 0,
            cookie: fast
        }
    );
    read_payload(&mut client, 512);
    gated.open();
    assert_eq!(
        client.recv_reply().expect("second reply"),
        SimpleReply {
            error: 0,
            cookie: slow
        }
    );
    read_payload(&mut client, 512);
}

/// A small write the export expects to wait for the disk (the agent's: it overwrites an
/// unshipped large write, which is saved first) does not hold up the writes behind it.
#[test]
fn a_write_that_waits_for_the_disk_does_not_hold_up_the_next() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gated = GatedExport::new(file_export(dir.path(), "vol.img", MIB));
    let server = TestServer::start_in(dir, vec![("vol", gated.clone())]);
    let mut client = server.client("vol");
    let slow = client
        .send_request(CMD_WRITE, 0, GATE_OFFSET, 512, &[1u8; 512])
        .expect("send slow");
    gated.wait_entered(1);
    let fast = client
        .send_request(CMD_WRITE, 0, 4096, 512, &[2u8; 512])
        .expect("send fast");
    let first = client.recv_reply().expect("first reply");
    assert_eq!(
        first,
        SimpleReply {
            error: 0,
            cookie: fast
        }
    );
    gated.open();
    let second = client.recv_reply().expect("second reply");
    assert_eq!(
        second,
        SimpleReply {
            error: 0,
            cookie: slow
        }
    );
}

#[test]
fn export_errors_map_to_nbd_errno() {
    let server = TestServer::start(vec![("bad", Arc::new(FailingExport))]);
    let mut client = server.client("bad");
    let mut buf = [0u8; 512];
    assert_errno(client.read(0, &mut buf), libc::EIO, "read");
    assert_errno(client.write(0, &buf, false), libc::ENOSPC, "write (EDQUOT)");
    assert_errno(
        client.write(4096, &buf, false),
        libc::EIO,
        "write (export panicked while writing in place)",
    );
    assert_errno(
        client.write(0, &buf, false),
        libc::ENOSPC,
        "writes still served after a panic",
    );
    assert_errno(client.trim(0, 512), libc::EPERM, "trim");
    assert_errno(client.write_zeroes(0, 512), libc::EINVAL, "write_zeroes");
    assert_errno(client.flush(), libc::EIO, "flush (export panicked)");
    assert_errno(
        client.read(0, &mut buf),
        libc::EIO,
        "still serving after a panic",
    );
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ro = ReadOnlyExport(file_export(dir.path(), "vol.img", MIB));
    let server = TestServer::start_in(dir, vec![("ro", Arc::new(ro))]);
    let mut client = server.client("ro");
    assert_ne!(client.transmission_flags() & TFLAG_READ_ONLY, 0);
    assert_errno(client.write(0, &[1], false), libc::EPERM, "write");
    assert_errno(client.trim(0, 512), libc::EPERM, "trim");
    assert_errno(client.write_zeroes(0, 512), libc::EPERM, "write_zeroes");
    let mut buf = [1u8; 512];
    client.read(0, &mut buf).expect("read");
    client.flush().expect("flush");
}

#[test]
fn tcp_clients_share_one_export() {
    let server = one_export(MIB);
    let mut a = NbdClient::connect_tcp(server.tcp, "vol").expect("connect a");
    let mut b = NbdClient::connect_tcp(server.tcp, "vol").expect("connect b");
    let flags = a.transmission_flags();
    for flag in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    a.write(1000, b"written on a", false).expect("write");
    a.flush().expect("flush");
    let mut buf = [0u8; 12];
    b.read(1000, &mut buf).expect("read");
    assert_eq!(&buf, b"written on a");
    a.disconnect().expect("disconnect");
    b.disconnect().expect("disconnect");
}

// ---- handshake ---------------------------------------------------------------------------------

/// A raw handshake helper: greeting read, client flags sent.
fn raw_handshake(sock: &Path, client_flags: u32) -> UnixStream {
    let mut stream = UnixStream::connect(sock).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[0..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([greeting[16], greeting[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    stream
        .write_all(&client_flags.to_be_bytes())
        .expect("client flags");
    stream
}

fn send_option(stream: &mut UnixStream, option: u32, data: &[u8]) {
    let header = OptionHeader {
        option,
        len: data.len() as u32,
    };
    stream.write_all(&header.encode()).expect("option header");
    stream.write_all(data).expect("option data");
}

fn recv_option_reply(stream: &mut UnixStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut buf = [0u8; OptionReplyHeader::LEN];
    stream.read_exact(&mut buf).expect("option reply");
    let header = OptionReplyHeader::parse(&buf).expect("option reply magic");
    let mut data = vec![0u8; header.len as usize];
    stream.read_exact(&mut data).expect("option reply data");
    (header, data)
}

fn name_and_u32s(name: &str, extra: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(extra.len() as u32).to_be_bytes());
    for query in extra {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        data.extend_from_slice(&r.to_be_bytes());
    }
    data
}

/// The server hung up: EOF or a reset, but not silence (the read timeout) and not more data.
/// A connection whose request never finishes is dropped once the grace period is over, and the
/// server returns without waiting for it.
#[test]
fn shutdown_aborts_a_connection_that_does_not_drain_in_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gated = GatedExport::new(file_export(dir.path(), "vol.img", MIB));
    let limits = NbdLimits {
        shutdown_grace: Duration::from_millis(200),
        ..NbdLimits::default()
    };
    let mut server = TestServer::start_with(dir, vec![("vol", gated.clone())], limits);
    let mut client = server.client("vol");
    client
        .send_request(CMD_READ, 0, GATE_OFFSET, 512, &[])
        .expect("send stuck request");
    gated.wait_entered(1);

    server.shutdown();
    assert_closed(client.stream_mut(), "a connection past the grace period");
    gated.open();
}

fn assert_closed(stream: &mut UnixStream, what: &str) {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("{what}: expected the connection to close, got data"),
        Err(err) => assert!(is_disconnect(&err), "{what}: expected a hang-up, got {err}"),
    }
}

fn is_disconnect(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        err.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Unknown options get ERR_UNSUP and haggling continues; structured replies, meta contexts and
/// GO then work, and a READ is answered with an OFFSET_DATA chunk, BLOCK_STATUS with extents.
#[test]
fn option_haggling_structured_reads_and_block_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let export = file_export(dir.path(), "vol.img", MIB);
    export
        .write(0, vec![7u8; 8192].into(), false)
        .expect("seed");
    let server = TestServer::start_in(dir, vec![("vol", export)]);
    let mut s = raw_handshake(&server.sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    for option in [999, OPT_EXTENDED_HEADERS, OPT_STARTTLS] {
        send_option(&mut s, option, b"junk");
        let (reply, _) = recv_option_reply(&mut s);
        assert_eq!((reply.option, reply.reply_type), (option, REP_ERR_UNSUP));
    }
    send_option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &name_and_u32s("vol", &["base:allocation"]),
    );
    assert_eq!(
        recv_option_reply(&mut s).0.reply_type,
        REP_ERR_INVALID,
        "meta context before structured"
    );
    send_option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(recv_option_reply(&mut s).0.reply_type, REP_ACK);
    send_option(&mut s, OPT_LIST_META_CONTEXT, &name_and_u32s("vol", &[]));
    let (reply, data) = recv_option_reply(&mut s);
    assert_eq!(reply.reply_type, REP_META_CONTEXT);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(recv_option_reply(&mut s).0.reply_type, REP_ACK);
    send_option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &name_and_u32s("vol", &["x-other:thing", "base:allocation"]),
    );
    let (reply, data) = recv_option_reply(&mut s);
    assert_eq!(reply.reply_type, REP_META_CONTEXT);
    let context_id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    assert_eq!(recv_option_reply(&mut s).0.reply_type, REP_ACK);
    send_option(&mut s, OPT_GO, &go_data("nope", &[]));
    assert_eq!(recv_option_reply(&mut s).0.reply_type, REP_ERR_UNKNOWN);
    send_option(&mut s, OPT_INFO, &go_data("vol", &[INFO_NAME]));
    let mut infos = Vec::new();
    loop {
        let (reply, data) = recv_option_reply(&mut s);
        if reply.reply_type == REP_ACK {
            break;
        }
        assert_eq!(reply.reply_type, REP_INFO);
        infos.push(data);
    }
    assert!(infos
        .iter()
        .any(|d| d[..2] == INFO_NAME.to_be_bytes() && &d[2..] == b"vol"));
    let block = infos
        .iter()
        .find(|d| d[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .expect("block size");
    assert_eq!(block.len(), 14);
    send_option(&mut s, OPT_GO, &go_data("vol", &[INFO_BLOCK_SIZE]));
    let flags = loop {
        let (reply, data) = recv_option_reply(&mut s);
        assert_ne!(reply.reply_type & (1 << 31), 1 << 31, "GO refused");
        if reply.reply_type == REP_INFO && data[..2] == INFO_EXPORT.to_be_bytes() {
            assert_eq!(data.len(), 12);
            assert_eq!(
                u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
                MIB
            );
            break u16::from_be_bytes([data[10], data[11]]);
        }
    };
    assert_ne!(
        flags & TFLAG_SEND_DF,
        0,
        "DF is advertised with structured replies"
    );
    while recv_option_reply(&mut s).0.reply_type != REP_ACK {}

    // Structured READ: one OFFSET_DATA chunk with DONE.
    let read = RequestHeader {
        flags: CMD_FLAG_DF,
        kind: CMD_READ,
        cookie: 9,
        offset: 4096,
        len: 16,
    };
    s.write_all(&read.encode()).expect("send read");
    let chunk = recv_chunk(&mut s);
    assert_eq!(
        (chunk.0.kind, chunk.0.flags, chunk.0.cookie),
        (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 9)
    );
    assert_eq!(chunk.1[..8], 4096u64.to_be_bytes());
    assert_eq!(chunk.1[8..], [7u8; 16]);

    // A structured READ error is an ERROR chunk with a message.
    let bad = RequestHeader {
        flags: 0,
        kind: CMD_READ,
        cookie: 10,
        offset: MIB,
        len: 16,
    };
    s.write_all(&bad.encode()).expect("send bad read");
    let chunk = recv_chunk(&mut s);
    assert_eq!((chunk.0.kind, chunk.0.cookie), (REPLY_TYPE_ERROR, 10));
    assert_eq!(chunk.1[..4], (libc::EINVAL as u32).to_be_bytes());

    // BLOCK_STATUS: the seeded data first, then a zero hole.
    let status = RequestHeader {
        flags: 0,
        kind: CMD_BLOCK_STATUS,
        cookie: 11,
        offset: 0,
        len: MIB as u32,
    };
    s.write_all(&status.encode()).expect("send block status");
    let chunk = recv_chunk(&mut s);
    assert_eq!(
        (chunk.0.kind, chunk.0.cookie),
        (REPLY_TYPE_BLOCK_STATUS, 11)
    );
    assert_eq!(chunk.1[..4], context_id.to_be_bytes());
    let extents: Vec<(u32, u32)> = chunk.1[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().expect("4")),
                u32::from_be_bytes(e[4..].try_into().expect("4")),
            )
        })
        .collect();
    assert_eq!(extents.first(), Some(&(8192, 0)), "extents {extents:?}");
    assert_eq!(
        extents.last().map(|e| e.1),
        Some(STATE_HOLE | STATE_ZERO),
        "extents {extents:?}"
    );
    assert_eq!(extents.iter().map(|e| u64::from(e.0)).sum::<u64>(), MIB);

    let disc = RequestHeader {
        flags: 0,
        kind: CMD_DISC,
        cookie: 12,
        offset: 0,
        len: 0,
    };
    s.write_all(&disc.encode()).expect("send disc");
    assert_closed(&mut s, "after NBD_CMD_DISC");
}

fn recv_chunk(stream: &mut UnixStream) -> (ChunkHeader, Vec<u8>) {
    let mut buf = [0u8; ChunkHeader::LEN];
    stream.read_exact(&mut buf).expect("chunk header");
    let header = ChunkHeader::parse(&buf).expect("chunk magic");
    let mut data = vec![0u8; header.len as usize];
    stream.read_exact(&mut data).expect("chunk payload");
    (header, data)
}

#[test]
fn export_name_pads_with_zeroes_unless_no_zeroes() {
    let server = one_export(MIB);
    for (client_flags, padding) in [
        (FLAG_C_FIXED_NEWSTYLE, 124),
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
    ] {
        let mut s = raw_handshake(&server.sock, client_flags);
        send_option(&mut s, OPT_EXPORT_NAME, b"vol");
        let mut reply = vec![0u8; 10 + padding];
        s.read_exact(&mut reply).expect("export name reply");
        assert_eq!(reply[..8], MIB.to_be_bytes());
        assert!(reply[10..].iter().all(|b| *b == 0));
        // Transmission starts right after: a READ gets a simple reply, not stray padding.
        let read = RequestHeader {
            flags: 0,
            kind: CMD_READ,
            cookie: 5,
            offset: 0,
            len: 4,
        };
        s.write_all(&read.encode()).expect("send read");
        let mut head = [0u8; SimpleReply::LEN];
        s.read_exact(&mut head).expect("reply");
        assert_eq!(
            SimpleReply::parse(&head),
            Ok(SimpleReply {
                error: 0,
                cookie: 5
            })
        );
    }
    // An unknown export cannot be refused politely with EXPORT_NAME: the server hangs up.
    let mut s = raw_handshake(&server.sock, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_EXPORT_NAME, b"nope");
    assert_closed(&mut s, "EXPORT_NAME of an unknown export");
}

#[test]
fn handshake_abuse_drops_the_connection() {
    let server = one_export(MIB);
    let mut s = raw_handshake(&server.sock, 1 << 7);
    assert_closed(&mut s, "unknown client flags");

    let mut s = raw_handshake(&server.sock, FLAG_C_FIXED_NEWSTYLE);
    let header = OptionHeader {
        option: OPT_GO,
        len: 1 << 20,
    };
    s.write_all(&header.encode()).expect("option header");
    assert_closed(&mut s, "oversized option");

    let mut s = raw_handshake(&server.sock, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0")
        .expect("bad option magic");
    assert_closed(&mut s, "bad option magic");

    let mut s = raw_handshake(&server.sock, FLAG_C_FIXED_NEWSTYLE);
    send_option(&mut s, OPT_ABORT, &[]);
    assert_eq!(recv_option_reply(&mut s).0.reply_type, REP_ACK);
    assert_closed(&mut s, "after OPT_ABORT");

    let err = NbdClient::connect_unix(&server.sock, "nope")
        .err()
        .expect("unknown export refused");
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert_round_trip(&mut server.client("vol"), 0);
}

// ---- shutdown ----------------------------------------------------------------------------------

/// Shutdown lets the in-flight request finish, answers later ones with ESHUTDOWN, closes the
/// connection and returns; the listener is gone afterwards.
#[test]
fn shutdown_drains_in_flight_requests_and_rejects_new_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gated = GatedExport::new(file_export(dir.path(), "vol.img", MIB));
    let mut server = TestServer::start_in(dir, vec![("vol", gated.clone())]);
    let mut client = server.client("vol");
    let mut idle = server.client("vol");
    let slow = client
        .send_request(CMD_READ, 0, GATE_OFFSET, 512, &[])
        .expect("send slow");
    gated.wait_entered(1);

    server.stop.send_replace(true);
    assert_closed(idle.stream_mut(), "an idle connection at shutdown");
    let late = client
        .send_request(CMD_READ, 0, 4096, 512, &[])
        .expect("send late");
    let reply = client.recv_reply().expect("late reply");
    assert_eq!(
        reply,
        SimpleReply {
            error: libc::ESHUTDOWN as u32,
            cookie: late
        }
    );
    gated.open();
    assert_eq!(
        client.recv_reply().expect("slow reply"),
        SimpleReply {
            error: 0,
            cookie: slow
        }
    );
    read_payload(&mut client, 512);
    assert_closed(client.stream_mut(), "after draining");

    server.shutdown();
    // A process another test spawns at this moment holds a copy of every descriptor from fork
    // to exec, the listener's too, so it may take a moment for the socket to stop accepting.
    tideline_testkit::wait_for("the listener to close", IO_TIMEOUT, || {
        UnixStream::connect(&server.sock).is_err().then_some(())
    });
}
