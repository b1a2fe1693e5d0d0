"""Where a request comes from: the client's address, as policy (``source.ip``), access levels
and audit records see it. A peer's X-Forwarded-For is believed only when the peer is one of the
operator's trusted proxies (a load balancer in front), and then only up to the first untrusted
hop from the right."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .addresses import IPNetwork, request_ip


def client_address(
    peer: str | None, xff: Sequence[str], trusted: Sequence[IPNetwork]
) -> tuple[str | None, str]:
    """(the client's address, the X-Forwarded-For value to pass on upstream)."""
    if peer is None:
        return None, "unknown"

    def is_trusted(address: str) -> bool:
        ip = request_ip(address.strip())
        return ip is not None and any(ip in net for net in trusted)

    if not trusted or not is_trusted(peer):
        return peer, peer
    chain = [h.strip() for v in xff for h in v.split(",") if h.strip()]
    client = peer
    for hop in reversed(chain):
        try:
            ipaddress.ip_address(hop)  # a hop in its plain form only
        except ValueError:
            break
        client = hop
        if not is_trusted(hop):
            break
    return client, ", ".join([*chain, peer])
