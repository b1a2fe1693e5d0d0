"""The library API end to end against a real relay on loopback: each form carries a
sha256-checked transfer to a real TCP target; asyncssh and paramiko run a command on a real
sshd through it; typed errors; and every example of docs/library.md, executed as written."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tunnel_client
from tunnel_server.app import RunningServer

from ..e2e import sshd
from ..helpers import (
    UNIT,
    TcpTarget,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"
SIZE = 2 * 1024 * 1024 + 123
LIMIT = 400 * UNIT


@dataclass
class Env:
    relay: RunningServer
    issuer: TestIssuer
    tmp: Path
    token: str

    @property
    def ca_file(self) -> Path:
        return self.tmp / "relay-cert.pem"

    def client(self, **kw: object) -> tunnel_client.Client:
        settings: dict[str, object] = {
            "server": self.relay.url, "project": "p", "zone": "z", "ca_file": self.ca_file,
            "token": self.token,
        }  # fmt: skip
        settings.update(kw)
        return tunnel_client.Client(**settings)  # type: ignore[arg-type]


@pytest.fixture
async def env(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[Env]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": 0})
    async with start_relay(data) as relay:
        yield Env(relay, issuer, tmp_path, issuer.mint())


async def send_and_digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Send SIZE deterministic bytes to a sink target, half-close, read its sha256 hex."""
    for chunk in deterministic_chunks(SIZE):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    return (await asyncio.wait_for(reader.read(), LIMIT)).decode()


def sync_send_and_digest(sock: socket.socket) -> str:
    sock.settimeout(LIMIT)
    for chunk in deterministic_chunks(SIZE):
        sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    received = b""
    while data := sock.recv(65536):
        received += data
    return received.decode()


async def test_connect_carries_bytes(env: Env, sink: TcpTarget) -> None:
    client = env.client()
    async with client.connect(client.instance("vm1", sink.port)) as (reader, writer):
        assert await send_and_digest(reader, writer) == deterministic_digest(SIZE)
    assert sink.connections == 1


async def test_module_level_connect_reads_the_environment(
    env: Env, sink: TcpTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (
        ("TUNNEL_SERVER", env.relay.url),
        ("TUNNEL_CA_FILE", str(env.ca_file)),
        ("TUNNEL_ACCESS_TOKEN", env.token),
        ("TUNNEL_CLIENT_HOME", str(env.tmp)),
    ):
        monkeypatch.setenv(name, value)  # fmt: skip
    target = tunnel_client.InstanceTarget("p", "z", "vm1", "nic0", sink.port)
    async with tunnel_client.connect(target) as (reader, writer):
        assert await send_and_digest(reader, writer) == deterministic_digest(SIZE)


async def test_forward_async_carries_parallel_connections(env: Env, sink: TcpTarget) -> None:
    client = env.client()
    async with client.forward(client.instance("vm1", sink.port)) as (host, port):
        assert host == "127.0.0.1"

        async def one() -> str:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                return await send_and_digest(reader, writer)
            finally:
                writer.close()

        digests = await asyncio.gather(one(), one(), one())
    assert list(digests) == [deterministic_digest(SIZE)] * 3
    assert sink.connections == 3


async def test_forward_sync_and_open_socket(env: Env, sink: TcpTarget) -> None:
    client = env.client()
    target = client.instance("vm1", sink.port)

    def sync_forms() -> list[str]:
        with client.forward(target) as (host, port):
            with socket.create_connection((host, port)) as sock:
                first = sync_send_and_digest(sock)
        with client.open_socket(target) as sock:
            second = sync_send_and_digest(sock)
        return [first, second]

    assert await asyncio.to_thread(sync_forms) == [deterministic_digest(SIZE)] * 2
    assert sink.connections == 2


async def test_token_callable_is_called_for_each_tunnel(env: Env, echo: TcpTarget) -> None:
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        return env.token

    client = env.client(token=token)
    for _ in range(2):
        async with client.connect(client.instance("vm1", echo.port)) as (reader, writer):
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), LIMIT) == b"x"
    assert calls == 2


async def test_denial_is_a_typed_error(env: Env, echo: TcpTarget) -> None:
    client = env.client(token=env.issuer.mint(sub="mallory", email="mallory@example.com"))
    with pytest.raises(tunnel_client.AccessDenied) as info:
        async with client.connect(client.instance("vm1", echo.port)):
            pytest.fail("the block must not run when the tunnel is denied")
    assert info.value.code == 4033
    assert info.value.category == "policy"
    assert info.value.reason == f"policy; ref={info.value.reference}"
    assert "Access denied for mallory@example.com" in str(info.value)
    assert echo.connections == 0
    with pytest.raises(tunnel_client.AccessDenied):  # the sync forms raise the same
        await asyncio.to_thread(client.open_socket, client.instance("vm1", echo.port))


async def test_unreachable_relay_is_a_connection_error(env: Env) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = env.client(server=f"wss://127.0.0.1:{port}")
    with pytest.raises(tunnel_client.ConnectionFailed) as info:
        async with client.connect(client.instance("vm1", 22)):
            pass
    assert info.value.kind == "refused"


def test_client_from_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_CLIENT_HOME", str(tmp_path))
    for name in ("TUNNEL_SERVER", "TUNNEL_ZONE", "TUNNEL_PROFILE", "TUNNEL_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "config.yaml").write_text(
        "profiles:\n  work:\n    server: wss://relay.example\n    zone: z1\n    project: p1\n"
    )
    client = tunnel_client.Client.from_profile("work")
    assert (client.server, client.zone, client.project) == ("wss://relay.example", "z1", "p1")
    monkeypatch.setenv("TUNNEL_ZONE", "z2")
    assert tunnel_client.Client.from_profile("work", project="p9").zone == "z2"
    assert tunnel_client.Client.from_profile("work", project="p9").project == "p9"
    with pytest.raises(ValueError, match="no relay"):
        tunnel_client.Client.from_profile("other")


# -- SSH libraries over a real sshd ---------------------------------------------------------------


@pytest.fixture
async def ssh_server(tmp_path: Path) -> AsyncIterator[sshd.Sshd]:
    if sshd.missing_tools() is not None:
        pytest.skip(sshd.missing_tools() or "")
    async with sshd.running_sshd(tmp_path / "sshd") as server:
        yield server


def known_hosts(server: sshd.Sshd, tmp_path: Path) -> Path:
    """A known_hosts file naming the sshd's real host key for "vm1" on its port."""
    public = server.host_key.with_name(server.host_key.name + ".pub").read_text().split()
    path = tmp_path / "known_hosts_vm1"
    path.write_text(f"[vm1]:{server.port} {public[0]} {public[1]}\n")
    return path


@pytest.mark.e2e
async def test_asyncssh_runs_a_command_through_the_relay(env: Env, ssh_server: sshd.Sshd) -> None:
    import asyncssh

    tunnel = env.client().asyncssh_tunnel()
    async with asyncssh.connect(
        "vm1", port=ssh_server.port, tunnel=tunnel, username=ssh_server.user,
        client_keys=[str(ssh_server.client_key)], known_hosts=str(known_hosts(ssh_server, env.tmp)),
        agent_path=None, config=[],
    ) as conn:  # fmt: skip
        result = await conn.run("printf %s $((6 * 7))", check=True)
        assert result.stdout == "42"
        payload = os.urandom(512 * 1024)
        echoed = await conn.run("sha256sum", input=payload.hex(), check=True)
        assert str(echoed.stdout).split()[0] == hashlib.sha256(payload.hex().encode()).hexdigest()
    assert ssh_server.accepted() == 1


@pytest.mark.e2e
async def test_paramiko_runs_a_command_through_the_relay(env: Env, ssh_server: sshd.Sshd) -> None:
    import paramiko

    client = env.client()

    def session() -> str:
        sock = client.open_socket(client.instance("vm1", ssh_server.port))
        ssh = paramiko.SSHClient()
        ssh.load_host_keys(str(known_hosts(ssh_server, env.tmp)))
        try:
            ssh.connect("vm1", port=ssh_server.port, username=ssh_server.user,
                        key_filename=str(ssh_server.client_key),
                        sock=sock, look_for_keys=False, allow_agent=False)  # fmt: skip
            _, stdout, _ = ssh.exec_command("printf %s $((6 * 7))")
            return str(stdout.read().decode())
        finally:
            ssh.close()
            sock.close()

    assert await asyncio.to_thread(session) == "42"
    assert ssh_server.accepted() == 1


# -- docs/library.md ------------------------------------------------------------------------------

BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 7
    return [(f"example{i}", code) for i, code in enumerate(blocks)]


def expected_output(code: str) -> list[str]:
    return re.findall(r"# prints: (.*)$", code, re.MULTILINE)


@pytest.mark.parametrize(("name", "code"), examples(), ids=[n for n, _ in examples()])
async def test_library_examples_run(
    name: str, code: str, env: Env, echo: TcpTarget, tmp_path: Path
) -> None:
    expected = expected_output(code)
    assert expected, f"{name} says nothing about its output"
    extra: dict[str, str] = {"ECHO_PORT": str(echo.port)}
    if "# needs: sshd" in code:
        pytest.skip("run by test_library_ssh_examples_run (e2e)")
    await run_example(code, env, tmp_path, extra, expected)


@pytest.mark.e2e
async def test_library_ssh_examples_run(env: Env, ssh_server: sshd.Sshd, tmp_path: Path) -> None:
    ssh_examples = [code for _, code in examples() if "# needs: sshd" in code]
    assert len(ssh_examples) == 2
    extra = {
        "SSH_PORT": str(ssh_server.port),
        "SSH_USER": ssh_server.user,
        "SSH_KEY": str(ssh_server.client_key),
    }
    for code in ssh_examples:
        await run_example(code, env, tmp_path, extra, expected_output(code))
    assert ssh_server.accepted() == 2


async def run_example(
    code: str, env: Env, tmp_path: Path, extra: dict[str, str], expected: list[str]
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    environ.update(
        TUNNEL_SERVER=env.relay.url, TUNNEL_PROJECT="p", TUNNEL_ZONE="z",
        TUNNEL_CA_FILE=str(env.ca_file), TUNNEL_ACCESS_TOKEN=env.token,
        TUNNEL_CLIENT_HOME=str(tmp_path / "home"), **extra,
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, err.decode(errors="replace")
    assert out.decode().splitlines() == expected, err.decode(errors="replace")


async def test_open_socket_close_ends_a_tunnel_whose_target_lingers(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target that never closes its side after our EOF: close() still returns, the tunnel
    is closed from our side after LINGER, and the thread is joined."""
    from tunnel_client import sync

    monkeypatch.setattr(sync, "LINGER", 2 * UNIT)
    held: list[asyncio.StreamWriter] = []
    eof = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()
        eof.set()  # and never close our side

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        client = env.client()
        target = client.instance("vm1", server.sockets[0].getsockname()[1])
        sock = await asyncio.to_thread(client.open_socket, target)
        thread = sock._thread
        await asyncio.wait_for(asyncio.to_thread(sock.close), LIMIT)
        assert thread is not None
        assert not thread.is_alive()
        await asyncio.wait_for(eof.wait(), LIMIT)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
