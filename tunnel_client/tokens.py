"""Where the client's bearer token comes from, first match wins: ``--access-token-file`` (re-read
before every connect and resume), ``$TUNNEL_ACCESS_TOKEN``, ``--credential-file`` (a service
account), else the login cached for the server (refreshed before every connect)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .credentials import CredentialManager
from .login import ServiceAccount, canonical_server
from .oidc import OidcError
from .session import TokenProvider

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


def token_provider(
    access_token_file: Path | None,
    environ: Mapping[str, str] = os.environ,
    *,
    server: str | None = None,
    credential_file: Path | None = None,
) -> TokenProvider:
    """The provider for these options; raises NoCredentials when none applies."""
    if access_token_file is not None:
        path = access_token_file

        async def from_file() -> str:
            try:
                text = path.read_text(encoding="ascii", errors="replace")
            except OSError as exc:
                raise NoCredentials(
                    f"cannot read access token file {path}: {exc.strerror}"
                ) from None
            return _clean(text, f"access token file {path}")

        return from_file
    env_token = environ.get(ENV_TOKEN)
    if env_token is not None:
        token = _clean(env_token, ENV_TOKEN)

        async def from_env() -> str:
            return token

        return from_env
    credential = credential_file or (
        Path(environ["TUNNEL_CREDENTIAL_FILE"]) if environ.get("TUNNEL_CREDENTIAL_FILE") else None
    )
    if credential is not None:
        try:
            return ServiceAccount(credential).access_token
        except OidcError as exc:
            raise NoCredentials(str(exc)) from None
    if server is not None:
        return CredentialManager(canonical_server(server)).access_token
    raise NoCredentials(
        f"no credentials: run `tunnel-client login --server URL`, or pass --access-token-file "
        f"FILE or --credential-file FILE, or set {ENV_TOKEN}"
    )
