"""The responses the proxy writes itself (JSON, HTML pages, redirects), never cacheable, and
the test that tells a browser navigation (sign-in redirect, HTML pages) from an API call."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from . import pages

RETRY_AFTER = "5"  # seconds, on every 503 the proxy writes itself


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=json.dumps(data),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, "Cache-Control": "no-store"})


def html_response(
    body: str, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=body,
        status=status,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            **(headers or {}),
        },
    )


def wants_html(request: web.Request) -> bool:
    """A top-level browser navigation (may be redirected to sign-in); XHR, fetch() and
    non-HTML clients get 401 instead."""
    if request.method not in ("GET", "HEAD"):
        return False
    if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
        return False
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode is not None and mode.lower() != "navigate":
        return False
    return "text/html" in request.headers.get("Accept", "").lower()


def store_unavailable(request: web.Request) -> web.Response:
    """The session store is down: 503 with Retry-After, an HTML page for a browser navigation
    (not a sign-in redirect, which would need the store too), JSON otherwise."""
    headers = {"Retry-After": RETRY_AFTER}
    if wants_html(request):
        return html_response(pages.unavailable(), 503, headers)
    return json_response({"error": "session store unavailable, retry later"}, 503, headers)


class Reply(Exception):
    """Answer the request with ``response`` now (raised from deep in the request's handling)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response
