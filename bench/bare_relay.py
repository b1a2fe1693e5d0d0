"""The calibration point of issue 7: a bare websockets relay (WebSocket -> TCP to one fixed
target) with no authentication, acks, resume or policy. With ``bench.wsclient`` in front it is
the "bare websockets chain": the ceiling for a design built on websockets on this machine, so
the gap between it and our relay is the product's own cost. uvloop and fixed malloc thresholds
(``runtime.run``), no compression, one message per 64 KiB read. Prints ``Listening on URL``.

    python -m bench.bare_relay TARGET_PORT [--cert C --key K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tunnel_runtime.loop import run

READ = 64 * 1024


async def _ws_to_tcp(ws: ServerConnection, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            writer.write(message if isinstance(message, bytes) else message.encode())
            await writer.drain()
    writer.close()


async def _tcp_to_ws(reader: asyncio.StreamReader, ws: ServerConnection) -> None:
    while data := await reader.read(READ):
        await ws.send(data)
    await ws.close()


async def main(target_port: int, context: ssl.SSLContext | None) -> None:
    async def handler(ws: ServerConnection) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", target_port, limit=4 * READ)
        except OSError:
            await ws.close(1011)
            return
        tasks = [
            asyncio.create_task(_ws_to_tcp(ws, writer)),
            asyncio.create_task(_tcp_to_ws(reader, ws)),
        ]
        with contextlib.suppress(OSError, ConnectionClosed):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()

    async with serve(
        handler,
        "127.0.0.1",
        0,
        ssl=context,
        subprotocols=[Subprotocol("binary")],
        compression=None,
        max_size=None,
        ping_interval=None,
    ) as server:
        port = list(server.sockets)[0].getsockname()[1]
        print(f"Listening on {'wss' if context else 'ws'}://127.0.0.1:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_port", type=int)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
    with contextlib.suppress(KeyboardInterrupt):
        run(main(args.target_port, tls))
