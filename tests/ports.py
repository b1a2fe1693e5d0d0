"""Ports for servers the tests start in other processes (redis-server, sshd, haproxy, relay
nodes), which must be told their port before they bind it.

A port found by binding port 0 is an ephemeral port: between the check and the other process's
bind, any outgoing connection or port-0 bind on the machine may take it ("address already in
use", seen on busy CI machines). These ports come from below the kernel's ephemeral range
instead, where only an explicit bind can land, and each is handed out once per test process."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()
_FIRST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on now and that the kernel will not hand to a
    port-0 bind or an outgoing connection."""
    low, high = _ephemeral_range()
    pool = range(_FIRST, low) if low - _FIRST >= 1000 else range(high + 1, 65536)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.choice(pool)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {pool.start}..{pool.stop - 1}")
