"""HTTP mode against nginx and a bare reverse proxy on the same stack (issue 17), with wrk.

Layout (2 cores): wrk (1 thread, 8 keep-alive connections) and the upstream (nginx, one
worker, a 1 KiB response) on CPU 0; each proxy alone on CPU 1: nginx as a plain reverse proxy
(upstream keep-alive), the bare aiohttp proxy (``bench.http_bare``, on uvloop and on asyncio),
and HTTP mode (``bench.http_proxy``: the real request path) with a bearer token and with a
session cookie. Then ``http.workers``: one against two HTTP-mode processes on one port
(SO_REUSEPORT), unpinned, with 32 connections so that both get an even share. Rounds are
interleaved; medians are reported. The load average is recorded at the start and the targets
are not judged above 0.5.

    python -m bench.http_mode [--seconds 5] [--rounds 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import gate, http_report
from .http_report import Results, Run
from .procs import (
    CLIENT_CPU,
    PINNING,
    SERVER_CPU,
    Proc,
    cpu_seconds,
    free_port,
    kill_all,
    spawn,
    wait_listening,
)
from .sections import write_section

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
TASKSET = shutil.which("taskset")
HOST = "demo.localhost"
BODY = "x" * 1024
QUIET = gate.QUIET  # load average at the start above which targets are not judged

UPSTREAM_CONF = """
worker_processes 1; daemon off; pid {dir}/{name}.pid; error_log {dir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 10000000; keepalive_timeout 300s;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/f;
  uwsgi_temp_path {dir}/u; scgi_temp_path {dir}/s;
  {upstream_block}
  server {{ listen 127.0.0.1:{port}; location / {{ {location} }} }}
}}
"""


def nginx_conf(directory: Path, name: str, port: int, upstream: int | None) -> Path:
    if upstream is None:
        block, location = "", f"default_type text/plain; return 200 '{BODY}';"
    else:
        block = f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
        location = (
            'proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; '
            "proxy_set_header Host $host;"
        )
    path = directory / f"{name}.conf"
    text = UPSTREAM_CONF.format(
        dir=directory, name=name, port=port, upstream_block=block, location=location
    )
    path.write_text(text)
    return path


async def nginx(directory: Path, name: str, port: int, upstream: int | None, cpu: int) -> Proc:
    conf = nginx_conf(directory, name, port, upstream)
    argv = [
        NGINX,
        "-e",
        str(directory / f"{name}-error.log"),
        "-p",
        str(directory),
        "-c",
        str(conf),
    ]
    proc = await spawn(name, argv, directory, cpu=cpu)
    await wait_listening(port, proc)
    return proc


async def wrk(url: str, headers: Sequence[str], seconds: float, connections: int,
              cpu: int | None) -> Run:  # fmt: skip
    argv = [WRK, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    for header in headers:
        argv[1:1] = ["-H", header]
    if PINNING and cpu is not None and TASKSET:
        argv = [TASKSET, "-c", str(cpu), *argv]
    process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    out = (await process.communicate())[0].decode()
    if "Non-2xx" in out or "Socket errors" in out or process.returncode:
        raise RuntimeError(f"wrk against {url} ({headers}) saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    # cpu_us holds the request count until measure() turns it into CPU per request.
    return Run(rps, _latency(out, "50"), _latency(out, "99"), float(requests))


def _latency(out: str, percent: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if match is None:
        raise RuntimeError(f"no {percent}% latency in wrk output:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale


@dataclass
class Case:
    name: str
    port: int
    headers: list[str]
    connections: int = 8
    pinned: bool = True


async def measure(case: Case, pids: list[int], seconds: float, results: Results) -> None:
    """One wrk run against ``case``; ``pids``: the proxy's processes, whose CPU per request
    is read from /proc (robust where the throughput is not: a busy machine's other work
    takes turns on the proxy's core)."""
    url = f"http://127.0.0.1:{case.port}/"
    headers = [f"Host: {HOST}:{case.port}", *case.headers]
    cpu = CLIENT_CPU if case.pinned else None
    await wrk(url, headers, 1, case.connections, cpu)  # warm-up: connections, JWKS, caches
    before = sum(cpu_seconds(pid) for pid in pids)
    run = await wrk(url, headers, seconds, case.connections, cpu)
    run.cpu_us = (sum(cpu_seconds(pid) for pid in pids) - before) / run.cpu_us * 1e6
    results.runs.setdefault(case.name, []).append(run)
    print(f"  {case.name:34} {run.rps:9.0f} req/s  p50 {run.p50_ms:6.3f} ms  "
          f"p99 {run.p99_ms:6.3f} ms  CPU {run.cpu_us:6.1f} µs/req", file=sys.stderr,
          flush=True)  # fmt: skip


async def http_mode(directory: Path, name: str, issuer: str, upstream: int, port: int,
                    sid: str, cpu: int | None) -> Proc:  # fmt: skip
    argv = [sys.executable, "-m", "bench.http_proxy", issuer, str(upstream), str(port), sid]
    proc = await spawn(name, argv, directory, cpu=cpu)
    await proc.wait_for_line(rf"Listening on {port}")
    return proc


async def bare_proxies(
    directory: Path, upstream: int, granian: bool, procs: list[Proc]
) -> dict[str, int]:
    """The bare reverse proxies on CPU 1 (aiohttp on uvloop and on asyncio; granian when
    asked): name -> port."""
    ports = {}
    for name, extra in (("bare-uvloop", []), ("bare-asyncio", ["--asyncio"])):
        ports[name] = free_port()
        argv = [sys.executable, "-m", "bench.http_bare", str(upstream), str(ports[name]), *extra]
        procs.append(proc := await spawn(name, argv, directory, cpu=SERVER_CPU))
        await proc.wait_for_line(r"Listening on")
    if granian:
        ports["bare-granian"] = port = free_port()
        argv = [sys.executable, "-m", "granian", "--interface", "rsgi", "--loop", "uvloop",
                "--workers", "1", "--runtime-mode", "st", "--host", "127.0.0.1", "--port",
                str(port), "--log-level", "warning", "bench.http_bare_granian:app"]  # fmt: skip
        env = {**os.environ, "UPSTREAM_PORT": str(upstream)}
        procs.append(proc := await spawn("bare-granian", argv, directory, cpu=SERVER_CPU, env=env))
        await wait_listening(port, proc)
    return ports


def cases(ports: dict[str, int], bearer: str, cookie: str) -> list[Case]:
    bare = [
        Case("nginx reverse proxy", ports["nginx"], []),
        Case("bare aiohttp proxy, uvloop", ports["bare-uvloop"], []),
        Case("bare aiohttp proxy, asyncio", ports["bare-asyncio"], []),
    ]
    if "bare-granian" in ports:
        bare.append(Case("bare granian + aiohttp client", ports["bare-granian"], []))
    return [
        *bare,
        Case("HTTP mode, bearer", ports["http"], [bearer]),
        Case("HTTP mode, cookie", ports["http"], [cookie]),
        Case("1 worker, bearer", ports["http-1w"], [bearer], 32, False),
        Case("2 workers, bearer", ports["http-2w"], [bearer], 32, False),
        Case("1 worker, cookie", ports["http-1w"], [cookie], 32, False),
        Case("2 workers, cookie", ports["http-2w"], [cookie], 32, False),
    ]


async def bench(args: argparse.Namespace) -> Results:
    from tests.oidc_fixture import TestIssuer  # the bench's IdP: JWKS served from this process

    results = Results(load_start=gate.start_load())
    directory = Path(tempfile.mkdtemp(prefix="bench-http-"))
    procs: list[Proc] = []
    try:
        async with TestIssuer() as issuer:
            token = issuer.mint(aud="https://demo.app", lifetime=24 * 3600)
            sid = secrets.token_hex(32)  # never starts with "-" (an option to argparse)
            upstream = free_port()
            procs.append(await nginx(directory, "upstream", upstream, None, CLIENT_CPU))
            ports = {name: free_port() for name in ("nginx", "http", "http-1w", "http-2w")}
            procs.append(await nginx(directory, "nginx", ports["nginx"], upstream, SERVER_CPU))
            ports |= await bare_proxies(directory, upstream, args.granian, procs)
            for name, port, cpu in (("http", ports["http"], SERVER_CPU),
                                    ("http-1w", ports["http-1w"], None),
                                    ("http-2w-0", ports["http-2w"], None),
                                    ("http-2w-1", ports["http-2w"], None)):  # fmt: skip
                procs.append(await http_mode(directory, name, issuer.issuer, upstream, port, sid,
                                             cpu))  # fmt: skip
            bearer = f"Authorization: Bearer {token}"
            cookie = f"Cookie: __Host-tunnel_session={sid}"
            owners: dict[int, list[int]] = {}  # port -> the processes serving it
            for proc in procs:
                served = ports.get(re.sub(r"-\d$", "", proc.name))  # http-2w-0 -> http-2w
                if served is not None:
                    owners.setdefault(served, []).append(proc.pid)
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for case in cases(ports, bearer, cookie):
                    await measure(case, owners[case.port], args.seconds, results)
    finally:
        for proc in procs:
            await proc.stop()
        kill_all()
        shutil.rmtree(directory, ignore_errors=True)
    results.load_end = os.getloadavg()[0]
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="markdown file whose HTTP-mode section to write")
    parser.add_argument("--json", type=Path, help="also write the raw runs as JSON")
    parser.add_argument(
        "--granian", action="store_true",
        help="also the bare proxy behind granian's server (pip install granian first)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for tool in (NGINX, WRK):
        if not Path(tool).exists():
            sys.exit(f"{tool} is missing: run scripts/install-bench-deps.sh")
    results = asyncio.run(bench(args))
    text = http_report.render(results, QUIET, args)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({k: [r.__dict__ for r in v]
                                         for k, v in results.runs.items()}, indent=1))  # fmt: skip
    if args.out:
        write_section(args.out, text, name="http-mode")
    gate.exit_if_busy(results.load_start, results.load_end)


if __name__ == "__main__":
    main()
