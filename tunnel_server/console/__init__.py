"""The admin console: a browser UI on the admin listener (``/console/``) for relay admins, who
sign in with the same OIDC browser login as HTTP mode.

- ``auth``: sign-in, the admin check on every request, CSRF and origin checks;
- ``cluster``: the live tunnels and nodes, this node's or the whole cluster's (Redis);
- ``views``: the pages' data (activity, the audit search form, the explain form);
- ``pages``: the HTML (everything escaped; inline SVG charts; no inline script or style);
- ``app``: routes, JSON for live updates, actions (revoke, explain, export);
- ``static/``: the one script and style sheet, served by the relay (no CDN).

``running_console`` builds it for the composition root. docs/console.md describes it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web

from ..access.identity import TokenVerifier
from ..access.inventory import InventoryConfig
from ..audit_store import AuditWriter
from ..config import ConsoleConfig, StateConfig
from ..ops.admin import AdminApi
from ..web import build_session_store
from .app import Console, sampling
from .auth import ConsoleAuth, redirect
from .cluster import LocalTunnels, RedisTunnels
from .views import Timeline

__all__ = ["Console", "mount", "running_console"]


@contextlib.asynccontextmanager
async def running_console(
    config: ConsoleConfig,
    *,
    api: AdminApi,
    verifier: TokenVerifier,
    state: StateConfig,
    inventory: InventoryConfig,
    store: AuditWriter | None,
    advertise_url: str = "",
) -> AsyncIterator[Console]:
    """The console with its session store (the ``state:`` backend's: memory, or
    Redis shared by every node) and tunnel source, closed on the way out."""
    relay = api.relay
    sessions = build_session_store(state)
    stats = (lambda: store.stats()) if store is not None else (lambda: None)
    tunnels: LocalTunnels | RedisTunnels
    if state.backend == "redis" and state.redis_url:
        client = aioredis.Redis.from_url(
            state.redis_url, socket_timeout=state.timeout, socket_connect_timeout=state.timeout
        )
        tunnels = RedisTunnels(
            relay, client, prefix=state.key_prefix, url=advertise_url,
            interval=max(1.0, config.poll_interval), store=stats,
        )  # fmt: skip
    else:
        tunnels = LocalTunnels(relay, stats)
    timeline = Timeline()
    relay.audit.observers.append(timeline.observe_audit)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(sessions.aclose)
        auth = ConsoleAuth(
            config, store=sessions, verifier=verifier, is_admin=api.is_admin,
            is_revoked=api.revocations.is_revoked, audit=relay.audit,
        )  # fmt: skip
        console = Console(
            relay=relay, api=api, auth=auth, tunnels=tunnels, store=store, inventory=inventory,
            timeline=timeline, poll_interval=config.poll_interval,
        )  # fmt: skip
        await tunnels.start()
        stack.push_async_callback(tunnels.aclose)
        await stack.enter_async_context(sampling(console))
        yield console


def mount(root: web.Application, console: Console) -> None:
    """``/console/`` on the admin listener, and ``/`` pointing there."""

    async def home(request: web.Request) -> web.Response:
        return redirect("/console/", 302)

    root.add_subapp("/console", console.app())
    root.router.add_get("/", home)
