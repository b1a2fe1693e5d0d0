"""Drive one Tunnel over one WebSocket attachment: WebSocket <-> Tunnel <-> local ByteStream.

The pump is the same on both sides. It ends with an ``Outcome`` saying whether the stream is
complete, the WebSocket was lost (resume may follow), the peer closed it with a code, or we closed
it (protocol error, local stream failure, or an external ``close`` such as a revocation).

Control frames never stall data: the reader hands a control event to ``on_control`` at once,
and whatever that returns to await (a re-authentication that fetches JWKS, a token refresh) runs
in a control task beside the data, one job at a time; the task exists only while jobs wait, so
an idle tunnel pays for none.

Only receiving decides that the peer is gone: a send (ACK, keepalive, data) that fails because
the peer's close already arrived is not the end of the stream. Every DATA frame received before
the peer's close frame is written to the local stream before the pump reports its outcome.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ..codes import CloseCode
from ..errors import TunnelError
from ..frames import encode_close
from ..tunnel import (
    Acked,
    DataReceived,
    EofReceived,
    Event,
    Tunnel,
)
from .stream import ByteStream


class End(enum.Enum):
    FINISHED = "finished"  # stream complete; closed with 1000 (by us or the peer)
    LOST = "lost"  # WebSocket dropped without a close code: resumable
    PEER_CLOSED = "peer_closed"  # the peer closed with a code other than 1000
    CLOSED = "closed"  # we closed with a code (error, revocation, drain, ...)


@dataclass(frozen=True, slots=True)
class Outcome:
    end: End
    code: int | None = None
    reason: str = ""


class _Stop(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.end.value)
        self.outcome = outcome


# Called in the reader for each control event; it must not block. Work that waits (JWKS, a
# token refresh) is returned as a coroutine and runs in the control task.
ControlJob = Coroutine[Any, Any, None]
ControlHandler = Callable[[Event], ControlJob | None]
E = TypeVar("E", bound=BaseException)

# Control jobs queued behind one that waits. Past this the reader waits too: only a peer that
# floods control frames while its last one is still being checked slows its own data.
MAX_CONTROL_JOBS = 4

# Seconds to send a close (reason frame + close handshake) before the socket is dropped.
CLOSE_TIMEOUT = 5.0

# Codes websockets sends when it fails a connection for the peer's misbehaviour.
_LIBRARY_FAILURES = frozenset(
    {
        CloseCode.PROTOCOL_ERROR,
        1007,  # invalid frame payload data (not UTF-8)
        CloseCode.MESSAGE_TOO_BIG,
    }
)

# Local read/write failures map to IAP's destination codes on the relay side.
READ_FAILED = CloseCode.DESTINATION_READ_FAILED
WRITE_FAILED = CloseCode.DESTINATION_WRITE_FAILED


def _first(group: BaseExceptionGroup[E], kind: type[E]) -> E:
    """The first ``kind`` exception of a task group's failure (nested groups flattened)."""
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            nested: E = _first(exc, kind)
            return nested
    raise group  # pragma: no cover - except* only hands over groups holding ``kind``


class Pump:
    """One attachment. ``run`` returns when it ends; ``close`` ends it from outside."""

    def __init__(
        self,
        tunnel: Tunnel,
        ws: Connection,
        stream: ByteStream,
        *,
        on_control: ControlHandler | None = None,
        keepalive: tuple[float, float] | None = None,
        last_activity: float | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.ws = ws
        self.stream = stream
        self._on_control = on_control
        self._keepalive = keepalive
        self._send_lock = asyncio.Lock()
        self._controls: asyncio.Queue[ControlJob] = asyncio.Queue(MAX_CONTROL_JOBS)
        self._tasks: asyncio.TaskGroup | None = None  # run()'s, for the control task
        self._control_task: asyncio.Task[None] | None = None
        self._capacity = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._timer_idle = False
        # Created here, not in run: a close requested between attach and run must not be lost.
        self._close_request: asyncio.Future[tuple[int, str]] = (
            asyncio.get_running_loop().create_future()
        )
        # Set once a send failed because the WebSocket is closing: nothing more can go out, but
        # the reader still drains every message that arrived before the peer's close.
        self.send_closed = False
        # Loop time of the last DATA or EOF in either direction (ACKs, pings and REAUTH are not
        # activity). A tunnel that resumes passes its previous value on.
        if last_activity is None:
            last_activity = asyncio.get_running_loop().time()
        self.last_activity = last_activity

    def close(self, code: int, reason: str) -> None:
        """End this attachment with a typed close (safe to call from any task, any time; the
        first call wins, and one made before ``run`` takes effect when it starts)."""
        fut = self._close_request
        if not fut.done():
            fut.set_result((code, reason))

    async def run(self) -> Outcome:
        try:
            await self._flush()  # SID / RECONNECT_ACK / replay queued by attach
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self._ws_to_stream())
                tg.create_task(self._stream_to_ws())
                tg.create_task(self._timers())
                tg.create_task(self._watch_close())
                if self._keepalive is not None and self.tunnel.dialect.native:
                    tg.create_task(self._keepalives(*self._keepalive))
        except* _Stop as group:
            outcome = _first(group, _Stop).outcome
        except* ConnectionClosed as group:
            outcome = self._closed_outcome(_first(group, ConnectionClosed))
        else:  # pragma: no cover - the tasks only end by raising
            outcome = Outcome(End.LOST)
        finally:
            self.tunnel.detach()
            self._drop_controls()
        if outcome.end in (End.CLOSED, End.FINISHED):
            answered = await self._close_ws(outcome.code or CloseCode.NORMAL, outcome.reason)
            if outcome.end is End.FINISHED and not answered and self.tunnel.buffered:
                # We ended the stream (IAP: the local side's EOF) with bytes the peer never
                # acknowledged, and it never answered the close: it may lack them. Keep the
                # tunnel resumable instead of calling it finished.
                outcome = Outcome(End.LOST, None, "close not answered")
        return outcome

    @staticmethod
    def _closed_outcome(exc: ConnectionClosed) -> Outcome:
        rcvd, sent = exc.rcvd, exc.sent
        if rcvd is None and sent is not None and sent.code in _LIBRARY_FAILURES:
            # Our WebSocket library failed the connection because of what the peer sent (a
            # message over max_size, too many fragments, a framing error): not resumable.
            return Outcome(End.CLOSED, sent.code, sent.reason)
        if rcvd is None or rcvd.code in (1005, 1006):
            return Outcome(End.LOST)
        if rcvd.code == CloseCode.NORMAL:
            return Outcome(End.FINISHED, rcvd.code, rcvd.reason)
        return Outcome(End.PEER_CLOSED, rcvd.code, rcvd.reason)

    async def _close_ws(self, code: int, reason: str) -> bool:
        """Close with ``code``; True when the peer's close frame arrived (before or now)."""
        # Keep reading (and discarding) until the peer's close frame: it may still be sending
        # DATA and ACKs (gcloud acks every 32 KiB), and unread messages pause reading after
        # websockets' max_queue, so the close reply would never be read (stall to the timeout).
        discard = asyncio.create_task(self._discard_incoming())
        # A half-open peer never drains our buffer: bound the whole close, then drop the socket.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if code != CloseCode.NORMAL and self.tunnel.dialect.native:
                    async with self._send_lock:
                        await self.ws.send(encode_close(code, reason))
                # Close frame reasons are limited to 123 bytes.
                short = reason.encode("utf-8", "replace")[:123].decode("utf-8", "ignore")
                await self.ws.close(code, short)
        except ConnectionClosed:
            pass
        except TimeoutError:
            self.ws.transport.abort()
        finally:
            discard.cancel()
            await asyncio.gather(discard, return_exceptions=True)
        return self.ws.protocol.close_rcvd is not None

    async def _discard_incoming(self) -> None:
        try:
            while True:
                await self.ws.recv()
        except ConnectionClosed:
            pass

    async def flush(self) -> None:
        """Send what the tunnel has queued (for control frames queued from outside the pump)."""
        await self._flush()

    async def _flush(self) -> None:
        """Send what the tunnel has queued. A closing WebSocket drops it (replayable data stays
        in the tunnel's buffer; ACKs are implied by the next attach) and sets ``send_closed``:
        the reader, not a sender, reports how the connection ended."""
        async with self._send_lock:
            messages = self.tunnel.data_to_send()
            try:
                for message in messages:
                    # websockets' send() on a closing connection waits for the TCP close (up
                    # to its close timeout) before it raises, and the reader would wait with
                    # it while the peer's last DATA frames sit unread: check first.
                    if self.send_closed or self.ws.state is not State.OPEN:
                        self.send_closed = True
                        return
                    await self.ws.send(message)
            except ConnectionClosed:
                self.send_closed = True

    async def _ws_to_stream(self) -> None:
        tunnel, stream, ws = self.tunnel, self.stream, self.ws
        loop = asyncio.get_running_loop()
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                raise _Stop(
                    Outcome(
                        End.CLOSED,
                        CloseCode.INVALID_WEBSOCKET_OPCODE,
                        "text messages are not allowed",
                    )
                )
            now = loop.time()
            try:
                tunnel.receive_message(message, now)
            except TunnelError as exc:
                raise _Stop(Outcome(End.CLOSED, exc.code, str(exc))) from None
            for event in tunnel.events_received():
                if isinstance(event, DataReceived):
                    self.last_activity = now
                    try:
                        await stream.write(event.data)
                    except OSError as exc:
                        raise _Stop(Outcome(End.CLOSED, WRITE_FAILED, str(exc))) from None
                elif isinstance(event, Acked):
                    self._capacity.set()
                elif isinstance(event, EofReceived):
                    self.last_activity = now
                    try:
                        await stream.write_eof()
                    except OSError as exc:
                        raise _Stop(Outcome(End.CLOSED, WRITE_FAILED, str(exc))) from None
                elif self._on_control is not None:
                    job = self._on_control(event)
                    if job is not None:
                        await self._controls.put(job)  # waits only when MAX_CONTROL_JOBS wait
                        self._start_controls()
            if tunnel.has_pending:
                await self._flush()
            if self._timer_idle:
                self._timer_wake.set()
            if tunnel.finished:
                raise _Stop(Outcome(End.FINISHED, CloseCode.NORMAL, ""))

    async def _stream_to_ws(self) -> None:
        tunnel, stream = self.tunnel, self.stream
        loop = asyncio.get_running_loop()
        max_data = tunnel.dialect.max_data
        if tunnel.eof_sent:
            await asyncio.Future()  # our direction is over: nothing left to read
        while True:
            capacity = tunnel.send_capacity
            if capacity <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            try:
                data = await stream.read(min(capacity, max_data))
            except OSError as exc:
                raise _Stop(Outcome(End.CLOSED, READ_FAILED, str(exc))) from None
            if not data:
                break
            self.last_activity = loop.time()
            tunnel.send_data(data)
            await self._flush()
        if tunnel.dialect.native:
            tunnel.send_eof()
            await self._flush()
            if tunnel.finished:
                raise _Stop(Outcome(End.FINISHED, CloseCode.NORMAL, ""))
            await asyncio.Future()  # the reader ends the pump when the peer finishes too
        if self.send_closed:
            # Not everything reached the peer: the reader reports how the WebSocket ended (a
            # lost one is resumed and the rest replayed).
            await asyncio.Future()
        # IAP has no half-close: everything is sent, so the tunnel ends with a normal close.
        raise _Stop(Outcome(End.FINISHED, CloseCode.NORMAL, ""))

    def _start_controls(self) -> None:
        task, tasks = self._control_task, self._tasks
        if (task is None or task.done()) and tasks is not None:
            self._control_task = tasks.create_task(self._run_controls())

    async def _run_controls(self) -> None:
        """Control jobs, in arrival order, beside the data, until none is left; what a job
        queued (REAUTH_OK, a REAUTH frame) is sent when it ends."""
        while not self._controls.empty():
            await self._controls.get_nowait()
            if self.tunnel.has_pending:
                await self._flush()

    def _drop_controls(self) -> None:
        # Jobs that never started when the attachment ended: close them (never awaited).
        while not self._controls.empty():
            self._controls.get_nowait().close()

    async def _timers(self) -> None:
        tunnel = self.tunnel
        loop = asyncio.get_running_loop()
        # While attached, the ack-flush deadline only moves later or goes away, so the task
        # sleeps until the deadline it saw and re-checks; only an idle timer (no deadline) needs
        # waking. Waking it on every message cost ~13% of the round trip (measured).
        while True:
            deadline = tunnel.next_deadline()
            if deadline is None:
                self._timer_wake.clear()
                self._timer_idle = True
                try:
                    await self._timer_wake.wait()
                finally:
                    self._timer_idle = False
                continue
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            tunnel.handle_timeout(loop.time())
            await self._flush()

    async def _keepalives(self, interval: float, pong_timeout: float) -> None:
        """Native only (gcloud treats a ping as an error): a peer that stops answering pings
        is dead; the attachment ends as LOST so the tunnel can be resumed."""
        while True:
            await asyncio.sleep(interval)
            if self.send_closed or self.ws.state is not State.OPEN:
                self.send_closed = True
                return
            try:
                # ping() itself waits while the write buffer is full (a stuck bulk transfer to
                # a dead peer), so the deadline covers sending the ping too.
                async with asyncio.timeout(pong_timeout):
                    pong = await self.ws.ping()
                    await pong
            except ConnectionClosed:
                # Closing: the reader drains what is left and reports the end.
                self.send_closed = True
                return
            except TimeoutError:
                self.ws.transport.abort()
                raise _Stop(Outcome(End.LOST, None, "keepalive timeout")) from None

    async def _watch_close(self) -> None:
        code, reason = await self._close_request
        raise _Stop(Outcome(End.CLOSED, code, reason))
