"""Sans-I/O core of the tunnel protocol (frames, close codes, ack/resume state), shared by both
the relay and the client. Only ``tunnel_protocol.aio`` does I/O."""

from .codes import CloseCode, describe
from .dialect import DIALECTS, IAP, IAP_SUBPROTOCOL, NATIVE, NATIVE_SUBPROTOCOL, Dialect
from .errors import (
    BadAck,
    InvalidAck,
    InvalidData,
    InvalidTag,
    LocalProtocolError,
    ProtocolError,
    ResumeBufferOverflow,
    RewindFailed,
    TunnelError,
)
from .tunnel import Side, Tunnel

__all__ = [
    "DIALECTS",
    "IAP",
    "IAP_SUBPROTOCOL",
    "NATIVE",
    "NATIVE_SUBPROTOCOL",
    "BadAck",
    "CloseCode",
    "Dialect",
    "InvalidAck",
    "InvalidData",
    "InvalidTag",
    "LocalProtocolError",
    "ProtocolError",
    "ResumeBufferOverflow",
    "RewindFailed",
    "Side",
    "Tunnel",
    "TunnelError",
    "describe",
]
