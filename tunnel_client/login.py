"""Logging in to a relay: discover its identity provider from the relay's well-known document,
pick the browser (PKCE) or device flow, and store the tokens; service-account credential files
use the client-credentials grant instead."""

from __future__ import annotations

import json
import os
import ssl
import sys
import webbrowser
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx2

from .credentials import CredentialManager, Profile
from .http import client_kwargs, http_url, request_failure
from .oidc import LoginConfig, OidcClient, OidcError, TokenSet
from .proxies import ProxySetting, proxy_for

WELL_KNOWN = "/.well-known/tunnel-client"
REFRESH_MARGIN = 60.0


def canonical_server(server: str) -> str:
    """The relay URL in the form used as the cache key: wss://host[:port], no trailing slash."""
    server = server.strip().rstrip("/")
    for plain, secure in (("https://", "wss://"), ("http://", "ws://")):
        if server.startswith(plain):
            server = secure + server[len(plain) :]
    if not server.startswith(("wss://", "ws://")):
        raise OidcError(f"the server must be a wss:// URL, got {server!r}")
    return server


async def fetch_login_config(
    server: str, ssl_context: ssl.SSLContext | None, proxy: ProxySetting = None
) -> LoginConfig:
    """What the relay says a client needs to log in (issuer, client id, scopes, resource)."""
    url = http_url(canonical_server(server)) + WELL_KNOWN
    chosen = proxy_for(url, proxy)
    kwargs = client_kwargs(ssl_context=ssl_context, proxy=chosen)
    try:
        async with httpx2.AsyncClient(**kwargs) as client:  # type: ignore[arg-type]
            response = await client.get(url)
    except httpx2.HTTPError as exc:
        where = url.split("://", 1)[1].split("/", 1)[0]
        raise OidcError(str(request_failure(exc, where, chosen))) from None
    if response.status_code == 404:
        raise OidcError(
            f"{server} publishes no login configuration: ask its operator for the issuer "
            "and client id, and pass --issuer and --client-id"
        )
    if response.status_code != 200:
        raise OidcError(f"{url} answered HTTP {response.status_code}")
    try:
        data = json.loads(response.content[: 64 * 1024])
    except ValueError:
        raise OidcError(f"{url} did not answer JSON") from None
    try:
        return LoginConfig(
            issuer=str(data["issuer"]),
            client_id=str(data["client_id"]),
            scopes=tuple(str(s) for s in data.get("scopes") or LoginConfig.scopes),
            resource=data.get("resource"),
        )
    except (KeyError, TypeError):
        raise OidcError(f"{url} is missing the issuer or client id") from None


def device_flow_reason(
    no_browser: bool, environ: Mapping[str, str] = os.environ, platform: str = sys.platform
) -> str | None:
    """Why the device flow is used instead of the browser (None: use the browser)."""
    if no_browser:
        return "--no-browser was given"
    if environ.get("SSH_CONNECTION") or environ.get("SSH_TTY"):
        return "this is an SSH session, where a browser here could not reach you"
    if platform.startswith("linux") or platform.startswith("freebsd"):
        if not (environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")):
            return "there is no display to open a browser on (DISPLAY and WAYLAND_DISPLAY unset)"
    return None


def use_device_flow(
    no_browser: bool, environ: Mapping[str, str] = os.environ, platform: str = sys.platform
) -> bool:
    """The device flow when asked, inside an SSH session, or with no display to open."""
    return device_flow_reason(no_browser, environ, platform) is not None


async def login(
    server: str,
    login_config: LoginConfig,
    *,
    device: bool,
    report: Callable[[str], None],
    open_browser: Callable[[str], bool] = webbrowser.open,
    manager: CredentialManager | None = None,
    profile: str = "default",
    proxy: ProxySetting = None,
    waiting: Callable[[], None] = lambda: None,
) -> TokenSet:
    """Run a flow and store its tokens for ``server``."""
    server = canonical_server(server)
    manager = manager or CredentialManager(server, profile=profile, proxy=proxy)
    chosen = proxy_for(login_config.issuer, proxy)
    async with OidcClient(login_config, proxy=chosen, timeout=60) as client:
        if device:
            tokens = await client.device_code(report=report, waiting=waiting)
        else:
            tokens = await client.authorization_code(open_browser=open_browser, report=report)
    manager.save(Profile(server, login_config, profile), tokens)
    return tokens


class ServiceAccount:
    """A credential file for non-interactive use (client credentials grant):

        {"type": "service_account", "issuer": "...", "client_id": "...",
         "client_secret": "...", "resource": "urn:...", "scopes": [...]}

    Tokens are kept in memory and renewed when fewer than 60 s remain."""

    def __init__(self, path: Path, *, proxy: ProxySetting = None) -> None:
        self.path = path
        self.proxy = proxy
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise OidcError(f"cannot read credential file {path}: {exc.strerror}") from None
        except ValueError:
            raise OidcError(f"credential file {path} is not JSON") from None
        if not isinstance(data, dict) or data.get("type") != "service_account":
            raise OidcError(f'credential file {path} must have "type": "service_account"')
        try:
            self.config = LoginConfig(
                issuer=str(data["issuer"]),
                client_id=str(data["client_id"]),
                client_secret=str(data["client_secret"]),
                scopes=tuple(data.get("scopes", ())),
                resource=data.get("resource"),
            )
        except KeyError as exc:
            raise OidcError(f"credential file {path} lacks {exc.args[0]!r}") from None
        self._tokens: TokenSet | None = None

    async def tokens(self, *, resource: str | None = None) -> TokenSet:
        if resource is None and self._tokens is not None:
            if self._tokens.valid_for(REFRESH_MARGIN):
                return self._tokens
        chosen = proxy_for(self.config.issuer, self.proxy)
        async with OidcClient(self.config, proxy=chosen) as client:
            tokens = await client.client_credentials(resource=resource)
        if resource is None:
            self._tokens = tokens
        return tokens

    async def access_token(self) -> str:
        return (await self.tokens()).access_token
