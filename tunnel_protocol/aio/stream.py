"""Byte streams the pump moves data between: a TCP connection (asyncio Protocol API, with
pause/resume backpressure) and the process's stdin/stdout (threads, portable to Windows)."""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO, Protocol, cast

# Reads stay below glibc's 128 KiB mmap threshold (measured on our machines): one read fills at
# most one native DATA frame.
READ_SIZE = 64 * 1024
# Received but unread bytes above which the socket stops being read; the peer's window closes.
HIGH_WATER = 256 * 1024


_local = threading.local()


def _read_view() -> memoryview:
    """One 64 KiB read buffer per thread, shared by every stream: buffer_updated copies the
    bytes out at once, so a per-connection buffer would only cost 64 KiB per idle tunnel
    (measured: 105 -> 38.5 KiB per idle ws tunnel on the relay)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_SIZE))
    return view


class ByteStream(Protocol):
    """What the pump needs from the local side of a tunnel."""

    async def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes``; b"" at EOF. Cancel-safe: a cancelled read loses nothing."""
        ...

    async def write(self, data: bytes) -> None:
        """Write, waiting while the peer is slow (backpressure)."""
        ...

    async def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class TcpStream(asyncio.BufferedProtocol):
    """A TCP connection as a ByteStream: the protocol of a connection the relay dials
    (``loop.create_connection(TcpStream, ...)``) or a client's listener accepts. ``bytes_written``
    counts what was handed to the transport."""

    def __init__(self, on_connected: Callable[[TcpStream], None] | None = None) -> None:
        self._on_connected = on_connected
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._error: BaseException | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._closed: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        # Counted for the client's per-connection summary ("N bytes sent, M received").
        self.bytes_read = 0
        self.bytes_written = 0

    # -- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        self._closed = asyncio.get_running_loop().create_future()
        if self._on_connected is not None:
            self._on_connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_view()

    def buffer_updated(self, nbytes: int) -> None:
        self._chunks.append(bytes(_read_view()[:nbytes]))
        self._buffered += nbytes
        if self._buffered >= HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._wake_reader()
        if self._drain is not None and not self._drain.done():
            if exc is None:
                self._drain.set_exception(ConnectionResetError("connection lost"))
            else:
                self._drain.set_exception(exc)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    # -- ByteStream -----------------------------------------------------------------------------

    async def read(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._reader = asyncio.get_running_loop().create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        head = self._chunks[0]
        if len(head) <= max_bytes:
            self._chunks.popleft()
        else:
            self._chunks[0] = head[max_bytes:]
            head = head[:max_bytes]
        self._buffered -= len(head)
        self.bytes_read += len(head)
        if self._read_paused and self._buffered < HIGH_WATER // 2 and self.transport:
            self._read_paused = False
            self.transport.resume_reading()
        return head

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection closed")
        transport.write(data)
        self.bytes_written += len(data)
        if self._write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def write_preamble(self, data: bytes) -> None:
        """Bytes the relay itself sends before any of the tunnel's (a PROXY header): written
        at once, not counted in ``bytes_written`` (that is what the tunnel delivered)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def write_eof(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if self.transport.can_write_eof():
                self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Until the connection is gone (after ``close``: its buffer flushed)."""
        if self._closed is not None:
            await self._closed

    @property
    def unsent(self) -> int:
        """Bytes written but still in the transport's buffer (lost if it is aborted now)."""
        return 0 if self.transport is None else self.transport.get_write_buffer_size()


class StdioStream:
    """stdin/stdout as a ByteStream, via two threads: works on pipes on every platform
    (Windows has no ``select`` on pipes), and keeps backpressure with a bounded queue."""

    def __init__(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        self._stdin = stdin if stdin is not None else sys.stdin.buffer
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=4)
        self._pending = b""
        self._eof = False
        self._thread = threading.Thread(target=self._read_stdin, name="stdin-reader", daemon=True)
        self._thread.start()

    def _read_stdin(self) -> None:
        fd = self._stdin.fileno()
        while True:
            try:
                chunk: bytes | BaseException = os.read(fd, READ_SIZE)
            except OSError as exc:
                chunk = exc
            fut = asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop)
            try:
                fut.result()
            except (RuntimeError, asyncio.CancelledError, Exception):
                return
            if not isinstance(chunk, bytes) or not chunk:
                return

    async def read(self, max_bytes: int) -> bytes:
        if not self._pending:
            if self._eof:
                return b""
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                self._eof = True
                return b""
            self._pending = item
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._write_all, data)

    def _write_all(self, data: bytes) -> None:
        self._stdout.write(data)
        self._stdout.flush()

    async def write_eof(self) -> None:
        await asyncio.to_thread(self._stdout.close)

    def close(self) -> None:
        try:
            self._stdout.flush()
        except (OSError, ValueError):
            pass

    def abort(self) -> None:
        self.close()
