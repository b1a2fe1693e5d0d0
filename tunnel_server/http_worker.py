"""An HTTP-mode worker process (``http.workers`` > 1): HTTP mode alone, on the relay's HTTP port
(SO_REUSEPORT: the kernel spreads connections over the processes), with its own issuers' key
caches, policy, revocations, signing key and audit log, and nothing shared with the other
processes on the request path. Browser sessions, published signing keys and sign-outs go
through the shared Redis store, as between relay nodes.

The relay's process starts it (``app.HttpWorkers``) as ``python -m tunnel_server.http_worker``
and talks to it on its standard input only, in length-prefixed pickles (parent to child, never
from the network): first ``{"config", "port", "node"}``, then ``{"policy": (source, rules)}``
after each policy change and ``{"revoke_user": (principal, at)}`` after each user revocation.
It answers ``ready`` on its standard output once it serves, logs to standard error, and stops
on SIGTERM, SIGINT or the end of its standard input (the relay is gone)."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import signal
import struct
import sys
from pathlib import Path
from typing import Any

from tunnel_runtime.loop import run

from .access.policy import Policy, load_policy
from .access.revocations import Revocations
from .app import http_login_verifier
from .audit import AuditLog
from .build import build_authenticator, build_policy
from .config import ServerConfig
from .ops.logs import setup_logging
from .ops.tls import server_context
from .web import HttpProxy, build_session_store, serving

MAX_MESSAGE = 16 << 20


async def _message(stdin: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message from the relay's process, or None at the end of the input."""
    try:
        (size,) = struct.unpack("!I", await stdin.readexactly(4))
        if size > MAX_MESSAGE:
            raise ValueError("control message too large")
        message: dict[str, Any] = pickle.loads(await stdin.readexactly(size))  # noqa: S301
    except asyncio.IncompleteReadError:
        return None
    return message


def rebuild_policy(config: ServerConfig, source: str, rules: Any) -> Policy:
    """The policy the relay's process switched to, built here from the same file and rules."""
    if source != "access" and Path(source).is_file():
        return load_policy(Path(source), inventory=config.inventory, allow_rules=rules)
    return Policy.from_allow_rules(rules, inventory=config.inventory)


async def serve(stdin: asyncio.StreamReader) -> None:
    first = await _message(stdin)
    if first is None:
        return
    config: ServerConfig = first["config"]
    http = config.http
    assert http is not None
    setup_logging(config.log_format)
    current = {"policy": build_policy(config)}
    revocations = Revocations()
    authenticator = build_authenticator(config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            proxy = HttpProxy(
                http,
                authenticator=authenticator,
                login_verifier=await stack.enter_async_context(
                    http_login_verifier(http, authenticator)
                ),
                policy=lambda: current["policy"],
                audit=AuditLog(first["node"]),
                is_revoked=revocations.is_revoked,
                store=build_session_store(config.state),
            )
            ssl_context = _tls(config)
            await stack.enter_async_context(
                serving(proxy, http.listen.host, first["port"], ssl_context=ssl_context,
                        reuse_port=True)
            )  # fmt: skip
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            while (message := await _message(stdin)) is not None:
                if "policy" in message:
                    current["policy"] = rebuild_policy(config, *message["policy"])
                    proxy.redecide_all()
                if "revoke_user" in message:
                    principal, at = message["revoke_user"]
                    revocations.revoke_user(principal, at)
                    proxy.revoke_user(principal)
    finally:
        await authenticator.aclose()


def _tls(config: ServerConfig) -> Any:
    http = config.http
    return server_context(http.tls, "http.tls") if http is not None and http.tls else None


async def main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=MAX_MESSAGE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(stdin)


if __name__ == "__main__":
    run(main())
