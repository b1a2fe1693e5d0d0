"""Resume under stress: the native client carries 256 MiB each way through a FaultProxy that
resets the WebSocket's TCP connection 20 times at random byte offsets (seeded), and the bytes
arrive intact (sha256 equal at both ends); then a smaller transfer through latency, slicing and
a bandwidth cap at once."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.app import RunningServer

from ..faults import Direction, FaultProxy, Link
from ..helpers import (
    UNIT,
    TcpTarget,
    capture_audit,
    deterministic_chunks,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer
from .common import MiB, client_options, finished, listening, only_session

pytestmark = pytest.mark.e2e

TOTAL = 256 * MiB
DROPS = 20
SEED = 20240607
# No drop closer than this to the previous one (counted on the proxied connection, handshake
# and replay included), so every drop lands mid-transfer rather than in a TLS handshake.
MIN_GAP = 512 * 1024
# Client reconnects quickly: the test measures resume, not backoff.
FAST = {"backoff_initial": 0.005, "backoff_cap": 0.05}
# 256 MiB at ~100 MB/s (client, relay, proxy and targets share this process), plus resumes.
TRANSFER_TIMEOUT = 60.0


@functools.cache
def expected_digest(total: int) -> str:
    digest = hashlib.sha256()
    for piece in deterministic_chunks(total):
        digest.update(piece)
    return digest.hexdigest()


def drop_gaps(rng: random.Random, count: int, span: int) -> list[int]:
    """``count`` random gaps (bytes between resets), each at least MIN_GAP, summing to at most
    ``span``: every drop falls inside a transfer of more than ``span`` bytes."""
    free = span - count * MIN_GAP
    cuts = sorted(rng.randrange(free) for _ in range(count))
    gaps, previous = [], 0
    for cut in cuts:
        gaps.append(MIN_GAP + cut - previous)
        previous = cut
    return gaps


def arm_drops(gaps: list[int], direction: Direction) -> Any:
    """An ``on_connect`` hook: connection i is reset after gaps[i] bytes in ``direction``."""

    def on_connect(link: Link) -> None:
        if link.number <= len(gaps):
            link.drop_after(gaps[link.number - 1], direction)

    return on_connect


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


def report(what: str, elapsed: float, total: int, resumes: int) -> None:
    print(
        f"\n{what}: {total / MiB:.0f} MiB in {elapsed:.2f}s "
        f"({total / elapsed / 1e6:.0f} MB/s) with {resumes} resumes"
    )


async def test_upload_256mib_survives_20_random_drops(
    relay: RunningServer, issuer: TestIssuer, sink: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    gaps = drop_gaps(random.Random(SEED), DROPS, int(TOTAL * 0.9))
    proxy = FaultProxy(relay.port, on_connect=arm_drops(gaps, "up"))
    async with proxy:
        opts = client_options(
            f"wss://127.0.0.1:{proxy.port}",
            tmp_path / "relay-cert.pem",
            issuer.mint(),
            sink.port,
            **FAST,
        )
        async with listening(opts) as listener, asyncio.timeout(TRANSFER_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            session = await only_session(listener)
            start = time.monotonic()
            sent = hashlib.sha256()
            for chunk in deterministic_chunks(TOTAL):
                sent.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            answer = await reader.read()
            elapsed = time.monotonic() - start
            writer.close()
            await finished(listener)
            resumes = session.resumes
    report("upload", elapsed, TOTAL, resumes)
    assert answer.decode() == sent.hexdigest() == expected_digest(TOTAL)
    assert sink.received == TOTAL
    assert proxy.resets == DROPS
    assert resumes == DROPS
    await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["resumes"] == DROPS
    assert closed["bytes_from_client"] == TOTAL
    assert closed["close_code"] == 1000


async def test_download_256mib_survives_20_random_drops(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    source = await TcpTarget("source", source_bytes=TOTAL).start()
    gaps = drop_gaps(random.Random(SEED + 1), DROPS, int(TOTAL * 0.9))
    proxy = FaultProxy(relay.port, on_connect=arm_drops(gaps, "down"))
    try:
        async with proxy:
            opts = client_options(
                f"wss://127.0.0.1:{proxy.port}",
                tmp_path / "relay-cert.pem",
                issuer.mint(),
                source.port,
                **FAST,
            )
            async with listening(opts) as listener, asyncio.timeout(TRANSFER_TIMEOUT):
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                session = await only_session(listener)
                start = time.monotonic()
                got = hashlib.sha256()
                received = 0
                while data := await reader.read(256 * 1024):
                    got.update(data)
                    received += len(data)
                elapsed = time.monotonic() - start
                writer.close()
                await finished(listener)
                resumes = session.resumes
    finally:
        await source.stop()
    report("download", elapsed, TOTAL, resumes)
    assert received == TOTAL
    assert got.hexdigest() == expected_digest(TOTAL)
    assert proxy.resets == DROPS
    assert resumes == DROPS
    await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["resumes"] == DROPS
    assert closed["bytes_to_client"] == TOTAL
    assert closed["close_code"] == 1000


COMBINED = 4 * MiB
RATE = 8_000_000.0  # bytes per second, each direction


async def test_both_ways_through_latency_slices_and_bandwidth_cap(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """ws:// (no TLS) so that the odd-sized slices cut WebSocket and tunnel frames themselves;
    an echo target, so both directions carry COMBINED bytes at once; and two resets on top."""
    data = relay_config_data(issuer, tmp_path, tls=False)
    # The first two connections are cut at odd offsets (mid-frame); the third one finishes.
    hook = arm_drops([1_300_007, 1_100_003], "up")
    async with start_relay(data) as relay, FaultProxy(relay.port, on_connect=hook) as proxy:
        audit = capture_audit(relay)
        proxy.latency(UNIT / 5)  # 10 ms each way
        proxy.slice(997)
        proxy.bandwidth(RATE)
        opts = client_options(
            f"ws://127.0.0.1:{proxy.port}", None, issuer.mint(), echo.port, **FAST
        )
        async with listening(opts) as listener, asyncio.timeout(TRANSFER_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            session = await only_session(listener)
            start = time.monotonic()
            got = hashlib.sha256()
            received = 0

            async def send() -> None:
                for chunk in deterministic_chunks(COMBINED, chunk=50_000):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            while chunk := await reader.read(65536):
                got.update(chunk)
                received += len(chunk)
            await sender
            elapsed = time.monotonic() - start
            writer.close()
            await finished(listener)
            resumes = session.resumes
        await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    report("echo through latency+slice+bandwidth", elapsed, COMBINED, resumes)
    assert received == COMBINED
    assert got.hexdigest() == expected_digest(COMBINED)
    assert proxy.resets == resumes == 2
    # The cap holds: both directions share nothing, so the echo takes at least size / rate.
    assert elapsed >= COMBINED / RATE * 0.9
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["bytes_from_client"] == closed["bytes_to_client"] == COMBINED
