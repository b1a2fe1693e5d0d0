"""The real gcloud CLI as an independent IAP client: ``gcloud compute start-iap-tunnel`` against
our relay (wss on loopback, self-signed certificate), in local-port and ``--listen-on-stdin`` mode.

gcloud's known limits shape these tests: it cannot half-close (on local EOF it flushes, closes the
WebSocket with 1000 and the relay closes the target), so uploads are checked at the target; bulk
transfers go one direction at a time (full-duplex bulk can deadlock inside gcloud); resume is
forced with a 4004 close frame, the only close code gcloud reconnects after."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.app import RunningServer
from tunnel_server.relay.session import Session

from ..helpers import TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .gcloud import (
    STEP_TIMEOUT,
    DigestSink,
    GatedSource,
    Gcloud,
    Progress,
    client_tunnel,
    gcloud_tunnel,
    payload,
    read_all,
    read_exactly,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
]

MiB = 1024 * 1024
SIZE = 20 * MiB
REAUTHS = 3
MODES = ["port", "stdin"]


@pytest.fixture(scope="module")
def throughput(request: pytest.FixtureRequest) -> Iterator[dict[str, float]]:
    """MB/s per transfer, printed as one summary at the end of the module (also without -s)."""
    results: dict[str, float] = {}
    yield results
    if not results:
        return
    line = "throughput (MB/s, 10^6 B/s): " + ", ".join(
        f"{name} {value:.1f}" for name, value in results.items()
    )
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - plugins disabled
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("\n" + line)


def record(
    throughput: dict[str, float], record_property: Any, name: str, progress: Progress
) -> None:
    """Steady-state rate: first to last byte at the receiving end."""
    assert progress.rate > 0
    throughput[name] = progress.rate
    record_property(f"throughput_MBps[{name}]", round(progress.rate, 1))


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


@contextlib.asynccontextmanager
async def local_connection(
    gcloud: Gcloud,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gcloud.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def the_session(relay: RunningServer) -> Session:
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(lambda: len(relay.relay.sessions) == 1)
    (session,) = relay.relay.sessions.values()
    return session


async def attached(relay: RunningServer, session: Session, resumes: int) -> None:
    """Wait until gcloud has resumed ``session`` ``resumes`` times and is attached again."""
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(
            lambda: session.resumes == resumes and session.pump is not None
        )


async def write_all(writer: asyncio.StreamWriter, data: bytes | memoryview) -> None:
    view = memoryview(data)
    for start in range(0, len(view), 256 * 1024):
        writer.write(view[start : start + 256 * 1024])
        await writer.drain()


# -- bulk transfers ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_upload_20mib(
    relay: RunningServer,
    issuer: TestIssuer,
    tmp_path: Path,
    mode: str,
    throughput: dict[str, float],
    record_property: Any,
) -> None:
    data = payload(SIZE, seed=1)
    sink = await DigestSink().start()
    audit = capture_audit(relay)
    stdin_mode = mode == "stdin"
    try:
        async with gcloud_tunnel(
            relay.port, sink.port, issuer.mint(), tmp_path, stdin_mode=stdin_mode
        ) as gcloud:
            if stdin_mode:
                await write_all(gcloud.stdin, data)
                gcloud.stdin.close()  # EOF: gcloud flushes, closes with 1000 and exits
                received, digest = await sink.result()
                assert await gcloud.wait_exit() == 0, gcloud.stderr.text
            else:
                async with local_connection(gcloud) as (_, writer):
                    await write_all(writer, data)
                    writer.write_eof()  # gcloud flushes and closes the tunnel with 1000
                    received, digest = await sink.result()
    finally:
        await sink.stop()
    assert (received, digest) == (SIZE, hashlib.sha256(data).hexdigest())
    assert sink.connections == 1
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(lambda: not relay.relay.sessions)
    (closed,) = [r for r in audit if r["event"] == "tunnel_closed"]
    assert (closed["close_code"], closed["bytes_from_client"]) == (1000, SIZE)
    record(throughput, record_property, f"gcloud up ({mode})", sink.progress)


@pytest.mark.parametrize("mode", MODES)
async def test_download_20mib(
    relay: RunningServer,
    issuer: TestIssuer,
    tmp_path: Path,
    mode: str,
    throughput: dict[str, float],
    record_property: Any,
) -> None:
    data = payload(SIZE, seed=2)
    source = await GatedSource(data).start()
    audit = capture_audit(relay)
    progress = Progress()
    try:
        async with gcloud_tunnel(
            relay.port, source.port, issuer.mint(), tmp_path, stdin_mode=mode == "stdin"
        ) as gcloud:
            if mode == "stdin":
                # gcloud leaves stdin mode when its stdin ends (like ssh closing the pipe).
                async with asyncio.timeout(STEP_TIMEOUT):
                    got = await read_exactly(gcloud.stdout, SIZE, progress)
                    gcloud.stdin.close()
                    assert await gcloud.stdout.read() == b""
                assert await gcloud.wait_exit() == 0, gcloud.stderr.text
            else:
                # The relay closes with 1000 after the target's EOF; gcloud then ends the local
                # connection.
                async with local_connection(gcloud) as (reader, _), asyncio.timeout(STEP_TIMEOUT):
                    got = await read_all(reader, progress)
            async with asyncio.timeout(STEP_TIMEOUT):
                await relay.relay.wait_until(lambda: not relay.relay.sessions)
    finally:
        await source.stop()
    assert (progress.count, got) == (SIZE, hashlib.sha256(data).hexdigest())
    (closed,) = [r for r in audit if r["event"] == "tunnel_closed"]
    assert (closed["close_code"], closed["bytes_to_client"]) == (1000, SIZE)
    record(throughput, record_property, f"gcloud down ({mode})", progress)


async def test_tunnel_client_upload_and_download_20mib(
    relay: RunningServer,
    issuer: TestIssuer,
    tmp_path: Path,
    throughput: dict[str, float],
    record_property: Any,
) -> None:
    """Our client through the same relay, same sizes and measurement, for comparison."""
    up = payload(SIZE, seed=4)
    down = payload(SIZE, seed=5)
    sink = await DigestSink().start()
    source = await GatedSource(down).start()
    progress = Progress()
    try:
        async with client_tunnel(relay.port, sink.port, issuer.mint(), tmp_path) as client:
            async with local_connection(client) as (_, writer):
                await write_all(writer, up)
                writer.write_eof()  # native half-close: the target sees EOF, then answers
                assert await sink.result() == (SIZE, hashlib.sha256(up).hexdigest())
        async with client_tunnel(relay.port, source.port, issuer.mint(), tmp_path) as client:
            async with local_connection(client) as (reader, _), asyncio.timeout(STEP_TIMEOUT):
                assert await read_all(reader, progress) == hashlib.sha256(down).hexdigest()
    finally:
        await sink.stop()
        await source.stop()
    record(throughput, record_property, "tunnel-client up", sink.progress)
    record(throughput, record_property, "tunnel-client down", progress)


async def test_direct_loopback_baseline(throughput: dict[str, float], record_property: Any) -> None:
    """The same targets and measurement without gcloud or the relay, for comparison."""
    data = payload(SIZE, seed=3)
    sink = await DigestSink().start()
    source = await GatedSource(data).start()
    progress = Progress()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        await write_all(writer, data)
        writer.write_eof()
        assert await sink.result() == (SIZE, hashlib.sha256(data).hexdigest())
        writer.close()
        await writer.wait_closed()

        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        async with asyncio.timeout(STEP_TIMEOUT):
            assert await read_all(reader, progress) == hashlib.sha256(data).hexdigest()
        writer.close()
        await writer.wait_closed()
    finally:
        await sink.stop()
        await source.stop()
    record(throughput, record_property, "direct up", sink.progress)
    record(throughput, record_property, "direct down", progress)


# -- refusals ------------------------------------------------------------------------------------


async def refused(gcloud: Gcloud, *needles: str) -> str:
    """Make gcloud connect (port mode: a local client connects), wait for its error."""
    if gcloud.port:
        async with local_connection(gcloud) as (reader, _):
            stderr = await gcloud.wait_stderr(*needles)
            async with asyncio.timeout(STEP_TIMEOUT):
                assert await reader.read() == b""  # gcloud drops the local connection
        return stderr
    stderr = await gcloud.wait_stderr(*needles)
    await gcloud.wait_exit()  # exit status 0 all the same: gcloud only logs the error
    return stderr


@pytest.mark.parametrize("mode", MODES)
async def test_denied_user_sees_4033(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, mode: str
) -> None:
    audit = capture_audit(relay)
    token = issuer.mint(sub="mallory", email="mallory@example.com")
    async with gcloud_tunnel(
        relay.port, echo.port, token, tmp_path, stdin_mode=mode == "stdin"
    ) as gcloud:
        stderr = await refused(gcloud, "4033", "not authorized")
    assert "Error while connecting [4033: 'not authorized']" in stderr
    assert echo.connections == 0
    decisions = [r for r in audit if r["event"] == "decision"]
    assert [(r["decision"], r["principal"]) for r in decisions] == [
        ("deny", "user:mallory@example.com")
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_unreachable_backend_is_4003(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path, mode: str
) -> None:
    closed = await TcpTarget().start()
    port = closed.port
    await closed.stop()  # nothing listens there any more
    async with gcloud_tunnel(
        relay.port, port, issuer.mint(), tmp_path, stdin_mode=mode == "stdin"
    ) as gcloud:
        stderr = await refused(gcloud, "4003")
    assert f"(Failed to connect to port {port})" in stderr


# -- forced re-authentication (4004) and resume ----------------------------------------------


def assert_resumed(
    audit: list[dict[str, Any]], session: Session, to_client: int, from_client: int
) -> None:
    resumes = [r for r in audit if r["event"] == "resume"]
    assert len(resumes) == REAUTHS, resumes
    assert all(r["decision"] == "allow" for r in resumes)
    assert all(r["tunnel_id"] == session.sid for r in resumes)
    assert all(r["principal"] == "user:alice@example.com" for r in resumes)
    (closed,) = [r for r in audit if r["event"] == "tunnel_closed"]
    assert closed["resumes"] == REAUTHS
    assert closed["close_code"] == 1000
    assert closed["bytes_to_client"] == to_client
    assert closed["bytes_from_client"] == from_client


async def test_forced_reauth_mid_download(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    """4004 several times while a download streams: gcloud comes back on /v4/reconnect with its
    token and the ack of what it got; the relay replays the rest; no byte is lost."""
    data = payload(SIZE, seed=4)
    source = await GatedSource(data, gated=True).start()
    audit = capture_audit(relay)
    step = SIZE // (REAUTHS + 1)
    progress = Progress()
    try:
        async with (
            gcloud_tunnel(relay.port, source.port, issuer.mint(), tmp_path, stdin_mode=False) as g,
            local_connection(g) as (reader, _),
        ):
            download = asyncio.create_task(read_all(reader, progress))
            try:
                session = await the_session(relay)
                for n in range(REAUTHS):
                    source.release((n + 1) * step)
                    await progress.reached(n * step + step // 2)  # bytes are flowing
                    assert relay.relay.require_reauth(session.sid)
                    await attached(relay, session, n + 1)
                source.release(SIZE)
                async with asyncio.timeout(STEP_TIMEOUT):
                    digest = await download
            finally:
                download.cancel()
    finally:
        await source.stop()
    assert (progress.count, digest) == (SIZE, hashlib.sha256(data).hexdigest())
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(lambda: not relay.relay.sessions)
    assert_resumed(audit, session, SIZE, 0)


async def test_forced_reauth_mid_upload(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    """The same with gcloud sending: it re-sends what the relay had not received."""
    data = payload(SIZE, seed=5)
    sink = await DigestSink().start()
    audit = capture_audit(relay)
    step = SIZE // (REAUTHS + 1)
    view = memoryview(data)
    try:
        async with (
            gcloud_tunnel(relay.port, sink.port, issuer.mint(), tmp_path, stdin_mode=False) as g,
            local_connection(g) as (_, writer),
        ):
            session = await the_session(relay)
            for n in range(REAUTHS + 1):
                await write_all(writer, view[n * step : (n + 1) * step])
                if n < REAUTHS:
                    await sink.progress.reached(n * step + step // 2)  # bytes are flowing
                    assert relay.relay.require_reauth(session.sid)
                    await attached(relay, session, n + 1)
            writer.write_eof()
            received, digest = await sink.result()
    finally:
        await sink.stop()
    assert (received, digest) == (SIZE, hashlib.sha256(data).hexdigest())
    async with asyncio.timeout(STEP_TIMEOUT):
        await relay.relay.wait_until(lambda: not relay.relay.sessions)
    assert_resumed(audit, session, 0, SIZE)


# -- stdin mode as an ssh ProxyCommand ---------------------------------------------------------


async def test_stdin_pipe_round_trips(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """Request/response traffic like an interactive ssh session's through ``--listen-on-stdin``:
    each message comes back from the echo target intact and in order (the acks in between flow
    both ways); closing stdin ends gcloud cleanly.

    Messages stay within one IAP frame (16 KiB): gcloud deadlocks itself when it has data both to
    send and to receive. Its reader thread fills its 5-slot send queue, and the send thread then
    blocks putting an ack request (after > 32 KiB received) into that same full queue, its own.
    Seen with 200 KB echoes in about one run in 20; any server would see the same."""
    data = payload(1 * MiB, seed=6)
    sizes = [1, 7, 100, 1500, 4096, 9000, 16 * 1024 - 1, 16 * 1024] * 8
    async with gcloud_tunnel(
        relay.port, echo.port, issuer.mint(), tmp_path, stdin_mode=True
    ) as gcloud:
        offset = 0
        for size in sizes:
            message = data[offset : offset + size]
            offset += size
            async with asyncio.timeout(STEP_TIMEOUT):
                _, echoed = await asyncio.gather(
                    write_all(gcloud.stdin, message), gcloud.stdout.readexactly(size)
                )
            assert echoed == message
        gcloud.stdin.close()
        assert await gcloud.wait_exit() == 0, gcloud.stderr.text
    assert echo.connections == 1
    assert echo.received == offset
