"""Real OpenSSH through the relay: ``ssh -o ProxyCommand="tunnel-client start-tunnel ...
--listen-on-stdin"`` and the ``tunnel-client ssh`` wrapper, against a real sshd on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shlex
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tunnel_server.app import RunningServer

from ..helpers import UNIT, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from .sshd import Sshd, missing_tools, running_sshd

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

CLIENT = [sys.executable, "-m", "tunnel_client"]
BIG = 8 * 1024 * 1024
# One ssh run: a new Python client process, TLS, the tunnel, the SSH handshake.
RUN_TIMEOUT = 600 * UNIT


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    def check(self) -> Result:
        assert self.returncode == 0, (
            f"exit {self.returncode}\nstdout: {self.stdout[-2000:]!r}\n"
            f"stderr: {self.stderr.decode(errors='replace')}"
        )
        return self


async def run(argv: Sequence[str], stdin: bytes = b"", limit: float = RUN_TIMEOUT) -> Result:
    """Run a program without blocking the event loop (the relay serves in this loop), for at
    most ``limit`` seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), limit)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"{argv[0]} timed out after {limit}s; stderr:\n{err.decode(errors='replace')}")
    assert process.returncode is not None
    return Result(process.returncode, out, err)


@dataclass
class Env:
    relay: RunningServer
    sshd: Sshd
    token_file: Path
    ca_file: Path
    audit: list[dict[str, Any]]

    def tunnel_options(self) -> list[str]:
        return [
            f"--server={self.relay.url}",
            "--project=p",
            "--zone=z",
            f"--access-token-file={self.token_file}",
            f"--ca-file={self.ca_file}",
        ]

    def proxy_command(self) -> str:
        """``<python> -m tunnel_client start-tunnel vm1 %p --listen-on-stdin ...``, each literal
        word shell-quoted and with ``%`` doubled (ssh expands %-tokens first)."""

        def literal(*words: str) -> list[str]:
            return [shlex.quote(w).replace("%", "%%") for w in words]

        return " ".join(
            [
                *literal(*CLIENT, "start-tunnel", "vm1"),
                "%p",
                "--listen-on-stdin",
                *literal(*self.tunnel_options()),
            ]
        )

    def ssh(self, *remote: str) -> list[str]:
        """Plain OpenSSH with our ProxyCommand; ssh resolves nothing: the relay maps vm1."""
        return [
            "ssh",
            *self.sshd.ssh_options(),
            "-o",
            f"ProxyCommand={self.proxy_command()}",
            "-p",
            str(self.sshd.port),
            f"{self.sshd.user}@vm1",
            *remote,
        ]

    def closed(self) -> list[dict[str, Any]]:
        return [r for r in self.audit if r["event"] == "tunnel_closed"]

    async def wait_closed(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` tunnel_closed records (the relay may log them a moment after ssh
        exits)."""
        async with asyncio.timeout(200 * UNIT):
            await self.relay.relay.wait_until(lambda: len(self.closed()) >= count)
        return self.closed()


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    async with running_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
async def env(issuer: TestIssuer, sshd: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    token_file = tmp_path / "token"
    token_file.touch(mode=0o600)
    token_file.write_text(issuer.mint(lifetime=3600) + "\n", encoding="ascii")
    assert token_file.stat().st_mode & 0o777 == 0o600
    data = relay_config_data(issuer, tmp_path, instances={"vm1": sshd.port})
    async with start_relay(data) as relay:
        audit = capture_audit(relay)
        yield Env(relay, sshd, token_file, tmp_path / "relay-cert.pem", audit)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: Path) -> bytes:
    return path.read_bytes()


async def test_ssh_proxycommand_command_and_8mib_both_ways(env: Env, tmp_path: Path) -> None:
    result = (await run(env.ssh("echo hi; uname"))).check()
    assert result.stdout.decode().splitlines() == ["hi", os.uname().sysname]
    assert env.sshd.accepted() == 1

    payload = os.urandom(BIG)
    remote = tmp_path / "remote.bin"
    (await run(env.ssh(f"cat > {shlex.quote(str(remote))}"), stdin=payload)).check()
    assert sha256(read(remote)) == sha256(payload)

    back = (await run(env.ssh(f"cat {shlex.quote(str(remote))}"))).check()
    assert len(back.stdout) == BIG
    assert sha256(back.stdout) == sha256(payload)

    # scp (SFTP protocol) through the same ProxyCommand.
    copied = tmp_path / "copied.bin"
    scp = [
        "scp",
        "-q",
        *env.sshd.ssh_options(),
        "-o",
        f"ProxyCommand={env.proxy_command()}",
        "-P",
        str(env.sshd.port),
        f"{env.sshd.user}@vm1:{remote}",
        str(copied),
    ]
    (await run(scp)).check()
    assert sha256(read(copied)) == sha256(payload)
    assert env.sshd.accepted() == 4

    # The relay audited every tunnel: allowed, to vm1's port 22 stand-in, with byte counts.
    closed = await env.wait_closed(4)
    decisions = [r for r in env.audit if r["event"] == "decision"]
    assert len(decisions) == 4
    for decision in decisions:
        assert decision["decision"] == "allow"
        assert decision["principal"] == "user:alice@example.com"
        assert decision["resource"] == "instance:p/z/vm1"
        assert decision["port"] == env.sshd.port
    by_id = {r["tunnel_id"]: r for r in closed}
    assert sorted(by_id) == sorted(d["tunnel_id"] for d in decisions)
    for record in closed:
        assert record["principal"] == "user:alice@example.com"
        assert record["port"] == env.sshd.port
        assert record["bytes_from_client"] > 0
        assert record["bytes_to_client"] > 0
        # ssh hangs up its ProxyCommand on exit: the client closes the tunnel (1001) rather than
        # leaving it parked on the relay for the resume window.
        assert record["close_code"] in (1000, 1001)
        assert record["resumes"] == 0
    upload, download = (by_id[d["tunnel_id"]] for d in decisions[1:3])
    assert upload["bytes_from_client"] > BIG
    assert upload["bytes_to_client"] < BIG // 8
    assert download["bytes_to_client"] > BIG
    assert download["bytes_from_client"] < BIG // 8


async def test_ssh_wrapper(env: Env) -> None:
    argv = [
        *CLIENT,
        "ssh",
        "vm1",
        f"--port={env.sshd.port}",
        *env.tunnel_options(),
        "--",
        *env.sshd.ssh_options(),
        "-l",
        env.sshd.user,
        "cat /etc/hostname",
    ]
    result = (await run(argv)).check()
    assert result.stdout == read(Path("/etc/hostname"))
    assert env.sshd.accepted() == 1

    closed = await env.wait_closed(1)
    decision = next(r for r in env.audit if r["event"] == "decision")
    assert decision["decision"] == "allow"
    assert decision["port"] == env.sshd.port
    assert closed[0]["tunnel_id"] == decision["tunnel_id"]
    assert closed[0]["bytes_from_client"] > 0
    assert closed[0]["bytes_to_client"] > 0


async def test_ssh_wrapper_user_option_and_stdin(env: Env, tmp_path: Path) -> None:
    """``--user`` builds user@vm1; stdin reaches the remote command through the wrapper."""
    payload = os.urandom(BIG)
    argv = [
        *CLIENT,
        "ssh",
        "vm1",
        f"--user={env.sshd.user}",
        f"--port={env.sshd.port}",
        *env.tunnel_options(),
        "--",
        *env.sshd.ssh_options(),
        "sha256sum",
    ]
    result = (await run(argv, stdin=payload)).check()
    assert result.stdout.split()[0].decode() == sha256(payload)
    closed = await env.wait_closed(1)
    assert closed[0]["bytes_from_client"] > BIG


async def test_denied_user_gets_4033_and_ssh_fails(env: Env, issuer: TestIssuer) -> None:
    env.token_file.write_text(issuer.mint(sub="mallory", email="mallory@example.com"))
    result = await run(env.ssh("echo hi"))
    assert result.returncode == 255
    assert result.stdout == b""
    assert "4033" in result.stderr.decode()
    assert env.sshd.accepted() == 0
    deny = [r for r in env.audit if r["event"] == "decision"]
    assert [r["decision"] for r in deny] == ["deny"]
