"""An HTTP-mode proxy on loopback in front of the demo upstream (scripts/demo_web.py), with a
policy from a dict, for the tests in this package."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from scripts.demo_web import make_app
from tunnel_server.audit import AuditLog
from tunnel_server.config import OidcConfig
from tunnel_server.http_proxy import HttpModeConfig, HttpProxy, serving
from tunnel_server.policy import Policy, parse_policy

from ..helpers import LOG_LINES

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
) -> AsyncIterator[Stack]:
    """A proxy with one route per app (``NAME.localhost`` -> its own demo upstream)."""
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

        proxy = HttpProxy(
            config,
            issuers=[OidcConfig(issuer=issuer, audiences=["unused"])],
            policy=lambda: current["policy"],
            audit=AuditLog("test-node", sink=sink),
        )
        bound = await stack.enter_async_context(serving(proxy, "127.0.0.1", 0, sock=sock))
        yield Stack(proxy, bound, ports, audit)
