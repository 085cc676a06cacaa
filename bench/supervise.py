#!/usr/bin/env python3
"""sluice vs supervisord: memory and idle CPU of the supervisor's own processes with N idle instances.

Called by bench/supervise.sh (which builds sluice and the supervisord venv):
    supervise.py run WORKDIR       run the benchmark, print and write the report
    supervise.py cleanup WORKDIR   kill every process tagged with WORKDIR (used by the shell trap)

Every process this benchmark starts carries BENCH_TAG=WORKDIR in its environment (sluice instances get it
through the service's `env`, since sluice gives instances a clean environment), so cleanup finds them all,
including shims (which setsid away from the daemon) and instances orphaned by a killed shim.
"""

import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BENCH_SLUICE runs another daemon binary (the release build is what the report is for).
SLUICE = os.environ.get("BENCH_SLUICE") or os.path.join(REPO, "target", "release", "sluice")
# BENCH_SHIM compares another shim binary (e.g. an older build) with the same daemon.
SHIM = os.environ.get("BENCH_SHIM") or os.path.join(REPO, "target", "release", "sluice-shim")
# Appended to the result file names, so runs of one day (e.g. two shims) do not overwrite each other.
LABEL = os.environ.get("BENCH_LABEL", "")
VENV = os.path.join(REPO, "target", "bench-venv")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

QUIET_SECONDS = float(os.environ.get("BENCH_QUIET_SECONDS", "60"))
INSTANCES = int(os.environ.get("BENCH_INSTANCES", "100"))
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 40
POLL_INTERVAL_S = 0.05

GOAL_BRAIN_RSS_KIB = 10 * 1024
GOAL_SHIM_PSS_KIB = 512


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- /proc


def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def proc_stat(pid):
    """(state, ppid, utime+stime ticks) or None if gone."""
    text = read(f"/proc/{pid}/stat")
    if text is None:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime, stime are fields 14, 15.
    return rest[0], int(rest[1]), int(rest[11]) + int(rest[12])


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def kv_kib(text):
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            out[parts[0][:-1]] = int(parts[1])
    return out


def status_fields(pid):
    return kv_kib(read(f"/proc/{pid}/status"))


def smaps_rollup(pid):
    return kv_kib(read(f"/proc/{pid}/smaps_rollup"))


def top_mappings(pid, n=8):
    """Largest mappings of a process by Rss, grouped by name: [(name, rss_kib, pss_kib)]."""
    text = read(f"/proc/{pid}/smaps") or ""
    groups = {}
    name = None
    for line in text.splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:  # mapping header
            parts = line.split(None, 5)
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            groups.setdefault(name, [0, 0])
        elif name is not None and line.startswith("Rss:"):
            groups[name][0] += int(line.split()[1])
        elif name is not None and line.startswith("Pss:"):
            groups[name][1] += int(line.split()[1])
    return sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda x: -x[1])[:n]


def tagged_pids(tag):
    """Live processes (not zombies) whose environment carries BENCH_TAG=tag, excluding ourselves."""
    needle = f"BENCH_TAG={tag}".encode()
    me = {os.getpid(), os.getppid()}
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in me:
            continue
        env = read(f"/proc/{pid}/environ", "rb")
        if env and needle in env.split(b"\0") and alive(pid):
            out.append(pid)
    return out


def cmdline(pid):
    raw = read(f"/proc/{pid}/cmdline", "rb") or b""
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def kill_tagged(tag, sig=signal.SIGKILL):
    pids = tagged_pids(tag)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def wait_untagged(tag, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not tagged_pids(tag):
            return True
        time.sleep(0.2)
    return False


# ----------------------------------------------------------------------------------------- measuring


def measure(name, own_pids, brain_pid, shim_pids, ready_s, ready_poll_s, cpu_to_ready_ticks):
    """Quiet CPU window over own_pids, then memory. Returns a dict of results."""
    log(f"{name}: quiet window of {QUIET_SECONDS:g} s over {len(own_pids)} own processes")
    before = {pid: proc_stat(pid) for pid in own_pids}
    t0 = time.monotonic()
    time.sleep(QUIET_SECONDS)
    window = time.monotonic() - t0
    after = {pid: proc_stat(pid) for pid in own_pids}
    died = [p for p in own_pids if after[p] is None or after[p][0] in ("Z", "X")]
    ticks = sum(after[p][2] - before[p][2] for p in own_pids if p not in died)
    brain_ticks = after[brain_pid][2] - before[brain_pid][2] if brain_pid not in died else None
    shim_ticks = [after[p][2] - before[p][2] for p in shim_pids if p not in died]

    st = status_fields(brain_pid)
    brain_roll = smaps_rollup(brain_pid)
    shim_pss = [smaps_rollup(p).get("Pss", 0) for p in shim_pids if alive(p)]
    shim_rss = [status_fields(p).get("VmRSS", 0) for p in shim_pids if alive(p)]
    total_pss = brain_roll.get("Pss", 0) + sum(shim_pss)
    threads = int((read(f"/proc/{brain_pid}/status") or "Threads:\t0").split("Threads:")[1].split()[0])
    shim_detail = None
    if shim_pids:
        p = shim_pids[0]
        shim_detail = {
            "pid": p,
            "status": status_fields(p),
            "rollup": smaps_rollup(p),
            "top": top_mappings(p),
        }
    return {
        "name": name,
        "ready_s": ready_s,
        "ready_poll_s": ready_poll_s,
        "brain_pid": brain_pid,
        "brain_rss_kib": st.get("VmRSS", 0),
        "brain_hwm_kib": st.get("VmHWM", 0),
        "brain_status": st,
        "brain_rollup": brain_roll,
        "brain_threads": threads,
        "brain_top": top_mappings(brain_pid),
        "brain_pss_kib": brain_roll.get("Pss", 0),
        "own_processes": len(own_pids),
        "total_pss_kib": total_pss,
        "shims": len(shim_pss),
        "shim_pss_mean_kib": statistics.mean(shim_pss) if shim_pss else None,
        "shim_pss_max_kib": max(shim_pss) if shim_pss else None,
        "shim_rss_mean_kib": statistics.mean(shim_rss) if shim_rss else None,
        "shim_detail": shim_detail,
        "window_s": window,
        "cpu_ms": ticks * 1000 / CLK_TCK,
        "brain_cpu_ms": None if brain_ticks is None else brain_ticks * 1000 / CLK_TCK,
        "shim_cpu_ms": sum(shim_ticks) * 1000 / CLK_TCK,
        "shims_with_cpu": sum(1 for t in shim_ticks if t > 0),
        "died_in_window": len(died),
        "cpu_to_ready_ms": cpu_to_ready_ticks * 1000 / CLK_TCK,
    }


def own_cpu_ticks(pids):
    return sum(s[2] for s in (proc_stat(p) for p in pids) if s)


# -------------------------------------------------------------------------------------------- sluice


def cgroup_parent(work):
    return os.path.basename(work.rstrip("/"))


def remove_cgroups(work):
    """Removes this run's cgroup parent (children first) wherever the cpu hierarchy has it."""
    name = cgroup_parent(work)
    for root, dirs, _ in os.walk("/sys/fs/cgroup", topdown=False):
        if os.path.basename(root) == name:
            for child in dirs:
                try:
                    os.rmdir(os.path.join(root, child))
                except OSError:
                    pass
            try:
                os.rmdir(root)
            except OSError:
                pass


def run_sluice(work, tag):
    d = os.path.join(work, "sluice")
    os.makedirs(os.path.join(d, "services"))
    host = os.path.join(d, "host.toml")
    with open(host, "w") as f:
        f.write('data_dir = "data"\nruntime_dir = "run"\nservices_dir = "services"\nallow_root = true\n')
        f.write(f"shim_path = {json.dumps(os.path.abspath(SHIM))}\n")
        # With `cgroups = "auto"` (BENCH_CGROUPS=auto) and root, instances get cgroups: under a
        # parent of this run's own, which `cleanup` removes if the run is interrupted.
        f.write(f"cgroups = {json.dumps(os.environ.get('BENCH_CGROUPS', 'off'))}\n")
        f.write(f"cgroup_parent = {json.dumps(cgroup_parent(work))}\n")
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    with open(os.path.join(d, "services", "idle.toml"), "w") as f:
        f.write(
            'command = ["sleep", "infinity"]\n'
            f"instances = {INSTANCES}\n"
            # sluice gives instances a clean environment; BENCH_TAG lets cleanup find orphans.
            f"env = {{ PATH = {json.dumps(path)}, BENCH_TAG = {json.dumps(tag)} }}\n"
        )

    def cli(*args, timeout=10):
        return subprocess.run(
            [SLUICE, "--config", host, *args], capture_output=True, text=True, timeout=timeout
        )

    daemon_log = open(os.path.join(d, "daemon.log"), "w")
    log(f"sluice: starting daemon with {INSTANCES} instances")
    t0 = time.monotonic()
    daemon = subprocess.Popen(
        [SLUICE, "run", "--config", host],
        stdin=subprocess.DEVNULL,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
    )
    try:
        status = None
        poll_s = 0.0
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"sluice daemon exited with {daemon.returncode}; see {daemon_log.name}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                raise RuntimeError(f"sluice: not all {INSTANCES} running after {READY_TIMEOUT_S} s")
            p0 = time.monotonic()
            r = cli("status", "--json")
            poll_s = time.monotonic() - p0
            if r.returncode == 0:
                status = json.loads(r.stdout)
                insts = [i for s in status["services"] for i in s["instances"]]
                if len(insts) == INSTANCES and all(i.get("state") == "running" for i in insts):
                    break
            time.sleep(POLL_INTERVAL_S)
        ready_s = time.monotonic() - t0
        log(f"sluice: all {INSTANCES} running after {ready_s:.2f} s")

        shim_pids = sorted({i["shim_pid"] for s in status["services"] for i in s["instances"]})
        # Cross-check against /proc: every live sluice-shim carrying our tag (the shim inherits the
        # daemon's environment, which has it).
        found = sorted(
            p
            for p in tagged_pids(tag)
            if os.path.basename(cmdline(p)[0] if cmdline(p) else "") == "sluice-shim"
        )
        if found != shim_pids:
            log(f"sluice: WARNING status lists {len(shim_pids)} shims, /proc has {len(found)}; using /proc")
            shim_pids = found
        own = [daemon.pid] + shim_pids
        result = measure(
            "sluice", own, daemon.pid, shim_pids, ready_s, poll_s, own_cpu_ticks(own)
        )
        result["instances_running"] = INSTANCES
        return result
    finally:
        log("sluice: shutdown")
        try:
            cli("shutdown", timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log("sluice: shutdown timed out")
        try:
            daemon.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        daemon_log.close()
        if not wait_untagged(tag, 15):
            left = kill_tagged(tag)
            log(f"sluice: killed {len(left)} leftover processes")
            wait_untagged(tag, 10)


# --------------------------------------------------------------------------------------- supervisord


SUPERVISORD_CONF = """\
[unix_http_server]
file=%(here)s/supervisor.sock
chmod=0700

[supervisord]
nodaemon=true
logfile=%(here)s/supervisord.log
pidfile=%(here)s/supervisord.pid
childlogdir=%(here)s/logs
loglevel=info
minfds=1024
minprocs=200

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://%(here)s/supervisor.sock

[program:idle]
command=sleep infinity
numprocs={instances}
process_name=%(program_name)s_%(process_num)02d
autostart=true
autorestart=true
startsecs=1
stdout_logfile=%(here)s/logs/%(program_name)s_%(process_num)02d.stdout.log
stderr_logfile=%(here)s/logs/%(program_name)s_%(process_num)02d.stderr.log
"""


def run_supervisord(work, tag):
    d = os.path.join(work, "supervisord")
    os.makedirs(os.path.join(d, "logs"))
    conf = os.path.join(d, "supervisord.conf")
    with open(conf, "w") as f:
        f.write(SUPERVISORD_CONF.replace("{instances}", str(INSTANCES)))
    supervisord = os.path.join(VENV, "bin", "supervisord")
    supervisorctl = os.path.join(VENV, "bin", "supervisorctl")

    def ctl(*args, timeout=20):
        return subprocess.run(
            [supervisorctl, "-c", conf, *args], capture_output=True, text=True, timeout=timeout
        )

    out = open(os.path.join(d, "supervisord.out"), "w")
    log(f"supervisord: starting with {INSTANCES} instances")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [supervisord, "-c", conf], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
    )
    try:
        poll_s = 0.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"supervisord exited with {proc.returncode}; see {out.name}")
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                raise RuntimeError(f"supervisord: not all {INSTANCES} running after {READY_TIMEOUT_S} s")
            p0 = time.monotonic()
            r = ctl("status")
            poll_s = time.monotonic() - p0
            lines = [l for l in r.stdout.splitlines() if l.startswith("idle:")]
            if len(lines) == INSTANCES and all(l.split()[1] == "RUNNING" for l in lines):
                break
            time.sleep(POLL_INTERVAL_S)
        ready_s = time.monotonic() - t0
        log(f"supervisord: all {INSTANCES} running after {ready_s:.2f} s")
        # supervisord has no per-instance processes of its own: its own processes are itself.
        children = [p for p in tagged_pids(tag) if proc_stat(p)[1] == proc.pid]
        if len(children) != INSTANCES:
            log(f"supervisord: WARNING {len(children)} child processes, expected {INSTANCES}")
        own = [proc.pid]
        result = measure("supervisord", own, proc.pid, [], ready_s, poll_s, own_cpu_ticks(own))
        result["instances_running"] = len(children)
        return result
    finally:
        log("supervisord: shutdown")
        try:
            ctl("shutdown", timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log("supervisord: shutdown timed out")
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()
        if not wait_untagged(tag, 15):
            left = kill_tagged(tag)
            log(f"supervisord: killed {len(left)} leftover processes")
            wait_untagged(tag, 10)


# ------------------------------------------------------------------------------------------- report


def mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.2f} MiB"


def kib_s(kib):
    return "n/a" if kib is None else f"{kib:.0f} KiB"


def ratio(a, b):
    if a is None or b is None:
        return "n/a"
    if b == 0:
        return "n/a (÷0)" if a else "—"
    return f"{a / b:.2f}×"


def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine():
    model = "?"
    for line in (read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = kv_kib(read("/proc/meminfo")).get("MemTotal", 0)
    commit = sh("git", "-C", REPO, "rev-parse", "--short", "HEAD")
    dirty = sh("git", "-C", REPO, "status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": os.cpu_count(),
        "model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "mem": mib(mem),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": commit + (" (dirty tree)" if dirty else ""),
        "rustc": sh("rustc", "--version"),
        "supervisor": sh(os.path.join(VENV, "bin", "supervisord"), "--version"),
        "python": sh(os.path.join(VENV, "bin", "python"), "--version"),
    }


def goal(ok):
    return "✅ met" if ok else "❌ not met"


def report(s, v, m):
    w = s["window_s"]
    pct = lambda ms: f"{ms / (w * 1000) * 100:.3f} %"
    rows = [
        ("instances running", f"{s['instances_running']}", f"{v['instances_running']}", ""),
        ("time to all running", f"{s['ready_s']:.2f} s", f"{v['ready_s']:.2f} s", ratio(s["ready_s"], v["ready_s"])),
        ("daemon RSS (VmRSS)", mib(s["brain_rss_kib"]), mib(v["brain_rss_kib"]), ratio(s["brain_rss_kib"], v["brain_rss_kib"])),
        ("daemon PSS", mib(s["brain_pss_kib"]), mib(v["brain_pss_kib"]), ratio(s["brain_pss_kib"], v["brain_pss_kib"])),
        (
            f"PSS of all own processes ({s['own_processes']} vs {v['own_processes']})",
            mib(s["total_pss_kib"]),
            mib(v["total_pss_kib"]),
            ratio(s["total_pss_kib"], v["total_pss_kib"]),
        ),
        ("per-shim PSS, mean", kib_s(s["shim_pss_mean_kib"]), "— (no shims)", ""),
        ("per-shim PSS, max", kib_s(s["shim_pss_max_kib"]), "— (no shims)", ""),
        (
            f"CPU of own processes over {w:.0f} s quiet window",
            f"{s['cpu_ms']:.0f} ms ({pct(s['cpu_ms'])})",
            f"{v['cpu_ms']:.0f} ms ({pct(v['cpu_ms'])})",
            ratio(s["cpu_ms"], v["cpu_ms"]),
        ),
        ("  of which daemon", f"{s['brain_cpu_ms']:.0f} ms", f"{v['brain_cpu_ms']:.0f} ms", ratio(s["brain_cpu_ms"], v["brain_cpu_ms"])),
        ("  of which shims", f"{s['shim_cpu_ms']:.0f} ms ({s['shims_with_cpu']} shims > 0)", "—", ""),
        ("CPU of own processes, start → all running", f"{s['cpu_to_ready_ms']:.0f} ms", f"{v['cpu_to_ready_ms']:.0f} ms", ratio(s["cpu_to_ready_ms"], v["cpu_to_ready_ms"])),
    ]
    out = []
    out.append(f"# sluice vs supervisord: {INSTANCES} idle instances (`sleep infinity`)\n")
    out.append(
        f"Machine: {m['nproc']} CPUs, {m['model']}, {m['mem']} RAM, {m['kernel']}; run {m['date']}.  "
    )
    out.append(
        f"sluice {m['commit']}, release build, {m['rustc']}; supervisord {m['supervisor']} on {m['python']}.\n"
    )
    out.append("| metric | sluice | supervisord | sluice/supervisord |")
    out.append("| --- | ---: | ---: | ---: |")
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    out.append("")
    out.append("Goals (reported, not asserted):\n")
    out.append(
        f"- daemon (brain) under 10 MiB RSS: {mib(s['brain_rss_kib'])} — {goal(s['brain_rss_kib'] < GOAL_BRAIN_RSS_KIB)}"
    )
    out.append(
        f"- each shim under 0.5 MiB PSS: max {kib_s(s['shim_pss_max_kib'])} — "
        f"{goal(s['shim_pss_max_kib'] is not None and s['shim_pss_max_kib'] < GOAL_SHIM_PSS_KIB)}"
    )
    out.append(
        f"- idle CPU near zero: {s['cpu_ms']:.0f} ms over {w:.0f} s ({pct(s['cpu_ms'])} of one CPU) — "
        f"{goal(s['cpu_ms'] / (w * 1000) < 0.001)} (threshold: < 0.1 % of one CPU)"
    )
    out.append("")
    out.append("Details:\n")
    for r in (s, v):
        st, roll = r["brain_status"], r["brain_rollup"]
        out.append(
            f"- {r['name']} daemon: VmRSS {st.get('VmRSS', 0)} KiB (RssAnon {st.get('RssAnon', 0)}, "
            f"RssFile {st.get('RssFile', 0)}, RssShmem {st.get('RssShmem', 0)}), VmHWM {st.get('VmHWM', 0)} KiB, "
            f"Pss {roll.get('Pss', 0)} KiB (Pss_Anon {roll.get('Pss_Anon', 0)}, Pss_File {roll.get('Pss_File', 0)}), "
            f"VmSize {st.get('VmSize', 0)} KiB, {r['brain_threads']} thread(s); largest mappings by Rss: "
            + ", ".join(f"`{n}` {rss} KiB (Pss {pss})" for n, rss, pss in r["brain_top"][:6])
        )
    sd = s["shim_detail"]
    if sd:
        st, roll = sd["status"], sd["rollup"]
        out.append(
            f"- one sluice-shim: VmRSS {st.get('VmRSS', 0)} KiB (RssAnon {st.get('RssAnon', 0)}, RssFile "
            f"{st.get('RssFile', 0)}), Pss {roll.get('Pss', 0)} KiB (Pss_Anon {roll.get('Pss_Anon', 0)}, "
            f"Pss_File {roll.get('Pss_File', 0)}); mean shim VmRSS {s['shim_rss_mean_kib']:.0f} KiB; largest mappings: "
            + ", ".join(f"`{n}` {rss} KiB (Pss {pss})" for n, rss, pss in sd["top"][:6])
        )
    out.append("")
    out.append("Method:\n")
    out.append(
        "- The two supervisors run one after the other, never together, each in a fresh temp dir; each "
        f"supervises {INSTANCES} × `sleep infinity` (sluice: one service with `instances = {INSTANCES}`; "
        f"supervisord: `[program:idle]` with `numprocs={INSTANCES}`, unix socket, nodaemon, logs to files)."
    )
    out.append(
        "- Time to all running: from spawning the daemon until a poll sees every instance running "
        "(sluice: `sluice status --json` state `running`; supervisord: `supervisorctl status` RUNNING), polled every "
        f"{POLL_INTERVAL_S * 1000:.0f} ms plus the poll's own duration (last poll: sluice {s['ready_poll_s'] * 1000:.0f} ms, "
        f"supervisorctl {v['ready_poll_s'] * 1000:.0f} ms). Both count an instance as running only after it has "
        "lived 1 s (sluice `startup_ms` = 1000, supervisord `startsecs` = 1)."
    )
    out.append(
        "- Own processes: sluice = the daemon + every `sluice-shim` (they are not the daemon's children: "
        "they double-fork and setsid; found via status `shim_pid`, cross-checked in /proc); supervisord = the "
        "supervisord process only. Instances (`sleep`) are never counted."
    )
    out.append(
        "- RSS: `VmRSS` from /proc/PID/status. PSS: `Pss` from /proc/PID/smaps_rollup (shared pages, e.g. the "
        "shim binary's text, are split among the processes mapping them). Memory is sampled at the end of the quiet window."
    )
    out.append(
        f"- CPU: utime+stime from /proc/PID/stat (ticks of 1/{CLK_TCK} s) summed over own processes, difference "
        f"across a {w:.0f} s window (`BENCH_QUIET_SECONDS`) that starts right after all instances run and nothing "
        "queries the supervisors. Resolution is one tick per process (10 ms)."
    )
    if s["died_in_window"] or v["died_in_window"]:
        out.append(
            f"- WARNING: own processes died during the window (sluice {s['died_in_window']}, "
            f"supervisord {v['died_in_window']}); their CPU is not counted."
        )
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- main


def main():
    cmd, work = sys.argv[1], os.path.abspath(sys.argv[2])
    tag = os.environ.get("BENCH_TAG", work)
    if cmd == "cleanup":
        for sig in (signal.SIGTERM, signal.SIGKILL):
            killed = kill_tagged(work, sig)
            if not killed:
                break
            log(f"cleanup: sent {sig.name} to {len(killed)} processes")
            if wait_untagged(work, 5):
                break
        remove_cgroups(work)
        return 0
    assert cmd == "run", cmd
    assert tag == work, "BENCH_TAG must be the work dir"

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    for binary in (SLUICE, SHIM):
        if not os.access(binary, os.X_OK):
            sys.exit(f"missing {binary}: build first (bench/supervise.sh does)")

    m = machine()
    s = run_sluice(work, tag)
    v = run_supervisord(work, tag)
    text = report(s, v, m)
    results = os.path.join(REPO, "bench", "results")
    os.makedirs(results, exist_ok=True)
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    path = os.path.join(results, f"supervise-{day}{LABEL}.md")
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(results, f"supervise-{day}{LABEL}.json"), "w") as f:
        json.dump({"machine": m, "sluice": s, "supervisord": v}, f, indent=2, default=str)
    print(text)
    log(f"written {os.path.relpath(path, REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
