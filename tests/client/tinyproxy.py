"""A real HTTP proxy for tests: Debian's tinyproxy in the foreground on 127.0.0.1, optionally
with Basic authentication and a CONNECT port allow-list, logging every request to a list the
test reads (installed by scripts/install-system-deps.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..helpers import UNIT

TINYPROXY = shutil.which("tinyproxy") or (
    "/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None
)
ATTEMPTS = 5


def missing() -> str | None:
    return None if TINYPROXY else "tinyproxy not installed (make system-deps)"


@dataclass
class Proxy:
    port: int
    user: str | None
    password: str | None
    log: list[str] = field(default_factory=list)

    def url(self, *, credentials: bool = True) -> str:
        if credentials and self.user is not None:
            return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines the proxy received ("CONNECT host:port HTTP/1.1", "GET url ...")."""
        return [line.split("): ", 1)[1] for line in self.log if "]: Request (" in line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _drain(stream: asyncio.StreamReader, proxy: Proxy, ready: asyncio.Event) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        proxy.log.append(text)
        if "Reloading config file finished" in text:
            ready.set()


@contextlib.asynccontextmanager
async def tinyproxy(
    directory: Path,
    *,
    connect_ports: Sequence[int] = (),
    user: str | None = None,
    password: str | None = None,
) -> AsyncIterator[Proxy]:
    """tinyproxy on a free loopback port; CONNECT only to ``connect_ports`` (none: any port is
    refused with 403, tinyproxy's default allows only 443 and 563)."""
    assert TINYPROXY is not None
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    for _ in range(ATTEMPTS):
        port = _free_port()
        lines = [
            f"Port {port}", "Listen 127.0.0.1", "Timeout 60", "LogLevel Connect",
            "MaxClients 64", "Allow 127.0.0.1", "DisableViaHeader Yes",
        ]  # fmt: skip
        lines += [f"ConnectPort {p}" for p in connect_ports] or ["ConnectPort 9"]
        if user is not None:
            lines.append(f"BasicAuth {user} {password}")
        config = directory / "tinyproxy.conf"
        await asyncio.to_thread(config.write_text, "\n".join(lines) + "\n")
        process = await asyncio.create_subprocess_exec(
            TINYPROXY, "-d", "-c", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert process.stdout is not None
        proxy = Proxy(port, user, password)
        ready = asyncio.Event()
        drain = asyncio.create_task(_drain(process.stdout, proxy, ready))
        try:
            async with asyncio.timeout(200 * UNIT):
                await ready.wait()
            await _wait_listening(port, process)
            if process.returncode is None:
                try:
                    yield proxy
                finally:
                    await _stop(process, drain)
                return
        except BaseException:
            await _stop(process, drain)
            raise
        await _stop(process, drain)  # lost the port race: try another
    raise RuntimeError("tinyproxy did not start:\n" + "\n".join(proxy.log))


async def _wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    """Until the port accepts connections or the process ended (bounded: 200 units)."""
    for _ in range(200):
        if process.returncode is not None or await _listening(port):
            return
        await asyncio.sleep(UNIT)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _stop(process: asyncio.subprocess.Process, drain: asyncio.Task[None]) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            async with asyncio.timeout(100 * UNIT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
    with contextlib.suppress(asyncio.CancelledError):
        await drain


MICROSOCKS = shutil.which("microsocks")


@dataclass
class Socks:
    port: int
    user: str | None
    password: str | None

    def url(self, scheme: str = "socks5h") -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def microsocks(user: str | None = None, password: str | None = None) -> AsyncIterator[Socks]:
    """Debian's microsocks (a SOCKS5 server) on a free loopback port."""
    assert MICROSOCKS is not None
    for _ in range(ATTEMPTS):
        port = _free_port()
        args = ["-i", "127.0.0.1", "-p", str(port)]
        if user is not None:
            args += ["-u", user, "-P", str(password)]
        process = await asyncio.create_subprocess_exec(
            MICROSOCKS, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        drain: asyncio.Task[None] = asyncio.create_task(asyncio.sleep(0))
        try:
            await _wait_listening(port, process)
            if process.returncode is None:
                try:
                    yield Socks(port, user, password)
                finally:
                    await _stop(process, drain)
                return
        except BaseException:
            await _stop(process, drain)
            raise
        await _stop(process, drain)
    raise RuntimeError("microsocks did not start")
