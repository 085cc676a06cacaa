#!/usr/bin/env bash
# Benchmark: sluice vs supervisord 4.3 supervising 100 idle instances (`sleep infinity`).
# Measures the supervisor's own memory (RSS, PSS), idle CPU over a quiet window, and time to all-running.
# Run from anywhere: bench/supervise.sh. See bench/README.md.
#
# Env:
#   BENCH_QUIET_SECONDS   length of the idle CPU window, default 60
#   BENCH_INSTANCES       instances per supervisor, default 100
#   BENCH_SKIP_BUILD=1    skip `cargo build --release --workspace`
#   BENCH_SLUICE, BENCH_SHIM, BENCH_LABEL   other binaries, a result file suffix (bench/README.md)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

venv="$repo/target/bench-venv"
work=""
runner_pid=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$runner_pid" ]] && kill -0 "$runner_pid" 2>/dev/null; then
        kill -TERM "$runner_pid" 2>/dev/null || true
        # The runner stops what it started on SIGTERM; give it a bounded moment.
        for _ in $(seq 1 100); do kill -0 "$runner_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$runner_pid" 2>/dev/null || true
    fi
    if [[ -n "$work" && -d "$work" ]]; then
        # Kill anything still carrying this run's tag (daemons, shims, instances), then remove the dir.
        timeout 60 python3 "$repo/bench/supervise.py" cleanup "$work" || true
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --release --workspace" >&2
    timeout 1800 cargo build --release --workspace
fi
for bin in "${BENCH_SLUICE:-$repo/target/release/sluice}" "${BENCH_SHIM:-$repo/target/release/sluice-shim}"; do
    [[ -x "$bin" ]] || { echo "missing $bin" >&2; exit 1; }
done

if ! "$venv/bin/python" -c 'import supervisor.options as o, sys; sys.exit(0 if o.VERSION.startswith("4.3.") else 1)' 2>/dev/null; then
    echo "== installing supervisor 4.3.x into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check 'supervisor==4.3.*'
fi

# Short path: unix socket paths are limited to 108 bytes.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export BENCH_TAG="$work"

python3 "$repo/bench/supervise.py" run "$work" &
runner_pid=$!
wait "$runner_pid"
