#!/usr/bin/env bash
# PostgreSQL through the tap: pgbench TPS on ext4 on a loop device over a plain file, against the
# same on a loop device over the agent's FUSE export while the agent journals to a collector.
#
#   bash benches/pgbench_tap.sh            # RUNS=3 SECONDS_PER_RUN=30 CLIENTS=4 SCALE=10
#
# Needs root, /dev/fuse, loop devices and PostgreSQL 15 (apt-get install -y postgresql-15).
# Builds the release binaries. Prints a table: median TPS with min and max of RUNS runs each,
# the runs interleaved (plain, tap, plain, tap, ...) so drift on a shared machine hits both.
# Writes target/bench/pgbench_tap.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
RUNS=${RUNS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-30}
CLIENTS=${CLIENTS:-4}
SCALE=${SCALE:-10}
BIN=/usr/lib/postgresql/15/bin
[ "$(id -u)" = 0 ] || { echo "pgbench_tap.sh: needs root (loop devices, mount, FUSE)" >&2; exit 2; }
[ -x "$BIN/postgres" ] || { echo "pgbench_tap.sh: PostgreSQL 15 missing: apt-get install -y postgresql-15" >&2; exit 2; }

cargo build --release --quiet --bin tideline-agent --bin tideline-collector
REL=$PWD/target/release
OUT=$PWD/target/bench
mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/tideline-pgbench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
LOOPS=()
# Stops what was started, in order (server, filesystem, loop device, agent and collector),
# whatever failed: no step may abort the rest.
cleanup() {
    set +e
    [ -f "$WORK/mnt/pgdata/postmaster.pid" ] &&
        runuser -u postgres -- "$BIN/pg_ctl" -D "$WORK/mnt/pgdata" -m immediate -w -t 60 stop >/dev/null 2>&1
    mountpoint -q "$WORK/mnt" && { umount "$WORK/mnt" || umount -l "$WORK/mnt"; }
    for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
    stop_tap
    rm -rf "$WORK"
}
trap cleanup EXIT

# One pgbench run on a fresh ext4 over FILE; sets TPS.
run_once() {
    local file=$1
    local loop
    loop=$(losetup --find --show --direct-io=on "$file")
    LOOPS+=("$loop")
    mkfs.ext4 -q -F "$loop"
    mkdir -p "$WORK/mnt" && mount -o noatime "$loop" "$WORK/mnt"
    mkdir -p "$WORK/mnt/pgdata" "$WORK/sock" && chown postgres: "$WORK/mnt/pgdata" "$WORK/sock"
    chmod 700 "$WORK/mnt/pgdata"
    runuser -u postgres -- "$BIN/initdb" -A trust -U postgres --no-instructions -D "$WORK/mnt/pgdata" >/dev/null
    printf "listen_addresses = ''\nunix_socket_directories = '%s'\nshared_buffers = '128MB'\nmax_wal_size = '512MB'\n" \
        "$WORK/sock" >>"$WORK/mnt/pgdata/postgresql.conf"
    touch "$WORK/pg.log" && chown postgres "$WORK/pg.log"
    runuser -u postgres -- "$BIN/pg_ctl" -D "$WORK/mnt/pgdata" -l "$WORK/pg.log" -w start >/dev/null
    runuser -u postgres -- pgbench -h "$WORK/sock" -i -s "$SCALE" -q postgres >/dev/null 2>&1
    runuser -u postgres -- psql -h "$WORK/sock" -XAtq -c CHECKPOINT postgres
    sync
    TPS=$(runuser -u postgres -- pgbench -h "$WORK/sock" -c "$CLIENTS" -j 2 -T "$SECONDS_PER_RUN" postgres 2>/dev/null |
        awk '/^tps = / {print $3}')
    runuser -u postgres -- "$BIN/pg_ctl" -D "$WORK/mnt/pgdata" -m fast -w stop >/dev/null
    umount "$WORK/mnt"
    losetup -d "$loop"
    LOOPS=()
}

# The tap: a collector and an agent exporting one volume over FUSE at $TAP_FILE. Not called in
# a command substitution: the children would hold its pipe open and PIDS would be lost.
start_tap() {
    local n=$1
    local dir="$WORK/tap$n"
    mkdir -p "$dir"
    truncate -s 4G "$dir/vol.img"
    "$REL/tideline-collector" --data-dir "$dir/collector" --listen 127.0.0.1:0 >"$dir/collector.out" 2>"$dir/collector.log" &
    PIDS+=($!)
    for _ in $(seq 100); do grep -q listening "$dir/collector.out" && break; sleep 0.1; done
    local addr
    addr=$(awk '/^listening on / {print $3}' "$dir/collector.out")
    [ -n "$addr" ] || { echo "the collector did not start; its log:" >&2; cat "$dir/collector.log" >&2; exit 1; }
    "$REL/tideline-agent" --volume "vol=$dir/vol.img,fuse=$dir/vol.fuse" --nbd-unix "$dir/nbd.sock" \
        --spool-dir "$dir/spool" --collector "http://$addr" >/dev/null 2>"$dir/agent.log" &
    PIDS+=($!)
    for _ in $(seq 100); do mountpoint -q "$dir/vol.fuse" && break; sleep 0.1; done
    mountpoint -q "$dir/vol.fuse" || { echo "the agent did not mount its FUSE export; its log:" >&2; cat "$dir/agent.log" >&2; exit 1; }
    TAP_FILE="$dir/vol.fuse"
}

# SIGTERM to the agent and collector, SIGKILL to whichever has not exited 30 s later.
stop_tap() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}

plain=()
tap=()
for i in $(seq "$RUNS"); do
    truncate -s 4G "$WORK/plain$i.img"
    run_once "$WORK/plain$i.img"
    plain+=("$TPS")
    rm -f "$WORK/plain$i.img"
    start_tap "$i"
    run_once "$TAP_FILE"
    tap+=("$TPS")
    stop_tap
    rm -rf "$WORK/tap$i"
    echo "run $i: plain ${plain[-1]} tps, tap ${tap[-1]} tps" >&2
done

python3 - "$OUT" "$RUNS" "$SECONDS_PER_RUN" "$CLIENTS" "$SCALE" "${plain[*]}" "${tap[*]}" <<'PY'
import json, statistics, sys
out, runs, seconds, clients, scale = sys.argv[1:6]
plain = [float(x) for x in sys.argv[6].split()]
tap = [float(x) for x in sys.argv[7].split()]
row = lambda xs: {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}
doc = {"runs": int(runs), "seconds_per_run": int(seconds), "clients": int(clients), "scale": int(scale),
       "plain_loop_tps": row(plain), "tap_fuse_loop_tps": row(tap),
       "ratio_tap_to_plain": statistics.median(tap) / statistics.median(plain)}
md = [f"pgbench TPC-B-like, scale {scale}, {clients} clients, {seconds} s per run, {runs} runs each (median, min-max)",
      "", "| setup | TPS | min | max |", "|---|---:|---:|---:|"]
for name, key in [("ext4 on loop on a plain file", "plain_loop_tps"), ("ext4 on loop on the Tideline FUSE export (journaling)", "tap_fuse_loop_tps")]:
    r = doc[key]
    md.append(f"| {name} | {r['median']:.0f} | {r['min']:.0f} | {r['max']:.0f} |")
md.append("")
md.append(f"Tap / plain: {doc['ratio_tap_to_plain']:.2f}")
open(f"{out}/pgbench_tap.json", "w").write(json.dumps(doc, indent=2))
open(f"{out}/pgbench_tap.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
