"""The client's credentials: a token cache per server and profile (OS keyring when one works,
else a 0600 file in a 0700 directory), a lock so parallel ProxyCommands refresh once, and the
manager that hands out a fresh access token before every connect."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import AsyncFileLock

from .oidc import HTTP_TIMEOUT, LoginConfig, LoginRequired, OidcClient, OidcError, TokenSet
from .proxies import ProxySetting, proxy_for

log = logging.getLogger("tunnel.client")

KEYRING_SERVICE = "identity-tunnel"
# Refresh when fewer than this many seconds remain, so a token never expires mid-handshake.
REFRESH_MARGIN = 60.0


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Per-user state directory (XDG on Unix, %LOCALAPPDATA% on Windows)."""
    if "TUNNEL_CLIENT_HOME" in environ:
        return Path(environ["TUNNEL_CLIENT_HOME"])
    if sys.platform == "win32":
        base = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "identity-tunnel"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "identity-tunnel"
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "identity-tunnel"


def cache_key(server: str, profile: str) -> str:
    return hashlib.sha256(f"{server.rstrip('/')}\n{profile}".encode()).hexdigest()[:32]


class TokenStore(Protocol):
    name: str

    def load(self, key: str) -> dict[str, Any] | None: ...

    def save(self, key: str, data: dict[str, Any]) -> None: ...

    def delete(self, key: str) -> None: ...


class FileStore:
    """One JSON file per key, 0600, in a 0700 directory (permissions re-asserted every write)."""

    name = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if sys.platform != "win32":
            os.chmod(self.directory, 0o700)

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring an unreadable token cache file %s", self._path(key))
            return None
        return data if isinstance(data, dict) else None

    def save(self, key: str, data: dict[str, Any]) -> None:
        self._ensure_dir()
        path = self._path(key)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # atomic: a parallel reader sees the old or the new file

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class KeyringStore:
    """The OS keyring (macOS Keychain, Windows Credential Locker, Secret Service)."""

    name = "keyring"

    def __init__(self) -> None:
        import keyring

        self._keyring = keyring

    def load(self, key: str) -> dict[str, Any] | None:
        value = self._keyring.get_password(KEYRING_SERVICE, key)
        if value is None:
            return None
        try:
            data = json.loads(value)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def save(self, key: str, data: dict[str, Any]) -> None:
        self._keyring.set_password(KEYRING_SERVICE, key, json.dumps(data))

    def delete(self, key: str) -> None:
        try:
            self._keyring.delete_password(KEYRING_SERVICE, key)
        except self._keyring.errors.PasswordDeleteError:
            pass


def default_store(directory: Path, environ: Mapping[str, str] = os.environ) -> TokenStore:
    """The keyring when one really works (a probe write), else the file store."""
    if environ.get("TUNNEL_CLIENT_TOKEN_STORE", "auto") != "file":
        try:
            store = KeyringStore()
            probe = f"probe-{os.getpid()}"
            store.save(probe, {})
            store.delete(probe)
            return store
        except Exception as exc:  # NoKeyringError, locked or absent Secret Service, ...
            log.debug("keyring unavailable (%s); using the file store", exc)
    return FileStore(directory / "tokens")


@dataclass(frozen=True)
class Profile:
    """A login: which server it is for and how to renew it."""

    server: str
    login: LoginConfig
    name: str = "default"

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "profile": self.name,
            "issuer": self.login.issuer,
            "client_id": self.login.client_id,
            "scopes": list(self.login.scopes),
            "resource": self.login.resource,
        }


def login_command(server: str, profile: str = "default") -> str:
    extra = f" --profile {profile}" if profile != "default" else ""
    return f"tunnel-client login --server {server}{extra}"


def not_logged_in_message(server: str, profile: str = "default") -> str:
    return f"Not logged in to {server}. Run:\n\n    {login_command(server, profile)}\n"


def relogin_message(server: str, profile: str = "default") -> str:
    return (
        f"Your login for {server} has expired or was revoked. Run:\n\n"
        f"    {login_command(server, profile)}\n"
    )


class CredentialManager:
    """Hands out access tokens: cached, refreshed when close to expiry, under a file lock so
    that parallel processes (several ssh ProxyCommands) refresh once and share the result.

    The stored refresh token is precious: with an IdP that rotates refresh tokens, sending it
    spends it, and replaying a spent one revokes the whole login. So it is only ever sent in a
    request the IdP is expected to grant, and a new one is saved before anything else happens."""

    def __init__(
        self,
        server: str,
        *,
        profile: str = "default",
        directory: Path | None = None,
        store: TokenStore | None = None,
        proxy: ProxySetting = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.profile = profile
        self.directory = directory or state_dir()
        self.store = store or default_store(self.directory)
        self.key = cache_key(self.server, profile)
        self.proxy = proxy

    def _client(self, login: LoginConfig) -> OidcClient:
        # Every request to the IdP is bounded: a hung IdP gives a clear error, not a 5-min wait.
        return OidcClient(login, proxy=proxy_for(login.issuer, self.proxy), timeout=HTTP_TIMEOUT)

    def _lock(self) -> AsyncFileLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        return AsyncFileLock(str(self.directory / f"{self.key}.lock"), timeout=600)

    def load(self) -> tuple[Profile, TokenSet] | None:
        data = self.store.load(self.key)
        if not data or "tokens" not in data or "profile" not in data:
            return None
        p = data["profile"]
        login = LoginConfig(
            issuer=p["issuer"],
            client_id=p["client_id"],
            scopes=tuple(p.get("scopes", ())),
            resource=p.get("resource"),
        )
        return Profile(self.server, login, self.profile), TokenSet.from_json(data["tokens"])

    def save(self, profile: Profile, tokens: TokenSet) -> None:
        self.store.save(self.key, {"profile": profile.to_json(), "tokens": tokens.to_json()})

    def relogin_hint(self) -> str:
        return relogin_message(self.server, self.profile).rstrip()

    async def access_token(self) -> str:
        """A token valid for at least REFRESH_MARGIN seconds. Raises LoginRequired."""
        return (await self.tokens()).access_token

    def _login_required(self, cached: tuple[Profile, TokenSet] | None) -> tuple[Profile, TokenSet]:
        if cached is None:
            raise LoginRequired(not_logged_in_message(self.server, self.profile))
        return cached

    async def tokens(self, *, force_refresh: bool = False) -> TokenSet:
        cached = self.load()
        if cached is not None and not force_refresh and cached[1].valid_for(REFRESH_MARGIN):
            return cached[1]
        async with self._lock():
            # Another process may have refreshed while we waited.
            profile, tokens = self._login_required(self.load())
            if not force_refresh and tokens.valid_for(REFRESH_MARGIN):
                return tokens
            fresh = await self._refresh(profile, tokens)
            self.save(profile, fresh)
            return fresh

    async def _refresh(
        self, profile: Profile, tokens: TokenSet, resource: str | None = None
    ) -> TokenSet:
        async with self._client(profile.login) as client:
            try:
                return await client.refresh(tokens, resource=resource)
            except LoginRequired:
                raise LoginRequired(relogin_message(self.server, self.profile)) from None
            except OidcError as exc:
                if resource is not None:
                    raise
                raise OidcError(
                    f"{exc}. If this persists: {login_command(self.server, self.profile)}"
                ) from None

    def _granted(self, profile: Profile, tokens: TokenSet, resource: str) -> bool:
        return resource == profile.login.resource or resource in tokens.resources

    async def token_for(self, resource: str) -> str:
        """An access token for another resource (RFC 8707) from the refresh token, under the
        lock. A resource the login was not granted is only asked for when the IdP is known not
        to rotate refresh tokens: oidc-provider, for one, spends the refresh token before it
        refuses an unknown resource, and the login would be lost with it."""
        async with self._lock():
            profile, tokens = self._login_required(self.load())
            if not self._granted(profile, tokens, resource):
                if tokens.rotates is None:
                    # Learn whether the IdP rotates with a refresh it will surely grant.
                    tokens = await self._refresh(profile, tokens)
                    self.save(profile, tokens)
                if tokens.rotates is not False:
                    granted = profile.login.resource or "the relay"
                    raise OidcError(
                        f"the login for {self.server} was granted tokens for {granted}, not "
                        f"{resource}, and its identity provider rotates refresh tokens: asking "
                        "it anyway could end the login, so nothing was sent. Use a service "
                        "account (--credential-file) for that audience, or ask the relay's "
                        "operator which audience to use"
                    )
            fresh = await self._refresh(profile, tokens, resource)
            # Save the rotated refresh token at once: the one we sent is spent now.
            if fresh.refresh_token and fresh.refresh_token != tokens.refresh_token:
                tokens.refresh_token = fresh.refresh_token
                tokens.rotates = True
            elif fresh.refresh_token == tokens.refresh_token:
                tokens.rotates = False
            if resource not in tokens.resources and resource != profile.login.resource:
                tokens.resources.append(resource)
            self.save(profile, tokens)
            return fresh.access_token

    async def logout(self) -> bool:
        """Revoke the refresh token (best effort) and forget everything cached."""
        cached = self.load()
        if cached is None:
            return False
        profile, tokens = cached
        if tokens.refresh_token:
            try:
                async with self._client(profile.login) as client:
                    await client.revoke(tokens.refresh_token, "refresh_token")
            except OidcError as exc:
                log.info("could not revoke the refresh token: %s", exc)
        self.store.delete(self.key)
        return True
