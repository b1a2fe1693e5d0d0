"""Header hygiene between the client and the upstream: hop-by-hop headers and every
client-sent identity, client-address and URL-override header (the table in ``foreign.py``) are
removed before the proxy adds its own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from .foreign import DEFAULT_FILTER, HeaderFilter

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
ASSERTION_HEADER = "X-Tunnel-Jwt-Assertion"
EMAIL_HEADER = "X-Tunnel-Authenticated-User-Email"
ID_HEADER = "X-Tunnel-Authenticated-User-Id"


def is_identity_header(name: str) -> bool:
    """In the table of headers never passed from the client (``foreign.FAMILIES``)."""
    return DEFAULT_FILTER.strips(name)


def connection_tokens(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    values = headers.getall("Connection", []) if isinstance(headers, CIMultiDictProxy) else []
    if not values and "Connection" in headers:
        values = [headers["Connection"]]
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def strip_hop_by_hop(headers: CIMultiDictProxy[str], extra: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers (including those named in Connection) and ``extra``."""
    drop = HOP_BY_HOP | connection_tokens(headers) | {e.lower() for e in extra}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


def upstream_headers(
    headers: CIMultiDictProxy[str],
    *,
    consumed_authorization: bool,
    identity: Mapping[str, str],
    forwarded_for: str,
    proto: str,
    host: str,
    strip: HeaderFilter = DEFAULT_FILTER,
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop headers, those ``strip`` names (identity, client
    address, URL overrides: the route's filter) and the Authorization header the proxy
    consumed, plus the proxy's identity and forwarding headers."""
    drop = HOP_BY_HOP | connection_tokens(headers)
    if consumed_authorization:
        drop = drop | {"authorization"}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop and lower != "host" and not strip.strips(name):
            out.add(name, value)
    if "cookie" in out:
        cookies = [c for c in _split_cookies(out.getall("cookie")) if not _is_proxy_cookie(c)]
        out.popall("cookie")
        if cookies:
            out["Cookie"] = "; ".join(cookies)
    for name, value in identity.items():
        out[name] = value
    out["X-Forwarded-For"] = forwarded_for
    out["X-Forwarded-Proto"] = proto
    out["X-Forwarded-Host"] = host
    return out


def _split_cookies(values: Sequence[str]) -> list[str]:
    return [c.strip() for v in values for c in v.split(";") if c.strip()]


def _is_proxy_cookie(cookie: str) -> bool:
    return cookie.split("=", 1)[0].strip().startswith("__Host-tunnel_")


def response_headers(headers: CIMultiDictProxy[str], *, authenticated: bool) -> CIMultiDict[str]:
    """Upstream response headers for the client: no hop-by-hop headers, and authenticated
    responses never cacheable by shared caches (``public``/``s-maxage`` dropped, ``private``
    added unless ``private`` or ``no-store`` is already there)."""
    out = strip_hop_by_hop(headers)
    if authenticated:
        directives = [
            d.strip() for v in out.getall("Cache-Control", []) for d in v.split(",") if d.strip()
        ]
        shared = ("public", "s-maxage")
        kept = [d for d in directives if d.split("=", 1)[0].strip().lower() not in shared]
        names = {d.split("=", 1)[0].strip().lower() for d in kept}
        if "private" not in names and "no-store" not in names:
            kept.insert(0, "private")
        out.popall("Cache-Control", None)
        out["Cache-Control"] = ", ".join(kept)
    return out
