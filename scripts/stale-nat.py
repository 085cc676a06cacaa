"""Shows, with no sluice, how a steering chain's REDIRECT can send a new connection to a port that
left the chain: run inside a network namespace of its own by scripts/stale-nat.sh.

A client connects from a fixed port P to the front port (REDIRECTed to port A), the connection
ends one of four ways, the chain is rewritten to port B and A's listener closes (an instance
leaves steering and stops), then the client connects from P again. Conntrack keeps an ended
connection's entry (TIME_WAIT 120 s, CLOSE 10 s); a new SYN on it is looked up again only when a
FIN was seen or the client sent the RST. After a reset from the server side the old entry, and its
NAT to A, is used for the new connection, which is refused.
"""

import socket
import struct
import subprocess
import time

FRONT, A, B = 9000, 9101, 9102


def redirect_to(port):
    subprocess.run(["iptables", "-t", "nat", "-F", "OUTPUT"], check=True)
    subprocess.run(
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.1",
         "--dport", str(FRONT), "-j", "REDIRECT", "--to-ports", str(port)],
        check=True,
    )


def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s


def client(port):
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.settimeout(2)
    c.bind(("127.0.0.1", port))
    return c


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def trial(ending, client_port):
    a, b = listener(A), listener(B)
    redirect_to(A)
    c = client(client_port)
    c.connect(("127.0.0.1", FRONT))
    served, _ = a.accept()
    if ending == "server FIN":
        served.close()
        time.sleep(0.05)
        c.close()
    elif ending == "client FIN":
        c.close()
        time.sleep(0.05)
        served.close()
    elif ending == "client RST":
        reset(c)
        served.close()
    elif ending == "server RST":
        reset(served)
        time.sleep(0.05)
        c.close()
    time.sleep(0.1)
    redirect_to(B)
    a.close()
    c = client(client_port)
    try:
        c.connect(("127.0.0.1", FRONT))
        b.settimeout(1)
        b.accept()
        outcome = "reached the port now in the chain"
    except OSError as e:
        outcome = f"FAILED: {e}"
    finally:
        c.close()
        b.close()
    print(f"{ending:10s} then a new connection from the same port: {outcome}", flush=True)
    return outcome.startswith("FAILED")


failed = [trial(e, 40_000 + i) for i, e in enumerate(
    ["server FIN", "client FIN", "client RST", "server RST"])]
print(f"{sum(failed)} of {len(failed)} endings left a stale NAT entry")
