//! The processes a benchmark runs: the release `tideline-collector` and `tideline-agent`, and
//! `qemu-nbd` as the tap's peer. Each is stopped (SIGTERM, then SIGKILL) when its handle drops;
//! stderr goes to a log file in the run's work directory.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tideline_agent::nbd::NbdClient;
use tideline_proto::v1;

use crate::sys::{self, ProcUsage};
use crate::Settings;

const STARTUP: Duration = Duration::from_secs(120);

/// A child process stopped when dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        mut command: Command,
        log: &Path,
        stdout: Stdio,
    ) -> anyhow::Result<Proc> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}: {command:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// CPU seconds and peak RSS so far; an error (never a zero that would pass a memory
    /// target) when they cannot be read, e.g. because the process has died.
    pub fn usage(&self) -> anyhow::Result<ProcUsage> {
        sys::proc_usage(self.pid()).with_context(|| format!("read the usage of {}", self.name))
    }

    /// Fails with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!("{} exited ({status}):\n{}", self.name, tail.join("\n"));
            }
        }
        Ok(())
    }

    fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// SIGTERM, then SIGKILL after 20 s; reaps the process.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) with the pid of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `tideline-collector` on a port of its choosing.
pub struct Collector {
    pub proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Collector {
    pub fn start(bin_dir: &Path, work: &Path) -> anyhow::Result<Collector> {
        Collector::start_named(bin_dir, work, "collector", &[])
    }

    /// A collector with its data in `work/name`, its log in `work/name.log`, and `args` added
    /// (e.g. `--site`, `--replicate-to`).
    pub fn start_named(
        bin_dir: &Path,
        work: &Path,
        name: &str,
        args: &[&str],
    ) -> anyhow::Result<Collector> {
        let data_dir = work.join(name);
        let mut command = Command::new(bin_dir.join("tideline-collector"));
        command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn");
        let mut proc = Proc::spawn(
            name,
            command,
            &work.join(format!("{name}.log")),
            Stdio::piped(),
        )?;
        let stdout = proc.take_stdout().context("collector stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        let line = rx.recv_timeout(STARTUP).ok().flatten();
        let Some(addr) = line
            .as_deref()
            .and_then(|l| l.strip_prefix("listening on "))
        else {
            proc.check_alive()?;
            bail!("collector printed {line:?} instead of its address");
        };
        let addr: SocketAddr = addr.parse()?;
        let url = format!("http://{addr}");
        let collector = Collector {
            proc,
            url,
            data_dir,
        };
        sys::wait_for("the collector to answer", STARTUP, || {
            Ok(Grpc::connect(&collector.url)
                .ok()
                .and_then(|mut g| g.stats().ok()))
        })?;
        Ok(collector)
    }
}

/// A `tideline-agent` protecting one volume, serving NBD on a Unix socket.
pub struct Agent {
    pub proc: Proc,
    pub socket: PathBuf,
    pub volume: String,
}

impl Agent {
    /// Starts the agent; `fuse` also exposes the volume as that file. Returns once NBD answers
    /// and the collector holds the volume's complete journal.
    /// `s.agent_args` are added to its command line.
    pub fn start(
        s: &Settings,
        work: &Path,
        collector: &Collector,
        volume_path: &Path,
        fuse: Option<&Path>,
    ) -> anyhow::Result<Agent> {
        let volume = "v".to_owned();
        let socket = work.join("agent.sock");
        let mut spec = format!("{volume}={}", volume_path.display());
        if let Some(fuse) = fuse {
            spec.push_str(&format!(",fuse={}", fuse.display()));
        }
        let mut command = Command::new(s.bin_dir.join("tideline-agent"));
        command
            .args(&s.agent_args)
            .arg("--volume")
            .arg(spec)
            .arg("--nbd-unix")
            .arg(&socket)
            .arg("--spool-dir")
            .arg(work.join("spool"))
            .arg("--collector")
            .arg(&collector.url)
            .env_remove("TIDELINE_COLLECTOR")
            .env("RUST_LOG", "warn");
        let proc = Proc::spawn("agent", command, &work.join("agent.log"), Stdio::null())?;
        let mut agent = Agent {
            proc,
            socket,
            volume,
        };
        sys::wait_for("the agent to serve NBD", STARTUP, || {
            agent.proc.check_alive()?;
            Ok(NbdClient::connect_unix(&agent.socket, &agent.volume)
                .ok()
                .map(|c| drop(c.disconnect())))
        })?;
        let mut grpc = Grpc::connect(&collector.url)?;
        sys::wait_for(
            "the volume to be complete at the collector",
            STARTUP,
            || {
                agent.proc.check_alive()?;
                Ok(grpc
                    .volume(&agent.volume)?
                    .filter(|v| v.complete)
                    .map(|_| ()))
            },
        )?;
        Ok(agent)
    }

    /// `nbd+unix:///v?socket=SOCK`.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume,
            self.socket.display()
        )
    }
}

/// `qemu-nbd --cache=none --aio=threads` serving a raw file on a Unix socket.
pub struct QemuNbd {
    pub proc: Proc,
    socket: PathBuf,
}

impl QemuNbd {
    pub fn start(work: &Path, file: &Path) -> anyhow::Result<QemuNbd> {
        let socket = work.join("qemu-nbd.sock");
        let mut command = Command::new("qemu-nbd");
        command
            .args(["-f", "raw", "--cache=none", "--aio=threads", "--persistent"])
            .args(["--shared=8", "--export-name=v", "--socket"])
            .arg(&socket)
            .arg(file);
        let proc = Proc::spawn(
            "qemu-nbd",
            command,
            &work.join("qemu-nbd.log"),
            Stdio::null(),
        )?;
        let mut server = QemuNbd { proc, socket };
        sys::wait_for("qemu-nbd to serve", STARTUP, || {
            server.proc.check_alive()?;
            Ok(NbdClient::connect_unix(&server.socket, "v")
                .ok()
                .map(|c| drop(c.disconnect())))
        })?;
        Ok(server)
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///v?socket={}", self.socket.display())
    }
}

/// A blocking gRPC client of the collector's Catalog service.
pub struct Grpc {
    runtime: tokio::runtime::Runtime,
    client: v1::catalog_client::CatalogClient<tonic::transport::Channel>,
}

impl Grpc {
    pub fn connect(url: &str) -> anyhow::Result<Grpc> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client =
            runtime.block_on(v1::catalog_client::CatalogClient::connect(url.to_owned()))?;
        Ok(Grpc { runtime, client })
    }

    pub fn stats(&mut self) -> anyhow::Result<v1::StatsResponse> {
        let call = self.client.stats(v1::StatsRequest {});
        Ok(self.runtime.block_on(call)?.into_inner())
    }

    pub fn volume(&mut self, name: &str) -> anyhow::Result<Option<v1::VolumeStatus>> {
        let call = self.client.list_volumes(v1::ListVolumesRequest {});
        let volumes = self.runtime.block_on(call)?.into_inner().volumes;
        Ok(volumes.into_iter().find(|v| v.name == name))
    }

    /// Waits until everything the agent stamped at or before `until_ns` is durable.
    pub fn wait_durable(&mut self, volume: &str, until_ns: i64) -> anyhow::Result<()> {
        let call = self.client.wait_durable(v1::WaitDurableRequest {
            volume: volume.to_owned(),
            until_time_ns: until_ns,
            timeout_ms: 600_000,
        });
        let reply = self.runtime.block_on(call)?.into_inner();
        if !reply.reached {
            bail!("volume {volume} not durable through {until_ns} after 600 s");
        }
        Ok(())
    }
}

/// Now, in nanoseconds since the epoch (the agent stamps records with the same clock).
pub fn now_ns() -> i64 {
    tideline_core::TimeNs::now().0
}
