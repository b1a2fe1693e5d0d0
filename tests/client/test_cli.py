"""The ``tunnel-client`` CLI: option validation with click's CliRunner, and ``start-tunnel`` as a
real process against a relay on loopback (gcloud's messages, stdout discipline, signals)."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tunnel_client.cli import main
from tunnel_server.app import RunningServer

from ..helpers import UNIT, TcpTarget, capture_audit, relay_config_data, start_relay
from ..oidc_fixture import TestIssuer
from ..processes import FAULTHANDLER_ENV, exited

CLIENT = [sys.executable, "-m", "tunnel_client"]
# A fresh client process (imports, TLS, connection check) answering.
STARTUP_TIMEOUT = 400 * UNIT
BEGIN = "# Begin generated tunnel-client ssh-config"
END = "# End generated tunnel-client ssh-config"


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- option validation (in process) ----------------------------------------------------------


def invoke(*args: str, token: str | None = "tok", **env: str | None) -> Result:
    """Run the CLI in process; no TUNNEL_* variables leak in from the environment."""
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNNEL_")}
    environ["TUNNEL_ACCESS_TOKEN"] = token
    environ.update(env)
    return CliRunner().invoke(main, list(args), env=environ)


def usage_error(result: Result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    assert "Usage:" in result.stderr
    return result.stderr


SERVER = ["--server", "wss://relay.example:8443"]


def test_listen_on_stdin_conflicts_with_local_host_port() -> None:
    result = invoke(
        "start-tunnel", "vm1", "22", "--listen-on-stdin", "--local-host-port=localhost:0",
        "--zone", "z", *SERVER,
    )  # fmt: skip
    assert "--listen-on-stdin conflicts with --local-host-port" in usage_error(result)


def test_zone_is_required() -> None:
    result = invoke("start-tunnel", "vm1", "22", "--listen-on-stdin", *SERVER)
    assert "--zone is required" in usage_error(result)


def test_region_needs_network() -> None:
    result = invoke("start-tunnel", "10.0.0.5", "22", "--listen-on-stdin", "--region", "r", *SERVER)
    assert "--region and --network go together" in usage_error(result)


def test_zone_conflicts_with_region() -> None:
    result = invoke(
        "start-tunnel", "10.0.0.5", "22", "--listen-on-stdin",
        "--region", "r", "--network", "n", "--zone", "z", *SERVER,
    )  # fmt: skip
    assert "--zone conflicts with --region/--network" in usage_error(result)


def test_dest_group_needs_region() -> None:
    result = invoke(
        "start-tunnel", "vm1", "22", "--listen-on-stdin", "--dest-group", "g", "--zone", "z",
        *SERVER,
    )  # fmt: skip
    assert "--dest-group needs --region and --network" in usage_error(result)


@pytest.mark.parametrize("command", ["start-tunnel", "ssh", "rdp"])
@pytest.mark.parametrize("name", ["a;b", "$(id)", "`id`", "a b", "-oProxyCommand=x", "a\nb"])
def test_invalid_instance_names_are_rejected(command: str, name: str) -> None:
    args = [command, "--zone", "z", *SERVER]
    if command == "start-tunnel":
        args += ["--listen-on-stdin", "--", name, "22"]
    elif command == "ssh":
        args += ["--dry-run", "--", name]
    else:
        args += ["--", name]
    error = usage_error(invoke(*args))
    assert "invalid instance name" in error


@pytest.mark.parametrize("option", ["--zone", "--project"])
def test_invalid_location_names_are_rejected(option: str) -> None:
    args = ["start-tunnel", "vm1", "22", "--listen-on-stdin", "--zone", "z", *SERVER]
    args += [option, "z;id"]
    assert f"invalid {option.lstrip('-')} name" in usage_error(invoke(*args))


def test_port_out_of_range() -> None:
    usage_error(invoke("start-tunnel", "vm1", "70000", "--zone", "z", *SERVER))


async def test_not_logged_in_says_what_to_run(relay: RunningServer, tmp_path: Path) -> None:
    server = ["--server", relay.url, f"--ca-file={tmp_path / 'relay-cert.pem'}"]
    result = await asyncio.to_thread(
        invoke, "start-tunnel", "vm1", "22", "--local-host-port=127.0.0.1:0", "--zone", "z",
        *server, token=None, TUNNEL_CLIENT_HOME=str(tmp_path), TUNNEL_CLIENT_TOKEN_STORE="file",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"Not logged in to {relay.url}" in result.stderr
    assert f"tunnel-client login --server {relay.url}" in result.stderr


def test_no_server_and_no_credentials_names_every_source() -> None:
    result = invoke("print-access-token", token=None)
    assert result.exit_code == 2
    assert "--server" in result.stderr


def test_no_server_says_how_to_set_one() -> None:
    error = usage_error(invoke("start-tunnel", "vm1", "22", "--listen-on-stdin", "--zone", "z"))
    assert "--server" in error
    assert "TUNNEL_SERVER" in error


def test_server_from_environment() -> None:
    result = invoke("ssh", "vm1", "--zone", "z", "--dry-run", TUNNEL_SERVER="wss://r.example")
    assert result.exit_code == 0, result.output
    assert "--server=wss://r.example" in result.stdout


def test_ssh_dry_run(tmp_path: Path) -> None:
    token = tmp_path / "tok"
    result = invoke(
        "ssh", "vm1", "--zone", "z", "--project", "p", "--port", "2222", "--user", "me",
        "--access-token-file", str(token), *SERVER, "--dry-run",
        "--", "-i", "key", "-v", "uname -a",
        token=None,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    argv = shlex.split(result.stdout)
    assert argv[0] == "ssh"
    assert "ProxyUseFdpass=no" in argv
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert "start-tunnel vm1 %p --listen-on-stdin" in proxy
    assert "--server=wss://relay.example:8443" in proxy
    assert "--zone=z" in proxy
    assert "--project=p" in proxy
    assert f"--access-token-file={token}" in proxy
    destination = argv.index("me@vm1")
    # ssh's own arguments come after the destination, our -p first; the remote command last.
    assert argv[destination + 1 :] == ["-p", "2222", "-i", "key", "-v", "uname -a"]


async def test_ssh_needs_a_login_before_running_ssh(relay: RunningServer, tmp_path: Path) -> None:
    marker = tmp_path / "ssh-ran"
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake_ssh.chmod(0o755)
    server = ["--server", relay.url, f"--ca-file={tmp_path / 'relay-cert.pem'}"]
    result = await asyncio.to_thread(
        invoke, "ssh", "vm1", "--zone", "z", *server, "--ssh-binary", str(fake_ssh),
        token=None, TUNNEL_CLIENT_HOME=str(tmp_path), TUNNEL_CLIENT_TOKEN_STORE="file",
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"tunnel-client login --server {relay.url}" in result.stderr
    assert not marker.exists()


def test_ssh_rejects_bad_user() -> None:
    result = invoke("ssh", "vm1", "--zone", "z", *SERVER, "--user", "a;b", "--dry-run")
    assert "invalid user name" in usage_error(result)


def test_ssh_config_prints_marked_block() -> None:
    result = invoke("ssh-config", "vm1", "--zone", "z", "--server", "wss://x", token=None)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == BEGIN
    assert lines[-1] == END
    assert "Host vm1" in lines
    proxy = next(line.strip() for line in lines if line.strip().startswith("ProxyCommand "))
    assert "start-tunnel vm1 %p --listen-on-stdin --server=wss://x --zone=z" in proxy
    assert "    ProxyUseFdpass no" in lines


def test_ssh_config_escapes_percent(tmp_path: Path) -> None:
    token = tmp_path / "100%token"
    result = invoke(
        "ssh-config", "vm1", "--zone", "z", "--server", "wss://x",
        "--access-token-file", str(token),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"--access-token-file={tmp_path}/100%%token" in result.stdout


def test_ssh_config_rejects_bad_names() -> None:
    assert "invalid instance name" in usage_error(invoke("ssh-config", "a;b", "--zone", "z"))
    assert "invalid zone name" in usage_error(invoke("ssh-config", "vm1", "--zone", "$(id)"))


def test_ssh_config_write_is_idempotent(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host other\n    User bob\n", encoding="utf-8")
    args = [
        "ssh-config",
        "vm1",
        "vm2",
        "--zone",
        "z",
        "--server",
        "wss://x",
        "--write",
        str(config),
    ]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout == ""
    assert str(config) in first.stderr
    once = config.read_text(encoding="utf-8")
    assert once.startswith("Host other\n    User bob\n\n" + BEGIN)
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert config.read_text(encoding="utf-8") == once
    assert once.count(BEGIN) == 1
    assert once.count(END) == 1
    assert "Host vm1" in once
    assert "Host vm2" in once
    # Regenerating with other instances replaces the block, keeps the user's text.
    invoke("ssh-config", "vm3", "--zone", "z", "--server", "wss://x", "--write", str(config))
    third = config.read_text(encoding="utf-8")
    assert "Host vm3" in third
    assert "Host vm1" not in third
    assert third.startswith("Host other\n    User bob\n\n")


def test_ssh_config_write_creates_file(tmp_path: Path) -> None:
    config = tmp_path / "new_config"
    result = invoke("ssh-config", "vm1", "--zone", "z", "--write", str(config))
    assert result.exit_code == 0, result.output
    assert config.read_text(encoding="utf-8").startswith(BEGIN)


# -- start-tunnel as a real process ----------------------------------------------------------


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


def connection_args(relay: RunningServer, tmp_path: Path, token_file: Path) -> list[str]:
    return [
        f"--server={relay.url}",
        "--project=p",
        "--zone=z",
        f"--access-token-file={token_file}",
        f"--ca-file={tmp_path / 'relay-cert.pem'}",
    ]


def write_token(path: Path, token: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(token, encoding="ascii")
    return path


@asynccontextmanager
async def client_process(
    args: Sequence[str], stdin: int = asyncio.subprocess.DEVNULL
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env |= FAULTHANDLER_ENV
    process = await asyncio.create_subprocess_exec(
        *CLIENT,
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def finish(process: asyncio.subprocess.Process) -> tuple[bytes, str]:
    """Remaining stdout and all of stderr, once the process has exited (bounded)."""
    assert process.stdout is not None
    assert process.stderr is not None
    out, err = await exited(process, STARTUP_TIMEOUT)
    return out, err.decode(errors="replace")


async def echo_round_trip(host: str, port: int, payload: bytes) -> None:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 100 * UNIT)
    try:
        writer.write(payload)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 200 * UNIT)
        assert got == payload
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 200 * UNIT) == b""
    finally:
        writer.close()


@contextmanager
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT semantics differ on Windows")
async def test_start_tunnel_listens_and_carries_bytes(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "token", issuer.mint())
    args = [
        "start-tunnel", "vm1", str(echo.port), "--local-host-port=localhost:0",
        *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    audit = capture_audit(relay)
    async with client_process(args) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
        assert line.startswith(b"Listening on port ["), line
        port = int(line[len(b"Listening on port [") :].split(b"]")[0])
        assert line == f"Listening on port [{port}].\n".encode()
        assert echo.connections == 1  # the connection check reached the target

        await echo_round_trip("127.0.0.1", port, os.urandom(300_000))
        connections = 1
        if has_ipv6_loopback():
            await echo_round_trip("::1", port, b"over IPv6")
            connections += 1
        assert echo.connections == 1 + connections

        process.send_signal(signal.SIGINT)
        rest, stderr = await finish(process)
    assert rest == b""  # "Listening on port [N]." was the only stdout line
    lines = stderr.splitlines()
    assert lines[:2] == [
        f"Picking local unused port [{port}].",
        "Testing if tunnel connection works.",
    ]
    assert f"Closed [{connections}] local connection(s)." in lines
    assert "Traceback" not in stderr
    assert "Aborted!" not in stderr  # no click noise after gcloud's closing line
    assert process.returncode == 130  # interrupted, as a shell reports SIGINT
    decisions = [r for r in audit if r["event"] == "decision"]
    assert [r["decision"] for r in decisions] == ["allow"] * (1 + connections)


async def test_start_tunnel_fixed_port(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """An explicit port: no "Picking" line; IPv4 only when given 127.0.0.1."""
    token = write_token(tmp_path / "token", issuer.mint())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    args = [
        "start-tunnel", "vm1", str(echo.port), f"--local-host-port=127.0.0.1:{port}",
        "--disable-connection-check", *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    async with client_process(args) as process:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT)
        assert line == f"Listening on port [{port}].\n".encode()
        assert echo.connections == 0  # no connection check
        await echo_round_trip("127.0.0.1", port, b"fixed")
        process.terminate()
        _, stderr = await finish(process)
    assert "Picking local unused port" not in stderr
    assert "Testing if tunnel connection works." not in stderr


async def test_start_tunnel_busy_port(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "token", issuer.mint())
    with busy_port() as port:
        args = [
            "start-tunnel", "vm1", str(echo.port), f"--local-host-port=localhost:{port}",
            *connection_args(relay, tmp_path, token),
        ]  # fmt: skip
        async with client_process(args) as process:
            out, stderr = await finish(process)
    assert process.returncode not in (0, None)
    assert out == b""
    assert f"Local port [{port}] is not available." in stderr
    assert "Traceback" not in stderr
    assert echo.connections == 0


async def test_start_tunnel_failed_connection_check(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """A denied user learns it from the connection check, before "Listening on port"."""
    token = write_token(tmp_path / "token", issuer.mint(sub="mallory", email="m@example.com"))
    args = [
        "start-tunnel", "vm1", str(echo.port), *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    async with client_process(args) as process:
        out, stderr = await finish(process)
    assert process.returncode not in (0, None)
    assert out == b""
    assert "Testing if tunnel connection works." in stderr
    assert "Error while connecting [4033: 'not authorized']." in stderr
    assert echo.connections == 0


async def test_denied_user_on_stdin(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    token = write_token(tmp_path / "token", issuer.mint(sub="mallory", email="m@example.com"))
    args = [
        "start-tunnel", "vm1", str(echo.port), "--listen-on-stdin",
        *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    audit = capture_audit(relay)
    async with client_process(args, stdin=asyncio.subprocess.PIPE) as process:
        out, stderr = await finish(process)
    assert process.returncode not in (0, None)
    assert out == b""
    assert "4033" in stderr
    assert "Traceback" not in stderr
    assert echo.connections == 0
    assert [r["decision"] for r in audit if r["event"] == "decision"] == ["deny"]


async def test_stdin_mode_carries_bytes(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """stdin to the target and back to stdout; EOF on stdin ends the tunnel cleanly."""
    token = write_token(tmp_path / "token", issuer.mint())
    args = [
        "start-tunnel", "vm1", str(echo.port), "--listen-on-stdin",
        *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    payload = os.urandom(1024 * 1024)
    audit = capture_audit(relay)
    async with client_process(args, stdin=asyncio.subprocess.PIPE) as process:
        out, err = await asyncio.wait_for(process.communicate(payload), STARTUP_TIMEOUT)
    assert process.returncode == 0, err.decode(errors="replace")
    assert out == payload
    assert err == b""
    async with asyncio.timeout(200 * UNIT):
        await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["close_code"] == 1000
    assert closed["bytes_from_client"] == closed["bytes_to_client"] == len(payload)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP")
async def test_stdin_mode_hangup_ends_tunnel_on_relay(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> None:
    """ssh sends its ProxyCommand SIGHUP on exit: the relay must end the tunnel at once (1001)
    instead of parking it, with the target's connection, for the resume window."""
    token = write_token(tmp_path / "token", issuer.mint())
    args = [
        "start-tunnel", "vm1", str(echo.port), "--listen-on-stdin",
        *connection_args(relay, tmp_path, token),
    ]  # fmt: skip
    audit = capture_audit(relay)
    async with client_process(args, stdin=asyncio.subprocess.PIPE) as process:
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(b"ping")
        await process.stdin.drain()
        assert await asyncio.wait_for(process.stdout.readexactly(4), STARTUP_TIMEOUT) == b"ping"
        process.send_signal(signal.SIGHUP)
        out, stderr = await finish(process)
    assert out == b""
    assert "Traceback" not in stderr
    async with asyncio.timeout(200 * UNIT):
        await relay.relay.wait_until(lambda: any(r["event"] == "tunnel_closed" for r in audit))
    closed = next(r for r in audit if r["event"] == "tunnel_closed")
    assert closed["close_code"] == 1001
    assert closed["bytes_from_client"] == closed["bytes_to_client"] == 4
    assert not relay.relay.sessions
