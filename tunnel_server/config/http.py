"""HTTP mode configuration (``http:`` in the relay's YAML): routes, browser login, sessions."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel
from .base import ListenConfig, TlsConfig

_APP_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
_LABEL = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
# An HTTP field name (RFC 9110 token); in strip_headers a trailing "*" makes it a prefix.
_FIELD_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
# Headers the proxy sets itself: a route can never pass the client's copies through.
_PROXY_SET = ("x-tunnel-", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")


def _field_names(names: list[str], *, prefixes: bool) -> list[str]:
    for name in names:
        bare = name[:-1] if prefixes and name.endswith("*") else name
        if not bare or not _FIELD_NAME.match(bare) or "*" in bare:
            raise ValueError(f"{name!r} is not a header name" + (" or prefix*" if prefixes else ""))
    return names


class RouteConfig(StrictModel):
    """One protected app: requests for ``host`` (and ``path_prefix``) go to ``upstream``. The
    route is the policy resource ``app:NAME`` (role ``webUser``)."""

    name: Annotated[str, Field(pattern=_APP_NAME)]
    host: str
    path_prefix: str = "/"
    upstream: str = Field(pattern=r"^https?://\S+$")
    # Bearer tokens (programmatic access) must carry one of these audiences; the signed
    # assertion's aud is ``assertion_audience`` (default: "app:NAME").
    audiences: list[str] = Field(default_factory=list)
    assertion_audience: str | None = None
    websockets: bool = True
    # "insensitive": request.path is lower-cased for policy (for upstreams that ignore case).
    path_case: Literal["sensitive", "insensitive"] = "sensitive"
    # ";params" on a path segment (/admin;x=1): "refuse" (400), or "strip" them before both the
    # decision and the forwarding (servlet-style apps that use ;jsessionid).
    path_parameters: Literal["refuse", "strip"] = "refuse"
    # Headers of the stripped families (docs/http-mode.md) this app truly needs from the
    # client, passed through as sent (exact names; never x-tunnel-* or X-Forwarded-For/-Proto/
    # -Host, which the proxy sets).
    pass_headers: list[str] = Field(default_factory=list)

    @field_validator("pass_headers")
    @classmethod
    def _pass_headers(cls, names: list[str]) -> list[str]:
        _field_names(names, prefixes=False)
        for name in names:
            canonical = re.sub(r"[^a-z0-9]", "-", name.lower())
            if canonical.startswith(_PROXY_SET[0]) or canonical in _PROXY_SET[1:]:
                raise ValueError(f"{name} is set by the proxy and cannot be passed through")
        return names

    @field_validator("host")
    @classmethod
    def _host(cls, host: str) -> str:
        host = host.lower().rstrip(".")
        if not _HOST.match(host):
            raise ValueError(f"host {host!r} must be a DNS name (no port, no scheme)")
        return host

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not prefix.startswith("/") or "//" in prefix or "/../" in prefix + "/":
            raise ValueError("path_prefix must be an absolute, normalized path")
        return prefix

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, url: str) -> str:
        parts = urlsplit(url)
        if not parts.hostname or parts.query or parts.fragment:
            raise ValueError("upstream must be scheme://host[:port][/path]")
        return url.rstrip("/")

    @property
    def audience(self) -> str:
        return self.assertion_audience or f"app:{self.name}"


class WebLoginConfig(StrictModel):
    """The confidential OIDC client used for browser sign-in (authorization code + PKCE)."""

    issuer: str = Field(pattern=r"^https?://\S+$")
    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile", "groups"])


class SessionConfig(StrictModel):
    max_age: float = Field(default=8 * 3600, gt=0, allow_inf_nan=False)
    # Seconds since the user last authenticated at the IdP after which a new login is required
    # (prompt=login); None = max_age alone.
    reauth_max_age: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    login_timeout: float = Field(default=600, gt=0, le=3600)


class HttpModeConfig(StrictModel):
    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=8445))
    tls: TlsConfig | None = None
    # The scheme browsers use to reach the apps (a TLS-terminating proxy in front: "https").
    external_scheme: Literal["https", "http"] = "https"
    # iss of the signed assertion: the URL upstreams fetch /.well-known/tunnel/jwks.json from.
    issuer_url: str = Field(pattern=r"^https?://\S+$")
    routes: list[RouteConfig] = Field(min_length=1)
    login: WebLoginConfig | None = None
    session: SessionConfig = Field(default_factory=SessionConfig)
    assertion_lifetime: float = Field(default=300, ge=10, le=600)
    key_rotation: float = Field(default=24 * 3600, ge=60)
    # X-Forwarded-For (or, with proxy_protocol, a PROXY header) is trusted only from these
    # peers (load balancers in front).
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list
    )
    # The listener reads a PROXY protocol header (v1 or v2, before TLS) from trusted_proxies: a
    # TCP-passthrough balancer keeps the client's address (docs/http-mode.md).
    proxy_protocol: bool = False
    # Seconds between re-decisions of open WebSockets and streams (time windows, expiry).
    recheck_interval: float = Field(default=30, gt=0, le=3600)
    upstream_timeout: float = Field(default=30, gt=0)
    # Slow requests (docs/http-mode.md): a request's headers must be complete within
    # header_timeout of its first byte, and its body within request_timeout; idle keep-alive
    # connections close after keepalive_timeout.
    header_timeout: float = Field(default=10, gt=0, le=300, allow_inf_nan=False)
    request_timeout: float = Field(default=120, gt=0, allow_inf_nan=False)
    keepalive_timeout: float = Field(default=75, gt=0, allow_inf_nan=False)
    # Open connections per client address that have not yet carried an authenticated request
    # (0: no cap); peers in trusted_proxies are not counted.
    max_unauthenticated_per_source: int = Field(default=64, ge=0)
    # HTTP-mode processes on the listener (SO_REUSEPORT): this one and workers - 1 others
    # (tunnel_server.http_worker). More than one needs state.backend: redis.
    workers: int = Field(default=1, ge=1, le=64)
    # More request headers never passed from clients to any app, on top of the built-in
    # families (docs/http-mode.md): exact names, or "prefix-*".
    strip_headers: list[str] = Field(default_factory=list)

    @field_validator("strip_headers")
    @classmethod
    def _strip_headers(cls, names: list[str]) -> list[str]:
        return _field_names(names, prefixes=True)

    @model_validator(mode="after")
    def _unique(self) -> HttpModeConfig:
        if self.request_timeout < self.header_timeout:
            raise ValueError("request_timeout must be at least header_timeout")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies (the balancers that send it)")
        names = [r.name for r in self.routes]
        if len(set(names)) != len(names):
            raise ValueError("a route name is used twice")
        keys = [(r.host, r.path_prefix) for r in self.routes]
        if len(set(keys)) != len(keys):
            raise ValueError("two routes have the same host and path_prefix")
        return self
