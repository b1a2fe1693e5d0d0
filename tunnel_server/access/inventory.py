"""Targets: map a connect request (instance, or host in a destination group) to the address
to dial; unknown instances and hosts outside every group are lookup failures (4047)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

from ..config.models import DestinationGroupConfig, InventoryConfig
from .addresses import InvalidAddress, IPAddress, IPNetwork, canonical_ip, within


class LookupFailed(Exception):
    """No such instance, interface, or destination: close code 4047."""


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
            literal = _literal(address)
            if literal is None:  # the operator named a DNS name for this instance
                return Destination(f"instance:{target.name}", address, target.port, (), True)
            network = ipaddress.ip_network(literal)
            return Destination(f"instance:{target.name}", address, target.port, (network,))
        group = self._find_group(target)
        if group is None:
            raise LookupFailed(f"host {target.host} is in no destination group of {target.name}")
        by_name = _literal(target.host) is None
        return Destination(
            f"group:{group.key}", target.host, target.port, tuple(group.cidrs), by_name
        )
