"""The bare picows chain (a benchmark calibration path) carries bytes intact both ways, over ws
and wss, including what the local side sends before the WebSocket is up."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

import pytest

from tunnel_server.ops.tls import write_self_signed

from ..processes import started

pytest.importorskip("picows")  # CPython only (the test extra)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_chain_echoes_intact(tls: bool, tmp_path: Path) -> None:
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    chain = [sys.executable, "-m", "bench.picows_chain"]
    relay_argv = [*chain, "relay", str(target.sockets[0].getsockname()[1])]
    if tls:
        relay_argv += ["--cert", str(cert), "--key", str(key)]
    async with (
        target,
        started(relay_argv, r"Listening on (wss?://\S+)", stdout=True) as relay,
    ):
        client_argv = [*chain, "client", relay.found]
        if tls:
            client_argv += ["--ca-file", str(cert)]
        async with started(client_argv, r"Listening on port \[(\d+)\]", stdout=True) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", int(client.found))
            # Sent at once: it reaches the client before its WebSocket is up.
            payload = b"first" + os.urandom(8 << 20)
            writer.write(payload)
            received = await reader.readexactly(len(payload))
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
