"""Load generator, in its own process: tunnel churn (``rate``) and idle tunnels (``idle``).

Kinds: ``tcp`` (a plain TCP connection: direct, socat), ``ws`` (a WebSocket with subprotocol
``binary``: websockify), ``native`` (our relay through the client library, ``TunnelSession``,
with a real JWT: the relay verifies it, decides the policy and dials the target every time).

``rate``: CONCURRENCY workers loop open -> 1-byte echo -> close for SECONDS after a warm-up;
prints ``{"count", "total", "seconds", "rate", "errors"}`` (``total`` includes the warm-up).
``idle``: opens N tunnels (CONCURRENCY at a time), each with a 1-byte echo, prints
``{"open", "errors", "seconds"}`` and holds them until stdin closes. Native idle tunnels are raw
WebSockets on the native subprotocol (SID, one DATA frame each way), which is what the relay
sees from an idle client.

    python -m bench.loadgen {rate,idle} --kind {tcp,ws,native} --url URL [options]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tunnel_client.session import ConnectOptions, TunnelSession
from tunnel_protocol import NATIVE, frames
from tunnel_protocol.urls import InstanceTarget, connect_query
from tunnel_runtime.loop import run

PROJECT, ZONE, INSTANCE = "p", "z", "vm"


class OneByte:
    """A ByteStream that sends one byte, waits for it to come back, then ends its direction."""

    def __init__(self) -> None:
        self._sent = False
        self._echoed = asyncio.Event()

    async def read(self, max_bytes: int) -> bytes:
        if not self._sent:
            self._sent = True
            return b"x"
        await self._echoed.wait()
        return b""

    async def write(self, data: bytes) -> None:
        self._echoed.set()

    async def write_eof(self) -> None:
        self._echoed.set()

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Args:
    def __init__(self, ns: argparse.Namespace) -> None:
        self.kind: str = ns.kind
        self.url: str = ns.url
        self.target_port: int = ns.target_port
        self.token = ns.token_file.read_text().strip() if ns.token_file else ""
        self.context: ssl.SSLContext | None = None
        if self.url.startswith("wss:"):
            self.context = ssl.create_default_context(cafile=str(ns.ca_file))

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.rpartition("/")[2].rpartition(":")
        return host, int(port)


def _one_tunnel(args: Args) -> Callable[[], Awaitable[None]]:
    """open -> 1-byte echo -> close, for ``rate``."""
    if args.kind == "tcp":
        host, port = args.host_port()

        async def tcp() -> None:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"x")
                await reader.readexactly(1)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        return tcp
    if args.kind == "ws":

        async def ws() -> None:
            async with connect(
                args.url, subprotocols=[Subprotocol("binary")], compression=None, ssl=args.context
            ) as conn:
                await conn.send(b"x")
                await conn.recv()

        return ws

    token = args.token

    async def provide() -> str:
        return token

    # Several comma-separated URLs: the workers take them in turn (client-side round robin
    # across relay nodes, the cluster benchmark's ideal load balancer).
    options = [
        ConnectOptions(
            url,
            InstanceTarget(PROJECT, ZONE, INSTANCE, "nic0", args.target_port),
            provide,
            args.context,
        )
        for url in args.url.split(",")
    ]
    turn = itertools.cycle(options)

    async def native() -> None:
        await TunnelSession(next(turn)).run(OneByte())

    return native


async def rate(args: Args, concurrency: int, seconds: float, warmup: float) -> dict[str, Any]:
    once = _one_tunnel(args)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + seconds
    count = total = 0
    errors: list[str] = []

    async def worker() -> None:
        nonlocal count, total
        while loop.time() < stop:
            try:
                await once()
            except Exception as exc:
                errors.append(repr(exc))
                await asyncio.sleep(0.01)
                continue
            total += 1
            now = loop.time()
            if start <= now < stop:
                count += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "count": count,
        "total": total,
        "seconds": seconds,
        "rate": count / seconds,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


async def _hold_native(args: Args) -> ClientConnection:
    ws = await connect(
        args.url + connect_query(InstanceTarget(PROJECT, ZONE, INSTANCE, "nic0", args.target_port)),
        additional_headers={"Authorization": f"Bearer {args.token}"},
        subprotocols=[Subprotocol(NATIVE.subprotocol)],
        compression=None,
        ssl=args.context,
        ping_interval=None,
        max_size=NATIVE.max_data + 1024,
        origin=None,
    )
    sid = frames.decode(await _recv_bytes(ws), max_data=NATIVE.max_data, native=True)
    if not isinstance(sid, frames.Sid):
        raise RuntimeError(f"expected a SID, got {sid!r}")
    await ws.send(frames.encode_data(b"x"))
    while not isinstance(
        frames.decode(await _recv_bytes(ws), max_data=NATIVE.max_data, native=True), frames.Data
    ):
        pass
    return ws


async def _recv_bytes(ws: ClientConnection) -> bytes:
    message = await ws.recv()
    return message if isinstance(message, bytes) else message.encode()


async def _hold(args: Args) -> object:
    if args.kind == "native":
        return await _hold_native(args)
    if args.kind == "ws":
        ws = await connect(
            args.url,
            subprotocols=[Subprotocol("binary")],
            compression=None,
            ssl=args.context,
            ping_interval=None,
        )
        await ws.send(b"x")
        await ws.recv()
        return ws
    host, port = args.host_port()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"x")
    await reader.readexactly(1)
    return writer


async def idle(args: Args, count: int, concurrency: int) -> None:
    held: list[object] = []
    errors: list[str] = []
    semaphore = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one() -> None:
        async with semaphore:
            try:
                held.append(await _hold(args))
            except Exception as exc:
                errors.append(repr(exc))

    await asyncio.gather(*(one() for _ in range(count)))
    report = {
        "open": len(held),
        "errors": len(errors),
        "seconds": time.perf_counter() - started,
        "first_error": errors[0] if errors else None,
    }
    print(json.dumps(report), flush=True)
    loop = asyncio.get_running_loop()
    # Hold until the suite closes our stdin.
    await loop.run_in_executor(None, sys.stdin.buffer.read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["rate", "idle"])
    parser.add_argument("--kind", choices=["tcp", "ws", "native"], required=True)
    parser.add_argument(
        "--url",
        required=True,
        help="tcp://H:P, ws[s]://H:P (native rate: several, comma-separated)",
    )
    parser.add_argument("--target-port", type=int, default=0, help="native: the target's port")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--ca-file", type=Path)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ns = parser.parse_args()
    args = Args(ns)
    use_uvloop = ns.loop == "uvloop"
    if ns.mode == "rate":
        result = run(rate(args, ns.concurrency, ns.seconds, ns.warmup), use_uvloop=use_uvloop)
        print(json.dumps(result), flush=True)
    else:
        run(idle(args, ns.count, ns.concurrency), use_uvloop=use_uvloop)


if __name__ == "__main__":
    main()
