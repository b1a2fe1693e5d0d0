"""The real gcloud CLI against two relays sharing Redis behind a round-robin load balancer
(wss, node-to-node forwarding over wss too): when the owner forces a reconnect (4004, the code
gcloud resumes after), gcloud's /v4/reconnect lands on the other node, which forwards it to the
owner; the download completes with no byte lost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tunnel_server.app import RunningServer, running
from tunnel_server.config import parse_config
from tunnel_server.ops.tls import write_self_signed

from ..e2e.gcloud import STEP_TIMEOUT, GatedSource, Progress, gcloud_tunnel, payload, read_all
from ..faults import FaultProxy
from ..helpers import capture_audit, relay_config_data
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from ..redis_fixture import RedisServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not installed"),
]

MiB = 1024 * 1024
SIZE = 8 * MiB
REAUTHS = 2
SECRET = "gcloud-cluster-secret-0123456789abcdef"


@contextlib.asynccontextmanager
async def two_relays(
    issuer: TestIssuer,
    tmp_path: Path,
    redis: RedisServer,
) -> AsyncIterator[list[RunningServer]]:
    cert, key = tmp_path / "relay-cert.pem", tmp_path / "relay-key.pem"
    write_self_signed(cert, key)  # one certificate for both nodes (and their forwarding)
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for index in range(2):
            port = free_port()
            data = relay_config_data(issuer, tmp_path)
            data["listen"]["port"] = port
            data["state"] = {"backend": "redis", "redis_url": redis.url, "lease_ttl": 5}
            data["cluster"] = {
                "advertise_url": f"wss://127.0.0.1:{port}",
                "secret": SECRET,
                "ca_file": str(cert),
            }
            config = parse_config(data, env={})
            servers.append(await stack.enter_async_context(running(config, node=f"relay-{index}")))
        yield servers


async def test_gcloud_resumes_through_another_node(
    issuer: TestIssuer,
    tmp_path: Path,
    redis: RedisServer,
) -> None:
    data = payload(SIZE, seed=7)
    source = await GatedSource(data, gated=True).start()
    step = SIZE // (REAUTHS + 1)
    progress = Progress()
    async with two_relays(issuer, tmp_path, redis) as (owner, other):
        owner_audit, other_audit = capture_audit(owner), capture_audit(other)
        ports = [owner.port, other.port]
        balancer = FaultProxy(0, choose=lambda number: ports[(number - 1) % 2])
        async with balancer:
            try:
                async with gcloud_tunnel(
                    balancer.port, source.port, issuer.mint(), tmp_path, stdin_mode=False
                ) as gcloud:
                    reader, writer = await asyncio.open_connection("127.0.0.1", gcloud.port)
                    download = asyncio.create_task(read_all(reader, progress))
                    try:
                        async with asyncio.timeout(STEP_TIMEOUT):
                            await owner.relay.wait_until(lambda: len(owner.relay.sessions) == 1)
                        (session,) = owner.relay.sessions.values()
                        for n in range(REAUTHS):
                            source.release((n + 1) * step)
                            await progress.reached(n * step + step // 2)
                            assert owner.relay.require_reauth(session.sid)
                            async with asyncio.timeout(STEP_TIMEOUT):
                                await owner.relay.wait_until(
                                    lambda n=n: (
                                        session.resumes == n + 1  # type: ignore[misc]
                                        and session.pump is not None
                                    )
                                )
                        source.release(SIZE)
                        async with asyncio.timeout(STEP_TIMEOUT):
                            digest = await download
                    finally:
                        download.cancel()
                        writer.close()
            finally:
                await source.stop()
    assert (progress.count, digest) == (SIZE, hashlib.sha256(data).hexdigest())
    assert balancer.connections == REAUTHS + 1
    # The first reconnect went to the other node (round robin) and was forwarded to the owner.
    forwarded = [r for r in other_audit if r["event"] == "resume"]
    assert [r["decision"] for r in forwarded] == ["forward"]
    resumed = [r for r in owner_audit if r["event"] == "resume"]
    assert [r["decision"] for r in resumed] == ["allow"] * REAUTHS
