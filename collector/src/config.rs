//! Collector configuration: command line and TOML file, one struct.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;
use tideline_core::SiteName;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7100";
/// Site name when none is given.
pub const DEFAULT_SITE: &str = "local";

#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "tideline-collector",
    version,
    about = "Tideline collector: stores agents' journals and restores any point in time"
)]
#[serde(deny_unknown_fields)]
pub struct CollectorArgs {
    /// TOML file with any of these options (command-line values override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Directory holding chunk packs and the catalog.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address for the gRPC API (default 127.0.0.1:7100; use port 0 for any free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Name of this site in status reports and in the other site's (default "local").
    #[arg(long)]
    pub site: Option<String>,
    /// Collector of the other site, e.g. http://dr-site:7100: every group this site is primary
    /// for is replicated there continuously.
    #[arg(long)]
    pub replicate_to: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CollectorConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub site: SiteName,
    pub replicate_to: Option<String>,
}

impl CollectorConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> CollectorConfig {
        CollectorConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            site: default_site(),
            replicate_to: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {message}")]
    File { path: String, message: String },
    #[error("missing --{0} (or `{0}` in the config file)")]
    Missing(&'static str),
    #[error("--{option} {value:?}: {message}")]
    Invalid {
        option: &'static str,
        value: String,
        message: String,
    },
}

fn default_site() -> SiteName {
    SiteName::new(DEFAULT_SITE).unwrap_or_else(|_| unreachable!("the default site name is valid"))
}

impl CollectorArgs {
    pub fn resolve(self) -> Result<CollectorConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let file_err = |message: String| ConfigError::File {
                    path: path.display().to_string(),
                    message,
                };
                let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
                toml::from_str::<CollectorArgs>(&text).map_err(|e| file_err(e.to_string()))?
            }
            None => CollectorArgs::default(),
        };
        let default_listen = DEFAULT_LISTEN
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7100)));
        Ok(CollectorConfig {
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .ok_or(ConfigError::Missing("data-dir"))?,
            listen: self.listen.or(file.listen).unwrap_or(default_listen),
            site: match self.site.or(file.site) {
                Some(name) => SiteName::new(name.as_str()).map_err(|e| ConfigError::Invalid {
                    option: "site",
                    value: name.clone(),
                    message: e.to_string(),
                })?,
                None => default_site(),
            },
            replicate_to: match self.replicate_to.or(file.replicate_to) {
                Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                    return Err(ConfigError::Invalid {
                        option: "replicate-to",
                        value: url,
                        message: "give the other collector's URL, e.g. http://dr-site:7100".into(),
                    })
                }
                other => other,
            },
        })
    }
}
