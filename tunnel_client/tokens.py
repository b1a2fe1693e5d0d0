"""Where the client's bearer token comes from (for now: a file or TUNNEL_ACCESS_TOKEN).

The file is re-read before every connect and resume, so a token refreshed on disk is picked up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

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
    access_token_file: Path | None, environ: Mapping[str, str] = os.environ
) -> TokenProvider:
    """A provider reading ``access_token_file`` (each call) or else ``$TUNNEL_ACCESS_TOKEN``."""
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
    if env_token is None:
        raise NoCredentials(f"no credentials: pass --access-token-file FILE or set {ENV_TOKEN}")
    token = _clean(env_token, ENV_TOKEN)

    async def from_env() -> str:
        return token

    return from_env
