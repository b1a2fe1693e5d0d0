"""``tunnel-client login | logout | print-access-token | print-identity-token``: thin commands
over tunnel_client.login and tunnel_client.credentials. Tokens go to stdout, messages to stderr."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnel_runtime.loop import run

from .credentials import CredentialManager
from .login import ServiceAccount, canonical_server, fetch_login_config, login, use_device_flow
from .oidc import LoginConfig, LoginRequired, OidcError

F = TypeVar("F", bound=Callable[..., Any])


def _server_option(func: F) -> F:
    func = click.option(
        "--insecure-skip-verify", is_flag=True, help="Do not verify the relay's certificate."
    )(func)
    func = click.option(
        "--ca-file",
        envvar="TUNNEL_CA_FILE",
        type=click.Path(path_type=Path),
        help="CA bundle for the relay's certificate (env TUNNEL_CA_FILE).",
    )(func)
    func = click.option("--profile", default="default", show_default=True)(func)
    return click.option(
        "--server", envvar="TUNNEL_SERVER", metavar="URL", help="Relay URL (env TUNNEL_SERVER)."
    )(func)


def _require_server(server: str | None) -> str:
    if not server:
        raise click.UsageError("no relay: pass --server wss://HOST:PORT or set TUNNEL_SERVER")
    try:
        return canonical_server(server)
    except OidcError as exc:
        raise click.UsageError(str(exc)) from None


def _fail(exc: Exception) -> None:
    click.echo(f"ERROR: {exc}".rstrip(), err=True)
    sys.exit(1)


def register(main: click.Group, ssl_context: Callable[[Path | None, bool], Any]) -> None:
    @main.command("login")
    @_server_option
    @click.option("--no-browser", is_flag=True, help="Use the device flow (a code to enter).")
    @click.option("--issuer", help="Identity provider, when the relay publishes none.")
    @click.option("--client-id", help="OAuth client id, when the relay publishes none.")
    def login_command(
        server: str | None,
        profile: str,
        ca_file: Path | None,
        insecure_skip_verify: bool,
        no_browser: bool,
        issuer: str | None,
        client_id: str | None,
    ) -> None:
        """Log in to the relay's identity provider (browser with PKCE, or device code)."""
        canonical = _require_server(server)
        context = ssl_context(ca_file, insecure_skip_verify)

        async def flow() -> None:
            if issuer and client_id:
                config = LoginConfig(issuer=issuer, client_id=client_id)
            else:
                config = await fetch_login_config(canonical, context)
            await login(
                canonical,
                config,
                device=use_device_flow(no_browser),
                report=lambda message: click.echo(message, err=True),
                profile=profile,
            )

        try:
            run(flow())
        except OidcError as exc:
            _fail(exc)
        click.echo(f"Logged in to {canonical}.", err=True)

    @main.command("logout")
    @_server_option
    def logout_command(
        server: str | None, profile: str, ca_file: Path | None, insecure_skip_verify: bool
    ) -> None:
        """Revoke and forget the login for the relay."""
        canonical = _require_server(server)
        manager = CredentialManager(canonical, profile=profile)
        if run(manager.logout()):
            click.echo(f"Logged out of {canonical}.", err=True)
        else:
            click.echo(f"Not logged in to {canonical}.", err=True)

    @main.command("print-access-token")
    @_server_option
    @click.option(
        "--credential-file", type=click.Path(path_type=Path), envvar="TUNNEL_CREDENTIAL_FILE"
    )
    def print_access_token(
        server: str | None,
        profile: str,
        ca_file: Path | None,
        insecure_skip_verify: bool,
        credential_file: Path | None,
    ) -> None:
        """Print a valid access token for the relay (refreshed if needed)."""
        try:
            if credential_file is not None:
                token = run(ServiceAccount(credential_file).access_token())
            else:
                manager = CredentialManager(_require_server(server), profile=profile)
                token = run(manager.access_token())
        except (OidcError, LoginRequired) as exc:
            _fail(exc)
        click.echo(token)

    @main.command("print-identity-token")
    @_server_option
    @click.option(
        "--audience",
        help="Resource the token is for (RFC 8707 resource indicator); default: the ID token.",
    )
    @click.option(
        "--credential-file", type=click.Path(path_type=Path), envvar="TUNNEL_CREDENTIAL_FILE"
    )
    def print_identity_token(
        server: str | None,
        profile: str,
        ca_file: Path | None,
        insecure_skip_verify: bool,
        audience: str | None,
        credential_file: Path | None,
    ) -> None:
        """Print an identity token: the login's OIDC ID token, or with --audience a token
        issued for that resource (for curl -H "Authorization: Bearer ...")."""
        try:
            token = run(_identity_token(server, profile, audience, credential_file))
        except (OidcError, LoginRequired) as exc:
            _fail(exc)
        click.echo(token)


async def _identity_token(
    server: str | None, profile: str, audience: str | None, credential_file: Path | None
) -> str:
    if credential_file is not None:
        account = ServiceAccount(credential_file)
        return (await account.tokens(resource=audience)).access_token
    manager = CredentialManager(_require_server(server), profile=profile)
    if audience is None:
        tokens = await manager.tokens()
        if tokens.id_token is None or _expired(tokens.id_token):
            tokens = await manager.tokens(force_refresh=True)
        if tokens.id_token is None:
            raise OidcError("the identity provider issued no ID token (is 'openid' a scope?)")
        return tokens.id_token
    return await manager.token_for(audience)


def _expired(jwt: str, margin: float = 60.0) -> bool:
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - time.time() < margin
    except (IndexError, ValueError, KeyError, TypeError):
        return True
