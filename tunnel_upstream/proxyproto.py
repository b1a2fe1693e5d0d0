"""PROXY protocol (HAProxy's v1 text and v2 binary headers) for TCP upstreams behind
identity-tunnel's relay (``proxy_protocol: v2`` on a destination) or any balancer that sends it:
who the client really is, and, from the relay, who the caller is, verified.

``read_proxy_header(reader, ...)`` (asyncio streams) and ``read_proxy_header_from_socket(sock,
...)`` (blocking sockets) read exactly the header, never a byte of the application's data, and
return a ``ProxyInfo``. Given an ``audience`` (and ``issuer`` and ``jwks``/``jwks_url``), they
also verify the relay's identity TLVs and refuse the connection without them
(docs/upstream-identity.md):

* ``0xE0`` (PP2_TYPE_MIN_CUSTOM): the tunnel id, ASCII;
* ``0xE1``: an ES256 JWT signed by the relay with HTTP mode's keys (the JWKS at
  ``/.well-known/tunnel/jwks.json``), ``aud`` = the destination's audience, lifetime at most
  10 minutes, claims ``sub``, ``email``, ``groups``, ``access_levels``, ``instance``, ``port``
  and ``tunnel_id``, which must equal the ``0xE0`` TLV.

It is checked with ``verify_assertion`` (the same code as HTTP mode's header), and a tunnel id
is accepted once per process while its assertion lives (``ReplayCache``): the relay opens one
connection per tunnel, so a second one with the same assertion is a replay.

Errors::

    ProxyHeaderError           not a PROXY header, malformed, truncated, timed out
      IdentityRefused          identity TLVs missing, forged, expired, for another audience,
                               for another tunnel id, or replayed

``parse_proxy_header(buffer)`` is the same parser without I/O (for asyncio Protocols)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunnel_protocol.proxyheader import (
    TLV_ASSERTION,
    TLV_TUNNEL_ID,
    ProxyHeader,
    ProxyHeaderError,
    parse,
    reader,
)

from .verify import AssertionError_, verify_assertion

TIMEOUT = 5.0

Address = tuple[str, int]


class IdentityRefused(ProxyHeaderError):
    """The header carries no identity this upstream can trust: close the connection."""


@dataclass(frozen=True)
class ProxyInfo:
    """``source``: the client's (address, port) as the proxy saw it; ``destination``: the
    address it connected to; both None for v2 ``LOCAL`` (the proxy's own health check) and v1
    ``UNKNOWN``. ``tlvs``: type -> value (v2). ``identity``: the verified assertion's claims
    when an audience was given."""

    version: int
    local: bool
    transport: str  # "tcp4", "tcp6", "udp4", "udp6", "unix", "unix-dgram" or "unknown"
    source: Address | None
    destination: Address | None
    tlvs: Mapping[int, bytes] = field(default_factory=dict)
    identity: dict[str, Any] | None = None

    @property
    def tunnel_id(self) -> str | None:
        value = self.tlvs.get(TLV_TUNNEL_ID)
        return value.decode("ascii", "replace") if value is not None else None


# -- parsing (no I/O: the protocol core's codec) ------------------------------------------------


def _info(header: ProxyHeader) -> ProxyInfo:
    return ProxyInfo(header.version, header.local, header.transport, header.source,
                     header.destination, header.tlvs)  # fmt: skip


def _reader() -> Generator[int, bytes, ProxyInfo]:
    """Yields how many more bytes it needs, is sent exactly that many, returns the header."""
    header = yield from reader()
    return _info(header)


def parse_proxy_header(buffer: bytes) -> tuple[ProxyInfo, int] | None:
    """The header at the start of ``buffer`` and its length, or None when more bytes are
    needed. Raises ProxyHeaderError. No identity check: see ``verify_identity``."""
    found = parse(buffer)
    return None if found is None else (_info(found[0]), found[1])


# -- the relay's identity ------------------------------------------------------------------------


class ReplayCache:
    """Tunnel ids already accepted, each until its assertion expires; at most ``size`` are
    kept (the soonest to expire go first). Thread-safe."""

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def first_use(self, issuer: str, tunnel_id: str, expires: float) -> bool:
        """True the first time (issuer, tunnel_id) is seen while it lives."""
        now = time.time()
        key = (issuer, tunnel_id)
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and seen > now:
                return False
            if len(self._seen) >= self._size:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
                for old in sorted(self._seen, key=self._seen.__getitem__)[: self._size // 10 + 1]:
                    del self._seen[old]
            self._seen[key] = expires
            return True


REPLAYS = ReplayCache()  # the process-wide default


@dataclass(frozen=True)
class IdentityCheck:
    """What to verify the relay's identity TLVs against: the destination's ``audience``, the
    relay's ``issuer`` (HTTP mode's ``issuer_url``) and its keys (``jwks_url`` or a ``jwks``
    dict); ``replays``: where accepted tunnel ids are remembered (None: not checked)."""

    audience: str
    issuer: str
    jwks_url: str | None = None
    jwks: Mapping[str, Any] | None = None
    replays: ReplayCache | None = REPLAYS
    leeway: float = 30.0


def verify_identity(info: ProxyInfo, check: IdentityCheck) -> ProxyInfo:
    """``info`` with ``identity`` set to the verified claims; IdentityRefused otherwise."""
    token, tunnel_id = info.tlvs.get(TLV_ASSERTION), info.tlvs.get(TLV_TUNNEL_ID)
    if info.local or token is None or tunnel_id is None:
        raise IdentityRefused("no identity in the PROXY header")
    try:
        claims = verify_assertion(
            token.decode("ascii"), audience=check.audience, issuer=check.issuer,
            jwks_url=check.jwks_url, jwks=check.jwks, leeway=check.leeway,
        )  # fmt: skip
    except (AssertionError_, UnicodeDecodeError) as exc:
        raise IdentityRefused(f"identity refused: {exc}") from None
    claimed = claims.get("tunnel_id")
    if not isinstance(claimed, str) or not claimed.isascii() or claimed.encode() != tunnel_id:
        raise IdentityRefused("identity refused: assertion for another tunnel")
    replays = check.replays
    if replays is not None and not replays.first_use(check.issuer, claimed, float(claims["exp"])):
        raise IdentityRefused("identity refused: assertion replayed")
    return ProxyInfo(
        info.version, info.local, info.transport, info.source, info.destination, info.tlvs,
        claims,
    )  # fmt: skip


# -- I/O -------------------------------------------------------------------------------------------


async def read_proxy_header(
    reader: asyncio.StreamReader,
    identity: IdentityCheck | None = None,
    *,
    header_timeout: float = TIMEOUT,
) -> ProxyInfo:
    """Read the PROXY header at the start of an asyncio stream (and nothing more); with
    ``identity``, verify the relay's identity TLVs (the JWKS fetch, when ``jwks_url`` is used,
    runs in a thread). Raises ProxyHeaderError / IdentityRefused."""
    parser = _reader()
    try:
        async with asyncio.timeout(header_timeout):
            need = next(parser)
            while True:
                need = parser.send(await reader.readexactly(need))
    except StopIteration as done:
        info: ProxyInfo = done.value
    except asyncio.IncompleteReadError:
        raise ProxyHeaderError("connection closed inside the PROXY header") from None
    except TimeoutError:
        raise ProxyHeaderError("timed out reading the PROXY header") from None
    if identity is None:
        return info
    if identity.jwks_url is not None:
        return await asyncio.to_thread(verify_identity, info, identity)
    return verify_identity(info, identity)


def read_proxy_header_from_socket(
    sock: socket.socket,
    identity: IdentityCheck | None = None,
    *,
    header_timeout: float = TIMEOUT,
) -> ProxyInfo:
    """The same for a blocking socket (its own timeout is restored afterwards)."""
    parser = _reader()
    previous = sock.gettimeout()
    sock.settimeout(header_timeout)
    try:
        need = next(parser)
        while True:
            need = parser.send(_recv_exactly(sock, need))
    except StopIteration as done:
        info: ProxyInfo = done.value
    except TimeoutError:
        raise ProxyHeaderError("timed out reading the PROXY header") from None
    finally:
        sock.settimeout(previous)
    return info if identity is None else verify_identity(info, identity)


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = sock.recv(count)
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


__all__ = [
    "TLV_ASSERTION",
    "TLV_TUNNEL_ID",
    "IdentityCheck",
    "IdentityRefused",
    "ProxyHeaderError",
    "ProxyInfo",
    "ReplayCache",
    "parse_proxy_header",
    "read_proxy_header",
    "read_proxy_header_from_socket",
    "verify_identity",
]
