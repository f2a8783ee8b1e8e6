#!/usr/bin/env bash
# Drill check: start PostgreSQL on restored images and prove the database is consistent.
#
#   postgres.sh DATA_IMAGE [WAL_IMAGE]
#
# DATA_IMAGE holds an ext4 filesystem with the cluster in $PGDATA_SUBDIR (default: pgdata);
# WAL_IMAGE, when the WAL lives on its own volume, holds it in $WAL_SUBDIR (default: pg_wal).
# Both are scratch copies (for example the images `tideline drill` or `tideline restore` wrote):
# this script mounts them read-write, so ext4 replays its journal and PostgreSQL runs crash
# recovery on them, exactly as after a power cut. It points the copy's pg_wal at the restored
# WAL, starts the server on a private socket (no TCP), and checks:
#   - crash recovery completes and the server accepts queries;
#   - if the pgbench tables exist: sum(abalance) of pgbench_accounts = sum(bbalance) of
#     pgbench_branches = sum(tbalance) of pgbench_tellers = sum(delta) of pgbench_history;
#   - otherwise: `SELECT 1` (override with $CHECK_SQL, which must print `t`).
# Exit 0 when everything holds; non-zero with the reason on stderr otherwise. Needs root (mount).
set -euo pipefail

data_image=${1:?usage: postgres.sh DATA_IMAGE [WAL_IMAGE]}
wal_image=${2:-}
pgdata_subdir=${PGDATA_SUBDIR:-pgdata}
wal_subdir=${WAL_SUBDIR:-pg_wal}
bindir=${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$bindir/postgres" ] || { echo "postgres.sh: no PostgreSQL server binaries in '$bindir' (set PG_BINDIR)" >&2; exit 2; }

work=$(mktemp -d /tmp/tideline-pgcheck.XXXXXX)
# Whatever fails, stop the server this script started (a pg_ctl that timed out may have left
# it running), unmount the copies (lazily if busy) and remove the work directory.
cleanup() {
    set +e
    if [ -f "$work/data/$pgdata_subdir/postmaster.pid" ]; then
        runuser -u postgres -- "$bindir/pg_ctl" -D "$work/data/$pgdata_subdir" -m immediate -w -t 60 stop >/dev/null 2>&1
    fi
    for dir in "$work/wal" "$work/data"; do
        mountpoint -q "$dir" && { umount "$dir" || umount -l "$dir"; }
    done
    rm -rf "$work"
}
trap cleanup EXIT
chmod 755 "$work"
mkdir -p "$work/data" "$work/wal" "$work/socket"
chown postgres: "$work/socket"

mount -o loop "$data_image" "$work/data"
pgdata="$work/data/$pgdata_subdir"
[ -f "$pgdata/PG_VERSION" ] || { echo "postgres.sh: $data_image holds no cluster in $pgdata_subdir" >&2; exit 1; }
if [ -n "$wal_image" ]; then
    mount -o loop "$wal_image" "$work/wal"
    [ -d "$work/wal/$wal_subdir" ] || { echo "postgres.sh: $wal_image holds no $wal_subdir" >&2; exit 1; }
    # The restored pg_wal link still names the production WAL mount; point it at the copy.
    ln -sfn "$work/wal/$wal_subdir" "$pgdata/pg_wal"
fi
# The lock file of the crashed server names a PID that may be alive on this host.
rm -f "$pgdata/postmaster.pid"

log="$work/postgres.log"
touch "$log" && chown postgres: "$log"
if ! runuser -u postgres -- "$bindir/pg_ctl" -D "$pgdata" -l "$log" -w -t 300 \
    -o "-c listen_addresses='' -c unix_socket_directories='$work/socket' -c port=5432 -c archive_mode=off" start >/dev/null; then
    echo "postgres.sh: PostgreSQL did not start on the restored images; its log:" >&2
    cat "$log" >&2
    exit 1
fi
grep -E "redo done|database system was not properly shut down|database system is ready" "$log" || true

psql_q() { runuser -u postgres -- psql -h "$work/socket" -p 5432 -d "${PGDATABASE:-postgres}" -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
has_pgbench=$(psql_q "SELECT to_regclass('pgbench_accounts') IS NOT NULL")
if [ "$has_pgbench" = t ]; then
    row=$(psql_q "SELECT (SELECT coalesce(sum(abalance),0) FROM pgbench_accounts),
                         (SELECT coalesce(sum(bbalance),0) FROM pgbench_branches),
                         (SELECT coalesce(sum(tbalance),0) FROM pgbench_tellers),
                         (SELECT coalesce(sum(delta),0) FROM pgbench_history),
                         (SELECT count(*) FROM pgbench_history)")
    IFS='|' read -r accounts branches tellers history transactions <<<"$row"
    echo "pgbench sums: accounts=$accounts branches=$branches tellers=$tellers history=$history ($transactions transactions)"
    if [ "$accounts" != "$branches" ] || [ "$accounts" != "$tellers" ] || [ "$accounts" != "$history" ]; then
        echo "postgres.sh: pgbench invariant broken: the balance sums differ" >&2
        exit 1
    fi
    echo "pgbench invariants hold"
else
    answer=$(psql_q "${CHECK_SQL:-SELECT 1 = 1}")
    [ "$answer" = t ] || { echo "postgres.sh: check query printed '$answer', not 't'" >&2; exit 1; }
    echo "check query holds"
fi
runuser -u postgres -- "$bindir/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
