#!/usr/bin/env python3
"""What a restart's background work costs the instances that serve, with no sluice involved.

Two gunicorn instances (the restart bench's Python app, 2 sync workers each) serve a steady load
from a client process of its own; a third process of its own starts a gunicorn, waits for its first
answer, stops it (SIGTERM) and starts the next, over and over: the work of a restart batch's stop
and start, done by the host while the others serve. Each round runs every configuration of that
background once, interleaved, so the ratios compare figures of one round:

    none      no background (the baseline)
    normal    the background at the normal CPU weight
    idle      the background in a cgroup with `cpu.idle = 1` (what sluice gives a starting instance
              and a drained stopping one)
    idle-cpu  as `idle`, and pinned to the last CPU (taskset): measured, not what sluice does
    idle-stop-cpu  as `idle`, and only the stop pinned to the last CPU (its threads moved with
              `taskset -a -p` before SIGTERM)

Called by bench/background.sh:
    background.py run OUT      run and write OUT.md and OUT.json
    background.py client ...   (internal) the load: prints latencies as JSON
    background.py cycle ...    (internal) the background: starts and stops gunicorns until killed

Every process it starts is its own child and is stopped on exit; traffic goes to 127.0.0.1 only.
"""

import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUNICORN = os.path.join(REPO, "target", "test-venv", "bin", "gunicorn")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
PORT_BASE = int(os.environ.get("BENCH_PORT_BASE", "19401"))
SERVING = (PORT_BASE, PORT_BASE + 1)
BACKGROUND_PORT = PORT_BASE + 2
RATE = int(os.environ.get("BENCH_RATE", "150"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "15"))
ROUNDS = min(int(os.environ.get("BENCH_ROUNDS", "3")), 10)
VARIANTS = ("none", "normal", "idle", "idle-cpu", "idle-stop-cpu")
# Over this many times the baseline's p99 a request counts as slow (the restart goal's ratio).
SLOW_OVER_P99 = 1.2


def gunicorn(port, preexec=None, prefix=()):
    return subprocess.Popen(
        list(prefix)
        + [GUNICORN, "--bind", f"127.0.0.1:{port}", "--workers", "2", "--chdir", FIXTURES,
           "wsgi_app:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=preexec)


def get(port, path="/item"):
    """One request on a new connection; returns when the whole answer is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        while s.recv(4096):
            pass


def wait_up(port, limit_s=10.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            get(port, "/health")
            return True
        except OSError:
            time.sleep(0.01)
    return False


def client(seconds, rate):
    """Requests at `rate` per second, alternating the two serving ports; prints latencies (ms)."""
    latencies, errors = [], 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        pause = start + i / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        t = time.perf_counter()
        try:
            get(SERVING[i % 2])
            latencies.append((time.perf_counter() - t) * 1000.0)
        except OSError:
            errors += 1
        i += 1
    print(json.dumps({"latencies_ms": latencies, "errors": errors}))


def cycle(variant, cgroup, cpus, counter):
    """Starts and stops gunicorns until killed; counts finished cycles in the file `counter`.
    Killed with its process group by `measure`."""
    def join():
        if variant.startswith("idle"):
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    prefix = ("taskset", "-c", cpus) if variant == "idle-cpu" else ()
    done = 0
    # Killed with its whole process group (see `measure`): no handler, so no wait is cut short.
    while True:
        child = gunicorn(BACKGROUND_PORT, join, prefix)
        wait_up(BACKGROUND_PORT)
        time.sleep(0.05)
        if variant == "idle-stop-cpu":
            # Only the stop on the last CPU: every thread of the master and its workers.
            subprocess.run(["taskset", "-a", "-c", "-p", cpus, str(child.pid)],
                           stdout=subprocess.DEVNULL, check=False)
            for worker in open(f"/proc/{child.pid}/task/{child.pid}/children").read().split():
                subprocess.run(["taskset", "-a", "-c", "-p", cpus, worker],
                               stdout=subprocess.DEVNULL, check=False)
        child.send_signal(signal.SIGTERM)
        child.wait()
        child = None
        done += 1
        with open(counter, "w") as f:
            f.write(str(done))
        time.sleep(0.05)


def cpu_cgroup():
    """The cpu controller's mount and whether it is cgroup v2."""
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, point, kind, options = line.split()[:4]
            if kind == "cgroup" and "cpu" in options.split(","):
                return point, False
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, point, kind = line.split()[:3]
            if kind == "cgroup2" and "cpu" in open(os.path.join(point, "cgroup.controllers")).read().split():
                return point, True
    sys.exit("needs the cgroup cpu controller (v1 mounted, or v2 with cpu available)")


def percentile(sorted_ms, q):
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))]


def measure(variant, cgroup, cpus, work):
    counter = os.path.join(work, "cycles")
    if os.path.exists(counter):
        os.remove(counter)
    background = None
    if variant != "none":
        background = subprocess.Popen(
            [sys.executable, __file__, "cycle", variant, cgroup, cpus, counter],
            start_new_session=True)
    try:
        time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, __file__, "client", str(SECONDS), str(RATE)],
            capture_output=True, text=True, timeout=SECONDS + 60, check=True)
    finally:
        if background:
            # The cycle and the gunicorn it runs share its session's process group.
            os.killpg(background.pid, signal.SIGKILL)
            background.wait(timeout=30)
            time.sleep(0.2)
    result = json.loads(out.stdout)
    cycles = 0
    if os.path.exists(counter):
        with open(counter) as f:
            cycles = int(f.read() or 0)
    result["cycles"] = cycles
    return result


def run(out):
    if os.geteuid() != 0:
        sys.exit("bench/background.py needs root (a cgroup of its own)")
    if not os.access(GUNICORN, os.X_OK):
        sys.exit(f"needs {GUNICORN} (scripts/test-all.sh makes the test virtualenv)")
    # On TERM (the script's timeout), the `finally` below stops the servers and removes the cgroup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mount, v2 = cpu_cgroup()
    cgroup = os.path.join(mount, f"sluice-bench-background-{os.getpid()}")
    os.makedirs(cgroup)
    with open(os.path.join(cgroup, "cpu.idle"), "w") as f:
        f.write("1")
    cpus = str(os.cpu_count() - 1)
    work = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sluice-bench-background-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    serving = [gunicorn(p) for p in SERVING]
    started = datetime.datetime.now(datetime.timezone.utc)
    rounds = []
    try:
        for p in SERVING:
            if not wait_up(p):
                sys.exit(f"gunicorn on port {p} did not answer within 10 s")
        for _ in range(500):
            for p in SERVING:
                get(p)
        for r in range(ROUNDS):
            row = {}
            for variant in VARIANTS:
                res = measure(variant, cgroup, cpus, work)
                lat = sorted(res["latencies_ms"])
                row[variant] = {
                    "requests": len(lat),
                    "errors": res["errors"],
                    "cycles": res["cycles"],
                    "p50_ms": percentile(lat, 0.5),
                    "p99_ms": percentile(lat, 0.99),
                    "p999_ms": percentile(lat, 0.999),
                    "max_ms": lat[-1] if lat else None,
                    "latencies_ms": lat,
                }
                print(f"round {r + 1} {variant:9s} p99 {row[variant]['p99_ms']:.2f} ms, "
                      f"{res['cycles']} cycles", file=sys.stderr)
            base = row["none"]["p99_ms"]
            for variant in VARIANTS:
                cell = row[variant]
                lat = cell.pop("latencies_ms")
                cell["p99_ratio"] = cell["p99_ms"] / base
                cell["p999_ratio"] = cell["p999_ms"] / row["none"]["p999_ms"]
                cell["slow"] = sum(1 for x in lat if x > SLOW_OVER_P99 * base)
            rounds.append(row)
    finally:
        for s in serving:
            s.terminate()
        for s in serving:
            s.wait(timeout=30)
        os.rmdir(cgroup)
        shutil.rmtree(work, ignore_errors=True)
    report(out, started, rounds, v2)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report(out, started, rounds, v2):
    def sh(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return "?"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), "?")
    commit = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD")
    data = {
        "benchmark": "background", "started": started.isoformat(), "rate_per_s": RATE,
        "seconds": SECONDS, "rounds": rounds, "cpus": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "cgroup_v2": v2, "commit": commit,
        "uptime_after": sh("uptime"), "machine_note": os.environ.get("BENCH_MACHINE_NOTE"),
    }
    with open(out + ".json", "w") as f:
        json.dump(data, f, indent=1)
    s = "# A restart's background work against the instances that serve (`bench/background.sh`)\n\n"
    s += (f"Machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}; "
          f"{started.strftime('%Y-%m-%dT%H:%M:%SZ')}; commit {commit}; cgroup "
          f"{'v2' if v2 else 'v1'}. Machine use: {data['machine_note'] or 'not stated'}. "
          f"`uptime` at the end: `{data['uptime_after']}`.\n\n")
    s += (f"Two gunicorns (tests/fixtures/wsgi_app.py, 2 sync workers each) serve {RATE} req/s, "
          "a new connection per request, from a client process of its own, for "
          f"{SECONDS:.0f} s per cell. The background, a process of its own, starts a third "
          "gunicorn, waits for its first answer, stops it and starts the next (a cycle). No sluice "
          "runs. Each round runs every configuration once, in the order below; ratios are against "
          "the round's `none`. \"Slow\" counts requests over "
          f"{SLOW_OVER_P99}× the round's `none` p99.\n\n")
    s += "| round | background | requests | cycles | p50 | p99 | p99 ÷ none | p99.9 | p99.9 ÷ none | max | slow |\n"
    s += "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    for n, row in enumerate(rounds, 1):
        for variant in VARIANTS:
            c = row[variant]
            s += (f"| {n} | {variant} | {c['requests']} | {c['cycles']} | {c['p50_ms']:.2f} ms | "
                  f"{c['p99_ms']:.2f} ms | {c['p99_ratio']:.2f} | {c['p999_ms']:.2f} ms | "
                  f"{c['p999_ratio']:.2f} | {c['max_ms']:.1f} ms | {c['slow']} |\n")
    s += f"\nMedian (min–max) over {len(rounds)} rounds:\n\n"
    s += "| background | p99 ÷ none | p99.9 ÷ none | slow per 100 cycles |\n| --- | ---: | ---: | ---: |\n"
    for variant in VARIANTS:
        cells = [row[variant] for row in rounds]
        def fig(key):
            xs = [c[key] for c in cells]
            return f"{median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"
        per = [100.0 * c["slow"] / c["cycles"] for c in cells if c["cycles"]]
        s += (f"| {variant} | {fig('p99_ratio')} | {fig('p999_ratio')} | "
              f"{f'{median(per):.0f} ({min(per):.0f}–{max(per):.0f})' if per else '–'} |\n")
    with open(out + ".md", "w") as f:
        f.write(s)
    print(s)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        run(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "client":
        client(float(sys.argv[2]), float(sys.argv[3]))
    elif len(sys.argv) == 6 and sys.argv[1] == "cycle":
        cycle(*sys.argv[2:])
    else:
        sys.exit(__doc__)
