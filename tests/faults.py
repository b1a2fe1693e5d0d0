"""A fault-injecting TCP proxy for reliability tests (asyncio, loopback, no toxiproxy).

``FaultProxy(target_port)`` listens on 127.0.0.1:0 and forwards every accepted connection (a
``Link``: the client leg and the upstream leg) to ``127.0.0.1:target_port``. Faults can be set
for the whole proxy (every current connection and every new one) or for one ``Link``, and
switched at any time while data flows:

``pass_through()``
    clears every fault (shaping, drops, refusal and the black hole, see ``restore``).
``reset()``
    aborts both legs of every current connection with a TCP RST (``SO_LINGER`` 0), like a NAT
    or a middlebox forgetting the flow. ``drop_all()`` is the same and returns the count.
``black_hole(refuse_new=False)``
    a half-open path: current connections stay open but nothing is forwarded either way and
    the proxy stops reading (its stream buffers take at most two ``chunk`` more), so both
    peers' TCP windows close and their writes stall. New
    connections are accepted and stalled the same way (their upstream leg is not even dialled,
    as if the SYN had been dropped on the way), or with ``refuse_new=True`` refused. (A
    user-space proxy cannot drop packets: the kernels still acknowledge what fits in their
    receive buffers and then advertise a zero window, so the peers see a stalled path, not
    retransmission timeouts; to the applications and their keepalives it is the same.)
``restore(stalled="reset")``
    new connections flow again. What becomes of the connections the black hole stalled is the
    caller's choice: ``"reset"`` (the default) aborts them with an RST, as a middlebox that lost
    their state answers the next packet; ``"keep"`` leaves the connections that were established
    before the black hole stalled for good, as a NAT that forgot their mapping silently drops
    the old flows (only a keepalive notices), while the ones opened during it go through (their
    SYN retransmission creates a fresh mapping); ``"resume"`` forwards what the kernels buffered
    on all of them, as when the route comes back unchanged.
    ``Link.black_hole()`` / ``Link.restore()`` stall and resume one connection.
``slice(n)``
    forwards in writes of at most ``n`` bytes, each written and drained on its own.
``latency(seconds)``
    delays every chunk by ``seconds`` after it was read, preserving order (a delay line: chunks
    are pipelined, so throughput is bounded by ``buffer / latency``, as a TCP window would be).
``bandwidth(bytes_per_s)``
    a token bucket per connection and direction (burst 1/50 s of the rate, at least 1 KiB).
``drop_after(n, direction=None)``
    resets a connection once it has forwarded ``n`` more bytes in ``direction`` ("up" towards
    the target, "down" towards the client, None: either), counted from the call for current
    connections and from the start for new ones; the first ``n`` bytes are written to the
    destination's socket first. Set on the proxy, it stays armed for every new connection until
    ``drop_after(None)`` or ``pass_through()``; ``on_connect`` arms single connections.
``refuse = True``
    new connections are accepted by the kernel and reset at once (a REJECT with tcp-reset).

Every buffer is bounded: a direction reads at most ``chunk`` bytes at a time, queues at most
``max_buffer`` bytes (the reader stops reading when the queue is full, so the sender's TCP
window closes), and waits for the destination's transport to drain after each write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
DIRECTIONS: tuple[Direction, Direction] = ("up", "down")

DEFAULT_CHUNK = 64 * 1024
DEFAULT_MAX_BUFFER = 256 * 1024
_EOF = b""


@dataclass
class Faults:
    """The shaping faults of one connection (or the proxy's defaults for new connections)."""

    slice_size: int | None = None
    latency: float = 0.0
    bandwidth: float | None = None
    # Bytes left before a reset, per direction (None: no drop armed).
    drop_after: dict[Direction, int | None] = field(
        default_factory=lambda: {"up": None, "down": None}
    )

    def copy(self) -> Faults:
        return Faults(self.slice_size, self.latency, self.bandwidth, dict(self.drop_after))


def _set_rst_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Bucket:
    """A token bucket; ``take(n)`` waits until ``n`` tokens are there (n <= burst)."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.stamp = time.monotonic()

    @staticmethod
    def burst(rate: float) -> int:
        return max(1024, int(rate / 50))

    async def take(self, n: int, rate: float) -> None:
        burst = self.burst(rate)
        while True:
            now = time.monotonic()
            self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / rate)


class _Pipe:
    """One direction of a link: a reader task and a writer task around a bounded queue."""

    def __init__(
        self,
        link: Link,
        direction: Direction,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.direction = direction
        self.src = src
        self.dst = dst
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.forwarded = 0
        self.writes = 0
        self.eof = False
        self._item = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._bucket = _Bucket()

    async def read_loop(self) -> None:
        try:
            await self._read_loop()
        except (ConnectionError, OSError):
            self.link.reset(by_fault=False)  # a reset on one leg is passed on to the other

    async def write_loop(self) -> None:
        try:
            await self._write_loop()
        except (ConnectionError, OSError):
            self.link.reset(by_fault=False)

    async def _read_loop(self) -> None:
        link = self.link
        while True:
            await link.flowing.wait()
            while self.queued >= link.proxy.max_buffer:
                self._space.clear()
                await self._space.wait()
            data = await self.src.read(link.proxy.chunk)
            self.queue.append((time.monotonic(), data))
            self.queued += len(data)
            self._item.set()
            if not data:
                return

    async def _write_loop(self) -> None:
        link = self.link
        while not link.closed:
            while not self.queue:
                self._item.clear()
                await self._item.wait()
            stamp, data = self.queue.popleft()
            self.queued -= len(data)
            if self.queued < link.proxy.max_buffer:
                self._space.set()
            if not data:
                await link.flowing.wait()
                self.eof = True
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                return
            delay = stamp + link.faults.latency - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._forward(data)

    async def _forward(self, data: bytes) -> None:
        link = self.link
        view = memoryview(data)
        while view:
            await link.flowing.wait()
            faults = link.faults
            size = len(view)
            if faults.slice_size is not None:
                size = min(size, faults.slice_size)
            rate = faults.bandwidth
            if rate is not None:
                size = min(size, _Bucket.burst(rate))
            left = faults.drop_after[self.direction]
            if left is not None:
                size = min(size, left)
            if size > 0:
                if rate is not None:
                    await self._bucket.take(size, rate)
                    await link.flowing.wait()  # a black hole may have begun meanwhile
                self.dst.write(view[:size])
                self.writes += 1
                view = view[size:]
                self.forwarded += size
                link.proxy.forwarded[self.direction] += size
                if left is not None:
                    left -= size
                    faults.drop_after[self.direction] = left
            if left is not None and left <= 0:
                await self._flush_then_reset()
                return
            await self.dst.drain()

    async def _flush_then_reset(self) -> None:
        """``drop_after``: hand the last bytes to the kernel (briefly: a peer that does not read
        keeps them), then reset."""
        self.dst.transport.set_write_buffer_limits(high=0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.dst.drain()
        self.link.reset(by_fault=True)


class Link:
    """One proxied connection. Per-connection faults: ``faults`` (a copy of the proxy's at
    accept time) and the methods below; the proxy's setters update every link too."""

    def __init__(
        self,
        proxy: FaultProxy,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.number = number
        self.faults = proxy.faults.copy()
        self.flowing = asyncio.Event()
        self.stalled_by_proxy = False
        self.opened_in_black_hole = False
        self.closed = False
        self.was_reset = False
        self._client = (reader, writer)
        self._upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.pipes: dict[Direction, _Pipe] = {}
        self.task: asyncio.Task[None] | None = None

    # -- per-connection faults --------------------------------------------------------------

    def black_hole(self) -> None:
        self.flowing.clear()

    def restore(self) -> None:
        self.stalled_by_proxy = False
        self.flowing.set()

    def slice(self, n: int | None) -> None:
        if n is not None and n < 1:
            raise ValueError("slice size must be at least 1")
        self.faults.slice_size = n

    def latency(self, seconds: float) -> None:
        self.faults.latency = max(0.0, seconds)

    def bandwidth(self, bytes_per_s: float | None) -> None:
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("bandwidth must be positive")
        self.faults.bandwidth = bytes_per_s

    def drop_after(self, n: int | None, direction: Direction | None = None) -> None:
        for d in (direction,) if direction else DIRECTIONS:
            self.faults.drop_after[d] = n

    def forwarded(self, direction: Direction) -> int:
        pipe = self.pipes.get(direction)
        return pipe.forwarded if pipe else 0

    # -- lifecycle --------------------------------------------------------------------------

    def reset(self, *, by_fault: bool = True) -> None:
        """Abort both legs with an RST and end the link's tasks."""
        if self.closed:
            return
        self.closed = True
        self.was_reset = True
        if by_fault:
            self.proxy.resets += 1
        for _, writer in filter(None, (self._client, self._upstream)):
            _set_rst_on_close(writer)
            writer.transport.abort()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.proxy._changed()

    async def run(self) -> None:
        reader, writer = self._client
        try:
            await self.flowing.wait()  # a black-holed SYN never reaches the target
            try:
                self._upstream = await asyncio.open_connection(
                    "127.0.0.1", self.proxy.upstream_port(self.number), limit=self.proxy.chunk
                )
            except OSError:
                self.reset(by_fault=False)
                return
            up_reader, up_writer = self._upstream
            self.pipes = {
                "up": _Pipe(self, "up", reader, up_writer),
                "down": _Pipe(self, "down", up_reader, writer),
            }
            async with asyncio.TaskGroup() as tg:
                for pipe in self.pipes.values():
                    tg.create_task(pipe.read_loop())
                    tg.create_task(pipe.write_loop())
        except asyncio.CancelledError:
            if not self.closed:
                self.reset(by_fault=False)
                raise
        finally:
            if not self.closed:
                self.closed = True
                for _, w in filter(None, (self._client, self._upstream)):
                    w.close()
            self.proxy._changed()


class FaultProxy:
    """A TCP proxy on 127.0.0.1:0 in front of ``target_port`` with run-time faults (see the
    module docstring). Counters: ``connections`` (accepted and proxied), ``refused``,
    ``resets`` (connections cut by a fault), ``forwarded`` bytes per direction."""

    def __init__(
        self,
        target_port: int,
        *,
        chunk: int = DEFAULT_CHUNK,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        on_connect: Callable[[Link], None] | None = None,
        choose: Callable[[int], int] | None = None,
    ) -> None:
        self.target_port = target_port
        self.choose = choose
        self.chunk = chunk
        self.max_buffer = max_buffer
        self.on_connect = on_connect
        self.port = 0
        self.connections = 0
        self.refused = 0
        self.resets = 0
        self.forwarded: dict[Direction, int] = {"up": 0, "down": 0}
        self.refuse = False
        self.faults = Faults()
        self.black_holed = False
        self._refuse_in_black_hole = False
        self.links: set[Link] = set()
        self._server: asyncio.Server | None = None
        self._change = asyncio.Event()

    def upstream_port(self, number: int) -> int:
        """Where connection ``number`` (1, 2, ...) goes: ``choose(number)`` when given (a load
        balancer in front of several relays), else ``target_port``."""
        return self.choose(number) if self.choose is not None else self.target_port

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=self.chunk)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.reset(by_fault=False)
        tasks = [link.task for link in self.links if link.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- global faults ----------------------------------------------------------------------

    def pass_through(self) -> None:
        """Clear every fault, for current and new connections (the black hole as ``restore``)."""
        self.refuse = False
        self.faults = Faults()
        for link in self.links:
            link.faults = Faults()
        self.restore()

    def reset(self) -> int:
        """RST every current connection; returns how many were cut."""
        live = [link for link in self.links if not link.closed]
        for link in live:
            link.reset(by_fault=True)
        return len(live)

    def drop_all(self) -> int:
        """Backwards-compatible name of ``reset``."""
        return self.reset()

    def black_hole(self, *, refuse_new: bool = False) -> None:
        self.black_holed = True
        self._refuse_in_black_hole = refuse_new
        for link in self.links:
            link.stalled_by_proxy = True
            link.black_hole()

    def restore(self, *, stalled: Literal["reset", "keep", "resume"] = "reset") -> None:
        self.black_holed = False
        self._refuse_in_black_hole = False
        for link in list(self.links):
            if not link.stalled_by_proxy:
                continue
            if stalled == "reset":
                link.reset(by_fault=True)
            elif stalled == "resume" or link.opened_in_black_hole:
                link.restore()
            else:
                link.stalled_by_proxy = False  # dead for good (until reset() or stop())

    def slice(self, n: int | None) -> None:
        self.faults.slice_size = n
        for link in self.links:
            link.slice(n)

    def latency(self, seconds: float) -> None:
        self.faults.latency = max(0.0, seconds)
        for link in self.links:
            link.latency(seconds)

    def bandwidth(self, bytes_per_s: float | None) -> None:
        self.faults.bandwidth = bytes_per_s
        for link in self.links:
            link.bandwidth(bytes_per_s)

    def drop_after(self, n: int | None, direction: Direction | None = None) -> None:
        for d in (direction,) if direction else DIRECTIONS:
            self.faults.drop_after[d] = n
        for link in self.links:
            link.drop_after(n, direction)

    # -- waiting ----------------------------------------------------------------------------

    def _changed(self) -> None:
        self._change.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (unbounded: callers bound it) until ``predicate()`` holds; re-checked whenever
        a connection opens or closes."""
        while not predicate():
            self._change.clear()
            await self._change.wait()

    @property
    def live(self) -> list[Link]:
        return sorted((link for link in self.links if not link.closed), key=lambda x: x.number)

    # -- accepting --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse or (self.black_holed and self._refuse_in_black_hole):
            self.refused += 1
            _set_rst_on_close(writer)
            writer.transport.abort()
            self._changed()
            return
        self.connections += 1
        link = Link(self, self.connections, reader, writer)
        if self.black_holed:
            link.stalled_by_proxy = link.opened_in_black_hole = True
        else:
            link.flowing.set()
        self.links.add(link)
        link.task = asyncio.current_task()
        if self.on_connect is not None:
            self.on_connect(link)
        self._changed()
        try:
            await link.run()
        except asyncio.CancelledError:
            pass  # reset() cancels the link; the server's own task must end quietly
        finally:
            self.links.discard(link)
            self._changed()
