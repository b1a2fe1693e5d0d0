"""The bare picows chain, a calibration path beside socat and the bare websockets chain (issue 18):
a relay (picows server -> TCP to one fixed target) and a client (local TCP -> picows client),
both asyncio Protocols on uvloop with no task per message, ws or wss, no auth, acks or resume.

    python -m bench.picows_chain relay TARGET_PORT [--cert C --key K]  # Listening on URL
    python -m bench.picows_chain client URL [--ca-file C]            # Listening on port [N].

One BINARY message per TCP read. Backpressure crosses both ways: a full write buffer on one leg
pauses reading on the other (``pause_writing``/``resume_writing``). Tasks exist only to dial.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
from pathlib import Path

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_connect,
    ws_create_server,
)

from tunnel_runtime.loop import run


class Link(WSListener):
    """One tunnel: the WebSocket listener, holding the TCP leg's transport. The other leg may
    not exist yet (the target dial, the WebSocket connect): until then reading is paused and
    what was read already waits in ``early`` (to the TCP leg) or ``early_up`` (to the
    WebSocket): uvloop starts reading an accepted connection after ``connection_made``, so a
    pause there does not hold the first read back."""

    def __init__(self) -> None:
        self.ws: WSTransport | None = None
        self.tcp: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.early_up: list[bytes] = []

    def ready(self) -> None:
        """Both legs are up: flush what arrived early and start reading both."""
        ws, tcp = self.ws, self.tcp
        if ws is None or tcp is None:
            return
        for data in self.early:
            tcp.write(data)
        for data in self.early_up:
            ws.send(WSMsgType.BINARY, data)
        self.early.clear()
        self.early_up.clear()
        ws.underlying_transport.resume_reading()
        tcp.resume_reading()

    def end(self) -> None:
        if self.ws is not None and not self.ws.is_disconnected:
            self.ws.send_close(WSCloseCode.OK)
            self.ws.disconnect()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        if self.tcp is None:
            transport.underlying_transport.pause_reading()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in (WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.TEXT):
            # A copy: the payload is a view of picows' read buffer, reused after this returns,
            # and a transport may keep what it could not send at once.
            data = frame.get_payload_as_bytes()
            if self.tcp is None:
                self.early.append(data)
            else:
                self.tcp.write(data)
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            if self.tcp is not None:
                self.tcp.close()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.tcp is not None:
            self.tcp.close()

    def pause_writing(self) -> None:  # the WebSocket's buffer is full: stop reading TCP
        if self.tcp is not None:
            self.tcp.pause_reading()

    def resume_writing(self) -> None:
        if self.tcp is not None:
            self.tcp.resume_reading()


class Tcp(asyncio.Protocol):
    """The TCP leg of a ``Link``: one BINARY message per read."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: duck-typed
        self.link.tcp = tcp
        if self.link.ws is None:
            tcp.pause_reading()

    def data_received(self, data: bytes) -> None:
        ws = self.link.ws
        if ws is None:  # read before the WebSocket is up: hold it, and stop reading now
            self.link.early_up.append(data)
            if self.link.tcp is not None:
                self.link.tcp.pause_reading()
            return
        ws.send(WSMsgType.BINARY, data)

    def eof_received(self) -> bool:
        self.link.end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.end()

    def pause_writing(self) -> None:  # the target's buffer is full: stop reading the WebSocket
        ws = self.link.ws
        if ws is not None:
            ws.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        ws = self.link.ws
        if ws is not None and not ws.is_disconnected:
            ws.underlying_transport.resume_reading()


async def relay(target_port: int, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()

    async def dial(link: Link) -> None:  # once per tunnel, at set-up only
        try:
            await loop.create_connection(lambda: Tcp(link), "127.0.0.1", target_port)
        except OSError:
            if link.ws is not None:
                link.ws.send_close(WSCloseCode.INTERNAL_ERROR)
                link.ws.disconnect()
            return
        link.ready()

    dials: set[asyncio.Task[None]] = set()  # references kept until each dial ends

    def accept(request: WSUpgradeRequest) -> Link:
        link = Link()
        task = loop.create_task(dial(link))
        dials.add(task)
        task.add_done_callback(dials.discard)
        return link

    server = await ws_create_server(accept, "127.0.0.1", 0, ssl=context, max_frame_size=1 << 24)
    port = server.sockets[0].getsockname()[1]
    print(f"Listening on {'wss' if context else 'ws'}://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


async def client(url: str, context: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    connects: set[asyncio.Task[None]] = set()

    async def connect(link: Link) -> None:  # once per tunnel, at set-up only
        try:
            await ws_connect(lambda: link, url, ssl_context=context, max_frame_size=1 << 24)
        except Exception:  # refused, timed out, a failed handshake: drop the local side
            if link.tcp is not None:
                link.tcp.close()
            return
        link.ready()

    def accept() -> Tcp:
        link = Link()
        task = loop.create_task(connect(link))
        connects.add(task)
        task.add_done_callback(connects.discard)
        return Tcp(link)

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"Listening on port [{port}].", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="side", required=True)
    r = sub.add_parser("relay")
    r.add_argument("target_port", type=int)
    r.add_argument("--cert", type=Path)
    r.add_argument("--key", type=Path)
    c = sub.add_parser("client")
    c.add_argument("url")
    c.add_argument("--ca-file", type=Path)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        if args.side == "relay":
            tls = None
            if args.cert:
                tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                tls.load_cert_chain(args.cert, args.key)
            run(relay(args.target_port, tls))
        else:
            context = None
            if args.url.startswith("wss:"):
                cafile = str(args.ca_file) if args.ca_file else None
                context = ssl.create_default_context(cafile=cafile)
            run(client(args.url, context))


if __name__ == "__main__":
    main()
