"""The two subprotocols' parameters: IAP relay v4 (what gcloud speaks) and our native v1."""

from __future__ import annotations

from dataclasses import dataclass

IAP_SUBPROTOCOL = "relay.tunnel.cloudproxy.app"
NATIVE_SUBPROTOCOL = "v1.native.tunnel.identity-tunnel"


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the subprotocols; the framing and ack rules are shared.

    ``max_data``: largest DATA payload. ``ack_threshold``: the receiver sends a cumulative ACK once
    this many bytes are unacknowledged. ``ack_flush``: seconds of receive idleness after which any
    remainder is acknowledged. ``native``: EOF, CLOSE and REAUTH frames and keepalive pings allowed.
    """

    name: str
    subprotocol: str
    max_data: int
    ack_threshold: int
    ack_flush: float
    native: bool


IAP = Dialect(
    name="iap",
    subprotocol=IAP_SUBPROTOCOL,
    max_data=16 * 1024,
    ack_threshold=32 * 1024,
    ack_flush=2.0,
    native=False,
)

# 64 KiB frames: 16 KiB frames cost 30-45% of throughput in per-message overhead, 256 KiB buys
# nothing and pushes reads into glibc's mmap threshold (measured on our machines, see
# docs/protocol.md section 5). A 256 KiB ack threshold keeps acks to one per four frames while
# staying far below the smallest allowed resume buffer (1 MiB), so a sender never stalls on acks.
NATIVE = Dialect(
    name="native",
    subprotocol=NATIVE_SUBPROTOCOL,
    max_data=64 * 1024,
    ack_threshold=256 * 1024,
    ack_flush=1.0,
    native=True,
)

DIALECTS = {IAP.subprotocol: IAP, NATIVE.subprotocol: NATIVE}
