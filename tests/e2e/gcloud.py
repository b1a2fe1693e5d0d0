"""Run the real gcloud CLI (``gcloud compute start-iap-tunnel``) against a relay on loopback,
offline: a private CLOUDSDK_CONFIG, an access-token file, ``--zone`` (no Compute API lookup) and
the connection check disabled (no API fallback). ``GCLOUD_E2E_ARGS=--verbosity=debug`` adds
gcloud's own log to the stderr that failing assertions show.

Also the targets these tests need beyond ``tests.helpers.TcpTarget``: a sink that reports the
sha256 of everything it received until EOF (gcloud cannot half-close, so the answer cannot come
back through the tunnel) and a source whose sending the test can release step by step."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from ..helpers import UNIT
from ..loopback import LoopbackServer

GCLOUD = shutil.which("gcloud")
PROJECT = "p"
ZONE = "z"
INSTANCE = "vm1"
# Long enough for gcloud's start-up (~0.5 s) and its reconnect loop (up to ~2 s to notice a
# closed WebSocket while idle, then a 1.5 s backoff if the first attempt fails).
STEP_TIMEOUT = 400 * UNIT
LISTENING = re.compile(rb"Listening on port \[(\d+)\]\.")


def gcloud_env(config_dir: Path) -> dict[str, str]:
    """Environment for an offline gcloud: its own config dir, no prompts, no usage reporting,
    no update check, a fixed project."""
    config_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    env.update(
        CLOUDSDK_CONFIG=str(config_dir),
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
        CLOUDSDK_CORE_PROJECT=PROJECT,
    )
    return env


class Output:
    """A subprocess pipe drained in the background, with waits for what it has printed."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.data = bytearray()
        self.closed = False
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        try:
            while chunk := await stream.read(65536):
                async with self._changed:
                    self.data += chunk
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self.closed = True
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[bytes], bool]) -> bool:
        """Wait until ``predicate(output)`` holds; False if the pipe closed first."""
        async with asyncio.timeout(STEP_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.closed or predicate(bytes(self.data)))
            return predicate(bytes(self.data))

    async def wait_closed(self) -> None:
        async with asyncio.timeout(STEP_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.closed)

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@dataclass
class Gcloud:
    """A running ``gcloud compute start-iap-tunnel``. In port mode ``port`` is the local port it
    listens on; in stdin mode ``process.stdin``/``process.stdout`` are the tunnel."""

    process: asyncio.subprocess.Process
    stderr: Output
    port: int = 0

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    async def wait_stderr(self, *needles: str) -> str:
        """Wait until stderr contains every needle; return stderr (fails with its text)."""
        wanted = [n.encode() for n in needles]
        found = await self.stderr.wait_for(lambda out: all(n in out for n in wanted))
        assert found, f"gcloud ended without printing {needles!r}; stderr:\n{self.stderr.text}"
        return self.stderr.text

    async def wait_exit(self) -> int:
        async with asyncio.timeout(STEP_TIMEOUT):
            code = await self.process.wait()
        await self.stderr.wait_closed()
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        await self.stderr.aclose()


def gcloud_argv(
    relay_port: int, target_port: int, token_file: Path, *, stdin_mode: bool
) -> list[str]:
    assert GCLOUD is not None
    return [
        GCLOUD,
        "compute",
        "start-iap-tunnel",
        INSTANCE,
        str(target_port),
        f"--zone={ZONE}",
        "--listen-on-stdin" if stdin_mode else "--local-host-port=localhost:0",
        f"--iap-tunnel-url-override=wss://127.0.0.1:{relay_port}",
        "--iap-tunnel-insecure-disable-websocket-cert-check",
        "--iap-tunnel-disable-connection-check",
        *os.environ.get("GCLOUD_E2E_ARGS", "").split(),  # e.g. --verbosity=debug
        f"--access-token-file={token_file}",
    ]


def write_token(workdir: Path, token: str) -> Path:
    """The file ``--access-token-file`` reads (gcloud reads it once, at start-up)."""
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "token.txt"
    token_file.write_text(token)
    return token_file


@asynccontextmanager
async def gcloud_tunnel(
    relay_port: int,
    target_port: int,
    token: str,
    workdir: Path,
    *,
    stdin_mode: bool,
) -> AsyncIterator[Gcloud]:
    """Start gcloud against the relay (see ``_tunnel_process``)."""
    token_file = write_token(workdir, token)
    argv = gcloud_argv(relay_port, target_port, token_file, stdin_mode=stdin_mode)
    async with _tunnel_process(argv, gcloud_env(workdir / "gcloud-config"), stdin_mode) as gcloud:
        yield gcloud


@asynccontextmanager
async def _tunnel_process(
    argv: list[str], env: dict[str, str], stdin_mode: bool
) -> AsyncIterator[Gcloud]:
    """Start a tunnel program (gcloud or tunnel-client); in port mode, wait for ``Listening on
    port [N].``. The process is always killed on the way out."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin_mode else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    tunnel = Gcloud(process, Output(process.stderr))
    try:
        if not stdin_mode:
            tunnel.port = await _listening_port(tunnel)
        yield tunnel
    finally:
        await tunnel.kill()


@asynccontextmanager
async def client_tunnel(
    relay_port: int, target_port: int, token: str, workdir: Path
) -> AsyncIterator[Gcloud]:
    """Our own ``tunnel-client start-tunnel`` (native subprotocol) in local-port mode, as a
    separate process like gcloud, so both are measured the same way."""
    token_file = write_token(workdir, token)
    argv = [
        sys.executable, "-m", "tunnel_client", "start-tunnel", "vm1", str(target_port),
        "--local-host-port=localhost:0", "--disable-connection-check",
        "--server", f"wss://127.0.0.1:{relay_port}",
        "--project", "p", "--zone", "z", "--access-token-file", str(token_file),
        "--ca-file", str(workdir / "relay-cert.pem"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    async with _tunnel_process(argv, env, stdin_mode=False) as client:
        yield client


async def _listening_port(gcloud: Gcloud) -> int:
    seen = b""
    async with asyncio.timeout(STEP_TIMEOUT):
        while line := await gcloud.stdout.readline():
            seen += line
            if match := LISTENING.search(line):
                return int(match.group(1))
    raise AssertionError(f"no 'Listening on port' (stdout {seen!r}); stderr:\n{gcloud.stderr.text}")


class Progress:
    """Bytes moved so far, with waits on a threshold. ``first`` and ``last``: perf_counter
    when the first and the latest bytes arrived (the steady-state rate excludes set-up and
    gcloud's close latency)."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self._changed = asyncio.Condition()

    @property
    def rate(self) -> float:
        """MB/s (10^6 bytes) between the first and the latest bytes."""
        return self.count / (self.last - self.first) / 1e6 if self.last > self.first else 0.0

    async def add(self, n: int) -> None:
        self.last = time.perf_counter()
        if not self.count:
            self.first = self.last
        async with self._changed:
            self.count += n
            self._changed.notify_all()

    async def reached(self, n: int) -> None:
        async with asyncio.timeout(STEP_TIMEOUT), self._changed:
            await self._changed.wait_for(lambda: self.count >= n)


async def read_all(reader: asyncio.StreamReader, progress: Progress | None = None) -> str:
    """Read to EOF; return the sha256 hex of everything read."""
    digest = hashlib.sha256()
    while data := await reader.read(256 * 1024):
        digest.update(data)
        if progress is not None:
            await progress.add(len(data))
    return digest.hexdigest()


async def read_exactly(reader: asyncio.StreamReader, n: int, progress: Progress) -> str:
    """Read exactly ``n`` bytes; return their sha256 hex."""
    digest = hashlib.sha256()
    while progress.count < n:
        data = await reader.read(min(256 * 1024, n - progress.count))
        if not data:
            raise AssertionError(f"EOF after {progress.count} of {n} bytes")
        digest.update(data)
        await progress.add(len(data))
    return digest.hexdigest()


class DigestSink(LoopbackServer):
    """A TCP target on 127.0.0.1:0 that reads each connection to EOF and reports
    ``(bytes, sha256 hex)`` on ``results`` (also for a connection that ends in a reset)."""

    def __init__(self) -> None:
        self.connections = 0
        self.results: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self.progress = Progress()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        digest = hashlib.sha256()
        total = 0
        try:
            while data := await reader.read(256 * 1024):
                digest.update(data)
                total += len(data)
                await self.progress.add(len(data))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            await self.results.put((total, digest.hexdigest()))

    async def result(self) -> tuple[int, str]:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await self.results.get()


def payload(total: int, seed: int = 0) -> bytes:
    """Reproducible random bytes with no period: a replay from a wrong offset cannot hash equal
    (``tests.helpers.deterministic_chunks`` repeats every 64 KiB)."""
    return random.Random(seed).randbytes(total)


class GatedSource(LoopbackServer):
    """A TCP target on 127.0.0.1:0 that sends ``data`` to each connection, but never beyond what
    the test has ``release``d (everything unless ``gated``), then closes."""

    def __init__(self, data: bytes, *, gated: bool = False) -> None:
        self.data = data
        self.allowed = 0 if gated else len(data)
        self.sent = 0
        self.connections = 0
        self._more = asyncio.Event()

    def release(self, upto: int) -> None:
        self.allowed = min(max(self.allowed, upto), len(self.data))
        self._more.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        view = memoryview(self.data)
        sent = 0
        try:
            while sent < len(view):
                if sent >= self.allowed:
                    self._more.clear()
                    await self._more.wait()
                    continue
                end = min(self.allowed, sent + 64 * 1024)
                writer.write(view[sent:end])
                sent = end
                self.sent = sent
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


# -- gcloud refreshing its own tokens from our IdP ---------------------------------------------


def authorized_user_file(workdir: Path, client_id: str, refresh_token: str) -> Path:
    """A google-auth ``authorized_user`` credential file holding a refresh token from our IdP.

    google-auth insists on a ``client_secret`` key and posts it with every refresh; an empty one
    counts as absent to oidc-provider, so a public client (auth method ``none``) works. No
    ``scopes`` key: gcloud then sends no ``scope`` on refresh (Google's scopes would be
    ``invalid_scope`` at our IdP) and gets the grant's own."""
    workdir.mkdir(parents=True, exist_ok=True)
    credential_file = workdir / "authorized-user.json"
    credential_file.write_text(
        json.dumps(
            {
                "type": "authorized_user",
                "client_id": client_id,
                "client_secret": "",
                "refresh_token": refresh_token,
            }
        )
    )
    credential_file.chmod(0o600)
    return credential_file


@asynccontextmanager
async def gcloud_refreshing_tunnel(
    relay_port: int,
    target_port: int,
    credential_file: Path,
    token_endpoint: str,
    workdir: Path,
    *,
    stdin_mode: bool,
) -> AsyncIterator[Gcloud]:
    """Like ``gcloud_tunnel``, but without ``--access-token-file`` (read once, never refreshed):
    gcloud loads ``credential_file`` (``auth/credential_file_override``) and refreshes it at
    ``token_endpoint`` (``auth/token_host``, which gcloud forces as the token URI of user
    credentials). gcloud asks for a token before every WebSocket connect and reconnect and
    refreshes when it expires within 300 s, so each (re)connect carries a freshly issued one."""
    argv = [
        arg
        for arg in gcloud_argv(relay_port, target_port, credential_file, stdin_mode=stdin_mode)
        if not arg.startswith("--access-token-file=")
    ]
    env = gcloud_env(workdir / "gcloud-config")
    env.update(
        CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE=str(credential_file),
        CLOUDSDK_AUTH_TOKEN_HOST=token_endpoint,
    )
    async with _tunnel_process(argv, env, stdin_mode) as gcloud:
        yield gcloud
