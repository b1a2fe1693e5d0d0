"""Where the relay and tunnel-client spend their CPU: py-spy samples both processes during a bulk
transfer (iperf3, each direction) or a 1-byte ping-pong, and prints the functions with the most
samples, by own time and including callees. Needs py-spy (`pip install py-spy`) and iperf3.

    .venv/bin/python -m bench.profile [--tls] [--loop asyncio] [--seconds 5] [--rtt]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tunnel_server.ops.tls import write_self_signed

from .handshake import Issuer
from .paths import Files, Relay
from .procs import (
    CLIENT_CPU,
    Proc,
    free_port,
    kill_all,
    pin,
    python_argv,
    spawn,
    wait_listening,
)
from .suite import IPERF3, _token

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def summarize(raw: Path, top: int) -> str:
    """Top functions of a py-spy ``raw`` (collapsed stacks) file, by self and inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; own time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  including callees:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name


async def _record(proc: Proc, seconds: float, out: Path) -> Proc:
    argv = [
        PY_SPY,
        "record",
        "--pid",
        str(proc.pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    return await spawn(f"py-spy-{out.stem}", argv, out.parent, cpu=None)


async def main(tls: bool, loop: str, seconds: int, rtt: bool, top: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    issuer = Issuer()
    await issuer.start()
    token_file = workdir / "token.txt"
    token_file.write_text(_token(issuer))
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    write_self_signed(cert, key)
    files = Files(workdir, cert, key, token_file, issuer.url)
    subject = Relay(tls, loop)
    target: Proc | None = None
    try:
        await subject.start(files, "profile")
        port = free_port()
        if rtt:
            target = await spawn("echo", python_argv("bench.echo", str(port)), workdir, cpu=1)
        else:
            assert IPERF3 is not None
            target = await spawn("iperf3-server", [IPERF3, "-s", "-p", str(port)], workdir, cpu=1)
        await wait_listening(port, target)
        local = await subject.chain(files, "profile", port)
        relay, client = subject.servers[0], subject.clients[0]
        cases = [("rtt", [])] if rtt else [("up", []), ("down", ["-R"])]
        for name, extra in cases:
            if rtt:
                for pid in (relay.pid, client.pid, target.pid):
                    pin(pid, CLIENT_CPU)
                argv = python_argv(
                    "bench.rtt",
                    str(local),
                    "--count",
                    "10000000",
                    "--max-seconds",
                    str(seconds + 2),
                )
            else:
                assert IPERF3 is not None
                argv = [IPERF3, "-c", "127.0.0.1", "-p", str(local), "-t", str(seconds + 2), *extra]
            load = await spawn(f"load-{name}", argv, workdir, cpu=CLIENT_CPU)
            await asyncio.sleep(1.0)
            started = time.monotonic()
            spies = [
                await _record(relay, seconds, workdir / f"relay-{name}.txt"),
                await _record(client, seconds, workdir / f"client-{name}.txt"),
            ]
            for spy in spies:
                await spy.process.wait()
            await load.process.wait()
            print(f"## {name} ({subject.name}, {time.monotonic() - started:.1f}s sampled)")
            print(load.log_tail(4))
            for who in ("relay", "client"):
                print(f"### {who}")
                print(summarize(workdir / f"{who}-{name}.txt", top))
    finally:
        await subject.stop()
        if target is not None:
            await target.stop()
        await issuer.stop()
        print(f"(raw stacks in {workdir})", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rtt", action="store_true", help="profile a 1-byte ping-pong instead")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.tls, args.loop, args.seconds, args.rtt, args.top))
    finally:
        kill_all()
