"""HTTP mode overhead: requests/s and p50/p99 latency through the proxy vs the upstream
directly (same run, same demo upstream, bearer token). The load generator runs in a child
process so that it does not share the proxy's event loop.

    python -m bench.http_mode [--requests 2000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import aiohttp


async def load(
    url: str, headers: dict[str, str], requests: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    remaining = requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with http.get(url, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - start)

        for _ in range(50):  # warm-up (connections, JWKS)
            async with http.get(url, headers=headers) as resp:
                await resp.read()
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


async def child(args: argparse.Namespace) -> None:
    headers = json.loads(args.headers)
    print(json.dumps(await load(args.url, headers, args.requests, args.concurrency)))


async def parent(args: argparse.Namespace) -> None:
    from tests.http.harness import APP_AUDIENCE, proxy_stack, web_policy
    from tests.oidc_fixture import TestIssuer

    async with TestIssuer() as issuer:
        policy = web_policy({"demo": ["user:alice@example.com"]})
        async with proxy_stack(issuer.issuer, policy, apps=("demo",)) as stack:
            token = issuer.mint(aud=APP_AUDIENCE, lifetime=3600)
            assertion = stack.proxy.signer.sign(
                audience="app:demo", subject="alice", email="alice@example.com", groups=[],
                principal="user:alice@example.com",
            )  # fmt: skip
            runs = {
                "direct": (
                    f"http://127.0.0.1:{stack.upstream_ports['demo']}/headers",
                    {"X-Tunnel-Jwt-Assertion": assertion},
                ),
                "proxy": (
                    stack.base + "/headers",
                    {"Host": stack.host(), "Authorization": f"Bearer {token}"},
                ),
            }
            results = {}
            for name, (url, headers) in runs.items():
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.http_mode", "--child", url, json.dumps(headers),
                    "--requests", str(args.requests), "--concurrency", str(args.concurrency),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await process.communicate()
                results[name] = json.loads(out)
    direct, proxy = results["direct"], results["proxy"]
    print(json.dumps(results, indent=2))
    print(
        f"HTTP mode: {proxy['rps']:.0f} req/s vs {direct['rps']:.0f} direct; added latency "
        f"p50 {proxy['p50_ms'] - direct['p50_ms']:.2f} ms, "
        f"p99 {proxy['p99_ms'] - direct['p99_ms']:.2f} ms "
        f"({args.requests} requests, {args.concurrency} concurrent)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("URL", "HEADERS"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    if args.child:
        args.url, args.headers = args.child
        asyncio.run(child(args))
    else:
        asyncio.run(parent(args))


if __name__ == "__main__":
    main()
