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

/// One load level of one run: lag p50, p99, max (ms), the rate fio achieved (MB/s), and the
/// seconds from the end of the writes until all of them were durable.
struct Level {
    p50: f64,
    p99: f64,
    max: f64,
    achieved: f64,
    drain_s: f64,
    /// Every sample in order: (seconds since the level started, lag in ms).
    series: Vec<(f64, f64)>,
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
    agent: &Agent,
    collector: &Collector,
    rate: Option<u64>,
) -> anyhow::Result<Level> {
    let work = s.work.join("rpo");
    let mut job = Job::new("write", 256 * 1024, 4, s.rpo_region_bytes).seconds(s.rpo_seconds);
    job.rate = rate;
    job.fresh_compressible_data = true;
    let stop = Arc::new(AtomicBool::new(false));
    let handle = sampler(collector.url.clone(), stop.clone());
    let outcome = fio::run(&job, &Target::Nbd(agent.uri()), &work);
    stop.store(true, Ordering::Relaxed);
    let series = handle.join().unwrap_or_default();
    let outcome = outcome?;
    let written = Instant::now();
    Grpc::connect(&collector.url)?.wait_durable(&agent.volume, now_ns())?;
    let mut lags: Vec<f64> = series.iter().map(|&(_, lag)| lag).collect();
    lags.sort_by(f64::total_cmp);
    Ok(Level {
        p50: percentile(&lags, 50.0),
        p99: percentile(&lags, 99.0),
        max: lags.last().copied().unwrap_or(f64::NAN),
        achieved: outcome.mb_per_s,
        drain_s: written.elapsed().as_secs_f64(),
        series,
    })
}

fn run_once(s: &Settings) -> anyhow::Result<(Vec<Level>, [ProcUsage; 2])> {
    let work = sys::fresh_dir(&s.work.join("rpo"))?;
    let volume = work.join("volume.img");
    std::fs::File::create(&volume)?.set_len(s.rpo_region_bytes)?;
    let collector = Collector::start(&s.bin_dir, &work)?;
    let agent = Agent::start(&s.bin_dir, &work, &collector, &volume, None)?;
    let mut levels = Vec::new();
    for rate in &s.rpo_rates {
        levels.push(level(s, &agent, &collector, *rate)?);
    }
    Ok((levels, [agent.proc.usage()?, collector.proc.usage()?]))
}

/// Writes every lag sample of every run to `rpo-lags.json` beside the report, so that a p99 or
/// max can be traced to when in the run it happened.
fn write_series(
    s: &Settings,
    runs: &[(Vec<Level>, [ProcUsage; 2])],
    label: &dyn Fn(&Option<u64>) -> String,
) -> anyhow::Result<()> {
    let levels: Vec<serde_json::Value> = runs
        .iter()
        .enumerate()
        .flat_map(|(run, (levels, _))| {
            levels.iter().zip(&s.rpo_rates).map(move |(level, rate)| {
                serde_json::json!({
                    "run": run + 1,
                    "load": label(rate),
                    "samples_s_ms": level.series,
                })
            })
        })
        .collect();
    let path = s.out_dir.join("rpo-lags.json");
    std::fs::write(&path, serde_json::to_string(&levels)?)
        .with_context(|| format!("write {}", path.display()))
}

pub fn rows(s: &Settings) -> anyhow::Result<Vec<Row>> {
    let mut runs = Vec::new();
    for run in 0..s.runs {
        eprintln!("RPO under load: run {}/{}", run + 1, s.runs);
        runs.push(run_once(s)?);
    }
    let col =
        |i: usize, f: fn(&Level) -> f64| runs.iter().map(|r| f(&r.0[i])).collect::<Vec<f64>>();
    let rss = |i: usize| {
        runs.iter()
            .map(|r| r.1[i].peak_rss_bytes as f64 / MIB as f64)
            .collect::<Vec<f64>>()
    };
    let label = |rate: &Option<u64>| match rate {
        Some(r) => format!("{} MB/s for {} s", r / 1_000_000, s.rpo_seconds),
        None => format!("flat out for {} s", s.rpo_seconds),
    };
    write_series(s, &runs, &label)?;
    let mut rows = Vec::new();
    for (i, rate) in s.rpo_rates.iter().enumerate() {
        let label = label(rate);
        let achieved = Stat::of(&col(i, |l| l.achieved)).map_or(f64::NAN, |x| x.median);
        let note = format!("fio achieved {achieved:.0} MB/s");
        let mut p99 = Row::new(
            "RPO",
            &format!("{label}: lag p99"),
            "ms",
            &col(i, |l| l.p99),
        )
        .note(note);
        if *rate == Some(100_000_000) {
            p99 = p99.goal(Goal::AtMost(1000.0));
        }
        rows.push(Row::new(
            "RPO",
            &format!("{label}: lag p50"),
            "ms",
            &col(i, |l| l.p50),
        ));
        rows.push(p99);
        rows.push(Row::new(
            "RPO",
            &format!("{label}: lag max"),
            "ms",
            &col(i, |l| l.max),
        ));
        rows.push(Row::new(
            "RPO",
            &format!("{label}: drain after the writes stop"),
            "s",
            &col(i, |l| l.drain_s),
        ));
    }
    rows.push(
        Row::new("memory", "agent peak RSS, RPO runs", "MiB", &rss(0)).goal(Goal::AtMost(256.0)),
    );
    rows.push(Row::new(
        "memory",
        "collector peak RSS, RPO runs",
        "MiB",
        &rss(1),
    ));
    Ok(rows)
}
