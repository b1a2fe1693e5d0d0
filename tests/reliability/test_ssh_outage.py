"""An interactive OpenSSH session survives a 15 s outage of the relay path.

ssh runs a remote read loop on a pty (``-tt``); its ProxyCommand is the tunnel client in stdin
mode, pointed at a FaultProxy in front of the relay. The proxy black-holes the path for 15 s
(current connections stall half-open, new ones are swallowed like dropped SYNs), then restores
it for new connections only: the old ones stay silently dead, as through a NAT that forgot their
mapping, so no RST tells anyone. The client's keepalive notices the dead WebSocket, reconnects
once the path is back and resumes the tunnel (the relay supersedes its own half-open
attachment): lines typed during the outage are answered, in order, after it, and so is a line
typed after it. ssh's own keepalives are off, so only the tunnel is under test.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tunnel_server.app import RunningServer

from ..e2e.sshd import Sshd, missing_tools, running_sshd
from ..faults import FaultProxy
from ..helpers import UNIT, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

OUTAGE = 15.0  # seconds: the requirement, not a scaled wait
KEEPALIVE = (2.0, 2.0)  # the client's ping interval and pong timeout (default: 20 s, 20 s)
WRAPPER = Path(__file__).with_name("keepalive_client.py")
# After the path is restored: the client's handshake that was swallowed during the outage
# completes, and the relay hands the tunnel over from its half-open attachment. Measured: 5.0 s,
# all of it the relay's graceful close of that attachment (see the xfail in test_dead_path.py);
# bounded generously for loaded machines.
RECOVERY = 15.0


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    async with running_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
async def relay(issuer: TestIssuer, sshd: Sshd, tmp_path: Path) -> AsyncIterator[RunningServer]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": sshd.port})
    async with start_relay(data) as server:
        yield server


def proxy_command(server: str, token_file: Path, ca_file: Path) -> str:
    words = [
        sys.executable,
        str(WRAPPER),
        f"--keepalive={KEEPALIVE[0]},{KEEPALIVE[1]}",
        "start-tunnel",
        "vm1",
    ]
    options = [
        "--listen-on-stdin",
        "-v",  # INFO on stderr: the resume is visible in ssh's stderr
        f"--server={server}",
        "--project=p",
        "--zone=z",
        f"--access-token-file={token_file}",
        f"--ca-file={ca_file}",
    ]

    def literal(items: list[str]) -> list[str]:
        return [shlex.quote(w).replace("%", "%%") for w in items]

    return " ".join([*literal(words), "%p", *literal(options)])


class Session:
    """ssh with piped stdin/stdout; stderr is collected in the background."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = bytearray()
        assert process.stderr is not None
        self._drain = asyncio.create_task(self._collect(process.stderr))

    async def _collect(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            self.stderr += data

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    async def line(self) -> str:
        assert self.process.stdout is not None
        raw = await self.process.stdout.readline()
        if not raw:
            raise AssertionError(f"ssh ended; stderr:\n{self.stderr.decode(errors='replace')}")
        return raw.decode().rstrip("\r\n")

    async def close(self) -> int:
        """End the remote loop with ^D (EOF on the pty) and wait for ssh to exit."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.write(b"\x04")
            self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 100 * UNIT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._drain
        assert self.process.returncode is not None
        return self.process.returncode


async def test_interactive_ssh_survives_15s_outage(
    relay: RunningServer, issuer: TestIssuer, sshd: Sshd, tmp_path: Path
) -> None:
    audit = capture_audit(relay)
    token_file = tmp_path / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(issuer.mint(lifetime=3600) + "\n", encoding="ascii")
    async with FaultProxy(relay.port) as proxy:
        command = proxy_command(
            f"wss://127.0.0.1:{proxy.port}", token_file, tmp_path / "relay-cert.pem"
        )
        argv = [
            "ssh",
            *sshd.ssh_options(),
            "-tt",
            "-e",
            "none",
            "-o",
            "ServerAliveInterval=0",
            "-o",
            "TCPKeepAlive=no",
            "-o",
            f"ProxyCommand={command}",
            "-p",
            str(sshd.port),
            f"{sshd.user}@vm1",
            'stty -echo; echo ready; while read l; do echo "got $l"; done',
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        ssh = Session(process)
        try:
            async with asyncio.timeout(600 * UNIT):
                while (await ssh.line()) != "ready":
                    pass
                ssh.send("before")
                assert await ssh.line() == "got before"
            (link,) = proxy.live

            # The outage: 15 s of black hole, with lines typed at 1 s, 6 s and 11 s into it.
            start = time.monotonic()
            proxy.black_hole()
            stalled_at = (link.forwarded("up"), link.forwarded("down"))
            typed = []
            for n, at in enumerate((1.0, 6.0, 11.0)):
                await asyncio.sleep(start + at - time.monotonic())
                typed.append(f"during-{n}")
                ssh.send(typed[-1])
            # Nothing gets through while the path is down.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(start + OUTAGE - time.monotonic()):
                    await ssh.line()
            assert (link.forwarded("up"), link.forwarded("down")) == stalled_at
            proxy.restore(stalled="keep")
            restored = time.monotonic()

            async with asyncio.timeout(RECOVERY):
                answers = [await ssh.line() for _ in typed]
            recovered = time.monotonic() - restored
            assert answers == [f"got {line}" for line in typed]
            async with asyncio.timeout(100 * UNIT):
                ssh.send("after")
                assert await ssh.line() == "got after"
        finally:
            code = await ssh.close()
    stderr = ssh.stderr.decode(errors="replace")
    print(
        f"\nssh outage: {OUTAGE:.0f}s black hole; answers {recovered:.2f}s after restore; "
        f"{proxy.connections} connections through the proxy ({proxy.resets} reset)"
    )
    assert code == 0, stderr
    assert "keepalive timeout" in stderr  # the client noticed the outage itself
    assert sshd.accepted() == 1  # one SSH session throughout: the tunnel was resumed
    async with asyncio.timeout(200 * UNIT):
        await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    closed = [r for r in audit if r["event"] == "tunnel_closed"]
    assert len(closed) == 1
    assert closed[0]["resumes"] >= 1
    assert closed[0]["close_code"] in (1000, 1001)
