"""PROXY protocol headers built for the tests, written from HAProxy's specification
independently of ``tunnel_upstream.proxyproto`` (so that a shared misreading would show), and
the relay's identity TLVs signed by the project's ``AssertionSigner``."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from tunnel_server.web.assertion import AssertionSigner

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
AUDIENCE = "tcp:db-1:5432"


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(
    source: tuple[str, int] | None = ("203.0.113.7", 50123),
    destination: tuple[str, int] = ("10.0.0.5", 5432),
    tlvs: bytes = b"",
    *,
    local: bool = False,
) -> bytes:
    """A PROXY v2 header (PROXY command, TCP over the source's family; LOCAL when asked)."""
    if local or source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body = addresses + tlvs
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def identity_tlvs(
    signer: AssertionSigner,
    tunnel_id: str = "t-5f2c9a",
    *,
    audience: str = AUDIENCE,
    claimed_tunnel: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """0xE0 = the tunnel id, 0xE1 = the assertion, as the relay sends them."""
    assertion = signer.sign(
        audience=audience, subject="alice", email="alice@example.com", groups=["ops"],
        access_levels=["corp"], principal="user:alice@example.com",
        extra={"instance": "db-1", "port": 5432,
               "tunnel_id": tunnel_id if claimed_tunnel is None else claimed_tunnel,
               **(extra or {})},
    )  # fmt: skip
    return tlv(0xE0, tunnel_id.encode()) + tlv(0xE1, assertion.encode())
