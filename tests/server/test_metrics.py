"""Prometheus metrics: read from sessions at scrape time, counted from audit records, served on
their own port, with label values from fixed sets whatever the audit reasons say."""

from __future__ import annotations

import importlib.metadata
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tunnel_protocol import NATIVE, Tunnel
from tunnel_server.audit import AuditLog
from tunnel_server.ops.metrics import (
    AUTH_FAILURE_REASONS,
    OPEN_RESULTS,
    RESUME_RESULTS,
    Metrics,
    SessionLike,
    SessionSource,
    serving,
)
from tunnel_server.relay import Relay

from ..protocol.helpers import TunnelPair

# -- fakes ----------------------------------------------------------------------------------------


@dataclass
class FakeDialect:
    name: str


@dataclass
class FakeTunnel:
    dialect: FakeDialect
    received_total: int = 0
    sent_total: int = 0


@dataclass
class FakeSession:
    tunnel: FakeTunnel
    pump: object | None = None


@dataclass
class RealSession:
    tunnel: Tunnel
    pump: object | None = None


@dataclass
class FakeRelay:
    sessions: dict[str, SessionLike] = field(default_factory=dict)


def _relay_is_a_source(relay: Relay) -> SessionSource:
    """Never called: mypy checks that the real relay (and its Session) fit the protocols."""
    return relay


def session(dialect: str, *, attached: bool, sent: int = 0, received: int = 0) -> FakeSession:
    return FakeSession(
        FakeTunnel(FakeDialect(dialect), received, sent), object() if attached else None
    )


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels}"
    return sample


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, by its sorted labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


# -- live sessions --------------------------------------------------------------------------------


def test_bytes_and_active_tunnels_are_read_from_sessions_at_scrape_time() -> None:
    relay = FakeRelay()
    metrics = Metrics(relay)
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 0
    assert samples(metrics, "tunnel_active") == {
        (("dialect", d), ("state", s)): 0.0
        for d in ("iap", "native")
        for s in ("attached", "parked")
    }

    a = relay.sessions["a"] = session("iap", attached=True, received=100, sent=1000)
    b = relay.sessions["b"] = session("native", attached=False, received=20, sent=200)
    relay.sessions["c"] = session("native", attached=True, received=3, sent=30)
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 123
    assert value(metrics, "tunnel_bytes_total", direction="to_client") == 1230
    assert value(metrics, "tunnel_active", dialect="iap", state="attached") == 1
    assert value(metrics, "tunnel_active", dialect="iap", state="parked") == 0
    assert value(metrics, "tunnel_active", dialect="native", state="attached") == 1
    assert value(metrics, "tunnel_active", dialect="native", state="parked") == 1

    # The relay never tells the metrics about bytes: the next scrape just sees more.
    a.tunnel.received_total += 5
    b.pump = object()  # resumed
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 128
    assert value(metrics, "tunnel_active", dialect="native", state="attached") == 2
    assert value(metrics, "tunnel_active", dialect="native", state="parked") == 0


def test_an_ended_tunnel_keeps_its_bytes_and_records_its_duration() -> None:
    relay = FakeRelay()
    metrics = Metrics(relay)
    relay.sessions["a"] = session("iap", attached=True, received=100, sent=1000)
    relay.sessions["b"] = session("native", attached=True, received=7, sent=70)

    ended = relay.sessions.pop("a")
    metrics.session_ended(ended, 12.0)
    # The counter never goes down: the ended tunnel's bytes moved to the accumulator.
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 107
    assert value(metrics, "tunnel_bytes_total", direction="to_client") == 1070
    assert value(metrics, "tunnel_active", dialect="iap", state="attached") == 0
    assert value(metrics, "tunnel_session_duration_seconds_count") == 1
    assert value(metrics, "tunnel_session_duration_seconds_sum") == 12.0
    assert value(metrics, "tunnel_session_duration_seconds_bucket", le="5.0") == 0
    assert value(metrics, "tunnel_session_duration_seconds_bucket", le="15.0") == 1

    metrics.session_ended(relay.sessions.pop("b"), 90_000.0)  # longer than a day
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 107
    assert value(metrics, "tunnel_session_duration_seconds_bucket", le="86400.0") == 1
    assert value(metrics, "tunnel_session_duration_seconds_bucket", le="+Inf") == 2


def test_real_tunnel_counters_count_each_byte_once_across_a_resume() -> None:
    """The attributes read are the protocol core's stream offsets: a replay after a dropped
    WebSocket does not count its bytes again."""
    pair = TunnelPair(NATIVE)
    pair.handshake()
    pair.client.tunnel.send_data(b"x" * 5000)
    pair.server.tunnel.send_data(b"y" * 7000)
    pair.collect()
    pair.drop()  # both messages lost on the wire: they are replayed
    pair.settle()
    assert bytes(pair.server.received) == b"x" * 5000
    relay = FakeRelay()
    relay.sessions["s"] = RealSession(pair.server.tunnel)
    metrics = Metrics(relay)
    assert value(metrics, "tunnel_bytes_total", direction="from_client") == 5000
    assert value(metrics, "tunnel_bytes_total", direction="to_client") == 7000
    assert value(metrics, "tunnel_active", dialect="native", state="parked") == 1


def test_unknown_dialect_is_reported_not_dropped() -> None:
    relay = FakeRelay({"a": session("v2", attached=True)})
    assert value(Metrics(relay), "tunnel_active", dialect="v2", state="attached") == 1


# -- audit records --------------------------------------------------------------------------------

_CASES: list[tuple[str, dict[str, Any], str, dict[str, str]]] = [
    ("decision", {"decision": "allow", "reason": "allowed by access[0]"}, "tunnel_opened_total",
     {"result": "allowed"}),
    ("decision", {"decision": "allow", "reason": "dial timeout", "result": "backend_unreachable"},
     "tunnel_opened_total", {"result": "backend_unreachable"}),
    ("decision", {"decision": "allow", "result": "some future result"}, "tunnel_opened_total",
     {"result": "other"}),
    ("decision", {"decision": "deny", "reason": "no binding grants access"},
     "tunnel_opened_total", {"result": "denied"}),
    ("decision", {"decision": "deny", "reason": "lookup failed: no instance prod/z/vm"},
     "tunnel_opened_total", {"result": "denied"}),
    ("decision", {"decision": "deny", "reason": "too many tunnels on this relay (limit 3)"},
     "tunnel_opened_total", {"result": "rate_limited"}),
    ("handshake", {"decision": "deny", "reason": "bad request: no port", "status": 400},
     "tunnel_opened_total", {"result": "bad_request"}),
    ("handshake", {"decision": "deny", "reason": "expired", "status": 401},
     "tunnel_opened_total", {"result": "unauthenticated"}),
    ("handshake", {"decision": "deny", "reason": "device certificate required", "status": 403},
     "tunnel_opened_total", {"result": "forbidden"}),
    ("handshake", {"decision": "deny", "reason": "too many tunnels for this principal (limit 2)",
                   "status": 429}, "tunnel_opened_total", {"result": "rate_limited"}),
    ("handshake", {"decision": "deny", "reason": "issuer unavailable", "status": 503},
     "tunnel_opened_total", {"result": "unavailable"}),
    ("handshake", {"decision": "deny", "reason": "teapot", "status": 418},
     "tunnel_opened_total", {"result": "other"}),
    ("resume", {"decision": "allow", "tunnel_id": "t", "ack": 0}, "tunnel_resumes_total",
     {"result": "allowed"}),
    ("resume", {"decision": "deny", "reason": "sid unknown"}, "tunnel_resumes_total",
     {"result": "unknown_session"}),
    ("resume", {"decision": "deny", "reason": "principal mismatch"}, "tunnel_resumes_total",
     {"result": "unknown_session"}),
    ("resume", {"decision": "deny", "reason": "no binding grants access"},
     "tunnel_resumes_total", {"result": "denied"}),
]  # fmt: skip


@pytest.mark.parametrize(("event", "fields", "name", "labels"), _CASES)
def test_audit_records_are_counted_once_in_the_right_series(
    event: str, fields: dict[str, Any], name: str, labels: dict[str, str]
) -> None:
    metrics = Metrics(FakeRelay())
    families = ("tunnel_opened_total", "tunnel_resumes_total", "tunnel_auth_failures_total")
    before = {f: samples(metrics, f) for f in families}
    metrics.observe_audit(event, fields)
    after = {f: samples(metrics, f) for f in families}
    changed = {
        (f, key): after[f][key] - before[f].get(key, 0.0)
        for f in families
        for key in after[f]
        if after[f][key] != before[f].get(key, 0.0)
    }
    expected = {(name, tuple(sorted(labels.items()))): 1.0}
    if fields.get("status") == 401:
        expected[("tunnel_auth_failures_total", (("reason", "expired"),))] = 1.0
    assert changed == expected


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("missing credentials", "missing_credentials"),
        ("not a bearer token", "missing_credentials"),
        ("too large", "malformed"),
        ("malformed", "malformed"),
        ("expired", "expired"),
        ("not yet valid", "clock_skew"),
        ("bad signature", "signature"),
        ("unknown key", "signature"),
        ("bad issuer", "issuer"),
        ("bad audience", "audience"),
        ("lifetime too long", "claims"),
        ("revoked", "revoked"),
        ("inactive token", "inactive"),
        ("issuer https://idp.example.com/ said no", "other"),
    ],
)
def test_auth_failure_reasons_map_to_a_fixed_label(reason: str, label: str) -> None:
    metrics = Metrics(FakeRelay())
    metrics.observe_audit("handshake", {"decision": "deny", "reason": reason, "status": 401})
    counted = {k: v for k, v in samples(metrics, "tunnel_auth_failures_total").items() if v}
    assert counted == {(("reason", label),): 1.0}


def test_label_values_stay_bounded_whatever_the_reasons_say() -> None:
    metrics = Metrics(FakeRelay())
    raw = [f"bad issuer https://idp-{i}.example.com/ for user:u{i}@example.com" for i in range(500)]
    for status, reason in enumerate(raw, start=1000):
        metrics.observe_audit("handshake", {"decision": "deny", "reason": reason, "status": 401})
        metrics.observe_audit("handshake", {"decision": "deny", "reason": reason, "status": status})
        metrics.observe_audit("decision", {"decision": "deny", "reason": reason})
        metrics.observe_audit("decision", {"decision": "allow", "result": reason})
        metrics.observe_audit("resume", {"decision": "deny", "reason": reason})
        metrics.observe_audit("resume", {"decision": reason, "reason": reason})
    for name, allowed in (
        ("tunnel_auth_failures_total", AUTH_FAILURE_REASONS),
        ("tunnel_opened_total", OPEN_RESULTS),
        ("tunnel_resumes_total", RESUME_RESULTS),
    ):
        label_sets = samples(metrics, name)
        assert {value for key in label_sets for _, value in key} == set(allowed)
    assert value(metrics, "tunnel_auth_failures_total", reason="other") == 500
    exposition = b"".join(
        s.name.encode() + repr(s.labels).encode()
        for family in metrics.registry.collect()
        for s in family.samples
    )
    assert b"example.com" not in exposition


def test_other_events_are_ignored() -> None:
    metrics = Metrics(FakeRelay())
    before = [(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples
              if s.name.startswith("tunnel_") and not s.name.endswith("_created")]  # fmt: skip
    for event in ("reauth", "revoke", "admin", "tunnel_closed", "drain", "http", "limit_warning"):
        metrics.observe_audit(event, {"decision": "deny", "reason": "expired", "status": 401})
    after = [(s.name, s.labels, s.value) for f in metrics.registry.collect() for s in f.samples
             if s.name.startswith("tunnel_") and not s.name.endswith("_created")]  # fmt: skip
    assert after == before


def test_audit_log_observers_see_each_record_after_its_line() -> None:
    lines: list[str] = []
    seen: list[tuple[str, dict[str, Any], int]] = []

    def observer(event: str, fields: Mapping[str, Any]) -> None:
        seen.append((event, dict(fields), len(lines)))

    audit = AuditLog("node-1", sink=lines.append, clock=lambda: 1.0, observers=[observer])
    audit.record("decision", decision="allow", principal="user:a@example.com")
    later: list[str] = []
    audit.observers.append(lambda event, fields: later.append(event))
    audit.record("resume", decision="deny", reason="sid unknown")
    assert seen == [
        ("decision", {"decision": "allow", "principal": "user:a@example.com"}, 1),
        ("resume", {"decision": "deny", "reason": "sid unknown"}, 2),
    ]
    assert later == ["resume"]
    assert json.loads(lines[0]) == {
        "time": 1.0,
        "event": "decision",
        "node": "node-1",
        "decision": "allow",
        "principal": "user:a@example.com",
    }


def test_a_failing_observer_is_logged_and_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    lines: list[str] = []
    after: list[str] = []

    def broken(event: str, fields: Mapping[str, Any]) -> None:
        raise RuntimeError("metrics bug")

    audit = AuditLog("n", sink=lines.append, observers=[broken, lambda e, f: after.append(e)])
    with caplog.at_level(logging.ERROR, logger="tunnel_server.audit"):
        audit.record("decision", decision="allow")
    assert len(lines) == 1
    assert after == ["decision"]
    assert "audit observer" in caplog.text
    assert "metrics bug" in caplog.text


def test_audit_log_feeds_metrics() -> None:
    metrics = Metrics(FakeRelay())
    audit = AuditLog("n", sink=lambda line: None, observers=[metrics.observe_audit])
    audit.record("handshake", decision="deny", reason="revoked", source_ip="::1", status=401)
    audit.record("decision", decision="allow", reason="ok", tunnel_id="t")
    assert value(metrics, "tunnel_auth_failures_total", reason="revoked") == 1
    assert value(metrics, "tunnel_opened_total", result="unauthenticated") == 1
    assert value(metrics, "tunnel_opened_total", result="allowed") == 1


# -- direct calls ---------------------------------------------------------------------------------


def test_decision_latency_buckets_resolve_tens_of_microseconds() -> None:
    metrics = Metrics(FakeRelay())
    metrics.observe_decision(70e-6)
    metrics.observe_decision(3e-3)
    bucket = "tunnel_decision_seconds_bucket"
    assert value(metrics, bucket, le="5e-05") == 0
    assert value(metrics, bucket, le="7.5e-05") == 1
    assert value(metrics, bucket, le="0.0025") == 1
    assert value(metrics, bucket, le="0.005") == 2
    assert value(metrics, "tunnel_decision_seconds_count") == 2


def test_revocations_by_origin() -> None:
    metrics = Metrics(FakeRelay())
    metrics.revocation_applied("local")
    metrics.revocation_applied("remote")
    metrics.revocation_applied("remote")
    assert value(metrics, "tunnel_revocations_applied_total", origin="local") == 1
    assert value(metrics, "tunnel_revocations_applied_total", origin="remote") == 2
    with pytest.raises(ValueError, match="origin"):
        metrics.revocation_applied("elsewhere")  # type: ignore[arg-type]


def test_state_store_up_is_asked_at_scrape_time() -> None:
    up = [True]
    metrics = Metrics(FakeRelay(), state_available=lambda: up[0])
    assert value(metrics, "tunnel_state_store_up") == 1
    up[0] = False
    assert value(metrics, "tunnel_state_store_up") == 0
    assert Metrics(FakeRelay()).registry.get_sample_value("tunnel_state_store_up") is None


def test_state_store_check_that_raises_reads_as_down(caplog: pytest.LogCaptureFixture) -> None:
    def check() -> bool:
        raise ConnectionError("redis gone")

    metrics = Metrics(FakeRelay(), state_available=check)
    with caplog.at_level(logging.ERROR, logger="tunnel_server.ops.metrics"):
        assert value(metrics, "tunnel_state_store_up") == 0
    assert "redis gone" in caplog.text


def test_build_info() -> None:
    labels = {k: v for k, v in samples(Metrics(FakeRelay()), "tunnel_build_info").popitem()[0]}
    assert labels["version"] == importlib.metadata.version("identity-tunnel")
    assert labels["python"].startswith("3.")


def test_each_metrics_has_its_own_registry() -> None:
    one, two = Metrics(FakeRelay()), Metrics(FakeRelay())
    one.observe_decision(1e-4)
    one.revocation_applied("local")
    assert value(one, "tunnel_decision_seconds_count") == 1
    assert value(two, "tunnel_decision_seconds_count") == 0
    assert value(two, "tunnel_revocations_applied_total", origin="local") == 0


# -- HTTP -----------------------------------------------------------------------------------------


async def test_scrape_over_http() -> None:
    relay = FakeRelay({"a": session("iap", attached=True, received=11, sent=22)})
    metrics = Metrics(relay, state_available=lambda: True)
    metrics.observe_audit("handshake", {"decision": "deny", "reason": "expired", "status": 401})
    metrics.observe_audit("decision", {"decision": "allow", "tunnel_id": "a"})
    other = Metrics(FakeRelay())  # a second relay in the same process
    async with (
        serving(metrics, "127.0.0.1", 0) as port,
        serving(other, "127.0.0.1", 0) as other_port,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        async with client.get(f"http://127.0.0.1:{other_port}/metrics") as response:
            other_text = await response.text()
        async with client.get(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        ) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")
        async with client.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
            assert await response.text() == "ok\n"
        async with client.get(f"http://127.0.0.1:{port}/other") as response:
            assert response.status == 404

    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert scraped[("tunnel_bytes_total", (("direction", "from_client"),))] == 11
    assert scraped[("tunnel_bytes_total", (("direction", "to_client"),))] == 22
    assert scraped[("tunnel_active", (("dialect", "iap"), ("state", "attached")))] == 1
    assert scraped[("tunnel_opened_total", (("result", "allowed"),))] == 1
    assert scraped[("tunnel_opened_total", (("result", "unauthenticated"),))] == 1
    assert scraped[("tunnel_auth_failures_total", (("reason", "expired"),))] == 1
    assert scraped[("tunnel_state_store_up", ())] == 1
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "tunnel_bytes",
        "tunnel_active",
        "tunnel_opened",
        "tunnel_auth_failures",
        "tunnel_resumes",
        "tunnel_revocations_applied",
        "tunnel_decision_seconds",
        "tunnel_session_duration_seconds",
        "tunnel_build_info",
        "tunnel_state_store_up",
    } <= names
    other_scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(other_text)
        for s in family.samples
    }
    assert other_scraped[("tunnel_opened_total", (("result", "allowed"),))] == 0
    assert other_scraped[("tunnel_bytes_total", (("direction", "from_client"),))] == 0


async def test_serving_releases_its_port() -> None:
    metrics = Metrics(FakeRelay())
    async with serving(metrics, "127.0.0.1", 0) as port:
        pass
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.get(f"http://127.0.0.1:{port}/metrics")
