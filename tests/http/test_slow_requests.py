"""Slow requests on HTTP mode's listener (issue 17): headers that never finish (silent, or a
header line at a time), a body that trickles past the whole-request deadline, and the cap on
unauthenticated connections per source address (not for trusted proxies)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from ..helpers import UNIT
from ..oidc_fixture import TestIssuer
from .harness import APP_AUDIENCE, Stack, proxy_stack, web_policy

ALICE = "user:alice@example.com"


@asynccontextmanager
async def raw(stack: Stack) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


def request(stack: Stack, path: str = "/headers", headers: str = "", *, end: bool = True) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: {stack.host()}\r\n{headers}"
    return (head + ("\r\n" if end else "")).encode()


async def response(reader: asyncio.StreamReader) -> bytes:
    """One response's status line and headers (the body is left unread)."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 200 * UNIT)


@asynccontextmanager
async def stack_with(issuer: TestIssuer, **limits: Any) -> AsyncIterator[Stack]:
    policy = web_policy({"demo": [ALICE]})
    async with proxy_stack(issuer.issuer, policy, apps=("demo",), extra=limits) as stack:
        yield stack


async def drip(
    writer: asyncio.StreamWriter, pieces: list[bytes], answer: Awaitable[bytes]
) -> bytes:
    """Write a piece per time unit until ``answer`` (a read of the server's reply) is done or
    the server closed; then that reply."""
    task = asyncio.ensure_future(answer)
    for piece in pieces:
        if task.done():
            break
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.wait([task], timeout=UNIT)
    return await asyncio.wait_for(task, 200 * UNIT)


async def test_headers_must_finish_in_time(issuer: TestIssuer) -> None:
    timeout = 6 * UNIT
    async with stack_with(issuer, header_timeout=timeout) as stack:
        async with raw(stack) as (reader, _):  # silent
            began = time.monotonic()
            assert (await response(reader)).startswith(b"HTTP/1.1 408")
            assert await reader.read() == b""
            assert time.monotonic() - began >= timeout * 0.9
        async with raw(stack) as (reader, writer):  # slowloris: a header line at a time
            writer.write(request(stack, end=False))
            began = time.monotonic()
            lines = [f"X-Drip-{n}: 1\r\n".encode() for n in range(40)]
            assert (await drip(writer, lines, response(reader))).startswith(b"HTTP/1.1 408")
            assert time.monotonic() - began < 3 * timeout
        refusals = [json.loads(line) for line in stack.audit if '"status":408' in line]
        assert [r["reason"] for r in refusals] == ["request headers not complete in time"] * 2
        assert refusals[0]["source_ip"] == "127.0.0.1"
        # A keep-alive connection may idle longer than the header timeout between requests.
        token = issuer.mint(aud=APP_AUDIENCE)
        async with raw(stack) as (reader, writer):
            for _ in range(2):
                writer.write(request(stack, headers=f"Authorization: Bearer {token}\r\n"))
                head = await response(reader)
                assert head.startswith(b"HTTP/1.1 200"), head
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(2 * timeout)


async def test_body_must_finish_by_the_deadline(issuer: TestIssuer) -> None:
    deadline = 10 * UNIT
    async with stack_with(issuer, header_timeout=4 * UNIT, request_timeout=deadline) as stack:
        token = issuer.mint(aud=APP_AUDIENCE)
        async with raw(stack) as (reader, writer):
            writer.write(
                f"POST /upload HTTP/1.1\r\nHost: {stack.host()}\r\nContent-Length: 1000\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            began = time.monotonic()
            # 10 bytes per unit: 100 units for the whole body; cut, with no answer.
            assert await drip(writer, [b"x" * 10] * 100, reader.read()) == b""
            assert deadline * 0.9 <= time.monotonic() - began < 5 * deadline
        assert any('"reason":"request not complete by its deadline"' in a for a in stack.audit)
        # A body that arrives in time is served.
        async with raw(stack) as (reader, writer):
            writer.write(
                f"POST /upload HTTP/1.1\r\nHost: {stack.host()}\r\nContent-Length: 10\r\n"
                f"Authorization: Bearer {token}\r\n\r\n0123456789".encode()
            )
            assert (await response(reader)).startswith(b"HTTP/1.1 200")


async def test_unauthenticated_connections_capped_per_source(issuer: TestIssuer) -> None:
    cap = 3
    async with stack_with(issuer, max_unauthenticated_per_source=cap) as stack:
        async with AsyncExitStack() as held:
            conns = [await held.enter_async_context(raw(stack)) for _ in range(cap)]
            # Each is open (a request on it is answered): the cap is reached.
            reader, writer = conns[0]
            writer.write(request(stack))
            assert (await response(reader)).startswith(b"HTTP/1.1 401")
            async with raw(stack) as (reader, _):
                assert (await response(reader)).startswith(b"HTTP/1.1 429")
                assert await reader.read() != b"" or reader.at_eof()
            assert '"reason":"too many unauthenticated connections"' in stack.audit[-1]
            # An authenticated request frees its connection's place...
            token = issuer.mint(aud=APP_AUDIENCE)
            reader, writer = conns[1]
            writer.write(request(stack, headers=f"Authorization: Bearer {token}\r\n"))
            assert (await response(reader)).startswith(b"HTTP/1.1 200")
            async with raw(stack) as (reader, writer):
                writer.write(request(stack))
                assert (await response(reader)).startswith(b"HTTP/1.1 401")
            # ...and so does a closed connection.
            _, writer = conns[2]
            writer.close()
            await writer.wait_closed()
            await _until_accepted(stack)
    # Connections from a trusted proxy are not counted.
    async with stack_with(
        issuer, max_unauthenticated_per_source=1, trusted_proxies=["127.0.0.0/8"]
    ) as stack:
        async with raw(stack), raw(stack) as (reader, writer):
            writer.write(request(stack))
            assert (await response(reader)).startswith(b"HTTP/1.1 401")


async def _until_accepted(stack: Stack) -> None:
    """A new connection is served once the server has seen the close (bounded)."""
    for _ in range(100):
        async with raw(stack) as (reader, writer):
            writer.write(request(stack))
            head = await response(reader)
        if head.startswith(b"HTTP/1.1 401"):
            return
        assert head.startswith(b"HTTP/1.1 429")
        await asyncio.sleep(UNIT)
    raise AssertionError("the closed connection's place was never freed")


def test_guard_on_uvloop() -> None:
    """The server runs on uvloop (its transports are not asyncio classes): a request is served
    and a silent connection is still timed out there."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with TestIssuer() as issuer, stack_with(issuer, header_timeout=4 * UNIT) as stack:
            token = issuer.mint(aud=APP_AUDIENCE)
            async with raw(stack) as (reader, writer):
                writer.write(request(stack, headers=f"Authorization: Bearer {token}\r\n"))
                assert (await response(reader)).startswith(b"HTTP/1.1 200")
            async with raw(stack) as (reader, _):
                assert (await response(reader)).startswith(b"HTTP/1.1 408")

    uvloop.run(scenario())
