"""A raw WebSocket tunnel client for tests: websockets' sans-I/O ClientProtocol and our sans-I/O
Tunnel over a plain (or TLS) socket, so a test controls exactly which bytes reach the relay in one
TCP write (for example every DATA frame and the close together, as gcloud can)."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from dataclasses import dataclass, field

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from tunnel_protocol import DIALECTS, Side, Tunnel
from tunnel_protocol.frames import encode_close
from tunnel_protocol.tunnel import DataReceived, EofReceived, Resumed

READ = 65536


@dataclass
class RawResult:
    """What the raw client saw: stream bytes received (hashed), EOF, and the close."""

    received: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    eof: bool = False
    close_code: int | None = None
    close_reason: str = ""


class RawTunnelClient:
    """One tunnel: ``open`` (handshake and SID), then ``burst`` or ``download``."""

    def __init__(
        self,
        url: str,
        path: str,
        token: str,
        subprotocol: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        local_address: str | None = None,
        preamble: bytes = b"",
    ) -> None:
        """``local_address``: connect from this loopback address; ``preamble``: bytes sent
        before everything else, TLS included (a PROXY protocol header)."""
        self.dialect = DIALECTS[subprotocol]
        self._local_address = local_address
        self._preamble = preamble
        self.subprotocol = subprotocol
        self.tunnel = Tunnel(Side.CLIENT, self.dialect, buffer_limit=64 * 1024 * 1024)
        self._url = url
        self._path = path
        self._token = token
        self._ssl = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.ws = self._protocol(path)
        self._resumed = False
        self.result = RawResult()

    def _protocol(self, path: str) -> ClientProtocol:
        return ClientProtocol(
            parse_uri(self._url.rstrip("/") + path),
            subprotocols=[Subprotocol(self.subprotocol)],
            max_size=None,
        )

    async def open(self) -> None:
        """Connect and wait for the SID."""
        await self._handshake()
        while self.tunnel.sid is None:
            if not await self._read_once():
                raise ConnectionError(f"closed before the SID: {self.result.close_code}")

    async def drop(self) -> None:
        """Vanish without a close frame (the relay parks the tunnel for resume)."""
        assert self._writer is not None
        self._writer.transport.abort()
        self.tunnel.detach()
        await self.close()

    async def resume(self, url: str | None = None) -> None:
        """Reconnect (``/v4/reconnect?sid&ack``), through ``url`` when given, and wait for the
        relay's RECONNECT_ACK."""
        assert self.tunnel.sid is not None
        if url is not None:
            self._url = url
        path = (
            f"/v4/reconnect?sid={self.tunnel.sid.decode()}&ack={self.tunnel.received_total}"
            "&newWebsocket=True&zone=z"
        )
        self.ws = self._protocol(path)
        self._resumed = False
        await self._handshake()
        while not self._resumed:
            if not await self._read_once():
                raise ConnectionError(f"closed before RECONNECT_ACK: {self.result.close_code}")

    async def _handshake(self) -> None:
        uri = parse_uri(self._url)
        tls = self._ssl if uri.secure else None
        if self._local_address is None and not self._preamble:
            self._reader, self._writer = await asyncio.open_connection(uri.host, uri.port, ssl=tls)
        else:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                if self._local_address is not None:
                    sock.bind((self._local_address, 0))
                await loop.sock_connect(sock, (uri.host, uri.port))
                await loop.sock_sendall(sock, self._preamble)
            except BaseException:
                sock.close()
                raise
            self._reader, self._writer = await asyncio.open_connection(
                sock=sock, ssl=tls, server_hostname=uri.host if tls else None
            )
        request = self.ws.connect()
        request.headers["Authorization"] = f"Bearer {self._token}"
        request.headers["Origin"] = "bot:iap-tunneler"
        self.ws.send_request(request)
        self._write()
        self.tunnel.attach_client()

    def _write(self) -> None:
        assert self._writer is not None
        chunks = [chunk for chunk in self.ws.data_to_send() if chunk]
        if chunks:
            self._writer.write(b"".join(chunks))

    def _queue_tunnel_output(self) -> None:
        for message in self.tunnel.data_to_send():
            if self.ws.state is State.OPEN:
                self.ws.send_binary(message)

    async def _read_once(self) -> bool:
        """Read and process one chunk; False at EOF from the relay."""
        assert self._reader is not None
        try:
            data = await self._reader.read(READ)
        except ConnectionError:
            data = b""
        if not data:
            self.ws.receive_eof()
            self._handle_events()
            return False
        self.ws.receive_data(data)
        self._handle_events()
        self._queue_tunnel_output()
        self._write()
        return True

    def _handle_events(self) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if self.ws.handshake_exc is not None:
                    raise self.ws.handshake_exc
                continue
            assert isinstance(event, Frame)
            if event.opcode is Opcode.BINARY:
                self.tunnel.receive_message(bytes(event.data), 0.0)
            elif event.opcode is Opcode.CLOSE and self.ws.close_rcvd is not None:
                self.result.close_code = self.ws.close_rcvd.code
                self.result.close_reason = self.ws.close_rcvd.reason
        for tunnel_event in self.tunnel.events_received():
            if isinstance(tunnel_event, DataReceived):
                self.result.received += len(tunnel_event.data)
                self.result.digest.update(tunnel_event.data)
            elif isinstance(tunnel_event, EofReceived):
                self.result.eof = True
            elif isinstance(tunnel_event, Resumed):
                self._resumed = True

    def send(self, payload: bytes) -> None:
        """Queue stream bytes and write their DATA frames (no wait)."""
        self.tunnel.send_data(payload)
        self._queue_tunnel_output()
        self._write()

    async def burst(self, payload: bytes, *, eof: bool = False, close_code: int = 1000) -> None:
        """Every DATA frame of ``payload`` (and EOF, native), the close, in ONE TCP write; then
        read until the relay closes the connection."""
        self.tunnel.send_data(payload)
        if eof:
            self.tunnel.send_eof()
        self._queue_tunnel_output()
        if self.dialect.native:
            self.ws.send_binary(encode_close(close_code, "done"))
        self.ws.send_close(close_code, "done")
        self._write()
        await self.finish()

    async def download(self) -> None:
        """Read (acking as the tunnel state machine says) until the relay closes; native: answer
        the relay's EOF with ours, as a finished stream does."""
        while await self._read_once():
            if self.tunnel.peer_eof and self.dialect.native and not self.tunnel.eof_sent:
                self.tunnel.send_eof()
                self._queue_tunnel_output()
                self._write()
        await self.close()

    async def finish(self) -> None:
        while await self._read_once():
            pass
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
