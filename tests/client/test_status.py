"""``tunnel-client status``: server and where it came from, profile, identity and groups, token
expiry, whether the relay is reachable; exit 0 only when logged in and reachable."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tunnel_client.cli import main
from tunnel_client.credentials import CredentialManager, FileStore, Profile
from tunnel_client.oidc import LoginConfig, TokenSet
from tunnel_server.app import RunningServer

from ..helpers import relay_config_data, start_relay
from ..oidc_fixture import TestIssuer


@pytest.fixture
async def relay(issuer: TestIssuer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with start_relay(relay_config_data(issuer, tmp_path)) as server:
        yield server


async def status(home: Path, *args: str, **env: str) -> Result:
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNNEL_")}
    environ.update(TUNNEL_CLIENT_HOME=str(home), TUNNEL_CLIENT_TOKEN_STORE="file", **env)
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, main, ["status", *args], env=environ, prog_name="tunnel-client"
    )


async def test_status_of_a_cached_login(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    manager = CredentialManager(relay.url, directory=home, store=FileStore(home / "tokens"))
    token = issuer.mint(groups=["ops", "dev"])
    login = LoginConfig(issuer=issuer.issuer, client_id="tunnel-cli")
    manager.save(Profile(relay.url, login), TokenSet(token, time.time() + 600, "refresh"))
    result = await status(home, f"--server={relay.url}", f"--ca-file={tmp_path}/relay-cert.pem")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"Server:    {relay.url} (from flag)"
    assert lines[1] == "Profile:   default"
    assert lines[2] == "Identity:  alice@example.com (cached login)"
    assert lines[3] == "Groups:    ops, dev"
    assert lines[4].startswith("Token:     valid until ")
    assert lines[4].endswith("; renewed automatically")
    assert lines[5] == f"Relay:     reachable at {relay.url.removeprefix('wss://')}"
    assert lines[6] == "Forwards:  no `tunnel-client up` running for profile default"
    assert token not in result.output


async def test_status_not_logged_in_and_relay_down(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = await status(tmp_path, TUNNEL_SERVER=f"wss://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"Server:    wss://127.0.0.1:{port} (from env)" in result.stdout
    assert "Identity:  not logged in (run: tunnel-client login --server" in result.stdout
    assert "Relay:     NOT reachable: Error while connecting" in result.stdout
    assert "connection refused" in result.stdout


async def test_status_of_a_token_file(
    relay: RunningServer, issuer: TestIssuer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issuer.mint(sub="svc", email=None))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.yaml").write_text(
        f"profiles:\n  ci:\n    server: {relay.url}\n    ca-file: {tmp_path}/relay-cert.pem\n"
    )
    result = await status(tmp_path / "home", "--profile", "ci",
                          f"--access-token-file={token_file}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Server:    {relay.url} (from profile)" in result.stdout
    assert f"Identity:  svc (from the access token file {token_file})" in result.stdout
