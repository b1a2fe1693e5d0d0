"""``tunnel-client login | logout | print-access-token | print-identity-token``: thin commands
over tunnel_client.login and tunnel_client.credentials. Tokens go to stdout, messages to stderr.
``login`` says who is now logged in; the device flow waits with a spinner on a terminal."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnel_runtime.loop import run

from .cli_options import Settings, common_options, fail, proxy_setting, require_server, resolve
from .cli_options import ssl_context as make_ssl_context
from .credentials import CredentialManager
from .errors import TunnelFailed
from .login import ServiceAccount, canonical_server, device_flow_reason, fetch_login_config, login
from .oidc import LoginConfig, LoginRequired, OidcError, TokenSet

T = TypeVar("T")
CONTEXT = {"help_option_names": ["-h", "--help"]}
SPIN = "|/-\\"


def claims_of(jwt: str | None) -> dict[str, Any]:
    """A JWT's claims, decoded locally WITHOUT verification: only for display."""
    if not jwt:
        return {}
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def who(tokens: TokenSet) -> tuple[str, list[str]]:
    """(email or sub, groups) from the ID token, else the access token."""
    claims = claims_of(tokens.id_token) or claims_of(tokens.access_token)
    if not claims.get("email") and claims_of(tokens.access_token).get("email"):
        claims = claims_of(tokens.access_token)
    name = str(claims.get("email") or claims.get("sub") or "an unknown identity")
    groups = claims.get("groups") or claims_of(tokens.access_token).get("groups") or []
    return name, [str(g) for g in groups] if isinstance(groups, list) else []


def expiry_text(expires_at: float) -> str:
    left = int(expires_at - time.time())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(expires_at))
    if left <= 0:
        return f"expired at {stamp}"
    return f"valid until {stamp} ({left // 60} min {left % 60} s left)"


class Spinner:
    """ "Waiting for approval..." with a spinner on a terminal, one plain line otherwise."""

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._task: asyncio.Task[None] | None = None
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if not self.tty:
            click.echo("Waiting for approval...", err=True)
            return
        self._task = asyncio.get_running_loop().create_task(self._spin())

    async def _spin(self) -> None:
        for n in range(10**9):
            click.echo(f"\rWaiting for approval... {SPIN[n % 4]}", err=True, nl=False)
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            click.echo("\r\033[K", err=True, nl=False)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return run(coro)
    except (OidcError, TunnelFailed) as exc:
        fail(str(exc))


@click.command("login", context_settings=CONTEXT)
@common_options
@click.option("--no-browser", is_flag=True, help="Use the device flow (a code to enter).")
@click.option("--issuer", help="Identity provider, when the relay publishes none.")
@click.option("--client-id", help="OAuth client id, when the relay publishes none.")
@click.pass_context
def login_command(
    ctx: click.Context,
    /,
    no_browser: bool,
    issuer: str | None,
    client_id: str | None,
    **kw: Any,
) -> None:
    """Log in to the relay's identity provider (browser with PKCE, or device code).

    \b
    Example:
      tunnel-client login --server wss://relay.example.com:8443
      tunnel-client login --profile staging --no-browser
    """
    settings = resolve(ctx, kw)
    canonical = _canonical(settings)
    reason = device_flow_reason(no_browser)
    if reason is not None and not no_browser:
        click.echo(f"Using the device flow instead of a browser: {reason}.", err=True)
    tokens = _run(_login(settings, canonical, reason is not None, issuer, client_id))
    name, groups = who(tokens)
    in_groups = f" (groups: {', '.join(groups)})" if groups else ""
    click.echo(f"Logged in as {name}{in_groups}; token {expiry_text(tokens.expires_at)}.",
               err=True)  # fmt: skip
    click.echo(f"Logged in to {canonical}.", err=True)


@click.command("logout", context_settings=CONTEXT)
@common_options
@click.pass_context
def logout_command(ctx: click.Context, /, **kw: Any) -> None:
    """Revoke and forget the login for the relay (and profile).

    \b
    Example:
      tunnel-client logout --server wss://relay.example.com:8443
    """
    settings = resolve(ctx, kw)
    canonical = _canonical(settings)
    manager = CredentialManager(canonical, profile=settings.profile, proxy=proxy_setting(settings))
    if _run(manager.logout()):
        click.echo(f"Logged out of {canonical}.", err=True)
    else:
        click.echo(f"Not logged in to {canonical}.", err=True)


@click.command("print-access-token", context_settings=CONTEXT)
@common_options
@click.option(
    "--credential-file",
    type=click.Path(path_type=Path),
    envvar="TUNNEL_CREDENTIAL_FILE",
    help="Service-account credential file (env TUNNEL_CREDENTIAL_FILE).",
)
@click.pass_context
def print_access_token(ctx: click.Context, /, **kw: Any) -> None:
    """Print a valid access token for the relay (refreshed if needed).

    \b
    Example:
      curl -H "Authorization: Bearer $(tunnel-client print-access-token)" https://...
    """
    settings = resolve(ctx, kw)
    proxy = proxy_setting(settings)
    if settings.credential_file is not None:
        account = ServiceAccount(settings.credential_file, proxy=proxy)
        token = _run(account.access_token())
    else:
        manager = CredentialManager(_canonical(settings), profile=settings.profile, proxy=proxy)
        token = _run(manager.access_token())
    click.echo(token)


@click.command("print-identity-token", context_settings=CONTEXT)
@common_options
@click.option(
    "--audience",
    help="Resource the token is for (RFC 8707 resource indicator); default: the ID token.",
)
@click.option(
    "--credential-file",
    type=click.Path(path_type=Path),
    envvar="TUNNEL_CREDENTIAL_FILE",
    help="Service-account credential file (env TUNNEL_CREDENTIAL_FILE).",
)
@click.pass_context
def print_identity_token(ctx: click.Context, /, audience: str | None, **kw: Any) -> None:
    """Print an identity token: the login's OIDC ID token, or with --audience a token
    issued for that resource (for curl -H "Authorization: Bearer ...").

    \b
    Example:
      tunnel-client print-identity-token --audience urn:identity-tunnel:relay
    """
    settings = resolve(ctx, kw)
    click.echo(_run(_identity_token(settings, audience)))


def register(main: click.Group) -> None:
    main.add_command(login_command)
    main.add_command(logout_command)
    main.add_command(print_access_token)
    main.add_command(print_identity_token)


def _canonical(settings: Settings) -> str:
    try:
        return canonical_server(require_server(settings))
    except OidcError as exc:
        raise click.UsageError(str(exc)) from None


async def _login(
    settings: Settings, canonical: str, device: bool, issuer: str | None, client_id: str | None
) -> TokenSet:
    proxy = proxy_setting(settings)
    if issuer and client_id:
        config = LoginConfig(issuer=issuer, client_id=client_id)
    else:
        context = make_ssl_context(settings) if canonical.startswith("wss:") else None
        config = await fetch_login_config(canonical, context, proxy)
    spinner = Spinner()
    try:
        return await login(
            canonical,
            config,
            device=device,
            report=lambda message: click.echo(message, err=True),
            profile=settings.profile,
            proxy=proxy,
            waiting=spinner.start,
        )
    finally:
        await spinner.stop()


async def _identity_token(settings: Settings, audience: str | None) -> str:
    proxy = proxy_setting(settings)
    if settings.credential_file is not None:
        account = ServiceAccount(settings.credential_file, proxy=proxy)
        return (await account.tokens(resource=audience)).access_token
    manager = CredentialManager(_canonical(settings), profile=settings.profile, proxy=proxy)
    if audience is None:
        tokens = await manager.tokens()
        if tokens.id_token is None or _expired(tokens.id_token):
            tokens = await manager.tokens(force_refresh=True)
        if tokens.id_token is None:
            raise OidcError("the identity provider issued no ID token (is 'openid' a scope?)")
        return tokens.id_token
    return await manager.token_for(audience)


def _expired(jwt: str, margin: float = 60.0) -> bool:
    exp = claims_of(jwt).get("exp")
    if not isinstance(exp, int | float):
        return True
    return float(exp) - time.time() < margin


__all__ = ["LoginRequired", "Spinner", "claims_of", "expiry_text", "register", "who"]
