"""SSRF-safe destinations, the pure half: canonical address forms, forbidden address classes,
and the decision on each address a name resolves to (``vet``). The dialer
(``tunnel_server.relay.dialer``) resolves a host once, asks ``vet`` which answers may be
dialed, and connects to exactly those numeric addresses, so that a DNS answer that changes
between the check and the connect (rebinding) cannot be dialed.

Canonical form (``canonical_ip``)
    * ``::ffff:a.b.c.d`` (IPv4-mapped) *is* the IPv4 address for a socket: it becomes IPv4.
    * The numeric spellings ``inet_aton``/``getaddrinfo`` accept but ``ipaddress`` rejects are
      parsed as ``inet_aton`` parses them: ``127.1``, ``2130706433``, ``0177.0.0.1``,
      ``0x7f000001``, ``0x7f.1``, ``127.0.0.01`` are all 127.0.0.1. A host that *looks* numeric
      (its last label is decimal or ``0x`` hex) but is not a valid ``inet_aton`` spelling
      (``08.0.0.1``, ``1.2.3.4.5``, ``127.0.0.1.``) is refused, never sent to DNS.
    * Zone ids (``fe80::1%eth0``, ``::1%1``) are **refused**: a zone picks an interface of the
      relay host, which no inventory entry can name, and a zone only matters for link-local
      addresses, which are forbidden anyway. Resolver answers that carry a scope id are refused
      the same way.
    * ``[::1]`` (URL brackets) is accepted as ``::1``.

Addresses that embed an IPv4 address are dialed as they are (IPv6) but **also** classified by
the embedded address: NAT64 (``64:ff9b::/96`` and any configured RFC 6052 prefix), 6to4
(``2002::/16``), Teredo (``2001::/32``, server and client), IPv4-compatible (``::a.b.c.d``) and
IPv4-translated (``::ffff:0:a.b.c.d``). ``64:ff9b::a9fe:a9fe`` is cloud metadata.

Forbidden classes (``FORBIDDEN``), checked on the canonical address, never with
``is_loopback``/``is_private`` (on Python 3.11 ``ip_address('::ffff:127.0.0.1').is_loopback`` is
False): cloud metadata, link-local, loopback, unspecified (``0.0.0.0/8``, ``::``), broadcast,
multicast, reserved (``240.0.0.0/4``). The metadata *names* (``metadata.google.internal``, ...)
are refused before any DNS query.

"Explicitly named": an address in a forbidden class is allowed only when one of the policy's
explicit networks contains it **and lies entirely inside that class's range**. An instance with
``address: 127.0.0.1`` names loopback for 127.0.0.1; a group CIDR ``127.0.0.0/8`` names all of
loopback; ``0.0.0.0/0`` names nothing; ``169.254.0.0/16`` names link-local but not the metadata
server (only ``169.254.169.254/32`` does). An address in two classes must be named for both.
Explicit networks are per destination (``DestinationPolicy.scoped``): naming loopback for one
instance must not open loopback through another resource.

The relay's own listeners (``own_endpoints``: relay, admin, metrics, Redis) are denied always;
no explicit network lifts that (a tunnel into the relay itself is never legitimate). A wildcard
endpoint (``0.0.0.0:P`` or ``[::]:P``) covers port P on every address of the relay host, which
is tested by binding a UDP socket to the address (local iff the bind succeeds; no packet sent).

Ports are ``int`` (not ``bool``) in 1..65535; ``parse_port`` parses text strictly.

Exceptions (each carries its close code as ``code``)::

    DestinationError
    ├── DestinationDenied      refused by policy, nothing dialed      -> close 4033 + audit
    └── DialFailed             allowed, but no connection             -> close 4003
        └── ResolutionFailed   the name has no usable DNS answer
    InvalidAddress (ValueError) not an IP address in a form we accept
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from tunnel_protocol import CloseCode

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- errors ----------------------------------------------------------------------------------


class DestinationError(Exception):
    """Base class; ``reason`` is safe to audit (no secrets, addresses in canonical form);
    ``code`` is the close code the relay answers with."""

    code: int = CloseCode.NOT_AUTHORIZED

    def __init__(self, reason: str, address: IPAddress | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.address = address  # the address the reason is about, when there is one


class DestinationDenied(DestinationError):
    """The policy refuses the destination; no connection was attempted. Close code 4033."""


class DialFailed(DestinationError):
    """The destination is allowed but no connection could be made. Close code 4003."""

    code = CloseCode.FAILED_TO_CONNECT_TO_BACKEND


class ResolutionFailed(DialFailed):
    """The name did not resolve (or resolved to nothing)."""


class InvalidAddress(ValueError):
    """Not an IP address in a form we accept (message says why)."""


# -- address classes -------------------------------------------------------------------------


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Ordered: the first matching class names the reason (metadata before link-local).
FORBIDDEN: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    (
        "cloud metadata",
        _nets(
            "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack, Oracle
            "169.254.170.2/32",  # AWS ECS task metadata
            "169.254.170.23/32",  # AWS EKS pod identity agent
            "100.100.100.200/32",  # Alibaba Cloud
            "168.63.129.16/32",  # Azure WireServer
            "fd00:ec2::254/128",  # AWS IMDS over IPv6
            "fd00:ec2::23/128",  # AWS EKS pod identity agent over IPv6
            "fd20:ce::254/128",  # GCP metadata over IPv6
        ),
    ),
    ("link-local", _nets("169.254.0.0/16", "fe80::/10")),
    ("loopback", _nets("127.0.0.0/8", "::1/128")),
    # Linux dials 0.0.0.0 as the local host; the rest of 0/8 is "this network".
    ("unspecified", _nets("0.0.0.0/8", "::/128")),
    ("broadcast", _nets("255.255.255.255/32")),
    ("multicast", _nets("224.0.0.0/4", "ff00::/8")),
    ("reserved", _nets("240.0.0.0/4")),
)

# Names refused before any DNS query unless a metadata address is explicitly named (the
# resolved address is then checked like any other).
METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 SIIT
_RFC6052_LENGTHS = frozenset({32, 40, 48, 56, 64, 96})


# -- parsing ---------------------------------------------------------------------------------

_DEC = re.compile(r"[0-9]+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]*")
_OCT = re.compile(r"0[0-7]+")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """Parse like glibc ``inet_aton`` (without its tolerance of trailing whitespace): 1 to 4
    parts, each decimal, octal (leading 0) or hex (0x); the last part fills the remaining bytes.
    None when ``inet_aton`` would refuse it."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if _HEX.fullmatch(part):
            if len(part) == 2:  # "0x" alone: glibc refuses it
                return None
            values.append(int(part[2:], 16))
        elif _OCT.fullmatch(part):
            values.append(int(part, 8))
        elif _DEC.fullmatch(part) and (part == "0" or not part.startswith("0")):
            values.append(int(part, 10))
        else:  # empty part, "08", sign, non-ASCII digit, ...
            return None
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for n, value in enumerate(head):
        number |= value << (8 * (3 - n))
    return ipaddress.IPv4Address(number)


def _looks_numeric(host: str) -> bool:
    """True when the last label is a number (WHATWG URL "ends in a number"): such a host is an
    IPv4 address or an error, never a DNS name (no TLD is numeric)."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    return bool(_DEC.fullmatch(last) or _HEX.fullmatch(last))


def canonical_ip(value: str | IPAddress) -> IPAddress:
    """The one address a socket would connect to for ``value``; raises InvalidAddress.

    IPv4-mapped IPv6 becomes IPv4; inet_aton spellings are parsed; zone ids are refused."""
    if isinstance(value, ipaddress.IPv6Address):
        if value.scope_id:
            raise InvalidAddress("zone ids are not accepted")
        mapped = value.ipv4_mapped
        return mapped if mapped is not None else value
    if isinstance(value, ipaddress.IPv4Address):
        return value
    text = value
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            raise InvalidAddress("brackets are only for IPv6 addresses")
    if ":" in text:
        if "%" in text:
            raise InvalidAddress("zone ids are not accepted")
        try:
            return canonical_ip(ipaddress.IPv6Address(text))
        except ipaddress.AddressValueError:
            raise InvalidAddress("malformed IPv6 address") from None
    address = _inet_aton(text)
    if address is None:
        raise InvalidAddress("not an IPv4 address" if _looks_numeric(text) else "not an address")
    return address


def request_ip(text: str) -> IPAddress | None:
    """An address as a request carries it (a socket peer, a forwarded-for hop, the address a
    tunnel dialed), for policy and audit: strict syntax only (``127.1`` or ``0x7f000001`` is
    not an address here, never guessed), IPv4-mapped IPv6 becomes IPv4, and a zone id is
    dropped (the interface a peer came in on does not change who it is). None when ``text`` is
    not an address. Unlike ``canonical_ip`` (what a socket would connect to), it never
    raises."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(str(address).partition("%")[0])
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def _parse_host(host: str) -> IPAddress | str:
    """An IP literal (canonical), or a lower-cased DNS name; DestinationDenied otherwise."""
    if not host or len(host) > 253:
        raise DestinationDenied("invalid host")
    if host.startswith("[") or ":" in host or "%" in host or _looks_numeric(host):
        try:
            return canonical_ip(host)
        except InvalidAddress as exc:
            raise DestinationDenied(f"invalid host: {exc}") from None
    name = host[:-1] if host.endswith(".") else host
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise DestinationDenied("invalid host name")
    return host.lower()


def valid_port(port: object) -> bool:
    """True for an ``int`` (not ``bool``) in 1..65535."""
    return type(port) is int and 1 <= port <= 65535


def parse_port(text: str) -> int:
    """Strict: decimal digits, no sign, no spaces, no leading zero, 1..65535."""
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port {text!r}")
    return int(text)


def embedded_ipv4(
    address: ipaddress.IPv6Address,
    nat64_prefixes: Iterable[ipaddress.IPv6Network] = (NAT64_WELL_KNOWN,),
) -> list[tuple[str, ipaddress.IPv4Address]]:
    """IPv4 addresses an IPv6 address carries, with the mechanism that would reach them."""
    found: list[tuple[str, ipaddress.IPv4Address]] = []
    packed = address.packed
    for prefix in nat64_prefixes:
        if address in prefix:
            # RFC 6052 2.2: the IPv4 octets follow the prefix, skipping octet 8 (the "u" octet).
            start = prefix.prefixlen // 8
            octets = [i for i in range(start, 16) if i != 8][:4]
            found.append(("NAT64", ipaddress.IPv4Address(bytes(packed[i] for i in octets))))
    if address.sixtofour is not None:
        found.append(("6to4", address.sixtofour))
    if address.teredo is not None:
        server, client = address.teredo
        found += [("Teredo", server), ("Teredo", client)]
    if address in _IPV4_TRANSLATED:
        found.append(("IPv4-translated", ipaddress.IPv4Address(packed[12:])))
    elif address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1, classified as such
        found.append(("IPv4-compatible", ipaddress.IPv4Address(packed[12:])))
    return found


def canonical_network(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 network it maps, so that
    it matches canonical addresses; other networks unchanged."""
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return ipaddress.IPv4Network(
            (int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96)
        )
    return network


def within(networks: Iterable[IPNetwork]) -> Callable[[IPAddress], bool]:
    """An ``allowed`` predicate: the canonical address lies in one of ``networks``."""
    nets = tuple(canonical_network(net) for net in networks)

    def allowed(address: IPAddress) -> bool:
        return any(address in net for net in nets)

    return allowed


def _subnet_of(inner: IPNetwork, outer: IPNetwork) -> bool:
    """``inner.subnet_of(outer)``, False across address families (instead of TypeError)."""
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _is_local(address: IPAddress) -> bool:
    """Is ``address`` one of this host's addresses? Binding succeeds only for local addresses
    (and the unspecified one); nothing is sent."""
    # With net.ipv*.ip_nonlocal_bind every bind succeeds: every address then counts as
    # local, which over-denies (fails closed).
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((str(address), 0))
        except OSError:
            return False
    return True


# -- policy ----------------------------------------------------------------------------------


class _OwnEndpoints:
    """Shared by a policy and its scoped copies, so listeners added at run time apply to all."""

    def __init__(self) -> None:
        self.exact: set[tuple[IPAddress, int]] = set()
        self.wildcard_ports: set[int] = set()

    def add(self, host: str | IPAddress, port: int) -> None:
        if not valid_port(port):
            raise ValueError(f"invalid port {port!r}")
        address = ipaddress.IPv4Address(0) if host in ("", "*") else canonical_ip(host)
        if address.is_unspecified:
            # A dual-stack [::] listener also takes IPv4: cover every family.
            self.wildcard_ports.add(port)
        else:
            self.exact.add((address, port))

    def __contains__(self, endpoint: tuple[IPAddress, int]) -> bool:
        address, port = endpoint
        if endpoint in self.exact:
            return True
        return port in self.wildcard_ports and _is_local(address)


class DestinationPolicy:
    """Which canonical addresses may be dialed; see the module docstring for the rules.

    ``explicit``: networks that name forbidden addresses (only the part of a network inside a
    forbidden class's range names that class). ``own_endpoints``: (address, port) of the relay's
    own listeners; ``0.0.0.0``/``::`` mean every local address. ``nat64_prefixes``: RFC 6052
    prefixes in use (lengths 32, 40, 48, 56, 64 or 96) whose embedded IPv4 is classified too.
    """

    def __init__(
        self,
        explicit: Iterable[IPNetwork] = (),
        own_endpoints: Iterable[tuple[str | IPAddress, int]] = (),
        *,
        nat64_prefixes: Iterable[ipaddress.IPv6Network] = (NAT64_WELL_KNOWN,),
    ) -> None:
        self.explicit: tuple[IPNetwork, ...] = tuple(canonical_network(n) for n in explicit)
        self.nat64_prefixes: tuple[ipaddress.IPv6Network, ...] = tuple(nat64_prefixes)
        for prefix in self.nat64_prefixes:
            if prefix.prefixlen not in _RFC6052_LENGTHS:
                raise ValueError(f"NAT64 prefix {prefix} must be /32, /40, /48, /56, /64 or /96")
        self._own = _OwnEndpoints()
        for host, port in own_endpoints:
            self._own.add(host, port)

    def scoped(self, explicit: Iterable[IPNetwork]) -> DestinationPolicy:
        """The same policy (sharing own endpoints) with the explicit networks of one
        destination: an instance's address, or a destination group's CIDRs."""
        copy = DestinationPolicy(explicit, nat64_prefixes=self.nat64_prefixes)
        copy._own = self._own
        return copy

    def add_own_endpoint(self, host: str | IPAddress, port: int) -> None:
        """Register a listener bound at run time (port 0 resolved); numeric hosts only."""
        self._own.add(host, port)

    def _named(self, address: IPAddress, forbidden: IPNetwork) -> bool:
        for net in self.explicit:
            if net.version != address.version or address not in net:
                continue
            if _subnet_of(net, forbidden):
                return True
        return False

    def _classify(self, address: IPAddress, port: int) -> str | None:
        if (address, port) in self._own:
            return "destination is the relay's own listener"
        for name, nets in FORBIDDEN:
            for net in nets:
                if net.version == address.version and address in net:
                    if not self._named(address, net):
                        return f"destination is {name}"
        return None

    def check(self, ip: str | IPAddress, port: int) -> str | None:
        """None if ``ip:port`` may be dialed, else the reason (names the class)."""
        if not valid_port(port):
            return "invalid port"
        try:
            address = canonical_ip(ip)
        except InvalidAddress as exc:
            return f"invalid address: {exc}"
        reason = self._classify(address, port)
        if reason is not None or not isinstance(address, ipaddress.IPv6Address):
            return reason
        for mechanism, inner in embedded_ipv4(address, self.nat64_prefixes):
            reason = self._classify(inner, port)
            if reason is not None:
                return f"{reason} (via {mechanism})"
        return None

    def check_name(self, host: str) -> str | None:
        """Refuse metadata names before any DNS query, unless metadata is explicitly named."""
        name = host.lower().rstrip(".")
        if name not in METADATA_NAMES:
            return None
        metadata = FORBIDDEN[0][1]
        for net in self.explicit:
            if any(_subnet_of(net, m) for m in metadata):
                return None
        return "destination is cloud metadata"


# -- vetting a resolution ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of one resolution: the vetted addresses, in dial order, and the answers
    that were skipped with their reasons (for the audit record). Only ``dial_resolution``
    should dial it; to narrow it further (e.g. by a policy condition on ``destination.ip``),
    ``dataclasses.replace`` it with a subset of ``addresses``."""

    host: str
    port: int
    addresses: tuple[IPAddress, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (answer, reason)


def parse_target(host: str, port: int, policy: DestinationPolicy) -> IPAddress | str:
    """The host to resolve (a lower-cased name) or the literal address; DestinationDenied for
    an invalid port or host, or a metadata name, before any DNS query."""
    if not valid_port(port):
        raise DestinationDenied("invalid port")
    target = _parse_host(host)
    if isinstance(target, str):
        reason = policy.check_name(target)
        if reason is not None:
            raise DestinationDenied(reason)
    return target


def vet(
    host: str,
    port: int,
    answers: Sequence[str | IPAddress],
    policy: DestinationPolicy,
    allowed: Callable[[IPAddress], bool],
) -> Resolution:
    """Keep, in order, the canonical ``answers`` that both ``policy`` and ``allowed`` accept.
    Forbidden answers are skipped, never fallen through to; DestinationDenied when none is left
    (the forbidden class is the more useful reason than "outside the allowed addresses")."""
    usable: list[IPAddress] = []
    skipped: list[tuple[str, str]] = []
    class_denial: DestinationDenied | None = None
    scope_denial: DestinationDenied | None = None
    for answer in answers:
        try:
            address = canonical_ip(answer)
        except InvalidAddress as exc:
            skipped.append((str(answer), f"invalid address: {exc}"))
            class_denial = class_denial or DestinationDenied(skipped[-1][1])
            continue
        reason = policy.check(address, port)
        if reason is not None:
            skipped.append((str(answer), reason))
            class_denial = class_denial or DestinationDenied(reason, address)
        elif not allowed(address):
            skipped.append((str(answer), "destination is outside the allowed addresses"))
            scope_denial = scope_denial or DestinationDenied(skipped[-1][1], address)
        elif address not in usable:
            usable.append(address)
    if not usable:
        denial = class_denial or scope_denial
        if denial is None:  # no answers at all: callers refuse an empty answer list first
            raise DestinationDenied("no address to dial")
        raise denial
    return Resolution(host, port, tuple(usable), tuple(skipped))
