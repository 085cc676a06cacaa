#!/usr/bin/env bash
# Benchmark: a full restart of 4 Java instances (tests/fixtures/WarmApp.java) behind a front port,
# under a steady load, three ways: `drain` with warm-up, `drain` without, `all-at-once`.
# Reports failed requests, restart-window latency against the steady state of the same run, and
# the restart's total time against its unavoidable waits. Needs root (network namespaces,
# iptables) and a JDK. Run from anywhere: bench/restart.sh. See bench/README.md.
#
# Env:
#   BENCH_RATE              requests per second of the load, default 150
#   BENCH_WARM_IN_SECONDS   load before the steady window (JIT warm-in), default 10
#   BENCH_STEADY_SECONDS    steady window before each restart, default 10
#   BENCH_WARMUP_COUNT      warm up with this many requests instead of "until stable"
#   BENCH_SKIP_BUILD=1      skip the cargo builds (uses target/release as it is)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

[[ "$(id -u)" -eq 0 ]] || { echo "bench/restart.sh needs root (network namespaces, iptables)" >&2; exit 1; }
command -v javac >/dev/null || { echo "needs a JDK (openjdk-17-jdk-headless)" >&2; exit 1; }

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --release --workspace; cargo build --release -p sluice-tests --bins" >&2
    timeout 1800 cargo build --release --workspace
    timeout 1800 cargo build --release -p sluice-tests --bins
fi
for bin in sluice sluice-shim restart_bench; do
    [[ -x "$repo/target/release/$bin" ]] || { echo "missing target/release/$bin" >&2; exit 1; }
done

mkdir -p "$repo/bench/results"
out="$repo/bench/results/restart-$(date -u +%F)"
# Short path: unix socket paths are limited to 108 bytes. Every temp dir of the run is in it.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export TMPDIR="$work" BENCH_TAG="$work" SLUICE_BIN_DIR="$repo/target/release"
unset CI

# Bounded: three variants take ~3 minutes; 15 minutes means something hung (the trap cleans up).
"$repo/target/release/restart_bench" "$out" &
runner_pid=$!
( sleep 900; kill -KILL "$runner_pid" 2>/dev/null ) &
watchdog=$!
wait "$runner_pid"
kill "$watchdog" 2>/dev/null || true
echo "== wrote $out.md and $out.json" >&2
