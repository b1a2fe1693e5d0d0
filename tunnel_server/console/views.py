"""What the console's pages show, as data: the last hour's activity (open tunnels sampled over
time; tunnels opened and denials per minute, from the audit store or, without one, counted on
this node), the audit search form read into an ``AuditQuery``, and the policy explain form read
into an ``AccessRequest``. No HTML here (``pages``), no HTTP (``app``)."""

from __future__ import annotations

import collections
import datetime as dt
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..access.inventory import InventoryConfig
from ..access.policy import TUNNEL_USER, AccessRequest
from ..audit_store import Activity, AuditQuery, Cursor

HOUR = 3600.0
MINUTE = 60.0
SAMPLES = 120  # open-tunnel samples kept (one per SAMPLE_EVERY seconds: the last hour)
SAMPLE_EVERY = 30.0
RANGES = {"1h": HOUR, "24h": 24 * HOUR, "7d": 7 * 24 * HOUR, "30d": 30 * 24 * HOUR}
FILTERS = ("user", "target", "outcome", "event", "node", "tunnel")
OUTCOMES = ("allow", "deny", "forward", "closed", "revoked", "warning", "drain")


class FormError(ValueError):
    """A form field the console cannot use; the message names it."""


class Timeline:
    """This node's recent history: open-tunnel counts sampled over the last hour, and tunnels
    opened and denials per minute (an ``AuditLog`` observer: one dict update per record)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=SAMPLES)
        self._minutes: collections.OrderedDict[int, list[int]] = collections.OrderedDict()

    def sample(self, open_tunnels: int) -> None:
        now = self.clock()
        if self.samples and now - self.samples[-1][0] < SAMPLE_EVERY:
            self.samples[-1] = (self.samples[-1][0], open_tunnels)  # the latest value
            return
        self.samples.append((now, open_tunnels))

    def observe_audit(self, event: str, fields: Mapping[str, Any]) -> None:
        decision = fields.get("decision")
        opened = event == "decision" and decision == "allow" and fields.get("tunnel_id")
        if not opened and decision != "deny":
            return
        minute = int(self.clock() // MINUTE)
        counts = self._minutes.get(minute)
        if counts is None:
            counts = self._minutes[minute] = [0, 0]
            while len(self._minutes) > 61:
                self._minutes.popitem(last=False)
        counts[0 if opened else 1] += 1

    def activity(self, start: float, buckets: int) -> Activity:
        first = int(start // MINUTE)
        opened = [self._minutes.get(first + n, [0, 0])[0] for n in range(buckets)]
        denied = [self._minutes.get(first + n, [0, 0])[1] for n in range(buckets)]
        return Activity(first * MINUTE, MINUTE, opened, denied)


def hour_start(now: float) -> float:
    """The first minute of the 60 shown: the one 59 minutes before the current one."""
    return (math.floor(now / MINUTE) - 59) * MINUTE


def parse_time(text: str, field: str) -> float:
    """ISO 8601 (``2026-12-02T07:00``, UTC when it names no offset) or Unix seconds."""
    text = text.strip()
    try:
        return float(text) if text.replace(".", "", 1).isdigit() else _iso(text)
    except ValueError:
        raise FormError(f"{field}: not a time (use 2026-12-02T07:00 or Unix seconds)") from None


def _iso(text: str) -> float:
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def iso(instant: float | None) -> str:
    if instant is None or not math.isfinite(instant):
        return ""
    when = dt.datetime.fromtimestamp(instant, dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _principal(text: str) -> str:
    """``alice@example.com`` means ``user:alice@example.com``."""
    if ":" not in text and "@" in text:
        return f"user:{text.lower()}"
    return text


def audit_query(params: Mapping[str, str], now: float, limit: int = 50) -> AuditQuery:
    """The search form (GET parameters) as a query. FormError names a bad field."""
    values = {k: params.get(k, "").strip() for k in (*FILTERS, "range", "since", "until")}
    since = until = None
    if values["range"]:
        if values["range"] not in RANGES:
            raise FormError("range: choose one of " + ", ".join(RANGES))
        since = now - RANGES[values["range"]]
    if values["since"]:
        since = parse_time(values["since"], "since")
    if values["until"]:
        until = parse_time(values["until"], "until")
    before = None
    if params.get("before"):
        try:
            before = Cursor.decode(params["before"])
        except ValueError:
            raise FormError("before: not a page cursor") from None
    try:
        return AuditQuery(
            principal=_principal(values["user"]) if values["user"] else None,
            target=values["target"] or None,
            outcome=values["outcome"] or None,
            event=values["event"] or None,
            node=values["node"] or None,
            tunnel_id=values["tunnel"] or None,
            since=since,
            until=until,
            before=before,
            limit=limit,
        )
    except ValueError as exc:
        raise FormError(str(exc)) from None


@dataclass(frozen=True)
class ExplainForm:
    members: str = ""
    target: str = ""
    port: str = ""
    at: str = ""
    source_ip: str = ""


def explain_request(
    form: ExplainForm, inventory: InventoryConfig, now: float
) -> tuple[AccessRequest, float]:
    """The explain form as a policy request (role tunnelUser) and the time to decide at, as
    ``tunnel-server policy explain`` builds it. FormError names a bad field."""
    members = [m.strip() for m in form.members.replace(",", " ").split() if m.strip()]
    members = [_principal(m) for m in members]
    if not members or len(members) > 50 or any(len(m) > 320 for m in members):
        raise FormError("members: give 1 to 50 members (user:EMAIL, group:NAME, ...)")
    try:
        port = int(form.port)
    except ValueError:
        raise FormError("port: an integer from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise FormError("port: an integer from 1 to 65535")
    resource, host = _resource(form.target.strip(), inventory)
    at = parse_time(form.at, "time") if form.at.strip() else now
    principal = next((m for m in members if m.startswith(("user:", "serviceAccount:"))), None)
    request = AccessRequest(
        frozenset(members), resource, port, form.source_ip.strip() or None, principal=principal,
        role=TUNNEL_USER, destination_host=host, destination_ip=host,
    )  # fmt: skip
    return request, at


def _resource(target: str, inventory: InventoryConfig) -> tuple[str, str | None]:
    """``instance:P/Z/N``, ``P/Z/N``, an instance name unique in the inventory, or
    ``group:P/R/N/G`` (optionally ``@host``)."""
    if not target or len(target) > 300:
        raise FormError("target: an instance (name or project/zone/name) or group:...")
    if target.startswith("group:"):
        group, _, host = target.partition("@")
        return group, host or None
    key = target.removeprefix("instance:")
    if key.count("/") == 2:
        return f"instance:{key}", None
    keys = [i.key for i in inventory.instances if i.name == key]
    if len(keys) != 1:
        raise FormError(f"target: instance {key!r} is {'ambiguous' if keys else 'unknown'}")
    return f"instance:{keys[0]}", None
