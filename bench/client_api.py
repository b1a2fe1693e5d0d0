"""The library API's costs, for issue 14's closing note (loopback, bounded, ~30 s):

1. Time to first byte: ``tunnel_client.forward()`` (enter the block, connect to the local port,
   one byte echoed) against ``tunnel-client start-tunnel`` as a process (spawn, wait for
   ``Listening on port [N].``, connect, one byte echoed), with and without its connection check.
2. Throughput of one tunnel (``connect()``, client -> target, sha256-checked by the sink) direct
   and through a real tinyproxy (HTTP CONNECT), in MB/s.

The load average at the start is printed with the results: compare only runs on a quiet
machine (docs/benchmarks.md). Writes docs/benchmarks-client.md with ``--out``.

    .venv/bin/python -m bench.client_api [--samples 10] [--megabytes 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tunnel_client
from tests.client.tinyproxy import tinyproxy
from tests.helpers import (
    TcpTarget,
    deterministic_chunks,
    deterministic_digest,
    relay_config_data,
    start_relay,
)
from tests.oidc_fixture import TestIssuer

CLIENT = [sys.executable, "-m", "tunnel_client"]
LIMIT = 60.0


async def echo_one_byte(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), LIMIT) == b"x"
    finally:
        writer.close()


async def forward_ttfb(client: tunnel_client.Client, target: tunnel_client.Target) -> float:
    start = time.perf_counter()
    async with client.forward(target) as (host, port):
        await echo_one_byte(host, port)
        elapsed = time.perf_counter() - start
    return elapsed


async def start_tunnel_ttfb(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *CLIENT, "start-tunnel", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), LIMIT)
        port = int(line.decode().split("[")[1].split("]")[0])
        await echo_one_byte("127.0.0.1", port)
        return time.perf_counter() - start
    finally:
        process.terminate()
        await process.wait()


async def throughput(
    client: tunnel_client.Client, target: tunnel_client.Target, size: int
) -> float:
    start = time.perf_counter()
    async with client.connect(target) as (reader, writer):
        for chunk in deterministic_chunks(size, chunk=64 * 1024):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        digest = (await asyncio.wait_for(reader.read(), LIMIT)).decode()
    elapsed = time.perf_counter() - start
    assert digest == deterministic_digest(size), "corrupted transfer"
    return size / elapsed / 1e6


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered) * 1000:.1f} (min {ordered[0] * 1000:.1f})"


async def main(samples: int, megabytes: int) -> str:
    load = os.getloadavg()
    size = megabytes * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp_name:
        tmp = Path(tmp_name)
        async with TestIssuer() as issuer:
            echo = await TcpTarget("echo").start()
            sink = await TcpTarget("sink").start()
            data = relay_config_data(issuer, tmp, instances={"vm1": 0})
            try:
                async with start_relay(data) as relay:
                    token = issuer.mint(lifetime=3600)
                    client = tunnel_client.Client(
                        relay.url, token=token, project="p", zone="z",
                        ca_file=tmp / "relay-cert.pem", proxy="none",
                    )  # fmt: skip
                    echo_target = client.instance("vm1", echo.port)
                    token_file = tmp / "token"
                    token_file.write_text(token)
                    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
                    args = [
                        "vm1", str(echo.port), "--project=p", "--zone=z", f"--server={relay.url}",
                        f"--ca-file={tmp / 'relay-cert.pem'}", f"--access-token-file={token_file}",
                        "--proxy=none",
                    ]  # fmt: skip
                    await forward_ttfb(client, echo_target)  # warm-up (imports, TLS session)
                    fwd = [await forward_ttfb(client, echo_target) for _ in range(samples)]
                    cli = [await start_tunnel_ttfb(args, env) for _ in range(samples)]
                    nocheck = [
                        await start_tunnel_ttfb([*args, "--disable-connection-check"], env)
                        for _ in range(samples)
                    ]
                    sink_target = client.instance("vm1", sink.port)
                    direct = [await throughput(client, sink_target, size) for _ in range(3)]
                    port = int(relay.url.rsplit(":", 1)[1])
                    async with tinyproxy(tmp / "proxy", connect_ports=[port]) as proxy:
                        client.proxy = proxy.url()
                        via = [await throughput(client, sink_target, size) for _ in range(3)]
            finally:
                await echo.stop()
                await sink.stop()
    lines = [
        "# Library API and proxy measurements (bench/client_api.py)",
        "",
        f"Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
        f"({os.cpu_count()} cores); loopback, wss with a self-signed certificate; medians.",
        "",
        "| time to first byte (ms) | median (min) |",
        "|---|---:|",
        f"| `forward()` in-process: listener up, connect, 1 byte echoed | {ms(fwd)} |",
        f"| `tunnel-client start-tunnel` process, with its connection check | {ms(cli)} |",
        f"| `tunnel-client start-tunnel --disable-connection-check` | {ms(nocheck)} |",
        "",
        f"| one tunnel, {megabytes} MiB client -> target (sha256-checked) | MB/s (3 runs) |",
        "|---|---:|",
        f"| direct | {statistics.median(direct):.0f} ({', '.join(f'{v:.0f}' for v in direct)}) |",
        f"| through tinyproxy (HTTP CONNECT) | {statistics.median(via):.0f} "
        f"({', '.join(f'{v:.0f}' for v in via)}) |",
        "",
        "The relay, the sink target and the client share one process and one event loop here",
        "(the data is generated and hashed there too), so the absolute MB/s are far below",
        "`make bench`'s figures; the ratio proxy/direct is the point. The start-tunnel times",
        "are dominated by starting a Python process and importing the client.",
    ]
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=32)
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    report = asyncio.run(main(options.samples, options.megabytes))
    print(report)
    if options.out is not None:
        options.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    cli()
