"""The client's typed errors and how they read: every failure carries its wire code (close code or
HTTP status) and a message that says what happened, whose side it is on and what to do next.

Exception tree::

    TunnelFailed                 any failure; ``code`` = close code or HTTP status (or None)
    ├── ConnectionFailed         the relay (or the proxy) cannot be reached: DNS, refused, TLS
    │   └── ProxyRefused         the proxy answered 407 / 403 / another status to CONNECT
    ├── CredentialsMissing       no token source applies, or the login cannot be renewed
    ├── Unauthorized             HTTP 401 at the handshake (RFC 6750 error_description)
    ├── AccessDenied             close 4033 / 4047 (or HTTP 403): policy said no
    └── TunnelClosed             any other close the relay chose (idle timeout, drain, ...)

Parsing is pure: ``parse_denial`` reads the relay's close reason grammar
``<category>; ref=<REFERENCE>`` (or the minimal ``not authorized; ref=<REFERENCE>``, or IAP's
bare ``not authorized``), ``parse_www_authenticate`` reads an RFC 6750 challenge, and
``token_identity`` decodes who a JWT names, locally and without verification, never keeping the
token itself.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
from dataclasses import dataclass

from tunnel_protocol import CloseCode, describe
from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

__all__ = [
    "CATEGORIES",
    "AccessDenied",
    "ConnectionFailed",
    "CredentialsMissing",
    "Denial",
    "ProxyRefused",
    "TunnelClosed",
    "TunnelFailed",
    "Unauthorized",
    "close_message",
    "connection_failed",
    "describe_target",
    "parse_denial",
    "parse_www_authenticate",
    "token_identity",
]


class TunnelFailed(Exception):
    """The tunnel could not be opened or ended abnormally. ``code``: close code or HTTP status.

    ``str()`` is the whole message: a gcloud-style first line, then explanation lines."""

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason

    @property
    def lines(self) -> list[str]:
        return str(self).splitlines()


class ConnectionFailed(TunnelFailed):
    """The relay could not be reached; ``kind`` is one of dns, refused, tls-untrusted,
    tls-version, not-tls, timeout, proxy, network."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class ProxyRefused(ConnectionFailed):
    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message, kind="proxy")
        self.code = status


class CredentialsMissing(TunnelFailed):
    """No usable credential: not logged in, the login expired, an unreadable token file."""


class Unauthorized(TunnelFailed):
    """HTTP 401: the relay refused the token. ``description``: RFC 6750 error_description."""

    def __init__(self, message: str, *, description: str | None) -> None:
        super().__init__(message, code=401, reason=description or "")
        self.description = description


class AccessDenied(TunnelFailed):
    """Close 4033 / 4047: the relay's policy (or inventory) refused the target."""

    def __init__(self, message: str, *, code: int, reason: str, denial: Denial) -> None:
        super().__init__(message, code=code, reason=reason)
        self.denial = denial

    @property
    def category(self) -> str | None:
        return self.denial.category

    @property
    def reference(self) -> str | None:
        return self.denial.reference


class TunnelClosed(TunnelFailed):
    """The relay closed the tunnel with a code that is not a denial."""


# -- denials -------------------------------------------------------------------------------------

CATEGORIES: dict[str, str] = {
    "policy": "not allowed by policy",
    "access-level": "an access level the policy requires is not met",
    "unknown-target": "unknown target: no such instance or host here",
    "port": "this port is not allowed for this target",
    "revoked": "access was revoked",
    "expired": "the credential expired",
}
_DENIAL = re.compile(r"(?P<category>[a-z-]+|not authorized); ref=(?P<reference>[A-Za-z0-9]{8,16})")
EXPLAIN_HINT = "an admin can run `tunnel-server policy explain --reference {ref}`"


@dataclass(frozen=True)
class Denial:
    category: str | None  # a key of CATEGORIES, or None (minimal detail, or an older relay)
    reference: str | None

    @property
    def words(self) -> str:
        if self.category is None:
            return "not authorized"
        return CATEGORIES[self.category]


def parse_denial(reason: str) -> Denial:
    """The relay's denial close reason; anything unrecognised gives Denial(None, None)."""
    match = _DENIAL.fullmatch(reason.strip())
    if match is None:
        return Denial(None, None)
    category = match["category"]
    return Denial(category if category in CATEGORIES else None, match["reference"])


def describe_target(target: Target) -> str:
    if isinstance(target, InstanceTarget):
        return (
            f"instance {target.instance} port {target.port} "
            f"(project {target.project}, zone {target.zone})"
        )
    assert isinstance(target, HostTarget)
    group = f", destination group {target.group}" if target.group else ""
    return (
        f"host {target.host} port {target.port} "
        f"(project {target.project}, region {target.region}, network {target.network}{group})"
    )


def close_message(code: int, reason: str = "") -> str:
    """gcloud's line. A typed refusal's reason (``policy; ref=...``) is told on the lines
    after it, so this line keeps gcloud's wording for the code."""
    if parse_denial(reason).reference is not None:
        reason = ""
    return f"Error while connecting [{code}: '{reason or describe(code)}']."


def denied(code: int, reason: str, *, who: str | None, target: Target) -> AccessDenied:
    denial = parse_denial(reason)
    lines = [close_message(code, reason)]
    who_text = who or "this credential"
    if code == CloseCode.LOOKUP_FAILED and denial.category is None and denial.reference is None:
        words = CATEGORIES["unknown-target"]
    else:
        words = denial.words
    lines.append(f"Access denied for {who_text} to {describe_target(target)}: {words}.")
    if denial.reference is not None:
        lines.append(f"Reference {denial.reference}: " + EXPLAIN_HINT.format(ref=denial.reference))
    else:
        lines.append(
            "Check the instance, port, --project and --zone (or --region/--network); "
            "an admin can run `tunnel-server policy explain`."
        )
    return AccessDenied("\n".join(lines), code=code, reason=reason, denial=denial)


# -- 401 -----------------------------------------------------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("((?:[^"\\]|\\.)*)"|[^\s,]*)\s*,?')


def parse_www_authenticate(value: str | None) -> dict[str, str]:
    """The parameters of a ``Bearer`` challenge (RFC 6750 section 3), lower-cased names."""
    if not value:
        return {}
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return {}
    params: dict[str, str] = {}
    for match in _PARAM.finditer(rest):
        raw = match.group(3) if match.group(3) is not None else match.group(2)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
    return params


# Descriptions after which a fresh token from the same source would be accepted.
_RENEWABLE = ("expired", "revoked", "malformed", "not yet valid", "invalid signature")


def unauthorized(
    header: str | None, *, who: str | None, relogin: str | None, source: str | None
) -> Unauthorized:
    """A 401: the relay's reason, and what would help. "Log in again" only for a cached login,
    and only when a fresh token from it could pass (not a wrong audience or issuer)."""
    params = parse_www_authenticate(header)
    description = params.get("error_description") or None
    first = "Error while connecting [Handshake status 401 Unauthorized]"
    lines = [f"{first}: {description}." if description else f"{first}."]
    who_text = f" for {who}" if who else ""
    because = f": {description}." if description else "."
    lines.append(f"The relay refused the token{who_text}{because}")
    renewable = description is None or any(word in description for word in _RENEWABLE)
    if not renewable:
        lines.append(
            "The relay does not accept tokens of this identity provider or audience: check "
            "that --server and the profile match the login (tunnel-client status), or ask the "
            "relay's operator."
        )
    elif relogin is not None:
        lines.append(relogin)
    elif source is not None:
        lines.append(f"The token came from {source}: put a fresh, valid token there.")
    else:
        lines.append("Get a fresh token (log in again) and retry.")
    return Unauthorized("\n".join(lines), description=description)


# -- identities ----------------------------------------------------------------------------------


def token_identity(token: str) -> str | None:
    """``email`` (or ``sub``) of a JWT, decoded locally WITHOUT verification: only for messages."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    for key in ("email", "sub", "client_id"):
        value = claims.get(key)
        if isinstance(value, str) and value and len(value) < 256 and value.isprintable():
            return value
    return None


# -- connection failures -------------------------------------------------------------------------

_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "HTTP_REQUEST",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
)
_TLS_VERSION = (
    "UNSUPPORTED_PROTOCOL",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "NO_PROTOCOLS_AVAILABLE",
    "VERSION_TOO_LOW",
    "VERSION_TOO_HIGH",
)


def connection_failed(exc: BaseException, where: str) -> ConnectionFailed:
    """Name the cause of a failed connect to ``where`` (host:port) and what to do about it."""
    first = f"Error while connecting [{where}]: "
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or "not trusted"
        return ConnectionFailed(
            f"{first}the relay's TLS certificate is not trusted ({why}).\n"
            "If the relay uses a private CA or a self-signed certificate, pass --ca-file "
            "FILE (or set TUNNEL_CA_FILE).",
            kind="tls-untrusted",
        )
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", "") or "").upper()
        if any(r in reason for r in _TLS_VERSION):
            return ConnectionFailed(
                f"{first}TLS version mismatch: the relay and this client have no TLS version in "
                "common (this client needs TLS 1.2 or later).",
                kind="tls-version",
            )
        if any(r in reason for r in _NOT_TLS):
            return ConnectionFailed(
                f"{first}the server there does not speak TLS. Is the URL right (wss:// for a "
                "TLS relay, ws:// for a plain one)?",
                kind="not-tls",
            )
        return ConnectionFailed(f"{first}TLS handshake failed ({reason or exc}).", kind="tls")
    if isinstance(exc, socket.gaierror):
        return ConnectionFailed(
            f"{first}cannot resolve the relay's host name ({exc.strerror}). "
            "Check --server (or TUNNEL_SERVER, or the profile's server).",
            kind="dns",
        )
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(
            f"{first}connection refused. Is the relay running, and is the port in --server right?",
            kind="refused",
        )
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return ConnectionFailed(
            f"{first}the server closed the connection during the handshake. Is the URL right "
            "(wss:// for a TLS relay, ws:// for a plain one), and is a proxy or firewall "
            "cutting it?",
            kind="reset",
        )
    if isinstance(exc, TimeoutError):
        return ConnectionFailed(f"{first}timed out.", kind="timeout")
    if isinstance(exc, OSError):
        return ConnectionFailed(f"{first}{exc.strerror or exc}.", kind="network")
    return ConnectionFailed(f"{first}{exc}.", kind="network")
