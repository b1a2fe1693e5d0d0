"""tunnel-client: the command-line client of the identity-aware TCP tunnel, and its library API
(docs/library.md): ``connect``, ``forward``, ``open_socket`` and ``asyncssh_tunnel`` open
tunnels from Python with the CLI's settings and credentials; failures raise the typed errors
of ``tunnel_client.errors``."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

from .api import AsyncsshTunnel, Client, Forward, TokenLike
from .errors import (
    AccessDenied,
    ConnectionFailed,
    CredentialsMissing,
    ProxyRefused,
    TunnelClosed,
    TunnelFailed,
    Unauthorized,
)
from .sync import TunnelSocket

__all__ = [
    "AccessDenied",
    "AsyncsshTunnel",
    "Client",
    "ConnectionFailed",
    "CredentialsMissing",
    "Forward",
    "HostTarget",
    "InstanceTarget",
    "ProxyRefused",
    "Target",
    "TokenLike",
    "TunnelClosed",
    "TunnelFailed",
    "TunnelSocket",
    "Unauthorized",
    "asyncssh_tunnel",
    "connect",
    "forward",
    "open_socket",
]


def _client(kwargs: dict[str, Any]) -> Client:
    if kwargs.get("server"):
        return Client(**kwargs)
    kwargs.pop("server", None)
    return Client.from_profile(kwargs.pop("profile", None), **kwargs)


def connect(target: Target, **client: Any) -> AbstractAsyncContextManager[Any]:
    """``async with connect(target, server=..., ...) as (reader, writer)``: one tunnel. Keyword
    arguments are ``Client``'s; without ``server`` they come from the profile and environment."""
    return _client(client).connect(target)


def forward(target: Target, local: str = "127.0.0.1:0", **client: Any) -> Forward:
    """``async with`` / ``with forward(target, local=...) as (host, port)``: a local listener."""
    return _client(client).forward(target, local)


def open_socket(target: Target, **client: Any) -> TunnelSocket:
    """A connected socket to the target through the relay (``sock=`` for paramiko)."""
    return _client(client).open_socket(target)


def asyncssh_tunnel(**client: Any) -> AsyncsshTunnel:
    """For ``asyncssh.connect(INSTANCE, tunnel=asyncssh_tunnel(server=..., zone=...))``."""
    target: dict[str, Any] = {k: client.pop(k) for k in ("group",) if k in client}
    return _client(client).asyncssh_tunnel(**target)
