//! The end-to-end benchmark: Tideline's release binaries against the tools users would
//! otherwise run, measured side by side in one run, written to `target/bench/report.md` and
//! `target/bench/report.json`.
//!
//! ```text
//! cargo bench --bench e2e                       # full run (about an hour on 2 cores)
//! cargo bench --bench e2e -- --quick            # small sizes, short runs: checks the harness
//! cargo bench --bench e2e -- tap rpo            # only some scenarios
//! ```
//!
//! Environment: `TIDELINE_BENCH_QUICK=1` (same as `--quick`), `TIDELINE_BENCH_RUNS=N` (runs per
//! figure, default and minimum 3), `TIDELINE_BENCH_ONLY=tap,rpo`. Needs root (loop devices,
//! FUSE, dropping the page cache) and installs missing peers with `apt-get install -y`.
//!
//! Scenarios: `ceiling` (criterion hot paths), `tap` (NBD vs qemu-nbd), `fuse` (FUSE + loop vs
//! loop), `ingest`, `rpo`, `replication` (RPO at a second site), `history` (restore, space,
//! thinness vs restic and borg). Each
//! scenario's module says exactly what it measures. A failing scenario is reported and the
//! others still run; the report is rewritten after every scenario.

mod ceiling;
mod data;
mod fio;
mod history;
mod ingest;
mod procs;
mod report;
mod rpo;
mod sys;
mod tap;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use report::{Report, Row};

/// Share of the realistic image's size taken by files.
pub const EXT4_FILL: f64 = 0.6;
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SCENARIOS: [&str; 7] = [
    "ceiling",
    "tap",
    "fuse",
    "ingest",
    "rpo",
    "replication",
    "history",
];

/// Sizes and durations of one benchmark run.
pub struct Settings {
    pub quick: bool,
    pub runs: usize,
    /// Workspace root.
    pub root: PathBuf,
    /// Where the release binaries are.
    pub bin_dir: PathBuf,
    /// `target/bench`: the reports.
    pub out_dir: PathBuf,
    /// Generated images, kept between runs.
    pub cache: PathBuf,
    /// Scratch space of the scenario running now.
    pub work: PathBuf,
    pub only: Vec<String>,
    pub tap_volume_bytes: u64,
    pub tap_region_bytes: u64,
    pub tap_seconds: u64,
    pub random_bytes: u64,
    pub rpo_seconds: u64,
    pub rpo_region_bytes: u64,
    /// Bytes per second; None: flat out.
    pub rpo_rates: Vec<Option<u64>>,
    pub history_volume_bytes: u64,
    pub history_rounds: usize,
    pub rewrite_fraction: f64,
    /// Added to every agent's command line (`TIDELINE_BENCH_AGENT_ARGS`).
    pub agent_args: Vec<String>,
    /// Keep each scenario's scratch files (its last run's) instead of removing them.
    pub keep_work: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env_on = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = args.iter().any(|a| a == "--quick") || env_on("TIDELINE_BENCH_QUICK");
        let runs = std::env::var("TIDELINE_BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3usize)
            .max(3);
        let mut only: Vec<String> = args
            .iter()
            .filter(|a| SCENARIOS.contains(&a.as_str()))
            .cloned()
            .collect();
        if let Ok(list) = std::env::var("TIDELINE_BENCH_ONLY") {
            only.extend(
                list.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()),
            );
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out_dir = root.join("target").join("bench");
        let rates = [20_000_000, 50_000_000, 100_000_000];
        Settings {
            quick,
            runs,
            bin_dir: root.join("target").join("release"),
            cache: out_dir.join("cache"),
            work: out_dir.join("work"),
            out_dir,
            root,
            only,
            tap_volume_bytes: if quick { GIB } else { 4 * GIB },
            tap_region_bytes: if quick { 256 * MIB } else { 2 * GIB },
            tap_seconds: if quick { 3 } else { 30 },
            random_bytes: if quick { 256 * MIB } else { 2 * GIB },
            rpo_seconds: if quick { 6 } else { 60 },
            rpo_region_bytes: if quick { GIB } else { 4 * GIB },
            rpo_rates: rates.into_iter().map(Some).chain([None]).collect(),
            history_volume_bytes: if quick { 512 * MIB } else { 4 * GIB },
            history_rounds: 4,
            rewrite_fraction: 0.05,
            agent_args: std::env::var("TIDELINE_BENCH_AGENT_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            keep_work: env_on("TIDELINE_BENCH_KEEP_WORK"),
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == scenario)
    }
}

fn build(s: &Settings) -> anyhow::Result<()> {
    eprintln!("building release binaries");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    sys::run(
        Command::new(cargo).current_dir(&s.root).args([
            "build",
            "--release",
            "--workspace",
            "--bins",
        ]),
        Duration::from_secs(7200),
    )?;
    Ok(())
}

/// Installs the Debian packages of the peers that are missing.
fn install_peers() -> anyhow::Result<()> {
    let needed = [
        ("fio", "fio"),
        ("qemu-nbd", "qemu-utils"),
        ("restic", "restic"),
        ("borg", "borgbackup"),
        ("nbdcopy", "libnbd-bin"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "mount"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(tool, _)| sys::tool_path(tool).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        sys::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(args),
            Duration::from_secs(1800),
        )
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(missing);
    apt(&install)?;
    Ok(())
}

fn tool_version(tool: &str, arg: &str) -> String {
    Command::new(tool)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "not installed".into())
}

fn environment(s: &Settings) -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let commit = Command::new("git")
        .current_dir(&s.root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let time = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    vec![
        (
            "mode".into(),
            if s.quick {
                "quick (small sizes, short runs: validates the harness, not the product)".into()
            } else {
                "full".into()
            },
        ),
        (
            "sections".into(),
            if s.only.is_empty() {
                format!("all ({})", SCENARIOS.join(", "))
            } else {
                format!("only {} (the others were not run)", s.only.join(", "))
            },
        ),
        ("runs per figure".into(), s.runs.to_string()),
        (
            "agent options".into(),
            if s.agent_args.is_empty() {
                "defaults".into()
            } else {
                s.agent_args.join(" ")
            },
        ),
        ("started".into(), time),
        ("commit".into(), commit),
        (
            "cpu".into(),
            format!(
                "{cpu}, {} cores",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
        ),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        (
            "load average at start".into(),
            read("/proc/loadavg").trim().to_owned(),
        ),
        (
            "peers".into(),
            format!(
                "{}; {}; {}; {}",
                tool_version("fio", "--version"),
                tool_version("qemu-nbd", "--version"),
                tool_version("restic", "version"),
                tool_version("borg", "--version")
            ),
        ),
    ]
}

fn run_scenario(s: &Settings, name: &str) -> anyhow::Result<Vec<Row>> {
    match name {
        "ceiling" => ceiling::rows(s),
        "tap" => tap::nbd(s),
        "fuse" => tap::fuse(s),
        "ingest" => ingest::rows(s),
        "rpo" => rpo::rows(s),
        "replication" => rpo::replication_rows(s),
        "history" => history::rows(s),
        other => anyhow::bail!("unknown scenario {other}"),
    }
}

fn main() -> anyhow::Result<()> {
    let s = Settings::from_env();
    std::fs::create_dir_all(&s.out_dir).context("create target/bench")?;
    build(&s)?;
    install_peers()?;
    let mut report = Report {
        environment: environment(&s),
        ..Report::default()
    };
    let started = Instant::now();
    for name in SCENARIOS.iter().filter(|n| s.wants(n)) {
        eprintln!("== {name}");
        let scenario_started = Instant::now();
        match run_scenario(&s, name) {
            Ok(rows) => report.rows.extend(rows),
            Err(e) => {
                eprintln!("scenario {name} failed: {e:#}");
                report.failures.push((name.to_string(), format!("{e:#}")));
            }
        }
        eprintln!(
            "== {name} took {:.0} s",
            scenario_started.elapsed().as_secs_f64()
        );
        report.write(&s.out_dir)?;
        // Each scenario leaves gigabytes of volumes and stores behind; the next needs the room.
        if !s.keep_work {
            let _ = std::fs::remove_dir_all(&s.work);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    report
        .environment
        .push(("load average at end".into(), load.trim().to_owned()));
    report.environment.push((
        "duration".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));
    report.write(&s.out_dir)?;
    println!("{}", report.markdown());
    println!("written to {}", s.out_dir.display());
    if report.failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} scenario(s) failed; see the report",
            report.failures.len()
        )
    }
}
