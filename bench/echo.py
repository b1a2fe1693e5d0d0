"""The TCP target for round trips, tunnel churn and idle tunnels: echoes what it reads, closes
after the peer's EOF, holds idle connections for as long as the peer keeps them.

    python -m bench.echo PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

from tunnel_runtime.loop import run


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the peer is done sending


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    run(serve(int(sys.argv[1])))
