"""PROXY protocol both ways on the relay: inbound (``proxy_protocol: true`` on the relay listener:
a trusted balancer's header sets the client address that policy and audit see; a header from
anyone else is refused) and outbound (a destination with ``proxy_protocol`` gets a v2 header with
the tunnel id and an identity assertion signed with HTTP mode's keys)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from tunnel_protocol import IAP_SUBPROTOCOL, NATIVE_SUBPROTOCOL
from tunnel_protocol.proxyheader import (
    TLV_ASSERTION,
    TLV_TUNNEL_ID,
    encode_v2,
)
from tunnel_server.config import ConfigError, parse_config
from tunnel_upstream import IdentityCheck, ProxyHeaderError, ReplayCache, read_proxy_header

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..proxied import ProxiedTarget
from ..rawclient import RawTunnelClient

BALANCER = "127.0.0.1"  # the trusted peer (HAProxy's address in production)
STRANGER = "127.0.0.2"  # any other peer
CLIENT = ("198.51.100.7", 40000)  # the client behind the balancer


def _query(port: int) -> str:
    return f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={port}&newWebsocket=True"


def _tls_context(data: dict[str, Any]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=data["tls"]["cert_file"])


@asynccontextmanager
async def inbound_relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    data = relay_config_data(issuer, tmp_path)  # TLS: the header comes before the handshake
    data["proxy_protocol"] = True
    data["trusted_proxies"] = [f"{BALANCER}/32"]
    data["tunnel"]["handshake_timeout"] = 40 * UNIT
    async with start_relay(data) as relay:
        yield relay, data


async def _open(
    relay: Any, data: dict[str, Any], issuer: TestIssuer, port: int, **kw: Any
) -> RawTunnelClient:
    client = RawTunnelClient(
        relay.url, _query(port), issuer.mint(), NATIVE_SUBPROTOCOL,
        ssl_context=_tls_context(data), **kw,
    )  # fmt: skip
    async with asyncio.timeout(100 * UNIT):
        await client.open()
    return client


async def _closed_unanswered(stream: asyncio.StreamReader) -> None:
    """The relay closes without a byte of answer (a reset: the header was left unread)."""
    async with asyncio.timeout(100 * UNIT):  # the handshake timeout is 40 units
        try:
            assert await stream.read() == b""
        except ConnectionResetError:
            pass


def _decisions(audit: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in audit if r["event"] == "decision"]


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_trusted_balancer_header_sets_the_client_address(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path, version: str
) -> None:
    async with inbound_relay(issuer, tmp_path) as (relay, data):
        audit = capture_audit(relay)
        if version == "v2":
            header = encode_v2(CLIENT, ("127.0.0.1", relay.port))
        else:
            header = f"PROXY TCP4 {CLIENT[0]} 127.0.0.1 {CLIENT[1]} {relay.port}\r\n".encode()
        client = await _open(relay, data, issuer, echo.port, local_address=BALANCER,
                             preamble=header)  # fmt: skip
        await client.close()
        assert [r["source_ip"] for r in _decisions(audit)] == [CLIENT[0]]


async def test_header_from_an_untrusted_peer_is_refused(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    async with inbound_relay(issuer, tmp_path) as (relay, data):
        audit = capture_audit(relay)
        reader_, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, local_addr=(STRANGER, 0)
        )
        writer.write(encode_v2(CLIENT, ("127.0.0.1", relay.port)))
        await _closed_unanswered(reader_)
        writer.close()
        assert [(r["event"], r["decision"], r["source_ip"]) for r in audit] == [
            ("proxy_header", "deny", STRANGER)
        ]
        assert "trusted_proxies" in audit[0]["reason"]
        # The same peer without a header is an ordinary client with its own address.
        client = await _open(relay, data, issuer, echo.port, local_address=STRANGER)
        await client.close()
        assert [r["source_ip"] for r in _decisions(audit)] == [STRANGER]


async def test_trusted_peer_without_header_or_with_local_keeps_its_address(
    issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """A health check (v2 LOCAL) or a client inside the trusted range sending no header."""
    local = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x20\x00\x00\x00"
    async with inbound_relay(issuer, tmp_path) as (relay, data):
        audit = capture_audit(relay)
        for preamble in (b"", local):
            client = await _open(relay, data, issuer, echo.port, local_address=BALANCER,
                                 preamble=preamble)  # fmt: skip
            await client.close()
        assert [r["source_ip"] for r in _decisions(audit)] == [BALANCER, BALANCER]


def test_listener_on_uvloop(tmp_path: Path) -> None:
    """The production loop: accept, peek, exact header read and TLS hand-over on uvloop."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with TestIssuer() as issuer, inbound_relay(issuer, tmp_path) as (relay, data):
            echo = await TcpTarget("echo").start()
            try:
                audit = capture_audit(relay)
                header = encode_v2(CLIENT, ("127.0.0.1", relay.port))
                client = await _open(relay, data, issuer, echo.port, local_address=BALANCER,
                                     preamble=header)  # fmt: skip
                await client.close()
                reader_, writer = await asyncio.open_connection(
                    "127.0.0.1", relay.port, local_addr=(STRANGER, 0)
                )
                writer.write(header)
                await _closed_unanswered(reader_)
                writer.close()
            finally:
                await echo.stop()
        assert [(r["event"], r["source_ip"]) for r in audit if r["event"] != "tunnel_closed"] == [
            ("decision", CLIENT[0]), ("proxy_header", STRANGER)
        ]  # fmt: skip

    uvloop.run(scenario())


@pytest.mark.parametrize(
    "preamble",
    [b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n", b"PROXY TCP4 198.51.100.7"],
    ids=["malformed", "never-finished"],
)
async def test_bad_header_from_the_balancer_is_refused(
    issuer: TestIssuer, tmp_path: Path, preamble: bytes
) -> None:
    async with inbound_relay(issuer, tmp_path) as (relay, _):
        audit = capture_audit(relay)
        reader_, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, local_addr=(BALANCER, 0)
        )
        writer.write(preamble)
        await _closed_unanswered(reader_)
        writer.close()
        assert [(r["event"], r["source_ip"]) for r in audit] == [("proxy_header", BALANCER)]


def test_proxy_protocol_needs_trusted_proxies(issuer_url: str, tmp_path: Path) -> None:
    data: dict[str, Any] = {
        "oidc": {"issuer": issuer_url, "audiences": ["tunnel"]},
        "proxy_protocol": True,
    }
    with pytest.raises(ConfigError, match="proxy_protocol needs trusted_proxies"):
        parse_config(data)
    data["proxy_protocol"] = False
    db = {"project": "p", "zone": "z", "name": "db", "address": "10.0.0.5"}
    data["inventory"] = {"instances": [{**db, "proxy_protocol": "v2"}]}
    with pytest.raises(ConfigError, match="add an http section"):
        parse_config(data)


@pytest.fixture
def issuer_url() -> str:
    return "https://issuer.example"


# -- outbound --------------------------------------------------------------------------------------


def _outbound_config(issuer: TestIssuer, tmp_path: Path, proxy: Any) -> dict[str, Any]:
    data = relay_config_data(issuer, tmp_path, tls=False)
    data["inventory"]["instances"][0]["proxy_protocol"] = proxy
    data["http"] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "issuer_url": "http://relay.example",
        "external_scheme": "http",
        "routes": [{"name": "app", "host": "app.localhost", "upstream": "http://127.0.0.1:9"}],
    }
    return data


async def _jwks(port: int | None) -> dict[str, Any]:
    assert port is not None
    url = f"http://127.0.0.1:{port}/.well-known/tunnel/jwks.json"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        result: dict[str, Any] = await response.json()
        return result


def _verify(token: str, jwks: dict[str, Any], audience: str) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks["keys"] if k["kid"] == kid)
    public = jwt.PyJWK.from_json(json.dumps(key))
    claims: dict[str, Any] = jwt.decode(
        token, public, algorithms=["ES256"], audience=audience, issuer="http://relay.example"
    )
    return claims


@pytest.mark.parametrize("subprotocol", [NATIVE_SUBPROTOCOL, IAP_SUBPROTOCOL])
async def test_destination_gets_a_signed_identity_header(
    issuer: TestIssuer, tmp_path: Path, subprotocol: str
) -> None:
    target = await ProxiedTarget().start()
    port = target.port
    data = _outbound_config(issuer, tmp_path, {"audience": "tcp:vm1"})
    try:
        async with start_relay(data) as relay:
            audit = capture_audit(relay)
            client = RawTunnelClient(relay.url, _query(port), issuer.mint(), subprotocol)
            payload = b"hello through the relay" * 1000
            async with asyncio.timeout(100 * UNIT):
                await client.open()
                await client.burst(payload)
                header, digest = await target.done.get()
            assert digest == hashlib.sha256(payload).hexdigest()  # not a byte more or less
            await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
            jwks = await _jwks(relay.http_port)
    finally:
        await target.stop()
    [closed] = [r for r in audit if r["event"] == "tunnel_closed"]
    tunnel_id = closed["tunnel_id"]
    assert header.source == ("127.0.0.1", 0)  # the client's address as the relay decided it
    assert header.destination == ("127.0.0.1", port)
    assert header.tlvs[TLV_TUNNEL_ID] == tunnel_id.encode()
    claims = _verify(header.tlvs[TLV_ASSERTION].decode(), jwks, "tcp:vm1")
    assert claims["email"] == "alice@example.com"
    assert (claims["instance"], claims["port"], claims["tunnel_id"]) == ("p/z/vm1", port, tunnel_id)
    assert claims["exp"] - claims["iat"] <= 600
    # The header is the relay's, not the tunnel's: the audit counts the client's bytes only.
    assert closed["bytes_from_client"] == len(payload)


async def test_only_the_configured_ports_get_a_header(issuer: TestIssuer, tmp_path: Path) -> None:
    sink = await TcpTarget("sink").start()
    data = _outbound_config(issuer, tmp_path, {"ports": [sink.port + 1]})
    try:
        async with start_relay(data) as relay:
            client = RawTunnelClient(
                relay.url, _query(sink.port), issuer.mint(), NATIVE_SUBPROTOCOL
            )
            async with asyncio.timeout(100 * UNIT):
                await client.open()
                await client.burst(b"plain")
                got = await sink.completed.get()
    finally:
        await sink.stop()
    assert got == (5, hashlib.sha256(b"plain").hexdigest())  # no header went out


async def test_without_identity_the_header_carries_the_tunnel_id_only(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    """``identity: false`` (readers with small header buffers, such as nginx 1.22's 107 bytes):
    no assertion, no http section needed."""
    target = await ProxiedTarget().start()
    data = relay_config_data(issuer, tmp_path, tls=False)
    data["inventory"]["instances"][0]["proxy_protocol"] = {"identity": False}
    try:
        async with start_relay(data) as relay:
            client = RawTunnelClient(
                relay.url, _query(target.port), issuer.mint(), NATIVE_SUBPROTOCOL
            )
            async with asyncio.timeout(100 * UNIT):
                await client.open()
                await client.burst(b"x")
                header, _ = await target.done.get()
    finally:
        await target.stop()
    assert set(header.tlvs) == {TLV_TUNNEL_ID}
    assert header.source == ("127.0.0.1", 0)
    assert len(encode_v2(header.source, header.destination, header.tlvs)) <= 107


async def test_default_audience_is_the_policy_resource(issuer: TestIssuer, tmp_path: Path) -> None:
    target = await ProxiedTarget().start()
    port = target.port
    data = _outbound_config(issuer, tmp_path, "v2")
    try:
        async with start_relay(data) as relay:
            client = RawTunnelClient(relay.url, _query(port), issuer.mint(), NATIVE_SUBPROTOCOL)
            async with asyncio.timeout(100 * UNIT):
                await client.open()
                await client.burst(b"x")
            jwks = await _jwks(relay.http_port)
    finally:
        await target.stop()
    claims = _verify(target.headers[0].tlvs[TLV_ASSERTION].decode(), jwks, "instance:p/z/vm1")
    assert claims["sub"] == "alice"


async def test_tunnel_upstream_verifies_the_relays_header(
    issuer: TestIssuer, tmp_path: Path
) -> None:
    """The consumer the docs give upstreams: ``tunnel_upstream.read_proxy_header`` with the
    relay's JWKS URL accepts the relay's header and reads the caller from it."""
    verified: asyncio.Queue[Any] = asyncio.Queue()
    check: dict[str, IdentityCheck] = {}

    async def handle(stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            verified.put_nowait(await read_proxy_header(stream, check["it"]))
        except ProxyHeaderError as exc:
            verified.put_nowait(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    data = _outbound_config(issuer, tmp_path, {"audience": "tcp:vm1"})
    try:
        async with start_relay(data) as relay:
            jwks_url = f"http://127.0.0.1:{relay.http_port}/.well-known/tunnel/jwks.json"
            check["it"] = IdentityCheck("tcp:vm1", "http://relay.example", jwks_url=jwks_url,
                                        replays=ReplayCache())  # fmt: skip
            client = RawTunnelClient(relay.url, _query(port), issuer.mint(), NATIVE_SUBPROTOCOL)
            async with asyncio.timeout(100 * UNIT):
                await client.open()
                info = await verified.get()
            await client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert not isinstance(info, Exception), info
    assert info.identity["email"] == "alice@example.com"
    assert info.identity["tunnel_id"] == info.tunnel_id
