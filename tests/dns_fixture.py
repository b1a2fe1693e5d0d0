"""A scripted DNS server on loopback (dnslib over UDP) and a resolver that asks only it.

``ScriptedDnsServer({"app.test": [["127.0.0.2"], ["127.0.0.1"]]})`` answers the first A query
for app.test with 127.0.0.2 and every later one with 127.0.0.1 (the last round repeats): a DNS
rebinding attacker with TTL 0. AAAA queries get the IPv6 addresses of the same round, counted
separately. Every query is recorded, so tests can assert how many resolutions happened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSRecord


class _ServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ScriptedDnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.server.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class ScriptedDnsServer:
    def __init__(self, script: Mapping[str, Sequence[Sequence[str]]]) -> None:
        self.script = {name.lower().rstrip("."): list(rounds) for name, rounds in script.items()}
        self.queries: list[tuple[str, str]] = []  # (name, "A" | "AAAA" | ...)
        self._counts: Counter[tuple[str, str]] = Counter()
        self._transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def __aenter__(self) -> ScriptedDnsServer:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _ServerProtocol(self), local_addr=("127.0.0.1", 0)
        )
        self._transport = transport
        host, port = transport.get_extra_info("sockname")[:2]
        self.address = (str(host), int(port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()

    def count(self, qtype: str = "A") -> int:
        return sum(1 for _, t in self.queries if t == qtype)

    def answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:  # dnslib raises several types on garbage: ignore the datagram
            return None
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.queries.append((name, qtype))
        rounds = self.script.get(name)
        if rounds is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return bytes(reply.pack())
        n = self._counts[(name, qtype)]
        self._counts[(name, qtype)] += 1
        for value in rounds[min(n, len(rounds) - 1)]:
            version = ipaddress.ip_address(value).version
            if qtype == "A" and version == 4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(value), ttl=0))
            elif qtype == "AAAA" and version == 6:
                reply.add_answer(
                    RR(
                        request.q.qname,
                        QTYPE.AAAA,
                        rdata=AAAA(ipaddress.IPv6Address(value).exploded),
                        ttl=0,
                    )
                )
        return bytes(reply.pack())


class _ClientProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.replies.put_nowait(data)


class DnsResolver:
    """A ``destinations.Resolver`` that queries one DNS server (A then AAAA answers)."""

    _ids = itertools.count(1)

    def __init__(self, server: tuple[str, int], timeout: float = 5.0) -> None:
        self.server = server
        self.timeout = timeout
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        a, aaaa = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"))
        return a + aaaa

    async def _query(self, host: str, qtype: str) -> list[str]:
        loop = asyncio.get_running_loop()
        query = DNSRecord.question(host, qtype)
        query.header.id = next(self._ids) & 0xFFFF
        transport, protocol = await loop.create_datagram_endpoint(
            _ClientProtocol, remote_addr=self.server
        )
        try:
            transport.sendto(bytes(query.pack()))
            async with asyncio.timeout(self.timeout):
                while True:
                    reply = DNSRecord.parse(await protocol.replies.get())
                    if reply.header.id == query.header.id:
                        break
        finally:
            transport.close()
        if reply.header.rcode != RCODE.NOERROR:
            raise OSError(f"DNS {RCODE[reply.header.rcode]} for {host}")
        wanted = QTYPE.A if qtype == "A" else QTYPE.AAAA
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == wanted]
