"""The console's certificates page: the SSH certificates the relay issued (the audit store's
``ssh_certificate`` records, newest first, by user and time range), each with its status now:
valid, expired, or revoked (its user was revoked after it was issued, so it is in the KRL)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from ..audit_store import AuditPage
from .pages import e
from .views import RANGES, iso

EVENT = "ssh_certificate"
Status = Callable[[str, float, float], str]  # (principal, issued at, valid before) -> status
COLUMNS = ("Issued (UTC)", "User", "Logins", "Target", "Valid until (UTC)", "Status", "Serial",
           "Key", "Reference", "Client")  # fmt: skip


def page(
    params: Mapping[str, str],
    found: AuditPage | None,
    status: Status | None,
    error: str | None,
) -> str:
    """The filter form, then the certificates of ``found`` (None: nothing searched)."""
    body = _form(params)
    if status is None:
        return body + (
            "<p id='error'>This relay issues no SSH certificates (ssh: in the config; "
            "docs/ssh-certificates.md).</p>"
        )
    if error:
        return body + f"<p class='error' id='error'>{e(error)}</p>"
    if found is None:
        return body
    rows = "".join(_row(r.record, status) for r in found.records)
    kept = {k: v for k, v in params.items() if k in ("user", "range") and v}
    more = ""
    if found.next is not None:
        query = urlencode({**kept, "before": found.next.encode()})
        more = f"<a href='/console/certificates?{e(query)}' id='next-page'>Older →</a>"
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    empty = f"<tr><td colspan={len(COLUMNS)}>No certificates match.</td></tr>"
    return (
        body
        + f"<table class='grid' id='certificates'><thead><tr>{head}</tr></thead>"
        + f"<tbody>{rows or empty}</tbody></table><p class='pages'>{more}</p>"
    )


def _form(params: Mapping[str, str]) -> str:
    user = params.get("user", "")
    chosen = params.get("range", "")
    options = "".join(
        f"<option value='{e(name)}'{' selected' if name == chosen else ''}>{e(name)}</option>"
        for name in ("", *RANGES)
    )
    return (
        "<form method='get' action='/console/certificates' class='filters'>"
        f"<label>User <input name='user' value='{e(user)}' maxlength='300'></label>"
        f"<label>Issued in the last <select name='range'>{options}</select></label>"
        "<button type='submit'>Search</button></form>"
    )


def _row(record: Mapping[str, Any], status: Status) -> str:
    issued = _number(record.get("time"))
    until = _number(record.get("valid_before"))
    principal = str(record.get("principal") or "")
    state = status(principal, issued, until) if issued and until else "unknown"
    logins = record.get("principals")
    cells = [
        iso(issued) if issued else "", principal,
        ", ".join(str(x) for x in logins) if isinstance(logins, list) else "",
        record.get("resource"), iso(until) if until else "", state, record.get("serial"),
        record.get("key_fingerprint"), record.get("reference"), record.get("source_ip"),
    ]  # fmt: skip
    return f"<tr class='cert-{e(state)}'>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
