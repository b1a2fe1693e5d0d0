"""The fault-injecting proxy itself (tests/faults.py), against loopback echo and sink targets:
each fault does what it says, and no buffer grows without bound."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import pytest

from ..faults import FaultProxy, Link
from ..helpers import UNIT, TcpTarget
from .common import eventually

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def echo_proxy(echo: TcpTarget) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo.port) as proxy:
        yield proxy


OPENED: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def close_connections() -> AsyncIterator[None]:
    yield
    for writer in OPENED:
        writer.close()
    OPENED.clear()


async def dial(proxy: FaultProxy) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    OPENED.append(writer)
    return reader, writer


async def roundtrip(conn: Conn, data: bytes) -> bytes:
    reader, writer = conn
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """Everything until EOF (raises what the connection raises, e.g. on an RST)."""
    data = bytearray()
    async with asyncio.timeout(40 * UNIT):
        while chunk := await reader.read(65536):
            data += chunk
    return bytes(data)


async def silent(reader: asyncio.StreamReader) -> bool:
    """True when nothing (no data, no EOF, no error) arrives for 4 UNIT."""
    try:
        async with asyncio.timeout(4 * UNIT):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


async def send_then_read(conn: Conn, data: bytes) -> bytes:
    reader, writer = conn
    async with asyncio.timeout(100 * UNIT):
        writer.write(data)
        await writer.drain()
        return await reader.read()


async def fill_until_stalled(writer: asyncio.StreamWriter, limit: int = 256 << 20) -> int:
    """Write 64 KiB pieces until a drain blocks for 4 UNIT (the path's windows are closed);
    returns the bytes accepted so far."""
    piece = b"x" * 65536
    sent = 0
    while sent < limit:
        writer.write(piece)
        sent += len(piece)
        try:
            async with asyncio.timeout(4 * UNIT):
                await writer.drain()
        except TimeoutError:
            return sent
    raise AssertionError(f"{limit} bytes accepted: the path never pushed back")


async def test_pass_through_echo_and_half_close(
    echo_proxy: FaultProxy, sink: TcpTarget, echo: TcpTarget
) -> None:
    conn = await dial(echo_proxy)
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert await roundtrip(conn, payload) == payload
    conn[1].write_eof()
    assert await conn[0].read() == b""  # the target saw our FIN and closed its side
    conn[1].close()
    assert echo_proxy.forwarded == {"up": len(payload), "down": len(payload)}
    assert echo_proxy.connections == 1
    assert echo_proxy.resets == 0
    # Half-close towards a sink: the answer still comes back after our EOF.
    async with FaultProxy(sink.port) as proxy:
        reader, writer = await dial(proxy)
        writer.write(payload)
        writer.write_eof()
        assert (await reader.read()).decode() == hashlib.sha256(payload).hexdigest()
        writer.close()


async def test_reset_sends_rst_both_ways(echo_proxy: FaultProxy, echo: TcpTarget) -> None:
    conn = await dial(echo_proxy)
    assert await roundtrip(conn, b"ping") == b"ping"
    assert echo_proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        await read_to_end(conn[0])
    conn[1].close()
    async with asyncio.timeout(40 * UNIT):
        await echo_proxy.wait_until(lambda: not echo_proxy.links)
    assert echo_proxy.resets == 1
    # The proxy keeps working for new connections.
    assert await roundtrip(await dial(echo_proxy), b"again") == b"again"


async def test_black_hole_stalls_and_restore_resets(
    echo_proxy: FaultProxy, echo: TcpTarget
) -> None:
    old = await dial(echo_proxy)
    assert await roundtrip(old, b"before") == b"before"
    link = echo_proxy.live[0]
    received = echo.received
    echo_proxy.black_hole()
    accepted = await fill_until_stalled(old[1])
    # The proxy stopped reading: the writer was pushed back by the kernel's buffers alone.
    assert accepted < 64 << 20
    assert link.pipes["up"].queued <= echo_proxy.chunk
    assert echo.received == received
    # A new connection is accepted but never reaches the target (a dropped SYN).
    connections = echo.connections
    new = await dial(echo_proxy)
    new[1].write(b"hello?")
    assert await silent(new[0])
    assert echo.connections == connections
    echo_proxy.restore()
    for reader, writer in (old, new):
        with pytest.raises(ConnectionResetError):
            await read_to_end(reader)
        writer.close()
    assert echo_proxy.resets == 2
    assert await roundtrip(await dial(echo_proxy), b"after") == b"after"


async def test_black_hole_refusing_new_then_restore_resumes(
    echo_proxy: FaultProxy, echo: TcpTarget
) -> None:
    conn = await dial(echo_proxy)
    assert await roundtrip(conn, b"a") == b"a"
    echo_proxy.black_hole(refuse_new=True)
    conn[1].write(b"during the outage")
    refused = await dial(echo_proxy)
    with pytest.raises(ConnectionResetError):
        await read_to_end(refused[0])
    refused[1].close()
    assert echo_proxy.refused == 1
    assert await silent(conn[0])
    echo_proxy.restore(stalled="resume")  # the route comes back: buffered bytes flow
    async with asyncio.timeout(40 * UNIT):
        assert await conn[0].readexactly(17) == b"during the outage"
    assert echo_proxy.resets == 0
    conn[1].close()


async def test_restore_can_keep_stalled_connections_dead(
    echo_proxy: FaultProxy, echo: TcpTarget
) -> None:
    old = await dial(echo_proxy)
    assert await roundtrip(old, b"a") == b"a"
    echo_proxy.black_hole()
    old[1].write(b"lost")
    during = await dial(echo_proxy)
    during[1].write(b"retransmitted")
    echo_proxy.restore(stalled="keep")  # a NAT that forgot the old flow: silence, no RST
    # Opened during the outage: goes through once the path is back (SYN retransmission).
    async with asyncio.timeout(40 * UNIT):
        assert await during[0].readexactly(13) == b"retransmitted"
    assert await roundtrip(await dial(echo_proxy), b"new") == b"new"
    assert await silent(old[0])
    assert echo_proxy.resets == 0
    assert echo_proxy.reset() == 3  # the dead one and the two live ones


async def test_per_link_black_hole(echo_proxy: FaultProxy) -> None:
    first, second = await dial(echo_proxy), await dial(echo_proxy)
    assert await roundtrip(first, b"1") == b"1"
    assert await roundtrip(second, b"2") == b"2"
    links = echo_proxy.live
    links[0].black_hole()
    first[1].write(b"stalled")
    assert await roundtrip(second, b"still fine") == b"still fine"
    assert await silent(first[0])
    links[0].restore()
    async with asyncio.timeout(40 * UNIT):
        assert await first[0].readexactly(7) == b"stalled"
    for _, writer in (first, second):
        writer.close()


async def test_slice_writes_at_most_n_bytes(sink: TcpTarget) -> None:
    payload = bytes(range(256)) * 40  # 10240 bytes
    seen: list[Link] = []
    async with FaultProxy(sink.port, on_connect=seen.append) as proxy:
        proxy.slice(100)
        reader, writer = await dial(proxy)
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(100 * UNIT):
            answer = await reader.read()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()
    assert seen[0].pipes["up"].writes == len(payload) // 100 + 1
    assert seen[0].pipes["down"].writes == 1  # 64 hex digits, one slice
    assert proxy.forwarded["up"] == len(payload)


async def test_slice_write_count(echo: TcpTarget) -> None:
    seen: list[Link] = []
    async with FaultProxy(echo.port, on_connect=seen.append) as proxy:
        proxy.slice(7)
        conn = await dial(proxy)
        assert await roundtrip(conn, b"x" * 70) == b"x" * 70
        assert seen[0].pipes["up"].writes == 10
        assert seen[0].pipes["down"].writes == 10
        proxy.slice(None)
        assert await roundtrip(conn, b"y" * 70) == b"y" * 70
        assert seen[0].pipes["up"].writes == 11
        conn[1].close()


async def test_latency_is_a_pipelined_delay_line(echo_proxy: FaultProxy) -> None:
    delay = 4 * UNIT
    echo_proxy.latency(delay)
    reader, writer = await dial(echo_proxy)
    start = time.monotonic()
    messages = [f"message {i:02d};".encode() for i in range(10)]
    arrivals: list[float] = []

    async def send() -> None:
        for message in messages:
            writer.write(message)
            await writer.drain()
            await asyncio.sleep(UNIT / 5)

    async with asyncio.timeout(200 * UNIT):
        sender = asyncio.create_task(send())
        got = b""
        for message in messages:
            got += await reader.readexactly(len(message))
            arrivals.append(time.monotonic() - start)
        await sender
    assert got == b"".join(messages)  # order preserved
    assert arrivals[0] >= 2 * delay * 0.9  # delayed each way
    # Pipelined: ten messages cost one delay each way (2 delays), not ten each way (20).
    assert arrivals[-1] < 6 * delay + 10 * UNIT / 5
    writer.close()


async def test_bandwidth_cap(sink: TcpTarget) -> None:
    rate = 2_000_000.0
    payload = bytes(range(256)) * 4096  # 1 MiB: about 0.5 s at 2 MB/s
    async with FaultProxy(sink.port) as proxy:
        proxy.bandwidth(rate)
        reader, writer = await dial(proxy)
        start = time.monotonic()
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(200 * UNIT):
            answer = await reader.read()
        elapsed = time.monotonic() - start
        writer.close()
    assert answer.decode() == hashlib.sha256(payload).hexdigest()
    expected = len(payload) / rate
    assert expected * 0.85 <= elapsed <= expected * 3 + 10 * UNIT, elapsed


async def test_drop_after_n_bytes_up(sink: TcpTarget) -> None:
    async with FaultProxy(sink.port) as proxy:
        proxy.drop_after(100_000, "up")
        reader, writer = await dial(proxy)
        with pytest.raises(ConnectionResetError):
            await send_then_read((reader, writer), b"z" * 300_000)
        writer.close()
        async with asyncio.timeout(40 * UNIT):
            await proxy.wait_until(lambda: not proxy.links)
        assert proxy.forwarded["up"] == 100_000
        assert proxy.resets == 1
        # The armed drop applies to every new connection, from its start, until cleared.
        proxy.pass_through()
        reader, writer = await dial(proxy)
        writer.write(b"fine")
        writer.write_eof()
        assert await reader.read() == hashlib.sha256(b"fine").hexdigest().encode()
        writer.close()
    await eventually(lambda: sink.received >= 100_004)
    assert sink.received == 100_004


async def test_drop_after_counts_from_the_call_on_live_connections(
    echo_proxy: FaultProxy,
) -> None:
    reader, writer = await dial(echo_proxy)
    assert await roundtrip((reader, writer), b"a" * 1000) == b"a" * 1000
    echo_proxy.drop_after(10, "down")
    writer.write(b"b" * 100)
    async with asyncio.timeout(40 * UNIT):
        assert await reader.readexactly(10) == b"b" * 10
        with pytest.raises(ConnectionResetError):
            await reader.read()
    writer.close()
    assert echo_proxy.live == []


async def test_refuse_new_connections(echo_proxy: FaultProxy, echo: TcpTarget) -> None:
    kept = await dial(echo_proxy)
    echo_proxy.refuse = True
    reader, writer = await dial(echo_proxy)  # the kernel accepts; the proxy resets at once
    with pytest.raises(ConnectionResetError):
        await read_to_end(reader)
    writer.close()
    assert echo_proxy.refused == 1
    assert echo.connections == 1
    assert await roundtrip(kept, b"existing ones still work") == b"existing ones still work"
    echo_proxy.refuse = False
    assert await roundtrip(await dial(echo_proxy), b"open again") == b"open again"


async def test_buffers_stay_bounded_when_the_target_does_not_read() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept and never read: its receive window closes

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        async with FaultProxy(port, max_buffer=128 * 1024) as proxy:
            reader, writer = await dial(proxy)
            accepted = await fill_until_stalled(writer)
            link = proxy.live[0]
            up = link.pipes["up"]
            assert up.queued <= proxy.max_buffer + proxy.chunk
            # Only kernel buffers plus the proxy's bounded queue are in flight.
            assert accepted < 64 << 20
            assert accepted >= up.forwarded
            writer.close()
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
