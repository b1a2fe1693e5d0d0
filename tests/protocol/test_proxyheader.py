"""The PROXY protocol header codec (tunnel_protocol.proxyheader): what the relay writes parses
back exactly, the parser takes exactly the header's bytes, and malformed headers are refused."""

from __future__ import annotations

import struct

import pytest

from tunnel_protocol.proxyheader import (
    TLV_ASSERTION,
    TLV_CRC32C,
    TLV_TUNNEL_ID,
    V2_SIGNATURE,
    ProxyHeaderError,
    crc32c,
    encode_v2,
    looks_like_header,
    parse,
)

TRAILER = b"\x16\x03\x01 TLS after the header"


@pytest.mark.parametrize(
    ("source", "destination", "transport", "want_source", "want_destination"),
    [
        (("198.51.100.7", 4000), ("10.0.0.5", 5432), "tcp4", ("198.51.100.7", 4000),
         ("10.0.0.5", 5432)),
        (("2001:db8::7", 1), ("2001:db8::5", 22), "tcp6", ("2001:db8::7", 1),
         ("2001:db8::5", 22)),
        # Mixed families: sent as IPv6, the IPv4 side mapped.
        (("198.51.100.7", 0), ("2001:db8::5", 22), "tcp6", ("::ffff:c633:6407", 0),
         ("2001:db8::5", 22)),
    ],
)  # fmt: skip
def test_v2_round_trip(
    source: tuple[str, int],
    destination: tuple[str, int],
    transport: str,
    want_source: tuple[str, int],
    want_destination: tuple[str, int],
) -> None:
    tlvs = {TLV_TUNNEL_ID: b"tunnel-1", TLV_ASSERTION: b"a.b.c"}
    wire = encode_v2(source, destination, tlvs)
    parsed = parse(wire + TRAILER)
    assert parsed is not None
    header, length = parsed
    assert length == len(wire)  # not a byte of what follows
    assert (header.version, header.local, header.transport) == (2, False, transport)
    assert (header.source, header.destination) == (want_source, want_destination)
    assert dict(header.tlvs) == tlvs


def test_unknown_source_is_unspec() -> None:
    header, _ = parse(encode_v2(None, ("10.0.0.5", 22))) or pytest.fail("no header")
    assert (header.transport, header.source, header.destination) == ("unknown", None, None)
    header, _ = parse(encode_v2(("not-an-ip", 1), ("10.0.0.5", 22))) or pytest.fail("no header")
    assert header.source is None


def test_parse_waits_for_the_whole_header() -> None:
    wire = encode_v2(("198.51.100.7", 4000), ("10.0.0.5", 22), {TLV_TUNNEL_ID: b"x" * 300})
    for cut in (0, 1, 11, 15, 16, len(wire) - 1):
        assert parse(wire[:cut]) is None
    assert parse(wire) is not None


def test_v1() -> None:
    line = b"PROXY TCP4 198.51.100.7 10.0.0.5 4000 443\r\n"
    header, length = parse(line + b"GET / HTTP/1.1\r\n") or pytest.fail("no header")
    assert length == len(line)
    assert (header.version, header.source, header.destination) == (
        1, ("198.51.100.7", 4000), ("10.0.0.5", 443)
    )  # fmt: skip
    unknown, _ = parse(b"PROXY UNKNOWN\r\n") or pytest.fail("no header")
    assert unknown.source is None


def _with_crc(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    wire = bytearray(encode_v2(source, destination, {TLV_CRC32C: bytes(4)}))
    checksum = crc32c(bytes(wire))
    wire[-4:] = struct.pack("!I", checksum)
    return bytes(wire)


def test_crc32c_checked() -> None:
    wire = _with_crc(("198.51.100.7", 4000), ("10.0.0.5", 22))
    assert parse(wire) is not None
    broken = bytearray(wire)
    broken[20] ^= 1  # an address byte
    with pytest.raises(ProxyHeaderError, match="CRC32C"):
        parse(bytes(broken))


@pytest.mark.parametrize(
    "wire",
    [
        b"PROXY TCP4 198.51.100.7 10.0.0.5 4000\r\n",  # a field short
        b"PROXY TCP4 2001:db8::1 10.0.0.5 4000 22\r\n",  # family mismatch
        b"PROXY TCP4 198.51.100.7 10.0.0.5 04000 22\r\n",  # leading zero
        b"PROXY TCP4 " + b"1" * 120 + b"\r\n",  # too long
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # addresses truncated
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than the relay accepts
        # A TLV that runs past the end of the header.
        V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\xe0\x00\x09x",
        # The same TLV twice.
        encode_v2(("198.51.100.7", 1), ("10.0.0.5", 2))[:14]
        + struct.pack("!H", 12 + 8)
        + encode_v2(("198.51.100.7", 1), ("10.0.0.5", 2))[16:]
        + b"\xe0\x00\x01a\xe0\x00\x01b",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_headers_are_refused(wire: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(wire + b"\r\n" * 60)


@pytest.mark.parametrize(
    ("start", "verdict"),
    [
        (b"", None),
        (b"P", None),
        (b"PROX", None),
        (b"PROXY ", True),
        (b"\r\n\r\n", None),
        (V2_SIGNATURE, True),
        (b"\x16\x03\x01", False),  # TLS
        (b"GET / HTTP/1.1", False),
        (b"POST /", False),
        (b"\r\n\r\nX", False),
    ],
)
def test_looks_like_header(start: bytes, verdict: bool | None) -> None:
    assert looks_like_header(start) is verdict
