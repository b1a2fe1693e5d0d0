"""Graceful drain (SIGTERM): /readyz turns 503 at once, new connects are refused with 503 and
Retry-After, open tunnels (resumes included) keep running for the grace period, then attached
ones close with 4100 and parked ones end; no tunnel is cut before the grace ends."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tunnel_client.session import TunnelFailed, TunnelSession
from tunnel_protocol import NATIVE, NATIVE_SUBPROTOCOL, CloseCode
from tunnel_protocol.frames import Ack, Close, Data, decode, encode_data
from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_continuous import OpenTunnel
from .test_limits import _query, echo_round_trip, raw_tunnel
from .test_relay import client_ssl, options

GRACE = 20 * UNIT
ROOT = Path(__file__).resolve().parents[2]


async def http_status(url: str, context: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as response:
        return response.status


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


async def test_drain_keeps_tunnels_for_the_grace_then_closes_them_with_4100(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    record_property: Any,
) -> None:
    audit = capture_audit(relay)
    native = OpenTunnel(relay, tmp_path, issuer.mint(), echo.port)
    native.session = TunnelSession(
        options(relay, tmp_path, issuer.mint(), echo.port, resume_timeout=20 * UNIT)
    )
    await native.start(relay)
    assert native.ended is not None
    iap = await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)
    for _ in range(2):  # two parked tunnels: one resumes during the grace, one stays parked
        (await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)).transport.abort()
    await relay.relay.wait_until(lambda: sum(s.pump is None for s in _sessions(relay)) == 2)
    parked = [s.sid for s in _sessions(relay) if s.pump is None]

    started = time.monotonic()
    drain = asyncio.ensure_future(relay.drain(GRACE))
    context = client_ssl(tmp_path)
    assert await http_status(f"https://127.0.0.1:{relay.port}/readyz", context) == 503
    ready_after = time.monotonic() - started
    with pytest.raises(InvalidStatus) as info:
        await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Retry-After"] == "1"
    resumed = await raw_tunnel(
        relay, tmp_path, issuer.mint(), echo.port, path=f"/v4/reconnect?sid={parked[0]}&ack=0"
    )
    # The native tunnel carries data for the whole grace period.
    round_trips = 0
    last_ok = started
    while not native.ended.done():
        try:
            await echo_round_trip(native, b"during the grace")
        except OSError:
            break
        round_trips += 1
        last_ok = time.monotonic()
        await asyncio.sleep(UNIT)  # pacing the traffic
    async with asyncio.timeout(40 * UNIT):
        closed = await drain
        failure = await native.ended
        await iap.wait_closed()
        await resumed.wait_closed()
    elapsed = time.monotonic() - started
    record_property("readyz_503_after_s", round(ready_after, 4))
    record_property("drain_seconds", round(elapsed, 4))
    assert closed == 4
    assert last_ok - started >= GRACE - 2 * UNIT  # data flowed until (about) the grace's end
    assert round_trips >= 10
    assert GRACE <= elapsed < GRACE + 20 * UNIT
    for ws in (iap, resumed):
        assert (ws.close_code, ws.close_reason) == (4100, "relay draining, reconnect")
    # The native client took 4100 as "reconnect" and tried to resume; this relay has ended the
    # tunnel, so the resume is refused.
    assert native.session.resumes == 1
    assert isinstance(failure, TunnelFailed)
    assert failure.code == CloseCode.SID_UNKNOWN
    ends = [r for r in audit if r["event"] == "tunnel_closed"]
    assert sorted(r["close_code"] for r in ends) == [4100] * 4
    drain_start = next(r for r in audit if r["event"] == "drain")["time"]
    assert all(r["time"] - drain_start >= GRACE - 0.01 for r in ends)  # none before the grace
    native.close()


def _sessions(server: RunningServer) -> list[Any]:
    return list(server.relay.sessions.values())


async def test_drain_ends_early_when_no_tunnel_is_left(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    tunnel = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
    assert tunnel.ended is not None
    drain = asyncio.ensure_future(relay.drain(1000 * UNIT))
    await echo_round_trip(tunnel)
    tunnel.close()  # the tunnel finishes on its own during the grace
    async with asyncio.timeout(40 * UNIT):
        assert await drain == 0  # nothing left to close
        assert await tunnel.ended is None
    async with asyncio.timeout(10 * UNIT):  # an empty relay drains at once
        assert await relay.drain(1000 * UNIT) == 0


# -- the real process: SIGTERM -------------------------------------------------------------------


class RelayProcess:
    """``python -m tunnel_server serve --config FILE`` with its stderr collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new_line.set()
            self._new_line = asyncio.Event()
        self._new_line.set()

    async def wait_line(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match := regex.search(line):
                    return match
            seen = len(self.lines)
            if self._reader.done():
                raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))
            await self._new_line.wait()


async def native_echo(ws: ClientConnection, payload: bytes) -> None:
    await ws.send(encode_data(payload))
    while True:
        message = await ws.recv()
        assert isinstance(message, bytes)
        frame = decode(message, max_data=NATIVE.max_data, native=True)
        if isinstance(frame, Data):
            assert frame.payload == payload
            return


async def _next_frame_but_acks(ws: ClientConnection) -> object:
    while True:
        message = await ws.recv()
        assert isinstance(message, bytes)
        frame = decode(message, max_data=NATIVE.max_data, native=True)
        if not isinstance(frame, Ack):
            return frame


async def test_sigterm_drains_the_relay_process_and_exits_0(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, record_property: Any
) -> None:
    grace = 40 * UNIT
    config = relay_config_data(issuer, tmp_path, tunnel={"drain_grace": grace})
    config["log_format"] = "json"
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunnel_server", "serve", "--config", str(path),
        cwd=ROOT, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    relay = RelayProcess(proc)
    try:
        async with asyncio.timeout(200 * UNIT):
            port = int((await relay.wait_line(r"Listening on wss://127\.0\.0\.1:(\d+)"))[1])
        url = f"wss://127.0.0.1:{port}"
        context = client_ssl(tmp_path)
        assert await http_status(f"https://127.0.0.1:{port}/readyz", context) == 200
        ws = await _native_connect(url, context, issuer.mint(), echo.port)
        await native_echo(ws, b"before")

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20 * UNIT):
            await relay.wait_line(r"SIGTERM: draining")
            assert await http_status(f"https://127.0.0.1:{port}/readyz", context) == 503
        ready_after = time.monotonic() - started
        with pytest.raises(InvalidStatus) as info:
            await _native_connect(url, context, issuer.mint(), echo.port)
        assert info.value.response.status_code == 503
        round_trips = 0
        while time.monotonic() - started < grace - 4 * UNIT:
            await native_echo(ws, b"during the grace")
            round_trips += 1
            await asyncio.sleep(UNIT)  # pacing the traffic
        # At the end of the grace: a CLOSE frame with the reason, then the close code. An ACK
        # of the last echo may still be on its way (late on a busy machine): not the close.
        async with asyncio.timeout(40 * UNIT):
            frame = await _next_frame_but_acks(ws)
            await ws.wait_closed()
        closed_after = time.monotonic() - started
        assert frame == Close(CloseCode.DRAINING, "relay draining, reconnect")
        assert ws.close_code == CloseCode.DRAINING
        async with asyncio.timeout(40 * UNIT):
            assert await proc.wait() == 0
            await relay.wait_line(r'"event":"drain".*"phase":"end"')
        exited_after = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    record_property("readyz_503_after_s", round(ready_after, 4))
    record_property("closed_4100_after_s", round(closed_after, 4))
    record_property("exited_after_s", round(exited_after, 4))
    assert round_trips >= 10
    assert grace <= closed_after < grace + 20 * UNIT
    closes = [line for line in relay.lines if '"event":"tunnel_closed"' in line]
    assert len(closes) == 1
    assert '"close_code":4100' in closes[0]


async def _native_connect(
    url: str, context: ssl.SSLContext, token: str, port: int
) -> ClientConnection:
    ws = await connect(
        url + _query(port),
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
        ssl=context,
        compression=None,
        ping_interval=None,
    )
    await ws.recv()  # SID
    return ws
