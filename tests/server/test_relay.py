"""Relay integration on port 0: real TLS, real token verification against a loopback issuer,
the native client, and TCP targets that count connections."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tunnel_client.listener import LocalListener
from tunnel_client.session import ConnectOptions, TunnelFailed, check_connection
from tunnel_protocol import IAP_SUBPROTOCOL, NATIVE_SUBPROTOCOL, CloseCode
from tunnel_protocol.urls import InstanceTarget
from tunnel_server.app import RunningServer

from ..helpers import (
    UNIT,
    FaultProxy,
    TcpTarget,
    capture_audit,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer

DROPS = 8


def client_ssl(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tmp_path / "relay-cert.pem"))


def options(
    server: RunningServer,
    tmp_path: Path,
    token: str,
    port: int,
    *,
    url: str | None = None,
    instance: str = "vm1",
    **kw: Any,
) -> ConnectOptions:
    async def provide() -> str:
        return token

    return ConnectOptions(
        server=url or server.url,
        target=InstanceTarget("p", "z", instance, "nic0", port),
        token=provide,
        ssl_context=client_ssl(tmp_path),
        open_timeout=100 * UNIT,
        backoff_initial=UNIT / 5,
        backoff_cap=UNIT * 4,
        **kw,
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
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


async def test_echo_through_native_tunnel(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    async with listening(options(relay, tmp_path, issuer.mint(), echo.port)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"hello through the relay")
        await writer.drain()
        assert await reader.readexactly(23) == b"hello through the relay"
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
    await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    decision = next(r for r in audit if r["event"] == "decision")
    assert decision["decision"] == "allow"
    assert decision["principal"] == "user:alice@example.com"
    assert decision["resource"] == "instance:p/z/vm1"
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["bytes_from_client"] == 23
    assert closed["bytes_to_client"] == 23
    assert closed["close_code"] == 1000


async def test_half_close_each_direction(
    relay: RunningServer, issuer: TestIssuer, sink: TcpTarget, tmp_path: Path
) -> None:
    """The client half-closes; the target still answers afterwards (native EOF)."""
    payload = b"x" * 300_000
    async with listening(options(relay, tmp_path, issuer.mint(), sink.port)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(payload)
        writer.write_eof()
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()


async def test_bulk_both_directions_with_resume(
    relay: RunningServer, issuer: TestIssuer, sink: TcpTarget, tmp_path: Path
) -> None:
    """Drop the WebSocket (via a TCP proxy) several times mid-transfer: no byte lost."""
    proxy = await FaultProxy(relay.port).start()
    total = 24 * 1024 * 1024
    url = f"wss://127.0.0.1:{proxy.port}"
    opts = options(relay, tmp_path, issuer.mint(), sink.port, url=url, buffer_limit=2 * 1024 * 1024)
    try:
        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            sent = 0
            drops = 0
            for chunk in deterministic_chunks(total):
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if sent % (2 * 1024 * 1024) == 0 and drops < DROPS:
                    drops += proxy.drop_all()
            writer.write_eof()
            answer = await reader.read()
            writer.close()
    finally:
        await proxy.stop()
    assert answer.decode() == deterministic_digest(total)
    assert drops >= 3
    assert proxy.connections == drops + 1


async def test_download_with_resume(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    total = 16 * 1024 * 1024
    source = await TcpTarget("source", source_bytes=total).start()
    proxy = await FaultProxy(relay.port).start()
    opts = options(relay, tmp_path, issuer.mint(), source.port, url=f"wss://127.0.0.1:{proxy.port}")
    try:
        async with listening(opts) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            digest = hashlib.sha256()
            got = 0
            next_drop = 3 * 1024 * 1024
            while data := await reader.read(65536):
                digest.update(data)
                got += len(data)
                if got >= next_drop:
                    proxy.drop_all()
                    next_drop += 3 * 1024 * 1024
            writer.close()
    finally:
        await proxy.stop()
        await source.stop()
    assert got == total
    assert digest.hexdigest() == deterministic_digest(total)
    assert proxy.connections >= 4


@pytest.mark.parametrize(
    ("case", "expected_reason"),
    [
        ("expired", "expired"),
        ("wrong_audience", "bad audience"),
        ("wrong_issuer", "bad issuer"),
        ("alg_none", "algorithm not allowed"),
        ("garbage", "malformed"),
        ("missing", "missing credentials"),
    ],
)
async def test_bad_tokens_refused_at_handshake(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    case: str,
    expected_reason: str,
) -> None:
    import base64
    import json

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    tokens = {
        "expired": issuer.mint(lifetime=-600),
        "wrong_audience": issuer.mint(aud="someone-else"),
        "wrong_issuer": issuer.mint(extra_claims={"iss": "https://evil.example"}),
        "alg_none": b64({"alg": "none", "typ": "JWT"}) + "." + b64(issuer.claims()) + ".",
        "garbage": "not-a-jwt",
        "missing": "",
    }
    audit = capture_audit(relay)
    headers = {"Authorization": f"Bearer {tokens[case]}"} if tokens[case] else {}
    url = f"{relay.url}/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    with pytest.raises(InvalidStatus) as info:
        await connect(
            url,
            additional_headers=headers,
            subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
            ssl=client_ssl(tmp_path),
        )
    assert info.value.response.status_code == 401
    assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    assert echo.connections == 0
    assert audit[-1]["reason"] == expected_reason
    assert tokens[case] == "" or tokens[case] not in json.dumps(audit)


async def _close_code(
    relay: RunningServer,
    tmp_path: Path,
    token: str,
    query: str,
    subprotocol: str = NATIVE_SUBPROTOCOL,
) -> int:
    async with connect(
        f"{relay.url}{query}",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(subprotocol)],
        ssl=client_ssl(tmp_path),
    ) as ws:
        await ws.wait_closed()
    assert ws.close_code is not None
    return ws.close_code


async def test_not_authorized_is_4033_and_target_untouched(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    token = issuer.mint(sub="mallory", email="mallory@example.com")
    query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    for subprotocol in (NATIVE_SUBPROTOCOL, IAP_SUBPROTOCOL):
        assert await _close_code(relay, tmp_path, token, query, subprotocol) == 4033
    assert echo.connections == 0
    assert audit[-1]["decision"] == "deny"
    assert audit[-1]["principal"] == "user:mallory@example.com"


async def test_unknown_instance_is_4047(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    data = relay_config_data(issuer, tmp_path)
    data["access"][0]["instances"] = ["*"]
    async with start_relay(data) as relay:
        query = f"/v4/connect?project=p&zone=z&instance=nope&interface=nic0&port={echo.port}"
        assert await _close_code(relay, tmp_path, issuer.mint(), query) == 4047
        query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic7&port={echo.port}"
        assert await _close_code(relay, tmp_path, issuer.mint(), query) == 4047


async def test_unreachable_backend_is_4003(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    closed = await TcpTarget().start()
    port = closed.port
    await closed.stop()  # nothing listens there any more
    opts = options(relay, tmp_path, issuer.mint(), port)
    with pytest.raises(TunnelFailed) as info:
        await check_connection(opts)
    assert info.value.code == CloseCode.FAILED_TO_CONNECT_TO_BACKEND
    assert "4003" in str(info.value)


async def test_resume_needs_same_principal(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = issuer.mint()
    query = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={echo.port}"
    async with connect(
        f"{relay.url}{query}",
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(NATIVE_SUBPROTOCOL)],
        ssl=client_ssl(tmp_path),
    ) as ws:
        first = await ws.recv()
        assert isinstance(first, bytes)
        sid = first[6:].decode()
        ws.transport.abort()  # a drop: the relay parks the tunnel
    await relay.relay.wait_until(lambda: all(s.pump is None for s in relay.relay.sessions.values()))
    other = issuer.mint(sub="bob", email="bob@example.com")
    assert await _close_code(relay, tmp_path, other, f"/v4/reconnect?sid={sid}&ack=0") == 4001
    assert sid in relay.relay.sessions  # the owner can still resume


async def test_health_endpoints(relay: RunningServer, tmp_path: Path) -> None:
    import urllib.request

    context = client_ssl(tmp_path)

    def get(path: str) -> int:
        with urllib.request.urlopen(f"https://127.0.0.1:{relay.port}{path}", context=context) as r:
            return int(r.status)

    assert await asyncio.to_thread(get, "/healthz") == 200
    assert await asyncio.to_thread(get, "/readyz") == 200


def test_relay_and_client_on_uvloop(tmp_path: Path) -> None:
    """The same echo through relay and client with both on uvloop (the default when installed):
    uvloop's transports are not asyncio.Transport subclasses, which once broke TcpStream."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> bytes:
        async with asyncio.timeout(200 * UNIT), TestIssuer() as issuer:
            echo = await TcpTarget("echo").start()
            try:
                async with start_relay(relay_config_data(issuer, tmp_path)) as relay:
                    opts = options(relay, tmp_path, issuer.mint(), echo.port)
                    async with listening(opts) as listener:
                        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                        writer.write(b"on uvloop")
                        writer.write_eof()
                        data = await reader.read()
                        writer.close()
                        return data
            finally:
                await echo.stop()

    assert uvloop.run(scenario()) == b"on uvloop"
