#!/usr/bin/env bash
# Runs the whole Tideline test suite, installing the Debian packages the tests drive when they
# are missing. Tests that need root or kernel features skip loudly on a user's machine and fail
# under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need qemu-io qemu-utils
need qemu-img qemu-utils
need nbdinfo libnbd-bin
need nbdcopy libnbd-bin
need mkfs.ext4 e2fsprogs
need e2fsck e2fsprogs
need losetup mount
need runuser util-linux
need psql postgresql-client-15
need pgbench postgresql-15
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing test dependencies: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# The acceptance tests run the real binaries; build them first.
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
