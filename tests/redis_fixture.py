"""A real Redis for the tests: Debian's redis-server on a free loopback port, no persistence,
that a test can kill and restart on the same port (``make test`` installs it when missing)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .helpers import UNIT
from .ports import free_port


class RedisServer:
    """``redis-server`` bound to 127.0.0.1 only. ``stop()`` kills it (SIGKILL: no goodbye to
    clients, as a crash); ``start()`` again restarts it empty on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        for _attempt in range(5):
            port = self.port or free_port()
            self.process = await asyncio.create_subprocess_exec(
                binary,
                "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--dir", str(self.directory), "--logfile", "",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            assert self.process.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(200 * UNIT):
                while raw := await self.process.stdout.readline():
                    lines.append(raw.decode(errors="replace"))
                    if "Ready to accept connections" in lines[-1]:
                        self.port = port
                        asyncio.get_running_loop().create_task(self._drain())
                        return self
            await self.process.wait()
            if self.port:  # a restart on the same port: the port must be free again
                raise AssertionError("redis-server did not restart:\n" + "".join(lines))
        raise AssertionError("redis-server did not start:\n" + "".join(lines))

    async def _drain(self) -> None:
        process = self.process
        if process is not None and process.stdout is not None:
            while await process.stdout.readline():
                pass

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.process = None


@contextlib.asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[RedisServer]:
    server = await RedisServer(directory).start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path) as server:
        yield server
