"""The console's HTML, rendered on the server. Every value that comes from outside the relay's
code (emails, principals, instance names, hosts, reasons, user agents, whole audit records) goes
through ``e`` (HTML escaping, quotes included) and is shown as text; there is no inline script
and no inline style (the Content-Security-Policy forbids both); charts are inline SVG drawn with
presentation attributes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from ..access.policy import Binding, Explanation, Policy
from ..audit_store import Activity, AuditPage
from .cluster import ClusterSnapshot, NodeRow, TunnelRow
from .views import FILTERS, OUTCOMES, RANGES, ExplainForm, iso

NAV = (("overview", "/console/", "Overview"), ("tunnels", "/console/tunnels", "Live tunnels"),
       ("audit", "/console/audit", "Audit"), ("certificates", "/console/certificates",
       "SSH certificates"), ("policy", "/console/policy", "Policy"))  # fmt: skip
TUNNEL_COLUMNS = (
    ("principal", "User"), ("target", "Target"), ("port", "Port"), ("client", "Client"),
    ("node", "Node"), ("dialect", "Dialect"), ("bytes", "Bytes in / out"),
    ("duration", "Duration"), ("state", "State"),
)  # fmt: skip


def e(value: object) -> str:
    """HTML-escape anything (None shows as an empty string)."""
    return "" if value is None else escape(str(value), quote=True)


def layout(
    title: str,
    body: str,
    *,
    page: str = "",
    admin_email: str | None = None,
    csrf: str = "",
    poll_ms: int = 0,
) -> str:
    nav = "".join(
        f"<a href='{href}'{' aria-current=page' if key == page else ''}>{e(label)}</a>"
        for key, href, label in NAV
    )
    who = ""
    if admin_email is not None:
        who = (
            f"<span class='who' id='who'>{e(admin_email)}</span>"
            "<form method='post' action='/console/sign_out' class='inline'>"
            f"<input type='hidden' name='csrf' value='{e(csrf)}'>"
            "<button type='submit' id='sign-out'>Sign out</button></form>"
        )
    header = f"<header><strong>identity-tunnel</strong><nav>{nav}</nav>{who}</header>" * bool(
        admin_email
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{e(title)} · identity-tunnel console</title>"
        "<meta name='viewport' content='width=device-width'>"
        "<link rel='stylesheet' href='/console/static/console.css'>"
        "<script src='/console/static/console.js' defer></script></head>"
        f"<body data-page='{e(page)}' data-poll='{poll_ms}' data-csrf='{e(csrf)}'>{header}"
        f"<main><h1>{e(title)}</h1>{body}</main></body></html>"
    )


def message(
    title: str,
    text: str,
    link: tuple[str, str] | None = None,
    *,
    hint: str | None = None,
    reference: str | None = None,
) -> str:
    """A page with one message; a failed sign-in adds what to do and its reference."""
    more = f"<p id='todo'>{e(hint)}</p>" if hint else ""
    if reference:
        more += f"<p>Reference: <code id='reference'>{e(reference)}</code></p>"
    more += f"<p><a href='{e(link[0])}'>{e(link[1])}</a></p>" if link else ""
    return layout(title, f"<p id='message'>{e(text)}</p>{more}")


# -- charts ---------------------------------------------------------------------------------------


def bar_chart(chart_id: str, title: str, values: Sequence[int], start: float, width: float) -> str:
    """Bars per bucket over the last hour, with the maximum and the time axis labelled."""
    w, h, pad = 600, 120, 24
    top = max(values, default=0) or 1
    step = (w - 2 * pad) / max(1, len(values))
    bars = []
    for n, value in enumerate(values):
        height = (h - 2 * pad) * value / top
        x, y = pad + n * step, h - pad - height
        bars.append(
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(1.0, step - 1):.1f}' "
            f"height='{height:.1f}' fill='#3b6ea5'><title>{e(iso(start + n * width))}: "
            f"{value}</title></rect>"
        )
    return _svg(chart_id, title, sum(values), top, "".join(bars), start, w, h, pad)


def line_chart(chart_id: str, title: str, samples: Sequence[tuple[float, int]], now: float) -> str:
    """Open tunnels sampled over the last hour; the latest value is drawn on to "now"."""
    w, h, pad = 600, 120, 24
    start = now - 3600
    recent = [(t, v) for t, v in samples if t >= start]
    if recent:
        recent.append((now, recent[-1][1]))
    top = max((v for _, v in recent), default=0) or 1

    def xy(t: float, v: int) -> tuple[str, str]:
        x = pad + (w - 2 * pad) * (t - start) / 3600
        return f"{x:.1f}", f"{h - pad - (h - 2 * pad) * v / top:.1f}"

    points = " ".join(",".join(xy(t, v)) for t, v in recent)
    line = f"<polyline points='{points}' fill='none' stroke='#3b6ea5' stroke-width='2'/>"
    dots = "".join(
        "<circle cx='{}' cy='{}' r='2.5' fill='#3b6ea5'>".format(*xy(t, v))
        + f"<title>{e(iso(t))}: {v}</title></circle>"
        for t, v in recent[:-1]
    )
    latest = recent[-1][1] if recent else 0
    return _svg(chart_id, title, latest, top, line + dots, start, w, h, pad)


def _svg(
    chart_id: str, title: str, headline: int, top: int, marks: str, start: float,
    w: int, h: int, pad: int,
) -> str:  # fmt: skip
    axis = (
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#888'/>"
        f"<text x='{pad}' y='{h - 6}' font-size='10' fill='#555'>{e(iso(start)[11:16])}</text>"
        f"<text x='{w - pad}' y='{h - 6}' font-size='10' fill='#555' text-anchor='end'>now</text>"
        f"<text x='{pad}' y='14' font-size='10' fill='#555'>max {top}</text>"
    )
    return (
        f"<figure class='chart' id='{e(chart_id)}'><figcaption>{e(title)}: "
        f"<b>{headline}</b></figcaption><svg viewBox='0 0 {w} {h}' role='img' "
        f"aria-label='{e(title)}' xmlns='http://www.w3.org/2000/svg'>{axis}{marks}</svg></figure>"
    )


# -- overview -------------------------------------------------------------------------------------


def overview_fragments(
    snapshot: ClusterSnapshot,
    activity: Activity,
    samples: Sequence[tuple[float, int]],
    now: float,
    activity_source: str,
) -> dict[str, str]:
    """The overview's live parts by element id (the page and its JSON updates share them)."""
    alive = sum(1 for n in snapshot.nodes if n.alive)
    scope = "the cluster" if snapshot.scope == "cluster" else "this node"
    summary = (
        f"<div class='cards'><div class='card'><span>Open tunnels ({e(scope)})</span>"
        f"<b id='open-count'>{len(snapshot.tunnels)}</b></div>"
        f"<div class='card'><span>Nodes alive</span><b>{alive} / {len(snapshot.nodes)}</b></div>"
        f"<div class='card'><span>Tunnels opened, last hour</span><b>{sum(activity.opened)}</b>"
        f"</div><div class='card'><span>Denials, last hour</span><b>{sum(activity.denied)}</b>"
        "</div></div>" + _note(snapshot.note)
    )
    charts = (
        line_chart("chart-open", "Open tunnels (sampled on this node)", samples, now)
        + bar_chart("chart-opened", f"New tunnels per minute ({activity_source})",
                    activity.opened, activity.start, activity.width)
        + bar_chart("chart-denied", f"Denials per minute ({activity_source})",
                    activity.denied, activity.start, activity.width)
    )  # fmt: skip
    return {"summary": summary, "charts": charts, "nodes": nodes_table(snapshot.nodes)}


def _note(note: str | None) -> str:
    return f"<p class='note' id='scope-note'>{e(note)}</p>" if note else ""


def nodes_table(nodes: Iterable[NodeRow]) -> str:
    rows = []
    for n in nodes:
        audit = n.audit or {}
        store = "—"
        if audit:
            state = "up" if audit.get("up") else "DOWN"
            store = f"{audit.get('backend')} {state}, {audit.get('dropped', 0)} dropped"
        health = "alive" if n.alive else "lease expired"
        if n.draining:
            health += ", draining"
        if n.state_up is False:
            health += ", shared state DOWN"
        rows.append(
            f"<tr><td>{e(n.node)}{' (this node)' if n.this else ''}</td><td>{e(n.url)}</td>"
            f"<td>{e(health)}</td><td class='num'>{n.tunnels}</td><td>{e(store)}</td>"
            f"<td>{e(iso(n.seen))}</td></tr>"
        )
    return (
        "<table class='grid'><thead><tr><th>Node</th><th>URL</th><th>Health</th>"
        "<th>Tunnels</th><th>Audit store</th><th>Seen</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def overview(fragments: Mapping[str, str]) -> str:
    return (
        f"<section id='summary' data-live='summary'>{fragments['summary']}</section>"
        f"<section id='charts' data-live='charts'>{fragments['charts']}</section>"
        f"<h2>Nodes</h2><section id='nodes' data-live='nodes'>{fragments['nodes']}</section>"
        "<p class='status' id='status'></p>"
    )


# -- live tunnels ---------------------------------------------------------------------------------


def human_bytes(count: int | None) -> str:
    if count is None:
        return "—"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)  # pragma: no cover - the loop always returns


def duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def revoke_form(kind: str, subject: str, csrf: str, label: str) -> str:
    return (
        "<form method='post' action='/console/revoke' class='inline revoke'>"
        f"<input type='hidden' name='csrf' value='{e(csrf)}'>"
        f"<input type='hidden' name='kind' value='{e(kind)}'>"
        f"<input type='hidden' name='subject' value='{e(subject)}'>"
        f"<button type='submit'>{e(label)}</button></form>"
    )


def tunnel_row(row: TunnelRow, csrf: str) -> str:
    cells = [
        row.principal, row.target or "—", row.port or "—", row.client or "—", row.node,
        row.dialect,
        f"{human_bytes(row.bytes_from_client)} / {human_bytes(row.bytes_to_client)}",
        duration(row.duration), row.state or "—",
    ]  # fmt: skip
    actions = revoke_form("session", row.sid, csrf, "Revoke session") + revoke_form(
        "user", row.principal, csrf, "Revoke user"
    )
    return (
        f"<tr data-sid='{e(row.sid)}'>"
        + "".join(f"<td>{e(c)}</td>" for c in cells)
        + f"<td>{actions}</td></tr>"
    )


def tunnels(snapshot: ClusterSnapshot, csrf: str, flash: str | None) -> str:
    heads = "".join(
        f"<th><button type='button' class='sort' data-sort='{key}'>{e(label)}</button></th>"
        for key, label in TUNNEL_COLUMNS
    )
    scope = (
        "Every node of the cluster (from the shared state)."
        if snapshot.scope == "cluster"
        else "This node's tunnels (no shared state, or it cannot be read)."
    )
    rows = "".join(tunnel_row(r, csrf) for r in snapshot.tunnels)
    return (
        (f"<p class='flash' id='flash'>{e(flash)}</p>" if flash else "")
        + f"<p id='scope'>{e(scope)}</p>{_note(snapshot.note)}"
        + "<p><label>Filter <input id='filter' type='search' placeholder='user, target, client,"
        " node…' autocomplete='off'></label> <span id='shown'>"
        + f"{len(snapshot.tunnels)} tunnels</span></p>"
        + f"<table class='grid' id='tunnels'><thead><tr>{heads}<th>Actions</th></tr></thead>"
        + f"<tbody>{rows}</tbody></table><p class='status' id='status'></p>"
    )


# -- audit ----------------------------------------------------------------------------------------


def audit_form(params: Mapping[str, str]) -> str:
    def text(name: str, label: str, hint: str) -> str:
        return (
            f"<label>{e(label)} <input name='{name}' value='{e(params.get(name, ''))}' "
            f"placeholder='{e(hint)}'></label>"
        )

    def select(name: str, label: str, options: Iterable[str]) -> str:
        chosen = params.get(name, "")
        opts = "".join(
            f"<option value='{e(o)}'{' selected' if o == chosen else ''}>{e(o or 'any')}</option>"
            for o in ("", *options)
        )
        return f"<label>{e(label)} <select name='{name}'>{opts}</select></label>"

    return (
        "<form method='get' action='/console/audit' class='filters' id='audit-form'>"
        + text("user", "User", "alice@example.com")
        + text("target", "Target", "instance:p/z/vm")
        + select("outcome", "Outcome", OUTCOMES)
        + text("event", "Event", "decision")
        + text("node", "Node", "")
        + text("tunnel", "Tunnel id", "")
        + select("range", "Last", RANGES)
        + text("since", "Since (UTC)", "2026-12-02T07:00")
        + text("until", "Until (UTC)", "")
        + "<button type='submit' id='search'>Search</button></form>"
    )


def audit(params: Mapping[str, str], page: AuditPage | None, error: str | None) -> str:
    kept = {k: v for k, v in params.items() if k in (*FILTERS, "range", "since", "until") and v}
    body = audit_form(params)
    if error:
        return body + f"<p class='error' id='error'>{e(error)}</p>"
    if page is None:
        return body
    exports = " ".join(
        f"<a href='/console/audit/export?{e(urlencode({**kept, 'format': f}))}' "
        f"id='export-{f}'>Export {label}</a>"
        for f, label in (("csv", "CSV"), ("jsonl", "JSON lines"))
    )
    rows = "".join(_audit_row(r.record) for r in page.records)
    more = ""
    if page.next is not None:
        query = urlencode({**kept, "before": page.next.encode()})
        more = f"<a href='/console/audit?{e(query)}' id='next-page'>Older records →</a>"
    newest = (
        f"<a href='/console/audit?{e(urlencode(kept))}'>Newest</a>" if "before" in params else ""
    )
    return (
        body
        + f"<p class='exports'>{exports}</p>"
        + "<table class='grid' id='audit'><thead><tr><th>Time (UTC)</th><th>Event</th>"
        "<th>Outcome</th><th>User</th><th>Target</th><th>Port</th><th>Client</th><th>Node</th>"
        "<th>Reason</th><th>Record</th></tr></thead>"
        + f"<tbody>{rows or '<tr><td colspan=10>No records match.</td></tr>'}</tbody></table>"
        + f"<p class='pages'>{newest} {more}</p>"
    )


def _audit_row(record: Mapping[str, Any]) -> str:
    when = record.get("time")
    outcome = record.get("decision") or ""
    target = record.get("resource") or (f"app:{record['app']}" if record.get("app") else "")
    cells = [
        iso(float(when)) if isinstance(when, int | float) else "", record.get("event"), outcome,
        record.get("principal"), target, record.get("port"), record.get("source_ip"),
        record.get("node"), record.get("reason") or record.get("close_reason"),
    ]  # fmt: skip
    whole = json.dumps(record, sort_keys=True, ensure_ascii=False)
    return (
        "<tr>"
        + "".join(f"<td>{e(c)}</td>" for c in cells)
        + f"<td><details><summary>JSON</summary><pre>{e(whole)}</pre></details></td></tr>"
    )


# -- policy ---------------------------------------------------------------------------------------


def _binding_row(binding: Binding, effect: str) -> str:
    ports = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in binding.ports) or "all"
    condition = binding.condition.expression if binding.condition is not None else ""
    cells = [
        binding.name, effect, ", ".join(sorted(binding.members)),
        ", ".join(sorted(binding.except_members)), ", ".join(sorted(binding.roles)),
        binding.resources.describe(), ports, ", ".join(binding.access_levels), condition,
    ]  # fmt: skip
    return "<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"


def policy(
    current: Policy,
    csrf: str,
    form: ExplainForm,
    result: Explanation | None,
    error: str | None,
) -> str:
    rows = [_binding_row(b, "deny") for b in current.deny]
    rows += [_binding_row(b, "allow") for b in current.bindings]
    levels = "".join(f"<li>{e(name)}</li>" for name in current.access_levels) or "<li>none</li>"
    return (
        f"<p>Loaded from <code>{e(current.source)}</code>: {len(current.bindings)} bindings, "
        f"{len(current.deny)} deny rules, {len(current.access_levels)} access levels.</p>"
        "<h2>Explain a decision</h2>"
        + explain_form(form, csrf)
        + (f"<p class='error' id='error'>{e(error)}</p>" if error else "")
        + (explanation(result) if result is not None else "")
        + "<h2>Bindings</h2><table class='grid' id='bindings'><thead><tr><th>Name</th>"
        "<th>Effect</th><th>Members</th><th>Except</th><th>Roles</th><th>Resources</th>"
        "<th>Ports</th><th>Access levels</th><th>Condition</th></tr></thead><tbody>"
        + "".join(rows)
        + f"</tbody></table><h2>Access levels</h2><ul>{levels}</ul>"
    )


def explain_form(form: ExplainForm, csrf: str) -> str:
    def text(name: str, label: str, value: str, hint: str) -> str:
        return (
            f"<label>{e(label)} <input name='{name}' value='{e(value)}' placeholder='{e(hint)}'>"
            "</label>"
        )

    return (
        "<form method='post' action='/console/policy/explain' class='filters' id='explain'>"
        f"<input type='hidden' name='csrf' value='{e(csrf)}'>"
        + text("members", "Members", form.members, "user:bob@example.com group:dev")
        + text("target", "Target", form.target, "vm1, p/z/vm1 or group:p/r/n/g@host")
        + text("port", "Port", form.port, "22")
        + text("at", "Time (UTC)", form.at, "now")
        + text("source_ip", "Source IP", form.source_ip, "optional")
        + "<button type='submit' id='explain-submit'>Explain</button></form>"
    )


def explanation(result: Explanation) -> str:
    verdict = "ALLOW" if result.decision.allowed else "DENY"
    checks = "".join(
        f"<tr><td>{e(c.binding)}</td><td>{e(c.effect)}</td><td>{e(c.outcome)}</td>"
        f"<td>{e(c.detail)}</td></tr>"
        for c in result.checks
    )
    levels = "".join(
        f"<tr><td>{e(s.name)}</td><td>{e(s.state)}</td><td>{e(s.detail)}</td></tr>"
        for s in result.levels
    )
    reasons = "".join(f"<li>{e(r)}</li>" for r in result.decision.reasons)
    return (
        f"<section id='explanation'><p class='verdict {verdict.lower()}' id='verdict'>"
        f"{verdict}</p><ul id='reasons'>{reasons}</ul>"
        f"<p>Decided by: <b>{e(result.decided_by or 'no binding')}</b>"
        + (f" (access level {e(result.level)})" if result.level else "")
        + f" at {e(iso(result.now))}"
        + (f"; next change {e(iso(result.next_change))}" if result.next_change else "")
        + "</p><table class='grid'><thead><tr><th>Binding</th><th>Effect</th><th>Outcome</th>"
        f"<th>Detail</th></tr></thead><tbody>{checks}</tbody></table>"
        + (
            "<table class='grid'><thead><tr><th>Access level</th><th>State</th><th>Detail</th>"
            f"</tr></thead><tbody>{levels}</tbody></table>"
            if levels
            else ""
        )
        + "</section>"
    )
