"""``tunnel-client up``: three forwards from the config in one process against a real relay, one
of them denied by policy; the other two carry sha256-checked transfers; ``status`` reads the
live state from the owner-only control socket; a terminal gets the compact table; Ctrl-C
closes everything."""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tunnel_client import control
from tunnel_client.cli import main
from tunnel_server.app import RunningServer

from ..helpers import (
    UNIT,
    TcpTarget,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from ..oidc_fixture import TestIssuer

CLIENT = [sys.executable, "-m", "tunnel_client"]
LIMIT = 400 * UNIT
SIZE = 1024 * 1024 + 7


@pytest.fixture
async def relay(
    issuer: TestIssuer, echo: TcpTarget, sink: TcpTarget, tmp_path: Path
) -> AsyncIterator[RunningServer]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": 0, "vm2": 0, "vm3": 0})
    data["access"][0]["instances"] = ["p/z/vm1", "p/z/vm2"]  # vm3: denied by policy
    async with start_relay(data) as server:
        yield server


def write_config(home: Path, relay: RunningServer, tmp: Path, echo: int, sink: int) -> None:
    home.mkdir(exist_ok=True)
    profile = {
        "server": relay.url, "project": "p", "zone": "z", "ca-file": str(tmp / "relay-cert.pem"),
        "forwards": [
            {"name": "echo", "instance": "vm1", "port": echo, "local": "127.0.0.1:0"},
            {"name": "sink", "instance": "vm2", "port": sink, "local": "127.0.0.1:0"},
            {"name": "denied", "instance": "vm3", "port": echo, "local": "127.0.0.1:0"},
        ],
    }  # fmt: skip
    (home / "config.yaml").write_text(yaml.safe_dump({"profiles": {"default": profile}}))


def client_env(home: Path, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env.update(TUNNEL_CLIENT_HOME=str(home), TUNNEL_ACCESS_TOKEN=token)
    return env


async def read_until(stream: asyncio.StreamReader, needles: list[str]) -> str:
    text = ""
    async with asyncio.timeout(LIMIT):
        while not all(n in text for n in needles):
            line = await stream.readline()
            assert line, f"up ended early:\n{text}"
            text += line.decode()
    return text


async def transfer(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in deterministic_chunks(SIZE):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        return (await asyncio.wait_for(reader.read(), LIMIT)).decode()
    finally:
        writer.close()


def rows_by_name(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in snapshot["forwards"]}


async def test_up_three_forwards_one_denied(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, sink: TcpTarget,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    write_config(home, relay, tmp_path, echo.port, sink.port)
    env = client_env(home, issuer.mint())
    process = await asyncio.create_subprocess_exec(
        *CLIENT, "up", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        seen = await read_until(
            process.stderr,
            ["echo: listening on", "sink: listening on", "denied: listening on"],
        )
        assert "denied: ERROR: Error while connecting [4033: 'not authorized']." in seen
        monkeypatch.setenv("TUNNEL_CLIENT_HOME", str(home))
        path = control.socket_path("default")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        snapshot = await control.query("default")
        assert snapshot is not None
        rows = rows_by_name(snapshot)
        assert (rows["echo"]["state"], rows["sink"]["state"]) == ("listening", "listening")
        assert rows["denied"]["state"] == "denied"
        assert "4033" in rows["denied"]["error"]

        # The failing forward does not stop the others: both carry data.
        sink_port = int(rows["sink"]["listen"].rsplit(":", 1)[1])
        echo_port = int(rows["echo"]["listen"].rsplit(":", 1)[1])
        assert await transfer(sink_port) == deterministic_digest(SIZE)
        reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), LIMIT) == b"still here"
        rows = rows_by_name(await control.query("default") or {})
        assert rows["echo"]["open"] == 1
        assert rows["sink"]["up"] == SIZE
        writer.close()

        status = await asyncio.to_thread(
            CliRunner().invoke, main, ["status"], env=env, prog_name="tunnel-client"
        )
        assert "Forwards:  `tunnel-client up` (pid" in status.stdout
        assert "sink: 127.0.0.1:" in status.stdout
        assert "[denied]" in status.stdout
        assert "Relay:     reachable" in status.stdout

        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    assert process.returncode == 130
    assert "Closed 3 forward(s)" in err.decode()
    assert "Traceback" not in err.decode()
    assert not path.exists()


async def test_up_on_a_terminal_draws_a_table(
    relay: RunningServer, issuer: TestIssuer, echo: TcpTarget, sink: TcpTarget, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    write_config(home, relay, tmp_path, echo.port, sink.port)
    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *CLIENT, "up", env={**client_env(home, issuer.mint()), "COLUMNS": "200"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    screen = b""
    try:
        async with asyncio.timeout(LIMIT):
            while b"[denied]" not in screen or b"[listening]" not in screen:
                screen += await asyncio.to_thread(os.read, controller, 65536)
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), LIMIT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(controller)
    text = screen.decode(errors="replace")
    assert "\x1b[2K" in text  # redrawn in place, not scrolled as log lines
    assert "Ctrl-C closes every forward." in text
    assert "echo: listening on" not in text


def test_up_without_forwards_says_how_to_add_one(tmp_path: Path) -> None:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNNEL_")}
    env.update(TUNNEL_CLIENT_HOME=str(tmp_path), TUNNEL_SERVER="wss://relay.example")
    result = CliRunner().invoke(main, ["up"], env=env, prog_name="tunnel-client")
    assert result.exit_code == 2
    assert "profile default has no forwards" in result.stderr
    assert "tunnel-client config add-forward" in result.stderr
