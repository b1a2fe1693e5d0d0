"""SSH certificates from the relay, client side (docs/ssh-certificates.md): the relay's published
CA keys (``/v1/ssh/ca``: whether it issues certificates at all, and its host CA), an ephemeral
Ed25519 key made in memory, the relay's certificate for it, and the known_hosts file the client
keeps per relay with the host CA's one ``@cert-authority`` line.

Errors: ``CertificateRefused`` (a TunnelFailed) when the relay issues none to this member for
this target (403, with the refusal's reference) or issues none at all (404); a 401 is the same
``Unauthorized`` a tunnel handshake gives; an unreachable relay is a ``ConnectionFailed``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2

from tunnel_protocol.urls import SSH_CA_PATH, SSH_PUBLIC_KEY_HEADER, certificate_query

from .errors import (
    EXPLAIN_HINT,
    ConnectionFailed,
    TunnelFailed,
    describe_target,
    parse_denial,
    token_identity,
    unauthorized,
)
from .http import client_kwargs, http_url, request_failure
from .session import ConnectOptions, get_token

if TYPE_CHECKING:
    # Imported where used: asyncssh takes ~0.3 s to import, which every start-tunnel (ssh's
    # ProxyCommand) would pay otherwise.
    import asyncssh

__all__ = [
    "CaKeys",
    "CertificateRefused",
    "Issued",
    "ephemeral_key",
    "fetch_ca",
    "issue",
    "known_hosts_path",
    "write_known_hosts",
]

# A certificate with less than this left is not worth handing out: renew instead.
MIN_REMAINING = 30


class CertificateRefused(TunnelFailed):
    """The relay issues no certificate here: 403 (policy) or 404 (no SSH CA configured)."""


@dataclass(frozen=True)
class CaKeys:
    """What the relay publishes: its user CA keys (sshd ``TrustedUserCAKeys`` lines) and its
    host CA's ``@cert-authority`` line (None without a host CA)."""

    user_ca: tuple[str, ...]
    host_ca: str | None

    @classmethod
    def parse(cls, text: str) -> CaKeys:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        host = [line for line in lines if line.startswith("@cert-authority ")]
        users = tuple(line for line in lines if not line.startswith(("@", "#")))
        return cls(users, host[0] if host else None)


@dataclass(frozen=True)
class Issued:
    """An ephemeral private key (memory only) and the relay's certificate for it."""

    key: asyncssh.SSHKey
    certificate: asyncssh.SSHCertificate
    text: str  # the certificate, OpenSSH one-line format
    principals: tuple[str, ...]
    valid_before: int

    def remaining(self, now: float | None = None) -> int:
        return int(self.valid_before - (time.time() if now is None else now))

    def usable(self, now: float | None = None) -> bool:
        """Still worth offering: expires in more than MIN_REMAINING seconds."""
        return self.remaining(now) > MIN_REMAINING


def ephemeral_key() -> asyncssh.SSHKey:
    """A fresh Ed25519 key; it lives in this process (and the agent it is handed to) only."""
    import asyncssh

    return asyncssh.generate_private_key("ssh-ed25519", comment="tunnel-client ephemeral")


async def _get(
    options: ConnectOptions, path: str, headers: dict[str, str]
) -> tuple[int, str, httpx2.Headers]:
    url = http_url(options.server).rstrip("/") + path
    kwargs = client_kwargs(
        ssl_context=options.ssl_context, proxy=options.proxy_url(), timeout=options.open_timeout
    )
    async with httpx2.AsyncClient(**kwargs) as client:  # type: ignore[arg-type]
        try:
            response = await client.get(url, headers={"User-Agent": options.user_agent, **headers})
        except httpx2.HTTPError as exc:
            raise request_failure(exc, options.where, options.proxy_url()) from None
    return response.status_code, response.text, response.headers


async def fetch_ca(options: ConnectOptions) -> CaKeys | None:
    """The relay's CA keys, or None when it issues no SSH certificates (404): how the client
    discovers certificate support (public, no token needed)."""
    status, text, _ = await _get(options, SSH_CA_PATH, {})
    if status == 404:
        return None
    if status != 200:
        raise ConnectionFailed(
            f"Error while connecting [GET {SSH_CA_PATH}: HTTP {status}].", kind="http"
        )
    keys = CaKeys.parse(text)
    return keys if keys.user_ca else None


async def issue(options: ConnectOptions, key: asyncssh.SSHKey) -> Issued:
    """A certificate for ``key`` to reach ``options.target`` (port included)."""
    token = await get_token(options)
    public = key.export_public_key("openssh").decode().split()
    headers = {
        "Authorization": f"Bearer {token}",
        SSH_PUBLIC_KEY_HEADER: f"{public[0]} {public[1]}",
    }
    status, text, response_headers = await _get(options, certificate_query(options.target), headers)
    who = token_identity(token)
    if status == 200:
        return _issued(key, text)
    if status == 401:
        relogin = getattr(options.token, "relogin_hint", None)
        source = getattr(options.token, "source", None)
        raise unauthorized(
            response_headers.get("WWW-Authenticate"),
            who=who,
            relogin=relogin() if callable(relogin) else None,
            source=source if isinstance(source, str) else None,
        )
    raise _refused(status, text, who, options)


def _issued(key: asyncssh.SSHKey, text: str) -> Issued:
    import asyncssh

    try:
        certificate = asyncssh.import_certificate(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise TunnelFailed(f"The relay sent something that is not a certificate ({exc}).") from None
    # The concrete certificate class carries these; the typed base class does not.
    principals = tuple(getattr(certificate, "principals", ()))
    valid_before = int(getattr(certificate, "_valid_before", 0))
    if certificate.key.public_data != key.public_data:
        raise TunnelFailed("The relay sent a certificate for another key.")
    return Issued(key, certificate, text.strip(), principals, valid_before)


def _refused(status: int, text: str, who: str | None, options: ConnectOptions) -> TunnelFailed:
    target = describe_target(options.target)
    if status == 404:
        return CertificateRefused(
            f"Error while connecting [HTTP 404]: the relay at {options.where} issues no SSH "
            "certificates (no ssh: section in its configuration); use your own keys "
            "(--no-certificate).",
            code=404,
        )
    if status != 403:
        first = text.strip().splitlines()[0] if text.strip() else ""
        return TunnelFailed(f"Error while getting an SSH certificate [HTTP {status}]: {first}")
    denial = parse_denial(text.strip())
    lines = [
        f"No SSH certificate for {who or 'this credential'} to {target}: {denial.words} "
        "(no binding grants you a login name there)."
    ]
    if denial.reference is not None:
        lines.append(f"Reference {denial.reference}: " + EXPLAIN_HINT.format(ref=denial.reference))
    return CertificateRefused("\n".join(lines), code=403, reason=text.strip())


# -- known hosts -------------------------------------------------------------------------------


def known_hosts_path(server: str, directory: Path) -> Path:
    """The known_hosts file the client keeps for one relay (its instances only)."""
    where = http_url(server).split("://", 1)[-1].split("/", 1)[0]
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in where)
    return directory / f"known_hosts-{safe}"


def write_known_hosts(path: Path, host_ca: str) -> Path:
    """Write the host CA's line, ``@cert-authority * KEY``: the file is only ever used for this
    relay's instances (UserKnownHostsFile of tunnel connections), so ``*`` means exactly them.
    Rewritten atomically when the relay's host CA changes; 0600 in a 0700 directory."""
    text = host_ca.strip() + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)
    return path
