#!/usr/bin/env bash
# Benchmark: a restart of 4 instances one by one under a steady load, for the Java app
# (tests/fixtures/WarmApp.java, with -Dsun.net.httpserver.nodelay=true and with the JDK's default)
# and the Python app (tests/fixtures/wsgi_app.py under gunicorn, 2 sync workers), five ways side by
# side in the same run: sluice with its defaults, sluice with warm-up off, sluice with CPU isolation
# off, sluice all-at-once, and supervisord 4.3 behind nginx restarting one at a time with a /health
# wait. Reports failed requests and closed-idle retries, restart-window and first-requests latency
# against the steady state of the same run, the restart's total time against the app's own stop,
# start and warm-up, and the supervisor's CPU. Needs root (network namespaces, iptables), a JDK,
# nginx (nginx-light) and the test virtualenv's gunicorn. Run from anywhere: bench/restart.sh.
# See bench/README.md.
#
# Env:
#   BENCH_RATE                    requests per second of the load, default 300
#   BENCH_WARM_IN_SECONDS         load before the steady window (JIT warm-in), default 10
#   BENCH_STEADY_SECONDS          steady window before each restart, default 10
#   BENCH_POOL_CONNECTIONS        keep-alive connections of the load (half the rate), default 12
#   BENCH_NEW_CONNECTION_THREADS  threads opening a connection per request (the other half), default 6
#   BENCH_APPS                    subset of java-nodelay,java-default,python (default all three)
#   BENCH_VARIANTS                subset by position: 1 defaults, 2 warm-up off, 3 CPU isolation
#                                 off, 4 all-at-once, 5 supervisord + nginx (default all)
#   BENCH_CPU_ISOLATION_OFF       the [restart] line that turns CPU isolation off
#                                 (default cpu_isolation = false)
#   BENCH_CGROUPS                 the host file's cgroups key for the sluice variants (auto or
#                                 off; default: the build's default, auto)
#   BENCH_WARMUP_EXTRA            [warmup] lines added to the sluice variants with warm-up, e.g.
#                                 'sibling_percentile = 99' (default none: sluice's defaults)
#   BENCH_HEALTH_EXTRA            [health] lines added to every sluice variant, e.g.
#                                 'interval_ms = 50' (default none: sluice's defaults)
#   BENCH_REPEAT                  runs of each cell (default 1, at most 20); the report gives each
#                                 run and the median (min–max) of the goal figures
#   BENCH_MACHINE_NOTE            says in the report whether the machine was busy
#   BENCH_SKIP_BUILD=1            skip the cargo builds (uses target/release as it is)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh"

[[ "$(id -u)" -eq 0 ]] || { echo "bench/restart.sh needs root (network namespaces, iptables)" >&2; exit 1; }
command -v javac >/dev/null || { echo "needs a JDK (openjdk-17-jdk-headless)" >&2; exit 1; }
[[ -x /usr/sbin/nginx ]] || { echo "needs nginx (apt-get install nginx-light)" >&2; exit 1; }
[[ -x "$repo/target/test-venv/bin/gunicorn" ]] || { echo "needs target/test-venv with gunicorn (scripts/test-all.sh makes it)" >&2; exit 1; }

# supervisord 4.3 in a venv of the benchmark's own (as bench/supervise.sh makes it).
venv="$repo/target/bench-venv"
if ! "$venv/bin/python" -c 'import supervisor.options as o, sys; sys.exit(0 if o.VERSION.startswith("4.3.") else 1)' 2>/dev/null; then
    echo "== installing supervisor 4.3.x into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check 'supervisor==4.3.*'
fi

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --release --workspace; cargo build --release -p sluice-tests --bins" >&2
    timeout 2400 cargo build --release --workspace
    timeout 2400 cargo build --release -p sluice-tests --bins
fi
for bin in sluice sluice-shim restart_bench; do
    [[ -x "$repo/target/release/$bin" ]] || { echo "missing target/release/$bin" >&2; exit 1; }
done

mkdir -p "$repo/bench/results"
# BENCH_LABEL: appended to the result file names, so two runs of one day do not overwrite each other.
out="$repo/bench/results/restart-$(date -u +%F)${BENCH_LABEL:+-$BENCH_LABEL}"
# Short path: unix socket paths are limited to 108 bytes. Every temp dir of the run is in it.
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
export TMPDIR="$work" BENCH_TAG="$work" SLUICE_BIN_DIR="$repo/target/release" BENCH_SUPERVISOR_VENV="$venv"
unset CI

# Bounded: 15 runs take ~15 minutes on a quiet machine, so the limit is 60 minutes per repeat;
# past it something hung (the trap cleans up).
"$repo/target/release/restart_bench" "$out" &
runner_pid=$!
( sleep $((3600 * ${BENCH_REPEAT:-1})); kill -KILL "$runner_pid" 2>/dev/null ) &
watchdog=$!
wait "$runner_pid"
kill "$watchdog" 2>/dev/null || true
echo "== wrote $out.md and $out.json" >&2
