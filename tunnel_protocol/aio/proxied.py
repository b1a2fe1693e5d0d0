"""Listening behind a TCP-passthrough balancer that speaks the PROXY protocol (v1 or v2):
``ProxiedListener`` accepts connections itself, reads the header a trusted peer puts before
everything else (before TLS), and hands the socket to the event loop, TLS included, with the
client's real address as the connection's ``peername``.

Only ``trusted`` peers may send a header. From anyone else a header is refused (the connection
is closed and counted); a trusted peer's connection without one (a health check, a client in the
same network) keeps its real address. The header's bytes are read exactly, so not a byte of the
TLS or HTTP data behind it is taken from the socket before the loop owns it."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

from ..proxyheader import ProxyHeader, ProxyHeaderError, looks_like_header, reader

log = logging.getLogger("tunnel.proxy_protocol")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PEEK = 16  # enough to tell a v1 or v2 header from TLS or HTTP


class AddressedTransport(asyncio.Transport):
    """A transport as the application sees it, with the client's address from the PROXY
    header as ``peername``; everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, peername: tuple[Any, ...]) -> None:
        super().__init__()
        self._transport = transport
        self._peername = peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        return self._transport.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _Readdress(asyncio.Protocol):
    """Steps aside on ``connection_made``: the application's protocol gets the transport
    directly from then on (no cost on the read path), and an ``AddressedTransport`` to
    write through."""

    def __init__(self, inner: asyncio.BaseProtocol, peername: tuple[Any, ...]) -> None:
        self._inner = inner
        self._peername = peername

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio classes: no isinstance check).
        stream = cast(asyncio.Transport, transport)
        stream.set_protocol(self._inner)
        self._inner.connection_made(AddressedTransport(stream, self._peername))


class ProxiedListener:
    """An ``asyncio.Server`` stand-in (what websockets' and aiohttp's servers use of one)."""

    def __init__(
        self,
        sock: socket.socket,
        factory: ProtocolFactory,
        *,
        trusted: Sequence[Network],
        ssl_context: ssl.SSLContext | None,
        header_timeout: float,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._factory = factory
        self._trusted = tuple(trusted)
        self._ssl = ssl_context
        self._header_timeout = header_timeout
        self._on_refused = on_refused
        self._loop = asyncio.get_running_loop()
        self._accepting: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    # -- asyncio.Server's surface ----------------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed.is_set() else (self._sock,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._accepting is not None and not self._closed.is_set()

    async def start_serving(self) -> None:
        if self._accepting is None and not self._closed.is_set():
            self._accepting = asyncio.create_task(self._accept())

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self._closed.wait()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._accepting is not None:
            self._accepting.cancel()
        for task in self._pending:
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()
        tasks = [t for t in (self._accepting, *self._pending) if t is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- accepting -------------------------------------------------------------------------------

    async def _accept(self) -> None:
        while True:
            try:
                conn, peer = await self._loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and kin: keep listening, as asyncio's servers do
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._admit(conn, peer))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _refuse(self, conn: socket.socket, peer: str, why: str) -> None:
        log.warning("PROXY protocol: closed a connection from %s: %s", peer, why)
        if self._on_refused is not None:
            self._on_refused(peer, why)
        conn.close()

    async def _admit(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        conn.setblocking(False)
        try:
            async with asyncio.timeout(self._header_timeout):
                peername = await self._preamble(conn, peer)
        except TimeoutError:
            self._refuse(conn, peer[0], "no data before the header timeout")
            return
        except ProxyHeaderError as exc:
            self._refuse(conn, peer[0], str(exc))
            return
        except (OSError, asyncio.CancelledError):
            conn.close()
            raise
        if peername is None:
            conn.close()  # closed by the peer before a byte
            return
        factory = self._factory
        if peername != peer:
            original = factory

            def factory() -> asyncio.BaseProtocol:
                return _Readdress(original(), peername)

        try:
            await self._loop.connect_accepted_socket(
                factory, conn, ssl=self._ssl,
                ssl_handshake_timeout=self._header_timeout if self._ssl else None,
            )  # fmt: skip
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("connection from %s failed before it began: %s", peername[0], exc)
            conn.close()

    async def _preamble(self, conn: socket.socket, peer: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The address the connection is from: the header's source from a trusted peer, the
        real peer otherwise; None when the peer closed before sending anything."""
        start = await self._peek(conn)
        if not start:
            return None
        kind = looks_like_header(start)
        trusted = self._is_trusted(peer[0])
        if kind is False or (kind is None and not trusted):
            return peer  # not a header: TLS or HTTP for the server behind (which refuses junk)
        if not trusted:
            raise ProxyHeaderError("a PROXY header from a peer outside trusted_proxies")
        header = await self._read_header(conn)
        if header.local or header.source is None:
            return peer  # the balancer's own health check, or an unknown source
        return (header.source[0], header.source[1], *peer[2:])

    async def _peek(self, conn: socket.socket) -> bytes:
        readable = self._loop.create_future()
        self._loop.add_reader(conn.fileno(), readable.set_result, None)
        try:
            await readable
        finally:
            self._loop.remove_reader(conn.fileno())
        return conn.recv(PEEK, socket.MSG_PEEK)

    async def _read_header(self, conn: socket.socket) -> ProxyHeader:
        steps = reader()
        try:
            need = next(steps)
            while True:
                data = b""
                while len(data) < need:
                    chunk = await self._loop.sock_recv(conn, need - len(data))
                    if not chunk:
                        raise ProxyHeaderError("connection closed inside the PROXY header")
                    data += chunk
                need = steps.send(data)
        except StopIteration as done:
            header: ProxyHeader = done.value
            return header

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._trusted)


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket on host:port, as the event loop's servers make them
    (``reuse_port``: SO_REUSEPORT, for several processes on one port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
