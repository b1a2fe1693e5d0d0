"""HTTP mode alone in a process, for ``bench.http_mode``: one route (``demo.localhost`` -> the
upstream), bearer tokens from the bench's issuer, and one browser session already in its
(in-memory) store, so that both kinds of caller can be measured without a login. Binds with
SO_REUSEPORT: several of these share one port, as ``http.workers`` processes do. The real audit
log and log formatting (JSON to stderr) are on. Prints ``Listening on PORT``.

    python -m bench.http_proxy ISSUER UPSTREAM_PORT PORT SESSION_ID
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from tunnel_runtime.loop import run
from tunnel_server.access.identity import Authenticator, Identity
from tunnel_server.access.policy import parse_policy
from tunnel_server.audit import AuditLog
from tunnel_server.build import build_verifier
from tunnel_server.config import OidcConfig
from tunnel_server.ops.logs import setup_logging
from tunnel_server.web import HttpModeConfig, HttpProxy, MemorySessionStore, WebSession, serving

AUDIENCE = "https://demo.app"
ALICE = "alice@example.com"


def session(sid: str, port: int) -> WebSession:
    now = time.time()
    identity = Identity(
        principal=f"user:{ALICE}", subject="alice", issuer="https://idp", email=ALICE,
        groups=("ops",), expires_at=now + 86400, members=frozenset({f"user:{ALICE}"}),
        valid_until=now + 86400, issued_at=now,
    )  # fmt: skip
    return WebSession(
        sid=sid, identity=identity, origin=f"http://demo.localhost:{port}", created=now,
        auth_time=now, expires=now + 86400,
    )  # fmt: skip


async def main(issuer: str, upstream: int, port: int, sid: str) -> None:
    setup_logging("json", logging.INFO)
    config = HttpModeConfig.model_validate(
        {
            "issuer_url": f"http://127.0.0.1:{port}",
            "external_scheme": "http",
            "routes": [{"name": "demo", "host": "demo.localhost", "audiences": [AUDIENCE],
                        "upstream": f"http://127.0.0.1:{upstream}"}],
        }
    )  # fmt: skip
    verifier = build_verifier(OidcConfig(issuer=issuer, audiences=["unused"]))
    policy = parse_policy(
        {"bindings": [{"name": "web", "members": [f"user:{ALICE}"], "role": "webUser",
                       "resources": {"apps": ["demo"]}}]}
    )  # fmt: skip
    store = MemorySessionStore()
    await store.put(session(sid, port))
    proxy = HttpProxy(
        config,
        authenticator=Authenticator([verifier]),
        login_verifier=None,
        policy=lambda: policy,
        audit=AuditLog("bench"),
        store=store,
    )
    try:
        async with serving(proxy, "127.0.0.1", port, reuse_port=True):
            print(f"Listening on {port}", flush=True)
            await asyncio.Event().wait()
    finally:
        await verifier.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("issuer")
    parser.add_argument("upstream", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("sid")
    args = parser.parse_args()
    run(main(args.issuer, args.upstream, args.port, args.sid))
