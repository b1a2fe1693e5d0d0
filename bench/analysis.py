"""The prose of docs/benchmarks.md: which targets hold in this run, and what limits the rest.

The second part is what profiling found (``python -m bench.profile``, py-spy, cProfile and A/B
runs of candidate changes in a scratch copy of the tree) when this suite was written; the
figures quoted there are from those measurements, not from the run above."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .gate import QUIET
from .report import SOCAT2, bare, picows, relay, targets, websockify

if TYPE_CHECKING:
    from .results import Results


def _n(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def text(results: Results) -> str:
    m = results.median
    found = targets(results)
    held = [t for t in found if t.holds]
    missed = [t for t in found if t.holds is False]
    unknown = [t for t in found if t.holds is None]
    out = ["## Which targets hold", ""]
    if results.judged:
        out.append(
            f"{len(held)} of {len(found)} targets hold in this run, {len(missed)} are missed and "
            f"{len(unknown)} could not be decided (see the table above)."
        )
    else:
        out.append(
            f"None is judged: the load average at the start of the run was "
            f"{results.judge_load:.2f} (above {QUIET}). On these figures {len(held)} of "
            f"{len(found)} would hold, {len(missed)} would be missed and {len(unknown)} could not "
            "be decided; a busy run is not evidence either way."
        )
    for title, group in (("Hold" if results.judged else "Would hold", held),
                         ("Not decided", unknown)):  # fmt: skip
        if group:
            out.append(f"{title}: " + "; ".join(f"{t.text} ({t.measured})" for t in group) + ".")
    out.append("")
    ours_ws, bare_ws = relay("ws", "uvloop"), bare("ws")
    out.append(
        "The bare websockets chain is the calibration point: the issue's absolute targets were "
        "set where a bare wss chain opens ~920-950 tunnels/s and carries 0.92-0.97× (ws) and "
        f"0.70× (wss) of socat two hops. In this run it opened {_n(m(bare('wss'), 'churn'))} wss "
        f"tunnels/s and carried {_n(_ratio(m(bare_ws, 'up1'), m(SOCAT2, 'up1')), 2)}× (ws, up) "
        "of socat two hops: where it falls that short, the machine (or what else it was running) "
        "limits before the product does. Against the bare chain, tunnel-client + relay (ws, "
        f"uvloop) carried {_n(_ratio(m(ours_ws, 'up1'), m(bare_ws, 'up1')), 2)}× its upload and "
        f"{_n(_ratio(m(ours_ws, 'down1'), m(bare_ws, 'down1')), 2)}× its download, and the relay "
        f"spent {_n(m(relay('wss', 'uvloop'), 'churn_server_ms'), 2)} ms of CPU per new wss "
        f"tunnel against the bare relay's {_n(m(bare('wss'), 'churn_server_ms'), 2)} ms.\n"
    )
    picows_ws = picows("ws")
    if m(picows_ws, "up1") is not None:

        def vs_socat(name: str, key: str) -> str:
            return _n(_ratio(m(name, key), m(SOCAT2, key)), 2)

        out.append(
            "The bare picows chain (issue 18) is the second calibration point: the ceiling of a "
            "callback-driven engine on this machine. In this run it carried "
            f"{vs_socat(picows_ws, 'up1')}× / {vs_socat(picows_ws, 'down1')}× (ws, up / down) "
            f"and {vs_socat(picows('wss'), 'up1')}× / {vs_socat(picows('wss'), 'down1')}× (wss) "
            f"of socat two hops, with a round trip p50 of {vs_socat(picows_ws, 'rtt_p50')}× "
            f"(ws) and {vs_socat(picows('wss'), 'rtt_p50')}× (wss) socat's; tunnel-client + "
            f"relay (ws, uvloop) carried {_n(_ratio(m(ours_ws, 'up1'), m(picows_ws, 'up1')), 2)}"
            f"× its upload and {_n(_ratio(m(ours_ws, 'down1'), m(picows_ws, 'down1')), 2)}× its "
            "download.\n"
        )
    out.append(LIMITS.format(websockify_ws_rtt=_n(m(websockify("ws"), "rtt_p50"))))
    return "\n".join(out)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


LIMITS = """\
## What limits the rest (profiling notes)

Measured when the suite was written (py-spy and cProfile on the relay and the client, and A/B
runs of each candidate change in a scratch copy, interleaved, on this 2-core VM while other
work was running; `python -m bench.profile [--tls] [--rtt]` repeats the profile).

- **Memory per idle tunnel.** Every `TcpStream` allocates its own 64 KiB read buffer
  (`tunnel_protocol/aio/stream.py`, `TcpStream.__init__`); `buffer_updated` copies the bytes
  out at once, so one buffer per event-loop thread serves every stream. With that change the
  relay's growth per idle tunnel went from 105 to 38.5 KiB (ws) and from 130 to 64 KiB (wss on
  uvloop), three runs each. The rest over the bare chain (~20 KiB ws) is the tunnel's
  bookkeeping: five tasks per attachment plus the relay's own, asyncio Events and locks, the
  handshake headers websockets keeps. Turning three of the pump's tasks (ack timer, keepalive,
  close watcher) into timer callbacks was tried and measured: 59.0 → 58.7 KiB per idle wss
  tunnel and no change in tunnels/s (within noise, two and four interleaved runs), so it was
  not kept. asyncio's own TLS keeps a 256 KiB buffer per connection
  (~316-380 KiB per wss tunnel): uvloop (~25 KiB of TLS state) is the choice for wss.
- **New tunnels per second.** The relay spends ~2 ms of CPU per ws tunnel against ~0.5 ms for
  the bare relay, almost all of it in Python (perf: 83% user time). The largest items: the
  target dial, 0.24 ms on uvloop because `dial_ip` (`tunnel_server/destinations.py`) uses
  `loop.sock_connect`, which on uvloop always runs getaddrinfo in libuv's thread pool (it
  passes no socket type), against 0.10 ms with `loop.create_connection(TcpStream, str(address),
  port, family=..., proto=IPPROTO_TCP, flags=AI_NUMERICHOST)` (still no name lookup possible);
  the token check, 0.13 ms per handshake (ECDSA P-256 verify 0.07 ms, the rest PyJWT, which
  also re-validates the base64 alphabet character by character), now paid once per token and
  minute: verified tokens are cached (`OidcVerifier.verify`, docs/identity.md; 11% of the
  relay's samples under churn before, none after); the handshake itself
  (`process_request`, URL and header parsing); the policy decision; two audit records per
  tunnel (JSON, logging, the secret-redaction regex); five tasks and a TaskGroup per
  attachment; the close handshake. wss adds the server's TLS handshake (~0.5 ms or more here).
  The load generator runs the real client library on the client core, which costs about as
  much as the relay: the relay is not always the only limit.
- **Round trip.** Four Python processes share one core, so each message costs syscalls and
  wake-ups on every hop; websockets' send path (an async context manager per message) is the
  same as in the bare chain. Our own extra per received message: the pump wakes its ack-flush
  timer task every time (`Pump._ws_to_stream` sets `_timer_wake`; `Pump._timers` then builds a
  new `asyncio.timeout`). Letting the timer task sleep until the deadline it knows (deadlines
  only move later while attached) and waking it only when it had none cut p50 by 13% (230 →
  200 µs, ws on uvloop, three interleaved runs). websockify's p50 in this run:
  {websockify_ws_rtt} µs.
- **Bulk throughput.** Per byte, the product is close to the bare chain (compare the CPU s/GB
  columns): the side that turns TCP into WebSocket messages (client on upload, relay on
  download) runs near a full core; its time is syscalls, buffer copies (the read copied out of
  the read buffer, the DATA header concatenated onto the payload, masking and websockets' frame
  serialization on the client) and per-message Python (two task wake-ups, the send lock,
  `Tunnel` bookkeeping, an ACK every 256 KiB). Returning DATA payloads as memoryviews instead of
  slices made no measurable difference. wss adds 0.5-0.8 CPU s/GB per side (AES-GCM through the
  ssl module's memory BIO). On a busy machine the Python chains lose more than socat, so the
  ratios to socat are only meaningful on an idle one.
- **gcloud** uploads at a few MB/s because it masks frames in pure Python (its own CPU per GB is
  two orders of magnitude above ours); its downloads are limited by its own Python receive loop,
  not by the relay.
"""
