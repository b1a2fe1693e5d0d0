"""Local ends of tunnels: a TCP listener (one tunnel per accepted connection, IPv4 and IPv6) and
the stdin/stdout mode used as an ssh ProxyCommand."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from collections.abc import Callable

from tunnel_protocol import CloseCode
from tunnel_protocol.aio.stream import ByteStream, StdioStream, TcpStream

from .session import ConnectOptions, TunnelFailed, TunnelSession, get_token

log = logging.getLogger("tunnel.client")


class PortUnavailable(Exception):
    def __init__(self, port: int) -> None:
        super().__init__(f"Local port [{port}] is not available.")
        self.port = port


def _hosts(host: str) -> list[str]:
    """``localhost`` means both loopbacks (gcloud binds IPv4 and IPv6)."""
    if host in ("localhost", ""):
        return ["127.0.0.1", "::1"]
    return [host.strip("[]")]


def pick_free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalListener:
    """Accepts local connections and runs a TunnelSession for each, until cancelled."""

    def __init__(
        self,
        options: ConnectOptions,
        host: str,
        port: int,
        *,
        report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    ) -> None:
        self.options = options
        self.host = host
        self.port = port
        self.report = report
        self.connections = 0
        self.active: dict[TunnelSession, TcpStream] = {}
        # Bytes of connections already closed (the live ones are read from their streams).
        self.closed_up = 0
        self.closed_down = 0
        self.on_event: Callable[[str], None] | None = None
        self._servers: list[asyncio.Server] = []
        self._pending: asyncio.Queue[TcpStream] = asyncio.Queue()

    async def start(self) -> int:
        """Bind every address of ``host``; returns the port. Raises PortUnavailable."""
        loop = asyncio.get_running_loop()
        port = self.port
        hosts = _hosts(self.host)
        for n, host in enumerate(hosts):
            try:
                server = await loop.create_server(
                    lambda: TcpStream(on_connected=self._pending.put_nowait),
                    host,
                    port,
                    reuse_address=True,
                )
            except OSError as exc:
                if n > 0 and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue  # no IPv6 loopback here: IPv4 alone is fine
                for s in self._servers:
                    s.close()
                raise PortUnavailable(port) from None
            self._servers.append(server)
            if port == 0:
                port = int(server.sockets[0].getsockname()[1])
        self.port = port
        return port

    async def serve(self) -> None:
        """Run tunnels for accepted connections until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    stream = await self._pending.get()
                    self.connections += 1
                    tg.create_task(self._handle(stream))
        finally:
            self.close()

    def close(self) -> None:
        """Stop listening (idempotent); connections already accepted are not touched."""
        for server in self._servers:
            server.close()
        while not self._pending.empty():  # accepted, never served
            self._pending.get_nowait().close()

    def stats(self) -> tuple[int, int, int, int]:
        """(open connections, resuming now, bytes sent to the target, bytes received)."""
        up = self.closed_up + sum(s.bytes_read for s in self.active.values())
        down = self.closed_down + sum(s.bytes_written for s in self.active.values())
        resuming = sum(1 for session in self.active if session.reconnecting)
        return len(self.active), resuming, up, down

    async def _handle(self, stream: TcpStream) -> None:
        session = TunnelSession(self.options)
        self.active[session] = stream
        if self.on_event is not None:
            self.on_event("connection opened")
        try:
            await session.run(stream)
        except TunnelFailed as exc:
            self.report(f"ERROR: {exc}")
        except Exception:  # one tunnel's bug must not take the listener down
            log.exception("tunnel failed")
        finally:
            del self.active[session]
            self.closed_up += stream.bytes_read
            self.closed_down += stream.bytes_written
            stream.close()
            with contextlib.suppress(TimeoutError):  # closed before the loop may end
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await stream.wait_closed()
            if self.on_event is not None:
                self.on_event(
                    f"connection closed ({stream.bytes_read} bytes sent, "
                    f"{stream.bytes_written} received)"
                )


# How long a local connection may take to finish closing after its tunnel ended.
CLOSE_TIMEOUT = 1.0
# After SIGHUP/SIGTERM in stdin mode: how long the close handshake with the relay may take.
HANGUP_CLOSE_TIMEOUT = 5.0


async def run_stdio(options: ConnectOptions, stream: ByteStream | None = None) -> None:
    """stdin/stdout mode (ssh ProxyCommand). Raises TunnelFailed.

    ssh sends its ProxyCommand SIGHUP when it exits: the tunnel is then closed with 1001 (going
    away) so that the relay ends it at once, instead of parking it for resume and keeping the
    target's connection open for the whole resume window."""
    await get_token(options)  # fail with the login message before touching stdin
    session = TunnelSession(options)
    tunnel = asyncio.ensure_future(session.run(stream or StdioStream()))
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for name in ("SIGHUP", "SIGTERM"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, hangup.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, not the main thread
            continue
        installed.append(sig)
    waiter = asyncio.ensure_future(hangup.wait())
    try:
        await asyncio.wait([tunnel, waiter], return_when=asyncio.FIRST_COMPLETED)
        if tunnel.done():
            return tunnel.result()
        log.info("hangup: closing the tunnel")
        session.close(CloseCode.GOING_AWAY, "client exiting")
        try:
            async with asyncio.timeout(HANGUP_CLOSE_TIMEOUT):
                await tunnel
        except (TunnelFailed, TimeoutError):
            pass
    finally:
        waiter.cancel()
        tunnel.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
