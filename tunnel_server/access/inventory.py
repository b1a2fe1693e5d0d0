"""The inventory: instances and destination groups as configured (``inventory:`` in the
relay's YAML), and the lookup from a connect request (instance, or host in a destination group)
to the address to dial; unknown instances and hosts outside every group are lookup failures
(4047)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tunnel_protocol import CloseCode
from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

from ..schema import Name, StrictModel
from .addresses import InvalidAddress, IPAddress, IPNetwork, canonical_ip, within


class ProxyProtocolConfig(StrictModel):
    """The relay writes a PROXY v2 header, with the tunnel id and a signed identity, to this
    destination before the first byte of a tunnel (docs/upstream-identity.md). ``ports``: only
    these (empty: every port); ``audience``: the assertion's ``aud`` (default: the policy
    resource, ``instance:P/Z/N`` or ``group:P/R/N/G``); ``identity: false``: addresses and the
    tunnel id only, for readers that take small headers (nginx 1.22 reads at most 107 bytes)."""

    version: Literal["v2"] = "v2"
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list)
    audience: str | None = Field(default=None, min_length=1, max_length=256)
    identity: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"version": data} if isinstance(data, str) else data


class InstanceConfig(StrictModel):
    """An instance of the inventory: ``interfaces`` maps nic0.. to a private address."""

    project: Name
    zone: Name
    name: Name
    interfaces: dict[Name, str] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)
    proxy_protocol: ProxyProtocolConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _address_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "address" in data:
            data = dict(data)
            if "interfaces" in data:
                raise ValueError("give 'address' or 'interfaces', not both")
            data["interfaces"] = {"nic0": data.pop("address")}
        return data

    @property
    def key(self) -> str:
        return f"{self.project}/{self.zone}/{self.name}"


class DestinationGroupConfig(StrictModel):
    """A destination group: CIDRs and FQDNs reachable in one region/network."""

    project: Name
    region: Name
    network: Name = "default"
    name: Name
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    fqdns: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,253}$")]] = Field(
        default_factory=list
    )
    proxy_protocol: ProxyProtocolConfig | None = None

    @property
    def key(self) -> str:
        return f"{self.project}/{self.region}/{self.network}/{self.name}"


class InventoryConfig(StrictModel):
    instances: list[InstanceConfig] = Field(default_factory=list)
    destination_groups: list[DestinationGroupConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> InventoryConfig:
        for what, keys in (
            ("instance", [i.key for i in self.instances]),
            ("destination group", [g.key for g in self.destination_groups]),
        ):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    raise ValueError(f"duplicate {what} {key!r}")
                seen.add(key)
        return self


class LookupFailed(Exception):
    """No such instance, interface, or destination: close code 4047."""

    code = CloseCode.LOOKUP_FAILED


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a tunnel may go. ``networks``: the addresses the operator named for it (an
    instance's address, a group's CIDRs); the dialed IP must lie in them unless
    ``any_address`` (a DNS name the operator configured). They also lift the SSRF denial of
    loopback/link-local for exactly what they name (tunnel_server.destinations)."""

    resource: str  # policy resource: instance:P/Z/N or group:P/R/N/G
    host: str  # address (or FQDN) to resolve once and dial
    port: int
    networks: tuple[IPNetwork, ...] = ()
    any_address: bool = False
    # Set when the destination wants a PROXY v2 header first.
    proxy_header: ProxyHeaderSpec | None = None


@dataclass(frozen=True, slots=True)
class ProxyHeaderSpec:
    """A PROXY v2 header for this destination; ``audience``: of the signed identity in it
    (None: no identity, addresses and the tunnel id only)."""

    audience: str | None


def _proxy_header(
    config: ProxyProtocolConfig | None, resource: str, port: int
) -> ProxyHeaderSpec | None:
    if config is None or (config.ports and port not in config.ports):
        return None
    return ProxyHeaderSpec(config.audience or resource if config.identity else None)


def _literal(host: str) -> IPAddress | None:
    try:
        return canonical_ip(host)
    except InvalidAddress:
        return None


def _group_contains(group: DestinationGroupConfig, host: str) -> bool:
    address = _literal(host)
    if address is None:
        return host.lower().rstrip(".") in {f.lower().rstrip(".") for f in group.fqdns}
    return within(group.cidrs)(address)


class Inventory:
    def __init__(self, config: InventoryConfig) -> None:
        self._instances = {i.key: i for i in config.instances}
        self._groups = config.destination_groups

    def resource_for(self, target: Target) -> str:
        """The policy resource a request names, before knowing whether it exists."""
        if isinstance(target, InstanceTarget):
            return f"instance:{target.name}"
        group = self._find_group(target)
        if group is None:
            return f"group:{target.project}/{target.region}/{target.network}/{target.group or ''}"
        return f"group:{group.key}"

    def _find_group(self, target: HostTarget) -> DestinationGroupConfig | None:
        for group in self._groups:
            if (group.project, group.region, group.network) != (
                target.project,
                target.region,
                target.network,
            ):
                continue
            if target.group is not None and group.name != target.group:
                continue
            if _group_contains(group, target.host):
                return group
        return None

    def resolve(self, target: Target) -> Destination:
        if isinstance(target, InstanceTarget):
            instance = self._instances.get(target.name)
            if instance is None:
                raise LookupFailed(f"unknown instance {target.name}")
            address = instance.interfaces.get(target.interface)
            if address is None:
                raise LookupFailed(f"instance {target.name} has no interface {target.interface}")
            resource = f"instance:{target.name}"
            header = _proxy_header(instance.proxy_protocol, resource, target.port)
            literal = _literal(address)
            if literal is None:  # the operator named a DNS name for this instance
                return Destination(resource, address, target.port, (), True, header)
            network = ipaddress.ip_network(literal)
            return Destination(resource, address, target.port, (network,), False, header)
        group = self._find_group(target)
        if group is None:
            raise LookupFailed(f"host {target.host} is in no destination group of {target.name}")
        by_name = _literal(target.host) is None
        resource = f"group:{group.key}"
        header = _proxy_header(group.proxy_protocol, resource, target.port)
        return Destination(resource, target.host, target.port, tuple(group.cidrs), by_name, header)
