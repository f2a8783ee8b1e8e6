//! Shared machinery of the acceptance tests: the real binaries as child processes, the real NBD
//! clients (qemu-io, qemu-img, nbdcopy, nbdinfo) as commands, and small helpers around them.
//!
//! Everything lives in a per-test temporary directory and on free ports chosen at run time, so
//! tests run in parallel. Child processes are killed (SIGKILL) when their handle drops; their
//! stderr goes to a log file in the temporary directory, whose tail is printed when a test
//! panics. Nothing here sleeps to wait: every wait polls a condition with a short interval and a
//! bound, and every command runs under a time limit.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Once;
use std::time::{Duration, Instant};

use tideline_agent::nbd::NbdClient;
use tideline_proto::v1;

/// Generous bound for anything that should take well under a second on an idle machine: the
/// machine running the tests may be busy compiling.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

pub const MIB: u64 = 1 << 20;

// ---- binaries -------------------------------------------------------------------------------

/// `target/debug` (or whichever profile directory this test binary was built into).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/acceptance-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

const BINARIES: [&str; 3] = ["tideline", "tideline-agent", "tideline-collector"];

static BUILD: Once = Once::new();

/// Builds the workspace binaries once per test run, so that `cargo test` alone tests the current
/// sources (cargo does not build other packages' binaries for an integration test). A no-op
/// build takes a second. `TIDELINE_TEST_NO_BUILD=1` skips it when the binaries exist.
fn ensure_built() {
    BUILD.call_once(|| {
        let dir = profile_dir();
        let missing: Vec<&str> = BINARIES
            .iter()
            .copied()
            .filter(|b| !dir.join(b).exists())
            .collect();
        if missing.is_empty() && std::env::var_os("TIDELINE_TEST_NO_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut command = Command::new(cargo);
        command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--workspace", "--bins", "--quiet"]);
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                command.arg("--release");
            }
            Some(profile) => {
                command.args(["--profile", profile]);
            }
        }
        let status = command.status();
        let ok = matches!(status, Ok(s) if s.success());
        if !ok {
            assert!(
                missing.is_empty(),
                "`cargo build --workspace --bins` failed ({status:?}) and {missing:?} are missing in {}",
                dir.display()
            );
            eprintln!(
                "WARNING: `cargo build --workspace --bins` failed ({status:?}); testing the binaries already in {}",
                dir.display()
            );
        }
    });
}

/// Path of one of the workspace binaries, building them first if needed.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

// ---- external tools and commands ----------------------------------------------------------

pub use tideline_testkit::{
    require_tools, run, run_ok, run_within, skip_or_fail, spawn, tool, wait_for, Output, Spawned,
};

/// `tideline` with any arguments (no `--collector` added, `TIDELINE_COLLECTOR` removed).
pub fn tideline_cmd() -> Command {
    let mut command = Command::new(bin("tideline"));
    command.env_remove("TIDELINE_COLLECTOR");
    command
}

/// `tideline --collector URL ARGS...`.
pub fn tideline(url: &str, args: &[&str]) -> Output {
    run(tideline_cmd().arg("--collector").arg(url).args(args))
}

/// `tideline wait --volume V --until T --timeout 60`, which must succeed.
pub fn wait_durable(url: &str, volume: &str, until: &str) {
    let output = tideline(
        url,
        &[
            "wait",
            "--volume",
            volume,
            "--until",
            until,
            "--timeout",
            "60",
        ],
    );
    assert!(
        output.success(),
        "tideline wait --volume {volume} --until {until}: {output}"
    );
}

/// `tideline restore --volume V --at T --out F` (`at` = None: `--latest`), which must succeed.
pub fn restore(url: &str, volume: &str, at: Option<&str>, out: &Path) {
    let out_s = out.to_str().expect("UTF-8 path");
    let mut args = vec!["restore", "--volume", volume, "--out", out_s];
    match at {
        Some(t) => args.extend(["--at", t]),
        None => args.push("--latest"),
    }
    let output = tideline(url, &args);
    assert!(
        output.success(),
        "tideline restore --volume {volume} at {at:?}: {output}"
    );
}

/// `nbd+unix:///EXPORT?socket=SOCK`.
pub fn nbd_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// `qemu-io -f raw TARGET -c CMD...`, which must succeed; TARGET is a file or an NBD URI.
pub fn qemu_io(target: &str, commands: &[&str]) -> String {
    let mut command = Command::new(tool("qemu-io"));
    command.args(["-f", "raw", target]);
    for c in commands {
        command.args(["-c", c]);
    }
    let stdout = run_ok(&mut command);
    assert!(
        !stdout.contains("failed"),
        "qemu-io {target} {commands:?} reported a failure:\n{stdout}"
    );
    stdout
}

/// Spawns qemu-io without waiting (for concurrent writers).
pub fn qemu_io_spawn(target: &str, commands: &[String]) -> Spawned {
    let mut command = Command::new(tool("qemu-io"));
    command.args(["-f", "raw", target]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    spawn(&mut command)
}

/// Waits for a spawned child that must succeed.
pub fn wait_ok(child: Spawned, what: &str) {
    let output = child.finish();
    assert!(
        output.success() && !output.stdout.contains("failed"),
        "{what} failed: {output}"
    );
}

/// Asserts `qemu-img compare -f raw -F raw A B` finds the images identical.
pub fn assert_same_image(restored: &Path, reference: &Path, what: &str) {
    assert_same_image_at(restored.as_os_str(), reference, what);
}

/// Like [`assert_same_image`] for any image qemu-img opens: a file or an NBD URI.
pub fn assert_same_image_at(restored: &std::ffi::OsStr, reference: &Path, what: &str) {
    let output = run(Command::new(tool("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(restored)
        .arg(reference));
    assert!(
        output.status.code() == Some(0),
        "{what}: image {} differs from the reference {}: {output}",
        restored.to_string_lossy(),
        reference.display()
    );
}

/// True when `qemu-img compare` finds the images different (exit 1); panics on errors.
pub fn images_differ(a: &Path, b: &Path) -> bool {
    let output = run(Command::new(tool("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b));
    match output.status.code() {
        Some(0) => false,
        Some(1) => true,
        _ => panic!("qemu-img compare {} {}: {output}", a.display(), b.display()),
    }
}

// ---- files ---------------------------------------------------------------------------------

/// A sparse file of `len` bytes.
/// A file of `len` bytes (a multiple of 1 MiB) of seeded random data, 1 MiB seed apart.
pub fn random_file(path: &Path, len: u64, seed: u64) {
    let mut file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    for mib in 0..len / MIB {
        file.write_all(&random_bytes(seed + mib, MIB as usize))
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

pub fn sparse_file(path: &Path, len: u64) {
    File::create(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Offset of the first data at or after `from` (SEEK_DATA), or None when only holes follow.
pub fn next_data(path: &Path, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: lseek on a descriptor that stays open for the call; no memory is passed.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at < 0 {
        let err = std::io::Error::last_os_error();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENXIO),
            "SEEK_DATA in {}: {err}",
            path.display()
        );
        return None;
    }
    Some(at as u64)
}

/// Asserts `[start, end)` of `path` is a hole: no data begins in it.
pub fn assert_hole(path: &Path, start: u64, end: u64, what: &str) {
    if let Some(data) = next_data(path, start) {
        assert!(
            data >= end,
            "{what}: {} holds data at {data}, inside the range {start}..{end} that must be a hole",
            path.display()
        );
    }
}

/// Bytes the file takes on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

pub fn copy_file(from: &Path, to: &Path) {
    // `cp --sparse=always` keeps holes, so hole checks on references stay meaningful.
    run_ok(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

// ---- time ----------------------------------------------------------------------------------

/// Now, as `date -u +%FT%T.%NZ` prints it.
pub fn now_rfc3339() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .expect("format the time")
}

// ---- async ---------------------------------------------------------------------------------

/// Runs a future to completion on a fresh single-threaded runtime; fails the test if it takes
/// longer than [`STARTUP_TIMEOUT`] (every use is an RPC or a short exchange of messages, so a
/// collector that never answers fails the test instead of hanging it).
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
        .block_on(async {
            tokio::time::timeout(STARTUP_TIMEOUT, future)
                .await
                .unwrap_or_else(|_| {
                    panic!("no answer from the collector within {STARTUP_TIMEOUT:?}")
                })
        })
}

// ---- child processes -----------------------------------------------------------------------

/// A child process killed with SIGKILL when dropped; its stderr goes to `log`.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut command: Command, log: &Path, stdout: Stdio) -> Proc {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let _ = writeln!(file, "===== start: {command:?}");
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the process has exited.
    fn assert_alive(&mut self, doing: &str) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited ({status}) while {doing}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then waits (bounded) for the exit; panics with the log if it does not exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let Some(mut child) = self.child.take() else {
            panic!("{} is not running", self.name);
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = wait_for(
            &format!("{} to exit after SIGTERM", self.name),
            STARTUP_TIMEOUT,
            || child.try_wait().expect("wait for a child"),
        );
        status
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "----- last lines of {} log ({}) -----",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A port that is free now, chosen below the kernel's ephemeral range when there is room, so
/// that no outgoing connection (which takes its source port from that range) can occupy it
/// while a killed collector is down; the restart reuses it.
fn free_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12000 {
        let mut rng = rand::thread_rng();
        for _ in 0..100 {
            let port = rng.gen_range(10000..ephemeral_low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A `tideline-collector` child process.
pub struct Collector {
    pub data_dir: PathBuf,
    pub addr: SocketAddr,
    log: PathBuf,
    proc: Proc,
    /// Extra command-line arguments (`--site`, `--replicate-to`), kept for restarts.
    extra: Vec<String>,
}

/// An address on loopback with a port that is free now, for a collector whose URL another
/// collector must know before it starts.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Collector {
    /// Starts a collector with data in `dir/collector`, on a free port.
    pub fn start(dir: &Path) -> Collector {
        let data_dir = dir.join("collector");
        let log = dir.join("collector.log");
        for _ in 0..20 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if let Some(proc) = spawn_collector(&data_dir, addr, &log) {
                return Collector {
                    data_dir,
                    addr,
                    log,
                    proc,
                    extra: Vec::new(),
                };
            }
        }
        panic!(
            "could not start a collector; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Starts a collector of site `site` with data in `dir/NAME` on `addr` (see [`free_addr`]),
    /// replicating to `replicate_to` if given.
    pub fn start_site(
        dir: &Path,
        site: &str,
        addr: SocketAddr,
        replicate_to: Option<&str>,
    ) -> Collector {
        let data_dir = dir.join(format!("collector-{site}"));
        let log = dir.join(format!("collector-{site}.log"));
        let mut extra = vec!["--site".to_owned(), site.to_owned()];
        if let Some(url) = replicate_to {
            extra.extend(["--replicate-to".to_owned(), url.to_owned()]);
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(proc) = spawn_collector_with(&data_dir, addr, &log, &extra) {
                return Collector {
                    data_dir,
                    addr,
                    log,
                    proc,
                    extra,
                };
            }
            assert!(
                Instant::now() < deadline,
                "could not start collector {site} on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// The Status RPC.
    pub fn status(&self) -> v1::StatusResponse {
        block_on(async {
            let mut client = catalog_client(&self.url()).await;
            client
                .status(v1::StatusRequest {})
                .await
                .expect("Status RPC")
                .into_inner()
        })
    }

    /// Status of one group, if this site holds it.
    pub fn group_status(&self, group: &str) -> Option<v1::GroupStatus> {
        self.status().groups.into_iter().find(|g| g.group == group)
    }

    /// Flush points and checkpoints of a group, as (seq, time, kind).
    pub fn points(&self, group: &str) -> Vec<(u64, i64, String)> {
        block_on(async {
            let mut client = catalog_client(&self.url()).await;
            client
                .list_points(v1::ListPointsRequest {
                    volume: String::new(),
                    group: group.to_owned(),
                    limit: 100_000,
                    checkpoints_only: false,
                })
                .await
                .expect("ListPoints RPC")
                .into_inner()
                .points
                .into_iter()
                .map(|p| (p.seq, p.time_ns, p.kind))
                .collect()
        })
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Starts it again on the same port with the same data directory (killing it first if it
    /// still runs), so agents reach it at the URL they already have.
    pub fn restart(&mut self) {
        self.proc.kill9();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(proc) =
                spawn_collector_with(&self.data_dir, self.addr, &self.log, &self.extra)
            {
                self.proc = proc;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "could not restart the collector on {}; its log:\n{}",
                self.addr,
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stats(&self) -> v1::StatsResponse {
        block_on(async {
            let mut client = catalog_client(&self.url()).await;
            client
                .stats(v1::StatsRequest {})
                .await
                .expect("Stats RPC")
                .into_inner()
        })
    }

    pub fn volumes(&self) -> Vec<v1::VolumeStatus> {
        block_on(async {
            let mut client = catalog_client(&self.url()).await;
            client
                .list_volumes(v1::ListVolumesRequest {})
                .await
                .expect("ListVolumes RPC")
                .into_inner()
                .volumes
        })
    }

    pub fn volume(&self, name: &str) -> Option<v1::VolumeStatus> {
        self.volumes().into_iter().find(|v| v.name == name)
    }

    /// Waits until the volume's journal is complete at the collector: its restorable window is
    /// open, so any time from now on can be restored.
    pub fn wait_complete(&self, volume: &str) {
        wait_for(
            &format!("volume {volume} to be complete at the collector"),
            STARTUP_TIMEOUT,
            || self.volume(volume).filter(|v| v.complete).map(|_| ()),
        );
    }
}

pub async fn catalog_client(
    url: &str,
) -> v1::catalog_client::CatalogClient<tonic::transport::Channel> {
    v1::catalog_client::CatalogClient::connect(url.to_owned())
        .await
        .unwrap_or_else(|e| panic!("connect to the collector at {url}: {e}"))
        .max_decoding_message_size(96 << 20)
}

/// Spawns a collector on `addr` and waits until it serves; None if it could not listen there.
fn spawn_collector(data_dir: &Path, addr: SocketAddr, log: &Path) -> Option<Proc> {
    spawn_collector_with(data_dir, addr, log, &[])
}

fn spawn_collector_with(
    data_dir: &Path,
    addr: SocketAddr,
    log: &Path,
    extra: &[String],
) -> Option<Proc> {
    let mut command = Command::new(bin("tideline-collector"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(addr.to_string())
        .args(extra);
    let mut proc = Proc::spawn("collector", command, log, Stdio::piped());
    let stdout = proc.take_stdout().expect("collector stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        // Keep draining so the collector never writes into a closed pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Some(line)) => assert_eq!(
            line,
            format!("listening on {addr}"),
            "collector's first line of output"
        ),
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            // Exited before listening: the port is taken (retry) or something is broken.
            proc.kill9();
            let log = proc.log_text();
            let last_start = log.rsplit("===== start").next().unwrap_or_default();
            assert!(
                last_start.contains("Address already in use"),
                "collector exited before listening:\n{last_start}"
            );
            return None;
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!(
                "collector printed nothing in {STARTUP_TIMEOUT:?}:\n{}",
                proc.log_text()
            )
        }
    }
    // Serving once an RPC is answered (the store is opened after the socket is bound).
    let url = format!("http://{addr}");
    wait_for("the collector to answer", STARTUP_TIMEOUT, || {
        proc.assert_alive("opening its store");
        block_on(async {
            let mut client = v1::catalog_client::CatalogClient::connect(url.clone())
                .await
                .ok()?;
            client.stats(v1::StatsRequest {}).await.ok()
        })
    });
    Some(proc)
}

/// What an agent protects and where.
#[derive(Clone, Debug, Default)]
pub struct AgentSpec {
    /// (name, path) of each volume.
    pub volumes: Vec<(String, PathBuf)>,
    /// `NAME=VOL1,VOL2` consistency groups.
    pub groups: Vec<String>,
    pub spool_max_bytes: Option<u64>,
    /// (volume, file) FUSE exports.
    pub fuse: Vec<(String, PathBuf)>,
    /// Further arguments, e.g. checkpoint hooks.
    pub extra_args: Vec<OsString>,
}

impl AgentSpec {
    pub fn one(name: &str, path: &Path) -> AgentSpec {
        AgentSpec {
            volumes: vec![(name.to_owned(), path.to_owned())],
            ..AgentSpec::default()
        }
    }
}

/// A `tideline-agent` child process serving NBD on a Unix socket.
pub struct Agent {
    pub socket: PathBuf,
    pub spool_dir: PathBuf,
    spec: AgentSpec,
    collector_url: String,
    log: PathBuf,
    proc: Proc,
}

impl Agent {
    /// Starts an agent with its socket and spool in `dir`, and waits until it serves NBD.
    pub fn start(dir: &Path, collector_url: &str, spec: AgentSpec) -> Agent {
        let socket = dir.join("nbd.sock");
        let spool_dir = dir.join("spool");
        let log = dir.join("agent.log");
        let proc = spawn_agent(&spec, &socket, &spool_dir, collector_url, &log);
        Agent {
            socket,
            spool_dir,
            spec,
            collector_url: collector_url.to_owned(),
            log,
            proc,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        nbd_uri(&self.socket, export)
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Starts it again with the same volumes, socket and spool (killing it first if needed).
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = spawn_agent(
            &self.spec,
            &self.socket,
            &self.spool_dir,
            &self.collector_url,
            &self.log,
        );
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// SIGTERM (the agent unmounts its FUSE exports), then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate()
    }

    /// Waits (bounded) for the agent to exit by itself; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.proc.child.as_mut().expect("agent was started");
        wait_for("the agent to exit", timeout, || {
            child.try_wait().ok().flatten()
        })
    }

    /// Starts an agent without waiting for it to serve NBD (it may exit at once).
    pub fn spawn_only(dir: &Path, collector_url: &str, spec: AgentSpec) -> Agent {
        let socket = dir.join("nbd.sock");
        let spool_dir = dir.join("spool");
        let log = dir.join("agent.log");
        let proc = spawn_agent_with(&spec, &socket, &spool_dir, collector_url, &log, false);
        Agent {
            socket,
            spool_dir,
            spec,
            collector_url: collector_url.to_owned(),
            log,
            proc,
        }
    }

    pub fn nbd(&self, export: &str) -> NbdClient<std::os::unix::net::UnixStream> {
        NbdClient::connect_unix(&self.socket, export)
            .unwrap_or_else(|e| panic!("NBD connect to {export}: {e}"))
    }
}

fn spawn_agent(
    spec: &AgentSpec,
    socket: &Path,
    spool_dir: &Path,
    collector_url: &str,
    log: &Path,
) -> Proc {
    spawn_agent_with(spec, socket, spool_dir, collector_url, log, true)
}

impl Drop for Agent {
    /// A killed agent leaves its FUSE exports mounted and dead (ENOTCONN); detach them lazily so
    /// a failing test does not leave them behind (any loop device or filesystem on top is
    /// released by its own guard first).
    fn drop(&mut self) {
        if self.spec.fuse.is_empty() {
            return;
        }
        self.proc.kill9();
        for (_, file) in &self.spec.fuse {
            if crate::kernel::is_mount_point(file) {
                let out = run(Command::new(tool("umount")).arg("-l").arg(file));
                if !out.success() {
                    eprintln!("umount -l {}: {out}", file.display());
                }
            }
        }
    }
}

fn spawn_agent_with(
    spec: &AgentSpec,
    socket: &Path,
    spool_dir: &Path,
    collector_url: &str,
    log: &Path,
    wait_serving: bool,
) -> Proc {
    let mut command = Command::new(bin("tideline-agent"));
    for (name, path) in &spec.volumes {
        let mut arg = OsString::from(format!("{name}="));
        arg.push(path);
        if let Some((_, file)) = spec.fuse.iter().find(|(volume, _)| volume == name) {
            arg.push(",fuse=");
            arg.push(file);
        }
        command.arg("--volume").arg(arg);
    }
    for group in &spec.groups {
        command.arg("--group").arg(group);
    }
    command
        .arg("--nbd-unix")
        .arg(socket)
        .arg("--spool-dir")
        .arg(spool_dir)
        .arg("--collector")
        .arg(collector_url)
        .env_remove("TIDELINE_COLLECTOR");
    if let Some(max) = spec.spool_max_bytes {
        command.arg("--spool-max-bytes").arg(max.to_string());
    }
    command.args(&spec.extra_args);
    let mut proc = Proc::spawn("agent", command, log, Stdio::null());
    if !wait_serving {
        return proc;
    }
    // Serving once a client completes the handshake on the first export.
    let export = &spec.volumes.first().expect("an agent needs a volume").0;
    wait_for("the agent to serve NBD", STARTUP_TIMEOUT, || {
        proc.assert_alive("starting");
        NbdClient::connect_unix(socket, export)
            .ok()
            .map(|c| drop(c.disconnect()))
    });
    proc
}

/// A temporary directory, a collector and one agent protecting one sparse volume.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub collector: Collector,
    pub agent: Agent,
    pub volume: String,
    pub volume_path: PathBuf,
}

impl Rig {
    /// A fresh `size_bytes` sparse volume named `volume`, protected and complete at the
    /// collector (its restorable window is open) when this returns.
    pub fn new(volume: &str, size_bytes: u64) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("tideline-acceptance-")
            .tempdir()
            .expect("create a temporary directory");
        let volume_path = dir.path().join(format!("{volume}.img"));
        sparse_file(&volume_path, size_bytes);
        let collector = Collector::start(dir.path());
        let agent = Agent::start(
            dir.path(),
            &collector.url(),
            AgentSpec::one(volume, &volume_path),
        );
        collector.wait_complete(volume);
        Rig {
            dir,
            collector,
            agent,
            volume: volume.to_owned(),
            volume_path,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn url(&self) -> String {
        self.collector.url()
    }

    pub fn uri(&self) -> String {
        self.agent.uri(&self.volume)
    }

    /// Waits until everything written so far is durable at the collector.
    pub fn wait_now(&self) {
        wait_durable(&self.url(), &self.volume, &now_rfc3339());
    }

    /// Restores the latest point to `name` in the temporary directory.
    pub fn restore_latest(&self, name: &str) -> PathBuf {
        let out = self.path(name);
        restore(&self.url(), &self.volume, None, &out);
        out
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}
