"""The console's cluster view: two relays sharing a real Redis. The console on one node lists a
tunnel held by the other with its details (from that node's published snapshot) and revokes it
there; a node that publishes no snapshot still shows its registry's tunnels (partial rows), and
what comes from Redis is escaped like everything else."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from ..helpers import UNIT, TcpTarget
from ..oidc_fixture import TestIssuer
from ..redis_fixture import RedisServer
from .harness import closed_code, cluster_node, identity, open_tunnel

ALICE = identity("alice@example.com")


async def listed(client: Any, predicate: Any, limit: float = 100 * UNIT) -> list[dict[str, Any]]:
    """Poll the console's tunnel list (as its page does) until ``predicate(rows)`` holds."""
    async with asyncio.timeout(limit):
        while True:
            async with client.get("/console/api/tunnels") as response:
                data = await response.json()
            if predicate(data["tunnels"]):
                assert data["scope"] == "cluster"
                return list(data["tunnels"])
            await asyncio.sleep(UNIT)  # the page's own polling interval, scaled


async def test_a_tunnel_on_another_node_is_listed_and_revoked_from_here(
    issuer: TestIssuer, tmp_path: Path, redis: RedisServer, echo: TcpTarget
) -> None:
    async with (
        cluster_node(issuer, tmp_path, redis.url, "node-a") as a,
        cluster_node(issuer, tmp_path, redis.url, "node-b") as b,
        open_tunnel(b.server.url, issuer.mint(), echo.port) as tunnel,
        a.browser(ALICE) as (client, csrf),
    ):
        rows = await listed(client, lambda rows: any(r.get("bytes_from_client") for r in rows))
        (row,) = rows
        assert (row["node"], row["target"], row["port"]) == (
            "node-b",
            "instance:p/z/vm1",
            echo.port,
        )
        assert row["partial"] is False
        async with client.get("/console/api/overview") as response:
            nodes = (await response.json())["fragments"]["nodes"]
        assert "node-a (this node)" in nodes
        assert "node-b" in nodes
        headers = {"X-Console-Csrf": csrf, "Origin": a.origin}
        body = {"kind": "session", "subject": row["sid"]}
        started = time.monotonic()
        async with client.post("/console/api/revoke", json=body, headers=headers) as response:
            assert await response.json() == {"closed": 0}  # closed there, not here
        assert await closed_code(tunnel) == 4033
        assert time.monotonic() - started < 2.0
        await listed(client, lambda rows: not rows)


async def test_a_node_without_snapshot_shows_partial_rows_escaped(
    issuer: TestIssuer, tmp_path: Path, redis: RedisServer
) -> None:
    """A node that runs no console (or an older relay) publishes nothing: its lease and its
    tunnel registry still list its tunnels."""
    tag = "zzzzzzzz"
    principal = "user:<img/src=x/onerror=alert(1)>@example.com"
    async with cluster_node(issuer, tmp_path, redis.url, "node-a") as a:
        writer = aioredis.Redis.from_url(redis.url)
        try:
            await writer.hset(f"tunnel:node:{tag}", mapping={"node": "<b>node-x</b>", "url": ""})
            record = {"principal": principal, "subprotocol": "relay.tunnel.cloudproxy.app",
                      "created": time.time() - 90}  # fmt: skip
            await writer.hset(f"tunnel:tunnels:{tag}", "sid-x", json.dumps(record))
        finally:
            await writer.aclose()
        async with a.browser(ALICE) as (client, _):
            rows = await listed(client, lambda rows: len(rows) == 1)
            assert rows[0]["partial"] is True
            assert (rows[0]["node"], rows[0]["dialect"]) == ("<b>node-x</b>", "iap")
            assert rows[0]["principal"] == principal
            assert rows[0]["duration"] >= 90
            async with client.get("/console/tunnels") as response:
                html = await response.text()
            async with client.get("/console/") as response:
                overview = await response.text()
    assert "<img/src" not in html
    assert "&lt;img/src=x/onerror=alert(1)&gt;" in html
    assert "<b>node-x</b>" not in html + overview
    assert "&lt;b&gt;node-x&lt;/b&gt;" in overview
