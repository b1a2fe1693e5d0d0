"""The console's HTTP side: pages, JSON for their live updates, actions (revoke, explain,
export) and the static files, as an aiohttp application mounted under ``/console/`` on the
admin listener. Every response carries a strict Content-Security-Policy (scripts, styles and
connections from this origin only; no inline script or style) and is never cached."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any, Literal, Protocol
from urllib.parse import urlencode

from aiohttp import web

from ..access.inventory import InventoryConfig
from ..access.policy import Explanation, explain
from ..audit_store import MAX_PAGE, AuditQuery, AuditStoreUnavailable, AuditWriter
from ..ops.admin import AdminApi
from ..relay import Relay
from . import certificates, pages
from .auth import CSRF_HEADER, Admin, ConsoleAuth, Refusal, redirect
from .cluster import ClusterSnapshot
from .views import (
    SAMPLE_EVERY,
    ExplainForm,
    FormError,
    Timeline,
    audit_query,
    explain_request,
    hour_start,
    iso,
)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a form post carries "Origin: null"
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
MAX_EXPORT = 100_000  # records one export streams at most
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}

Handler = Callable[[web.Request, Admin], Awaitable[web.StreamResponse]]


class TunnelSource(Protocol):
    async def snapshot(self) -> ClusterSnapshot: ...


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


class Console:
    """``tunnels``: where the live tunnels come from (this node, or the cluster in Redis);
    ``store``: the audit store (None: the audit page says so, charts count on this node)."""

    def __init__(
        self,
        *,
        relay: Relay,
        api: AdminApi,
        auth: ConsoleAuth,
        tunnels: TunnelSource,
        store: AuditWriter | None,
        inventory: InventoryConfig,
        timeline: Timeline,
        poll_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.relay = relay
        self.api = api
        self.auth = auth
        self.tunnels = tunnels
        self.store = store
        self.inventory = inventory
        self.timeline = timeline
        self.poll_ms = int(poll_interval * 1000)
        self.clock = clock
        self._static = {
            name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self._admin(self.overview_page))
        r.add_get("/tunnels", self._admin(self.tunnels_page))
        r.add_get("/audit", self._admin(self.audit_page))
        r.add_get("/audit/export", self._admin(self.export))
        r.add_get("/certificates", self._admin(self.certificates_page))
        r.add_get("/policy", self._admin(self.policy_page))
        r.add_post("/policy/explain", self._admin(self.explain))
        r.add_post("/revoke", self._admin(self.revoke_form))
        r.add_get("/api/overview", self._admin(self.overview_json))
        r.add_get("/api/tunnels", self._admin(self.tunnels_json))
        r.add_post("/api/revoke", self._admin(self.revoke_json))
        r.add_post("/sign_out", self._admin(self.sign_out))
        r.add_get("/sign_in", self.auth.sign_in)
        r.add_get("/callback", self.auth.callback)
        r.add_get("/signed_out", self.signed_out)
        r.add_get("/static/{name}", self.static)
        return app

    # -- plumbing -------------------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except Refusal as refusal:
            if _wants_json(request):
                body = {"error": refusal.message}
                body |= {"reference": refusal.reference} if refusal.reference else {}
                response = _json(body, refusal.status)
            else:
                link = ("/console/sign_in", "Sign in again") if refusal.status != 503 else None
                text = pages.message(
                    "Console", refusal.message, link, hint=refusal.hint, reference=refusal.reference
                )
                response = _html(text, refusal.status)
        if not response.prepared:
            response.headers.update(HEADERS)
        return response

    def _admin(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def checked(request: web.Request) -> web.StreamResponse:
            admin = await self.auth.admin(request)
            if admin is None:
                if _wants_json(request) or request.method != "GET":
                    return _json({"error": "sign in to the console"}, 401)
                return redirect("/console/sign_in?" + _rd(request), 302)
            return await handler(request, admin)

        return checked

    def _page(
        self, title: str, body: str, admin: Admin, page: str, status: int = 200
    ) -> web.Response:
        text = pages.layout(
            title, body, page=page, admin_email=admin.email, csrf=admin.csrf, poll_ms=self.poll_ms
        )
        return _html(text, status)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=STATIC[name])

    async def signed_out(self, request: web.Request) -> web.Response:
        return _html(pages.message("Signed out", "You have been signed out.",
                                   ("/console/sign_in", "Sign in again")))  # fmt: skip

    async def sign_out(self, request: web.Request, admin: Admin) -> web.StreamResponse:
        form = await request.post()
        token = form.get("csrf")
        self.auth.check_post(request, admin, token if isinstance(token, str) else None)
        return await self.auth.sign_out(request, admin)

    # -- overview -------------------------------------------------------------------------------

    async def _fragments(self) -> dict[str, str]:
        snapshot = await self.tunnels.snapshot()
        self.timeline.sample(len(snapshot.tunnels))
        now = self.clock()
        start = hour_start(now)
        activity, source = self.timeline.activity(start, 60), "this node"
        if self.store is not None:
            with contextlib.suppress(AuditStoreUnavailable):
                activity = await self.store.activity(start, 60.0, 60)
                clustered = self.store.backend.name == "postgres"
                source = "audit store, whole cluster" if clustered else "audit store, this node"
        return pages.overview_fragments(snapshot, activity, self.timeline.samples, now, source)

    async def overview_page(self, request: web.Request, admin: Admin) -> web.Response:
        return self._page("Overview", pages.overview(await self._fragments()), admin, "overview")

    async def overview_json(self, request: web.Request, admin: Admin) -> web.Response:
        return _json({"fragments": await self._fragments(), "at": iso(self.clock())})

    async def sample_forever(self) -> None:
        """Open tunnels over time, for the overview's chart, whether or not anyone looks."""
        while True:
            with contextlib.suppress(Exception):
                snapshot = await self.tunnels.snapshot()
                self.timeline.sample(len(snapshot.tunnels))
            await asyncio.sleep(SAMPLE_EVERY)

    # -- live tunnels ---------------------------------------------------------------------------

    async def tunnels_page(self, request: web.Request, admin: Admin) -> web.Response:
        snapshot = await self.tunnels.snapshot()
        flash = None
        if request.query.get("closed", "").isdigit():
            flash = f"Revoked: {int(request.query['closed'])} tunnel(s) closed on this node."
        body = pages.tunnels(snapshot, admin.csrf, flash)
        return self._page("Live tunnels", body, admin, "tunnels")

    async def tunnels_json(self, request: web.Request, admin: Admin) -> web.Response:
        snapshot = await self.tunnels.snapshot()
        return _json(
            {
                "scope": snapshot.scope,
                "note": snapshot.note,
                "at": iso(snapshot.at),
                "tunnels": [row.as_json() for row in snapshot.tunnels],
            }
        )

    async def _revoke(self, admin: Admin, kind: str, subject: str) -> int:
        if kind not in ("session", "user") or not 0 < len(subject) <= 512:
            raise Refusal(400, "Give a tunnel id or a user to revoke.")
        which: Literal["user", "session"] = "user" if kind == "user" else "session"
        closed = await self.api.revoke_subject(which, subject, admin.principal)
        self.relay.audit.record(
            "console", action=f"revoke_{kind}", decision="allow", principal=admin.principal,
            subject=subject, closed=closed,
        )  # fmt: skip
        return closed

    async def revoke_form(self, request: web.Request, admin: Admin) -> web.StreamResponse:
        form = await request.post()
        token, kind, subject = (form.get(k) for k in ("csrf", "kind", "subject"))
        self.auth.check_post(request, admin, token if isinstance(token, str) else None)
        closed = await self._revoke(admin, str(kind or ""), str(subject or ""))
        return redirect(f"/console/tunnels?closed={closed}")

    async def revoke_json(self, request: web.Request, admin: Admin) -> web.Response:
        self.auth.check_post(request, admin, request.headers.get(CSRF_HEADER))
        try:
            body = await request.json()
        except ValueError:
            raise Refusal(400, "JSON body required") from None
        if not isinstance(body, dict):
            raise Refusal(400, "JSON object required")
        closed = await self._revoke(admin, str(body.get("kind", "")), str(body.get("subject", "")))
        return _json({"closed": closed})

    # -- audit ----------------------------------------------------------------------------------

    async def audit_page(self, request: web.Request, admin: Admin) -> web.Response:
        params = {k: v for k, v in request.query.items() if len(v) <= 600}
        if self.store is None:
            body = "<p id='error'>No audit store is configured (audit_store: in the config).</p>"
            return self._page("Audit", body, admin, "audit")
        page, error = None, None
        try:
            page = await self.store.search(audit_query(params, self.clock()))
        except FormError as exc:
            error = str(exc)
        except AuditStoreUnavailable:
            error = "The audit store is unavailable; records are still in the JSON audit log."
        return self._page("Audit", pages.audit(params, page, error), admin, "audit")

    async def export(self, request: web.Request, admin: Admin) -> web.StreamResponse:
        fmt = request.query.get("format", "")
        if self.store is None or fmt not in ("csv", "jsonl"):
            raise Refusal(404, "No such export.")
        try:
            query = audit_query(request.query, self.clock(), limit=MAX_PAGE)
        except FormError as exc:
            raise Refusal(400, str(exc)) from None
        filters = {k: v[:200] for k, v in request.query.items() if k not in ("format", "before")}
        self.relay.audit.record(
            "console", action="export", decision="allow", principal=admin.principal,
            format=fmt, filters=filters,
        )  # fmt: skip
        response = web.StreamResponse(
            headers={
                **HEADERS,
                "Content-Type": "text/csv; charset=utf-8" if fmt == "csv" else "application/jsonl",
                "Content-Disposition": f"attachment; filename=audit.{fmt}",
            }
        )
        await response.prepare(request)
        await _stream_records(self.store, query, fmt, response)
        await response.write_eof()
        return response

    # -- SSH certificates -----------------------------------------------------------------------

    async def certificates_page(self, request: web.Request, admin: Admin) -> web.Response:
        params = {k: v for k, v in request.query.items() if k in ("user", "range", "before")}
        params = {k: v for k, v in params.items() if len(v) <= 600}
        issuer = self.relay.certificates
        status = issuer.status if issuer is not None else None
        found, error = None, None
        if self.store is None:
            error = "No audit store is configured (audit_store: in the config)."
        elif status is not None:
            try:
                query = audit_query({**params, "event": certificates.EVENT}, self.clock())
                found = await self.store.search(query)
            except FormError as exc:
                error = str(exc)
            except AuditStoreUnavailable:
                error = "The audit store is unavailable; records are still in the JSON audit log."
        body = certificates.page(params, found, status, error)
        return self._page("SSH certificates", body, admin, "certificates")

    # -- policy ---------------------------------------------------------------------------------

    async def policy_page(self, request: web.Request, admin: Admin) -> web.Response:
        body = pages.policy(self.relay.policy, admin.csrf, ExplainForm(), None, None)
        return self._page("Policy", body, admin, "policy")

    async def explain(self, request: web.Request, admin: Admin) -> web.Response:
        form_data = await request.post()
        token = form_data.get("csrf")
        self.auth.check_post(request, admin, token if isinstance(token, str) else None)
        fields = {k: str(form_data.get(k, ""))[:2000] for k in ExplainForm.__dataclass_fields__}
        form = ExplainForm(**fields)
        result: Explanation | None = None
        error = None
        try:
            access, at = explain_request(form, self.inventory, self.clock())
            result = explain(access, self.relay.policy, at)
        except FormError as exc:
            error = str(exc)
        self.relay.audit.record(
            "console", action="explain", decision="allow", principal=admin.principal,
            members=fields["members"][:500], target=fields["target"][:300],
            port=fields["port"][:10], allowed=result.decision.allowed if result else None,
        )  # fmt: skip
        body = pages.policy(self.relay.policy, admin.csrf, form, result, error)
        return self._page("Policy", body, admin, "policy", 400 if error else 200)


async def _stream_records(
    store: AuditWriter, query: AuditQuery, fmt: str, response: web.StreamResponse
) -> None:
    """Every matching record, page by page (at most MAX_EXPORT), as CSV or JSON lines."""
    columns = ("time", "event", "node", "decision", "principal", "resource", "port",
               "source_ip", "tunnel_id", "reason")  # fmt: skip
    if fmt == "csv":
        await response.write((",".join(columns) + ",record\r\n").encode())
    sent = 0
    while sent < MAX_EXPORT:
        try:
            page = await store.search(query)
        except AuditStoreUnavailable:
            return  # the body ends early; the client sees a short file
        chunk = io.StringIO()
        writer = csv.writer(chunk)
        for stored in page.records:
            record = stored.record
            if fmt == "jsonl":
                chunk.write(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
            else:
                row = [_cell(record.get(c)) for c in columns]
                writer.writerow([*row, _cell(json.dumps(record, sort_keys=True))])
        await response.write(chunk.getvalue().encode())
        sent += len(page.records)
        if page.next is None:
            return
        query = AuditQuery(**{**_fields(query), "before": page.next})


def _fields(query: AuditQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in query.__dataclass_fields__}


def _cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/console/api/") or "application/json" in request.headers.get(
        "Accept", ""
    )


def _rd(request: web.Request) -> str:
    return urlencode({"rd": request.path_qs})


@contextlib.asynccontextmanager
async def sampling(console: Console) -> AsyncIterator[None]:
    task = asyncio.create_task(console.sample_forever(), name="console-sampler")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
