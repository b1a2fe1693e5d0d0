"""Blocking forms of the library API: each runs its tunnels on its own event loop in its own
thread, so synchronous code (paramiko, Fabric, scripts) can use them.

``SyncForward`` runs an async forward for the ``with`` block; ``TunnelSocket`` is a real
``socket.socket`` (one half of a socketpair) whose other half a background thread carries
through the relay: closing it ends the tunnel and joins the thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from tunnel_protocol import CloseCode
from tunnel_protocol.aio.stream import TcpStream
from tunnel_runtime.loop import run

from .session import ConnectOptions, TunnelSession, get_token, wait_established

__all__ = ["SyncForward", "TunnelSocket"]

JOIN_TIMEOUT = 30.0
# After the socket is closed: how long the target may take to finish its side before the
# tunnel is closed from ours (1001, going away).
LINGER = 5.0


class SyncForward:
    """Runs ``factory()`` (an async context manager giving (host, port)) in a thread."""

    def __init__(self, factory: Callable[[], AbstractAsyncContextManager[tuple[str, int]]]) -> None:
        self._factory = factory
        self._ready: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="tunnel-forward", daemon=True)

    def _main(self) -> None:
        try:
            run(self._serve())
        except BaseException as exc:  # reported to the caller through the future
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self._factory() as address:
            self._ready.set_result(address)
            await self._stop.wait()

    def start(self, timeout: float) -> tuple[str, int]:
        self._thread.start()
        try:
            return self._ready.result(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(JOIN_TIMEOUT)


class TunnelSocket(socket.socket):
    """A connected stream socket whose peer is the tunnel's target."""

    _thread: threading.Thread | None = None
    _stop: Callable[[], None] | None = None

    @classmethod
    def open(cls, options: ConnectOptions, timeout: float) -> TunnelSocket:
        near, far = socket.socketpair()
        ready: concurrent.futures.Future[Callable[[], None]] = concurrent.futures.Future()

        def main() -> None:
            try:
                run(_carry(options, near, ready))
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
            finally:
                near.close()

        thread = threading.Thread(target=main, name="tunnel-socket", daemon=True)
        thread.start()
        try:
            stop = ready.result(timeout)
        except BaseException:
            far.close()
            thread.join(JOIN_TIMEOUT)
            raise
        sock = cls(far.family, far.type, far.proto, fileno=far.detach())
        sock._thread, sock._stop = thread, stop
        return sock

    def close(self) -> None:
        """Close the socket; the tunnel ends when the target has finished its side, or after
        LINGER seconds (closed from here), and the thread is joined."""
        super().close()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return
        thread.join(LINGER)
        if thread.is_alive() and self._stop is not None:
            self._stop()
        thread.join(JOIN_TIMEOUT)

    def __exit__(self, *args: Any) -> None:
        self.close()


async def _carry(
    options: ConnectOptions,
    near: socket.socket,
    ready: concurrent.futures.Future[Callable[[], None]],
) -> None:
    await get_token(options)
    _, stream = await asyncio.get_running_loop().create_connection(TcpStream, sock=near)
    session = TunnelSession(options)
    runner = asyncio.create_task(session.run(stream))
    loop = asyncio.get_running_loop()

    def stop() -> None:  # from the caller's thread
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(session.close, CloseCode.GOING_AWAY, "socket closed")

    try:
        await wait_established(session, runner)
        ready.set_result(stop)
        await runner
    finally:
        stream.close()
        await stream.wait_closed()  # before this thread's loop closes
