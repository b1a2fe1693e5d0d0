"""OAuth 2.0 / OpenID Connect flows the CLI needs, on authlib's AsyncOAuth2Client (httpx2):
authorization code + PKCE S256 with a loopback redirect (RFC 8252), device authorization
(RFC 8628), refresh, client credentials, revocation (RFC 7009).

authlib builds the requests, client authentication, PKCE and the token response parsing; this
module keeps only what authlib lacks: discovery with an issuer check, the loopback redirect
listener, the device-flow polling loop (``authorization_pending``, ``slow_down``), the nonce
check and the translation of errors into messages for people. Every request goes through the
proxy that tunnel_client.proxies chose.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx2
from aiohttp import web
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from .http import HTTP_TIMEOUT, client_kwargs, request_failure

__all__ = [
    "DEVICE_GRANT",
    "HTTP_TIMEOUT",
    "LoginConfig",
    "LoginRequired",
    "OidcClient",
    "OidcError",
    "TokenSet",
    "is_loopback_url",
]

MAX_DOCUMENT = 512 * 1024
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Refresh-token errors after which only a new login helps (RFC 6749 section 5.2).
_RELOGIN_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


class OidcError(Exception):
    """A flow failed; the message says what happened and, where it helps, what to do."""


class LoginRequired(OidcError):
    """The cached credential cannot be renewed: the user must run ``tunnel-client login``."""


@dataclass(frozen=True)
class LoginConfig:
    """What a client needs to log in; published by the relay at /.well-known/tunnel-client."""

    issuer: str
    client_id: str
    scopes: tuple[str, ...] = ("openid", "email", "profile", "groups", "offline_access")
    resource: str | None = None  # RFC 8707 resource indicator (the relay's audience)
    client_secret: str | None = None  # service accounts only


@dataclass
class TokenSet:
    access_token: str
    expires_at: float
    refresh_token: str | None = None
    id_token: str | None = None
    scope: str | None = None
    # Learned from the IdP's answers: does it rotate refresh tokens (None: not yet known), and
    # which resources (RFC 8707) has it issued tokens for from this grant.
    rotates: bool | None = None
    resources: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "refresh_token": self.refresh_token,
            "id_token": self.id_token,
            "scope": self.scope,
            "rotates": self.rotates,
            "resources": list(self.resources),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenSet:
        resources = data.get("resources")
        return cls(
            access_token=str(data["access_token"]),
            expires_at=float(data["expires_at"]),
            refresh_token=data.get("refresh_token"),
            id_token=data.get("id_token"),
            scope=data.get("scope"),
            rotates=data.get("rotates"),
            resources=[str(r) for r in resources] if isinstance(resources, list) else [],
        )

    def valid_for(self, seconds: float, now: float | None = None) -> bool:
        return self.expires_at - (time.time() if now is None else now) > seconds


def _describe(error: OAuthError | dict[str, Any]) -> str:
    if isinstance(error, OAuthError):
        name, detail = str(error.error or "unknown error"), error.description
    else:
        name, detail = str(error.get("error", "unknown error")), error.get("error_description")
    return f"{name}: {detail}" if detail else name


class OidcClient:
    """One issuer's endpoints (from its discovery document), through one authlib client; use as
    ``async with OidcClient(config, ssl_context=..., proxy=...) as client``."""

    def __init__(
        self,
        config: LoginConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        self.config = config
        self.proxy = proxy
        self._metadata: dict[str, Any] | None = None
        self.oauth = AsyncOAuth2Client(
            client_id=config.client_id,
            client_secret=config.client_secret,
            token_endpoint_auth_method="client_secret_basic" if config.client_secret else "none",
            revocation_endpoint_auth_method="client_secret_basic"
            if config.client_secret
            else "none",
            code_challenge_method="S256",
            **client_kwargs(ssl_context=ssl_context, proxy=proxy, timeout=timeout),
        )

    async def __aenter__(self) -> OidcClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.oauth.aclose()

    def _unreachable(self, exc: httpx2.HTTPError, what: str) -> OidcError:
        host = urlsplit(self.config.issuer).netloc
        return OidcError(f"{what}: " + str(request_failure(exc, host, self.proxy)))

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                response = await self.oauth.request("GET", url, withhold_token=True)
            except httpx2.HTTPError as exc:
                raise self._unreachable(exc, "cannot reach the identity provider") from None
            data = self._json(response)
            if data.get("issuer") != self.config.issuer:
                raise OidcError(f"discovery document of {self.config.issuer} names another issuer")
            self._metadata = data
        return self._metadata

    @staticmethod
    def _json(response: httpx2.Response) -> dict[str, Any]:
        if len(response.content) > MAX_DOCUMENT:
            raise OidcError(f"response from {response.url.host} is too large")
        try:
            data = json.loads(response.content)
        except ValueError:
            raise OidcError(
                f"{response.url.host} answered HTTP {response.status_code} without JSON"
            ) from None
        if not isinstance(data, dict):
            raise OidcError(f"{response.url.host} answered a non-object")
        return data

    async def endpoint(self, name: str) -> str:
        value = (await self.metadata()).get(name)
        if not isinstance(value, str):
            raise OidcError(f"the identity provider does not support {name.replace('_', ' ')}")
        return value

    def _resource(self, form: dict[str, str], resource: str | None = None) -> dict[str, str]:
        chosen = resource or self.config.resource
        if chosen:
            form["resource"] = chosen
        return form

    async def _token(self, what: str, **form: str) -> TokenSet:
        """POST to the token endpoint through authlib; OAuthError passes through."""
        url = await self.endpoint("token_endpoint")
        try:
            data = await self.oauth.fetch_token(url, **form)
        except httpx2.HTTPError as exc:
            raise self._unreachable(exc, f"{what} failed") from None
        except ValueError:  # not JSON
            raise OidcError(f"{what} failed: the identity provider did not answer JSON") from None
        return self._tokens(dict(data))

    def _tokens(self, data: dict[str, Any], previous: TokenSet | None = None) -> TokenSet:
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise OidcError("the token response has no access_token")
        expires_in = data.get("expires_in", 3600)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = 3600
        return TokenSet(
            access_token=token,
            expires_at=time.time() + float(expires_in),
            refresh_token=data.get("refresh_token")
            or (previous.refresh_token if previous else None),
            id_token=data.get("id_token") or (previous.id_token if previous else None),
            scope=data.get("scope"),
            rotates=previous.rotates if previous else None,
            resources=list(previous.resources) if previous else [],
        )

    # -- flows ----------------------------------------------------------------------------------

    async def authorization_code(
        self,
        *,
        open_browser: Callable[[str], bool],
        report: Callable[[str], None],
        wait_seconds: float = 300.0,
    ) -> TokenSet:
        """Browser login: PKCE S256, state and nonce; the code arrives on a loopback redirect."""
        authorize = await self.endpoint("authorization_endpoint")
        verifier = generate_token(64)
        nonce = secrets.token_urlsafe(24)
        async with _LoopbackRedirect() as redirect:
            url, state = self.oauth.create_authorization_url(
                authorize,
                code_verifier=verifier,
                redirect_uri=redirect.uri,
                scope=" ".join(self.config.scopes),
                nonce=nonce,
                prompt="consent",
                **self._resource({}),
            )
            redirect.state = state
            opened = open_browser(url)
            report(
                (
                    "Your browser has been opened to visit:"
                    if opened
                    else "Open this URL in a browser on this machine:"
                )
                + f"\n\n    {url}\n"
            )
            params = await redirect.wait(wait_seconds)
        if "error" in params:
            raise OidcError(f"login refused: {params.get('error_description') or params['error']}")
        code = params.get("code")
        if not code:
            raise OidcError("the identity provider returned no authorization code")
        try:
            tokens = await self._token(
                "code exchange",
                grant_type="authorization_code",
                code=code,
                redirect_uri=redirect.uri,
                code_verifier=verifier,
                **self._resource({}),
            )
        except OAuthError as exc:
            raise OidcError(f"code exchange failed: {_describe(exc)}") from None
        _check_nonce(tokens.id_token, nonce)
        return tokens

    async def device_code(
        self,
        *,
        report: Callable[[str], None],
        waiting: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> TokenSet:
        """RFC 8628: print the verification URL and code, poll until approved. authlib has no
        device-flow helper: the start request and the polling loop are ours, each token request
        is authlib's. ``waiting`` is called before every poll (the spinner)."""
        url = await self.endpoint("device_authorization_endpoint")
        form = self._resource(
            {"client_id": self.config.client_id, "scope": " ".join(self.config.scopes)}
        )
        try:
            response = await self.oauth.request("POST", url, data=form, withhold_token=True)
        except httpx2.HTTPError as exc:
            raise self._unreachable(exc, "device authorization failed") from None
        data = self._json(response)
        if response.status_code != 200 or "device_code" not in data:
            raise OidcError(f"device authorization failed: {_describe(data)}")
        uri = data.get("verification_uri_complete") or data.get("verification_uri")
        report(
            f"To log in, visit:\n\n    {data.get('verification_uri')}\n\n"
            f"and enter the code: {data.get('user_code')}\n"
            + (f"\n(or open {uri})\n" if uri != data.get("verification_uri") else "")
        )
        interval = float(data.get("interval", 5))
        deadline = time.monotonic() + float(data.get("expires_in", 600))
        while time.monotonic() < deadline:
            waiting()
            await sleep(interval)
            try:
                return await self._token(
                    "device login", grant_type=DEVICE_GRANT, device_code=str(data["device_code"])
                )
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    continue
                if exc.error == "access_denied":
                    raise OidcError("login was denied in the browser") from None
                if exc.error == "expired_token":
                    break
                raise OidcError(f"device login failed: {_describe(exc)}") from None
        raise OidcError("the device code expired before it was approved; run login again")

    async def refresh(self, tokens: TokenSet, *, resource: str | None = None) -> TokenSet:
        if not tokens.refresh_token:
            raise LoginRequired("no refresh token")
        url = await self.endpoint("token_endpoint")
        try:
            data = await self.oauth.refresh_token(
                url, refresh_token=tokens.refresh_token, **self._resource({}, resource)
            )
        except OAuthError as exc:
            if exc.error in _RELOGIN_ERRORS:
                raise LoginRequired(_describe(exc)) from None
            raise OidcError(f"token refresh failed: {_describe(exc)}") from None
        except httpx2.HTTPError as exc:
            raise self._unreachable(exc, "token refresh failed") from None
        except ValueError:
            raise OidcError(
                "token refresh failed: the identity provider did not answer JSON"
            ) from None
        fresh = self._tokens(dict(data), previous=tokens)
        new_refresh = data.get("refresh_token")
        if new_refresh:
            fresh.rotates = new_refresh != tokens.refresh_token
        return fresh

    async def client_credentials(self, *, resource: str | None = None) -> TokenSet:
        form = self._resource({}, resource)
        scopes = [s for s in self.config.scopes if s not in ("offline_access", "openid")]
        if scopes:
            form["scope"] = " ".join(scopes)
        try:
            return await self._token(
                "service account token request", grant_type="client_credentials", **form
            )
        except OAuthError as exc:
            raise OidcError(f"service account token request failed: {_describe(exc)}") from None

    async def revoke(self, token: str, hint: str) -> bool:
        """Best effort (RFC 7009); False when the issuer has no revocation endpoint."""
        url = (await self.metadata()).get("revocation_endpoint")
        if not isinstance(url, str):
            return False
        try:
            response = await self.oauth.revoke_token(url, token=token, token_type_hint=hint)
        except httpx2.HTTPError:
            return False
        return bool(response.status_code == 200)


class _LoopbackRedirect:
    """The RFC 8252 redirect target: http://127.0.0.1:<free port>/callback, for one answer."""

    def __init__(self) -> None:
        self.state = ""
        self.uri = ""
        self._result: asyncio.Future[dict[str, str]] | None = None
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> _LoopbackRedirect:
        self._result = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get("/callback", self._callback)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.uri = f"http://127.0.0.1:{self._runner.addresses[0][1]}/callback"
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _callback(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        if not self.state or params.get("state") != self.state:
            return web.Response(status=400, text="State mismatch: start the login again.")
        assert self._result is not None
        if not self._result.done():
            self._result.set_result(params)
        if "error" in params:
            return web.Response(text="Login failed. You can close this window.")
        return web.Response(text="Login complete. You can close this window.")

    async def wait(self, seconds: float) -> dict[str, str]:
        assert self._result is not None
        try:
            async with asyncio.timeout(seconds):
                return await self._result
        except TimeoutError:
            raise OidcError("login timed out waiting for the browser") from None


def _check_nonce(id_token: str | None, nonce: str) -> None:
    """The ID token came straight from the token endpoint over TLS (OIDC Core 3.1.3.7 allows
    skipping its signature check then), but its nonce must match this login's."""
    if id_token is None:
        return
    try:
        payload = id_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise OidcError("the identity provider returned a malformed ID token") from exc
    if claims.get("nonce") != nonce:
        raise OidcError("the ID token's nonce does not match this login")


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("127.0.0.1", "::1", "localhost")
