"""Test building blocks with real sockets on loopback: TCP targets that count connections, a
fault-injecting proxy, and a relay started from a real config on port 0."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tunnel_server.app import RunningServer, running
from tunnel_server.config import ServerConfig, parse_config

from .faults import FaultProxy as FaultProxy  # re-exported: the proxy lives in tests/faults.py
from .loopback import LoopbackServer
from .oidc_fixture import TestIssuer

# One scaled time unit for every timing-dependent test (seconds).
UNIT = float(os.environ.get("TEST_TIME_UNIT", "0.05"))


class TcpTarget(LoopbackServer):
    """A TCP service on 127.0.0.1:0. Modes: ``echo`` writes back what it reads; ``sink`` hashes
    what it reads and answers the sha256 hex when the peer half-closes; ``source`` sends
    ``source_bytes`` of deterministic data then closes."""

    def __init__(self, mode: str = "echo", source_bytes: int = 0) -> None:
        self.mode = mode
        self.source_bytes = source_bytes
        self.connections = 0
        self.received = 0
        self.digests: list[str] = []
        # Sink: (bytes, sha256 hex) of each connection, once the peer half-closed it.
        self.completed: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.mode == "echo":
                while data := await reader.read(65536):
                    self.received += len(data)
                    writer.write(data)
                    await writer.drain()
            elif self.mode == "sink":
                digest = hashlib.sha256()
                count = 0
                while data := await reader.read(65536):
                    self.received += len(data)
                    count += len(data)
                    digest.update(data)
                self.digests.append(digest.hexdigest())
                self.completed.put_nowait((count, digest.hexdigest()))
                writer.write(digest.hexdigest().encode())
                await writer.drain()
            else:
                for chunk in deterministic_chunks(self.source_bytes):
                    writer.write(chunk)
                    await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


def deterministic_chunks(
    total: int, chunk: int = 65536, seed: bytes = b"tunnel"
) -> Iterator[bytes]:
    """Reproducible pseudo-random bytes (sha256 counter mode), in chunks."""
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        offset = sent % len(block)
        piece = (block[offset:] + block)[:n]
        yield piece
        sent += n


def deterministic_digest(total: int) -> str:
    digest = hashlib.sha256()
    for piece in deterministic_chunks(total):
        digest.update(piece)
    return digest.hexdigest()


def relay_config_data(
    issuer: TestIssuer,
    tmp_path: Path,
    *,
    instances: dict[str, int] | None = None,
    members: list[str] | None = None,
    tls: bool = True,
    tunnel: dict[str, Any] | None = None,
    extra_access: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A relay config: each instance name -> 127.0.0.1, in project p / zone z."""
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "oidc": {"issuer": issuer.issuer, "audiences": ["tunnel"]},
        "inventory": {
            "instances": [
                {"project": "p", "zone": "z", "name": name, "address": "127.0.0.1"}
                for name in (instances or {"vm1": 0})
            ]
        },
        "access": [
            {
                "members": members or ["user:alice@example.com"],
                "instances": [f"p/z/{name}" for name in (instances or {"vm1": 0})],
                "ports": ["1-65535"],
            },
            *(extra_access or []),
        ],
        "tunnel": {"resume_window": 60 * UNIT * 20, **(tunnel or {})},
        "log_format": "text",
    }
    if tls:
        data["tls"] = {
            "cert_file": str(tmp_path / "relay-cert.pem"),
            "key_file": str(tmp_path / "relay-key.pem"),
            "self_signed": True,
        }
    return data


@asynccontextmanager
async def start_relay(data: dict[str, Any]) -> AsyncIterator[RunningServer]:
    config: ServerConfig = parse_config(data)
    async with running(config, node="test-node") as server:
        yield server


def capture_audit(server: RunningServer) -> list[dict[str, Any]]:
    """Replace the relay's audit sink with a list the test can read."""
    records: list[dict[str, Any]] = []

    def sink(line: str) -> None:
        LOG_LINES.append(line)  # still scanned for secrets at the end of the session
        records.append(json.loads(line))

    server.relay.audit.sink = sink
    return records


# Everything logged (INFO and up, as in production) or audited during the test session.
LOG_LINES: list[str] = []
