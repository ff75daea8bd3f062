"""A free TCP port for a server this process is about to start: the benches that run a real server
(server.py), and the tests and load tests, which start theirs the same way."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 on Linux) and above Ray's worker ports
# (10002-19999): a port the kernel handed out with bind(0) and we closed could be handed out again
# to one of the many sockets Ray opens while the server starts (CI saw Serve's proxy fail with
# "Address already in use" on such a port); this range is only ever taken by an explicit choice.
PORT_RANGE = (20000, 32000)
_ports = random.Random()  # its own generator: a caller that seeds `random` must not fix our choice


def free_port() -> int:
    """A port nothing listens on now, from PORT_RANGE."""
    for _ in range(200):
        port = _ports.randint(*PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE} after 200 tries")
