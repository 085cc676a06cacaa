#!/usr/bin/env bash
# Benchmark: one deploy of a large build across a fleet of hosts in racks (network namespaces on a
# bridge, one ZooKeeper, the harness's HTTP store with its uplink paced), store-only against
# through peers, in one run: bytes out of the store, deploy -> last host holding the verified
# build, deploy -> whole fleet serving, one host's own fetch as the baseline, brain RSS. Needs
# root and Debian's ZooKeeper. Run from anywhere: bench/fleet.sh. See bench/README.md.
#
# Env:
#   BENCH_HOSTS               hosts, default 24 (the harness takes up to 200)
#   BENCH_RACKS               racks, default 4
#   BENCH_BUILD_MB            incompressible MiB in the build, default 20
#   BENCH_LINK_BYTES_PER_S    the store's uplink and each host's peers.upload_bytes_per_s,
#                             default 12500000 (100 Mbit/s)
#   BENCH_MAX_UPLOADS         peers.max_uploads of every host, default 2 (the daemon's default)
#   BENCH_TC=1                shape every host's link (both ways) and the store's uplink with tc
#                             (tbf) at BENCH_LINK_BYTES_PER_S instead of the store's own pacing
#   BENCH_LIMIT_PERCENT       max_hosts_restarting of the `limit` mode, default 10
#   BENCH_ZK_LIMIT            max_hosts_restarting of the zk mode's deploys (e.g. 100%; default 1)
#   BENCH_MODES               default store,peers; also zk (ZooKeeper's cost per host per deploy,
#                             and enabled -> every host acting over BENCH_DEPLOYS deploys) and
#                             limit (enabled -> all serving under the percentage limit, against
#                             ceil(hosts/limit) x one host's restart)
#   BENCH_DEPLOY_TIMEOUT_S    limit of one deploy, default 1200 (store-only at 100 hosts x 200 MiB
#                             through 100 Mbit/s takes ~28 min: give it 2400)
#   BENCH_SKIP_BUILD=1        skip the cargo builds (uses target/release as it is)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces)" >&2; exit 1; }
[[ -x /usr/share/zookeeper/bin/zkServer.sh ]] || { echo "needs ZooKeeper (apt-get install zookeeper)" >&2; exit 1; }

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --release -p sluice -p sluice-shim; cargo build --release -p sluice-tests --bins" >&2
    timeout 1800 cargo build --release -p sluice -p sluice-shim
    timeout 1800 cargo build --release -p sluice-tests --bins
fi
for bin in sluice sluice-shim fleet_bench; do
    [[ -x "$repo/target/release/$bin" ]] || { echo "missing target/release/$bin" >&2; exit 1; }
done

mkdir -p "$repo/bench/results"
out="$repo/bench/results/fleet-$(date -u +%F)"
# Short path: unix socket paths are limited to 108 bytes. Every temp dir of the run is in it.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export TMPDIR="$work" SLUICE_BIN_DIR="$repo/target/release"
unset CI

# Bounded: a few minutes per mode at the defaults; 40 minutes (or twice the deploy limit, when
# that is longer) means something hung.
bound=$(( ${BENCH_DEPLOY_TIMEOUT_S:-1200} * 2 ))
(( bound >= 2400 )) || bound=2400
"$repo/target/release/fleet_bench" "$out" &
runner_pid=$!
( sleep "$bound"; kill -KILL "$runner_pid" 2>/dev/null ) &
watchdog=$!
wait "$runner_pid"
kill "$watchdog" 2>/dev/null || true
rm -rf "$work"
echo "== wrote $out.md and $out.json" >&2
