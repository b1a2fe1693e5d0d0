"""The control socket of a running ``tunnel-client up``: a Unix socket, mode 0600 inside a 0700
runtime directory (``$XDG_RUNTIME_DIR/identity-tunnel``, else ``run/`` under the client's home),
one per profile. A connecting client reads one JSON line (the forwards' live state) and the
connection closes; nothing is ever read from it, so it cannot be used to change anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from .credentials import state_dir

__all__ = ["format_row", "query", "runtime_dir", "serve", "socket_path"]

MAX_SNAPSHOT = 1024 * 1024


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("TUNNEL_CLIENT_HOME"):
        return Path(environ["TUNNEL_CLIENT_HOME"]) / "run"
    if environ.get("XDG_RUNTIME_DIR"):
        return Path(environ["XDG_RUNTIME_DIR"]) / "identity-tunnel"
    return state_dir(environ) / "run"


def socket_path(profile: str, environ: Mapping[str, str] = os.environ) -> Path:
    return runtime_dir(environ) / f"up-{profile}.sock"


class AlreadyRunning(Exception):
    pass


async def _alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@contextlib.asynccontextmanager
async def serve(profile: str, snapshot: Callable[[], dict[str, Any]]) -> AsyncIterator[Path | None]:
    """Serve ``snapshot()`` to each connection for the block's lifetime; yields the path (None
    where Unix sockets are missing). Raises AlreadyRunning if another ``up`` holds it."""
    if sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
        yield None
        return
    path = socket_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.exists() or path.is_symlink():
        if await _alive(path):
            raise AlreadyRunning(f"`tunnel-client up` is already running for profile {profile}")
        path.unlink()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(snapshot()).encode() + b"\n")
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        server = await asyncio.start_unix_server(answer, str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    try:
        yield path
    finally:
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def query(profile: str) -> dict[str, Any] | None:
    """The snapshot of the ``up`` running for ``profile``, or None when none runs."""
    path = socket_path(profile)
    if sys.platform == "win32" or not path.exists():
        return None
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_SNAPSHOT)
    except OSError:
        return None
    try:
        line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    data = json.loads(line)
    return data if isinstance(data, dict) else None


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_row(row: Mapping[str, Any]) -> str:
    """One forward, compactly: name, address, state, connections, bytes, last error."""
    state = row.get("state", "?")
    if row.get("resuming"):
        state += f", {row['resuming']} reconnecting"
    text = (
        f"{row.get('name')}: {row.get('listen') or '-'} -> {row.get('target')} [{state}] "
        f"{row.get('open', 0)} open, up {_bytes(int(row.get('up', 0)))}, "
        f"down {_bytes(int(row.get('down', 0)))}"
    )
    if row.get("error"):
        text += f"; last error: {row['error']}"
    return text
