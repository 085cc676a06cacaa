#!/usr/bin/env bash
# Benchmark: sluice's build store (fetch + sha256 + extract of a ~200 MB, 4,000-file .tar.gz from a
# local HTTP server, via `sluice deploy`) against `curl | sha256sum` and `curl | tar xz` of the same
# file in the same run (part A); and the time from the `enabled` write in ZooKeeper to the daemon
# acting on it, over 20 deploys (part B). Run from anywhere: bench/fetch.sh. See bench/README.md.
#
# Env:
#   BENCH_PARTS        which parts, default AB
#   BENCH_FILES        files in the build, default 4000
#   BENCH_BUILD_MB     unpacked size of the build, default 200
#   BENCH_RUNS         timed runs of each method (after one untimed), default 3
#   BENCH_ZK_ROUNDS    deploys timed in part B, default 20
#   BENCH_SKIP_BUILD=1 skip the cargo builds (uses target/release as it is)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

for tool in curl tar sha256sum python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[[ -x /usr/share/zookeeper/bin/zkServer.sh ]] || echo "note: no ZooKeeper (apt-get install zookeeper): part B will be skipped" >&2

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --release --workspace; cargo build --release -p sluice-tests --bins" >&2
    timeout 1800 cargo build --release --workspace
    timeout 1800 cargo build --release -p sluice-tests --bins
fi
for bin in sluice sluice-shim deploy_bench; do
    [[ -x "$repo/target/release/$bin" ]] || { echo "missing target/release/$bin" >&2; exit 1; }
done

mkdir -p "$repo/bench/results"
out="$repo/bench/results/fetch-$(date -u +%F)"
# Short path: unix socket paths are limited to 108 bytes. Every temp dir of the run is in it.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export TMPDIR="$work" BENCH_TAG="$work" SLUICE_BIN_DIR="$repo/target/release"
unset CI

# Bounded: ~3-5 minutes (making the archive, 4 x 4 fetches, 21 deploys); 20 minutes means something hung.
"$repo/target/release/deploy_bench" "$out" &
runner_pid=$!
( sleep 1200; kill -KILL "$runner_pid" 2>/dev/null ) &
watchdog=$!
wait "$runner_pid"
kill "$watchdog" 2>/dev/null || true
echo "== wrote $out.md and $out.json" >&2
