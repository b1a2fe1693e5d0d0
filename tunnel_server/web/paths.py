"""Request normalization for HTTP mode: the path the policy decides on is the path forwarded;
ambiguous inputs are refused (400), never guessed. Return URLs stay on the app's origin."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
# Characters allowed raw in a path (RFC 3986 pchar + "/"), everything else must be encoded.
_PATH_CHARS = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")


class BadRequest(ValueError):
    """An ambiguous or malformed request target (HTTP 400). The message is a fixed text."""


@dataclass(frozen=True)
class NormalizedPath:
    raw: str  # what is forwarded (percent-encoded, unreserved escapes decoded)
    decoded: str  # what policy sees (request.path)
    # The request had ";params" on a segment (removed from raw and decoded): refused unless
    # the route strips them (RouteConfig.path_parameters).
    parameters: bool = False


def _decode_unreserved(segment: str) -> str:
    def repl(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _PCT.sub(repl, segment)


@functools.lru_cache(maxsize=4096)  # pure: the same few paths come again and again
def normalize_path(raw_path: str) -> NormalizedPath:
    """``raw_path`` without the query. Decodes escaped unreserved characters (``%2e`` -> ``.``),
    collapses ``//`` and ``/./``, resolves ``..`` (RFC 3986), and refuses what backends disagree
    on: encoded ``/`` ``\\`` NUL ``%`` (double encoding) and ``;``, backslashes, ``;`` after a
    dot or empty segment (``..;``), control characters, ``..`` above the root, bad escapes.

    Path parameters (``/admin;x=1/y``: servlet containers serve it as ``/admin/y``) are taken
    off every segment, before ``..`` is resolved, and reported in ``parameters``: the caller
    refuses the request or forwards the path without them, so that the policy and the upstream
    always see the same path."""
    if not raw_path.startswith("/"):
        raise BadRequest("path must be absolute")
    if len(raw_path) > 8192:
        raise BadRequest("path too long")
    if not _PATH_CHARS.match(raw_path):
        raise BadRequest("invalid character in path")
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw_path):
        raise BadRequest("invalid percent-encoding")
    if re.search(r"%(2[fF]|5[cC]|00|25|3[bB])", raw_path):
        raise BadRequest("encoded slash, backslash, NUL, percent or semicolon in path")
    if re.search(r"%[01][0-9A-Fa-f]|%7[fF]", raw_path):
        raise BadRequest("encoded control character in path")
    trailing = raw_path.endswith("/")
    out: list[str] = []
    parameters = False
    for segment in raw_path.split("/")[1:]:
        segment = _decode_unreserved(segment)
        if ";" in segment:
            segment = segment.split(";", 1)[0]
            if segment in ("", ".", ".."):
                raise BadRequest("parameter on a dot or empty segment")
            parameters = True
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise BadRequest("path escapes the root")
            out.pop()
            continue
        out.append(segment)
    raw = "/" + "/".join(out)
    if trailing and out:
        raw += "/"
    try:
        decoded = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("path is not UTF-8") from None
    if not decoded.isprintable():
        raise BadRequest("control character in path")
    return NormalizedPath(raw, decoded, parameters)


def normalize_host(host: str | None) -> tuple[str, int | None]:
    """``Host`` header -> (lower-case hostname without trailing dot, port or None)."""
    if not host or len(host) > 260 or not host.isascii():
        raise BadRequest("missing or invalid Host")
    host = host.lower()
    port: int | None = None
    if host.startswith("["):
        raise BadRequest("IP literal hosts are not routed")
    name, sep, port_text = host.rpartition(":")
    if sep:
        if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
            raise BadRequest("invalid port in Host")
        port, host = int(port_text), name
    host = host.rstrip(".") if host.endswith(".") and not host.endswith("..") else host
    if not _HOSTNAME.match(host):
        raise BadRequest("invalid Host")
    return host, port


def safe_return_path(rd: str | None, origin: str) -> str:
    """The return target of sign-in as a path on ``origin`` (``scheme://host[:port]``); anything
    that could leave the origin (``//evil``, ``/\\evil``, ``http:evil``, ``javascript:``, other
    hosts or ports, control characters) becomes ``/``."""
    if not rd or len(rd) > 4096 or not rd.isascii() or not rd.isprintable() or "\\" in rd:
        return "/"
    if any(c in rd for c in "\t\r\n "):
        return "/"
    if rd.startswith("/"):
        if rd.startswith("//") or rd.startswith("/%2f") or rd.startswith("/%2F"):
            return "/"
        parts = urlsplit(rd)
        if parts.scheme or parts.netloc:
            return "/"
        return rd
    parts = urlsplit(rd)
    want = urlsplit(origin)
    if (
        parts.scheme == want.scheme
        and parts.netloc == want.netloc
        and parts.username is None
        and "@" not in parts.netloc
    ):
        path = parts.path or "/"
        if not path.startswith("/") or path.startswith("//"):
            return "/"
        return path + (f"?{parts.query}" if parts.query else "")
    return "/"
