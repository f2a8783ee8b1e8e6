//! `tideline`: the operator's command. Talks to a collector over its gRPC API.

mod demo;
mod restore;
mod timefmt;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
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
    /// Write a volume as it was at a point in time to a sparse raw image.
    Restore {
        #[arg(long)]
        volume: String,
        /// RFC 3339 time, e.g. 2026-11-22T10:15:30.123456789Z (as `date -u +%FT%T.%NZ` prints).
        #[arg(long, conflicts_with = "latest", required_unless_present = "latest")]
        at: Option<String>,
        /// The newest durable point.
        #[arg(long)]
        latest: bool,
        #[arg(long)]
        out: PathBuf,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
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
    /// Run the whole pipeline in one process on a temporary directory and verify every restore.
    Demo,
}

fn main() -> ExitCode {
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

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo => demo::run().await,
        Command::Volumes { json } => volumes(&cli.collector, json).await,
        Command::Restore {
            volume,
            at,
            latest,
            out,
            force,
        } => {
            let point = match (at, latest) {
                (Some(at), _) => v1::restore_request::Point::AtTimeNs(timefmt::parse(&at)?),
                (None, _) => v1::restore_request::Point::Latest(true),
            };
            let client = catalog(&cli.collector).await?;
            let report = restore::to_file(client, &volume, point, &out, force).await?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Wait {
            volume,
            until,
            timeout,
        } => wait(&cli.collector, &volume, &until, timeout).await,
    }
}

pub type CatalogClient = v1::catalog_client::CatalogClient<tonic::transport::Channel>;

pub async fn catalog(url: &str) -> anyhow::Result<CatalogClient> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad collector URL {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
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
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<16} {:>10}  {:<31} {:<31} {:>9}",
        "VOLUME", "GROUP", "SIZE", "OLDEST", "NEWEST", "LAG"
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
            "{:<16} {:<16} {:>10}  {:<31} {:<31} {:>7}ms",
            v.name,
            v.group,
            human_bytes(v.size_bytes),
            window(v.oldest_ns),
            newest,
            v.lag_ms
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
