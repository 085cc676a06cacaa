# Shared by the benchmark scripts: where the repository is, and a cleanup that kills every
# process of the run (found by the temp dir in its command line or environment) and removes
# the run's namespaces and files, whatever way the script ends. Source it; it sets traps.


work=""
runner_pid=""

# Kills every process whose command line or environment mentions $work, and their descendants
# (instances such as `sleep` start with a clean environment), then deletes the runner's namespaces.
kill_leftovers() {
    local dir=$1 runner=$2
    /usr/bin/python3 - "$dir" <<'PY' || true
import os, signal, sys
tag = sys.argv[1].encode()
procs = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read()
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                text += f.read()
        except OSError:
            pass
        procs[int(pid)] = (ppid, tag in text)
    except (OSError, IndexError, ValueError):
        pass
me = os.getpid()
doomed = {p for p, (_, hit) in procs.items() if hit and p != me and p != os.getppid()}
grew = True
while grew:
    grew = False
    for p, (pp, _) in procs.items():
        if pp in doomed and p not in doomed and p != me:
            doomed.add(p); grew = True
for p in doomed:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
if doomed:
    print(f"cleanup: killed {len(doomed)} leftover processes", file=sys.stderr)
PY
    if [[ -n "$runner" ]]; then
        for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^sl${runner}x" || true); do
            ip netns del "$ns" 2>/dev/null || true
        done
    fi
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$runner_pid" ]] && kill -0 "$runner_pid" 2>/dev/null; then
        kill -KILL "$runner_pid" 2>/dev/null || true
    fi
    if [[ -n "$work" && -d "$work" ]]; then
        kill_leftovers "$work" "$runner_pid"
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP
