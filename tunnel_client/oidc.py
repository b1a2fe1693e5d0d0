"""OAuth 2.0 / OpenID Connect flows the CLI needs: authorization code + PKCE with a loopback
redirect (RFC 8252), device authorization (RFC 8628), refresh, client credentials, revocation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from aiohttp import web

MAX_DOCUMENT = 512 * 1024
HTTP_TIMEOUT = 30.0


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "expires_at": self.expires_at,
            "refresh_token": self.refresh_token,
            "id_token": self.id_token,
            "scope": self.scope,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenSet:
        return cls(
            access_token=str(data["access_token"]),
            expires_at=float(data["expires_at"]),
            refresh_token=data.get("refresh_token"),
            id_token=data.get("id_token"),
            scope=data.get("scope"),
        )

    def valid_for(self, seconds: float, now: float | None = None) -> bool:
        return self.expires_at - (time.time() if now is None else now) > seconds


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(64)[:96]
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


class OidcClient:
    """Talks to one issuer's endpoints (from its discovery document)."""

    def __init__(self, config: LoginConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self._metadata: dict[str, Any] | None = None

    async def _json(self, response: aiohttp.ClientResponse) -> dict[str, Any]:
        body = await response.content.read(MAX_DOCUMENT + 1)
        if len(body) > MAX_DOCUMENT:
            raise OidcError(f"response from {response.url.host} is too large")
        try:
            data = json.loads(body)
        except ValueError:
            raise OidcError(
                f"{response.url.host} answered HTTP {response.status} without JSON"
            ) from None
        if not isinstance(data, dict):
            raise OidcError(f"{response.url.host} answered a non-object")
        return data

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                async with self.session.get(url) as response:
                    data = await self._json(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = str(exc) or "timed out"
                raise OidcError(f"cannot reach the identity provider {url}: {why}") from None
            if data.get("issuer") != self.config.issuer:
                raise OidcError(f"discovery document of {self.config.issuer} names another issuer")
            self._metadata = data
        return self._metadata

    async def endpoint(self, name: str) -> str:
        value = (await self.metadata()).get(name)
        if not isinstance(value, str):
            raise OidcError(f"the identity provider does not support {name.replace('_', ' ')}")
        return value

    async def _token_request(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        url = await self.endpoint("token_endpoint")
        form = {**form, "client_id": self.config.client_id}
        headers = {"Accept": "application/json"}
        if self.config.client_secret is not None:
            # client_secret_basic (RFC 6749 2.3.1): form-encode, then base64 "id:secret".
            client_id = quote(self.config.client_id, safe="")
            pair = f"{client_id}:{quote(self.config.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            form.pop("client_id")
        try:
            async with self.session.post(url, data=form, headers=headers) as response:
                return response.status, await self._json(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcError(f"token request failed: {str(exc) or 'timed out'}") from None

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
        )

    def _resource(self, form: dict[str, str], resource: str | None = None) -> dict[str, str]:
        chosen = resource or self.config.resource
        if chosen:
            form["resource"] = chosen
        return form

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
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        nonce = secrets.token_urlsafe(24)
        result: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

        async def callback(request: web.Request) -> web.Response:
            params = dict(request.query)
            if params.get("state") != state:
                return web.Response(status=400, text="State mismatch: start the login again.")
            if not result.done():
                result.set_result(params)
            if "error" in params:
                return web.Response(text="Login failed. You can close this window.")
            return web.Response(text="Login complete. You can close this window.")

        app = web.Application()
        app.router.add_get("/callback", callback)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            redirect_uri = f"http://127.0.0.1:{port}/callback"
            query = self._resource(
                {
                    "response_type": "code",
                    "client_id": self.config.client_id,
                    "redirect_uri": redirect_uri,
                    "scope": " ".join(self.config.scopes),
                    "state": state,
                    "nonce": nonce,
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                    "prompt": "consent",
                }
            )
            url = f"{authorize}?{urlencode(query)}"
            opened = open_browser(url)
            report(
                (
                    "Your browser has been opened to visit:"
                    if opened
                    else "Open this URL in a browser on this machine:"
                )
                + f"\n\n    {url}\n"
            )
            try:
                async with asyncio.timeout(wait_seconds):
                    params = await result
            except TimeoutError:
                raise OidcError("login timed out waiting for the browser") from None
        finally:
            await runner.cleanup()
        if "error" in params:
            raise OidcError(f"login refused: {params.get('error_description') or params['error']}")
        code = params.get("code")
        if not code:
            raise OidcError("the identity provider returned no authorization code")
        status, data = await self._token_request(
            self._resource(
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": redirect_uri,
                    "code_verifier": verifier,
                }
            )
        )
        if status != 200:
            raise OidcError(f"code exchange failed: {_describe(data)}")
        tokens = self._tokens(data)
        _check_nonce(tokens.id_token, nonce)
        return tokens

    async def device_code(
        self, *, report: Callable[[str], None], sleep: Callable[[float], Any] = asyncio.sleep
    ) -> TokenSet:
        """RFC 8628: print the verification URL and code, poll until approved."""
        url = await self.endpoint("device_authorization_endpoint")
        form = self._resource(
            {"client_id": self.config.client_id, "scope": " ".join(self.config.scopes)}
        )
        try:
            async with self.session.post(url, data=form) as response:
                data = await self._json(response)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OidcError(f"device authorization failed: {str(exc) or 'timed out'}") from None
        if status != 200 or "device_code" not in data:
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
            await sleep(interval)
            status, token_data = await self._token_request(
                {
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                    "device_code": str(data["device_code"]),
                }
            )
            if status == 200:
                return self._tokens(token_data)
            error = token_data.get("error")
            if error == "authorization_pending":
                continue
            if error == "slow_down":
                interval += 5
                continue
            if error == "access_denied":
                raise OidcError("login was denied in the browser")
            if error == "expired_token":
                break
            raise OidcError(f"device login failed: {_describe(token_data)}")
        raise OidcError("the device code expired before it was approved; run login again")

    async def refresh(self, tokens: TokenSet, *, resource: str | None = None) -> TokenSet:
        if not tokens.refresh_token:
            raise LoginRequired("no refresh token")
        status, data = await self._token_request(
            self._resource(
                {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}, resource
            )
        )
        if status != 200:
            if data.get("error") in ("invalid_grant", "invalid_client", "unauthorized_client"):
                raise LoginRequired(_describe(data))
            raise OidcError(f"token refresh failed: {_describe(data)}")
        return self._tokens(data, previous=tokens)

    async def client_credentials(self, *, resource: str | None = None) -> TokenSet:
        form = self._resource({"grant_type": "client_credentials"}, resource)
        scopes = [s for s in self.config.scopes if s not in ("offline_access", "openid")]
        if scopes:
            form["scope"] = " ".join(scopes)
        status, data = await self._token_request(form)
        if status != 200:
            raise OidcError(f"service account token request failed: {_describe(data)}")
        return self._tokens(data)

    async def revoke(self, token: str, hint: str) -> bool:
        """Best effort (RFC 7009); False when the issuer has no revocation endpoint."""
        url = (await self.metadata()).get("revocation_endpoint")
        if not isinstance(url, str):
            return False
        form = {"token": token, "token_type_hint": hint, "client_id": self.config.client_id}
        try:
            async with self.session.post(url, data=form) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


def _describe(data: dict[str, Any]) -> str:
    error = str(data.get("error", "unknown error"))
    detail = data.get("error_description")
    return f"{error}: {detail}" if detail else error


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
