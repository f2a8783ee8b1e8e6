//! `tideline`: the operator's command. Talks to a collector over its gRPC API.

mod demo;
mod drill;
mod frames;
mod restore;
mod site;
mod timefmt;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tideline_proto::v1;

#[derive(Parser)]
#[command(
    name = "tideline",
    version,
    about = "Tideline: continuous data protection for block volumes"
)]
struct Cli {
    /// Collector to talk to.
    #[arg(
        long,
        global = true,
        env = "TIDELINE_COLLECTOR",
        default_value = "http://127.0.0.1:7100"
    )]
    collector: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List protected volumes with their restorable window and lag.
    Volumes {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write a volume (or every volume of a group, at one cut) as it was at a point in time to
    /// sparse raw images.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["volume", "group"])))]
    #[command(group(clap::ArgGroup::new("restore_point").required(true).args(["at", "latest", "checkpoint"])))]
    Restore {
        #[arg(long)]
        volume: Option<String>,
        /// Restore every volume of this consistency group at the same cut of its journal.
        #[arg(long)]
        group: Option<String>,
        #[command(flatten)]
        point: PointArgs,
        /// Output image (with --volume).
        #[arg(long, required_unless_present = "out_dir", conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// Output directory, one VOLUME.img per volume (with --group, or --volume).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Overwrite existing images.
        #[arg(long)]
        force: bool,
        /// Read a collector's store directory (its --data-dir) here instead of asking a
        /// collector: for a store whose collector is stopped, or a copy of one. Fails while a
        /// collector holds it.
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
    },
    /// Put a named point into a group's journal (through the agent streaming it).
    Checkpoint {
        #[arg(long)]
        group: String,
        #[arg(long)]
        name: String,
        /// Run the agent's pre- and post-checkpoint hooks around it (e.g. fsfreeze, psql CHECKPOINT).
        #[arg(long)]
        app_consistent: bool,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// List the flush points and checkpoints of a volume's group or of a group.
    #[command(group(clap::ArgGroup::new("of").required(true).args(["volume", "group"])))]
    Points {
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        group: Option<String>,
        /// Only checkpoints, no flush points.
        #[arg(long)]
        checkpoints: bool,
        /// Newest points to list.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Prove a group can be recovered: restore it into a scratch directory (every chunk hash
    /// verified), run checks on the images, report RTO and RPO. Exits 1 if anything failed.
    /// Without a point, the newest durable one.
    Drill {
        #[arg(long)]
        group: String,
        #[command(flatten)]
        point: PointArgs,
        /// A shell command run on the restored images; `{image:VOLUME}` becomes the path of
        /// VOLUME's image and `{dir}` the scratch directory. Passes when it exits 0. Repeatable.
        #[arg(long = "check", value_name = "CMD")]
        checks: Vec<String>,
        /// Seconds one check may run before it is killed and counted as failed.
        #[arg(long, default_value_t = 600)]
        check_timeout: u64,
        /// Where to make the scratch directory (default: the system temporary directory).
        #[arg(long)]
        scratch: Option<PathBuf>,
        /// Keep the scratch directory with the restored images afterwards.
        #[arg(long)]
        keep: bool,
        /// Write the Markdown report to FILE and the JSON report next to it (FILE.json).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Print the JSON report instead of the Markdown one.
        #[arg(long)]
        json: bool,
        /// Restore from a collector's store directory (its --data-dir) here instead of asking
        /// a collector, as `restore --store` does.
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
    },
    /// Wait until everything written up to TIME is durable at the collector.
    Wait {
        #[arg(long)]
        volume: String,
        /// RFC 3339 time, or `now`.
        #[arg(long)]
        until: String,
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// This site's groups: role, epoch, newest durable time and lag, and each replica's.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make the collector's site primary for a group (raising its epoch, which fences the other
    /// site) and materialise the group's volumes there. The group continues from the newest
    /// durable point here, or from the newest record at or before `--at`, or from a checkpoint.
    Failover {
        #[arg(long)]
        group: String,
        #[command(flatten)]
        point: PointArgs,
        /// Write every volume of the group at the failover point as DIR/VOLUME.img.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Overwrite existing images.
        #[arg(long)]
        force: bool,
    },
    /// Bring a group home to the collector's site from the site that took it over: only blocks
    /// that differ are written into the home site's volumes.
    Failback {
        #[arg(long)]
        group: String,
        /// Collector of the site that holds the group now.
        #[arg(long)]
        from: String,
        /// Home-site copy of a volume, NAME=PATH (repeatable).
        #[arg(long = "volume", value_name = "NAME=PATH")]
        volume: Vec<String>,
        /// Directory holding the home-site copies as VOLUME.img.
        #[arg(long)]
        volume_dir: Option<PathBuf>,
        /// Longest wait for the home site to catch up, in seconds.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
    /// Run the whole pipeline in one process on a temporary directory and verify every restore.
    Demo,
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Has glibc keep freed memory for the next allocation. By default each allocation of more than
/// 128 KiB at first (32 MiB at most, raised as such blocks are freed) is mapped afresh, and the
/// heap is trimmed above twice that: a restore receives every frame (about 400 KiB) into new
/// memory, and faulted those pages in: 61-75 thousand page faults for 2.5 GB restored. In four
/// alternating pairs of cold restores of a 4 GiB image, these settings made that 10-12
/// thousand, the process's system time 1.9-2.1 s instead of 2.1-2.5, and the restore 4.37-4.60
/// s instead of 4.34-5.06. This process runs one command and exits, which gives back whatever
/// it kept (`tideline demo` and `--store` hold a store in it too, for that command only).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD_BYTES: libc::c_int = 64 << 20;
        const TRIM_THRESHOLD_BYTES: libc::c_int = 512 << 20;
        // SAFETY: mallopt only changes the allocator's tuning; it is called before any thread
        // starts, and a refused setting leaves the default in place.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo => demo::run().await,
        Command::Status { json } => site::status(&cli.collector, json).await,
        Command::Failover {
            group,
            point,
            out_dir,
            force,
        } => {
            use v1::failover_request::Point;
            let point = match point.resolve()? {
                Named::At(ns) => Point::AtTimeNs(ns),
                Named::Checkpoint(name) => Point::Checkpoint(name),
                Named::Latest => Point::Latest(true),
            };
            site::failover(&cli.collector, &group, point, out_dir, force).await
        }
        Command::Failback {
            group,
            from,
            volume,
            volume_dir,
            timeout,
        } => {
            let explicit = volume
                .iter()
                .map(|v| {
                    v.split_once('=')
                        .map(|(n, p)| (n.to_owned(), PathBuf::from(p)))
                        .with_context(|| format!("--volume {v:?}: expected NAME=PATH"))
                })
                .collect::<anyhow::Result<_>>()?;
            let paths = site::VolumePaths {
                explicit,
                dir: volume_dir,
            };
            site::failback(&cli.collector, &from, &group, paths, timeout).await
        }
        Command::Volumes { json } => volumes(&cli.collector, json).await,
        Command::Restore {
            volume,
            group,
            point,
            out,
            out_dir,
            force,
            store,
        } => {
            let point = point.restore_point()?;
            let (source, _) = restore_source(&cli.collector, store).await?;
            let target = match (volume, group) {
                (Some(volume), _) => restore::Target::Volume(volume),
                (None, Some(group)) => restore::Target::Group(group),
                (None, None) => bail!("name --volume or --group"),
            };
            for report in restore::run(source, target, point, out, out_dir, force).await? {
                println!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoint {
            group,
            name,
            app_consistent,
            timeout,
        } => checkpoint(&cli.collector, &group, &name, app_consistent, timeout).await,
        Command::Points {
            volume,
            group,
            checkpoints,
            limit,
            json,
        } => points(&cli.collector, volume, group, checkpoints, limit, json).await,
        Command::Drill {
            group,
            point,
            checks,
            check_timeout,
            scratch,
            keep,
            report,
            json,
            store,
        } => {
            let (source, collector) = restore_source(&cli.collector, store).await?;
            let request = drill::DrillRequest {
                collector,
                group,
                point: point.restore_point()?,
                checks,
                check_timeout: Duration::from_secs(check_timeout),
                scratch,
                keep,
                report,
                json,
            };
            drill::run(request, source).await
        }
        Command::Wait {
            volume,
            until,
            timeout,
        } => wait(&cli.collector, &volume, &until, timeout).await,
    }
}

/// `--at TIME | --latest | --checkpoint NAME`, at most one of them.
#[derive(clap::Args)]
#[group(id = "point", multiple = false)]
struct PointArgs {
    /// RFC 3339 time, e.g. 2026-11-22T10:15:30.123456789Z (as `date -u +%FT%T.%NZ` prints).
    #[arg(long)]
    at: Option<String>,
    /// The newest durable point.
    #[arg(long)]
    latest: bool,
    /// A named checkpoint (see `tideline points`).
    #[arg(long)]
    checkpoint: Option<String>,
}

/// A point in time as the operator named it.
enum Named {
    At(i64),
    Latest,
    Checkpoint(String),
}

impl PointArgs {
    /// The named point; none named means the latest.
    fn resolve(self) -> anyhow::Result<Named> {
        Ok(match (self.at, self.checkpoint) {
            (Some(at), _) => Named::At(timefmt::parse(&at)?),
            (None, Some(name)) => Named::Checkpoint(name),
            (None, None) => Named::Latest,
        })
    }

    fn restore_point(self) -> anyhow::Result<v1::restore_request::Point> {
        use v1::restore_request::Point;
        Ok(match self.resolve()? {
            Named::At(ns) => Point::AtTimeNs(ns),
            Named::Checkpoint(name) => Point::Checkpoint(name),
            Named::Latest => Point::Latest(true),
        })
    }
}

/// What restores and drills read from: the store directory `store` when given (opened off the
/// runtime's threads, as replaying its catalog reads the whole file), else the collector at
/// `url`; and how to name it in reports.
async fn restore_source(
    url: &str,
    store: Option<PathBuf>,
) -> anyhow::Result<(restore::Source, String)> {
    match store {
        Some(dir) => {
            let name = format!("store directory {}", dir.display());
            let source =
                tokio::task::spawn_blocking(move || restore::Source::open_store(&dir)).await??;
            Ok((source, name))
        }
        None => Ok((catalog(url).await?.into(), url.to_owned())),
    }
}

pub type CatalogClient = v1::catalog_client::CatalogClient<tonic::transport::Channel>;

pub async fn catalog(url: &str) -> anyhow::Result<CatalogClient> {
    let channel = tideline_proto::http2::endpoint(url)
        .with_context(|| format!("bad collector URL {url:?}"))?
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach the collector at {url} (set --collector or TIDELINE_COLLECTOR)")
        })?;
    Ok(v1::catalog_client::CatalogClient::new(channel)
        .max_decoding_message_size(96 << 20)
        .max_encoding_message_size(96 << 20))
}

async fn volumes(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = catalog(url).await?;
    let list = client
        .list_volumes(v1::ListVolumesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("list volumes: {}", s.message()))?
        .into_inner();
    if json {
        let rows: Vec<_> = list
            .volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name, "group": v.group, "size_bytes": v.size_bytes,
                    "oldest": (v.oldest_ns > 0).then(|| timefmt::format(v.oldest_ns)),
                    "newest": (v.newest_ns > 0).then(|| timefmt::format(v.newest_ns)),
                    "oldest_ns": v.oldest_ns, "newest_ns": v.newest_ns,
                    "durable_seq": v.durable_seq, "lag_ms": v.lag_ms, "complete": v.complete,
                    "site": v.site, "role": v.role, "epoch": v.epoch,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<16} {:>10}  {:<31} {:<31} {:>9}  {:<8} {:<8} EPOCH",
        "VOLUME", "GROUP", "SIZE", "OLDEST", "NEWEST", "LAG", "SITE", "ROLE"
    );
    for v in &list.volumes {
        let window = |ns: i64| {
            if ns > 0 {
                timefmt::format(ns)
            } else {
                "-".into()
            }
        };
        let newest = if v.complete {
            window(v.newest_ns)
        } else {
            "(baseline running)".into()
        };
        println!(
            "{:<16} {:<16} {:>10}  {:<31} {:<31} {:>7}ms  {:<8} {:<8} {}",
            v.name,
            v.group,
            human_bytes(v.size_bytes),
            window(v.oldest_ns),
            newest,
            v.lag_ms,
            v.site,
            v.role,
            v.epoch
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait(url: &str, volume: &str, until: &str, timeout_s: f64) -> anyhow::Result<ExitCode> {
    let until_ns = if until == "now" {
        tideline_core::TimeNs::now().0
    } else {
        timefmt::parse(until)?
    };
    let mut client = catalog(url).await?;
    let timeout_ms = (timeout_s.max(0.0) * 1000.0) as u64;
    let response = client
        .wait_durable(v1::WaitDurableRequest {
            volume: volume.to_owned(),
            until_time_ns: until_ns,
            timeout_ms,
        })
        .await
        .map_err(|s| anyhow::anyhow!("wait for {volume}: {}", s.message()))?
        .into_inner();
    if response.reached {
        println!(
            "durable through {}",
            timefmt::format(response.durable_time_ns)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "timed out after {timeout_s} s: {volume} is durable only through {}",
            if response.durable_time_ns > 0 {
                timefmt::format(response.durable_time_ns)
            } else {
                "nothing yet".into()
            }
        );
        Ok(ExitCode::from(2))
    }
}

async fn checkpoint(
    url: &str,
    group: &str,
    name: &str,
    app_consistent: bool,
    timeout_s: f64,
) -> anyhow::Result<ExitCode> {
    let mut client = catalog(url).await?;
    let response = client
        .checkpoint(v1::CheckpointRequest {
            group: group.to_owned(),
            name: name.to_owned(),
            app_consistent,
            timeout_ms: (timeout_s.max(0.0) * 1000.0) as u64,
        })
        .await
        .map_err(|s| anyhow::anyhow!("checkpoint {name}: {}", s.message()))?
        .into_inner();
    println!(
        "checkpoint {name} of group {group} at {} (seq {}){}",
        timefmt::format(response.time_ns),
        response.seq,
        if app_consistent {
            ", app-consistent"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn points(
    url: &str,
    volume: Option<String>,
    group: Option<String>,
    checkpoints_only: bool,
    limit: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = catalog(url).await?;
    let response = client
        .list_points(v1::ListPointsRequest {
            volume: volume.unwrap_or_default(),
            group: group.unwrap_or_default(),
            limit,
            checkpoints_only,
        })
        .await
        .map_err(|s| anyhow::anyhow!("list points: {}", s.message()))?
        .into_inner();
    let points: Vec<_> = response.points.iter().collect();
    if json {
        let rows: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "seq": p.seq, "time": timefmt::format(p.time_ns), "time_ns": p.time_ns,
                    "kind": p.kind, "name": (!p.name.is_empty()).then_some(&p.name),
                    "app_consistent": p.app_consistent,
                })
            })
            .collect();
        let doc = serde_json::json!({"group": response.group, "volumes": response.volumes, "points": rows});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("group {} ({})", response.group, response.volumes.join(", "));
    println!("{:<31} {:>10}  {:<10} NAME", "TIME", "SEQ", "KIND");
    for p in points {
        let kind = if p.app_consistent {
            "app-ckpt"
        } else {
            p.kind.as_str()
        };
        println!(
            "{:<31} {:>10}  {:<10} {}",
            timefmt::format(p.time_ns),
            p.seq,
            kind,
            p.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
