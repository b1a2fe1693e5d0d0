"""Exception tree of the protocol core; every error carries the close code it maps to on the wire.

TunnelError (code)
├── ProtocolError            the peer broke the protocol (bad frame, bad ack, ...)
│   ├── InvalidTag           4008
│   ├── InvalidData          4013  (truncated frame, bad length, data too large)
│   ├── InvalidAck           4006  (ack beyond what was sent)
│   └── BadAck               4005  (ack went backwards)
├── RewindFailed             4074  a resume asked for bytes no longer buffered
├── ResumeBufferOverflow     4103  a caller offered more than the bounded resume buffer holds
└── TunnelClosed             the tunnel was closed with a code (by the peer or by us)
"""

from __future__ import annotations

from .codes import CloseCode, describe


class TunnelError(Exception):
    """Base class: ``code`` is the WebSocket close code this error is reported with."""

    code: int = CloseCode.UNKNOWN_ERROR

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        if code is not None:
            self.code = code
        super().__init__(message or describe(self.code))

    @property
    def reason(self) -> str:
        return str(self)


class ProtocolError(TunnelError):
    code = CloseCode.PROTOCOL_ERROR


class InvalidTag(ProtocolError):
    code = CloseCode.INVALID_TAG


class InvalidData(ProtocolError):
    code = CloseCode.INVALID_DATA


class InvalidAck(ProtocolError):
    code = CloseCode.INVALID_ACK


class BadAck(ProtocolError):
    code = CloseCode.BAD_ACK


class RewindFailed(TunnelError):
    code = CloseCode.FAILED_TO_REWIND


class ResumeBufferOverflow(TunnelError):
    code = CloseCode.RESUME_BUFFER_OVERFLOW


class TunnelClosed(TunnelError):
    """Raised to callers once the tunnel has ended; ``code`` says why."""
