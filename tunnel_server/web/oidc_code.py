"""The authorization code flow both browser sign-ins share (HTTP mode's and the console's), on
authlib: PKCE S256 and the authorization URL, client authentication (client_secret_basic) and
the token response at the code exchange, and the ID token's code-flow claims (nonce, azp,
at_hash, auth_time) through its ``CodeIDToken``. Kept here because authlib lacks them: discovery
with an issuer check, the pending login's state bound to the browser and the origin, the ID
token's signature and identity through the relay's own ``TokenVerifier`` (one JWKS cache and
one algorithm list for every token the relay accepts), and naming the step that failed.

Errors::

    SignInFailed            kind: which step (FAILURE_KINDS); detail: for the audit record only
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import httpx2
import jwt
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc.errors import JoseError

from ..access.identity import AuthError, Identity, IssuerUnavailable, TokenVerifier
from ..config import WebLoginConfig
from .sessions import PendingLogin, SessionStore

FailureKind = Literal["state", "provider", "unreachable", "exchange", "id_token", "not_allowed"]
FAILURE_KINDS: tuple[FailureKind, ...] = get_args(FailureKind)
MAX_ID = 128  # longest session id or state accepted from a browser
MAX_DOCUMENT = 512 * 1024  # discovery documents and token responses
HTTP_TIMEOUT = 15.0
LEEWAY = 60  # seconds of clock skew allowed on exp and iat
# An OAuth error code as RFC 6749 section 4.1.2.1 allows it; anything else is not shown.
_ERROR_CODE = re.compile(r"[a-z_]{1,40}")


class SignInFailed(Exception):
    """A browser sign-in did not complete. ``kind`` decides the page and the status; ``detail``
    goes to the audit record (never to the page: it may name the provider's internals)."""

    def __init__(self, kind: FailureKind, detail: str, provider_error: str | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        # The provider's own error code (access_denied, login_required, ...) when it sent one.
        self.provider_error = provider_error


class CodeFlow:
    """One confidential login client of one issuer. ``verifier`` checks the ID token's
    signature, issuer, audience (the client id) and expiry and maps it to an Identity;
    ``max_age`` (seconds) asks the provider to re-authenticate older logins."""

    def __init__(
        self,
        login: WebLoginConfig,
        verifier: TokenVerifier,
        *,
        max_age: float | None = None,
        clock: Callable[[], float] = time.time,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.login = login
        self.verifier = verifier
        self.max_age = max_age
        self.clock = clock
        # One context for every request (system trust, as the relay's other HTTP clients use):
        # building one per sign-in would cost more than the request.
        self._ssl = ssl_context or ssl.create_default_context()
        self._discovery: dict[str, Any] | None = None

    def _client(self) -> AsyncOAuth2Client:
        """A client per exchange: authlib keeps the last token on the client object, and two
        users' sign-ins must not share one. trust_env off: the relay's other clients ignore
        HTTPS_PROXY too."""
        return AsyncOAuth2Client(
            client_id=self.login.client_id,
            client_secret=self.login.client_secret,
            token_endpoint_auth_method="client_secret_basic",
            code_challenge_method="S256",
            verify=self._ssl,
            trust_env=False,
            timeout=httpx2.Timeout(HTTP_TIMEOUT),
            follow_redirects=False,
        )

    async def discover(self) -> dict[str, Any]:
        """The provider's discovery document (cached); SignInFailed("unreachable") when it
        cannot be fetched or names another issuer."""
        if self._discovery is None:
            url = self.login.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                async with self._client() as oauth:
                    response = await oauth.request("GET", url, withhold_token=True)
            except httpx2.HTTPError as exc:
                raise SignInFailed("unreachable", f"discovery: {type(exc).__name__}") from None
            document = _json_object(response)
            if document is None or response.status_code != 200:
                raise SignInFailed("unreachable", f"discovery: HTTP {response.status_code}")
            if document.get("issuer") != self.login.issuer:
                raise SignInFailed("unreachable", "discovery document names another issuer")
            for name in ("authorization_endpoint", "token_endpoint"):
                if not isinstance(document.get(name), str):
                    raise SignInFailed("unreachable", f"discovery document has no {name}")
            self._discovery = document
        return self._discovery

    def pending(self, *, return_to: str, host: str, lifetime: float) -> PendingLogin:
        """A new pending login: state, nonce and PKCE verifier from authlib's token generator,
        and the random value the login cookie binds it to this browser with."""
        return PendingLogin(
            state=generate_token(32),
            nonce=generate_token(32),
            verifier=generate_token(64),
            return_to=return_to,
            host=host,
            browser=secrets.token_urlsafe(24),
            expires=self.clock() + lifetime,
        )

    async def authorization_url(self, pending: PendingLogin, redirect_uri: str) -> str:
        endpoint = str((await self.discover())["authorization_endpoint"])
        extra = {"max_age": str(int(self.max_age))} if self.max_age is not None else {}
        url: str = prepare_grant_uri(
            endpoint,
            client_id=self.login.client_id,
            response_type="code",
            redirect_uri=redirect_uri,
            scope=self.login.scopes,
            state=pending.state,
            nonce=pending.nonce,
            code_challenge=create_s256_code_challenge(pending.verifier),
            code_challenge_method="S256",
            **extra,
        )
        return url

    @staticmethod
    async def take_pending(
        store: SessionStore, query: Mapping[str, str], browser: str, host: str
    ) -> PendingLogin:
        """The pending login the callback's ``state`` names, used up; SignInFailed("state")
        unless it exists, has not expired, and was started by this browser on this origin.
        SessionStoreUnavailable passes through."""
        state = query.get("state", "")
        pending = await store.pop_pending(state) if 0 < len(state) <= MAX_ID else None
        if pending is None:
            raise SignInFailed("state", "unknown or expired state")
        if not hmac.compare_digest(pending.browser, browser):
            raise SignInFailed("state", "state from another browser")
        if pending.host != host:  # a pending login of another app or the console (shared store)
            raise SignInFailed("state", "state of another origin")
        return pending

    async def redeem(
        self, query: Mapping[str, str], pending: PendingLogin, redirect_uri: str
    ) -> tuple[Identity, dict[str, Any]]:
        """The callback's code for a verified identity and the ID token's claims."""
        if "error" in query:
            # Only a plain error code is repeated (on the page too): the query is anybody's.
            code = query["error"] if _ERROR_CODE.fullmatch(query["error"]) else None
            raise SignInFailed("provider", f"provider error {code or '(not a plain code)'}", code)
        if not query.get("code"):
            raise SignInFailed("provider", "no code in the callback")
        token_endpoint = str((await self.discover())["token_endpoint"])
        try:
            async with self._client() as oauth:
                tokens = await oauth.fetch_token(
                    token_endpoint,
                    grant_type="authorization_code",
                    code=query["code"],
                    redirect_uri=redirect_uri,
                    code_verifier=pending.verifier,
                )
        except OAuthError as exc:
            raise SignInFailed("exchange", f"code exchange refused: {exc.error}") from None
        except httpx2.HTTPError as exc:
            raise SignInFailed("unreachable", f"code exchange: {type(exc).__name__}") from None
        except ValueError:  # not JSON
            raise SignInFailed("exchange", "code exchange answered without JSON") from None
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("exchange", "no id token in the token response")
        return await self._verify(id_token, tokens.get("access_token"), pending)

    async def _verify(
        self, id_token: str, access_token: object, pending: PendingLogin
    ) -> tuple[Identity, dict[str, Any]]:
        try:
            identity = await self.verifier.verify(id_token)
        except IssuerUnavailable as exc:
            raise SignInFailed("unreachable", f"id token: {exc.reason}") from None
        except AuthError as exc:
            raise SignInFailed("id_token", exc.reason) from None
        # The signature is verified above; authlib checks the claims of the code flow.
        claims: dict[str, Any] = jwt.decode(id_token, options={"verify_signature": False})
        header = jwt.get_unverified_header(id_token)
        params: dict[str, Any] = {"nonce": pending.nonce, "client_id": self.login.client_id}
        if isinstance(access_token, str):
            params["access_token"] = access_token
        if self.max_age is not None:
            params["max_age"] = int(self.max_age)
        expected = {
            "iss": {"essential": True, "value": self.login.issuer},
            "aud": {"essential": True, "value": self.login.client_id},
        }
        try:
            CodeIDToken(claims, header, options=expected, params=params).validate(
                now=int(self.clock()), leeway=LEEWAY
            )
        except JoseError as exc:
            raise SignInFailed("id_token", f"id token: {exc.error}: {exc.description}") from None
        return identity, claims


def _json_object(response: httpx2.Response) -> dict[str, Any] | None:
    if len(response.content) > MAX_DOCUMENT:
        return None
    try:
        data = json.loads(response.content)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
