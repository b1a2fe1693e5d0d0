"""What login and the token commands say: why the device flow was chosen, the spinner on a
terminal (a plain line otherwise), and logins kept per server and profile."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from tunnel_client.cli import main
from tunnel_client.cli_auth import Spinner
from tunnel_client.credentials import CredentialManager, FileStore, Profile
from tunnel_client.oidc import LoginConfig, TokenSet

from ..helpers import UNIT
from .fakerelay import Script, fake_relay


def invoke(home: Path, *args: str, **env: str | None) -> Result:
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNNEL_")}
    environ.update(
        TUNNEL_CLIENT_HOME=str(home), TUNNEL_CLIENT_TOKEN_STORE="file", DISPLAY=None,
        WAYLAND_DISPLAY=None, SSH_CONNECTION=None, SSH_TTY=None,
    )  # fmt: skip
    environ.update(env)
    return CliRunner().invoke(main, list(args), env=environ, prog_name="tunnel-client")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "there is no display to open a browser on (DISPLAY and WAYLAND_DISPLAY unset)"),
        ({"DISPLAY": ":0", "SSH_CONNECTION": "10.0.0.1 22 10.0.0.2 22"}, "this is an SSH session"),
    ],
)
async def test_device_flow_switch_says_why(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    async with fake_relay(Script()) as url:
        result = await asyncio.to_thread(invoke, tmp_path, "login", f"--server={url}", **env)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Using the device flow instead of a browser: {reason}")
    assert "publishes no login configuration" in result.stderr  # the fake relay has none


async def test_no_browser_needs_no_explanation(tmp_path: Path) -> None:
    async with fake_relay(Script()) as url:
        result = await asyncio.to_thread(
            invoke, tmp_path, "login", "--no-browser", f"--server={url}"
        )
    assert "Using the device flow" not in result.stderr


async def test_spinner_on_a_terminal_and_plain_line_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    three_frames = asyncio.Event()

    class Terminal(io.StringIO):
        def write(self, text: str) -> int:
            written = super().write(text)
            if self.getvalue().count("\rWaiting for approval... ") >= 3:
                three_frames.set()
            return written

    terminal = Terminal()
    monkeypatch.setattr(click.utils, "_default_text_stderr", lambda: terminal)
    spinner = Spinner(tty=True)
    spinner.start()
    spinner.start()  # each poll calls it: one spinner only
    async with asyncio.timeout(100 * UNIT):
        await three_frames.wait()
    await spinner.stop()
    frames = terminal.getvalue().split("\r")
    assert {f for f in frames if f.startswith("Waiting")} >= {
        "Waiting for approval... |",
        "Waiting for approval... /",
        "Waiting for approval... -",
    }
    # The line is cleared afterwards ("\r" + erase-line; click drops the escape off a tty).
    assert terminal.getvalue().endswith("\r")

    plain = io.StringIO()
    monkeypatch.setattr(click.utils, "_default_text_stderr", lambda: plain)
    quiet = Spinner(tty=False)
    quiet.start()
    quiet.start()
    await quiet.stop()
    assert plain.getvalue() == "Waiting for approval...\n"


def test_logins_are_per_profile(tmp_path: Path) -> None:
    server = "wss://relay.example:8443"
    login = LoginConfig(issuer="https://idp.example", client_id="tunnel-cli")
    for profile in ("default", "work"):
        manager = CredentialManager(
            server, profile=profile, directory=tmp_path, store=FileStore(tmp_path / "tokens")
        )
        manager.save(Profile(server, login, profile), TokenSet(f"tok-{profile}", time.time() + 600))
    default = invoke(tmp_path, "print-access-token", f"--server={server}")
    work = invoke(tmp_path, "print-access-token", f"--server={server}", "--profile", "work")
    other = invoke(tmp_path, "print-access-token", f"--server={server}", TUNNEL_PROFILE="other")
    assert (default.stdout, work.stdout) == ("tok-default\n", "tok-work\n")
    assert other.exit_code == 1
    assert other.stderr.startswith(f"ERROR: Not logged in to {server}.")
    assert f"tunnel-client login --server {server} --profile other" in other.stderr
