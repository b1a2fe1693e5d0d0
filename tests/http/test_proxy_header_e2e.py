"""``read_proxy_header`` behind a real HAProxy (Debian package) sending PROXY v2 (with CRC32C
and a unique id) and v1: a server using it sees the true client address, not HAProxy's; and
the example TCP server of docs/upstream-identity.md, extracted and run, greets a caller whose
identity the relay signed and refuses a forged one."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from tunnel_server.web.assertion import AssertionSigner
from tunnel_upstream import ProxyHeaderError, ProxyInfo, read_proxy_header

from ..helpers import UNIT
from ..ports import free_port
from ..processes import started
from .proxyv2 import identity_tlvs, v2

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
CLIENT = "127.0.0.2"  # the client's own loopback address: not the one HAProxy connects from

CONFIG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend v2
    bind 127.0.0.1:{front_v2}
    unique-id-format client-%ci:%cp
    default_backend v2
frontend v1
    bind 127.0.0.1:{front_v1}
    default_backend v1
backend v2
    server app 127.0.0.1:{app} send-proxy-v2 proxy-v2-options crc32c,unique-id
backend v1
    server app 127.0.0.1:{app} send-proxy
"""


@asynccontextmanager
async def haproxy(config: Path) -> AsyncIterator[None]:
    assert HAPROXY is not None
    log = (config.parent / "haproxy.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        log.close()


async def connect_from(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to 127.0.0.1:port from ``host``, retrying (bounded) while HAProxy starts."""
    for _ in range(200):
        try:
            return await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
        except ConnectionRefusedError:
            await asyncio.sleep(UNIT)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.e2e
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (install-system-deps.sh)")
async def test_true_client_address_behind_haproxy(tmp_path: Path) -> None:
    seen: list[ProxyInfo | ProxyHeaderError] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            info = await read_proxy_header(reader, header_timeout=100 * UNIT)
        except ProxyHeaderError as exc:
            seen.append(exc)
        else:
            seen.append(info)
            writer.write(await reader.readexactly(4))  # the app's own bytes, intact
            assert info.source is not None
            writer.write(f" {info.source[0]}:{info.source[1]}".encode())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    app = server.sockets[0].getsockname()[1]
    front_v2, front_v1 = free_port(), free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(front_v2=front_v2, front_v1=front_v1, app=app))
    try:
        async with haproxy(config):
            for front in (front_v2, front_v1):
                reader, writer = await connect_from(CLIENT, front)
                port = writer.get_extra_info("sockname")[1]
                writer.write(b"ping")
                assert await reader.read() == f"ping {CLIENT}:{port}".encode()
                writer.close()
                await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    with_v2, with_v1 = seen
    assert isinstance(with_v2, ProxyInfo)
    assert with_v2.source is not None
    assert isinstance(with_v1, ProxyInfo)
    assert (with_v2.version, with_v2.transport, with_v2.destination) == (
        2, "tcp4", ("127.0.0.1", front_v2)
    )  # fmt: skip
    assert 0x03 in with_v2.tlvs  # HAProxy's CRC32C, verified by the parser
    assert with_v2.tlvs[0x05].decode() == f"client-{CLIENT}:{with_v2.source[1]}"  # unique id
    assert (with_v1.version, with_v1.destination) == (1, ("127.0.0.1", front_v1))


def example_server(tmp_path: Path, relay: str) -> Path:
    doc = (ROOT / "docs" / "upstream-identity.md").read_text()
    match = re.search(r"<!-- example: tcp-server -->\n```python\n(.*?)```", doc, re.S)
    assert match is not None
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 26
    assert 'RELAY = "https://relay.example.com:8445"' in code
    path = tmp_path / "server.py"
    path.write_text(code.replace("https://relay.example.com:8445", relay))
    return path


@pytest.mark.e2e
async def test_docs_example_server(tmp_path: Path) -> None:
    """The documented server, as a user would run it: the relay's JWKS fetched over HTTP."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    relay = f"http://127.0.0.1:{sock.getsockname()[1]}"
    signer = AssertionSigner(relay)

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(signer.jwks())

    app = web.Application()
    app.router.add_get("/.well-known/tunnel/jwks.json", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    port = free_port()
    argv = [sys.executable, str(example_server(tmp_path, relay)), str(port)]
    try:
        async with started(argv, r"(listening)", stdout=True, env={"PYTHONPATH": str(ROOT)}):
            good = v2(("198.51.100.9", 40000), tlvs=identity_tlvs(signer, audience="tcp:db-1"))
            forged = v2(tlvs=identity_tlvs(AssertionSigner(relay), audience="tcp:db-1"))
            answers = []
            for header in (good, forged, good):  # the last one is a replay
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(header)
                answers.append(await reader.read())
                writer.close()
                await writer.wait_closed()
    finally:
        await runner.cleanup()
        sock.close()
    assert answers == [b"hello alice@example.com at 198.51.100.9\n", b"", b""]
