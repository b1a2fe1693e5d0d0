"""Header hygiene between the client and the upstream: hop-by-hop headers and every
client-sent identity header are removed before the proxy adds its own."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

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
# Identity and forwarding headers only the proxy may set (compared after lower-casing and
# turning "_" into "-", so X_Tunnel_Jwt_Assertion and x-TUNNEL-jwt-assertion are caught too).
IDENTITY_PREFIXES = ("x-tunnel-", "x-forwarded-", "x-goog-authenticated-", "x-goog-iap-")
IDENTITY_HEADERS = frozenset({"forwarded", "x-real-ip", "x-client-ip", "x-remote-user"})

ASSERTION_HEADER = "X-Tunnel-Jwt-Assertion"
EMAIL_HEADER = "X-Tunnel-Authenticated-User-Email"
ID_HEADER = "X-Tunnel-Authenticated-User-Id"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def is_identity_header(name: str) -> bool:
    key = _canonical(name)
    return key in IDENTITY_HEADERS or key.startswith(IDENTITY_PREFIXES)


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
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and identity headers (and the Authorization header the
    proxy consumed), plus the proxy's identity and forwarding headers."""
    extra = ["authorization"] if consumed_authorization else []
    out = strip_hop_by_hop(headers, extra + ["host"])
    for name in list(out.keys()):
        if is_identity_header(name):
            out.popall(name, None)
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
