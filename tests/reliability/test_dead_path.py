"""A silently dead path (a NAT that forgot the flow: no RST, no FIN, nothing): the native
client's keepalive notices, reconnects over a fresh connection and resumes, whether the tunnel
is idle or moving bulk data, and the relay hands the tunnel over to the new WebSocket."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tunnel_server.app import RunningServer

from ..faults import FaultProxy
from ..helpers import (
    UNIT,
    TcpTarget,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer
from .common import MiB, client_options, finished, listening, only_session

pytestmark = pytest.mark.e2e  # slow: bulk transfers over silently dead paths

# The client's ping interval and pong timeout: a dead path is noticed within their sum (plus
# one interval when the ping had just been answered).
KEEPALIVE = (4 * UNIT, 4 * UNIT)
DETECT = 2 * KEEPALIVE[0] + KEEPALIVE[1]
BULK = 32 * MiB


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    # The relay's own keepalive stays at its 20 s default: it does not notice the dead path
    # during these tests, so the resume has to supersede its half-open attachment.
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


@pytest.fixture
async def proxy(relay: RunningServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(relay.port) as fault_proxy:
        yield fault_proxy


def kill_path(proxy: FaultProxy) -> None:
    """Current connections go silent for good; new ones flow."""
    proxy.black_hole()
    proxy.restore(stalled="keep")


async def test_idle_tunnel_resumes_promptly_over_a_dead_path(
    relay: RunningServer,
    proxy: FaultProxy,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
) -> None:
    opts = client_options(
        f"wss://127.0.0.1:{proxy.port}",
        tmp_path / "relay-cert.pem",
        issuer.mint(),
        echo.port,
        keepalive=KEEPALIVE,
    )
    async with listening(opts) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        session = await only_session(listener)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        start = time.monotonic()
        kill_path(proxy)
        writer.write(b"after")
        async with asyncio.timeout(200 * UNIT):
            assert await reader.readexactly(5) == b"after"
        recovered = time.monotonic() - start
        writer.close()
        await finished(listener)
    print(f"\nidle tunnel over a dead path: echo again after {recovered:.2f}s")
    assert session.resumes == 1
    # Detection plus one reconnect (a TLS handshake and a token check on loopback).
    assert recovered < DETECT + 20 * UNIT


async def test_bulk_both_ways_survives_dead_paths(
    relay: RunningServer,
    proxy: FaultProxy,
    issuer: TestIssuer,
    sink: TcpTarget,
    tmp_path: Path,
) -> None:
    """The path dies in the middle of an upload and of a download: the keepalive notices even
    with the write buffer full (the ping waits behind it), and nothing is lost."""
    source = await TcpTarget("source", source_bytes=BULK).start()
    try:
        for target, upload in ((sink, True), (source, False)):
            opts = client_options(
                f"wss://127.0.0.1:{proxy.port}",
                tmp_path / "relay-cert.pem",
                issuer.mint(),
                target.port,
                keepalive=KEEPALIVE,
                backoff_initial=0.005,
                backoff_cap=0.05,
            )
            async with listening(opts) as listener, asyncio.timeout(60):
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                session = await only_session(listener)
                start = time.monotonic()
                kills = [BULK // 3]
                moved = 0
                if upload:
                    for chunk in deterministic_chunks(BULK):
                        writer.write(chunk)
                        await writer.drain()
                        moved += len(chunk)
                        if kills and moved >= kills[0]:
                            kills.pop(0)
                            kill_path(proxy)
                    writer.write_eof()
                    digest = (await reader.read()).decode()
                else:
                    got = hashlib.sha256()
                    while data := await reader.read(256 * 1024):
                        got.update(data)
                        moved += len(data)
                        if kills and moved >= kills[0]:
                            kills.pop(0)
                            kill_path(proxy)
                    digest = got.hexdigest()
                elapsed = time.monotonic() - start
                writer.close()
                await finished(listener)
            print(
                f"\n{'upload' if upload else 'download'} {BULK // MiB} MiB over a dead path: "
                f"{elapsed:.2f}s, {session.resumes} resumes"
            )
            assert moved == BULK
            assert digest == deterministic_digest(BULK)
            assert session.resumes == 1
    finally:
        await source.stop()
