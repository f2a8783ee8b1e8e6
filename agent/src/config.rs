//! Agent configuration: one struct that serves the command line and the TOML file.
//!
//! Every option can be given in `--config FILE` (TOML, same names with underscores) and on the
//! command line; the command line wins. [`AgentArgs::resolve`] merges, applies defaults and
//! validates, producing an [`AgentConfig`] that the rest of the agent trusts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use tideline_core::frame::{self, DEFAULT_ZSTD_LEVEL};
use tideline_core::{GroupName, VolumeName};

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 4 << 30;
/// How far behind a connected shipper may fall before large writes wait for it.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "tideline-agent",
    version,
    about = "Tideline agent: taps block writes into a journal streamed to a collector"
)]
#[serde(deny_unknown_fields)]
pub struct AgentArgs {
    /// TOML file with any of these options (command-line values override it).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// A volume to protect, NAME=PATH (a raw file, possibly sparse, or a block device). Repeatable.
    /// NAME=PATH,fuse=FILE also exposes it as the regular file FILE (a FUSE mount, created if
    /// missing) for `losetup`. PATH and FILE cannot contain a comma.
    #[arg(long = "volume", value_name = "NAME=PATH[,fuse=FILE]")]
    #[serde(default)]
    pub volume: Vec<String>,
    /// A consistency group, NAME=VOL1,VOL2: its volumes share one journal order. Repeatable.
    /// A volume in no group forms a group of its own, named after the volume.
    #[arg(long = "group", value_name = "NAME=VOL,...")]
    #[serde(default)]
    pub group: Vec<String>,
    /// Serve NBD on this Unix socket; each volume is an export named after it.
    #[arg(long)]
    pub nbd_unix: Option<PathBuf>,
    /// Also serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    pub nbd_tcp: Option<SocketAddr>,
    /// Directory for the crash-safe local spool (one subdirectory per group).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// Most bytes the spool of one group may hold before writes are tracked in a dirty map.
    #[arg(long)]
    pub spool_max_bytes: Option<u64>,
    /// While the collector is connected, large writes (64 KiB and up, kept on the volume until
    /// shipped) wait for the shipper once the oldest it has not taken is this many
    /// milliseconds old: the recovery point writers are held to. 0 never holds writes up.
    /// Default 5000.
    #[arg(long)]
    pub max_lag_ms: Option<u64>,
    /// zstd level of the frames the agent ships: negative levels (zstd's `--fast=N`) trade
    /// stored bytes for CPU, positive ones the other way. Default -1.
    #[arg(long, allow_negative_numbers = true)]
    pub zstd_level: Option<i32>,
    /// Collector URL, e.g. http://127.0.0.1:7100.
    #[arg(long, env = "TIDELINE_COLLECTOR")]
    pub collector: Option<String>,
    /// Name of this agent in the collector's logs (default: the host name).
    #[arg(long)]
    pub agent_id: Option<String>,
    /// Shell command run before an app-consistent checkpoint (e.g. `fsfreeze -f /mnt/data`).
    /// It sees TIDELINE_GROUP and TIDELINE_CHECKPOINT; a non-zero exit fails the checkpoint.
    #[arg(long)]
    pub pre_checkpoint_hook: Option<String>,
    /// Shell command run after an app-consistent checkpoint (e.g. `fsfreeze -u /mnt/data`).
    #[arg(long)]
    pub post_checkpoint_hook: Option<String>,
}

#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub path: PathBuf,
    /// Where to mount the volume's FUSE export (`,fuse=FILE`), if anywhere.
    pub fuse: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub name: GroupName,
    pub volumes: Vec<VolumeSpec>,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub groups: Vec<GroupSpec>,
    pub nbd_unix: Option<PathBuf>,
    pub nbd_tcp: Option<SocketAddr>,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    /// See [`AgentArgs::max_lag_ms`]; `None` never holds writes up.
    pub max_lag: Option<Duration>,
    /// See [`AgentArgs::zstd_level`].
    pub zstd_level: i32,
    pub collector_url: String,
    pub agent_id: String,
    pub hooks: crate::checkpoint::Hooks,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {message}")]
    File { path: String, message: String },
    #[error("--{option} {value:?}: {message}")]
    Invalid {
        option: &'static str,
        value: String,
        message: String,
    },
    #[error("missing --{0} (or `{0}` in the config file)")]
    Missing(&'static str),
}

fn invalid(option: &'static str, value: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        value: value.to_owned(),
        message: message.into(),
    }
}

impl AgentArgs {
    fn load_file(path: &Path) -> Result<AgentArgs, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Merges the config file (if any) under the command line, applies defaults, validates.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => Self::load_file(path)?,
            None => AgentArgs::default(),
        };
        let pick_vec =
            |cli: Vec<String>, file: Vec<String>| if cli.is_empty() { file } else { cli };
        let volumes = parse_volumes(&pick_vec(self.volume, file.volume))?;
        let groups = parse_groups(&pick_vec(self.group, file.group), &volumes)?;
        let spool_dir = self
            .spool_dir
            .or(file.spool_dir)
            .ok_or(ConfigError::Missing("spool-dir"))?;
        let collector_url = self
            .collector
            .or(file.collector)
            .ok_or(ConfigError::Missing("collector"))?;
        if !(collector_url.starts_with("http://") || collector_url.starts_with("https://")) {
            return Err(invalid(
                "collector",
                &collector_url,
                "expected a URL such as http://127.0.0.1:7100",
            ));
        }
        let spool_max_bytes = self
            .spool_max_bytes
            .or(file.spool_max_bytes)
            .unwrap_or(DEFAULT_SPOOL_MAX_BYTES);
        if spool_max_bytes < 16 << 20 {
            return Err(invalid(
                "spool-max-bytes",
                &spool_max_bytes.to_string(),
                "must be at least 16 MiB",
            ));
        }
        let zstd_level = self
            .zstd_level
            .or(file.zstd_level)
            .unwrap_or(DEFAULT_ZSTD_LEVEL);
        let levels = frame::compression_levels();
        if !levels.contains(&zstd_level) {
            return Err(invalid(
                "zstd-level",
                &zstd_level.to_string(),
                format!(
                    "zstd levels run from {} to {}",
                    levels.start(),
                    levels.end()
                ),
            ));
        }
        let nbd_unix = self.nbd_unix.or(file.nbd_unix);
        let nbd_tcp = self.nbd_tcp.or(file.nbd_tcp);
        let any_fuse = groups
            .iter()
            .flat_map(|g| &g.volumes)
            .any(|v| v.fuse.is_some());
        if nbd_unix.is_none() && nbd_tcp.is_none() && !any_fuse {
            // A volume needs a front end: NBD, or a FUSE export.
            return Err(ConfigError::Missing("nbd-unix"));
        }
        Ok(AgentConfig {
            groups,
            nbd_unix,
            nbd_tcp,
            spool_dir,
            spool_max_bytes,
            max_lag: match self.max_lag_ms.or(file.max_lag_ms) {
                None => Some(DEFAULT_MAX_LAG),
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
            },
            zstd_level,
            collector_url,
            agent_id: self.agent_id.or(file.agent_id).unwrap_or_else(hostname),
            hooks: crate::checkpoint::Hooks {
                pre: self.pre_checkpoint_hook.or(file.pre_checkpoint_hook),
                post: self.post_checkpoint_hook.or(file.post_checkpoint_hook),
            },
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_owned())
}

fn parse_volumes(specs: &[String]) -> Result<BTreeMap<VolumeName, VolumeSpec>, ConfigError> {
    if specs.is_empty() {
        return Err(ConfigError::Missing("volume"));
    }
    let mut volumes = BTreeMap::new();
    for spec in specs {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| invalid("volume", spec, "expected NAME=PATH"))?;
        let name = VolumeName::new(name).map_err(|e| invalid("volume", spec, e.to_string()))?;
        let mut parts = rest.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(invalid("volume", spec, "the path is empty"));
        }
        let mut fuse = None;
        for option in parts {
            match option.split_once('=') {
                Some(("fuse", file)) if !file.is_empty() => {
                    if fuse.replace(PathBuf::from(file)).is_some() {
                        return Err(invalid("volume", spec, "fuse= given twice"));
                    }
                }
                Some(("fuse", _)) => return Err(invalid("volume", spec, "the fuse file is empty")),
                _ => {
                    return Err(invalid(
                        "volume",
                        spec,
                        format!("unknown volume option {option:?} (expected fuse=FILE)"),
                    ))
                }
            }
        }
        if fuse.as_deref() == Some(Path::new(path)) {
            return Err(invalid(
                "volume",
                spec,
                "the fuse file must differ from the volume path",
            ));
        }
        if let Some(file) = &fuse {
            if let Some(other) = volumes
                .values()
                .find(|v: &&VolumeSpec| v.fuse.as_ref() == Some(file))
            {
                return Err(invalid(
                    "volume",
                    spec,
                    format!("volume {} already uses that fuse file", other.name),
                ));
            }
        }
        let volume = VolumeSpec {
            name: name.clone(),
            path: PathBuf::from(path),
            fuse,
        };
        if volumes.insert(name, volume).is_some() {
            return Err(invalid("volume", spec, "volume named twice"));
        }
    }
    Ok(volumes)
}

fn parse_groups(
    specs: &[String],
    volumes: &BTreeMap<VolumeName, VolumeSpec>,
) -> Result<Vec<GroupSpec>, ConfigError> {
    let mut groups = Vec::new();
    let mut grouped = BTreeMap::new();
    for spec in specs {
        let (name, members) = spec
            .split_once('=')
            .ok_or_else(|| invalid("group", spec, "expected NAME=VOL1,VOL2"))?;
        let name = GroupName::new(name).map_err(|e| invalid("group", spec, e.to_string()))?;
        let mut members_spec = Vec::new();
        for member in members.split(',').filter(|m| !m.is_empty()) {
            let volume = VolumeName::new(member)
                .ok()
                .and_then(|v| volumes.get(&v))
                .ok_or_else(|| invalid("group", spec, format!("{member:?} is not a --volume")))?;
            if let Some(other) = grouped.insert(volume.name.clone(), name.clone()) {
                return Err(invalid(
                    "group",
                    spec,
                    format!("{member} is already in group {other}"),
                ));
            }
            members_spec.push(volume.clone());
        }
        if members_spec.is_empty() {
            return Err(invalid("group", spec, "a group needs at least one volume"));
        }
        groups.push(GroupSpec {
            name,
            volumes: members_spec,
        });
    }
    for (name, volume) in volumes {
        if grouped.contains_key(name) {
            continue;
        }
        let group = GroupName::new(name.as_str())
            .map_err(|e| invalid("volume", name.as_str(), e.to_string()))?;
        if groups.iter().any(|g| g.name == group) {
            return Err(invalid(
                "volume",
                name.as_str(),
                "a group of that name exists; put the volume in it or rename",
            ));
        }
        groups.push(GroupSpec {
            name: group,
            volumes: vec![volume.clone()],
        });
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(list: &[&str]) -> AgentArgs {
        AgentArgs::parse_from(std::iter::once("tideline-agent").chain(list.iter().copied()))
    }

    #[test]
    fn groups_and_implicit_groups() {
        let config = args(&[
            "--volume=a=/tmp/a",
            "--volume=b=/tmp/b",
            "--volume=c=/tmp/c",
            "--group=db=a,b",
            "--spool-dir=/tmp/s",
            "--collector=http://127.0.0.1:1",
            "--nbd-unix=/tmp/n.sock",
        ])
        .resolve()
        .unwrap();
        let names: Vec<_> = config.groups.iter().map(|g| g.name.to_string()).collect();
        assert_eq!(names, ["db", "c"]);
        assert_eq!(config.groups[0].volumes.len(), 2);
        assert_eq!(config.max_lag, Some(DEFAULT_MAX_LAG));
        assert_eq!(config.zstd_level, DEFAULT_ZSTD_LEVEL);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = ["--spool-dir=/s", "--collector=http://x:1", "--nbd-unix=/n"];
        let err = |extra: &[&str]| {
            let mut all: Vec<&str> = extra.to_vec();
            all.extend(base);
            args(&all).resolve().unwrap_err().to_string()
        };
        assert!(err(&["--volume=a"]).contains("expected NAME=PATH"));
        assert!(err(&["--volume=a=/x", "--group=g=b"]).contains("not a --volume"));
        assert!(err(&["--volume=a=/x", "--group=g=a", "--group=h=a"]).contains("already in group"));
        assert!(err(&["--volume=../a=/x"]).contains("invalid volume name"));
        let level = err(&["--volume=a=/x", "--zstd-level=23"]);
        assert!(
            level.contains("--zstd-level \"23\": zstd levels run from"),
            "{level}"
        );
        let no_collector = args(&["--volume=a=/x", "--spool-dir=/s", "--nbd-unix=/n"]).resolve();
        // TIDELINE_COLLECTOR may be set in the environment of whoever runs the tests.
        if std::env::var_os("TIDELINE_COLLECTOR").is_none() {
            assert!(no_collector.unwrap_err().to_string().contains("collector"));
        }
    }

    #[test]
    fn toml_file_under_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "volume = [\"a=/x\"]\nspool_dir = \"/s\"\ncollector = \"http://f:1\"\nnbd_unix = \"/n\"\nspool_max_bytes = 33554432\nmax_lag_ms = 0\nzstd_level = 3\n",
        )
        .unwrap();
        let config = args(&[
            "--config",
            path.to_str().unwrap(),
            "--collector=http://cli:2",
        ])
        .resolve()
        .unwrap();
        assert_eq!(config.collector_url, "http://cli:2");
        assert_eq!(config.spool_max_bytes, 32 << 20);
        assert_eq!(config.max_lag, None, "0 never holds writes up");
        assert_eq!(config.zstd_level, 3);
        let two_seconds = args(&["--config", path.to_str().unwrap(), "--max-lag-ms=2000"]);
        assert_eq!(
            two_seconds.resolve().unwrap().max_lag,
            Some(Duration::from_secs(2))
        );
        let fast = args(&["--config", path.to_str().unwrap(), "--zstd-level", "-5"]);
        assert_eq!(fast.resolve().unwrap().zstd_level, -5);
        std::fs::write(&path, "volumes = []\n").unwrap();
        let err = args(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn fuse_export_option() {
        let config = args(&[
            "--volume=a=/v/a,fuse=/mnt/a.img",
            "--volume=b=/v/b",
            "--spool-dir=/s",
            "--collector=http://c:1",
        ])
        .resolve()
        .unwrap();
        let volumes: Vec<_> = config.groups.iter().flat_map(|g| &g.volumes).collect();
        assert_eq!(volumes[0].path, PathBuf::from("/v/a"));
        assert_eq!(volumes[0].fuse.as_deref(), Some(Path::new("/mnt/a.img")));
        assert_eq!(volumes[1].fuse, None);
        // A FUSE export is a front end: no NBD listener is needed...
        assert!(config.nbd_unix.is_none() && config.nbd_tcp.is_none());
        // ...but without one a volume needs some front end.
        let none = args(&[
            "--volume=b=/v/b",
            "--spool-dir=/s",
            "--collector=http://c:1",
        ]);
        assert!(none.resolve().unwrap_err().to_string().contains("nbd-unix"));

        let err = |volume: &str| {
            args(&[volume, "--spool-dir=/s", "--collector=http://c:1"])
                .resolve()
                .unwrap_err()
                .to_string()
        };
        assert!(err("--volume=a=/v/a,fuse=").contains("fuse file is empty"));
        assert!(err("--volume=a=/v/a,fuse=/f,fuse=/g").contains("given twice"));
        assert!(err("--volume=a=/v/a,nbd=x").contains("unknown volume option \"nbd=x\""));
        assert!(err("--volume=a=/v/a,fuse").contains("unknown volume option"));
        assert!(err("--volume=a=,fuse=/f").contains("path is empty"));
        assert!(err("--volume=a=/v/a,fuse=/v/a").contains("must differ"));
        let twice = args(&[
            "--volume=a=/v/a,fuse=/f",
            "--volume=b=/v/b,fuse=/f",
            "--spool-dir=/s",
            "--collector=http://c:1",
        ])
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(
            twice.contains("volume a already uses that fuse file"),
            "{twice}"
        );
    }

    #[test]
    fn fuse_export_in_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "volume = [\"data=/v/data,fuse=/mnt/data.img\", \"wal=/v/wal,fuse=/mnt/wal.img\"]\n\
             group = [\"db=data,wal\"]\nspool_dir = \"/s\"\ncollector = \"http://f:1\"\n",
        )
        .unwrap();
        let config = args(&["--config", path.to_str().unwrap()])
            .resolve()
            .unwrap();
        assert_eq!(config.groups.len(), 1);
        let fuse: Vec<_> = config.groups[0]
            .volumes
            .iter()
            .map(|v| v.fuse.clone().unwrap())
            .collect();
        assert_eq!(
            fuse,
            [
                PathBuf::from("/mnt/data.img"),
                PathBuf::from("/mnt/wal.img")
            ]
        );
    }
}
