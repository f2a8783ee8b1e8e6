//! `tideline drill`: prove that a group can be recovered, without touching production.
//!
//! A drill materialises every volume of a group at one cut into a scratch directory (every
//! chunk is verified against its blake3 hash as the images are written, and a mismatch fails
//! the restore naming the volume, the offset and the pack), then runs the operator's checks
//! against the images, for example `e2fsck -fn {image:data}` or a script that starts a
//! database on them. The protected volumes are never opened and protection keeps running: a
//! drill only reads from the collector (or, with `--store`, a stopped collector's directory).
//!
//! It measures what a failover would achieve: the RTO (from the start of the drill until the
//! images are ready and every check passed) and the RPO (how old the restored point was when
//! the drill started). The report is Markdown for people and JSON for tools; the exit status is
//! non-zero when anything failed, and the failure is named on stderr.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tideline_core::TimeNs;
use tideline_proto::v1;
use tokio::io::AsyncReadExt;

use crate::restore::{self, RestoreReport};
use crate::timefmt;

/// Lines of a check's output kept in the report.
const OUTPUT_TAIL_LINES: usize = 20;

/// What the operator asked for.
pub struct DrillRequest {
    pub collector: String,
    pub group: String,
    pub point: v1::restore_request::Point,
    pub checks: Vec<String>,
    pub check_timeout: Duration,
    pub scratch: Option<PathBuf>,
    pub keep: bool,
    pub report: Option<PathBuf>,
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    group: String,
    collector: String,
    passed: bool,
    /// The first failure, in words.
    failure: Option<String>,
    requested_point: String,
    started: String,
    restored_seq: Option<u64>,
    restored_time: Option<String>,
    /// Drill start minus the restored point's time.
    rpo_seconds: Option<f64>,
    /// From the start until the images were ready and every check had passed.
    rto_seconds: Option<f64>,
    images_ready_seconds: Option<f64>,
    scratch_dir: String,
    scratch_kept: bool,
    volumes: Vec<VolumeResult>,
    checks: Vec<CheckResult>,
}

#[derive(Serialize)]
struct VolumeResult {
    volume: String,
    image: String,
    size_bytes: u64,
    data_bytes: u64,
    seq: u64,
    seconds: f64,
    mb_per_s: f64,
}

#[derive(Serialize)]
struct CheckResult {
    command: String,
    exit_code: Option<i32>,
    passed: bool,
    seconds: f64,
    output_tail: String,
}

/// Runs the drill; prints the report and returns the exit status (1 when the drill failed).
pub async fn run(request: DrillRequest, source: restore::Source) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let started_wall = TimeNs::now();
    let volumes = group_volumes(source.clone(), &request.group).await?;
    for check in &request.checks {
        substitute(check, &volumes, Path::new("/"))?;
    }
    if let Some(path) = &request.report {
        if path.extension().is_some_and(|e| e == "json") {
            bail!(
                "--report {} would be overwritten by the JSON report, which goes beside the Markdown one with the extension .json; name the Markdown file (e.g. drill.md)",
                path.display()
            );
        }
    }
    let scratch_guard = scratch_dir(&request)?;
    let scratch = scratch_guard.path().to_owned();
    let mut report = Report {
        group: request.group.clone(),
        collector: request.collector.clone(),
        passed: false,
        failure: None,
        requested_point: describe_point(&request.point),
        started: timefmt::format(started_wall.0),
        restored_seq: None,
        restored_time: None,
        rpo_seconds: None,
        rto_seconds: None,
        images_ready_seconds: None,
        scratch_dir: scratch.display().to_string(),
        scratch_kept: request.keep,
        volumes: Vec::new(),
        checks: Vec::new(),
    };
    match materialise(source, &request, &scratch).await {
        Ok(restored) => {
            report.images_ready_seconds = Some(started.elapsed().as_secs_f64());
            record_restores(&mut report, &restored, started_wall);
            run_checks(&mut report, &request, &volumes, &scratch).await;
        }
        Err(e) => report.failure = Some(format!("{e:#}")),
    }
    report.passed = report.failure.is_none();
    if report.passed {
        report.rto_seconds = Some(started.elapsed().as_secs_f64());
    }
    if request.keep {
        let _ = scratch_guard.keep();
    }
    emit(&report, &request)?;
    Ok(match &report.failure {
        None => ExitCode::SUCCESS,
        Some(failure) => {
            eprintln!("drill of group {} FAILED: {failure}", report.group);
            ExitCode::FAILURE
        }
    })
}

async fn group_volumes(mut source: restore::Source, group: &str) -> anyhow::Result<Vec<String>> {
    let listing = source
        .list_points(v1::ListPointsRequest {
            volume: String::new(),
            group: group.to_owned(),
            limit: 1,
            checkpoints_only: false,
        })
        .await
        .map_err(|s| anyhow::anyhow!("group {group}: {}", s.message()))?;
    if listing.volumes.is_empty() {
        bail!("group {group} has no volumes at the collector");
    }
    Ok(listing.volumes)
}

/// A fresh scratch directory (in `--scratch DIR`, or the system temporary directory), removed
/// when the guard drops unless the drill keeps it.
fn scratch_dir(request: &DrillRequest) -> anyhow::Result<tempfile::TempDir> {
    let parent = request.scratch.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("create {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(&format!("tideline-drill-{}-", request.group))
        .tempdir_in(&parent)
        .with_context(|| format!("create a scratch directory in {}", parent.display()))
}

async fn materialise(
    source: restore::Source,
    request: &DrillRequest,
    scratch: &Path,
) -> anyhow::Result<Vec<RestoreReport>> {
    let reports = restore::run(
        source,
        restore::Target::Group(request.group.clone()),
        request.point.clone(),
        None,
        Some(scratch.to_owned()),
        false,
    )
    .await?;
    if let Some(first) = reports.first() {
        if let Some(other) = reports.iter().find(|r| r.seq != first.seq) {
            bail!(
                "the collector restored {} at seq {} but {} at seq {}: not one cut",
                first.out.display(),
                first.seq,
                other.out.display(),
                other.seq
            );
        }
    }
    Ok(reports)
}

fn record_restores(report: &mut Report, restored: &[RestoreReport], started_wall: TimeNs) {
    if let Some(first) = restored.first() {
        report.restored_seq = Some(first.seq);
        report.restored_time = Some(timefmt::format(first.time_ns));
        report.rpo_seconds = Some((started_wall.0 - first.time_ns).max(0) as f64 / 1e9);
    }
    report.volumes = restored
        .iter()
        .map(|r| VolumeResult {
            volume: r
                .out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            image: r.out.display().to_string(),
            size_bytes: r.size_bytes,
            data_bytes: r.data_bytes,
            seq: r.seq,
            seconds: r.seconds,
            mb_per_s: r.mb_per_s(),
        })
        .collect();
}

async fn run_checks(report: &mut Report, request: &DrillRequest, volumes: &[String], dir: &Path) {
    for (index, check) in request.checks.iter().enumerate() {
        let result = match substitute(check, volumes, dir) {
            Ok(command) => run_check(check, &command, dir, request.check_timeout).await,
            Err(e) => CheckResult {
                command: check.clone(),
                exit_code: None,
                passed: false,
                seconds: 0.0,
                output_tail: format!("{e:#}"),
            },
        };
        if !result.passed && report.failure.is_none() {
            report.failure = Some(format!(
                "check {} (`{}`) {}",
                index + 1,
                check,
                match result.exit_code {
                    Some(code) => format!("exited with status {code}"),
                    None => format!("did not finish: {}", last_line(&result.output_tail)),
                }
            ));
        }
        report.checks.push(result);
    }
}

/// Replaces `{image:VOLUME}` with the restored image of VOLUME and `{dir}` with the scratch
/// directory. A placeholder naming a volume outside the group is an error, caught before the
/// drill restores anything.
fn substitute(check: &str, volumes: &[String], dir: &Path) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = check;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let Some(end) = tail.find('}') else {
            out.push_str(tail);
            rest = "";
            break;
        };
        let placeholder = &tail[1..end];
        if placeholder == "dir" {
            out.push_str(&shell_quote(&dir.display().to_string()));
        } else if let Some(volume) = placeholder.strip_prefix("image:") {
            if !volumes.iter().any(|v| v == volume) {
                bail!(
                    "check `{check}` names {{image:{volume}}}, but the group's volumes are {}",
                    volumes.join(", ")
                );
            }
            let image = dir.join(format!("{volume}.img"));
            out.push_str(&shell_quote(&image.display().to_string()));
        } else {
            out.push_str(&tail[..=end]);
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn shell_quote(text: &str) -> String {
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c))
    {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

async fn run_check(original: &str, command: &str, dir: &Path, limit: Duration) -> CheckResult {
    let started = Instant::now();
    let outcome = run_shell(command, dir, limit).await;
    let seconds = started.elapsed().as_secs_f64();
    let (exit_code, output) = match outcome {
        Ok((code, output)) => (code, output),
        Err(e) => (None, format!("{e:#}")),
    };
    CheckResult {
        command: original.to_owned(),
        passed: exit_code == Some(0),
        exit_code,
        seconds,
        output_tail: tail_lines(&output, OUTPUT_TAIL_LINES),
    }
}

/// Most output of one check read back for its report (the tail is what matters).
const OUTPUT_READ_BYTES: u64 = 64 << 10;

/// Runs `sh -c command` with stdout and stderr merged, in a process group of its own; after
/// `limit` the whole group is killed, so a check's children (a database it started, say) do not
/// outlive it on images that are about to be removed.
async fn run_shell(
    command: &str,
    dir: &Path,
    limit: Duration,
) -> anyhow::Result<(Option<i32>, String)> {
    let log_path = dir.join(".check-output");
    let log = std::fs::File::create(&log_path).context("create the check's output file")?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("TIDELINE_DRILL_DIR", dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("clone the output file handle")?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("start sh")?;
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status.context("wait for the check")?),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|id| libc::pid_t::try_from(id).ok()) {
                // SAFETY: kill has no memory-safety preconditions; -pid names the group the
                // check leads.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            None
        }
    };
    let output = output_tail(&log_path).await?;
    let _ = std::fs::remove_file(&log_path);
    match status {
        Some(status) => Ok((status.code(), output)),
        None => Ok((
            None,
            format!(
                "{output}\nkilled after {} s (--check-timeout)",
                limit.as_secs()
            ),
        )),
    }
}

/// The last [`OUTPUT_READ_BYTES`] of a check's output, as text whatever its bytes.
async fn output_tail(path: &Path) -> anyhow::Result<String> {
    use tokio::io::AsyncSeekExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .context("open the check's output")?;
    let len = file
        .metadata()
        .await
        .context("stat the check's output")?
        .len();
    file.seek(std::io::SeekFrom::Start(
        len.saturating_sub(OUTPUT_READ_BYTES),
    ))
    .await
    .context("seek in the check's output")?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .await
        .context("read the check's output")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

fn describe_point(point: &v1::restore_request::Point) -> String {
    use v1::restore_request::Point;
    match point {
        Point::AtTimeNs(ns) => format!("at {}", timefmt::format(*ns)),
        Point::Latest(_) => "latest".into(),
        Point::AtSeq(seq) => format!("seq {seq}"),
        Point::Checkpoint(name) => format!("checkpoint {name}"),
    }
}

fn emit(report: &Report, request: &DrillRequest) -> anyhow::Result<()> {
    let markdown = markdown(report);
    let json = serde_json::to_string_pretty(report)?;
    // Printed first: a report file that cannot be written must not hide the result.
    if request.json {
        println!("{json}");
    } else {
        print!("{markdown}");
    }
    if let Some(path) = &request.report {
        std::fs::write(path, &markdown).with_context(|| format!("write {}", path.display()))?;
        let json_path = path.with_extension("json");
        std::fs::write(&json_path, &json)
            .with_context(|| format!("write {}", json_path.display()))?;
    }
    Ok(())
}

fn markdown(report: &Report) -> String {
    use std::fmt::Write;
    let seconds = |s: Option<f64>| s.map_or("-".into(), |s| format!("{s:.2} s"));
    let mut md = String::new();
    let verdict = if report.passed { "PASSED" } else { "FAILED" };
    let _ = writeln!(md, "# Drill of group {}: {verdict}\n", report.group);
    if let Some(failure) = &report.failure {
        let _ = writeln!(md, "**Failed:** {failure}\n");
    }
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| collector | {} |", report.collector);
    let _ = writeln!(md, "| requested point | {} |", report.requested_point);
    let restored = match (&report.restored_time, report.restored_seq) {
        (Some(time), Some(seq)) => format!("{time} (seq {seq})"),
        _ => "-".into(),
    };
    let _ = writeln!(md, "| restored point | {restored} |");
    let _ = writeln!(md, "| drill started | {} |", report.started);
    let _ = writeln!(
        md,
        "| RPO (age of the point) | {} |",
        seconds(report.rpo_seconds)
    );
    let _ = writeln!(
        md,
        "| images ready | {} |",
        seconds(report.images_ready_seconds)
    );
    let _ = writeln!(
        md,
        "| RTO (ready and checked) | {} |",
        seconds(report.rto_seconds)
    );
    let kept = if report.scratch_kept {
        "kept"
    } else {
        "removed"
    };
    let _ = writeln!(md, "| scratch | {} ({kept}) |\n", report.scratch_dir);
    let _ = writeln!(
        md,
        "## Volumes (every chunk verified against its blake3 hash)\n"
    );
    let _ = writeln!(md, "| volume | size | data | seq | seconds | MB/s |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for v in &report.volumes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2} | {:.0} |",
            v.volume,
            crate::human_bytes(v.size_bytes),
            crate::human_bytes(v.data_bytes),
            v.seq,
            v.seconds,
            v.mb_per_s
        );
    }
    let _ = writeln!(md, "\n## Checks\n");
    let _ = writeln!(md, "| # | check | exit | seconds | result |");
    let _ = writeln!(md, "|---:|---|---:|---:|---|");
    for (i, c) in report.checks.iter().enumerate() {
        let exit = c.exit_code.map_or("-".into(), |code| code.to_string());
        let result = if c.passed { "pass" } else { "FAIL" };
        let command = c.command.replace('|', "\\|");
        let _ = writeln!(
            md,
            "| {} | `{command}` | {exit} | {:.2} | {result} |",
            i + 1,
            c.seconds
        );
    }
    for (i, c) in report.checks.iter().enumerate().filter(|(_, c)| !c.passed) {
        let _ = writeln!(
            md,
            "\n### Output of check {}\n\n```\n{}\n```",
            i + 1,
            c.output_tail
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes() -> Vec<String> {
        vec!["data".into(), "wal".into()]
    }

    #[test]
    fn placeholders_become_quoted_image_paths() {
        let dir = Path::new("/scratch/drill x");
        let command = substitute("e2fsck -fn {image:data} && ls {dir}", &volumes(), dir).unwrap();
        assert_eq!(
            command,
            "e2fsck -fn '/scratch/drill x/data.img' && ls '/scratch/drill x'"
        );
    }

    #[test]
    fn other_braces_are_left_alone() {
        let command =
            substitute("awk '{print $1}' {image:wal}", &volumes(), Path::new("/s")).unwrap();
        assert_eq!(command, "awk '{print $1}' /s/wal.img");
    }

    #[test]
    fn an_unknown_volume_is_refused_with_the_group_s_volumes() {
        let error = substitute("e2fsck -fn {image:logs}", &volumes(), Path::new("/s"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("{image:logs}"), "{error}");
        assert!(error.contains("data, wal"), "{error}");
    }

    #[tokio::test]
    async fn a_passing_check_with_binary_output_passes() {
        let dir = tempfile::tempdir().unwrap();
        let result = run_check(
            "binary",
            "printf 'ok\\377\\376\\n'",
            dir.path(),
            Duration::from_secs(30),
        )
        .await;
        assert!(result.passed, "{}", result.output_tail);
        assert!(
            result.output_tail.starts_with("ok"),
            "{}",
            result.output_tail
        );
    }

    #[tokio::test]
    async fn a_check_past_its_time_limit_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let command = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let started = Instant::now();
        let result = run_check("slow", &command, dir.path(), Duration::from_secs(1)).await;
        assert!(!result.passed);
        assert_eq!(result.exit_code, None);
        assert!(
            result.output_tail.contains("--check-timeout"),
            "{}",
            result.output_tail
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let child: libc::pid_t = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child was killed with its group (it may linger as a zombie of init
        // for a moment: wait for it to be gone, bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: kill with signal 0 only checks that the process exists.
        while unsafe { libc::kill(child, 0) } == 0 && !is_zombie(child) {
            assert!(
                Instant::now() < deadline,
                "the check's child {child} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_zombie(pid: libc::pid_t) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    }

    #[test]
    fn only_the_tail_of_long_output_is_kept() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = tail_lines(&text, 3);
        assert_eq!(tail, "line 97\nline 98\nline 99");
    }
}
