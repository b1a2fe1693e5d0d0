"""Resource limits with real tunnels: idle timeout and maximum session duration (advance warning,
typed close), caps on tunnels (429 with Retry-After, 4105 after the upgrade), the handshake
timeout against slowloris, oversized and endlessly fragmented messages, and ping floods."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from tunnel_client.session import TunnelFailed, TunnelSession
from tunnel_protocol import IAP_SUBPROTOCOL, NATIVE_SUBPROTOCOL, CloseCode
from tunnel_server.app import RunningServer
from tunnel_server.config import ConfigError, parse_config
from tunnel_server.relay.connection import REPLY_BACKLOG
from tunnel_server.relay.limits import TunnelCaps, human_duration

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .test_continuous import OpenTunnel
from .test_reauth import _socket_pair
from .test_relay import client_ssl, options

LIMIT = 20 * UNIT  # idle timeout / maximum duration in these tests (1 s at the default UNIT)


def _query(port: int) -> str:
    return f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={port}"


async def raw_tunnel(
    relay: RunningServer,
    tmp_path: Path,
    token: str,
    port: int,
    subprotocol: str = IAP_SUBPROTOCOL,
    path: str | None = None,
) -> ClientConnection:
    """A bare WebSocket tunnel (no client logic); returns after the SID."""
    ws = await connect(
        relay.url + (path or _query(port)),
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(subprotocol)],
        ssl=client_ssl(tmp_path) if relay.secure else None,
        compression=None,
        ping_interval=None,
    )
    await ws.recv()  # SID or RECONNECT_ACK
    return ws


async def echo_round_trip(tunnel: OpenTunnel, payload: bytes = b"ping") -> None:
    await tunnel.peer.write(payload)
    received = b""
    while len(received) < len(payload):
        data = await tunnel.peer.read(len(payload) - len(received))
        if not data:
            raise ConnectionError("the tunnel ended")
        received += data
    assert received == payload


@pytest.fixture
async def limited(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    tunnel = {"idle_timeout": LIMIT, "keepalive_interval": 2 * LIMIT}
    async with start_relay(relay_config_data(issuer, tmp_path, tunnel=tunnel)) as server:
        yield server


# -- idle timeout and maximum session duration ---------------------------------------------------


async def test_idle_tunnel_is_warned_then_closed_with_4101(
    limited: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(limited)
    tunnel = await OpenTunnel(limited, tmp_path, issuer.mint(), echo.port).start(limited)
    assert tunnel.ended is not None
    # Traffic more often than the limit keeps the tunnel open well past it.
    started = time.monotonic()
    while time.monotonic() - started < 2 * LIMIT:
        await echo_round_trip(tunnel)
        await asyncio.sleep(LIMIT / 4)  # pacing the traffic, not waiting for a state
        assert not tunnel.ended.done()
    await echo_round_trip(tunnel)
    last = time.monotonic()
    assert not any(r["event"] == "limit_warning" for r in audit)
    async with asyncio.timeout(3 * LIMIT):
        failure = await tunnel.ended
    idle = time.monotonic() - last
    assert isinstance(failure, TunnelFailed)
    assert failure.code == CloseCode.IDLE_TIMEOUT
    assert f"idle for {human_duration(LIMIT)}" in str(failure)  # the client prints the reason
    assert 0.9 * LIMIT <= idle < LIMIT + 10 * UNIT
    await limited.relay.wait_until(lambda: not limited.relay.sessions)
    warning = next(r for r in audit if r["event"] == "limit_warning")
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert warning["limit"] == "idle_timeout"
    assert warning["closes_in"] == pytest.approx(LIMIT / 10, abs=UNIT)
    assert warning["time"] <= closed["time"]
    assert (closed["close_code"], closed["close_reason"]) == (4101, f"idle for {LIMIT:g} s")
    assert tunnel.session.resumes == 0  # ended, not resumed
    tunnel.close()


async def test_idle_timeout_on_iap_and_while_parked(
    limited: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(limited)
    attached = await raw_tunnel(limited, tmp_path, issuer.mint(), echo.port)
    dropped = await raw_tunnel(limited, tmp_path, issuer.mint(), echo.port)
    dropped.transport.abort()  # parked: the idle clock keeps running
    await limited.relay.wait_until(lambda: sum(s.pump is None for s in _sessions(limited)) == 1)
    async with asyncio.timeout(3 * LIMIT):
        await attached.wait_closed()
        await limited.relay.wait_until(lambda: not limited.relay.sessions)
    assert attached.close_code == CloseCode.IDLE_TIMEOUT
    codes = [r["close_code"] for r in audit if r["event"] == "tunnel_closed"]
    assert codes == [4101, 4101]


def _sessions(server: RunningServer) -> list[Any]:
    return list(server.relay.sessions.values())


async def test_busy_tunnel_is_closed_at_the_maximum_duration_with_4102(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    tunnel_settings = {"max_session_duration": LIMIT, "limit_warning": 1.0}
    async with start_relay(relay_config_data(issuer, tmp_path, tunnel=tunnel_settings)) as relay:
        audit = capture_audit(relay)
        started = time.monotonic()
        tunnel = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
        assert tunnel.ended is not None
        async with asyncio.timeout(3 * LIMIT):
            while not tunnel.ended.done():
                try:
                    await echo_round_trip(tunnel)
                except OSError:
                    break  # the local side closed with the tunnel
                await asyncio.sleep(UNIT)  # pacing the traffic
            failure = await tunnel.ended
        elapsed = time.monotonic() - started
        assert isinstance(failure, TunnelFailed)
        assert failure.code == CloseCode.MAX_SESSION_DURATION
        assert f"maximum session duration {human_duration(LIMIT)} reached" in str(failure)
        assert LIMIT <= elapsed < LIMIT + 10 * UNIT
        await relay.relay.wait_until(lambda: not relay.relay.sessions)
        warning = next(r for r in audit if r["event"] == "limit_warning")
        assert warning["limit"] == "max_session_duration"
        assert warning["closes_in"] == pytest.approx(LIMIT / 10)  # a tenth of a short limit
        assert next(r for r in audit if r["event"] == "tunnel_closed")["close_code"] == 4102
        tunnel.close()


def test_durations_in_close_reasons() -> None:
    assert human_duration(1.0) == "1 s"
    assert human_duration(90) == "90 s"
    assert human_duration(600) == "10 min"
    assert human_duration(8 * 3600) == "8 h"
    assert human_duration(5400) == "1 h 30 min"
    assert human_duration(0.5) == "0.5 s"


@pytest.mark.parametrize(
    ("tunnel", "message"),
    [
        ({"idle_timeout": -1}, "tunnel.idle_timeout: Input should be greater than or equal to 0"),
        ({"max_session_duration": "8h"}, "tunnel.max_session_duration: Input should be a valid"),
        ({"drain_grace": "inf"}, "tunnel.drain_grace: Input should be a finite number"),
        ({"max_tunnels": 0}, "tunnel.max_tunnels: Input should be greater than or equal to 1"),
        ({"max_tunnels_per_principal": 1.5}, "tunnel.max_tunnels_per_principal: Input should"),
        (
            {"limit_warnings": 5},
            "tunnel.limit_warnings: unknown key; did you mean 'limit_warning'?",
        ),
    ],
)
def test_limit_settings_are_validated(tunnel: dict[str, Any], message: str) -> None:
    data = {"oidc": {"issuer": "https://idp.example", "audiences": ["t"]}, "tunnel": tunnel}
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="relay.yaml")
    assert f"relay.yaml: {message}" in str(info.value)


# -- caps ----------------------------------------------------------------------------------------


async def _status(relay: RunningServer, tmp_path: Path, token: str, port: int) -> Response:
    with pytest.raises(InvalidStatus) as info:
        await raw_tunnel(relay, tmp_path, token, port)
    return info.value.response


async def test_caps_answer_429_with_retry_after_and_spare_reconnects(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    caps = {"max_tunnels_per_principal": 2, "max_tunnels": 3}
    data = relay_config_data(issuer, tmp_path, tunnel=caps, members=["allAuthenticatedUsers"])
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        first = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
        parked = await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)
        parked.transport.abort()
        await relay.relay.wait_until(lambda: any(s.pump is None for s in _sessions(relay)))
        # alice has two tunnels (one attached, one parked): her third connect is refused.
        response = await _status(relay, tmp_path, issuer.mint(), echo.port)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "5"
        assert b"too many tunnels for this principal (limit 2)" in response.body
        # The native client's first connect fails at once.
        local, peer = await _socket_pair()
        with pytest.raises(TunnelFailed) as info:
            await TunnelSession(options(relay, tmp_path, issuer.mint(), echo.port)).run(local)
        peer.close()
        # (the client reports the status; it retries 429 only while resuming)
        assert info.value.code == 429
        assert "429 Too Many Requests]: try again later" in str(info.value)
        # bob may open one more: the relay is then full for everyone.
        bob = await raw_tunnel(
            relay, tmp_path, issuer.mint(sub="bob", email="bob@example.com"), echo.port
        )
        response = await _status(
            relay, tmp_path, issuer.mint(sub="carol", email="carol@example.com"), echo.port
        )
        assert response.status_code == 429
        assert b"too many tunnels on this relay (limit 3)" in response.body
        # Reconnects of existing tunnels are never capped.
        sid = next(s.sid for s in _sessions(relay) if s.pump is None)
        resumed = await raw_tunnel(
            relay, tmp_path, issuer.mint(), echo.port, path=f"/v4/reconnect?sid={sid}&ack=0"
        )
        assert resumed.state.name == "OPEN"
        denials = [r for r in audit if r["event"] == "handshake" and r["status"] == 429]
        assert [r["principal"] for r in denials] == [
            "user:alice@example.com", "user:alice@example.com", "user:carol@example.com"
        ]  # fmt: skip
        # Closing a tunnel frees its place.
        await bob.close()
        await relay.relay.wait_until(lambda: relay.relay.caps.open == 2)
        await (
            await raw_tunnel(
                relay, tmp_path, issuer.mint(sub="carol", email="carol@example.com"), echo.port
            )
        ).close()
        await resumed.close()
        first.close()
        await relay.relay.wait_until(lambda: relay.relay.caps.open == 0)


async def test_cap_reached_after_the_handshake_closes_with_4105(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """Concurrent connects can all pass the handshake check; the reservation made before the
    dial is exact, and a connect that loses the race gets the typed close 4105."""
    caps = {"max_tunnels_per_principal": 2}
    alice = "user:alice@example.com"
    async with start_relay(relay_config_data(issuer, tmp_path, tunnel=caps)) as relay:
        audit = capture_audit(relay)
        kept = await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)
        counter = relay.relay.caps

        def check_then_lose_the_race(principal: str) -> str | None:
            del counter.refusal  # once: the handshake check passes...
            reason = counter.refusal(principal)
            assert counter.acquire(principal) is None  # ...then a concurrent connect wins
            return reason

        counter.refusal = check_then_lose_the_race  # type: ignore[method-assign]
        ws = await connect(
            relay.url + _query(echo.port),
            additional_headers={"Authorization": f"Bearer {issuer.mint()}"},
            subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
            ssl=client_ssl(tmp_path),
        )
        async with asyncio.timeout(40 * UNIT):
            await ws.wait_closed()
        assert ws.close_code == CloseCode.TOO_MANY_TUNNELS
        assert echo.connections == 1  # no dial for the refused tunnel
        deny = [r for r in audit if r["event"] == "decision" and r["decision"] == "deny"]
        assert deny[0]["reason"] == "too many tunnels for this principal (limit 2)"
        assert (counter.open, counter.count(alice)) == (2, 2)
        counter.release(alice)
        await kept.close()


def test_caps_count_per_principal_and_in_total() -> None:
    caps = TunnelCaps(per_principal=2, total=3)
    assert caps.acquire("a") is None
    assert caps.acquire("a") is None
    assert caps.acquire("a") == "too many tunnels for this principal (limit 2)"
    assert caps.acquire("b") is None
    assert caps.acquire("c") == "too many tunnels on this relay (limit 3)"
    caps.release("a")
    assert (caps.open, caps.count("a")) == (2, 1)
    caps.release("a")
    caps.release("b")
    assert caps.open == 0
    assert caps.count("a") == 0


# -- handshake timeout (slowloris) ---------------------------------------------------------------


@pytest.mark.parametrize("tls", [True, False])
async def test_stalled_handshakes_are_dropped_and_others_served(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, tls: bool
) -> None:
    timeout = 10 * UNIT
    data = relay_config_data(issuer, tmp_path, tls=tls, tunnel={"handshake_timeout": timeout})
    async with start_relay(data) as relay:
        context = client_ssl(tmp_path) if tls else None

        async def stall(half_request: bool) -> float:
            started = time.monotonic()
            if half_request:  # TLS done (if any), half a request line, then nothing
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port, ssl=context)
                writer.write(b"GET /v4/connect?project=p&zo")
                await writer.drain()
            else:  # TCP only: no TLS ClientHello, no request
                reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            try:
                assert await reader.read() == b""  # the relay hangs up
            except (ConnectionResetError, ssl.SSLError):
                pass
            writer.close()
            return time.monotonic() - started

        stalled = [asyncio.ensure_future(stall(n % 2 == 0)) for n in range(20)]
        # While 20 connections stall, the relay serves others: handshake, token, dial, SID.
        await (await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)).close()
        assert not any(task.done() for task in stalled)
        async with asyncio.timeout(timeout + 40 * UNIT):
            durations = await asyncio.gather(*stalled)
        assert all(0.9 * timeout <= d < timeout + 20 * UNIT for d in durations), durations
        await (await raw_tunnel(relay, tmp_path, issuer.mint(), echo.port)).close()


# -- message size, fragmentation, text -----------------------------------------------------------


async def _native(relay: RunningServer, tmp_path: Path, token: str, port: int) -> ClientConnection:
    return await raw_tunnel(relay, tmp_path, token, port, subprotocol=NATIVE_SUBPROTOCOL)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"\x00\x04" + b"x" * 70_000, CloseCode.MESSAGE_TOO_BIG),  # one oversized message
        ([b"\x00\x04" + b"x" * 30_000, b"x" * 30_000, b"x" * 30_000], CloseCode.MESSAGE_TOO_BIG),
        ("a text message", CloseCode.INVALID_WEBSOCKET_OPCODE),
    ],
    ids=["oversized", "fragmented-oversized", "text"],
)
async def test_bad_messages_close_with_the_right_code(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    message: Any,
    code: int,
) -> None:
    audit = capture_audit(relay)
    ws = await _native(relay, tmp_path, issuer.mint(), echo.port)
    async with asyncio.timeout(40 * UNIT):
        try:
            await ws.send(message)
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        await relay.relay.wait_until(lambda: not relay.relay.sessions)
    assert ws.close_code == code
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["close_code"] == code  # ended, not parked


async def test_endless_empty_fragments_close_with_1009(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """Empty continuation frames never reach max_size; websockets caps a message at 4096
    fragments instead, so reassembly stays bounded."""
    audit = capture_audit(relay)
    protocol, reader, writer = await _open_raw(relay, tmp_path, issuer.mint(), echo.port)
    protocol.send_binary(b"\x00\x04", fin=False)
    for _ in range(5000):
        protocol.send_continuation(b"", fin=False)
    writer.write(b"".join(protocol.data_to_send()))
    async with asyncio.timeout(40 * UNIT):
        while data := await reader.read(65536):
            protocol.receive_data(data)
        await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    writer.close()
    assert protocol.close_rcvd is not None
    assert protocol.close_rcvd.code == CloseCode.MESSAGE_TOO_BIG
    assert protocol.close_rcvd.reason == "too many fragments"
    assert audit[-1]["close_code"] == CloseCode.MESSAGE_TOO_BIG  # ended, not parked


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


# -- ping floods ---------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


async def test_a_burst_of_10000_pings_is_answered_and_the_tunnel_still_works(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    record_property: Any,
) -> None:
    tunnel = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
    # A hand-driven client keeps no state per ping: the growth measured is the relay's.
    protocol, reader, writer = await _open_raw(relay, tmp_path, issuer.mint(), echo.port)
    before = rss()
    for batch in range(20):
        for n in range(500):
            protocol.send_ping((batch * 500 + n).to_bytes(4, "big") + b"p" * 121)
        writer.write(b"".join(protocol.data_to_send()))
        await writer.drain()
    pongs = 0
    async with asyncio.timeout(200 * UNIT):
        while pongs < 10_000:
            protocol.receive_data(await reader.read(65536))
            pongs += sum(isinstance(e, Frame) and e.opcode is Opcode.PONG
                         for e in protocol.events_received())  # fmt: skip
    growth = rss() - before
    record_property("rss_growth_bytes", growth)
    assert growth < 4 * 1024 * 1024
    await echo_round_trip(tunnel, b"after the flood")
    writer.close()
    tunnel.close()


async def _open_raw(
    relay: RunningServer, tmp_path: Path, token: str, port: int, rcvbuf: int | None = None
) -> tuple[ClientProtocol, asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket driven by hand (sans-I/O): it reads only what the test asks it to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # a small receive window: the relay's pongs back up sooner
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=client_ssl(tmp_path), server_hostname="127.0.0.1"
    )
    protocol = ClientProtocol(
        parse_uri(relay.url + _query(port)), subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)]
    )
    request = protocol.connect()
    request.headers["Authorization"] = f"Bearer {token}"
    protocol.send_request(request)
    writer.write(b"".join(protocol.data_to_send()))
    while not any(isinstance(e, Response) for e in protocol.events_received()):
        protocol.receive_data(await reader.read(65536))
    assert protocol.handshake_exc is None
    return protocol, reader, writer


async def test_a_ping_flood_that_never_reads_its_pongs_is_throttled(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """websockets queues a pong for every ping without waiting for the peer to read it: past
    REPLY_BACKLOG the relay stops reading from that peer, so its memory stays bounded."""
    audit = capture_audit(relay)
    tunnel = await OpenTunnel(relay, tmp_path, issuer.mint(), echo.port).start(relay)
    protocol, _reader, writer = await _open_raw(
        relay, tmp_path, issuer.mint(), echo.port, rcvbuf=4096
    )
    before = rss()
    sent = 0

    async def flood() -> None:
        nonlocal sent
        payload = b"p" * 125
        while sent < 256 * 1024 * 1024:
            for _ in range(512):
                protocol.send_ping(payload)
            data = b"".join(protocol.data_to_send())
            writer.write(data)
            await writer.drain()  # blocks once the relay stops reading
            sent += len(data)

    flooding = asyncio.ensure_future(flood())
    try:
        async with asyncio.timeout(400 * UNIT):
            await relay.relay.wait_until(lambda: any(r["event"] == "backpressure" for r in audit))
        connection = max(
            relay.server.connections, key=lambda c: c.transport.get_write_buffer_size()
        )
        assert not connection.transport.is_reading()
        # The flooding client can only fill the TCP buffers, then it blocks.
        await echo_round_trip(tunnel, b"others are served")
        buffered = connection.transport.get_write_buffer_size()
        growth = rss() - before
        record_property("pong_backlog_bytes", buffered)
        record_property("ping_bytes_sent", sent)
        record_property("rss_growth_bytes", growth)
        assert buffered <= REPLY_BACKLOG + 512 * 1024
        assert growth < 16 * 1024 * 1024
        assert not flooding.done()
    finally:
        flooding.cancel()
        writer.transport.abort()
    tunnel.close()
