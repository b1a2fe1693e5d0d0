"""Which proxy a request goes through, decided once for the tunnel's WebSocket (websockets) and
for every request to the identity provider (httpx), so both always agree.

``--proxy URL`` (or the profile's ``proxy``) wins; otherwise ``HTTPS_PROXY``/``https_proxy``
(``HTTP_PROXY`` for plain ``ws://``/``http://``) with ``NO_PROXY``/``no_proxy`` honoured, as
curl and most tools read them. ``http://`` proxies are used with CONNECT; ``socks5://`` and
``socks5h://`` (names resolved by the proxy) need python-socks (websockets) and socksio (httpx),
both installed with the client. Credentials come from the URL (``http://user:pass@proxy:3128``)
and are never logged: ``redact`` hides them in every message.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = ["ProxySetting", "proxy_for", "redact", "with_credentials"]

# None: the environment decides; "" or "none"/"direct": no proxy at all; else a URL.
ProxySetting = str | None

_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")


def _env(environ: Mapping[str, str], name: str) -> str | None:
    return environ.get(name.lower()) or environ.get(name.upper()) or None


def _bypassed(host: str, environ: Mapping[str, str]) -> bool:
    no_proxy = _env(environ, "no_proxy")
    if not no_proxy:
        return False
    if no_proxy.strip() == "*":
        return True
    host = host.lower().strip("[]")
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        name = entry.split(":", 1)[0] if entry.count(":") == 1 else entry
        name = name.lstrip("*").strip("[]")
        if host == name.lstrip(".") or (name and host.endswith("." + name.lstrip("."))):
            return True
    return False


def proxy_for(
    url: str, setting: ProxySetting = None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The proxy URL for ``url`` (ws, wss, http or https), or None to connect directly."""
    if setting is not None:
        if setting.strip().lower() in ("", "none", "direct"):
            return None
        check(setting)
        return setting
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _bypassed(host, environ):
        return None
    secure = parts.scheme in ("wss", "https")
    chosen = _env(environ, "https_proxy") if secure else _env(environ, "http_proxy")
    if chosen is None and environ is os.environ:
        # The OS settings (Windows registry, macOS System Configuration) where no variable is set.
        system = urllib.request.getproxies()
        chosen = system.get("https" if secure else "http")
        if chosen and urllib.request.proxy_bypass(host):
            return None
    if chosen and "://" not in chosen:
        chosen = "http://" + chosen
    if chosen:
        check(chosen)
    return chosen or None


def check(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise ValueError(
            f"unsupported proxy {redact(url)!r}: use http://HOST:PORT, socks5://HOST:PORT or "
            "socks5h://HOST:PORT (credentials as USER:PASSWORD@ before the host)"
        )


def redact(url: str) -> str:
    """The proxy URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def has_credentials(url: str) -> bool:
    return urlsplit(url).username is not None


def refusal(status: int, url: str) -> str:
    """What a proxy's refusal of CONNECT means, in words."""
    if status in (401, 407):
        if has_credentials(url):
            return "it refused the user name or password in the proxy URL"
        return (
            "it requires authentication: put USER:PASSWORD@ in the proxy URL "
            "(--proxy or HTTPS_PROXY)"
        )
    if status == 403:
        return (
            "it does not allow CONNECT to the relay's host and port: ask the proxy's "
            "administrator to allow it"
        )
    return "check the proxy settings (--proxy, HTTPS_PROXY, NO_PROXY)"
