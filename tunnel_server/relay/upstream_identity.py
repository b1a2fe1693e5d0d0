"""The PROXY v2 header the relay writes first to a destination configured with
``proxy_protocol``: the client's address as decided, the tunnel id (TLV 0xE0) and an identity
assertion (TLV 0xE1) signed with HTTP mode's keys, for that destination's audience
(docs/upstream-identity.md). Never sent to any other destination."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tunnel_protocol.proxyheader import TLV_ASSERTION, TLV_TUNNEL_ID, encode_v2

from ..access.addresses import DialFailed, IPAddress
from ..access.identity import Identity


class IdentitySigner(Protocol):
    """HTTP mode's ``AssertionSigner.sign``: an ES256 JWT for ``audience``."""

    def __call__(
        self,
        *,
        audience: str,
        subject: str,
        email: str | None,
        groups: Sequence[str],
        access_levels: Sequence[str] = (),
        principal: str,
        extra: dict[str, Any] | None = None,
    ) -> str: ...


def proxy_header(
    sign: IdentitySigner | None,
    *,
    identity: Identity,
    audience: str | None,
    access_levels: Sequence[str],
    tunnel_id: str,
    target: str,
    source_ip: str | None,
    dialed: IPAddress,
    port: int,
) -> bytes:
    """The header for one tunnel's connection to ``dialed:port``. ``target``: the instance or
    host as the client asked for it; ``audience`` None: no identity TLV. DialFailed (the tunnel
    is refused, nothing is sent) when an identity is wanted and no signer is running."""
    # The client's port is not known past a balancer: 0, as HAProxy sends for unknown ports.
    source = (source_ip, 0) if source_ip is not None else None
    tlvs = {TLV_TUNNEL_ID: tunnel_id.encode("ascii")}
    if audience is None:
        return encode_v2(source, (str(dialed), port), tlvs)
    if sign is None:
        raise DialFailed("the destination wants a signed identity and no signer runs", dialed)
    assertion = sign(
        audience=audience,
        subject=identity.subject,
        email=identity.email,
        groups=identity.groups,
        access_levels=access_levels,
        principal=identity.principal,
        extra={"instance": target, "port": port, "tunnel_id": tunnel_id},
    )
    tlvs[TLV_ASSERTION] = assertion.encode("ascii")
    return encode_v2(source, (str(dialed), port), tlvs)
