#!/usr/bin/env bash
# The point of sluice in one minute: a Python service (gunicorn, 4 instances) behind a front port
# under a steady load, restarted with `sluice restart` (drain, restart, check, warm up, one at a
# time), beside an all-at-once restart of the same service, with the failed requests and the
# latency before, during and after each. Everything runs inside a network namespace the script
# creates and removes (the host's own iptables rules are never touched); the load goes to that
# namespace's loopback only and stops after the run. Needs root. Run from anywhere:
#   sudo scripts/demo-restart.sh
#
# Env: DEMO_RATE (requests per second, default 200), DEMO_SKIP_BUILD=1 (use target/debug as is).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
[[ "$(id -u)" -eq 0 ]] || { echo "scripts/demo-restart.sh needs root (a network namespace and iptables inside it): sudo $0" >&2; exit 1; }

need_apt=()
command -v iptables >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
if [[ ${#need_apt[@]} -gt 0 ]]; then
    echo "== installing: ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# gunicorn serves the demo's WSGI app (tests/fixtures/wsgi_app.py), from a virtualenv of ours.
venv="$repo/target/demo-venv"
if [[ ! -x "$venv/bin/gunicorn" ]]; then
    echo "== installing gunicorn into $venv" >&2
    python3 -m venv "$venv"
    timeout 600 "$venv/bin/pip" install --quiet --disable-pip-version-check 'gunicorn==27.*'
fi
if [[ "${DEMO_SKIP_BUILD:-0}" != 1 ]]; then
    echo "== cargo build --workspace --bins" >&2
    timeout 2400 cargo build --quiet --workspace --bins
fi

work=$(mktemp -d /tmp/sluice-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "== restarting 4 instances under ${DEMO_RATE:-200} req/s, twice (about a minute)" >&2
# The restart benchmark's harness, cut down: the Python app, sluice's defaults and all-at-once.
TMPDIR="$work" BENCH_TAG="$work" SLUICE_BIN_DIR="$repo/target/debug" SLUICE_TEST_VENV="$venv" \
    BENCH_APPS=python BENCH_VARIANTS=1,4 BENCH_RATE="${DEMO_RATE:-200}" \
    BENCH_WARM_IN_SECONDS=3 BENCH_STEADY_SECONDS=5 BENCH_MACHINE_NOTE="demo" CI='' \
    timeout 900 "$repo/target/debug/restart_bench" "$work/demo" >"$work/bench.out" 2>"$work/bench.err" || {
    echo "the demo failed; its output:" >&2
    tail -n 30 "$work/bench.err" >&2
    exit 1
}
python3 - "$work/demo.json" <<'EOF'
import json, sys

report = json.load(open(sys.argv[1]))
def ms(v):
    return "-" if v is None else f"{v:.1f} ms"
print()
print(f"{'':32} {'failed':>14} {'p99 before':>11} {'p99 during':>11} {'p99 after':>10} {'restart':>8}")
for run in report["runs"]:
    if "skipped" in run:
        print(f"{run['label']:32} not run: {run['skipped']}")
        continue
    whole = run["whole_run"]
    print(
        f"{run['label']:32} {whole['failed']:>5} of {whole['requests']:>5} "
        f"{ms(run['steady']['p99_ms']):>11} {ms(run['restart_window']['p99_ms']):>11} "
        f"{ms(run['after_restart']['p99_ms']):>10} {run['total_ms'] / 1000:>7.1f}s"
    )
print()
print("sluice (defaults): each instance is taken out of steering, stopped once no request is in flight,")
print("started, checked and warmed up before it takes traffic again; all-at-once stops all 4 at once.")
EOF
