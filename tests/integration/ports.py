"""Ports for the servers tests start (Ray Serve, a job-submit cluster's GCS and dashboard).

Binding port 0 and releasing it races: the kernel hands out the same ephemeral port to the next
socket anyone opens, and Ray opens many. The ports here come from below the kernel's ephemeral
range and above Ray's worker ports (10002-19999 by default), so no client socket or Ray worker
takes one meanwhile; each is checked free by a bind and never handed out twice in a session.
"""

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and no other socket will be given meanwhile."""
    low, high = RAY_WORKER_PORTS_END + 1, _ephemeral_start() - 1
    for _ in range(200):
        port = random.randint(low, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high} after 200 tries")
