#!/usr/bin/env bash
# Runs the whole test suite on a Debian 12 machine, installing what the tests need first.
# CI runs exactly this (see .ci/run) as root with CI=true; there a test never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v tc >/dev/null || need_apt+=(iproute2)
command -v ps >/dev/null || need_apt+=(procps)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || need_apt+=(zookeeper)
# nginx proxies one client of the restart matrix (tests/tests/e2e/matrix.rs) with upstream keep-alive.
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)
# `watch` is tested in a real terminal under tmux (tests/tests/e2e/watch.rs); `deploy --wait`'s
# terminal display on a pty from script(1) (bsdutils, essential in Debian).
command -v tmux >/dev/null || need_apt+=(tmux)
command -v script >/dev/null || need_apt+=(bsdutils)
# libfaketime steps the wall clock that the daemon and its shims see (e2e::clock), never the machine's.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_apt+=(faketime)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need_apt[*]} (run as root to install them)" >&2
    exit 1
  fi
  echo "installing: ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# Python packages the tests run for real (gunicorn serves the WSGI test app), in a venv of ours.
venv=target/test-venv
if [ ! -x "$venv/bin/gunicorn" ] || [ ! -x "$venv/bin/moto_server" ]; then
  python3 -m venv "$venv"
  # gunicorn serves the WSGI test app; moto's server mode is the S3 store of the build tests.
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'gunicorn==27.*' 'moto[server]==5.*'
fi
# The restart matrix's servers and clients: uvicorn serves the ASGI test app, aiohttp is the
# keep-alive pool and the new-connection client (tests/fixtures/http_client.py).
if [ ! -x "$venv/bin/uvicorn" ] || ! "$venv/bin/python" -P -c 'import aiohttp' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'uvicorn==0.54.*' 'aiohttp==3.14.*'
fi
# supervisord itself: the import tests (tests/tests/e2e/import.rs) have it read their supervisord
# fixtures and compare its processes with the service files `sluice import-supervisord` wrote.
# -P: the checkout's own supervisor/ (the crate) would otherwise pass for the package.
if ! "$venv/bin/python" -P -c 'import supervisor.supervisord' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'supervisor==4.3.*'
fi
# Prometheus's own Python client parses the text exposition the metrics tests scrape from sluice
# (tests/tests/e2e/metrics.rs) and from the canary tests' service.
if ! "$venv/bin/python" -P -c 'import prometheus_client.parser' 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'prometheus-client==0.26.*'
fi
# Wheels for the deploy tests' offline `pip install` (the stock python-venv hook with SLUICE_WHEEL_DIR).
if ! ls target/test-wheels/gunicorn-*.whl >/dev/null 2>&1; then
  "$venv/bin/pip" download --quiet --disable-pip-version-check -d target/test-wheels 'gunicorn==27.*'
fi

cargo fmt --all -- --check
cargo build --workspace --bins
cargo clippy --workspace --all-targets -- -D warnings
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
# The fuzz targets (fuzz/, nightly): a short bounded run of each on its committed corpus; the
# script installs cargo-fuzz when it is missing.
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
scripts/fuzz.sh "${SLUICE_FUZZ_SECONDS:-15}"
