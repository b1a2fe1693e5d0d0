"""Prometheus metrics for the relay, served on their own address (``metrics.listen``).

Nothing here runs on the data path. Byte counts and open tunnels are read from the relay's
sessions when Prometheus scrapes (a collector sums the live tunnels' counters plus those of
tunnels that have ended); counts of decisions come from audit records (``observe_audit`` is an
``AuditLog`` observer); the relay reports decision latency, ended tunnels and applied
revocations with one call each.

Every label value comes from a fixed set: audit reasons may carry free text (issuer URLs,
destination hosts, principals), so they are mapped to a few known values and everything else to
``other``. Each ``Metrics`` has its own ``CollectorRegistry``: several relays may share one
process (the tests do), so the global registry is never used.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, Literal, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..audit_store import StoreStats
from .listeners import serve_app

__all__ = [
    "AUTH_FAILURE_REASONS",
    "DECISION_BUCKETS",
    "OPEN_RESULTS",
    "RESUME_RESULTS",
    "SESSION_DURATION_BUCKETS",
    "Metrics",
    "SessionLike",
    "SessionSource",
    "metrics_app",
    "serving",
]

log = logging.getLogger(__name__)

# Policy evaluation takes ~70 µs at the median; resolution where that lives, up to 10 ms.
DECISION_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01,
)  # fmt: skip
# From a one-second probe to a day-long session.
SESSION_DURATION_BUCKETS: Final = (
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
)  # fmt: skip

# AuthError reasons (tunnel_server.access.identity, Admission.authenticate) -> label value.
# The audit record keeps the exact reason; the label says which kind of failure to look for.
_AUTH_REASONS: Final[Mapping[str, str]] = {
    "missing credentials": "missing_credentials",
    "several credentials": "missing_credentials",
    "not a bearer token": "missing_credentials",
    "malformed": "malformed",
    "too large": "malformed",
    "unsupported header": "malformed",
    "missing claim": "malformed",
    "invalid claim": "malformed",
    "expired": "expired",
    "not yet valid": "clock_skew",
    "issued in the future": "clock_skew",
    "bad signature": "signature",
    "unknown key": "signature",
    "ambiguous key": "signature",
    "bad key": "signature",
    "algorithm mismatch": "signature",
    "algorithm not allowed": "signature",
    "bad issuer": "issuer",
    "bad audience": "audience",
    "bad azp": "audience",
    "bad subject": "claims",
    "lifetime too long": "claims",
    "revoked": "revoked",
    "inactive token": "inactive",
}
AUTH_FAILURE_REASONS: Final = (*dict.fromkeys(_AUTH_REASONS.values()), "other")

# tunnel_opened_total{result}: every connect ends in exactly one of these (handshake refusals
# count reconnects too: the handshake record does not say which it was).
OPEN_RESULTS: Final = (
    "allowed",
    "denied",
    "backend_unreachable",
    "unauthenticated",
    "forbidden",
    "rate_limited",
    "unavailable",
    "bad_request",
    "other",
)
_HANDSHAKE_STATUS: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    429: "rate_limited",
    503: "unavailable",
}
# A connect that passed the handshake's cap check but found the caps full (close 4105).
_CAP_REFUSAL: Final = "too many tunnels"

RESUME_RESULTS: Final = ("allowed", "unknown_session", "denied")
# Both close with 4001 "sid unknown": the tunnel is not here (or not the caller's).
_UNKNOWN_SESSION: Final = frozenset({"sid unknown", "principal mismatch"})

_DIALECTS: Final = ("iap", "native")
_STATES: Final = ("attached", "parked")
Origin = Literal["local", "remote"]
_ORIGINS: Final[tuple[Origin, ...]] = ("local", "remote")


class _DialectLike(Protocol):
    @property
    def name(self) -> str: ...


class _TunnelLike(Protocol):
    @property
    def received_total(self) -> int: ...
    @property
    def sent_total(self) -> int: ...
    @property
    def dialect(self) -> _DialectLike: ...


class SessionLike(Protocol):
    """What the metrics read of a ``tunnel_server.session.Session``."""

    @property
    def tunnel(self) -> _TunnelLike: ...
    @property
    def pump(self) -> object | None: ...


class SessionSource(Protocol):
    """The relay, as far as metrics are concerned: its open tunnels by id."""

    @property
    def sessions(self) -> Mapping[str, SessionLike]: ...


def _version() -> str:
    try:
        return importlib.metadata.version("identity-tunnel")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The relay's metrics in their own registry (``self.registry``).

    ``source``: the relay (its ``sessions`` are read at scrape time). ``state_available``: cheap,
    non-blocking answer to "is the shared state store reachable right now", read at scrape time
    (``tunnel_state_store_up``); without it that metric is not exported. ``audit_store``: the
    audit store writer's counters (``tunnel_audit_store_*``), when there is one.

    Call everything from the event loop's thread (the scrape handler runs there too)."""

    def __init__(
        self,
        source: SessionSource,
        *,
        state_available: Callable[[], bool] | None = None,
        audit_store: Callable[[], StoreStats] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._source = source
        self._state_available = state_available
        # Byte totals of the tunnels that have ended; live ones are summed at scrape time.
        self._ended_from_client = 0
        self._ended_to_client = 0
        r = self.registry
        self.opened = Counter("tunnel_opened", "Tunnel connects by result.", ["result"], registry=r)
        self.auth_failures = Counter(
            "tunnel_auth_failures",
            "Handshakes refused with 401, by kind of credential problem.",
            ["reason"],
            registry=r,
        )
        self.resumes = Counter(
            "tunnel_resumes", "Tunnel reconnects (resumes) by result.", ["result"], registry=r
        )
        self.revocations = Counter(
            "tunnel_revocations_applied",
            "Revocations applied on this relay, by where they were made.",
            ["origin"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "tunnel_decision_seconds",
            "Time to evaluate the access policy for one request.",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.session_duration = Histogram(
            "tunnel_session_duration_seconds",
            "Lifetime of ended tunnels, from connect to close.",
            buckets=SESSION_DURATION_BUCKETS,
            registry=r,
        )
        Info("tunnel_build", "Relay version and Python version.", registry=r).info(
            {"version": _version(), "python": platform.python_version()}
        )
        # Every known series exists from the start, at 0, so rate() and absence alerts work.
        for values, counter in (
            (OPEN_RESULTS, self.opened),
            (AUTH_FAILURE_REASONS, self.auth_failures),
            (RESUME_RESULTS, self.resumes),
            (_ORIGINS, self.revocations),
        ):
            for value in values:
                counter.labels(value)
        r.register(_LiveCollector(self))
        if audit_store is not None:
            r.register(_StoreCollector(audit_store))
        ProcessCollector(registry=r)  # process_* (CPU, memory, open file descriptors)

    # -- called by the relay --------------------------------------------------------------------

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        """``AuditLog`` observer: counts connects, auth failures and resumes."""
        decision = fields.get("decision")
        if event == "handshake" and decision == "deny":
            status = fields.get("status")
            result = _HANDSHAKE_STATUS.get(status, "other") if isinstance(status, int) else "other"
            self.opened.labels(result).inc()
            if status == 401:
                self.auth_failures.labels(auth_failure_reason(fields.get("reason"))).inc()
        elif event == "decision":
            self.opened.labels(_decision_result(decision, fields)).inc()
        elif event == "resume":
            self.resumes.labels(_resume_result(decision, fields.get("reason"))).inc()

    def observe_decision(self, seconds: float) -> None:
        """One policy evaluation took ``seconds``."""
        self.decision_seconds.observe(seconds)

    def session_ended(self, session: SessionLike, duration_seconds: float) -> None:
        """A tunnel ended: call once, after it left ``source.sessions`` (its bytes move from the
        live sum to the ended total; calling it twice would count them twice)."""
        self._ended_from_client += session.tunnel.received_total
        self._ended_to_client += session.tunnel.sent_total
        self.session_duration.observe(duration_seconds)

    def revocation_applied(self, origin: Origin) -> None:
        """A revocation took effect here: made on this node ("local") or received from the
        shared state ("remote")."""
        if origin not in _ORIGINS:
            raise ValueError(f"origin must be 'local' or 'remote', not {origin!r}")
        self.revocations.labels(origin).inc()

    # -- read at scrape time --------------------------------------------------------------------

    def _live(self) -> tuple[int, int, dict[tuple[str, str], int]]:
        from_client, to_client = self._ended_from_client, self._ended_to_client
        active = {(d, s): 0 for d in _DIALECTS for s in _STATES}
        for session in list(self._source.sessions.values()):
            tunnel = session.tunnel
            from_client += tunnel.received_total
            to_client += tunnel.sent_total
            key = (tunnel.dialect.name, "attached" if session.pump is not None else "parked")
            active[key] = active.get(key, 0) + 1
        return from_client, to_client, active

    def _state_up(self) -> float | None:
        if self._state_available is None:
            return None
        try:
            return 1.0 if self._state_available() else 0.0
        except Exception:
            log.exception("state store availability check failed")
            return 0.0


def auth_failure_reason(reason: object) -> str:
    """The ``tunnel_auth_failures_total`` label for an AuthError reason (``other`` if unknown)."""
    return _AUTH_REASONS.get(reason, "other") if isinstance(reason, str) else "other"


def _decision_result(decision: object, fields: Mapping[str, Any]) -> str:
    if decision == "allow":
        result = fields.get("result")
        if result is None:
            return "allowed"
        return result if isinstance(result, str) and result in OPEN_RESULTS else "other"
    reason = fields.get("reason")
    if isinstance(reason, str) and reason.startswith(_CAP_REFUSAL):
        return "rate_limited"
    return "denied"


def _resume_result(decision: object, reason: object) -> str:
    if decision == "allow":
        return "allowed"
    return "unknown_session" if reason in _UNKNOWN_SESSION else "denied"


class _LiveCollector(Collector):
    """Families computed from the relay's sessions (and the state store) at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "tunnel_bytes",
                "Tunnel payload bytes, open and ended tunnels: from_client is what clients sent "
                "to targets, to_client what targets sent to clients.",
                labels=["direction"],
            ),
            GaugeMetricFamily(
                "tunnel_active",
                "Open tunnels by subprotocol; parked ones await a reconnect.",
                labels=["dialect", "state"],
            ),
            GaugeMetricFamily(
                "tunnel_state_store_up", "1 if the shared state store is reachable, else 0."
            ),
        )

    def describe(self) -> Iterable[Metric]:
        families = self._families()
        return families if self._metrics._state_available is not None else families[:2]

    def collect(self) -> Iterable[Metric]:
        bytes_, active, state = self._families()
        from_client, to_client, counts = self._metrics._live()
        bytes_.add_metric(["from_client"], from_client)
        bytes_.add_metric(["to_client"], to_client)
        for (dialect, session_state), count in sorted(counts.items()):
            active.add_metric([dialect, session_state], count)
        families: list[Metric] = [bytes_, active]
        up = self._metrics._state_up()
        if up is not None:
            state.add_metric([], up)
            families.append(state)
        return families


class _StoreCollector(Collector):
    """The audit store writer's counters, read at scrape time."""

    def __init__(self, stats: Callable[[], StoreStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        up = GaugeMetricFamily(
            "tunnel_audit_store_up", "1 if the last write to the audit store succeeded, else 0."
        )
        up.add_metric([], 1.0 if stats.up else 0.0)
        written = CounterMetricFamily(
            "tunnel_audit_store_written", "Audit records written to the audit store."
        )
        written.add_metric([], stats.written)
        dropped = CounterMetricFamily(
            "tunnel_audit_store_dropped",
            "Audit records not written to the audit store (queue full, store down): they are "
            "in the JSON audit log only.",
        )
        dropped.add_metric([], stats.dropped)
        queued = GaugeMetricFamily(
            "tunnel_audit_store_queued", "Audit records waiting to be written to the store."
        )
        queued.add_metric([], stats.queued)
        return [up, written, dropped, queued]


def metrics_app(metrics: Metrics) -> web.Application:
    """``GET /metrics`` (Prometheus text format, or OpenMetrics when the scraper asks for it)
    and ``GET /healthz``."""

    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(
            body=encoder(metrics.registry),
            headers={"Content-Type": content_type, "Cache-Control": "no-store"},
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    return app


@asynccontextmanager
async def serving(metrics: Metrics, host: str, port: int) -> AsyncIterator[int]:
    """Serve ``metrics_app(metrics)`` on host:port (0: any free port); yields the bound port."""
    async with serve_app(metrics_app(metrics), host, port) as bound:
        yield bound
