"""PROXY protocol headers (HAProxy's v1 text line and v2 binary block), without I/O: a parser
that asks for exactly the bytes it needs (so a reader never takes a byte of the data behind the
header), and the v2 encoder the relay uses towards ``proxy_protocol`` destinations.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt. The relay's own TLVs (the
tunnel id and the signed identity) are laid out in docs/upstream-identity.md."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_TUNNEL_ID = 0xE0  # PP2_TYPE_MIN_CUSTOM: the relay's tunnel id, ASCII
TLV_ASSERTION = 0xE1  # the relay's identity assertion: a compact ES256 JWS, ASCII
# The longest v2 header this parser accepts (the spec's limit is 16 + 65535): a relay's header
# with a signed assertion is well under 2 KiB; a balancer's with TLVs under 1 KiB.
V2_MAX_BODY = 8192

_V2_ADDRESSES = {0x11: ("tcp4", 12), 0x12: ("udp4", 12), 0x21: ("tcp6", 36), 0x22: ("udp6", 36),
                 0x31: ("unix", 216), 0x32: ("unix-dgram", 216)}  # fmt: skip

Address = tuple[str, int]


class ProxyHeaderError(Exception):
    """Not a valid PROXY protocol header: the connection must be closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """``source``: the client's (address, port) as the sender saw it; ``destination``: the
    address it connected to; both None for v2 ``LOCAL`` (a balancer's own health check) and v1
    ``UNKNOWN``. ``tlvs``: type -> value (v2)."""

    version: int
    local: bool
    transport: str  # "tcp4", "tcp6", "udp4", "udp6", "unix", "unix-dgram" or "unknown"
    source: Address | None
    destination: Address | None
    tlvs: Mapping[int, bytes] = field(default_factory=dict)


# -- parsing ---------------------------------------------------------------------------------------


def looks_like_header(start: bytes) -> bool | None:
    """Whether ``start`` (the first bytes of a connection) begins a PROXY header: True, False,
    or None while too few bytes have arrived to tell."""
    for signature in (V2_SIGNATURE, V1_PREFIX):
        common = min(len(start), len(signature))
        if start[:common] == signature[:common]:
            if common == len(signature):
                return True
            return None if common == len(start) else False
    return False


def reader() -> Generator[int, bytes, ProxyHeader]:
    """Yields how many more bytes it needs, is sent exactly that many, returns the header.
    Raises ProxyHeaderError."""
    first = yield 8
    if first == V2_SIGNATURE[:8]:
        fixed = first + (yield 8)
        if fixed[:12] != V2_SIGNATURE:
            raise ProxyHeaderError("bad PROXY v2 signature")
        (length,) = struct.unpack("!H", fixed[14:16])
        if length > V2_MAX_BODY:
            raise ProxyHeaderError("PROXY v2 header too long")
        body = (yield length) if length else b""
        return _parse_v2(fixed, body)
    if first.startswith(V1_PREFIX):
        line = first
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 line too long")
            line += yield 1
        return _parse_v1(line)
    raise ProxyHeaderError("not a PROXY protocol header")


def parse(buffer: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``buffer`` and its length, or None when more bytes are
    needed. Raises ProxyHeaderError."""
    steps = reader()
    offset = 0
    try:
        need = next(steps)
        while True:
            if offset + need > len(buffer):
                return None
            chunk = buffer[offset : offset + need]
            offset += need
            need = steps.send(chunk)
    except StopIteration as done:
        return done.value, offset


def _parse_v1(line: bytes) -> ProxyHeader:
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, False, "unknown", None, None)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if parts[1] == "TCP4" else 6
    addresses = []
    for host, port in ((parts[2], parts[4]), (parts[3], parts[5])):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ProxyHeaderError("bad address in PROXY v1 line") from None
        if address.version != version or str(address) != host.lower():
            raise ProxyHeaderError("bad address in PROXY v1 line")
        if not port.isdigit() or len(port) > 5 or int(port) > 65535 or port != str(int(port)):
            raise ProxyHeaderError("bad port in PROXY v1 line")
        addresses.append((str(address), int(port)))
    return ProxyHeader(1, False, parts[1].lower(), addresses[0], addresses[1])


def _parse_v2(fixed: bytes, body: bytes) -> ProxyHeader:
    version_command, family = fixed[12], fixed[13]
    if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    local = version_command & 0xF == 0
    transport, size = _V2_ADDRESSES.get(family, ("unknown", 0))
    if family != 0 and size == 0:
        raise ProxyHeaderError("unsupported PROXY v2 address family")
    if len(body) < size:
        raise ProxyHeaderError("PROXY v2 addresses truncated")
    source = destination = None
    if not local and transport in ("tcp4", "udp4", "tcp6", "udp6"):
        half = (size - 4) // 2
        src, dst = body[:half], body[half : 2 * half]
        sport, dport = struct.unpack("!HH", body[2 * half : size])
        source = (str(ipaddress.ip_address(src)), sport)
        destination = (str(ipaddress.ip_address(dst)), dport)
    tlvs = _parse_tlvs(body[size:])
    if TLV_CRC32C in tlvs:
        _check_crc(fixed, body, size, tlvs[TLV_CRC32C])
    return ProxyHeader(2, local, transport if not local else "unknown", source, destination, tlvs)


def _tlv_spans(data: bytes) -> Generator[tuple[int, int, int], None, None]:
    """(type, start of value, end of value) of each TLV in ``data``."""
    offset = 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise ProxyHeaderError("PROXY v2 TLV truncated")
        kind, length = data[offset], struct.unpack("!H", data[offset + 1 : offset + 3])[0]
        if offset + 3 + length > len(data):
            raise ProxyHeaderError("PROXY v2 TLV truncated")
        yield kind, offset + 3, offset + 3 + length
        offset += 3 + length


def _parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    for kind, start, end in _tlv_spans(data):
        if kind in tlvs and kind != TLV_NOOP:
            raise ProxyHeaderError(f"PROXY v2 TLV 0x{kind:02X} repeated")
        tlvs[kind] = data[start:end]
    return tlvs


def _check_crc(fixed: bytes, body: bytes, size: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyHeaderError("PROXY v2 CRC32C TLV of the wrong size")
    # The checksum covers the whole header with its own value zeroed.
    zeroed = bytearray(body)
    for kind, start, end in _tlv_spans(body[size:]):
        if kind == TLV_CRC32C:
            zeroed[size + start : size + end] = bytes(end - start)
    if crc32c(fixed + bytes(zeroed)) != struct.unpack("!I", value)[0]:
        raise ProxyHeaderError("PROXY v2 CRC32C mismatch")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as PP2_TYPE_CRC32C uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- encoding --------------------------------------------------------------------------------------


def _packed(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None


def encode_v2(
    source: Address | None, destination: Address | None, tlvs: Mapping[int, bytes] = {}
) -> bytes:
    """A v2 ``PROXY`` header for a TCP stream from ``source`` to ``destination`` with ``tlvs``
    (in key order). Mixed families are sent as IPv6 (IPv4-mapped); an address that is unknown
    or not an IP literal gives family ``UNSPEC`` (the receiver keeps the real endpoints)."""
    src = _packed(source[0]) if source is not None else None
    dst = _packed(destination[0]) if destination is not None else None
    if src is None or dst is None or source is None or destination is None:
        family, addresses = 0x00, b""
    else:
        if src.version != dst.version:
            src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a
                        for a in (src, dst))  # fmt: skip
        family = 0x11 if src.version == 4 else 0x21
        addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    extra = b"".join(
        struct.pack("!BH", kind, len(value)) + value for kind, value in sorted(tlvs.items())
    )
    body = addresses + extra
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header too long")
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
