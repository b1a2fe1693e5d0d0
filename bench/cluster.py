"""Scale-out figures: revocation propagation across 3 relay nodes sharing Redis, and new-tunnel
throughput of 3 nodes against 1 (same run, same machine, loopback only, bounded).

Parts: a real redis-server on a free loopback port, an in-process issuer (ES256 JWKS) and echo
target, relay processes (``tunnel-server serve``, ws, state in Redis), the load generator as its
own process (native client, 8 concurrent workers: open -> 1-byte echo -> close, round robin over
the nodes' URLs as an ideal load balancer would).

Revocation: a tunnel held on relay-2, the user revoked through relay-0's admin API; measured
from sending the request until the tunnel's WebSocket is closed (4033) by relay-2.

    .venv/bin/python -m bench.cluster [--samples N] [--seconds S] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tunnel_protocol import NATIVE
from tunnel_protocol.urls import InstanceTarget, connect_query

from . import gate
from .handshake import Issuer, _echo
from .procs import Proc, free_port, kill_all, python_argv, spawn, wait_listening

SECRET = "bench-cluster-secret-0123456789abcdef"
RUNS = 3  # load-generator runs per setup; the median is reported


@asynccontextmanager
async def redis_server(workdir: Path) -> AsyncIterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    proc = await spawn("redis", argv, workdir, cpu=None)
    try:
        await wait_listening(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        await proc.stop()


def relay_config(
    issuer: Issuer, redis_url: str | None, index: int, port: int, admin_port: int
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "oidc": {"issuer": issuer.url, "audiences": ["tunnel"]},
        "inventory": {
            "instances": [{"project": "p", "zone": "z", "name": "vm", "address": "127.0.0.1"}]
        },
        "access": [
            {"members": ["allAuthenticatedUsers"], "instances": ["p/z/vm"], "ports": ["1-65535"]}
        ],
        "tunnel": {"max_tunnels_per_principal": 1000},
        "admin": {
            "listen": {"host": "127.0.0.1", "port": admin_port},
            "members": ["user:admin@example.com"],
        },
        "log_format": "text",
    }
    if redis_url is not None:
        data["state"] = {"backend": "redis", "redis_url": redis_url}
        data["cluster"] = {
            "node_id": f"relay-{index}",
            "advertise_url": f"ws://127.0.0.1:{port}",
            "secret": SECRET,
        }
    return data


class Node:
    def __init__(self, index: int) -> None:
        self.index = index
        self.port = free_port()
        self.admin_port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self, issuer: Issuer, redis_url: str | None, workdir: Path) -> None:
        config = workdir / f"relay-{self.index}.yaml"
        data = relay_config(issuer, redis_url, self.index, self.port, self.admin_port)
        config.write_text(json.dumps(data), encoding="utf-8")
        argv = python_argv("bench.relay_proc", str(config))
        self.proc = await spawn(f"relay-{self.index}", argv, workdir, cpu=None)
        await self.proc.wait_for_line(r"Listening on ws://")


@asynccontextmanager
async def relays(
    count: int, issuer: Issuer, redis_url: str | None, workdir: Path
) -> AsyncIterator[list[Node]]:
    nodes = [Node(i) for i in range(count)]
    try:
        await asyncio.gather(*(node.start(issuer, redis_url, workdir) for node in nodes))
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None:
                await node.proc.stop()


async def churn(urls: list[str], target_port: int, token: Path, workdir: Path, seconds: float
                ) -> dict[str, Any]:  # fmt: skip
    """The median of RUNS load-generator runs (by rate); errors summed."""
    results = [await _churn_once(urls, target_port, token, workdir, seconds) for _ in range(RUNS)]
    median = sorted(results, key=lambda r: float(r["rate"]))[len(results) // 2]
    return {**median, "errors": sum(int(r["errors"]) for r in results)}


async def _churn_once(urls: list[str], target_port: int, token: Path, workdir: Path,
                      seconds: float) -> dict[str, Any]:  # fmt: skip
    argv = python_argv(
        "bench.loadgen", "rate", "--kind", "native", "--url", ",".join(urls),
        "--target-port", str(target_port), "--token-file", str(token),
        "--seconds", str(seconds), "--concurrency", "8",
    )  # fmt: skip
    proc = await spawn("loadgen", argv, workdir, cpu=None)
    try:
        async with asyncio.timeout(seconds + 60):
            await proc.process.wait()
    finally:
        await proc.stop()
    return dict(json.loads(proc.log_text().strip().splitlines()[-1]))


async def hold(url: str, target_port: int, token: str) -> ClientConnection:
    target = InstanceTarget("p", "z", "vm", "nic0", target_port)
    ws = await connect(
        url + connect_query(target),
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=[Subprotocol(NATIVE.subprotocol)],
        compression=None,
        ping_interval=None,
    )
    await ws.recv()  # the SID frame: attached
    return ws


async def revocation_latency(
    nodes: list[Node], issuer: Issuer, target_port: int, samples: int
) -> list[float]:
    admin = issuer.token("admin")
    latencies = []
    async with aiohttp.ClientSession() as http:
        for n in range(samples):
            user = f"revoked{n}"
            ws = await hold(nodes[2].url, target_port, issuer.token(user))
            start = time.perf_counter()
            async with http.post(
                f"http://127.0.0.1:{nodes[0].admin_port}/admin/revoke",
                json={"user": f"user:{user}@example.com"},
                headers={"Authorization": f"Bearer {admin}"},
            ) as response:
                assert response.status == 200, await response.text()
            with contextlib.suppress(ConnectionClosed):
                async with asyncio.timeout(5):
                    async for _ in ws:
                        pass
            latencies.append((time.perf_counter() - start) * 1000)
            assert ws.close_code == 4033, ws.close_code
    return latencies


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main(samples: int, seconds: float) -> str:
    issuer = Issuer()
    await issuer.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    target_port = int(target.sockets[0].getsockname()[1])
    rows: list[str] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            token = workdir / "token"
            token.write_text(issuer.token(), encoding="ascii")
            async with relays(1, issuer, None, workdir) as nodes:
                one_memory = await churn([nodes[0].url], target_port, token, workdir, seconds)
            async with redis_server(workdir) as redis_url:
                async with relays(1, issuer, redis_url, workdir) as nodes:
                    one_redis = await churn([nodes[0].url], target_port, token, workdir, seconds)
                async with relays(3, issuer, redis_url, workdir) as nodes:
                    urls = [node.url for node in nodes]
                    three = await churn(urls, target_port, token, workdir, seconds)
                    latencies = await revocation_latency(nodes, issuer, target_port, samples)
    finally:
        target.close()
        await issuer.stop()
        kill_all()
    base = one_redis["rate"]
    rows.append(f"| setup | new tunnels/s (median of {RUNS}) | vs 1 node (Redis) | errors |")
    rows.append("|---|---:|---:|---:|")
    for name, result in (
        ("1 node, in-memory state", one_memory),
        ("1 node, Redis state", one_redis),
        ("3 nodes, Redis state", three),
    ):
        rows.append(
            f"| {name} | {result['rate']:.0f} | {result['rate'] / base:.2f}x | {result['errors']} |"
        )
    rows.append("")
    rows.append(
        f"Revocation relay-0 -> tunnel closed on relay-2 ({len(latencies)} samples): "
        f"p50 {statistics.median(latencies):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
        f"max {max(latencies):.1f} ms (bound: 1 s)."
    )
    return "\n".join(rows)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    start = gate.start_load()
    try:
        text = asyncio.run(main(args.samples, args.seconds))
    except KeyboardInterrupt:  # pragma: no cover
        kill_all()
        sys.exit(130)
    end = gate.load1()
    print(text)
    if args.out is not None:
        header = (
            "# Scale-out benchmark\n\nWritten by `make bench` (`python -m bench.cluster`): "
            "loopback, 2 cores shared by every process, so 3 nodes measure the cluster's "
            "overhead and coordination rather than added capacity.\n\n"
            f"{_sentence(gate.verdict(start, end))}\n\n"
        )
        args.out.write_text(header + text + "\n", encoding="utf-8")
    gate.exit_if_busy(start, end)


if __name__ == "__main__":
    cli()
