"""Free loopback ports: every server a test or a benchmark starts gets its own.

A port that was free when it was chosen must still be free when the server binds it, maybe a
second later. Two things take it meanwhile if nothing prevents it: another `free_port` call
that the kernel happens to answer with the same number (a Cluster asks for eighteen), and the
source port of an outgoing connection, which the kernel picks from the same ephemeral range
that `bind(0)` does. So ports come from below that range, are checked by binding, and are
never handed out twice by one process. Processes that choose at the same time (pytest-xdist
workers) pick at random from several thousand ports and check by binding; a server that still
loses the race fails to start, and the topology fixtures start again on other ports.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
_LOWEST = 10000  # above the well-known and most registered service ports
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    """The first port the kernel uses for outgoing connections (32768 by default on Linux)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range,
    and not handed out before by this process."""
    top = _ephemeral_start()
    if top - _LOWEST >= 1000:
        for _ in range(200):
            port = random.randrange(_LOWEST, top)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    while True:  # a machine whose ephemeral range starts low: whatever the kernel gives
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
