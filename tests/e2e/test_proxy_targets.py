"""Destinations with ``proxy_protocol: v2``, end to end with real programs: gcloud and
tunnel-client carry bytes intact to a target that reads the relay's header and its signed
identity; nginx (stream module, ``listen ... proxy_protocol``) and HAProxy (``accept-proxy``) in
front of an echo log the client's real address, not the relay's."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tunnel_protocol import NATIVE_SUBPROTOCOL
from tunnel_protocol.proxyheader import TLV_ASSERTION, TLV_TUNNEL_ID
from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from ..proxied import ProxiedTarget
from ..rawclient import RawTunnelClient
from .gcloud import GCLOUD, STEP_TIMEOUT, client_tunnel, gcloud_tunnel

pytestmark = pytest.mark.e2e

CLIENT = "127.0.0.6"  # where the client connects to the relay from (the relay dials from .1)
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": 0, "vm2": 0})
    data["inventory"]["instances"][0]["proxy_protocol"] = {"audience": "tcp:vm1"}
    # nginx 1.22 (Debian 12) reads PROXY headers of at most 107 bytes: no identity for it.
    data["inventory"]["instances"][1]["proxy_protocol"] = {"identity": False}
    data["http"] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "issuer_url": "http://relay.example",
        "routes": [{"name": "app", "host": "app.localhost", "upstream": "http://127.0.0.1:9"}],
    }
    async with start_relay(data) as server:
        yield server


def _identity(header: Any, audit: list[dict[str, Any]]) -> None:
    """The header names the tunnel the relay audited, and carries an assertion."""
    opened = [r["tunnel_id"] for r in audit if r["event"] == "decision" and "tunnel_id" in r]
    assert header.tlvs[TLV_TUNNEL_ID].decode() in opened
    assert header.tlvs[TLV_ASSERTION].count(b".") == 2  # a compact JWS (verified in tests/server)


@pytest.mark.skipif(GCLOUD is None, reason="gcloud (google-cloud-cli) is not installed")
async def test_gcloud_through_a_proxy_protocol_destination(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    target = await ProxiedTarget("echo").start()
    audit = capture_audit(relay)
    try:
        async with gcloud_tunnel(
            relay.port, target.port, issuer.mint(), tmp_path, stdin_mode=True
        ) as gcloud:
            for message in (b"x", b"hello " * 1000, bytes(range(256)) * 60):
                gcloud.stdin.write(message)
                async with asyncio.timeout(STEP_TIMEOUT):
                    assert await gcloud.stdout.readexactly(len(message)) == message
            gcloud.stdin.close()
            assert await gcloud.wait_exit() == 0, gcloud.stderr.text
    finally:
        await target.stop()
    [header] = target.headers
    _identity(header, audit)


async def test_tunnel_client_through_a_proxy_protocol_destination(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    target = await ProxiedTarget("echo").start()
    audit = capture_audit(relay)
    try:
        async with client_tunnel(relay.port, target.port, issuer.mint(), tmp_path) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            message = b"through tunnel-client " * 500
            writer.write(message)
            async with asyncio.timeout(STEP_TIMEOUT):
                assert await reader.readexactly(len(message)) == message
            writer.close()
            await writer.wait_closed()
    finally:
        await target.stop()
    [header] = target.headers
    _identity(header, audit)


async def _through_relay(
    relay: RunningServer, issuer: TestIssuer, port: int, tmp_path: Path, instance: str = "vm1"
) -> None:
    """A native tunnel from CLIENT to ``port`` that carries 5 bytes each way, then ends with a
    close (not a drop, which would keep the target connection for a resume)."""
    path = f"/v4/connect?project=p&zone=z&instance={instance}&interface=nic0&port={port}"
    context = ssl.create_default_context(cafile=str(tmp_path / "relay-cert.pem"))
    client = RawTunnelClient(relay.url, path, issuer.mint(), NATIVE_SUBPROTOCOL,
                             ssl_context=context, local_address=CLIENT)  # fmt: skip
    try:
        async with asyncio.timeout(100 * UNIT):
            await client.open()
            client.send(b"12345")
            while client.result.received < 5:
                assert await client._read_once(), "closed before the echo"
            await client.burst(b"!")
    finally:
        await client.close()


async def _log_line(path: Path, needle: str) -> str:
    """The log line with ``needle``: nginx and HAProxy write a TCP session's line when it ends,
    shortly after the relay closed it (polled, bounded)."""
    async with asyncio.timeout(100 * UNIT):
        while True:
            text = await asyncio.to_thread(_read, path)
            for line in text.splitlines():
                if needle in line:
                    return line
            await asyncio.sleep(UNIT)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@asynccontextmanager
async def _process(argv: list[str], log: Path) -> AsyncIterator[None]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            if process.returncode is None:
                process.terminate()
                await process.wait()


async def _listening(port: int) -> None:
    async with asyncio.timeout(100 * UNIT):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(UNIT)
                continue
            writer.close()
            return


@pytest.mark.skipif(not STREAM_MODULE.exists(), reason="libnginx-mod-stream is not installed")
async def test_nginx_stream_logs_the_client_address(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"load_module {STREAM_MODULE};\ndaemon off;\nmaster_process off;\n"
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/nginx-error.log info;\n"
        "events { worker_connections 64; }\n"
        "stream {\n  log_format pp 'client=$proxy_protocol_addr peer=$remote_addr';\n"
        f"  server {{ listen 127.0.0.1:{port} proxy_protocol; "
        f"access_log {tmp_path}/nginx-access.log pp; proxy_pass 127.0.0.1:{echo.port}; }}\n}}\n"
    )
    async with _process([NGINX, "-c", str(conf), "-e", str(tmp_path / "nginx-error.log")],
                        tmp_path / "nginx.out"):  # fmt: skip
        await _listening(port)
        await _through_relay(relay, issuer, port, tmp_path, instance="vm2")
        line = await _log_line(tmp_path / "nginx-access.log", f"client={CLIENT}")
    assert "peer=127.0.0.1" in line  # the relay's own address is the TCP peer


async def test_haproxy_accept_proxy_logs_the_client_address(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    port = free_port()
    conf = tmp_path / "haproxy.cfg"
    conf.write_text(
        "global\n  log stdout format raw local0\n"
        "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n"
        "  timeout server 30s\n"
        f"frontend f\n  bind 127.0.0.1:{port} accept-proxy\n"
        '  log-format "client=%ci backend=%b"\n  default_backend b\n'
        f"backend b\n  server echo 127.0.0.1:{echo.port}\n"
    )
    log = tmp_path / "haproxy.log"
    async with _process([HAPROXY, "-db", "-f", str(conf)], log):
        await _listening(port)
        await _through_relay(relay, issuer, port, tmp_path)
        line = await _log_line(log, f"client={CLIENT}")
    assert "backend=b" in line
