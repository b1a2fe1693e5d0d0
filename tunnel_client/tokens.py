"""Where the client's bearer token comes from, first match wins: ``--access-token-file`` (re-read
before every connect and resume), ``$TUNNEL_ACCESS_TOKEN``, ``--credential-file`` (a service
account), else the login cached for the server and profile (refreshed before every connect).
A library caller may also pass any callable returning a token.

Every source is a ``TokenSource``: awaitable for a token, with ``source`` naming where the token
comes from (for messages), and ``relogin_hint()`` only where logging in again would help."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from .credentials import CredentialManager
from .login import ServiceAccount, canonical_server
from .oidc import OidcError
from .proxies import ProxySetting

__all__ = [
    "ENV_TOKEN",
    "NoCredentials",
    "TokenSource",
    "from_callable",
    "from_env",
    "from_file",
    "from_login",
    "from_service_account",
    "token_provider",
]

ENV_TOKEN = "TUNNEL_ACCESS_TOKEN"
MAX_TOKEN = 16 * 1024


class NoCredentials(Exception):
    """No token could be found; the message says what to do."""


def _clean(token: str, source: str) -> str:
    token = token.strip()
    if not token:
        raise NoCredentials(f"{source} is empty")
    if len(token) > MAX_TOKEN or any(c.isspace() for c in token) or not token.isascii():
        raise NoCredentials(f"{source} does not hold a single bearer token")
    return token


class TokenSource:
    """``await source()`` gives a bearer token. ``kind``: login, file, env, service-account or
    callable; ``source``: where the token comes from, in words."""

    def __init__(
        self,
        get: Callable[[], Awaitable[str]],
        *,
        kind: str,
        source: str,
        relogin: Callable[[], str] | None = None,
    ) -> None:
        self._get = get
        self.kind = kind
        self.source = source
        self._relogin = relogin

    async def __call__(self) -> str:
        return await self._get()

    def relogin_hint(self) -> str | None:
        return self._relogin() if self._relogin is not None else None

    def __repr__(self) -> str:  # never the token
        return f"<TokenSource {self.kind}: {self.source}>"


def from_file(path: Path | str) -> TokenSource:
    file = Path(path)

    async def read() -> str:
        try:
            text = await asyncio.to_thread(file.read_text, encoding="ascii", errors="replace")
        except OSError as exc:
            raise NoCredentials(f"cannot read access token file {file}: {exc.strerror}") from None
        return _clean(text, f"access token file {file}")

    return TokenSource(read, kind="file", source=f"the access token file {file}")


def from_env(environ: Mapping[str, str] = os.environ) -> TokenSource:
    token = _clean(environ.get(ENV_TOKEN, ""), ENV_TOKEN)

    async def get() -> str:
        return token

    return TokenSource(get, kind="env", source=f"${ENV_TOKEN}")


def from_service_account(path: Path | str, *, proxy: ProxySetting = None) -> TokenSource:
    try:
        account = ServiceAccount(Path(path), proxy=proxy)
    except OidcError as exc:
        raise NoCredentials(str(exc)) from None
    return TokenSource(
        account.access_token, kind="service-account", source=f"the service account file {path}"
    )


def from_login(server: str, *, profile: str = "default", proxy: ProxySetting = None) -> TokenSource:
    manager = CredentialManager(canonical_server(server), profile=profile, proxy=proxy)
    return TokenSource(
        manager.access_token,
        kind="login",
        source=f"the login for {manager.server}",
        relogin=manager.relogin_hint,
    )


def from_callable(get: Callable[[], str | Awaitable[str]]) -> TokenSource:
    """Any function (sync or async) returning a bearer token, called before every connect."""

    async def call() -> str:
        value = get()
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str):
            raise NoCredentials("the token callable did not return a string")
        return _clean(value, "the token callable's result")

    return TokenSource(call, kind="callable", source="the token callable")


def token_provider(
    access_token_file: Path | None,
    environ: Mapping[str, str] = os.environ,
    *,
    server: str | None = None,
    credential_file: Path | None = None,
    profile: str = "default",
    proxy: ProxySetting = None,
) -> TokenSource:
    """The source for these options (the CLI's order); raises NoCredentials when none applies."""
    if access_token_file is not None:
        return from_file(access_token_file)
    if environ.get(ENV_TOKEN) is not None:
        return from_env(environ)
    credential = credential_file or (
        Path(environ["TUNNEL_CREDENTIAL_FILE"]) if environ.get("TUNNEL_CREDENTIAL_FILE") else None
    )
    if credential is not None:
        return from_service_account(credential, proxy=proxy)
    if server is not None:
        return from_login(server, profile=profile, proxy=proxy)
    raise NoCredentials(
        f"no credentials: run `tunnel-client login --server URL`, or pass --access-token-file "
        f"FILE or --credential-file FILE, or set {ENV_TOKEN}"
    )
