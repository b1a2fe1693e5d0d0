"""deploy/haproxy/haproxy.cfg: `haproxy -c`, the settings long-lived tunnels depend on, and (e2e)
the real file in front of real relays on loopback: TLS passes through, the relays see the
client's address (PROXY v2), round robin reaches every node, a dead node and a draining node
(/readyz 503) are taken out by the health check, and a tunnel already open on the draining node
is not cut."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.app import RunningServer

from ..helpers import capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from .files import HAPROXY_CFG, haproxy_seconds, haproxy_sections, haproxy_servers

CLIENT = "127.0.0.5"  # where the test's clients connect from (HAProxy itself: 127.0.0.1)
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None,
    reason="haproxy is not installed (Debian package haproxy; scripts/install-system-deps.sh)",
)


def sections() -> dict[tuple[str, str], list[str]]:
    return haproxy_sections(HAPROXY_CFG.read_text())


@needs_haproxy
def test_haproxy_accepts_the_config() -> None:
    assert HAPROXY is not None
    result = subprocess.run(
        [HAPROXY, "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The only warnings allowed: relay names that do not resolve on this machine (they do in
    # compose; the servers wait for DNS thanks to init-addr none).
    warnings = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "WARNING" in line or "ALERT" in line
    ]
    unexpected = [w for w in warnings if "could not resolve address" not in w]
    assert not unexpected, "\n".join(unexpected)


def test_tunnels_are_long_lived_and_checked_on_readyz() -> None:
    s = sections()
    defaults = s[("defaults", "")]
    assert "mode tcp" in defaults, "TLS passthrough"
    timeouts = {line.split()[1]: line.split()[2] for line in defaults if line.startswith("timeout")}
    assert haproxy_seconds(timeouts["tunnel"]) >= 3600, "WebSocket tunnels last for hours"
    backend = s[("backend", "relays")]
    assert "balance roundrobin" in backend, "no stickiness: resumes are forwarded by the relays"
    assert "option httpchk" in backend
    (send,) = [line for line in backend if line.startswith("http-check send")]
    # GET /readyz as a complete HTTP/1.1 request.
    assert re.search(r"meth GET uri /readyz ver HTTP/1\.1 hdr Host \S+", send), send
    assert "http-check expect status 200" in backend
    (default_server,) = [line for line in backend if line.startswith("default-server")]
    words = default_server.split()
    assert {"check", "check-ssl"} <= set(words), "the relay port speaks TLS"
    assert "ssl" not in words, "passthrough: HAProxy must not open TLS to the relays itself"
    # The relays learn the client's address (proxy_protocol: true on their side).
    assert {"send-proxy-v2", "check-send-proxy"} <= set(words)
    # A draining node keeps its tunnels until drain_grace ends.
    assert "shutdown-sessions" not in HAPROXY_CFG.read_text().replace(
        "No `on-marked-down shutdown-sessions`", ""
    )
    assert sorted(haproxy_servers(backend)) == ["relay-1", "relay-2", "relay-3"]


# ---- e2e: the real config in front of real relays -----------------------------------------------


def render(relay_ports: dict[str, int], front: int, stats: int) -> str:
    """haproxy.cfg with only addresses changed: loopback ports instead of relay-N:8443 and
    the public 8443, so that the checks, timeouts and balancing under test are the shipped ones."""
    text = HAPROXY_CFG.read_text()
    text, n = re.subn(r"(?m)^(\s*bind) :8443$", rf"\1 127.0.0.1:{front}", text)
    assert n == 1
    text, n = re.subn(r"(?m)^(\s*bind) 127\.0\.0\.1:8404$", rf"\1 127.0.0.1:{stats}", text)
    assert n == 1
    for name, port in relay_ports.items():
        text, n = re.subn(rf"(?m)^(\s*server {name}) {name}:8443$", rf"\1 127.0.0.1:{port}", text)
        assert n == 1, name
    return text


def _stats(port: int) -> dict[str, dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=2) as response:
        text = response.read().decode().lstrip("# ")
    return {
        row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "relays"
    }


async def wait_for_state(port: int, want: dict[str, tuple[str, str]], seconds: float = 15) -> None:
    """Until every server NAME has (status prefix, check_status), e.g. ("UP", "L7OK")."""
    rows: dict[str, dict[str, str]] = {}
    async with asyncio.timeout(seconds):
        while True:
            try:
                rows = await asyncio.to_thread(_stats, port)
            except OSError:
                rows = {}
            if rows and all(
                rows[name]["status"].startswith(status) and rows[name]["check_status"] == check
                for name, (status, check) in want.items()
            ):
                return
            await asyncio.sleep(0.2)


class Connection:
    """One client TLS connection through HAProxy: which relay answered (its certificate)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        ssl_object = writer.get_extra_info("ssl_object")
        self.cert: bytes = ssl_object.getpeercert(binary_form=True)

    @classmethod
    async def open(cls, port: int, source: str = CLIENT) -> Connection:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # two self-signed relays; identified by cert below
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost", local_addr=(source, 0)
        )
        return cls(reader, writer)

    async def get(self, path: str) -> str:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await self.writer.drain()
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
        return head.split(b"\r\n", 1)[0].decode()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


@asynccontextmanager
async def haproxy(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    assert HAPROXY is not None
    log = (config.parent / "haproxy.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        HAPROXY, "-db", "-f", str(config), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        log.close()


def behind_haproxy(data: dict[str, Any]) -> dict[str, Any]:
    """A relay config as deploy/relay.cluster.example.yaml has it: HAProxy (connecting from
    127.0.0.1 here) sends PROXY v2 headers and is the only peer trusted to."""
    return {**data, "proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}


def cert_der(data: dict[str, object]) -> bytes:
    tls = data["tls"]
    assert isinstance(tls, dict)
    return ssl.PEM_cert_to_DER_cert(Path(tls["cert_file"]).read_text())


@pytest.mark.e2e
@needs_haproxy
async def test_haproxy_in_front_of_relays(issuer: TestIssuer, tmp_path: Path) -> None:
    front, stats = free_port(), free_port()
    dead = free_port()  # relay-3: a node that is down (nothing listens)
    async with AsyncExitStack() as stack:
        relays: dict[str, RunningServer] = {}
        certs: dict[bytes, str] = {}
        for name in ("relay-1", "relay-2"):
            directory = tmp_path / name
            directory.mkdir()
            data = behind_haproxy(relay_config_data(issuer, directory))
            relays[name] = await stack.enter_async_context(start_relay(data))
            certs[cert_der(data)] = name
        config = tmp_path / "haproxy.cfg"
        ports = {name: srv.port for name, srv in relays.items()} | {"relay-3": dead}
        config.write_text(render(ports, front, stats))
        await stack.enter_async_context(haproxy(config))

        # Health checks: TLS + GET /readyz pass on the live relays; the dead one is down.
        await wait_for_state(
            stats,
            {"relay-1": ("UP", "L7OK"), "relay-2": ("UP", "L7OK"), "relay-3": ("DOWN", "L4CON")},
        )

        # Passthrough and round robin: the clients see the relays' own certificates, both.
        seen = []
        for _ in range(4):
            conn = await Connection.open(front)
            seen.append(certs[conn.cert])
            assert await conn.get("/healthz") == "HTTP/1.1 200 OK"
            await conn.close()
        assert sorted(set(seen)) == ["relay-1", "relay-2"], seen

        # The relays see the client's own address (PROXY v2), not HAProxy's: a connect without
        # a token is refused, and the audit record names the client.
        audits = {name: capture_audit(relay) for name, relay in relays.items()}
        conn = await Connection.open(front)
        assert (await conn.get("/v4/connect?project=p&zone=z&instance=vm1&port=22")).startswith(
            "HTTP/1.1 4"
        )
        await conn.close()
        [record] = [r for name in audits for r in audits[name] if r["event"] == "handshake"]
        assert record["source_ip"] == CLIENT

        # A connection open on a node that starts draining...
        held = await Connection.open(front)
        draining = certs[held.cert]
        other = "relay-2" if draining == "relay-1" else "relay-1"
        relays[draining].relay.draining = True  # what SIGTERM does first: /readyz -> 503
        await wait_for_state(stats, {draining: ("DOWN", "L7STS"), other: ("UP", "L7OK")})
        # ...is not cut by HAProxy (the relay's drain decides when it ends)...
        assert await held.get("/healthz") == "HTTP/1.1 200 OK"
        await held.close()
        # ...and new clients all go to the node still ready.
        for _ in range(3):
            conn = await Connection.open(front)
            assert certs[conn.cert] == other
            await conn.close()
