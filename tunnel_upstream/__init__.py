"""For upstreams behind identity-tunnel: verify HTTP mode's ``X-Tunnel-Jwt-Assertion``
(``verify_assertion``), and read the relay's PROXY protocol header with the caller's verified
identity on TCP targets (``read_proxy_header``; docs/upstream-identity.md). Depends on
PyJWT[crypto] and the protocol core's PROXY header codec (``tunnel_protocol.proxyheader``, pure
Python, in the same distribution)."""

from .proxyproto import (
    TLV_ASSERTION,
    TLV_TUNNEL_ID,
    IdentityCheck,
    IdentityRefused,
    ProxyHeaderError,
    ProxyInfo,
    ReplayCache,
    parse_proxy_header,
    read_proxy_header,
    read_proxy_header_from_socket,
    verify_identity,
)
from .verify import ASSERTION_HEADER, AssertionError_, verify_assertion

__all__ = [
    "ASSERTION_HEADER",
    "TLV_ASSERTION",
    "TLV_TUNNEL_ID",
    "AssertionError_",
    "IdentityCheck",
    "IdentityRefused",
    "ProxyHeaderError",
    "ProxyInfo",
    "ReplayCache",
    "parse_proxy_header",
    "read_proxy_header",
    "read_proxy_header_from_socket",
    "verify_assertion",
    "verify_identity",
]
