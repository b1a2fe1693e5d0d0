"""SSRF: every vector of the security guide's Destinations section, each asserting that the
forbidden target saw zero connections.

The forbidden target is a real TCP listener on 127.0.0.1 and ::1 (same port), and each vector
is aimed at that port through a scope that would let it through if the check were wrong
(``0.0.0.0/0`` and ``::/0`` do not name loopback). Every dial goes through a recording
connector that only ever really connects to loopback: "denied" means no attempt at all, and
``Listener.settled()`` proves the listener accepted nothing (a probe connection round-trips
after any earlier accept would have been counted, so no sleeping).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel_protocol.aio.stream import TcpStream
from tunnel_server.access.addresses import (
    DestinationDenied,
    DestinationPolicy,
    DialFailed,
    InvalidAddress,
    IPAddress,
    IPNetwork,
    Resolution,
    ResolutionFailed,
    canonical_ip,
    embedded_ipv4,
    parse_port,
    within,
)
from tunnel_server.relay.dialer import (
    dial_ip,
    dial_resolution,
    resolve_and_dial,
    resolve_destination,
    system_resolver,
)

from ..dns_fixture import DnsResolver, ScriptedDnsServer
from ..helpers import UNIT

EVERYWHERE: list[IPNetwork] = [
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
]
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
NOT_LOCAL = "198.51.100.7"  # TEST-NET-2: never one of our addresses, never really dialed


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


class Listener:
    """An echo service on one port of several addresses, counting accepted connections."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = list(hosts)
        self.port = 0
        self.accepts = 0
        self._probes = 0
        self._servers: list[asyncio.Server] = []

    async def start(self, port: int = 0) -> Listener:
        """Listen on ``port`` (0: one port free on every address)."""
        for _ in range(20):  # another process may hold the port on the second address
            try:
                first = await asyncio.start_server(self._handle, self.hosts[0], port)
                self._servers = [first]
                self.port = int(first.sockets[0].getsockname()[1])
                for host in self.hosts[1:]:
                    self._servers.append(await asyncio.start_server(self._handle, host, self.port))
                return self
            except OSError as exc:
                await self.stop()
                if exc.errno != errno.EADDRINUSE or port != 0:
                    raise
        raise RuntimeError("no port free on every address")

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        self._servers = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1  # first statement: counted in accept order
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def settled(self) -> int:
        """Accepts so far, excluding probes, once every earlier connection has been seen."""
        self._probes += 1
        reader, writer = await asyncio.open_connection(self.hosts[0], self.port)
        writer.write(b"probe")
        assert await reader.readexactly(5) == b"probe"
        writer.close()
        await writer.wait_closed()
        return self.accepts - self._probes


class Recorder:
    """A Connector that records every attempt and really connects only to loopback (and the
    unspecified address, which Linux dials as the local host)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[IPAddress, int]] = []

    async def __call__(self, address: IPAddress, port: int) -> TcpStream:
        self.attempts.append((address, port))
        # Judged on the unwrapped form: on 3.11 ::ffff:127.0.0.1 is not is_loopback.
        plain = getattr(address, "ipv4_mapped", None) or address
        if plain.is_loopback or plain.is_unspecified:
            return await dial_ip(address, port)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "test: only loopback is dialed")


class FakeResolver:
    """Fixed answers per name; counts calls."""

    def __init__(self, answers: dict[str, list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise OSError(f"test: no answer for {host}")
        return self.answers[host]


@pytest.fixture
async def target() -> AsyncIterator[Listener]:
    listener = await Listener(["127.0.0.1", "::1"] if HAS_IPV6 else ["127.0.0.1"]).start()
    yield listener
    await listener.stop()


async def _echo(stream: TcpStream) -> None:
    await stream.write(b"ping")
    assert await stream.read(4) == b"ping"
    stream.close()
    await stream.wait_closed()


async def _denied(
    host: str,
    port: int,
    *,
    policy: DestinationPolicy,
    allowed: Callable[[IPAddress], bool],
    recorder: Recorder,
    resolver: FakeResolver | None = None,
) -> DestinationDenied:
    with pytest.raises(DestinationDenied) as info:
        await resolve_and_dial(
            host,
            port,
            policy=policy,
            allowed=allowed,
            resolver=resolver or FakeResolver(),
            timeout=20 * UNIT,
            connect=recorder,
        )
    return info.value


# -- forbidden by default: one table, each row aimed at the counting listener -----------------

# (class, host, reason fragment)
VECTORS: list[tuple[str, str, str]] = [
    # loopback
    ("loopback", "127.0.0.1", "loopback"),
    ("loopback", "127.0.0.2", "loopback"),
    ("loopback", "127.255.255.254", "loopback"),
    ("loopback", "::1", "loopback"),
    ("loopback", "[::1]", "loopback"),
    ("loopback", "0:0:0:0:0:0:0:1", "loopback"),
    # numeric spellings getaddrinfo accepts and ipaddress does not
    ("non-canonical IPv4", "127.1", "loopback"),
    ("non-canonical IPv4", "2130706433", "loopback"),
    ("non-canonical IPv4", "0177.0.0.1", "loopback"),
    ("non-canonical IPv4", "0x7f000001", "loopback"),
    ("non-canonical IPv4", "0x7f.1", "loopback"),
    ("non-canonical IPv4", "127.0.0.01", "loopback"),
    ("non-canonical IPv4", "017700000001", "loopback"),
    ("non-canonical IPv4", "0X7F.0.0.1", "loopback"),
    ("non-canonical IPv4", "127.0.1", "loopback"),
    # numeric-looking but not inet_aton: refused, never sent to DNS
    ("malformed numeric", "08.0.0.1", "invalid host"),
    ("malformed numeric", "127.0.0.1.", "invalid host"),
    ("malformed numeric", "1.2.3.4.5", "invalid host"),
    ("malformed numeric", "256.0.0.1", "invalid host"),
    ("malformed numeric", "0x", "invalid host"),
    # IPv4-mapped
    ("IPv4-mapped", "::ffff:127.0.0.1", "loopback"),
    ("IPv4-mapped", "::ffff:7f00:1", "loopback"),
    ("IPv4-mapped", "[::ffff:127.0.0.1]", "loopback"),
    ("IPv4-mapped", "::FFFF:127.0.0.1", "loopback"),
    ("IPv4-mapped", "0:0:0:0:0:ffff:7f00:0001", "loopback"),
    # NAT64 (RFC 6052 well-known prefix)
    ("NAT64", "64:ff9b::7f00:1", "loopback (via NAT64)"),
    ("NAT64", "64:ff9b::127.0.0.1", "loopback (via NAT64)"),
    ("NAT64", "64:ff9b::a9fe:a9fe", "cloud metadata (via NAT64)"),
    ("NAT64", "64:ff9b::", "unspecified (via NAT64)"),
    # 6to4, Teredo, IPv4-compatible, IPv4-translated
    ("6to4", "2002:7f00:1::", "loopback (via 6to4)"),
    ("6to4", "2002:7f00:1::1", "loopback (via 6to4)"),
    ("6to4", "2002:a9fe:a9fe::1", "cloud metadata (via 6to4)"),
    ("Teredo", "2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (via Teredo)"),
    ("Teredo", "2001:0:7f00:1::1", "loopback (via Teredo)"),
    ("Teredo", "2001:0:4136:e378:8000:63bf:5601:5601", "cloud metadata (via Teredo)"),
    ("IPv4-compatible", "::127.0.0.1", "loopback (via IPv4-compatible)"),
    ("IPv4-compatible", "::7f00:2", "loopback (via IPv4-compatible)"),
    ("IPv4-compatible", "::169.254.169.254", "cloud metadata (via IPv4-compatible)"),
    ("IPv4-translated", "::ffff:0:127.0.0.1", "loopback (via IPv4-translated)"),
    ("IPv4-translated", "::ffff:0:7f00:1", "loopback (via IPv4-translated)"),
    ("IPv4-translated", "::ffff:0:a9fe:a9fe", "cloud metadata (via IPv4-translated)"),
    # zone ids: refused whatever the address
    ("zone id", "fe80::1%lo", "zone ids"),
    ("zone id", "::1%1", "zone ids"),
    ("zone id", "::1%lo", "zone ids"),
    ("zone id", "[fe80::1%eth0]", "zone ids"),
    # cloud metadata
    ("metadata", "169.254.169.254", "cloud metadata"),
    ("metadata", "0xa9fea9fe", "cloud metadata"),
    ("metadata", "169.254.43518", "cloud metadata"),
    ("metadata", "::ffff:169.254.169.254", "cloud metadata"),
    ("metadata", "fd00:ec2::254", "cloud metadata"),
    ("metadata", "fd20:ce::254", "cloud metadata"),
    ("metadata", "169.254.170.2", "cloud metadata"),
    ("metadata", "100.100.100.200", "cloud metadata"),
    ("metadata", "metadata.google.internal", "cloud metadata"),
    ("metadata", "Metadata.Google.Internal.", "cloud metadata"),
    ("metadata", "metadata", "cloud metadata"),
    ("metadata", "metadata.goog", "cloud metadata"),
    ("metadata", "instance-data", "cloud metadata"),
    # link-local
    ("link-local", "169.254.1.1", "link-local"),
    ("link-local", "169.254.0.1", "link-local"),
    ("link-local", "fe80::1", "link-local"),
    ("link-local", "[fe80::abcd:1]", "link-local"),
    ("link-local", "::ffff:169.254.10.10", "link-local"),
    # unspecified: Linux would dial 0.0.0.0 and :: as the local host (our listener)
    ("unspecified", "0.0.0.0", "unspecified"),
    ("unspecified", "0", "unspecified"),
    ("unspecified", "0x0", "unspecified"),
    ("unspecified", "::", "unspecified"),
    ("unspecified", "[::]", "unspecified"),
    ("unspecified", "::ffff:0.0.0.0", "unspecified"),
    ("unspecified", "0.1.2.3", "unspecified"),
    # multicast and broadcast
    ("multicast", "224.0.0.1", "multicast"),
    ("multicast", "239.255.255.250", "multicast"),
    ("multicast", "ff02::1", "multicast"),
    ("broadcast", "255.255.255.255", "broadcast"),
    ("broadcast", "0xffffffff", "broadcast"),
    ("broadcast", "4294967295", "broadcast"),
]


@pytest.mark.parametrize(
    ("kind", "host", "reason"), VECTORS, ids=[f"{k}:{h}" for k, h, _ in VECTORS]
)
async def test_forbidden_by_default(target: Listener, kind: str, host: str, reason: str) -> None:
    recorder = Recorder()
    # Metadata names must be refused before any DNS query; if a lookup happened it would
    # answer loopback, so that a wrong decision would reach the listener.
    resolver = FakeResolver({host.lower(): ["127.0.0.1"]})
    denied = await _denied(
        host,
        target.port,
        policy=DestinationPolicy().scoped(EVERYWHERE),
        allowed=within(EVERYWHERE),
        recorder=recorder,
        resolver=resolver,
    )
    assert reason in denied.reason
    assert recorder.attempts == []
    assert resolver.calls == []
    assert await target.settled() == 0


def test_each_class_has_three_vectors() -> None:
    counts: dict[str, int] = {}
    for kind, _, _ in VECTORS:
        counts[kind] = counts.get(kind, 0) + 1
    assert all(n >= 3 for n in counts.values()), counts


# -- answers from a resolver -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["127.0.0.1"], "loopback"),
        (["::1", "127.0.0.1", "::ffff:127.0.0.1"], "loopback"),
        (["::ffff:169.254.169.254"], "cloud metadata"),
        (["fe80::1%2"], "zone ids"),
        (["64:ff9b::7f00:1"], "loopback (via NAT64)"),
        (["not-an-address"], "invalid address"),
    ],
)
async def test_resolved_answers_are_checked(
    target: Listener, answers: list[str], reason: str
) -> None:
    recorder = Recorder()
    resolver = FakeResolver({"app.test": answers})
    denied = await _denied(
        "app.test",
        target.port,
        policy=DestinationPolicy().scoped(EVERYWHERE),
        allowed=within(EVERYWHERE),
        recorder=recorder,
        resolver=resolver,
    )
    assert reason in denied.reason
    assert resolver.calls == ["app.test"]
    assert recorder.attempts == []
    assert await target.settled() == 0


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1", NOT_LOCAL],
        ["169.254.169.254", NOT_LOCAL, "::1"],
        ["::ffff:127.0.0.1", "0.0.0.0", NOT_LOCAL],
    ],
)
async def test_several_answers_never_fall_through_to_a_forbidden_one(
    target: Listener, answers: list[str]
) -> None:
    """Forbidden answers are skipped; when the allowed one fails to connect, the dial fails
    rather than trying the forbidden ones."""
    recorder = Recorder()
    with pytest.raises(DialFailed):
        await resolve_and_dial(
            "app.test",
            target.port,
            policy=DestinationPolicy().scoped(EVERYWHERE),
            allowed=within(EVERYWHERE),
            resolver=FakeResolver({"app.test": answers}),
            timeout=20 * UNIT,
            connect=recorder,
        )
    assert recorder.attempts == [(ipaddress.ip_address(NOT_LOCAL), target.port)]
    assert await target.settled() == 0


async def test_answers_outside_the_scope_are_skipped(target: Listener) -> None:
    scope = [ipaddress.ip_network("10.0.0.0/8")]
    recorder = Recorder()
    with pytest.raises(DialFailed):
        await resolve_and_dial(
            "db.test",
            target.port,
            policy=DestinationPolicy().scoped(scope),
            allowed=within(scope),
            resolver=FakeResolver({"db.test": [NOT_LOCAL, "127.0.0.1", "10.1.2.3"]}),
            timeout=20 * UNIT,
            connect=recorder,
        )
    assert recorder.attempts == [(ipaddress.ip_address("10.1.2.3"), target.port)]
    denied = await _denied(
        "db.test",
        target.port,
        policy=DestinationPolicy().scoped(scope),
        allowed=within(scope),
        recorder=recorder,
        resolver=FakeResolver({"db.test": [NOT_LOCAL]}),
    )
    assert denied.reason == "destination is outside the allowed addresses"
    assert str(denied.address) == NOT_LOCAL
    assert await target.settled() == 0


async def test_two_steps_for_decisions_on_the_address(target: Listener) -> None:
    """Resolve, decide on an address (e.g. a condition on destination.ip), dial only that."""
    resolver = FakeResolver({"app.test": ["169.254.169.254", "127.0.0.2", "127.0.0.1", "10.9.9.9"]})
    resolution = await resolve_destination(
        "app.test",
        target.port,
        policy=DestinationPolicy().scoped([LOOPBACK_V4]),
        allowed=within([LOOPBACK_V4]),
        resolver=resolver,
        timeout=20 * UNIT,
    )
    assert resolution == Resolution(
        "app.test",
        target.port,
        (ipaddress.IPv4Address("127.0.0.2"), ipaddress.IPv4Address("127.0.0.1")),
        (
            ("169.254.169.254", "destination is cloud metadata"),
            ("10.9.9.9", "destination is outside the allowed addresses"),
        ),
    )
    chosen = dataclasses.replace(resolution, addresses=resolution.addresses[1:])
    recorder = Recorder()
    stream, address = await dial_resolution(chosen, timeout=20 * UNIT, connect=recorder)
    await _echo(stream)
    assert recorder.attempts == [(ipaddress.IPv4Address("127.0.0.1"), target.port)]
    assert resolver.calls == ["app.test"]
    assert await target.settled() == 1
    with pytest.raises(DestinationDenied, match="no address left"):
        await dial_resolution(dataclasses.replace(resolution, addresses=()), timeout=UNIT)


# -- explicitly named ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "::ffff:127.0.0.1"])
async def test_a_group_cidr_inside_loopback_names_it(target: Listener, host: str) -> None:
    scope = [LOOPBACK_V4]
    recorder = Recorder()
    stream, address = await resolve_and_dial(
        host,
        target.port,
        policy=DestinationPolicy().scoped(scope),
        allowed=within(scope),
        timeout=20 * UNIT,
        connect=recorder,
    )
    await _echo(stream)
    assert address == ipaddress.IPv4Address("127.0.0.1")
    assert recorder.attempts == [(address, target.port)]  # decided on == dialed
    assert await target.settled() == 1


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
async def test_ipv6_loopback_named_by_its_own_network(target: Listener) -> None:
    scope = [ipaddress.ip_network("::1/128")]
    stream, address = await resolve_and_dial(
        "[::1]",
        target.port,
        policy=DestinationPolicy().scoped(scope),
        allowed=within(scope),
        timeout=20 * UNIT,
    )
    await _echo(stream)
    assert address == ipaddress.IPv6Address("::1")
    assert await target.settled() == 1


async def test_an_instance_address_names_only_itself(target: Listener) -> None:
    """``address: 127.0.0.1`` on an instance: that address is dialed, 127.0.0.2 is not."""
    instance = canonical_ip("127.0.0.1")
    policy = DestinationPolicy().scoped([ipaddress.ip_network(instance)])
    stream, address = await resolve_and_dial(
        "127.0.0.1",
        target.port,
        policy=policy,
        allowed=lambda ip: ip == instance,
        timeout=20 * UNIT,
    )
    await _echo(stream)
    recorder = Recorder()
    denied = await _denied(
        "127.0.0.2", target.port, policy=policy, allowed=within(EVERYWHERE), recorder=recorder
    )
    assert denied.reason == "destination is loopback"
    assert recorder.attempts == []
    assert await target.settled() == 1


async def test_naming_is_per_destination(target: Listener) -> None:
    """Loopback named by one instance does not open it through a 0.0.0.0/0 group."""
    base = DestinationPolicy()
    assert base.scoped([ipaddress.ip_network("127.0.0.1/32")]).check("127.0.0.1", 22) is None
    recorder = Recorder()
    await _denied(
        "127.0.0.1",
        target.port,
        policy=base.scoped(EVERYWHERE),
        allowed=within(EVERYWHERE),
        recorder=recorder,
    )
    assert recorder.attempts == []
    assert await target.settled() == 0


@pytest.mark.parametrize(
    ("explicit", "host", "reason"),
    [
        ("0.0.0.0/0", "127.0.0.1", "destination is loopback"),
        ("169.254.0.0/16", "169.254.169.254", "destination is cloud metadata"),
        ("169.254.0.0/16", "metadata.google.internal", "destination is cloud metadata"),
        ("fe80::/10", "fd00:ec2::254", "destination is cloud metadata"),
        ("127.0.0.0/9", "127.200.0.1", "destination is loopback"),
        ("::/0", "::1", "destination is loopback"),
    ],
)
def test_a_wider_network_names_nothing(explicit: str, host: str, reason: str) -> None:
    policy = DestinationPolicy().scoped([ipaddress.ip_network(explicit)])
    if host.startswith("metadata"):
        assert policy.check_name(host) == reason
    else:
        assert policy.check(host, 80) == reason


async def test_metadata_only_when_named_exactly() -> None:
    scope = [ipaddress.ip_network("169.254.169.254/32")]
    recorder = Recorder()
    resolver = FakeResolver({"metadata.google.internal": ["169.254.169.254"]})
    with pytest.raises(DialFailed):  # the recorder refuses to really dial it
        await resolve_and_dial(
            "metadata.google.internal",
            80,
            policy=DestinationPolicy().scoped(scope),
            allowed=within(EVERYWHERE),
            resolver=resolver,
            timeout=20 * UNIT,
            connect=recorder,
        )
    assert recorder.attempts == [(ipaddress.ip_address("169.254.169.254"), 80)]


def test_ipv4_mapped_networks_match_canonical_addresses() -> None:
    mapped = [ipaddress.ip_network("::ffff:127.0.0.0/104")]
    assert DestinationPolicy().scoped(mapped).check("127.0.0.1", 22) is None
    assert within(mapped)(ipaddress.IPv4Address("127.0.0.1"))
    assert not within(mapped)(ipaddress.IPv4Address("10.0.0.1"))


def test_embedded_addresses_follow_the_naming_of_the_ipv4_address() -> None:
    named = DestinationPolicy().scoped([LOOPBACK_V4, *EVERYWHERE])
    assert named.check("64:ff9b::7f00:1", 22) is None
    assert named.check("64:ff9b::a9fe:a9fe", 80) == "destination is cloud metadata (via NAT64)"


def test_configured_nat64_prefix() -> None:
    policy = DestinationPolicy(nat64_prefixes=[ipaddress.IPv6Network("2001:db8:64::/64")])
    # RFC 6052 /64: the IPv4 octets skip octet 8 (the "u" octet).
    assert policy.check("2001:db8:64:0:7f:0:100:0", 22) == "destination is loopback (via NAT64)"
    address = ipaddress.IPv6Address("2001:db8:64:0:7f:0:100:0")
    assert embedded_ipv4(address, [ipaddress.IPv6Network("2001:db8:64::/64")]) == [
        ("NAT64", ipaddress.IPv4Address("127.0.0.1"))
    ]
    with pytest.raises(ValueError, match="NAT64 prefix"):
        DestinationPolicy(nat64_prefixes=[ipaddress.IPv6Network("2001:db8::/80")])


# -- the relay's own listeners -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "::ffff:127.0.0.1", "0x7f000001"])
async def test_own_listener_is_denied_even_when_loopback_is_named(
    target: Listener, host: str
) -> None:
    policy = DestinationPolicy(own_endpoints=[("127.0.0.1", target.port)])
    recorder = Recorder()
    denied = await _denied(
        host,
        target.port,
        policy=policy.scoped([LOOPBACK_V4]),
        allowed=within([LOOPBACK_V4]),
        recorder=recorder,
    )
    assert denied.reason == "destination is the relay's own listener"
    assert recorder.attempts == []
    assert await target.settled() == 0


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.3", "::1", "::ffff:127.0.0.9"])
async def test_wildcard_listener_covers_every_local_address(
    target: Listener, wildcard: str, host: str
) -> None:
    policy = DestinationPolicy(own_endpoints=[(wildcard, target.port)])
    scope = [LOOPBACK_V4, ipaddress.ip_network("::1/128")]
    recorder = Recorder()
    denied = await _denied(
        host, target.port, policy=policy.scoped(scope), allowed=within(scope), recorder=recorder
    )
    assert denied.reason == "destination is the relay's own listener"
    assert recorder.attempts == []
    assert await target.settled() == 0
    # The same port on a host that is not this one is somebody else's service.
    assert policy.scoped(EVERYWHERE).check(NOT_LOCAL, target.port) is None


async def test_listeners_added_at_run_time_apply_to_scoped_policies(target: Listener) -> None:
    base = DestinationPolicy()
    scoped = base.scoped([LOOPBACK_V4])
    assert scoped.check("127.0.0.1", target.port) is None
    redis, metrics = target.port, 9 if target.port != 9 else 10
    base.add_own_endpoint("127.0.0.1", redis)
    base.add_own_endpoint("::1", metrics)
    own = "destination is the relay's own listener"
    assert scoped.check("127.0.0.1", redis) == own
    assert scoped.scoped([ipaddress.ip_network("::1/128")]).check("::1", metrics) == own
    recorder = Recorder()
    await _denied(
        "127.0.0.1",
        redis,
        policy=scoped,
        allowed=within([LOOPBACK_V4]),
        recorder=recorder,
    )
    assert recorder.attempts == []
    assert await target.settled() == 0


# -- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, -1, 65536, True, 22.0, "22"])
async def test_invalid_ports_dial_nothing(target: Listener, port: object) -> None:
    recorder = Recorder()
    resolver = FakeResolver({"app.test": ["127.0.0.1"]})
    denied = await _denied(
        "app.test",
        port,  # type: ignore[arg-type]  # what a careless caller might pass
        policy=DestinationPolicy().scoped([LOOPBACK_V4]),
        allowed=within([LOOPBACK_V4]),
        recorder=recorder,
        resolver=resolver,
    )
    assert denied.reason == "invalid port"
    assert resolver.calls == []
    assert recorder.attempts == []
    assert DestinationPolicy().check(NOT_LOCAL, port) == "invalid port"  # type: ignore[arg-type]
    assert await target.settled() == 0


@pytest.mark.parametrize(
    "text", ["0", "65536", "+22", " 22", "22 ", "022", "22\n", "0x16", "２２", "-1", "", "1e3"]
)
def test_parse_port_is_strict(text: str) -> None:
    with pytest.raises(ValueError, match="invalid port"):
        parse_port(text)


def test_parse_port_accepts_plain_decimal() -> None:
    assert [parse_port(t) for t in ("1", "22", "65535")] == [1, 22, 65535]


# -- DNS rebinding with a scripted DNS server on loopback ----------------------------------------


@pytest.fixture
async def rebinding_targets() -> AsyncIterator[tuple[Listener, Listener]]:
    """An allowed service on 127.0.0.2 and a forbidden one on 127.0.0.1, same port."""
    allowed = await Listener(["127.0.0.2"]).start()
    forbidden: Listener | None = None
    for _ in range(20):
        try:
            forbidden = await Listener(["127.0.0.1"]).start(allowed.port)
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            await allowed.stop()
            allowed = await Listener(["127.0.0.2"]).start()
    assert forbidden is not None
    yield allowed, forbidden
    await forbidden.stop()
    await allowed.stop()


# The group names 127.0.0.2 only (a /32 inside loopback) and lists the FQDN app.test.
REBIND_SCOPE = [ipaddress.ip_network("127.0.0.2/32")]


async def test_dns_rebinding_uses_the_single_resolution(
    rebinding_targets: tuple[Listener, Listener],
) -> None:
    allowed, forbidden = rebinding_targets
    script = {"app.test": [["127.0.0.2"], ["127.0.0.1"]]}
    async with ScriptedDnsServer(script) as dns:
        resolver = DnsResolver(dns.address)
        recorder = Recorder()
        stream, address = await resolve_and_dial(
            "app.test",
            allowed.port,
            policy=DestinationPolicy().scoped(REBIND_SCOPE),
            allowed=lambda ip: True,  # matched by FQDN: any address outside forbidden classes
            resolver=resolver,
            timeout=20 * UNIT,
            connect=recorder,
        )
        await _echo(stream)
        # One resolution (one A and one AAAA query); decided on and dialed the same address.
        assert (resolver.calls, dns.count("A"), dns.count("AAAA")) == (1, 1, 1)
        assert address == ipaddress.IPv4Address("127.0.0.2")
        assert recorder.attempts == [(address, allowed.port)]
        assert await allowed.settled() == 1
        assert await forbidden.settled() == 0
        # The server has rebound: a second lookup (which a check-then-connect dialer would do
        # when connecting by name) now answers the forbidden address...
        assert await resolver("app.test", allowed.port) == ["127.0.0.1"]
        # ...and a new tunnel to the same name is refused on that answer.
        with pytest.raises(DestinationDenied, match="destination is loopback"):
            await resolve_and_dial(
                "app.test",
                allowed.port,
                policy=DestinationPolicy().scoped(REBIND_SCOPE),
                allowed=lambda ip: True,
                resolver=resolver,
                timeout=20 * UNIT,
                connect=recorder,
            )
        assert len(recorder.attempts) == 1
        assert await forbidden.settled() == 0


@pytest.mark.parametrize(
    "answers",
    [
        ["127.0.0.1", "127.0.0.2"],  # forbidden first, in the same answer
        ["127.0.0.2", "127.0.0.1"],
        ["127.0.0.1", "::1", "127.0.0.2", "::ffff:127.0.0.1"],
    ],
)
async def test_dns_answering_both_at_once_dials_only_the_allowed_address(
    rebinding_targets: tuple[Listener, Listener], answers: list[str]
) -> None:
    allowed, forbidden = rebinding_targets
    async with ScriptedDnsServer({"app.test": [answers]}) as dns:
        recorder = Recorder()
        stream, address = await resolve_and_dial(
            "app.test",
            allowed.port,
            policy=DestinationPolicy().scoped(REBIND_SCOPE),
            allowed=lambda ip: True,
            resolver=DnsResolver(dns.address),
            timeout=20 * UNIT,
            connect=recorder,
        )
        await _echo(stream)
        assert address == ipaddress.IPv4Address("127.0.0.2")
        assert recorder.attempts == [(address, allowed.port)]
        assert dns.count("A") == 1
    assert await allowed.settled() == 1
    assert await forbidden.settled() == 0


async def test_dns_answering_only_forbidden_addresses_is_denied(
    rebinding_targets: tuple[Listener, Listener],
) -> None:
    allowed, forbidden = rebinding_targets
    script = {"app.test": [["127.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.3"]]}
    async with ScriptedDnsServer(script) as dns:
        recorder = Recorder()
        with pytest.raises(DestinationDenied, match="destination is loopback"):
            await resolve_and_dial(
                "app.test",
                forbidden.port,
                policy=DestinationPolicy().scoped(REBIND_SCOPE),
                allowed=lambda ip: True,
                resolver=DnsResolver(dns.address),
                timeout=20 * UNIT,
                connect=recorder,
            )
        assert dns.count("A") == 1
    assert recorder.attempts == []
    assert await forbidden.settled() == 0
    assert await allowed.settled() == 0


async def test_nxdomain_is_a_resolution_failure() -> None:
    async with ScriptedDnsServer({}) as dns:
        recorder = Recorder()
        with pytest.raises(ResolutionFailed):
            await resolve_and_dial(
                "missing.test",
                22,
                policy=DestinationPolicy(),
                allowed=lambda ip: True,
                resolver=DnsResolver(dns.address),
                timeout=20 * UNIT,
                connect=recorder,
            )
    assert recorder.attempts == []


# -- timeouts, the system resolver, canonical forms -----------------------------------------------


async def test_timeouts_are_typed() -> None:
    never = asyncio.Event()

    async def hanging_resolver(host: str, port: int) -> list[str]:
        await never.wait()
        return []

    async def hanging_connect(address: IPAddress, port: int) -> TcpStream:
        await never.wait()
        raise AssertionError("unreachable")

    policy = DestinationPolicy()
    with pytest.raises(ResolutionFailed, match="resolution timeout"):
        await resolve_destination(
            "app.test", 22, policy=policy, allowed=within(EVERYWHERE),
            resolver=hanging_resolver, timeout=UNIT,
        )  # fmt: skip
    with pytest.raises(DialFailed, match="dial timeout"):
        await dial_resolution(
            Resolution("x", 22, (ipaddress.IPv4Address(NOT_LOCAL),)),
            timeout=UNIT, connect=hanging_connect,
        )  # fmt: skip
    with pytest.raises(ResolutionFailed, match="resolution timeout"):
        await resolve_and_dial(
            "app.test", 22, policy=policy, allowed=within(EVERYWHERE),
            resolver=hanging_resolver, timeout=UNIT,
        )  # fmt: skip
    with pytest.raises(DialFailed, match="dial timeout") as info:
        await resolve_and_dial(
            NOT_LOCAL, 22, policy=policy, allowed=within(EVERYWHERE),
            timeout=UNIT, connect=hanging_connect,
        )  # fmt: skip
    assert not isinstance(info.value, ResolutionFailed)


async def test_system_resolver_keeps_zone_ids_so_they_are_refused() -> None:
    assert await system_resolver("127.0.0.1", 22) == ["127.0.0.1"]
    answers = await system_resolver("fe80::1%lo", 22)
    assert answers
    assert all("%" in a for a in answers)
    with pytest.raises(InvalidAddress, match="zone ids"):
        canonical_ip(answers[0])


async def test_default_dialer_connects_to_the_literal(target: Listener) -> None:
    stream, address = await resolve_and_dial(
        "0x7f.1",
        target.port,
        policy=DestinationPolicy().scoped([LOOPBACK_V4]),
        allowed=within([LOOPBACK_V4]),
        timeout=20 * UNIT,
    )
    await _echo(stream)
    assert address == ipaddress.IPv4Address("127.0.0.1")
    assert await target.settled() == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.0.0.01", "127.0.0.1"),
        ("10.1.258", "10.1.1.2"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("64:ff9b::10.0.0.1", "64:ff9b::a00:1"),  # NAT64 stays IPv6: it is dialed as such
    ],
)
def test_canonical_ip(value: str, expected: str) -> None:
    assert canonical_ip(value) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "value", ["fe80::1%eth0", "08.0.0.1", "1.2.3.4.5", "[127.0.0.1]", "::ffff:1.2.3", "a.b", ""]
)
def test_canonical_ip_refuses(value: str) -> None:
    with pytest.raises(InvalidAddress):
        canonical_ip(value)


def _numeric_getaddrinfo(text: str) -> ipaddress.IPv4Address | None:
    try:
        infos = socket.getaddrinfo(
            text, None, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
    except (OSError, UnicodeError):
        return None
    return ipaddress.IPv4Address(infos[0][4][0])


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.", max_size=24))
def test_canonical_ip_parses_what_getaddrinfo_parses(text: str) -> None:
    """No numeric spelling the OS would dial escapes our parser, or is read differently."""
    try:
        ours: IPAddress | None = canonical_ip(text)
    except InvalidAddress:
        ours = None
    assert ours == _numeric_getaddrinfo(text)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=4))
def test_every_spelling_of_an_ipv4_address_is_classified_alike(
    address: ipaddress.IPv4Address,
) -> None:
    policy = DestinationPolicy()
    reason = policy.check(str(address), 80)
    for spelling in (
        str(int(address)),
        hex(int(address)),
        f"::ffff:{address}",
        str(ipaddress.IPv6Address(int(address) | 0xFFFF << 32)),
    ):
        assert policy.check(spelling, 80) == reason
    if reason is not None:
        nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
        assert policy.check(nat64, 80) == f"{reason} (via NAT64)"
