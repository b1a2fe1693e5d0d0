"""A bare TCP-to-WebSocket forwarder, the client half in front of websockify (which has no client
of its own): each local connection opens one WebSocket (subprotocol ``binary``, no compression)
and bytes are copied both ways in 64 KiB reads, one message per read. Runs on uvloop when
installed. Prints ``Listening on port [N].``

    python -m bench.wsclient URL [--ca-file C]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tunnel_runtime.loop import run

READ = 64 * 1024


async def _tcp_to_ws(reader: asyncio.StreamReader, ws: ClientConnection) -> None:
    while data := await reader.read(READ):
        await ws.send(data)
    await ws.close()


async def _ws_to_tcp(ws: ClientConnection, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            writer.write(message if isinstance(message, bytes) else message.encode())
            await writer.drain()
    writer.close()


async def _handle(
    url: str,
    context: ssl.SSLContext | None,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        async with connect(
            url,
            subprotocols=[Subprotocol("binary")],
            compression=None,
            max_size=None,
            ping_interval=None,
            ssl=context,
        ) as ws:
            tasks = [
                asyncio.create_task(_tcp_to_ws(reader, ws)),
                asyncio.create_task(_ws_to_tcp(ws, writer)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    except (OSError, ConnectionClosed):
        pass
    finally:
        writer.close()


async def serve(url: str, context: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(
        lambda r, w: _handle(url, context, r, w), "127.0.0.1", 0, limit=4 * READ
    )
    port = server.sockets[0].getsockname()[1]
    print(f"Listening on port [{port}].", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--ca-file", type=Path)
    args = parser.parse_args()
    context = None
    if args.url.startswith("wss:"):
        context = ssl.create_default_context(cafile=str(args.ca_file) if args.ca_file else None)
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args.url, context))


if __name__ == "__main__":
    main()
