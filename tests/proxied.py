"""A TCP target behind the relay for ``proxy_protocol`` destinations: it reads the relay's PROXY
header exactly (``tunnel_protocol.proxyheader.reader``), then either hashes the rest of the
stream until EOF (``sink``: ``done`` gets (header, sha256 hex)) or echoes it (``echo``)."""

from __future__ import annotations

import asyncio
import hashlib

from tunnel_protocol.proxyheader import ProxyHeader, reader


class ProxiedTarget:
    def __init__(self, mode: str = "sink") -> None:
        self.mode = mode
        self.headers: list[ProxyHeader] = []
        self.done: asyncio.Queue[tuple[ProxyHeader, str]] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> ProxiedTarget:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def _handle(self, stream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            steps = reader()
            need = next(steps)
            try:
                while True:
                    need = steps.send(await stream.readexactly(need))
            except StopIteration as done:
                header: ProxyHeader = done.value
            self.headers.append(header)
            digest = hashlib.sha256()
            while data := await stream.read(65536):
                digest.update(data)
                if self.mode == "echo":
                    writer.write(data)
                    await writer.drain()
            self.done.put_nowait((header, digest.hexdigest()))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
