//! The operator CLI: demo, restore's refusal to overwrite, wait's timeout, time parsing, the
//! volume listing, and the ways to name the collector.

use std::time::{Duration, Instant};

use crate::harness::{self, Agent, AgentSpec, Collector, Rig, MIB};

#[test]
fn demo_passes_within_a_minute() {
    let started = Instant::now();
    let output = harness::run_within(
        harness::tideline_cmd().arg("demo"),
        Duration::from_secs(120),
    );
    let elapsed = started.elapsed();
    assert!(output.success(), "tideline demo: {output}");
    assert!(output.stdout.contains("demo passed"), "{output}");
    assert!(
        elapsed < Duration::from_secs(60),
        "tideline demo took {elapsed:?}"
    );
    println!("tideline demo passed in {:.1} s", elapsed.as_secs_f64());
}

/// A rig whose volume holds 1 MiB of 0x42 at offset 0, durable at the collector.
fn rig_with_data(volume: &str) -> Rig {
    let rig = Rig::new(volume, 4 * MIB);
    let mut client = rig.agent.nbd(volume);
    client.write(0, &[0x42; MIB as usize], true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();
    rig
}

#[test]
fn restore_refuses_to_overwrite_without_force() {
    let rig = rig_with_data("overwrite");
    let out = rig.path("existing.img");
    std::fs::write(&out, b"precious").unwrap();
    let args = [
        "restore",
        "--volume",
        "overwrite",
        "--latest",
        "--out",
        out.to_str().unwrap(),
    ];
    let output = harness::tideline(&rig.url(), &args);
    assert!(!output.success(), "restore overwrote a file: {output}");
    assert!(output.stderr.contains("--force"), "{output}");
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let mut forced = args.to_vec();
    forced.push("--force");
    let output = harness::tideline(&rig.url(), &forced);
    assert!(output.success(), "restore --force: {output}");
    let image = std::fs::read(&out).unwrap();
    assert_eq!(image.len() as u64, 4 * MIB);
    assert!(image[..MIB as usize].iter().all(|&b| b == 0x42));
    assert!(image[MIB as usize..].iter().all(|&b| b == 0));

    // Even with --force, a device (here a link to /dev/null) is never replaced by a file.
    let device = rig.path("device.img");
    std::os::unix::fs::symlink("/dev/null", &device).unwrap();
    let mut onto_device = forced.clone();
    let out_index = onto_device.iter().position(|a| *a == "--out").unwrap() + 1;
    onto_device[out_index] = device.to_str().unwrap();
    let output = harness::tideline(&rig.url(), &onto_device);
    assert!(!output.success(), "restore replaced a device: {output}");
    assert!(output.stderr.contains("not a regular file"), "{output}");
    assert_eq!(
        std::fs::read_link(&device).unwrap(),
        std::path::Path::new("/dev/null")
    );
}

#[test]
fn restore_onto_a_filesystem_too_small_fails_before_writing_and_leaves_nothing() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = (!root).then(|| "root, to mount a small tmpfs".to_owned());
    if !harness::skip_or_fail(missing.into_iter().collect()) {
        return;
    }
    let rig = rig_with_data("nospace");
    let small = rig.path("small");
    let _mounted = crate::kernel::Mounted::mount(
        &["-t", "tmpfs", "-o", "size=512k"],
        std::path::Path::new("tmpfs"),
        &small,
    );
    let out = small.join("image.img");
    let args = ["restore", "--volume", "nospace", "--latest", "--out"];
    let mut args = args.to_vec();
    args.push(out.to_str().unwrap());
    let output = harness::tideline(&rig.url(), &args);
    assert!(!output.success(), "restore of 1 MiB into 512 KiB: {output}");
    assert!(
        output.stderr.contains("no space for the restored image")
            && output.stderr.contains("nothing was written")
            && output.stderr.contains("restore to another filesystem"),
        "{output}"
    );
    let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn wait_times_out_and_restore_refuses_times_it_cannot_vouch_for() {
    let rig = rig_with_data("waiting");
    let url = rig.url();
    // Far ahead, yet within the range of i64 nanoseconds (up to 2262).
    let future = "2200-01-01T00:00:00.000000000Z";

    let started = Instant::now();
    let output = harness::tideline(
        &url,
        &[
            "wait",
            "--volume",
            "waiting",
            "--until",
            future,
            "--timeout",
            "1",
        ],
    );
    let elapsed = started.elapsed();
    assert!(
        !output.success(),
        "wait for the year 2999 succeeded: {output}"
    );
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(30),
        "wait --timeout 1 took {elapsed:?}"
    );
    assert!(output.stderr.contains("timed out"), "{output}");

    let out = rig.path("future.img");
    let output = harness::tideline(
        &url,
        &[
            "restore",
            "--volume",
            "waiting",
            "--at",
            future,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        !output.success(),
        "restored a point in the future: {output}"
    );
    assert!(output.stderr.contains("tideline wait"), "{output}");
    assert!(!out.exists());

    let output = harness::tideline(
        &url,
        &[
            "restore",
            "--volume",
            "waiting",
            "--at",
            "2001-01-01T00:00:00Z",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        !output.success(),
        "restored a point before the volume was protected: {output}"
    );
    assert!(output.stderr.contains("waiting"), "{output}");
    assert!(!out.exists());

    let output = harness::tideline(
        &url,
        &[
            "wait",
            "--volume",
            "nosuch",
            "--until",
            "now",
            "--timeout",
            "1",
        ],
    );
    assert!(!output.success(), "wait for an unknown volume: {output}");
    assert!(output.stderr.contains("nosuch"), "{output}");
}

#[test]
fn malformed_times_are_refused_naming_rfc_3339() {
    let rig = rig_with_data("badtime");
    let out = rig.path("out.img");
    for bad in [
        "yesterday",
        "2026-11-22 10:15:30",
        "2026-11-22T10:15:30",
        "12:00",
    ] {
        let output = harness::tideline(
            &rig.url(),
            &[
                "restore",
                "--volume",
                "badtime",
                "--at",
                bad,
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(!output.success(), "restore --at {bad:?}: {output}");
        assert!(
            output.stderr.contains("RFC 3339"),
            "restore --at {bad:?}: {output}"
        );
        let output = harness::tideline(
            &rig.url(),
            &[
                "wait",
                "--volume",
                "badtime",
                "--until",
                bad,
                "--timeout",
                "1",
            ],
        );
        assert!(!output.success(), "wait --until {bad:?}: {output}");
        assert!(
            output.stderr.contains("RFC 3339"),
            "wait --until {bad:?}: {output}"
        );
    }
    assert!(!out.exists());
    // A well-formed time with an offset other than Z is fine.
    let now = time::OffsetDateTime::now_utc();
    let at = now
        .to_offset(time::macros::offset!(+02:00))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    harness::wait_durable(&rig.url(), "badtime", &at);
    harness::restore(&rig.url(), "badtime", Some(&at), &out);
    // Beyond what i64 nanoseconds hold.
    let output = harness::tideline(
        &rig.url(),
        &[
            "wait",
            "--volume",
            "badtime",
            "--until",
            "2999-01-01T00:00:00Z",
            "--timeout",
            "1",
        ],
    );
    assert!(!output.success(), "wait --until 2999: {output}");
    assert!(
        output.stderr.contains("range"),
        "wait --until 2999: {output}"
    );
}

#[test]
fn volumes_json_lists_each_volume_with_its_group_and_window() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path());
    let (a, b, solo) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("solo.img"),
    );
    harness::sparse_file(&a, 4 * MIB);
    harness::sparse_file(&b, 8 * MIB);
    harness::sparse_file(&solo, 4 * MIB);
    let spec = AgentSpec {
        volumes: vec![("dba".into(), a), ("dbb".into(), b), ("solo".into(), solo)],
        groups: vec!["db=dba,dbb".into()],
        spool_max_bytes: Some(64 * MIB),
        ..AgentSpec::default()
    };
    let agent = Agent::start(dir.path(), &collector.url(), spec);
    for v in ["dba", "dbb", "solo"] {
        collector.wait_complete(v);
    }
    let mut client = agent.nbd("dbb");
    client.write(MIB, &[7; 8192], true).unwrap();
    client.disconnect().unwrap();
    harness::wait_durable(&collector.url(), "dba", &harness::now_rfc3339());

    let output = harness::tideline(&collector.url(), &["volumes", "--json"]);
    assert!(output.success(), "{output}");
    let rows: serde_json::Value = serde_json::from_str(&output.stdout)
        .unwrap_or_else(|e| panic!("volumes --json is not JSON ({e}): {output}"));
    let rows = rows.as_array().expect("a JSON array");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {rows:?}"))
    };
    for (name, group, size) in [
        ("dba", "db", 4 * MIB),
        ("dbb", "db", 8 * MIB),
        ("solo", "solo", 4 * MIB),
    ] {
        let r = row(name);
        assert_eq!(r["group"], group, "{r}");
        assert_eq!(r["size_bytes"], size, "{r}");
        assert_eq!(r["complete"], true, "{r}");
        let (oldest, newest) = (r["oldest"].as_str(), r["newest"].as_str());
        let (oldest, newest) = (oldest.expect("oldest"), newest.expect("newest"));
        let parse = |t: &str| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("{t:?} is not RFC 3339: {e}"))
        };
        assert!(parse(oldest) <= parse(newest), "{r}");
        assert!(r["lag_ms"].is_u64(), "{r}");
    }
    // One journal order per group: the grouped volumes share a durable seq.
    assert_eq!(row("dba")["durable_seq"], row("dbb")["durable_seq"]);

    let output = harness::tideline(&collector.url(), &["volumes"]);
    assert!(
        output.success() && output.stdout.contains("dbb"),
        "{output}"
    );
}

#[test]
fn collector_is_named_before_or_after_the_subcommand_or_by_environment() {
    let rig = rig_with_data("naming");
    let url = rig.url();
    let listed = |output: harness::Output| {
        assert!(output.success(), "{output}");
        assert!(output.stdout.contains("\"naming\""), "{output}");
    };
    listed(harness::run(harness::tideline_cmd().args([
        "--collector",
        &url,
        "volumes",
        "--json",
    ])));
    listed(harness::run(harness::tideline_cmd().args([
        "volumes",
        "--json",
        "--collector",
        &url,
    ])));
    listed(harness::run(
        harness::tideline_cmd()
            .args(["volumes", "--json"])
            .env("TIDELINE_COLLECTOR", &url),
    ));
    // The option wins over the environment.
    listed(harness::run(
        harness::tideline_cmd()
            .args(["volumes", "--json", "--collector", &url])
            .env("TIDELINE_COLLECTOR", "http://127.0.0.1:1"),
    ));
    // An unreachable collector is named, with the ways to name another.
    let output = harness::run(
        harness::tideline_cmd()
            .args(["volumes"])
            .env("TIDELINE_COLLECTOR", "http://127.0.0.1:1"),
    );
    assert!(!output.success(), "{output}");
    assert!(
        output.stderr.contains("127.0.0.1:1") && output.stderr.contains("TIDELINE_COLLECTOR"),
        "{output}"
    );
}

/// `tideline restore --store DIR ARGS...` with an unreachable collector named, so only the
/// store directory can answer.
fn restore_from_store(store: &std::path::Path, args: &[&str]) -> harness::Output {
    let unreachable = "http://127.0.0.1:1";
    let mut all = vec!["restore", "--store", store.to_str().unwrap()];
    all.extend(args);
    harness::tideline(unreachable, &all)
}

#[test]
fn restore_and_drill_from_a_stopped_collectors_store_match_the_collectors_restores() {
    let mut rig = rig_with_data("offline");
    let first = harness::now_rfc3339();
    let mut client = rig.agent.nbd("offline");
    client
        .write(2 * MIB, &harness::random_bytes(7, MIB as usize), true)
        .unwrap();
    client.write(0, &[0x17; 4096], true).unwrap();
    client.disconnect().unwrap();
    rig.wait_now();
    let (at_first, at_latest) = (rig.path("first.img"), rig.path("latest.img"));
    harness::restore(&rig.url(), "offline", Some(&first), &at_first);
    harness::restore(&rig.url(), "offline", None, &at_latest);
    let store = rig.collector.data_dir.clone();

    let out = rig.path("from-store.img");
    let out_s = out.to_str().unwrap();
    let output = restore_from_store(&store, &["--volume", "offline", "--latest", "--out", out_s]);
    assert!(
        !output.success(),
        "read a store a collector holds: {output}"
    );
    assert!(
        output.stderr.contains("in use by another process")
            && output.stderr.contains("stop that collector first"),
        "{output}"
    );
    assert!(!out.exists());

    rig.agent.terminate();
    assert!(rig.collector.terminate().success());
    for (point, reference) in [
        (vec!["--latest"], &at_latest),
        (vec!["--at", &first], &at_first),
    ] {
        let mut args = vec!["--volume", "offline", "--out", out_s, "--force"];
        args.extend(point);
        let output = restore_from_store(&store, &args);
        assert!(output.success(), "restore --store: {output}");
        assert!(output.stdout.contains("restored"), "{output}");
        harness::assert_same_image(&out, reference, "restored from the store directory");
    }
    let dir = rig.path("group");
    let output = restore_from_store(
        &store,
        &[
            "--group",
            "offline",
            "--latest",
            "--out-dir",
            dir.to_str().unwrap(),
        ],
    );
    assert!(output.success(), "restore --store --group: {output}");
    harness::assert_same_image(
        &dir.join("offline.img"),
        &at_latest,
        "group restored from the store",
    );

    // A drill reads the store the same way: its check sees the latest image, and a check
    // that fails fails the drill.
    let latest_s = at_latest.to_str().unwrap();
    let store_s = store.to_str().unwrap();
    for (check, passes) in [
        (format!("cmp {{image:offline}} {latest_s}"), true),
        (
            format!("cmp {{image:offline}} {}", at_first.display()),
            false,
        ),
    ] {
        let output = harness::tideline(
            "http://127.0.0.1:1",
            &[
                "drill", "--store", store_s, "--group", "offline", "--check", &check,
            ],
        );
        assert_eq!(
            output.success(),
            passes,
            "drill --store --check {check:?}: {output}"
        );
        let verdict = if passes { "PASSED" } else { "FAILED" };
        assert!(output.text().contains(verdict), "{output}");
        assert!(output.stdout.contains("store directory"), "{output}");
    }

    // Nothing newer than the store's newest record can be vouched for without the agent.
    let future = "2200-01-01T00:00:00Z";
    let output = restore_from_store(
        &store,
        &[
            "--volume", "offline", "--at", future, "--out", out_s, "--force",
        ],
    );
    assert!(
        !output.success(),
        "restored a time after the store's newest record: {output}"
    );
    assert!(
        output.stderr.contains("newer than everything durable"),
        "{output}"
    );

    let missing = rig.path("no-store");
    let output = restore_from_store(
        &missing,
        &["--volume", "offline", "--latest", "--out", out_s, "--force"],
    );
    assert!(
        !output.success(),
        "restored from a directory with no store: {output}"
    );
    assert!(
        output.stderr.contains("holds no Tideline store"),
        "{output}"
    );
    assert!(!missing.exists(), "the missing store directory was created");
}
