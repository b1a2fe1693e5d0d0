"""A failed ``print-identity-token --audience`` must not cost the login, against the real dev
IdP (npm oidc-provider), which rotates refresh tokens and spends the one it was sent *before* it
refuses an unknown resource: replaying the spent token then revokes the whole grant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tunnel_server.app import RunningServer

from ..e2e.test_login import Cli, device_login
from ..helpers import TcpTarget, relay_config_data, start_relay
from ..idp import (
    ALICE,
    AUDIENCE,
    CLI_CLIENT_ID,
    RESOURCE,
    USER_SCOPES,
    DevIdp,
    TokenError,
    jwt_parts,
    missing_tools,
)
from ..oidc_fixture import TestIssuer
from .tinyproxy import tinyproxy

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or ""),
]

OTHER = "urn:example:other-app"


@pytest.fixture
async def idp() -> AsyncIterator[DevIdp]:
    async with DevIdp() as running:
        yield running


@pytest.fixture
async def cli(
    idp: DevIdp, issuer: TestIssuer, echo: TcpTarget, tmp_path: Path
) -> AsyncIterator[Cli]:
    data = relay_config_data(issuer, tmp_path, instances={"vm1": echo.port})
    data["oidc"] = {"issuer": idp.issuer, "audiences": [AUDIENCE]}
    data["login"] = {
        "issuer": idp.issuer,
        "client_id": CLI_CLIENT_ID,
        "scopes": USER_SCOPES.split(),
        "resource": RESOURCE,
    }
    relay: RunningServer
    async with start_relay(data) as relay:
        client = Cli(tmp_path / "client-home", relay.url, tmp_path / "relay-cert.pem")
        yield client
        await client.kill_all()


async def test_the_idp_spends_a_refresh_token_on_a_refused_resource(idp: DevIdp) -> None:
    """Why the client must be careful (the failure the fix avoids): one refused request for
    another resource, and the refresh token is gone, and with it the grant."""
    tokens = await idp.device_login(ALICE)
    with pytest.raises(TokenError) as refused:
        await idp.token(
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
             "resource": OTHER}
        )  # fmt: skip
    assert refused.value.error == "invalid_target"
    with pytest.raises(TokenError) as spent:
        await idp.refresh(tokens["refresh_token"])
    assert spent.value.error == "invalid_grant"


async def test_failed_audience_exchange_keeps_the_login(cli: Cli, idp: DevIdp) -> None:
    await device_login(cli, ALICE)
    before = cli.cache()["tokens"]["refresh_token"]

    refused = await cli.run("print-identity-token", f"--audience={OTHER}", *cli.relay_args)
    assert refused.returncode == 1
    assert refused.stdout == b""
    assert "rotates refresh tokens" in refused.stderr
    assert "nothing was sent" in refused.stderr
    assert "Traceback" not in refused.stderr
    cached = cli.cache()["tokens"]
    assert cached["rotates"] is True  # learned from a refresh the IdP surely grants
    assert cached["refresh_token"] != before  # that refresh rotated it, and it was saved

    # The login still works: a refresh with the cached token, then a token for the relay's own
    # resource, then another refresh.
    cli.expire()
    token = await cli.access_token()
    assert jwt_parts(token)[1]["aud"] == AUDIENCE
    granted = await cli.run("print-identity-token", f"--audience={RESOURCE}", *cli.relay_args)
    granted.check()
    assert jwt_parts(granted.text.strip())[1]["aud"] == AUDIENCE
    cli.expire()
    assert await cli.access_token() != token
    # Once more with the same bad audience: refused locally at once, login intact.
    again = await cli.run("print-identity-token", f"--audience={OTHER}", *cli.relay_args)
    assert again.returncode == 1
    cli.expire()
    await cli.access_token()


async def test_login_refresh_and_logout_go_through_an_authenticating_proxy(
    idp: DevIdp,
    issuer: TestIssuer,
    echo: TcpTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every OIDC request (discovery, device authorization, polling, refresh, revocation) and
    the relay's login document go through the proxy named by HTTP(S)_PROXY, with Basic
    credentials from the URL; the password is never printed."""
    data = relay_config_data(issuer, tmp_path, instances={"vm1": echo.port})
    data["oidc"] = {"issuer": idp.issuer, "audiences": [AUDIENCE]}
    data["login"] = {"issuer": idp.issuer, "client_id": CLI_CLIENT_ID,
                     "scopes": USER_SCOPES.split(), "resource": RESOURCE}  # fmt: skip
    async with start_relay(data) as relay:
        relay_port = int(relay.url.rsplit(":", 1)[1])
        async with tinyproxy(tmp_path / "proxy", connect_ports=[relay_port], user="corp",
                             password="corp-secret") as proxy:  # fmt: skip
            for name in ("HTTPS_PROXY", "HTTP_PROXY"):
                monkeypatch.setenv(name, proxy.url())
            for name in ("NO_PROXY", "no_proxy", "https_proxy", "http_proxy"):
                monkeypatch.delenv(name, raising=False)
            cli = Cli(tmp_path / "client-home", relay.url, tmp_path / "relay-cert.pem")
            try:
                result = await device_login(cli, ALICE)
                cli.expire()
                await cli.access_token()
                logout = (await cli.run("logout", *cli.relay_args)).check()
            finally:
                await cli.kill_all()
    assert "corp-secret" not in result.stderr + logout.stderr
    assert "Logged in as alice@example.com (groups: ops, dev); token valid until" in result.stderr
    assert "Waiting for approval...\n" in result.stderr  # not a terminal: one plain line
    seen = proxy.requests()
    assert f"CONNECT 127.0.0.1:{relay_port} HTTP/1.1" in seen  # /.well-known/tunnel-client
    via_proxy = [line.split()[1] for line in seen if not line.startswith("CONNECT")]
    metadata = await idp.metadata()
    for endpoint in ("device_authorization_endpoint", "token_endpoint", "revocation_endpoint"):
        assert metadata[endpoint] in via_proxy, (endpoint, seen)
    assert f"{idp.issuer}/.well-known/openid-configuration" in via_proxy
    # device polling (>= 1), refresh: every token request went through the proxy
    assert via_proxy.count(metadata["token_endpoint"]) >= 2
