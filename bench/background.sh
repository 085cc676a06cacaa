#!/usr/bin/env bash
# Benchmark: what a restart's background work (a gunicorn starting and stopping, over and over)
# costs two gunicorns that serve a steady load on the same machine, with no sluice involved: no
# background, the background at the normal CPU weight, in a `cpu.idle` cgroup (what sluice gives a
# starting instance and a drained stopping one), and idle plus pinned to the last CPU. The floor
# under bench/restart.sh's restart-window p99 ratio for Python. Needs root (a cgroup of its own)
# and the test virtualenv's gunicorn. Run from anywhere: bench/background.sh. See bench/README.md.
#
# Env:
#   BENCH_RATE           requests per second of the load, default 150
#   BENCH_SECONDS        length of each cell, default 15
#   BENCH_ROUNDS         rounds of the four configurations, default 3 (at most 10)
#   BENCH_PORT_BASE      first of the three loopback ports used, default 19401
#   BENCH_LABEL          appended to the result file names
#   BENCH_MACHINE_NOTE   says in the report whether the machine was busy
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[[ "$(id -u)" -eq 0 ]] || { echo "bench/background.sh needs root (a cgroup of its own)" >&2; exit 1; }
[[ -x "$repo/target/test-venv/bin/gunicorn" ]] || { echo "needs target/test-venv with gunicorn (scripts/test-all.sh makes it)" >&2; exit 1; }
mkdir -p "$repo/bench/results"
out="$repo/bench/results/background-$(date -u +%F)${BENCH_LABEL:+-$BENCH_LABEL}"
# Bounded: 4 cells of BENCH_SECONDS per round plus start-up; the runner stops its children on TERM.
limit=$(( (${BENCH_ROUNDS:-3} * 4 * (${BENCH_SECONDS:-15} + 5)) + 120 ))
timeout --kill-after=30 "$limit" python3 "$repo/bench/background.py" run "$out"
echo "== wrote $out.md and $out.json" >&2
