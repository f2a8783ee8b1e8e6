//! Checkpoints travel CLI -> collector -> agent -> journal; group restores cut every volume at
//! the same point. Collector and agent run in-process on loopback; writes go through NBD with
//! the agent's own client; the operator surface is the real `tideline` binary.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tideline_agent::config::{AgentConfig, GroupSpec, VolumeSpec};
use tideline_agent::nbd::NbdClient;
use tideline_core::{GroupName, VolumeName};
use tokio::sync::oneshot;

const MIB: usize = 1 << 20;

struct Cluster {
    url: String,
    dir: tempfile::TempDir,
    stops: Vec<oneshot::Sender<()>>,
    _runtime: tokio::runtime::Runtime,
}

fn start(pre_hook: Option<String>) -> Cluster {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        std::fs::File::create(dir.path().join(format!("{name}.img")))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
    }
    let (url, stops) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop_c, stopped_c) = oneshot::channel::<()>();
        let config = tideline_collector::config::CollectorConfig::new(dir.path().join("data"));
        tokio::spawn(tideline_collector::run(config, listener, async {
            let _ = stopped_c.await;
        }));
        let volume = |name: &str| VolumeSpec {
            name: VolumeName::new(name).unwrap(),
            path: dir.path().join(format!("{name}.img")),
            fuse: None,
        };
        let config = AgentConfig {
            groups: vec![GroupSpec {
                name: GroupName::new("db").unwrap(),
                volumes: vec![volume("a"), volume("b")],
            }],
            nbd_unix: Some(dir.path().join("nbd.sock")),
            nbd_tcp: None,
            spool_dir: dir.path().join("spool"),
            spool_max_bytes: 64 << 20,
            max_lag: Some(tideline_agent::config::DEFAULT_MAX_LAG),
            zstd_level: tideline_core::frame::DEFAULT_ZSTD_LEVEL,
            collector_url: url.clone(),
            agent_id: "test".into(),
            hooks: tideline_agent::checkpoint::Hooks {
                pre: pre_hook,
                post: Some(format!(
                    "echo post-$TIDELINE_CHECKPOINT >> {}",
                    dir.path().join("hooks.log").display()
                )),
            },
        };
        let listeners = tideline_agent::Listeners::bind(&config).await.unwrap();
        let (stop_a, stopped_a) = oneshot::channel::<()>();
        tokio::spawn(tideline_agent::run(config, listeners, async {
            let _ = stopped_a.await;
        }));
        (url, vec![stop_a, stop_c])
    });
    Cluster {
        url,
        dir,
        stops,
        _runtime: runtime,
    }
}

impl Cluster {
    fn tideline(&self, args: &[&str]) -> (bool, String, String) {
        let out = tideline_testkit::run_within(
            Command::new(env!("CARGO_BIN_EXE_tideline"))
                .args(args)
                .env("TIDELINE_COLLECTOR", &self.url),
            Duration::from_secs(120),
        );
        (out.success(), out.stdout, out.stderr)
    }

    fn write(&self, volume: &str, byte: u8) {
        let mut nbd = NbdClient::connect_unix(&self.dir.path().join("nbd.sock"), volume).unwrap();
        nbd.write(0, &vec![byte; MIB], false).unwrap();
        nbd.flush().unwrap();
        nbd.disconnect().unwrap();
    }

    /// Retries `checkpoint` until the agent's journal stream is attached (bounded).
    fn checkpoint(&self, name: &str, app: bool) -> (bool, String, String) {
        let mut args = vec!["checkpoint", "--group", "db", "--name", name];
        if app {
            args.push("--app-consistent");
        }
        tideline_testkit::wait_for(
            "the agent's journal stream",
            Duration::from_secs(30),
            || {
                let result = self.tideline(&args);
                (result.0 || !result.2.contains("no agent is streaming")).then_some(result)
            },
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

fn first_byte_everywhere(path: &Path, byte: u8) -> bool {
    let data = std::fs::read(path).unwrap();
    data[..MIB].iter().all(|&b| b == byte) && data[MIB..].iter().all(|&b| b == 0)
}

fn wait_for_socket(cluster: &Cluster) {
    let socket = cluster.dir.path().join("nbd.sock");
    tideline_testkit::wait_for("the agent's socket", Duration::from_secs(30), || {
        socket.exists().then_some(())
    });
}

#[test]
fn checkpoint_restores_every_volume_of_the_group_at_one_cut() {
    let hooks_log = tempfile::NamedTempFile::new().unwrap();
    let pre = format!(
        "echo pre-$TIDELINE_GROUP-$TIDELINE_CHECKPOINT >> {}",
        hooks_log.path().display()
    );
    let cluster = start(Some(pre));
    wait_for_socket(&cluster);
    cluster.write("a", 0x11);
    cluster.write("b", 0x22);
    let (ok, stdout, stderr) = cluster.checkpoint("before", true);
    assert!(ok, "checkpoint failed: {stderr}");
    assert!(stdout.contains("app-consistent"), "{stdout}");
    cluster.write("a", 0x33);
    cluster.write("b", 0x44);

    let hooks = std::fs::read_to_string(hooks_log.path()).unwrap();
    assert_eq!(hooks.trim(), "pre-db-before");
    let post = std::fs::read_to_string(cluster.dir.path().join("hooks.log")).unwrap();
    assert_eq!(post.trim(), "post-before");

    let (ok, stdout, _) = cluster.tideline(&["points", "--group", "db", "--checkpoints", "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["points"][0]["name"], "before");
    assert_eq!(listed["points"][0]["app_consistent"], true);
    assert_eq!(listed["volumes"], serde_json::json!(["a", "b"]));

    let out = cluster.dir.path().join("at-checkpoint");
    let (ok, _, stderr) = cluster.tideline(&[
        "restore",
        "--group",
        "db",
        "--checkpoint",
        "before",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(first_byte_everywhere(&out.join("a.img"), 0x11));
    assert!(first_byte_everywhere(&out.join("b.img"), 0x22));

    let (ok, _, _) =
        cluster.tideline(&["wait", "--volume", "b", "--until", "now", "--timeout", "30"]);
    assert!(ok);
    let latest = cluster.dir.path().join("latest");
    let (ok, _, stderr) = cluster.tideline(&[
        "restore",
        "--group",
        "db",
        "--latest",
        "--out-dir",
        latest.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(first_byte_everywhere(&latest.join("a.img"), 0x33));
    assert!(first_byte_everywhere(&latest.join("b.img"), 0x44));

    let (ok, _, stderr) = cluster.checkpoint("before", false);
    assert!(!ok);
    assert!(
        stderr.contains("already has a checkpoint named before"),
        "{stderr}"
    );
    let (ok, _, stderr) = cluster.tideline(&[
        "restore",
        "--group",
        "db",
        "--checkpoint",
        "nope",
        "--out-dir",
        latest.to_str().unwrap(),
        "--force",
    ]);
    assert!(!ok);
    assert!(stderr.contains("no checkpoint named \"nope\""), "{stderr}");
}

#[test]
fn a_failing_pre_hook_fails_the_checkpoint_and_records_nothing() {
    let cluster = start(Some("echo frozen-fs-busy >&2; exit 3".into()));
    wait_for_socket(&cluster);
    cluster.write("a", 0x55);
    let (ok, _, stderr) = cluster.checkpoint("nightly", true);
    assert!(!ok);
    assert!(
        stderr.contains("pre-checkpoint hook") && stderr.contains("frozen-fs-busy"),
        "{stderr}"
    );
    let (ok, stdout, _) = cluster.tideline(&["points", "--group", "db", "--checkpoints", "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed["points"], serde_json::json!([]));
    // The post hook still ran, to undo a partial quiesce.
    let post = std::fs::read_to_string(cluster.dir.path().join("hooks.log")).unwrap();
    assert_eq!(post.trim(), "post-nightly");
    // A crash-consistent checkpoint runs no hooks and succeeds.
    let (ok, _, stderr) = cluster.checkpoint("crash-consistent", false);
    assert!(ok, "{stderr}");
}
