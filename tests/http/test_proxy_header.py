"""``tunnel_upstream``'s PROXY protocol reader: v1 and v2 vectors, a fuzzer, and an asyncio
server that uses ``read_proxy_header`` to verify the relay's identity TLVs, refusing forged,
expired, replayed, other-audience and other-tunnel assertions; the blocking-socket reader."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from tunnel_protocol.proxyheader import crc32c
from tunnel_server.web.assertion import AssertionSigner
from tunnel_upstream import (
    IdentityCheck,
    IdentityRefused,
    ProxyHeaderError,
    ProxyInfo,
    ReplayCache,
    parse_proxy_header,
    read_proxy_header,
    read_proxy_header_from_socket,
)

from ..helpers import UNIT
from .proxyv2 import AUDIENCE, SIGNATURE, identity_tlvs, tlv, v2

ISSUER = "https://relay.example.com:8445"


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "transport", "source", "destination"),
    [
        (b"PROXY TCP4 203.0.113.7 10.0.0.5 50123 5432\r\n", "tcp4", ("203.0.113.7", 50123),
         ("10.0.0.5", 5432)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::5 1 65535\r\n", "tcp6", ("2001:db8::7", 1),
         ("2001:db8::5", 65535)),
        (b"PROXY UNKNOWN\r\n", "unknown", None, None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", "unknown", None, None),
        (v2(), "tcp4", ("203.0.113.7", 50123), ("10.0.0.5", 5432)),
        (v2(("2001:db8::7", 7), ("::1", 22)), "tcp6", ("2001:db8::7", 7), ("::1", 22)),
        (v2(local=True), "unknown", None, None),
    ],
)  # fmt: skip
def test_headers_parsed(header: bytes, transport: str, source: Any, destination: Any) -> None:
    parsed = parse_proxy_header(header + b"app data")
    assert parsed is not None
    info, length = parsed
    assert length == len(header)
    assert (info.transport, info.source, info.destination) == (transport, source, destination)
    assert info.version == (2 if header.startswith(SIGNATURE) else 1)
    for cut in range(len(header)):  # a partial header asks for more, never fails or guesses
        assert parse_proxy_header(header[:cut]) is None


def test_v2_unix_tlvs_and_crc() -> None:
    unix = SIGNATURE + bytes([0x21, 0x31]) + (216 + 6).to_bytes(2, "big")
    body = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0") + tlv(0x04, b"xyz")
    parsed = parse_proxy_header(unix + body)
    assert parsed is not None
    assert (parsed[0].transport, parsed[0].source, parsed[0].tlvs) == ("unix", None, {4: b"xyz"})
    # CRC32C over the whole header with the checksum zeroed (RFC 3720 test vector first).
    assert crc32c(b"123456789") == 0xE3069283
    blank = v2(tlvs=tlv(0x05, b"id-1") + tlv(0x03, b"\0\0\0\0"))
    good = blank[:-4] + crc32c(blank).to_bytes(4, "big")
    parsed = parse_proxy_header(good)
    assert parsed is not None
    assert parsed[0].tlvs[0x05] == b"id-1"
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse_proxy_header(good[:-1] + bytes([good[-1] ^ 1]))


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n",
        b"PROXY TCP4 203.0.113.7 10.0.0.5 50123\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", b"PROXY TCP4 " + b"1" * 100 + b"\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n",
        SIGNATURE + bytes([0x22, 0x11, 0, 12]) + bytes(12),  # version 2, command 2
        SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12),  # version 1 in binary
        SIGNATURE + bytes([0x21, 0x41, 0, 12]) + bytes(12),  # family 4
        SIGNATURE + bytes([0x21, 0x11, 0, 8]) + bytes(8),  # addresses truncated
        v2(tlvs=b"\xe0\x00"),  # TLV truncated
        v2(tlvs=tlv(0xE0, b"x")[:-1] + b""),
        v2(tlvs=tlv(0xE0, b"a") + tlv(0xE0, b"b")),  # repeated: ambiguous
        v2(tlvs=tlv(0x03, b"\0\0\0")),  # CRC of the wrong size
        SIGNATURE[:8] + b"QUIT\r\n\r\n" + bytes(8),  # signature broken after 8 bytes
    ],
)  # fmt: skip
def test_malformed_headers_refused(header: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(header + bytes(300))


@given(st.binary(max_size=300), st.sampled_from([b"", SIGNATURE, b"PROXY ", v2()[:16]]))
def test_parser_fuzz(data: bytes, prefix: bytes) -> None:
    try:
        parsed = parse_proxy_header(prefix + data)
    except ProxyHeaderError:
        return
    if parsed is not None:
        assert 0 < parsed[1] <= len(prefix + data)


# -- an asyncio server that verifies the relay's identity ----------------------------------------


@asynccontextmanager
async def target(check: IdentityCheck) -> AsyncIterator[tuple[int, list[Any]]]:
    """A TCP service that reads the PROXY header (identity required), then 5 bytes of
    application data, and greets the verified caller. ``seen``: ProxyInfo and the app bytes,
    or the refusal."""
    seen: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            info = await read_proxy_header(reader, check, header_timeout=100 * UNIT)
        except ProxyHeaderError as exc:
            seen.append(exc)
        else:
            assert info.identity is not None
            seen.append((info, await reader.readexactly(5)))
            writer.write(f"hello {info.identity['email']}".encode())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def call(port: int, header: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header + b"hello")
        return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


def _tampered(tlvs: bytes) -> bytes:
    """The identity TLVs with the assertion's email changed and its signature kept."""
    assertion = tlvs.split(b"\xe1", 1)[1][2:].decode()
    head, payload, signature = assertion.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["email"] = "mallory@example.com"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    token = f"{head}.{forged}.{signature}".encode()
    return tlvs.split(b"\xe1", 1)[0] + tlv(0xE1, token)


async def test_identity_verified_and_forgeries_refused() -> None:
    signer = AssertionSigner(ISSUER, lifetime=300)
    check = IdentityCheck(AUDIENCE, ISSUER, jwks=signer.jwks(), replays=ReplayCache())
    stale = AssertionSigner(ISSUER, lifetime=300, clock=lambda: time.time() - 1000)
    other_key = AssertionSigner(ISSUER)
    refused = {
        "no identity TLVs": v2(),
        "v1 has no TLVs": b"PROXY TCP4 203.0.113.7 10.0.0.5 50123 5432\r\n",
        "LOCAL": v2(local=True, tlvs=identity_tlvs(signer, "t-local")),
        "assertion alone": v2(tlvs=tlv(0xE1, b"x.y.z")),
        "wrong audience": v2(tlvs=identity_tlvs(signer, "t-aud", audience="tcp:other:22")),
        "expired": v2(tlvs=identity_tlvs(stale, "t-old")),
        "bad signature": v2(tlvs=_tampered(identity_tlvs(signer, "t-forged"))),
        "unknown key": v2(tlvs=identity_tlvs(other_key, "t-key")),
        "other tunnel": v2(tlvs=identity_tlvs(signer, "t-1", claimed_tunnel="t-2")),
        "not a JWT": v2(tlvs=tlv(0xE0, b"t-j") + tlv(0xE1, b"\xff\xfe")),
    }  # fmt: skip
    good = v2(tlvs=identity_tlvs(signer, "t-good"))
    async with target(check) as (port, seen):
        assert await call(port, good) == b"hello alice@example.com"
        for name, header in refused.items():
            assert await call(port, header) == b"", name
        assert await call(port, good) == b"", "replayed"
    info, data = seen[0]
    assert isinstance(info, ProxyInfo)
    assert data == b"hello"  # not a byte of the application's data was taken
    assert (info.source, info.destination, info.tunnel_id) == (
        ("203.0.113.7", 50123), ("10.0.0.5", 5432), "t-good"
    )  # fmt: skip
    claims = info.identity
    assert claims is not None
    assert (claims["sub"], claims["groups"], claims["access_levels"]) == (
        "alice",
        ["ops"],
        ["corp"],
    )
    assert (claims["instance"], claims["port"], claims["aud"]) == ("db-1", 5432, AUDIENCE)
    refusals = seen[1:]
    assert len(refusals) == len(refused) + 1
    assert all(isinstance(r, IdentityRefused) for r in refusals), refusals
    assert "replayed" in str(refusals[-1])


async def test_identity_with_jwks_url_and_timeouts() -> None:
    """The JWKS fetched from the relay's URL (in a thread); a silent or truncated client is
    refused within the header timeout."""
    signer = AssertionSigner(ISSUER)
    app = web.Application()

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(signer.jwks())

    app.router.add_get("/.well-known/tunnel/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/.well-known/tunnel/jwks.json"
    check = IdentityCheck(AUDIENCE, ISSUER, jwks_url=url, replays=ReplayCache())
    try:
        async with target(check) as (port, seen):
            assert await call(port, v2(tlvs=identity_tlvs(signer))) == b"hello alice@example.com"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(v2()[:20])  # and then nothing
            assert await asyncio.wait_for(reader.read(), 400 * UNIT) == b""
            writer.close()
            await writer.wait_closed()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PROXY TCP4 1.2.3.4")
            writer.write_eof()  # closed inside the header
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
    finally:
        await runner.cleanup()
    assert "timed out" in str(seen[1])
    assert "closed inside" in str(seen[2])


def test_blocking_socket_reads_exactly_the_header() -> None:
    signer = AssertionSigner(ISSUER)
    check = IdentityCheck(AUDIENCE, ISSUER, jwks=signer.jwks(), replays=ReplayCache())
    left, right = socket.socketpair()
    with left, right:
        right.settimeout(7.0)
        left.sendall(v2(tlvs=identity_tlvs(signer)) + b"app bytes")
        info = read_proxy_header_from_socket(right, check)
        assert right.gettimeout() == 7.0  # restored
        assert right.recv(100) == b"app bytes"
        assert info.identity is not None
        assert info.identity["email"] == "alice@example.com"
        left.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.5 50123 5432\r\nrest")
        plain = read_proxy_header_from_socket(right)
        assert (plain.source, plain.identity, right.recv(4)) == (("203.0.113.7", 50123), None,
                                                                  b"rest")  # fmt: skip
        left.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.5 50123 5432\r\n")
        with pytest.raises(IdentityRefused):
            read_proxy_header_from_socket(right, check)
        left.sendall(b"PROX")
        with pytest.raises(ProxyHeaderError, match="timed out"):
            read_proxy_header_from_socket(right, header_timeout=10 * UNIT)
