//! Commands with a time limit: a hung command fails its test instead of hanging it.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::wait::POLL;

/// Longest any single command may take before the test fails (and the command is killed).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// What a finished command did.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout then stderr, for messages that may be on either.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs a command to completion, failing the test if it takes over [`COMMAND_TIMEOUT`].
pub fn run(command: &mut Command) -> Output {
    run_within(command, COMMAND_TIMEOUT)
}

/// Runs a command to completion, failing the test (after killing it) if it takes over `limit`.
pub fn run_within(command: &mut Command, limit: Duration) -> Output {
    try_run_within(command, limit).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_within`] for callers that report failures instead of panicking (the benchmarks): an
/// error if the command cannot start or is killed after `limit`; the exit status is the
/// caller's to judge.
pub fn try_run_within(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let description = format!("{command:?}");
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {description}: {e}"))?;
    finish(child, &description, limit)
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let description = format!("{command:?}");
    let output = run(command);
    assert!(output.success(), "{description} failed: {output}");
    output.stdout
}

/// Starts `command` with stdin closed and stdout and stderr piped, for [`Spawned::finish`].
pub fn spawn(command: &mut Command) -> Spawned {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    Spawned::new(child, &format!("{command:?}"))
}

/// A child process the test runs alongside its own work. Killed and reaped if it is dropped
/// before being waited for, so a failing test leaves no process behind (holding a mount, say).
pub struct Spawned {
    child: Option<Child>,
    what: String,
}

impl Spawned {
    pub fn new(child: Child, what: &str) -> Spawned {
        Spawned {
            child: Some(child),
            what: what.to_owned(),
        }
    }

    /// Waits (at most [`COMMAND_TIMEOUT`]) and collects its piped output, whatever its exit
    /// status.
    pub fn finish(mut self) -> Output {
        let child = self.child.take().expect("a spawned child is finished once");
        finish(child, &self.what, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .expect("a spawned child is finished once");
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Collects a spawned child's output (draining both pipes meanwhile, so a chatty command never
/// blocks on a full pipe); kills it if it runs past `limit`.
fn finish(mut child: Child, what: &str, limit: Duration) -> Result<Output, String> {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| format!("wait for {what}: {e}"))?
        {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {limit:?}; killed it"));
        }
        std::thread::sleep(POLL);
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}
