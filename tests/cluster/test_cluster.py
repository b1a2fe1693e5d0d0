"""Three relay processes sharing a real Redis behind a round-robin TCP load balancer: a resume
that lands on another node loses no byte, a revocation on one node closes a tunnel held by
another within 1 s, per-principal caps hold across nodes, Redis can be killed and restarted
mid-test with nothing lost, and a killed node's cap slots free themselves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tunnel_client.session import TunnelSession
from tunnel_protocol import IAP_SUBPROTOCOL

from ..faults import FaultProxy, Link
from ..helpers import UNIT, TcpTarget, deterministic_chunks, relay_config_data
from ..oidc_fixture import TestIssuer
from ..ports import free_port
from ..processes import Process, started
from ..rawclient import RawTunnelClient
from ..redis_fixture import RedisServer
from ..reliability.common import (
    MiB,
    client_options,
    eventually,
    finished,
    listening,
    only_session,
)

pytestmark = pytest.mark.e2e

NODES = 3
CAP = 3  # tunnels per principal, across the cluster
LEASE_TTL = 1.5  # seconds (the config's minimum is 1)
SECRET = "cluster-secret-for-tests-0123456789abcdef"
ADMIN = "admin@example.com"
NATIVE = "v1.native.tunnel.identity-tunnel"
RELAY = [sys.executable, "-m", "tunnel_server", "serve", "--config"]


@dataclass
class Node:
    name: str
    port: int
    admin_port: int
    config: Path
    process: Process | None = None
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def start(self) -> None:
        self.process = await self.stack.enter_async_context(
            started([*RELAY, str(self.config)], r"Listening on (ws://\S+)", stdout=False)
        )

    async def kill(self) -> None:
        assert self.process is not None
        self.process.process.kill()  # SIGKILL: no goodbye to Redis
        await self.process.process.wait()

    def log(self) -> str:
        return "".join(self.process.tail) if self.process is not None else ""


@dataclass
class Cluster:
    nodes: list[Node]
    lb: FaultProxy
    redis: RedisServer
    issuer: TestIssuer
    route: list[int]  # node index for each next connection through the load balancer

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.lb.port}"

    def connect_url(self, port: int) -> str:
        return f"{self.url}/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={port}"

    async def attempt(
        self, port: int, user: str, node: int | None = None
    ) -> ClientConnection | int:
        """A raw native tunnel through the load balancer (to ``node`` when given), once the
        relay sent its first frame (the tunnel is attached); or how it was refused: the HTTP
        status of the handshake, or the close code right after it."""
        if node is not None:
            self.route.append(node)
        token = self.issuer.mint(sub=user, email=f"{user}@example.com", lifetime=600)
        try:
            ws = await connect(
                self.connect_url(port),
                subprotocols=[NATIVE],  # type: ignore[list-item]
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=100 * UNIT,
            )
        except InvalidStatus as exc:
            return exc.response.status_code
        try:
            async with asyncio.timeout(100 * UNIT):
                await ws.recv()
        except ConnectionClosed:
            assert ws.close_code is not None
            return ws.close_code
        return ws

    async def tunnel(self, port: int, user: str, node: int | None = None) -> ClientConnection:
        ws = await self.attempt(port, user, node)
        assert not isinstance(ws, int), f"refused: {ws}"
        return ws

    async def revoke(self, node: int, user: str) -> dict[str, Any]:
        token = self.issuer.mint(sub="admin", email=ADMIN, lifetime=600)
        url = f"http://127.0.0.1:{self.nodes[node].admin_port}/admin/revoke"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url,
                json={"user": f"user:{user}@example.com"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                assert response.status == 200, await response.text()
                result: dict[str, Any] = await response.json()
                return result

    async def readyz(self, node: int) -> int:
        url = f"http://127.0.0.1:{self.nodes[node].port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return response.status


def node_config(
    issuer: TestIssuer,
    tmp_path: Path,
    redis: RedisServer,
    index: int,
) -> Node:
    port, admin_port = free_port(), free_port()
    data = relay_config_data(
        issuer, tmp_path, tls=False, members=["allAuthenticatedUsers"],
        tunnel={"max_tunnels_per_principal": CAP, "drain_grace": 0},
    )  # fmt: skip
    data["listen"]["port"] = port
    data["state"] = {
        "backend": "redis",
        "redis_url": redis.url,
        "lease_ttl": LEASE_TTL,
        "resync_interval": 1.0,
        "timeout": 0.5,
    }
    data["cluster"] = {
        "node_id": f"relay-{index}",
        "advertise_url": f"ws://127.0.0.1:{port}",
        "secret": SECRET,
    }
    data["admin"] = {
        "listen": {"host": "127.0.0.1", "port": admin_port},
        "members": [f"user:{ADMIN}"],
    }
    config = tmp_path / f"relay-{index}.yaml"
    config.write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    return Node(f"relay-{index}", port, admin_port, config)


@pytest.fixture
async def cluster(
    issuer: TestIssuer,
    tmp_path: Path,
    redis: RedisServer,
) -> AsyncIterator[Cluster]:
    nodes = [node_config(issuer, tmp_path, redis, i) for i in range(NODES)]
    route: list[int] = []
    counter = iter(range(1 << 30))

    def choose(number: int) -> int:
        # Round robin, unless a test asked for a node for the next connection.
        index = route.pop(0) if route else next(counter) % NODES
        return nodes[index].port

    lb = await FaultProxy(0, choose=choose).start()
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        yield Cluster(nodes, lb, redis, issuer, route)
    finally:
        await lb.stop()
        for node in nodes:
            await node.stack.aclose()


async def admitted(cluster: Cluster, port: int, user: str, limit: float) -> ClientConnection:
    """Retry a tunnel to relay-0 until the cluster admits it (a release or a lease expiry
    reaches Redis from another process: nothing here can wait on it)."""
    async with asyncio.timeout(limit):
        while True:
            ws = await cluster.attempt(port, user, node=0)
            if not isinstance(ws, int):
                return ws
            assert ws == 4105
            await asyncio.sleep(UNIT)


async def closed_code(ws: ClientConnection) -> int | None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass
    return ws.close_code


def forwarding(node: Node) -> bool:
    return any(r["decision"] == "forward" for r in tunnel_lines(node, "resume"))


async def until_ready(cluster: Cluster, node: int, status: int) -> None:
    """Poll a node's /readyz until it answers ``status``."""
    async with asyncio.timeout(200 * UNIT):
        while await cluster.readyz(node) != status:  # noqa: ASYNC110
            await asyncio.sleep(UNIT)


def tunnel_lines(node: Node, event: str) -> list[dict[str, Any]]:
    records = []
    for line in node.log().splitlines():
        start = line.find("{")
        if start >= 0 and f'"event":"{event}"' in line:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line[start:]))
    return records


@dataclass
class Upload:
    session: TunnelSession
    answer: str  # what the sink target answered: the sha256 of what it received
    sent: str  # the sha256 of what was written


OnChunk = Callable[[int, TunnelSession], Awaitable[None]]


async def upload(cluster: Cluster, sink: TcpTarget, total: int, on_chunk: OnChunk | None = None
                 ) -> Upload:  # fmt: skip
    """``total`` bytes through a native tunnel (via the balancer) to ``sink``; ``on_chunk(n,
    session)`` runs before chunk ``n`` is written (faults mid-transfer)."""
    opts = client_options(cluster.url, None, cluster.issuer.mint(lifetime=600), sink.port)
    async with listening(opts) as listener, asyncio.timeout(600 * UNIT):
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        session = await only_session(listener)
        sent = hashlib.sha256()
        for n, chunk in enumerate(deterministic_chunks(total)):
            if on_chunk is not None:
                await on_chunk(n, session)
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        await finished(listener)
    return Upload(session, answer.decode(), sent.hexdigest())


async def test_resume_on_another_node_loses_no_byte(
    cluster: Cluster, sink: TcpTarget, tmp_path: Path
) -> None:
    total = 16 * MiB

    # The first WebSocket (through the balancer to relay-0) is cut after 4 MiB upstream; the
    # client resumes through the balancer, which sends it to relay-1: it forwards to relay-0.
    def cut(link: Link) -> None:
        if link.number == 1:
            link.drop_after(4 * MiB, "up")

    cluster.lb.on_connect = cut
    cluster.route.extend([0, 1])
    done = await upload(cluster, sink, total)
    assert done.answer == done.sent
    assert sink.received == total
    assert done.session.resumes == 1
    assert cluster.lb.resets == 1
    forwarded = [r for r in tunnel_lines(cluster.nodes[1], "resume") if r["decision"] == "forward"]
    assert len(forwarded) == 1, cluster.nodes[1].log()
    resumed = [r for r in tunnel_lines(cluster.nodes[0], "resume") if r["decision"] == "allow"]
    assert len(resumed) == 1
    assert resumed[0]["source_ip"] == "127.0.0.1"  # the client's address, vouched for by relay-1


async def test_revoke_on_one_node_closes_a_tunnel_on_another_within_1s(
    cluster: Cluster, echo: TcpTarget
) -> None:
    latencies = []
    for round_ in range(5):
        user = f"revoked{round_}"
        ws = await cluster.tunnel(echo.port, user, node=2)
        start = time.monotonic()
        result = await cluster.revoke(0, user)
        assert result["closed"] == 0  # nothing on relay-0 itself
        async with asyncio.timeout(100 * UNIT):
            code = await closed_code(ws)
        latencies.append(time.monotonic() - start)
        assert code == 4033
    print(
        f"\nrevocation relay-0 -> relay-2: p50 {statistics.median(latencies) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 1.0
    wanted = {f"user:revoked{i}@example.com" for i in range(5)}
    await eventually(
        lambda: (
            {r["subject"] for r in tunnel_lines(cluster.nodes[2], "revocation_received")} >= wanted
        )
    )


async def test_caps_hold_across_nodes(cluster: Cluster, echo: TcpTarget) -> None:
    open_ = [await cluster.tunnel(echo.port, "capped", node=i) for i in range(CAP)]
    # Each node holds one: only the cluster-wide count refuses the next (4105 after accept).
    assert await cluster.attempt(echo.port, "capped", node=0) == 4105
    other = await cluster.tunnel(echo.port, "someone-else", node=0)  # per principal
    await open_[1].close()
    again = await admitted(cluster, echo.port, "capped", 100 * UNIT)
    for ws in (open_[0], open_[2], other, again):
        await ws.close()


async def test_redis_killed_and_restarted_loses_nothing(
    cluster: Cluster, echo: TcpTarget, sink: TcpTarget
) -> None:
    # A tunnel on relay-2 of a user who will be revoked on relay-0 while Redis is down.
    doomed = await cluster.tunnel(echo.port, "outage", node=2)
    total = 8 * MiB

    async def kill_redis(n: int, session: TunnelSession) -> None:
        if n != 16:
            return
        # The tunnel is open (claimed in Redis) once bytes reach the target; killing Redis
        # before that would refuse the tunnel itself (1013), as it should.
        await eventually(lambda: sink.received > 0)
        await cluster.redis.stop()  # mid-transfer
        # New tunnels fail closed: 503 at the handshake once the node noticed, 1013 right
        # after it before.
        assert await cluster.attempt(echo.port, "newcomer") in (503, 1013)
        await until_ready(cluster, 0, 503)
        assert (await cluster.revoke(0, "outage"))["closed"] == 0

    done = await upload(cluster, sink, total, kill_redis)
    assert done.answer == done.sent  # the open tunnel never noticed
    assert sink.received == total
    await cluster.redis.start()  # empty: no persistence
    async with asyncio.timeout(200 * UNIT):
        # relay-0 pushes the revocation again; relay-2 gets it and closes the tunnel.
        assert await closed_code(doomed) == 4033
    await until_ready(cluster, 0, 200)
    ws = await cluster.tunnel(echo.port, "newcomer")
    await ws.close()


async def test_a_killed_nodes_cap_slots_expire(cluster: Cluster, echo: TcpTarget) -> None:
    held = [await cluster.tunnel(echo.port, "crash", node=i) for i in range(CAP)]
    await cluster.nodes[1].kill()
    killed = time.monotonic()
    assert await cluster.attempt(echo.port, "crash", node=0) == 4105
    again = await admitted(cluster, echo.port, "crash", LEASE_TTL + 200 * UNIT)
    freed = time.monotonic() - killed
    print(f"\ncap slot of a killed node freed after {freed:.2f} s (lease {LEASE_TTL} s)")
    assert freed >= LEASE_TTL / 2
    for ws in (held[0], held[2], again):
        await ws.close()


async def test_a_forwarding_node_going_away_does_not_end_the_tunnel(
    cluster: Cluster, sink: TcpTarget
) -> None:
    """relay-1 forwards a resumed tunnel of relay-0 and then stops (SIGINT: its connections
    close at once). The tunnel must survive: relay-0 parks it, the client resumes through
    relay-2, and no byte is lost."""
    total = 16 * MiB

    def cut(link: Link) -> None:
        if link.number == 1:
            link.drop_after(2 * MiB, "up")

    cluster.lb.on_connect = cut
    cluster.route.extend([0, 1, 2])
    stopped = False

    async def stop_forwarder(n: int, session: TunnelSession) -> None:
        nonlocal stopped
        if stopped or session.resumes != 1 or n * 64 * 1024 <= 6 * MiB:
            return
        # (resumes counts interruptions: wait until relay-1 really forwards.)
        await eventually(lambda: forwarding(cluster.nodes[1]))
        node = cluster.nodes[1].process
        assert node is not None
        node.process.send_signal(signal.SIGINT)
        stopped = True
        await eventually(lambda: session.resumes == 2)  # through relay-2, to relay-0

    done = await upload(cluster, sink, total, stop_forwarder)
    assert stopped
    assert done.answer == done.sent
    assert sink.received == total
    assert done.session.resumes == 2
    # The owner writes its record as the tunnel ends, and the test reads the node's log
    # through a pipe: wait for the line instead of racing it.
    await eventually(lambda: bool(tunnel_lines(cluster.nodes[0], "tunnel_closed")))
    closed = tunnel_lines(cluster.nodes[0], "tunnel_closed")
    assert [r["close_code"] for r in closed] == [1000]


@pytest.mark.parametrize("subprotocol", [IAP_SUBPROTOCOL, NATIVE])
async def test_close_burst_through_a_forwarded_resume_loses_nothing(
    cluster: Cluster, sink: TcpTarget, subprotocol: str
) -> None:
    """A raw client opens on relay-0, sends half, vanishes, resumes through relay-1 (which
    forwards to relay-0), then writes the rest and its close in one TCP write: the target gets
    every byte, then EOF, every time (issue 10, forwarded)."""
    path = f"/v4/connect?project=p&zone=z&instance=vm1&interface=nic0&port={sink.port}"
    for size in (64 * 1024 + 7, 1 * MiB, 8 * MiB):
        data = b"".join(deterministic_chunks(size))
        half = size // 2
        for _ in range(10):
            token = cluster.issuer.mint(lifetime=600)
            client = RawTunnelClient(cluster.url, path, token, subprotocol)
            async with asyncio.timeout(400 * UNIT):
                cluster.route.append(0)
                await client.open()
                client.send(data[:half])
                await client.drop()
                cluster.route.append(1)
                await client.resume()  # relay-1 forwards to the owner, relay-0
                await client.burst(data[half:])
                got = await sink.completed.get()
            assert got == (size, hashlib.sha256(data).hexdigest())
    assert forwarding(cluster.nodes[1])
