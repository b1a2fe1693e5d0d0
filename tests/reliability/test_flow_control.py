"""Flow control end to end: with slow readers, the relay's memory stays bounded per tunnel and
the target's TCP window closes instead.

The relay runs as its own process (``python -m tunnel_server serve``, wss, resume buffer 1 MiB)
so that its resident set can be read from /proc, and so does the client (``tunnel-client
start-tunnel --local-host-port``, as a user runs it). TUNNELS tunnels each reach a target that
offers up to 1 GiB as fast as its socket takes it; once every tunnel delivered its first byte,
each local reader reads at READ_RATE for READ_TIME. Measured: the relay's RSS growth per tunnel
(bounded by the resume buffer, the target-side read buffer and TLS/WebSocket buffers) and how
much each target managed to write (what was read plus kernel buffers along the path: far below
1 GiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import pytest

from ..helpers import UNIT, relay_config_data
from ..oidc_fixture import TestIssuer
from ..processes import started
from .common import MiB

pytestmark = pytest.mark.e2e

CLIENT = [sys.executable, "-m", "tunnel_client"]
TUNNELS = 100
OFFER = 1024 * MiB  # each target offers this much
READ_RATE = 1_000_000  # bytes per second, each reader
READ_TIME = 5.0  # seconds of slow reading (a real duration: the point is the rate)
MIN_READ = 16 * 1024
RESUME_BUFFER = 1 * MiB
# Per tunnel on the relay: the resume buffer, the target-side read buffer (256 KiB high water),
# the WebSocket and TLS buffers, and the session's objects.
RSS_PER_TUNNEL_LIMIT = 3 * MiB
# Per target: what the reader took plus the kernel buffers of three loopback hops and the
# bounded buffers of relay and client. Nowhere near the offer.
WRITTEN_LIMIT = 96 * MiB


class Source:
    """Targets that write 64 KiB pieces as fast as their socket accepts them, up to OFFER
    bytes each; ``written`` per connection (what the kernel accepted)."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Source:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.written)
        self.written.append(0)
        self._writers.append(writer)
        piece = bytes(range(256)) * 256
        with contextlib.suppress(ConnectionError, OSError):
            while self.written[index] < OFFER:
                writer.write(piece)
                await writer.drain()
                self.written[index] += len(piece)
        writer.close()


class SlowReader:
    """One local connection through the client: read until the first byte arrives (the tunnel
    is open), then, from ``go``, at READ_RATE for READ_TIME."""

    def __init__(self, port: int, duration: float = READ_TIME) -> None:
        self.port = port
        self.duration = duration
        self.read = 0
        self.opened = asyncio.Event()

    async def run(self, go: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=64 * 1024)
        try:
            self.read += len(await reader.read(1))
            if not self.read:
                raise AssertionError("the tunnel ended before any data")
            self.opened.set()
            await go.wait()
            start = time.monotonic()
            until = start + self.duration
            while (now := time.monotonic()) < until:
                allowed = int((now - start) * READ_RATE) + 1 - self.read
                # Read in pieces of at least MIN_READ: a reader that caught up with its budget
                # and read whatever crumb it allowed (a few hundred bytes) spent a loop turn per
                # crumb, and with 100 readers on a busy machine fell far behind its rate.
                if allowed < MIN_READ and now + 0.05 < until:
                    await asyncio.sleep(0.05)
                    continue
                if allowed <= 0:
                    break
                try:
                    async with asyncio.timeout(until - now):
                        data = await reader.read(min(allowed, 64 * 1024))
                except TimeoutError:
                    break
                if not data:
                    raise AssertionError(f"the tunnel ended after {self.read} bytes")
                self.read += len(data)
        finally:
            writer.transport.abort()


async def test_relay_memory_bounded_and_target_window_closes(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    source = await Source().start()
    data = relay_config_data(issuer, tmp_path, tunnel={"resume_buffer": RESUME_BUFFER})
    config = tmp_path / "relay.yaml"
    config.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    token_file = tmp_path / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(issuer.mint(lifetime=3600), encoding="ascii")
    relay_argv = [sys.executable, "-m", "tunnel_server", "serve", "--config", str(config)]
    try:
        async with started(relay_argv, r"Listening on (wss://\S+)", stdout=False) as relay:
            client_argv = [
                *CLIENT,
                "start-tunnel",
                "vm1",
                str(source.port),
                "--local-host-port=127.0.0.1:0",
                "--disable-connection-check",
                f"--server={relay.found}",
                "--project=p",
                "--zone=z",
                f"--access-token-file={token_file}",
                f"--ca-file={tmp_path / 'relay-cert.pem'}",
            ]
            async with started(client_argv, r"Listening on port \[(\d+)\]", stdout=True) as client:
                port = int(client.found)
                # Warm up the relay (imports, TLS, token verification, first allocations).
                warm = SlowReader(port, duration=10 * UNIT)
                async with asyncio.timeout(200 * UNIT):
                    await warm.run(go_now())
                await asyncio.sleep(10 * UNIT)
                before = relay.rss

                opening = time.monotonic()
                go = asyncio.Event()
                readers = [SlowReader(port) for _ in range(TUNNELS)]
                tasks = [asyncio.create_task(r.run(go)) for r in readers]
                async with asyncio.timeout(600 * UNIT):
                    for r in readers:
                        await r.opened.wait()
                opened = relay.rss
                opening = time.monotonic() - opening
                go.set()
                peak = opened
                while not all(t.done() for t in tasks):
                    peak = max(peak, relay.rss)
                    await asyncio.sleep(0.1)
                await asyncio.gather(*tasks)
                written = source.written[1:]
    finally:
        await source.stop()

    per_tunnel = (peak - before) / TUNNELS
    rates = sorted(r.read / READ_TIME / 1e6 for r in readers)
    print(
        f"\nflow control, {TUNNELS} tunnels (open in {opening:.1f}s), resume buffer "
        f"{RESUME_BUFFER // MiB} MiB: relay RSS "
        f"{before / MiB:.0f} MiB idle, {opened / MiB:.0f} MiB with all tunnels open, peak "
        f"{peak / MiB:.0f} MiB: {per_tunnel / MiB:.2f} MiB per tunnel; readers at "
        f"{rates[0]:.2f}..{rates[-1]:.2f} MB/s (median {rates[len(rates) // 2]:.2f}); targets "
        f"wrote {min(written) / MiB:.1f}..{max(written) / MiB:.1f} MiB each (mean "
        f"{sum(written) / len(written) / MiB:.1f}) of {OFFER // MiB} MiB offered"
    )
    assert len(written) == TUNNELS
    assert per_tunnel < RSS_PER_TUNNEL_LIMIT
    assert max(written) < WRITTEN_LIMIT
    # The readers were slow, not stalled: each got data throughout.
    assert rates[0] > READ_RATE / 1e6 / 10


def go_now() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event
