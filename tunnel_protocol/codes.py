"""Close codes of both subprotocols: IAP relay v4 codes, plus the native subprotocol's own."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes. 4000-4099 are IAP's; 4100-4199 are native-only additions.

    The IAP codes keep their meaning in the native subprotocol, so one table serves both.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # RFC 6455 registry: a temporary condition (shared state down)
    # IAP relay v4, as gcloud knows them.
    UNKNOWN_ERROR = 4000
    SID_UNKNOWN = 4001
    SID_IN_USE = 4002
    FAILED_TO_CONNECT_TO_BACKEND = 4003
    REAUTHENTICATION_REQUIRED = 4004
    BAD_ACK = 4005
    INVALID_ACK = 4006
    INVALID_WEBSOCKET_OPCODE = 4007
    INVALID_TAG = 4008
    DESTINATION_WRITE_FAILED = 4009
    DESTINATION_READ_FAILED = 4010
    INVALID_DATA = 4013
    NOT_AUTHORIZED = 4033
    LOOKUP_FAILED = 4047
    LOOKUP_FAILED_RECONNECT = 4051
    FAILED_TO_REWIND = 4074
    # Native subprotocol only.
    DRAINING = 4100
    IDLE_TIMEOUT = 4101
    MAX_SESSION_DURATION = 4102
    RESUME_BUFFER_OVERFLOW = 4103
    UNAUTHENTICATED = 4104
    TOO_MANY_TUNNELS = 4105
    RESUME_EXPIRED = 4106

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @property
    def retryable(self) -> bool:
        """Whether a client should reconnect (resume) after this close."""
        return self in _RETRYABLE


_DESCRIPTIONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal closure",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.TRY_AGAIN_LATER: "try again later",
    CloseCode.UNKNOWN_ERROR: "unknown error",
    CloseCode.SID_UNKNOWN: "sid unknown",
    CloseCode.SID_IN_USE: "sid in use",
    CloseCode.FAILED_TO_CONNECT_TO_BACKEND: "failed to connect to backend",
    CloseCode.REAUTHENTICATION_REQUIRED: "reauthentication required",
    CloseCode.BAD_ACK: "bad ack",
    CloseCode.INVALID_ACK: "invalid ack",
    CloseCode.INVALID_WEBSOCKET_OPCODE: "invalid websocket opcode",
    CloseCode.INVALID_TAG: "invalid tag",
    CloseCode.DESTINATION_WRITE_FAILED: "destination write failed",
    CloseCode.DESTINATION_READ_FAILED: "destination read failed",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.NOT_AUTHORIZED: "not authorized",
    CloseCode.LOOKUP_FAILED: "lookup failed",
    CloseCode.LOOKUP_FAILED_RECONNECT: "lookup failed on reconnect",
    CloseCode.FAILED_TO_REWIND: "failed to rewind",
    CloseCode.DRAINING: "relay draining, reconnect",
    CloseCode.IDLE_TIMEOUT: "idle timeout",
    CloseCode.MAX_SESSION_DURATION: "maximum session duration reached",
    CloseCode.RESUME_BUFFER_OVERFLOW: "resume buffer overflow",
    CloseCode.UNAUTHENTICATED: "authentication failed, log in again",
    CloseCode.TOO_MANY_TUNNELS: "too many tunnels",
    CloseCode.RESUME_EXPIRED: "resume window expired",
}

# After these the client resumes the same tunnel on a new WebSocket (/v4/reconnect).
_RETRYABLE = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.SID_IN_USE,
        CloseCode.REAUTHENTICATION_REQUIRED,
        CloseCode.DRAINING,
    }
)


def describe(code: int) -> str:
    """Human text for any close code, known or not."""
    try:
        return CloseCode(code).description
    except ValueError:
        return f"close code {code}"
