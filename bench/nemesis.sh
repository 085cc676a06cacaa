#!/usr/bin/env bash
# Benchmark: the ZooKeeper nemesis of tests/tests/e2e/nemesis.rs over many seeds (3 hosts, a
# 3-server ensemble, a deploy with max_hosts_restarting = 1 per seed under load, partitions,
# session expiries of the slot holder, SIGSTOP/SIGCONT of servers). Seeds run in chunks, one
# fresh fleet per chunk, so that one seed that fails to converge does not take the rest with it.
# Prints every seed's line and a summary: seeds passed, the most hosts seen in a batch at once,
# convergence time (deploy -> every host serving the new build) median and max. Needs root and
# Debian's ZooKeeper. Run from anywhere: bench/nemesis.sh. See bench/README.md.
#
# Env:
#   BENCH_SEEDS        how many random seeds, default 50; or SLUICE_NEMESIS_SEEDS=1,2,3 for given ones
#   BENCH_CHUNK        seeds per fleet, default 10
#   BENCH_SKIP_BUILD=1 skip the cargo builds
#   SLUICE_NEMESIS_FAULTS=0  the same deploys without faults (the convergence baseline)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

[[ $(id -u) == 0 ]] || { echo "needs root (network namespaces)" >&2; exit 1; }
[[ -x /usr/share/zookeeper/bin/zkServer.sh ]] || { echo "needs ZooKeeper (apt-get install zookeeper)" >&2; exit 1; }

seeds_total=${BENCH_SEEDS:-50}
chunk=${BENCH_CHUNK:-10}
test_name=e2e::nemesis::zookeeper_faults_keep_the_restart_bound_and_lose_no_request

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --workspace --bins; the e2e test binary" >&2
    timeout 1800 cargo build --workspace --bins
fi
bin=$(timeout 1800 cargo test --workspace --test e2e --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "e2e":
        print(m["executable"])')
[[ -x "$bin" ]] || { echo "no e2e test binary" >&2; exit 1; }

mkdir -p "$repo/bench/results"
log="$repo/bench/results/nemesis-$(date -u +%F-%H%M).log"
# Short path: unix socket paths are limited to 108 bytes. Every temp dir of the run is in it.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export TMPDIR="$work" SLUICE_BIN_DIR="$repo/target/debug"
unset CI

{
    echo "# bench/nemesis.sh $(date -u +%FT%TZ) on $(uname -n): $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "# BENCH_SEEDS=$seeds_total BENCH_CHUNK=$chunk SLUICE_NEMESIS_SEEDS=${SLUICE_NEMESIS_SEEDS:-} SLUICE_NEMESIS_FAULTS=${SLUICE_NEMESIS_FAULTS:-1} commit $(git -C "$repo" rev-parse --short HEAD)"
} | tee "$log"

run_chunk() {
    local seeds=$1
    # Bounded: ~30 s per seed on a loaded 2-core machine; far past that something hung.
    SLUICE_NEMESIS_SEEDS="$seeds" timeout 1800 "$bin" --exact "$test_name" --nocapture --test-threads 1 \
        >>"$log" 2>&1 &
    runner_pid=$!
    wait "$runner_pid" || echo "# chunk $seeds: the test failed (exit $?)" | tee -a "$log"
    runner_pid=""
    grep -E '^nemesis: seed=' "$log" | tail -n "$(echo "$seeds" | awk -F'[:,]' '{print ($1=="random") ? $2 : NF}')" || true
}

if [[ -n "${SLUICE_NEMESIS_SEEDS:-}" ]]; then
    run_chunk "$SLUICE_NEMESIS_SEEDS"
else
    left=$seeds_total
    while (( left > 0 )); do
        n=$(( left < chunk ? left : chunk ))
        run_chunk "random:$n"
        left=$(( left - n ))
    done
fi

python3 - "$log" <<'PY'
import re, statistics, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8", errors="replace") if l.startswith("nemesis: seed=")]
rows = [dict(re.findall(r"(\w+)=(\S+)", l.split(" faults=")[0])) for l in lines]
passed = [r for r in rows if r.get("result") == "pass"]
conv = sorted(int(r["converge_ms"]) for r in rows if r.get("converge_ms", "none") != "none")
most = max((int(r["max_concurrent"]) for r in rows), default=0)
over = sum(int(r["allowed_oversubscriptions"]) for r in rows)
lost = sum(int(r["lost_leases"]) for r in rows)
print(f"seeds run: {len(rows)}, passed: {len(passed)}, failed: {[r['seed'] for r in rows if r.get('result') != 'pass']}")
print(f"max concurrent hosts in a batch: {most} (limit 1); moments over the limit, each allowed by a lost lease: {over}; leases lost with their session: {lost}")
if conv:
    print(f"convergence (deploy -> all serving): median {statistics.median(conv) / 1000:.1f} s, max {conv[-1] / 1000:.1f} s, over {len(conv)} seeds")
PY
echo "== log: $log" >&2
