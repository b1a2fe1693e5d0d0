"""Programs the tests run as separate processes (relays, clients): start one, wait for the line
that says it is ready, keep draining its output, and interrupt it on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .helpers import UNIT
from .reliability.common import rss_bytes


@dataclass
class Process:
    """A subprocess whose stderr (and stdout, merged when asked) is drained in the background,
    keeping the last lines for failure messages."""

    process: asyncio.subprocess.Process
    found: str
    tail: list[str]

    @property
    def rss(self) -> int:
        return rss_bytes(self.process.pid)


@contextlib.asynccontextmanager
async def started(
    argv: list[str], pattern: str, *, stdout: bool, env: dict[str, str] | None = None
) -> AsyncIterator[Process]:
    """Run ``argv`` until a line of its stdout (``stdout=True``) or stderr matches ``pattern``
    (group 1 is returned as ``found``), with ``env`` added to the environment (TUNNEL_*
    variables of the test run are not passed on); interrupt it on exit (SIGINT: the relay closes its
    tunnels at once instead of draining them for a grace period, as on SIGTERM)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env = {**base, **(env or {})}
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.STDOUT if stdout else asyncio.subprocess.PIPE,
        env=env,
    )
    stream = process.stdout if stdout else process.stderr
    assert stream is not None
    tail: list[str] = []

    async def drain() -> None:
        while raw := await stream.readline():
            tail.append(raw.decode(errors="replace"))
            del tail[:-200]

    try:
        async with asyncio.timeout(400 * UNIT):
            while True:
                raw = await stream.readline()
                if not raw:
                    raise AssertionError(f"{argv[2]} exited:\n" + "".join(tail))
                tail.append(raw.decode(errors="replace"))
                match = re.search(pattern, tail[-1])
                if match:
                    break
        drainer = asyncio.create_task(drain())
        try:
            yield Process(process, match.group(1), tail)
        finally:
            drainer.cancel()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 200 * UNIT)
            except TimeoutError:
                process.kill()
                await process.wait()


# Set in the environment of every client process the tests start, so that ``exited`` can ask a
# stuck one where it is: faulthandler dumps every thread's Python stack on SIGABRT.
FAULTHANDLER_ENV = {"PYTHONFAULTHANDLER": "1"}


async def exited(process: asyncio.subprocess.Process, limit: float) -> tuple[bytes, bytes]:
    """``process.communicate()`` within ``limit`` seconds; past it, abort the process (its
    faulthandler prints where each thread was) and fail with what it wrote to stderr, so that a
    hang says where it hung instead of only that it did."""
    try:
        return await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        if process.returncode is None:
            process.send_signal(signal.SIGABRT)
        out, err = await asyncio.wait_for(process.communicate(), 100 * UNIT)
        tail = err.decode(errors="replace")[-6000:]
        raise AssertionError(f"still running after {limit} s; its stderr:\n{tail}") from None
