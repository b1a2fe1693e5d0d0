"""HTTP to the relay and the identity provider (httpx2, the client authlib builds on): one
factory so every request has the same proxy, TLS and timeout settings, and the reachability
probe that tells a wrong relay URL from a login problem."""

from __future__ import annotations

import re
import ssl

import httpx2

from .errors import ConnectionFailed, ProxyRefused, connection_failed
from .proxies import redact, refusal

__all__ = ["HTTP_TIMEOUT", "client_kwargs", "http_url", "probe", "request_failure"]

HTTP_TIMEOUT = 30.0


def http_url(server: str) -> str:
    """wss://host -> https://host, ws:// -> http://."""
    if server.startswith("wss://"):
        return "https://" + server[6:]
    if server.startswith("ws://"):
        return "http://" + server[5:]
    return server


def relay_where(server: str) -> str:
    """host:port of a relay URL, for messages."""
    rest = server.split("://", 1)[-1].split("/", 1)[0]
    if ":" not in rest.rsplit("]", 1)[-1]:
        rest += ":443" if server.startswith(("wss:", "https:")) else ":80"
    return rest


def client_kwargs(
    *,
    ssl_context: ssl.SSLContext | None = None,
    proxy: str | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> dict[str, object]:
    """Keyword arguments for httpx2.AsyncClient (and authlib's AsyncOAuth2Client): the proxy is
    decided by tunnel_client.proxies, never by httpx's own environment lookup."""
    return {
        "verify": ssl_context if ssl_context is not None else ssl.create_default_context(),
        "proxy": proxy,
        "trust_env": False,
        "timeout": httpx2.Timeout(timeout),
        "follow_redirects": False,
    }


def _root_os_error(exc: BaseException) -> BaseException | None:
    """The most specific OSError behind an httpx error: anyio wraps the real ones
    (ConnectionRefusedError, ssl.SSLError, socket.gaierror) in a generic OSError whose cause is
    an exception group."""
    found: list[BaseException] = []
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending and len(seen) < 64:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            found.append(current)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for nxt in (current.__cause__, current.__context__):
            if nxt is not None:
                pending.append(nxt)
    specific = [e for e in found if type(e) is not OSError or getattr(e, "errno", None)]
    if specific:
        return specific[0]
    return found[0] if found else None


def request_failure(exc: httpx2.HTTPError, where: str, proxy: str | None) -> ConnectionFailed:
    """A failed request as a ConnectionFailed naming the cause (DNS, refused, TLS, proxy)."""
    if isinstance(exc, httpx2.ProxyError):
        match = re.search(r"\b([1-5][0-9][0-9])\b", str(exc))
        if match is not None:
            status = int(match.group(1))
            return ProxyRefused(
                f"Error while connecting [proxy {redact(proxy or '')} answered {status}]: "
                f"{refusal(status, proxy or '')}.",
                status=status,
            )
    root = _root_os_error(exc)
    if isinstance(exc, httpx2.TimeoutException) and root is None:
        root = TimeoutError()
    if root is not None:
        target = f"proxy {redact(proxy)}" if proxy and isinstance(exc, httpx2.ProxyError) else where
        return connection_failed(root, target)
    return ConnectionFailed(f"Error while connecting [{where}]: {exc}.", kind="network")


async def probe(
    server: str,
    *,
    ssl_context: ssl.SSLContext | None,
    proxy: str | None,
    limit: float,
    where: str,
) -> None:
    """Raise ConnectionFailed unless ``server`` answers HTTP at all (any status will do)."""
    url = http_url(server).rstrip("/") + "/.well-known/tunnel-client"
    kwargs = client_kwargs(ssl_context=ssl_context, proxy=proxy, timeout=limit)
    async with httpx2.AsyncClient(**kwargs) as client:  # type: ignore[arg-type]
        try:
            response = await client.get(url)
            await response.aclose()
        except httpx2.HTTPError as exc:
            raise request_failure(exc, where, proxy) from None
