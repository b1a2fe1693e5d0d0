"""The RDP path end to end, with an echo service standing in for port 3389: ``start-tunnel`` on a
local port carrying bulk data, and ``tunnel-client rdp --exec`` launching a client on the tunnel
and exiting when it exits."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..processes import FAULTHANDLER_ENV, exited

pytestmark = pytest.mark.e2e

CLIENT = [sys.executable, "-m", "tunnel_client"]
BULK = 4 * 1024 * 1024
TIMEOUT = 600 * UNIT

# A stand-in RDP client: connect to host:port, send bytes, expect them echoed, exit 0.
FAKE_RDP_CLIENT = """\
import hashlib, os, socket, sys

host, port = sys.argv[1], int(sys.argv[2])
payload = os.urandom(int(sys.argv[3]) if len(sys.argv) > 3 else 65536)
with socket.create_connection((host, port), timeout=30) as sock:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
if bytes(received) != payload:
    print(f"echo mismatch: {len(received)} of {len(payload)} bytes", file=sys.stderr)
    sys.exit(1)
print(f"fake-rdp ok {host}:{port} {hashlib.sha256(payload).hexdigest()}")
sys.exit(int(os.environ.get("FAKE_RDP_EXIT", "0")))
"""


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


@pytest.fixture
def client_args(relay: RunningServer, issuer: TestIssuer, tmp_path: Path) -> list[str]:
    token = tmp_path / "token"
    token.touch(mode=0o600)
    token.write_text(issuer.mint(lifetime=3600), encoding="ascii")
    return [
        f"--server={relay.url}",
        "--project=p",
        "--zone=z",
        f"--access-token-file={token}",
        f"--ca-file={tmp_path / 'relay-cert.pem'}",
    ]


@asynccontextmanager
async def client_process(
    args: Sequence[str], **env: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    process = await asyncio.create_subprocess_exec(
        *CLIENT,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environ, **FAULTHANDLER_ENV, **env},
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def listening_port(process: asyncio.subprocess.Process) -> int:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
    prefix = b"Listening on port ["
    assert line.startswith(prefix), line
    assert line.endswith(b"].\n"), line
    return int(line[len(prefix) : -3])


async def test_start_tunnel_carries_4mib_both_ways(
    relay: RunningServer, echo: TcpTarget, client_args: list[str]
) -> None:
    audit = capture_audit(relay)
    args = ["start-tunnel", "vm1", str(echo.port), "--local-host-port=localhost:0", *client_args]
    async with client_process(args) as process:
        port = await listening_port(process)
        payload = os.urandom(BULK)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            for offset in range(0, BULK, 256 * 1024):
                writer.write(payload[offset : offset + 256 * 1024])
                await writer.drain()
            writer.write_eof()

        async def receive() -> bytes:
            received = bytearray()
            while chunk := await reader.read(256 * 1024):
                received += chunk
            return bytes(received)

        async with asyncio.timeout(TIMEOUT):
            _, echoed = await asyncio.gather(send(), receive())
        writer.close()
        assert len(echoed) == BULK
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()

        # Two tunnels: the connection check (no data) and ours.
        async with asyncio.timeout(200 * UNIT):
            await relay.relay.wait_until(
                lambda: sum(r["event"] == "tunnel_closed" for r in audit) == 2
            )
        process.send_signal(signal.SIGINT)
        out, err = await exited(process, TIMEOUT)
    assert out == b""
    stderr = err.decode()
    assert "Closed [1] local connection(s)." in stderr
    assert "Traceback" not in stderr
    check, data = (r for r in audit if r["event"] == "decision")
    closed = {r["tunnel_id"]: r for r in audit if r["event"] == "tunnel_closed"}
    assert closed[check["tunnel_id"]]["bytes_from_client"] == 0
    assert closed[data["tunnel_id"]]["bytes_from_client"] == BULK
    assert closed[data["tunnel_id"]]["bytes_to_client"] == BULK
    assert closed[data["tunnel_id"]]["close_code"] == 1000


def fake_client(tmp_path: Path, *extra: str) -> str:
    script = tmp_path / "fake_rdp.py"
    script.write_text(FAKE_RDP_CLIENT, encoding="utf-8")
    return shlex.join([sys.executable, str(script)]) + " {host} {port} " + " ".join(extra)


async def test_rdp_exec_runs_client_on_the_tunnel(
    relay: RunningServer, echo: TcpTarget, client_args: list[str], tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    args = ["rdp", "vm1", f"--port={echo.port}", "--exec", fake_client(tmp_path, str(BULK))]
    async with client_process([*args, *client_args]) as process:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    lines = out.decode().splitlines()
    port = int(lines[0].removeprefix("Listening on port [").removesuffix("]."))
    assert lines[0] == f"Listening on port [{port}]."
    assert lines[1].startswith(f"fake-rdp ok 127.0.0.1:{port} ")  # {host} and {port} replaced
    assert "Testing if tunnel connection works." in stderr
    assert f"Starting {sys.executable}." in stderr
    assert "Closed [1] local connection(s)." in stderr
    assert "Traceback" not in stderr
    assert echo.connections == 2  # connection check + the client
    decisions = [r for r in audit if r["event"] == "decision"]
    assert [r["decision"] for r in decisions] == ["allow", "allow"]
    assert all(r["port"] == echo.port for r in decisions)


async def test_rdp_exit_status_of_the_client_is_returned(
    relay: RunningServer, echo: TcpTarget, client_args: list[str], tmp_path: Path
) -> None:
    args = ["rdp", "vm1", f"--port={echo.port}", "--exec", fake_client(tmp_path)]
    async with client_process([*args, *client_args], FAKE_RDP_EXIT="3") as process:
        _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 3, err.decode()


async def test_rdp_exec_missing_program(
    relay: RunningServer, echo: TcpTarget, client_args: list[str], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-rdp-client"
    args = ["rdp", "vm1", f"--port={echo.port}", "--exec", f"{missing} /v:{{host}}:{{port}}"]
    async with client_process([*args, *client_args]) as process:
        _, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    stderr = err.decode()
    assert process.returncode not in (0, None)
    assert f"ERROR: cannot run {missing}: No such file or directory" in stderr
    assert "Closed [0] local connection(s)." in stderr
    assert "Traceback" not in stderr


async def test_rdp_denied_user_never_starts_the_client(
    relay: RunningServer,
    issuer: TestIssuer,
    echo: TcpTarget,
    client_args: list[str],
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text(issuer.mint(sub="mallory", email="m@example.com"), encoding="ascii")
    marker = tmp_path / "started"
    exec_template = shlex.join([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    args = ["rdp", "vm1", f"--port={echo.port}", "--exec", exec_template]
    async with client_process([*args, *client_args]) as process:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode not in (0, None)
    assert out == b""
    assert "Error while connecting [4033: 'not authorized']." in err.decode()
    assert not marker.exists()
