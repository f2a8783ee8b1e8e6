//! PostgreSQL 15 on Tideline, through real kernel parts.
//!
//! PGDATA lives on volume `data` and pg_wal on volume `wal`, one consistency group `db`; each
//! volume is an ext4 filesystem on a loop device on the agent's FUSE export. pgbench (TPC-B-like,
//! four clients) runs for a minute. During the run the test notes five moments, takes an
//! app-consistent checkpoint (the agent's pre-hook runs `psql -c CHECKPOINT`) and runs
//! `tideline drill --latest` while the load goes on. Afterwards it restores the group at every
//! moment and at the checkpoint, starts PostgreSQL on each restored pair
//! (`scripts/checks/postgres.sh`): crash recovery completes and the pgbench balance sums agree.
//! Each restored filesystem then passes `e2fsck -fn`. Finally a drill against a copy of the
//! store with a corrupted pack fails and names the volume it could not restore.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, run, run_ok, tool, Agent, AgentSpec, Collector, Output, Spawned};
use crate::kernel::{self, LoopDevice, Mounted};

const DATA_BYTES: u64 = 2 << 30;
const WAL_BYTES: u64 = 1 << 30;
const RUN: Duration = Duration::from_secs(60);
const MOMENTS: usize = 5;
const PG_PORT: &str = "5432";
const CHECKPOINT: &str = "mid-run";

fn pg_bindir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn postgres_installed() -> bool {
    let missing = if pg_bindir().join("postgres").exists() {
        vec![]
    } else {
        vec!["PostgreSQL 15 server (apt-get install -y postgresql-15)".to_owned()]
    };
    harness::skip_or_fail(missing)
}

fn check_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/checks/postgres.sh")
}

/// A command run as the `postgres` user (the server refuses to run as root).
fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(tool("runuser"));
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

fn chown_postgres(path: &Path) {
    run_ok(Command::new("chown").arg("postgres:postgres").arg(path));
}

/// The protected cluster: started with `pg_ctl`, stopped (immediately) on drop.
struct Cluster {
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    running: bool,
}

impl Cluster {
    fn init(pgdata: &Path, waldir: &Path, socket_dir: &Path, log: &Path) -> Cluster {
        for dir in [pgdata, waldir, socket_dir] {
            std::fs::create_dir_all(dir).unwrap();
            chown_postgres(dir);
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        std::fs::write(log, b"").unwrap();
        chown_postgres(log);
        run_ok(
            as_postgres(pg_bindir().join("initdb"))
                .args(["-A", "trust", "-U", "postgres", "--no-instructions", "-D"])
                .arg(pgdata)
                .arg("-X")
                .arg(waldir),
        );
        let settings = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = {PG_PORT}\n\
             shared_buffers = '64MB'\nmax_wal_size = '256MB'\ncheckpoint_timeout = '30s'\n\
             log_checkpoints = on\n",
            socket_dir.display()
        );
        let conf = pgdata.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&settings);
        std::fs::write(&conf, text).unwrap();
        Cluster {
            pgdata: pgdata.to_owned(),
            socket_dir: socket_dir.to_owned(),
            log: log.to_owned(),
            running: false,
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        run(as_postgres(pg_bindir().join("pg_ctl"))
            .arg("-D")
            .arg(&self.pgdata)
            .arg("-l")
            .arg(&self.log)
            .args(args))
    }

    fn start(&mut self) {
        let out = self.pg_ctl(&["-w", "-t", "120", "start"]);
        assert!(out.success(), "pg_ctl start: {out}\n{}", self.log_text());
        self.running = true;
    }

    fn stop(&mut self) {
        let out = self.pg_ctl(&["-w", "-m", "fast", "stop"]);
        assert!(out.success(), "pg_ctl stop: {out}\n{}", self.log_text());
        self.running = false;
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// pgbench against database `postgres` (its `-d` means debug, so the name is positional).
    fn pgbench(&self, args: &[&str]) -> Command {
        let mut command = as_postgres("pgbench");
        command
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", PG_PORT])
            .args(args)
            .arg("postgres");
        command
    }
}

/// The `--pre-checkpoint-hook` the agent runs before an app-consistent checkpoint.
fn checkpoint_hook(socket_dir: &Path) -> String {
    format!(
        "runuser -u postgres -- psql -h {} -p {PG_PORT} -d postgres -XAtq -c CHECKPOINT",
        socket_dir.display()
    )
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- PostgreSQL log -----\n{}", self.log_text());
        }
        if self.running {
            let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"]);
        }
    }
}

/// One volume's kernel stack: FUSE export -> loop device -> ext4 mount. Torn down in that
/// order's reverse by drop order of the fields.
struct Stack {
    mount: Mounted,
    _loop_device: LoopDevice,
}

impl Stack {
    fn build(fuse_file: &Path, mount_dir: &Path) -> Stack {
        harness::wait_for(
            &format!("the FUSE export {}", fuse_file.display()),
            harness::STARTUP_TIMEOUT,
            || kernel::is_mount_point(fuse_file).then_some(()),
        );
        let loop_device = LoopDevice::attach(fuse_file);
        run_ok(
            Command::new(tool("mkfs.ext4"))
                .args(["-q", "-F"])
                .arg(&loop_device.device),
        );
        let mount = Mounted::mount(&["-o", "noatime"], &loop_device.device, mount_dir);
        Stack {
            mount,
            _loop_device: loop_device,
        }
    }

    /// Unmounts (failing the test if the filesystem is busy), then detaches the loop device.
    fn tear_down(mut self) {
        self.mount.unmount();
    }
}

/// Waits until `at` has passed: the workload's schedule, not a wait for a condition.
fn pace_until(at: Instant) {
    if let Some(left) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
}

fn pgbench_tps(output: &str) -> f64 {
    output
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps line in pgbench output:\n{output}"))
}

/// Restores the group into `out_dir` at `when` (`--at TIME` or `--checkpoint NAME`); both
/// volumes must come from one cut.
fn restore_group(url: &str, when: &[&str], out_dir: &Path) {
    let mut args = vec![
        "restore",
        "--group",
        "db",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(when);
    let output = harness::tideline(url, &args);
    assert!(output.success(), "group restore {when:?}: {output}");
    let seqs: Vec<&str> = output
        .stdout
        .lines()
        .filter_map(|line| line.split("(seq ").nth(1)?.split(')').next())
        .collect();
    assert_eq!(seqs.len(), 2, "one line per volume: {output}");
    assert_eq!(
        seqs[0], seqs[1],
        "volumes restored at different cuts: {output}"
    );
}

/// Starts PostgreSQL on the restored pair and checks the pgbench invariants, then `e2fsck -fn`
/// on both filesystems. Returns the number of pgbench transactions in the restored database.
fn check_restored(dir: &Path, what: &str) -> u64 {
    let data = dir.join("data.img");
    let wal = dir.join("wal.img");
    let output = run(Command::new(check_script()).arg(&data).arg(&wal));
    assert!(
        output.success(),
        "{what}: PostgreSQL check failed: {output}"
    );
    assert!(
        output.stdout.contains("pgbench invariants hold"),
        "{what}: {output}"
    );
    println!("{what}: {}", output.stdout.trim().replace('\n', "; "));
    for image in [&data, &wal] {
        let fsck = run(Command::new(tool("e2fsck")).arg("-fn").arg(image));
        assert!(
            fsck.success(),
            "{what}: e2fsck -fn {}: {fsck}",
            image.display()
        );
    }
    output
        .stdout
        .split(" transactions)")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no transaction count in {output}"))
}

fn drill_command(url: &str, when: &[&str], report: &Path) -> Command {
    let script = check_script();
    let mut command = harness::tideline_cmd();
    command
        .args(["--collector", url, "drill", "--group", "db"])
        .args(when)
        .arg("--check")
        .arg(format!("{} {{image:data}} {{image:wal}}", script.display()))
        .args(["--check", "e2fsck -fn {image:data}"])
        .args(["--check", "e2fsck -fn {image:wal}"])
        .arg("--report")
        .arg(report);
    command
}

/// Spawns a command with stdout and stderr appended to `log`, so nothing blocks on a pipe.
fn spawn_logged(command: &mut Command, log: &Path) -> Spawned {
    let file = std::fs::File::create(log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    Spawned::new(child, &format!("{command:?}"))
}

#[test]
fn pgbench_group_restores_at_five_moments_and_at_a_checkpoint_and_drills() {
    let tools = [
        "mkfs.ext4",
        "e2fsck",
        "losetup",
        "mount",
        "umount",
        "runuser",
        "pgbench",
        "psql",
    ];
    if !kernel::require_kernel_parts(&tools) || !postgres_installed() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("tideline-pg-")
        .tempdir()
        .unwrap();
    // The server runs as `postgres` and must traverse the directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = |name: &str| dir.path().join(name);
    harness::sparse_file(&path("data.img"), DATA_BYTES);
    harness::sparse_file(&path("wal.img"), WAL_BYTES);

    let collector = Collector::start(dir.path());
    let url = collector.url();
    let socket_dir = path("pg-socket");
    let hook = checkpoint_hook(&socket_dir);
    let spec = AgentSpec {
        volumes: vec![
            ("data".into(), path("data.img")),
            ("wal".into(), path("wal.img")),
        ],
        groups: vec!["db=data,wal".into()],
        fuse: vec![
            ("data".into(), path("data.fuse")),
            ("wal".into(), path("wal.fuse")),
        ],
        extra_args: vec![
            OsString::from("--pre-checkpoint-hook"),
            OsString::from(hook),
        ],
        ..AgentSpec::default()
    };
    let mut agent = Agent::start(dir.path(), &url, spec);
    collector.wait_complete("data");
    collector.wait_complete("wal");

    let data_stack = Stack::build(&path("data.fuse"), &path("mnt/data"));
    let wal_stack = Stack::build(&path("wal.fuse"), &path("mnt/wal"));
    let mut cluster = Cluster::init(
        &path("mnt/data/pgdata"),
        &path("mnt/wal/pg_wal"),
        &socket_dir,
        &path("postgres.log"),
    );
    cluster.start();
    run_ok(&mut cluster.pgbench(&["-i", "-s", "10", "-q"]));

    // The run: five moments, an app-consistent checkpoint, and a drill under load.
    let started = Instant::now();
    let seconds = RUN.as_secs().to_string();
    let bench_args = ["-c", "4", "-j", "2", "-P", "5", "-T", &seconds];
    let mut bench = spawn_logged(&mut cluster.pgbench(&bench_args), &path("pgbench.log"));
    let step = RUN / (MOMENTS as u32 + 1);
    let mut moments = Vec::new();
    let mut drill = None;
    for i in 1..=MOMENTS {
        pace_until(started + step * i as u32);
        moments.push(harness::now_rfc3339());
        if i == 2 {
            let output = harness::tideline(
                &url,
                &[
                    "checkpoint",
                    "--group",
                    "db",
                    "--name",
                    CHECKPOINT,
                    "--app-consistent",
                ],
            );
            assert!(output.success(), "app-consistent checkpoint: {output}");
        }
        if i == 3 {
            drill = Some(harness::spawn(&mut drill_command(
                &url,
                &["--latest"],
                &path("drill.md"),
            )));
        }
    }
    let status = harness::wait_for("pgbench to finish", RUN * 3, || bench.try_wait());
    let bench_log = std::fs::read_to_string(path("pgbench.log")).unwrap();
    assert!(status.success(), "pgbench: {status}\n{bench_log}");
    println!("{bench_log}");
    let tps = pgbench_tps(&bench_log);
    println!(
        "pgbench through the tap: {tps:.0} tps over {} s",
        RUN.as_secs()
    );

    let drill = drill.expect("the drill was started").finish();
    println!("{}", drill.stdout);
    assert!(drill.success(), "drill under load: {drill}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("drill.json")).unwrap()).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["checks"].as_array().unwrap().len(), 3, "{report}");
    let rto = report["rto_seconds"].as_f64().unwrap();
    let rpo = report["rpo_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rpo >= 0.0, "{report}");
    let markdown = std::fs::read_to_string(path("drill.md")).unwrap();
    assert!(
        markdown.contains("PASSED") && markdown.contains("RTO"),
        "{markdown}"
    );
    println!("drill under load: RTO {rto:.2} s, RPO {rpo:.3} s");

    harness::wait_durable(&url, "data", &harness::now_rfc3339());
    harness::wait_durable(&url, "wal", &harness::now_rfc3339());

    // Every moment restores to a database that recovers and balances.
    let mut previous = 0;
    for (i, at) in moments.iter().enumerate() {
        let out = path(&format!("moment-{i}"));
        restore_group(&url, &["--at", at], &out);
        let transactions = check_restored(&out, &format!("moment {i} ({at})"));
        assert!(
            transactions >= previous,
            "moment {i} holds {transactions} transactions, fewer than the moment before ({previous})"
        );
        previous = transactions;
        std::fs::remove_dir_all(&out).unwrap();
    }
    assert!(previous > 0, "the last moment holds no pgbench transaction");

    // The app-consistent checkpoint: listed, hook ran, restores and balances.
    let points = harness::tideline(
        &url,
        &["points", "--group", "db", "--checkpoints", "--json"],
    );
    assert!(points.success(), "{points}");
    let listing: serde_json::Value = serde_json::from_str(&points.stdout).unwrap();
    let listed = listing["points"].as_array().unwrap().iter().any(|p| {
        p["kind"] == "checkpoint" && p["name"] == CHECKPOINT && p["app_consistent"] == true
    });
    assert!(listed, "points does not list {CHECKPOINT}: {listing}");
    assert!(
        cluster
            .log_text()
            .contains("checkpoint starting: immediate force wait"),
        "the CHECKPOINT hook never reached PostgreSQL"
    );
    let out = path("checkpoint");
    restore_group(&url, &["--checkpoint", CHECKPOINT], &out);
    check_restored(&out, &format!("checkpoint {CHECKPOINT}"));
    std::fs::remove_dir_all(&out).unwrap();

    // Quiesce everything, then drill against a copy of the store with a corrupted pack.
    cluster.stop();
    harness::wait_durable(&url, "data", &harness::now_rfc3339());
    harness::wait_durable(&url, "wal", &harness::now_rfc3339());
    wal_stack.tear_down();
    data_stack.tear_down();
    let status = agent.terminate();
    assert!(status.success(), "agent exit after SIGTERM: {status}");
    corrupted_store_drill_names_the_volume(&collector.data_dir, &path("corrupt"));
}

/// Copies the store, flips bytes all through its largest pack, serves the copy from a second
/// collector and drills it: the drill must fail and name the volume it could not restore.
fn corrupted_store_drill_names_the_volume(store: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join("collector");
    run_ok(Command::new("cp").arg("-a").arg(store).arg(&copy));
    let packs: Vec<PathBuf> = walk(&copy)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("pack"))
        .collect();
    let largest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap_or_else(|| panic!("no pack file in {}", copy.display()));
    let mut bytes = std::fs::read(largest).unwrap();
    for at in (4096..bytes.len()).step_by(16 << 10) {
        bytes[at] ^= 0x5a;
    }
    std::fs::write(largest, &bytes).unwrap();

    let damaged = Collector::start(dir);
    let report = dir.join("drill.md");
    let drill = harness::spawn(&mut drill_command(&damaged.url(), &["--latest"], &report)).finish();
    println!("{}", drill.stderr);
    assert!(
        !drill.success(),
        "the drill passed on a corrupted store: {drill}"
    );
    assert!(drill.stderr.contains("drill of group db FAILED"), "{drill}");
    let names_volume = ["volume data", "volume wal"]
        .iter()
        .any(|v| drill.stderr.contains(v));
    assert!(
        names_volume,
        "the failure does not name the volume: {drill}"
    );
    assert!(drill.stderr.contains("corrupt"), "{drill}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(json["passed"], false, "{json}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
