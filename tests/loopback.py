"""A TCP service on 127.0.0.1:0 for tests: subclasses implement ``_handle``; ``stop`` closes the
connections still being served, so a test that fails half-way leaks no socket into the next."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self


class LoopbackServer:
    port: int = 0
    _server: asyncio.Server | None = None
    _serving: dict[asyncio.Task[None], asyncio.StreamWriter] | None = None

    async def start(self) -> Self:
        self._serving = {}
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # Python 3.11's wait_closed does not wait for the handlers: end them here.
        for task, writer in list((self._serving or {}).items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        assert self._serving is not None
        self._serving[task] = writer
        try:
            await self._handle(reader, writer)
        finally:
            self._serving.pop(task, None)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # subclasses serve the connection
