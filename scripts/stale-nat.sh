#!/usr/bin/env bash
# Shows the kernel behaviour behind the rare `Connection refused` of a drain restart: a connection
# that the server reset leaves a conntrack entry whose NAT a new connection from the same client
# port reuses for 10 s (nf_conntrack_tcp_timeout_close), even after the chain no longer sends
# anything to that port. No sluice runs; see scripts/stale-nat.py. Everything happens inside a
# network namespace the script makes and removes, on its loopback. Needs root and iptables.
#   sudo scripts/stale-nat.sh
set -euo pipefail
[[ "$(id -u)" -eq 0 ]] || { echo "scripts/stale-nat.sh needs root (a network namespace, iptables in it)" >&2; exit 1; }
ns="sluice-stale-nat-$$"
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" timeout 60 python3 "$(dirname "${BASH_SOURCE[0]}")/stale-nat.py"
