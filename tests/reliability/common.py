"""Shared pieces of the reliability tests: the native client's options and local listener (as
tests/server/test_relay.py starts them), and process measurements."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from tunnel_client.listener import LocalListener
from tunnel_client.session import ConnectOptions, TunnelSession
from tunnel_protocol.urls import InstanceTarget

from ..helpers import UNIT

MiB = 1024 * 1024


def client_options(
    url: str, ca_file: Path | None, token: str, port: int, **kw: Any
) -> ConnectOptions:
    """The native client towards ``url`` (the relay, or a FaultProxy in front of it) for vm1's
    ``port``; wss verifies the relay's self-signed certificate from ``ca_file``."""

    async def provide() -> str:
        return token

    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    settings: dict[str, Any] = {
        "open_timeout": 100 * UNIT,
        "backoff_initial": UNIT / 5,
        "backoff_cap": UNIT * 4,
        **kw,
    }
    return ConnectOptions(
        server=url,
        target=InstanceTarget("p", "z", "vm1", "nic0", port),
        token=provide,
        ssl_context=context,
        **settings,
    )


@asynccontextmanager
async def listening(opts: ConnectOptions) -> AsyncIterator[LocalListener]:
    listener = LocalListener(opts, "127.0.0.1", 0, report=print)
    await listener.start()
    task = asyncio.create_task(listener.serve())
    try:
        yield listener
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def eventually(predicate: Callable[[], bool], limit: float = 100 * UNIT) -> None:
    """Poll ``predicate`` (for state that has no event to wait on) for at most ``limit``."""
    async with asyncio.timeout(limit):
        while True:
            if predicate():
                return
            await asyncio.sleep(UNIT / 10)


async def only_session(listener: LocalListener) -> TunnelSession:
    """The listener's one running tunnel, once its local connection was accepted."""
    await eventually(lambda: bool(listener.active))
    (session,) = listener.active
    return session


async def finished(listener: LocalListener) -> None:
    """Wait until every tunnel of the listener ended (closed with the relay), so that leaving
    ``listening`` does not cut a tunnel that is still closing (the relay would park it)."""
    await eventually(lambda: not listener.active)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
