//! RPO under load: fio writes fresh, half-compressible data through the agent's NBD export at a
//! fixed rate (or flat out) while a sampler asks the collector for the volume's lag every
//! 100 ms.
//!
//! The lag is the collector's own figure (`ListVolumes.lag_ms`, what `tideline volumes` shows):
//! the collector's clock minus its *durable-through* time, the newest T such that every write
//! the agent acknowledged with a time stamp at or before T is durable at the collector. If the
//! site of the agent were lost at that instant, the writes of the last `lag` ms would be lost:
//! that is the RPO. Agent and collector share a clock here. When the agent has nothing to send
//! it heartbeats every 200 ms, so an idle volume reads up to about 200 ms.
//!
//! The `replication` scenario runs the same loads with the collector (site a) replicating to a
//! second collector (site b) on the same machine, and samples both: site b's lag is the RPO of
//! losing site a, agent and collector together. Both sites share this machine's two cores and
//! its disk, so site a's lag in that scenario is no measure of site a alone.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::fio::{self, Job, Target};
use crate::procs::{now_ns, Agent, Collector, Grpc};
use crate::report::{Goal, Row, Stat};
use crate::sys::{self, ProcUsage};
use crate::{Settings, MIB};

/// Samples `lag_ms` every 100 ms until `stop`: (seconds since the start, lag in ms).
fn sampler(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(f64, f64)>> {
    std::thread::spawn(move || {
        let mut lags = Vec::new();
        let Ok(mut grpc) = Grpc::connect(&url) else {
            return lags;
        };
        let started = Instant::now();
        let mut next = started;
        while !stop.load(Ordering::Relaxed) {
            if let Ok(Some(v)) = grpc.volume("v") {
                lags.push((started.elapsed().as_secs_f64(), v.lag_ms as f64));
            }
            next += Duration::from_millis(100);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        lags
    })
}

/// The lag at one site during one load level of one run: p50, p99, max (ms), the seconds
/// from the end of the writes until all of them were durable there, and every sample.
struct SiteLag {
    p50: f64,
    p99: f64,
    max: f64,
    drain_s: f64,
    /// Every sample in order: (seconds since the level started, lag in ms).
    series: Vec<(f64, f64)>,
}

impl SiteLag {
    fn of(series: Vec<(f64, f64)>, drain_s: f64) -> SiteLag {
        let mut lags: Vec<f64> = series.iter().map(|&(_, lag)| lag).collect();
        lags.sort_by(f64::total_cmp);
        SiteLag {
            p50: percentile(&lags, 50.0),
            p99: percentile(&lags, 99.0),
            max: lags.last().copied().unwrap_or(f64::NAN),
            drain_s,
            series,
        }
    }
}

/// One load level of one run: the lag at each site (the agent's collector first), and the rate
/// fio achieved (MB/s).
struct Level {
    sites: Vec<SiteLag>,
    achieved: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn level(
    s: &Settings,
    work: &Path,
    agent: &Agent,
    sites: &[&Collector],
    rate: Option<u64>,
) -> anyhow::Result<Level> {
    let mut job = Job::new("write", 256 * 1024, 4, s.rpo_region_bytes).seconds(s.rpo_seconds);
    job.rate = rate;
    job.fresh_compressible_data = true;
    let stop = Arc::new(AtomicBool::new(false));
    let samplers: Vec<_> = sites
        .iter()
        .map(|site| sampler(site.url.clone(), stop.clone()))
        .collect();
    let outcome = fio::run(&job, &Target::Nbd(agent.uri()), work);
    stop.store(true, Ordering::Relaxed);
    let series: Vec<_> = samplers
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    let outcome = outcome?;
    let (written, written_ns) = (Instant::now(), now_ns());
    let mut lags = Vec::new();
    for (site, series) in sites.iter().zip(series) {
        Grpc::connect(&site.url)?.wait_durable(&agent.volume, written_ns)?;
        lags.push(SiteLag::of(series, written.elapsed().as_secs_f64()));
    }
    Ok(Level {
        sites: lags,
        achieved: outcome.mb_per_s,
    })
}

/// The levels of one run and the usage of the agent and each collector.
struct Run {
    levels: Vec<Level>,
    usage: Vec<ProcUsage>,
}

/// One run of every load; with `replicated`, the collector replicates to a second one, whose
/// lag is sampled too.
fn run_once(s: &Settings, replicated: bool) -> anyhow::Result<Run> {
    let name = if replicated { "rpo-replicated" } else { "rpo" };
    let work = sys::fresh_dir(&s.work.join(name))?;
    let volume = work.join("volume.img");
    std::fs::File::create(&volume)?.set_len(s.rpo_region_bytes)?;
    let replica = if replicated {
        Some(Collector::start_named(
            &s.bin_dir,
            &work,
            "collector-b",
            &["--site", "b"],
        )?)
    } else {
        None
    };
    let collector = match &replica {
        Some(b) => Collector::start_named(
            &s.bin_dir,
            &work,
            "collector",
            &["--site", "a", "--replicate-to", &b.url],
        )?,
        None => Collector::start(&s.bin_dir, &work)?,
    };
    let agent = Agent::start(s, &work, &collector, &volume, None)?;
    let sites: Vec<&Collector> = std::iter::once(&collector).chain(&replica).collect();
    let mut levels = Vec::new();
    for rate in &s.rpo_rates {
        levels.push(level(s, &work, &agent, &sites, *rate)?);
    }
    let mut usage = vec![agent.proc.usage()?];
    for site in &sites {
        usage.push(site.proc.usage()?);
    }
    Ok(Run { levels, usage })
}

/// Writes every lag sample of every run to `file` beside the report, so that a p99 or max can
/// be traced to when in the run it happened.
fn write_series(s: &Settings, runs: &[Run], file: &str) -> anyhow::Result<()> {
    let site_names = ["a", "b"];
    let levels: Vec<serde_json::Value> = runs
        .iter()
        .enumerate()
        .flat_map(|(run, r)| {
            r.levels
                .iter()
                .zip(&s.rpo_rates)
                .flat_map(move |(level, rate)| {
                    level.sites.iter().zip(site_names).map(move |(site, name)| {
                        serde_json::json!({
                            "run": run + 1,
                            "site": name,
                            "load": load_label(s, rate),
                            "samples_s_ms": site.series,
                        })
                    })
                })
        })
        .collect();
    let path = s.out_dir.join(file);
    std::fs::write(&path, serde_json::to_string(&levels)?)
        .with_context(|| format!("write {}", path.display()))
}

fn load_label(s: &Settings, rate: &Option<u64>) -> String {
    match rate {
        Some(r) => format!("{} MB/s for {} s", r / 1_000_000, s.rpo_seconds),
        None => format!("flat out for {} s", s.rpo_seconds),
    }
}

fn peak_rss_mib(runs: &[Run], process: usize) -> Vec<f64> {
    runs.iter()
        .map(|r| r.usage[process].peak_rss_bytes as f64 / MIB as f64)
        .collect()
}

/// Lag rows of one site: p50, p99 (against the 1 s target at 100 MB/s where `goal`), max, and
/// the drain, each named with `what` and the load.
fn lag_rows(
    s: &Settings,
    runs: &[Run],
    site: usize,
    section: &str,
    what: &str,
    goal: bool,
) -> Vec<Row> {
    let col = |i: usize, f: fn(&SiteLag) -> f64| -> Vec<f64> {
        runs.iter().map(|r| f(&r.levels[i].sites[site])).collect()
    };
    let mut rows = Vec::new();
    for (i, rate) in s.rpo_rates.iter().enumerate() {
        let label = format!("{what}{}", load_label(s, rate));
        let achieved: Vec<f64> = runs.iter().map(|r| r.levels[i].achieved).collect();
        let achieved = Stat::of(&achieved).map_or(f64::NAN, |x| x.median);
        let mut p99 = Row::new(
            section,
            &format!("{label}: lag p99"),
            "ms",
            &col(i, |l| l.p99),
        )
        .note(format!("fio achieved {achieved:.0} MB/s"));
        if goal && *rate == Some(100_000_000) {
            p99 = p99.goal(Goal::AtMost(1000.0));
        }
        rows.push(Row::new(
            section,
            &format!("{label}: lag p50"),
            "ms",
            &col(i, |l| l.p50),
        ));
        rows.push(p99);
        rows.push(Row::new(
            section,
            &format!("{label}: lag max"),
            "ms",
            &col(i, |l| l.max),
        ));
        rows.push(Row::new(
            section,
            &format!("{label}: drain after the writes stop"),
            "s",
            &col(i, |l| l.drain_s),
        ));
    }
    rows
}

fn runs(s: &Settings, replicated: bool) -> anyhow::Result<Vec<Run>> {
    let what = if replicated {
        "RPO with replication"
    } else {
        "RPO under load"
    };
    let mut runs = Vec::new();
    for run in 0..s.runs {
        eprintln!("{what}: run {}/{}", run + 1, s.runs);
        runs.push(run_once(s, replicated)?);
    }
    Ok(runs)
}

pub fn rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let runs = runs(s, false)?;
    write_series(s, &runs, "rpo-lags.json")?;
    let mut rows = lag_rows(s, &runs, 0, "RPO", "", true);
    rows.extend(memory_rows(&runs, "RPO runs", &["collector"]));
    Ok(rows)
}

/// Peak RSS rows: the agent's (against its target), then each collector's, named in order.
fn memory_rows(runs: &[Run], what: &str, collectors: &[&str]) -> Vec<Row> {
    let agent = Row::new(
        "memory",
        &format!("agent peak RSS, {what}"),
        "MiB",
        &peak_rss_mib(runs, 0),
    )
    .goal(Goal::AtMost(256.0));
    let collectors = collectors.iter().enumerate().map(|(i, name)| {
        Row::new(
            "memory",
            &format!("{name} peak RSS, {what}"),
            "MiB",
            &peak_rss_mib(runs, i + 1),
        )
    });
    std::iter::once(agent).chain(collectors).collect()
}

/// The same loads with the collector replicating to a second site on this machine: site b's
/// lag (the RPO of losing site a), and site a's alongside.
pub fn replication_rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let runs = runs(s, true)?;
    write_series(s, &runs, "rpo-replicated-lags.json")?;
    let mut rows = lag_rows(s, &runs, 1, "RPO site b", "", false);
    rows.extend(lag_rows(
        s,
        &runs,
        0,
        "RPO site a",
        "while replicating, ",
        false,
    ));
    rows.extend(memory_rows(
        &runs,
        "replication runs",
        &["collector (site a)", "collector (site b)"],
    ));
    Ok(rows)
}
