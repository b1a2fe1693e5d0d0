"""An HTTP-mode proxy on loopback in front of the demo upstream (scripts/demo_web.py), with a
policy from a dict, and a token endpoint for browser logins, for the tests in this package."""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from scripts.demo_web import make_app
from tunnel_server.access.identity import Audience, Authenticator
from tunnel_server.access.policy import Policy, parse_policy
from tunnel_server.audit import AuditLog
from tunnel_server.build import build_verifier
from tunnel_server.config import OidcConfig
from tunnel_server.web import HttpModeConfig, HttpProxy, SessionStore, serving

from ..helpers import LOG_LINES
from ..oidc_fixture import TestIssuer

APP_AUDIENCE = "https://demo.app"  # bearer tokens for the app carry this aud


def web_policy(members: dict[str, list[str]], extra: list[dict[str, Any]] | None = None) -> Policy:
    """``{"demo": ["user:alice@example.com"]}`` -> webUser bindings on app:NAME."""
    bindings = [
        {"name": f"web-{app}", "members": m, "role": "webUser", "resources": {"apps": [app]}}
        for app, m in members.items()
    ]
    return parse_policy({"bindings": bindings + (extra or [])})


@dataclass
class Stack:
    proxy: HttpProxy
    port: int
    upstream_ports: dict[str, int]
    audit: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def host(self, app: str = "demo") -> str:
        return f"{app}.localhost:{self.port}"


@asynccontextmanager
async def upstream(issuer_url: str, audience: str) -> AsyncIterator[int]:
    runner = web.AppRunner(make_app(issuer=issuer_url, audience=audience), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxy_stack(
    issuer: str,
    policy: Policy,
    *,
    apps: tuple[str, ...] = ("demo", "other"),
    login: dict[str, Any] | None = None,
    sock: socket.socket | None = None,
    extra: dict[str, Any] | None = None,
    audiences: dict[str, list[str]] | None = None,
    hosts: dict[str, str] | None = None,
    store: SessionStore | None = None,
    route_options: dict[str, dict[str, Any]] | None = None,
) -> AsyncIterator[Stack]:
    """A proxy with one route per app (``NAME.localhost`` -> its own demo upstream, with the
    app's ``route_options``), its browser sessions in ``store`` (default: in memory)."""
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    issuer_url = f"http://127.0.0.1:{port}"
    current = {"policy": policy}
    audit: list[str] = []
    async with AsyncExitStack() as stack:
        ports = {
            app: await stack.enter_async_context(upstream(issuer_url, f"app:{app}")) for app in apps
        }
        data: dict[str, Any] = {
            "issuer_url": issuer_url,
            "external_scheme": "http",
            "routes": [
                {
                    "name": app,
                    "host": (hosts or {}).get(app, f"{app}.localhost"),
                    "upstream": f"http://127.0.0.1:{ports[app]}",
                    "audiences": (audiences or {}).get(
                        app, [APP_AUDIENCE if app == "demo" else f"https://{app}.app"]
                    ),
                    **(route_options or {}).get(app, {}),
                }
                for app in apps
            ],
            **(extra or {}),
        }
        if login is not None:
            data["login"] = login
        config = HttpModeConfig.model_validate(data)

        def sink(line: str) -> None:
            LOG_LINES.append(line)
            audit.append(line)

        # As the relay builds them: one verifier per issuer, bound to each app's audiences by
        # the proxy, and to the login client's for browser logins.
        verifier = build_verifier(OidcConfig(issuer=issuer, audiences=["unused"]))
        stack.push_async_callback(verifier.aclose)
        proxy = HttpProxy(
            config,
            authenticator=Authenticator([verifier]),
            login_verifier=Audience(verifier, [config.login.client_id]) if config.login else None,
            policy=lambda: current["policy"],
            audit=AuditLog("test-node", sink=sink),
            store=store,
        )
        bound = await stack.enter_async_context(serving(proxy, "127.0.0.1", 0, sock=sock))
        yield Stack(proxy, bound, ports, audit)


@dataclass
class TokenEndpoint:
    """The authorization-code half of an IdP for ``TestIssuer`` (which serves discovery and
    JWKS only): ``authorize`` plays the user signing in at the authorization URL the proxy
    redirected to, and ``POST /token`` redeems the code once (with client_secret_basic and the
    PKCE verifier of the URL's S256 challenge) for an ID token with its nonce."""

    issuer: TestIssuer
    client_id: str = "tunnel-web"
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port = int(self._runner.addresses[0][1])
        self.issuer.discovery_overrides["token_endpoint"] = f"http://127.0.0.1:{port}/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def login(self) -> dict[str, Any]:
        """The ``login:`` block of the HTTP-mode config for this IdP."""
        return {"issuer": self.issuer.issuer, "client_id": self.client_id, "client_secret": "s"}

    def authorize(self, location: str, **mint: Any) -> dict[str, str]:
        """The callback's query for the authorization URL ``location`` (state and a new code
        that redeems to a token minted with ``mint``)."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        assert query["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.codes[code] = {**mint, "nonce": query["nonce"], "challenge": query["code_challenge"]}
        return {"state": query["state"], "code": code}

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant = self.codes.pop(str(form.get("code", "")), None)  # one use
        verifier = str(form.get("code_verifier", "")).encode("ascii")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
        if grant is None or digest.decode("ascii") != grant.pop("challenge"):  # PKCE S256
            return web.json_response({"error": "invalid_grant"}, status=400)
        if not request.headers.get("Authorization", "").startswith("Basic "):
            return web.json_response({"error": "invalid_client"}, status=401)
        nonce = grant.pop("nonce")
        token = self.issuer.mint(aud=self.client_id, extra_claims={"nonce": nonce}, **grant)
        return web.json_response({"id_token": token, "token_type": "Bearer"})
