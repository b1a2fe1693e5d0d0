"""Tables in docs/ that tests generate from what they observed (docs/troubleshooting.md: the
client's and the server's error tables). A table lives between two HTML comment markers; the
test renders it and fails when the file differs, or rewrites the section when
TUNNEL_UPDATE_DOCS=1 is set."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

UPDATE = "TUNNEL_UPDATE_DOCS"


def cell(text: str, skip: Sequence[str] = ()) -> str:
    """Several lines of output as one Markdown cell: blank lines and ``skip`` lines left out,
    the rest joined with <br>, pipes escaped."""
    lines = [line for line in text.strip().splitlines() if line and line not in skip]
    return "<br>".join(line.replace("|", "\\|") for line in lines)


def render(begin: str, end: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The section between (and including) the markers: a table with ``header``."""
    out = [begin, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([*out, "", end])


def check_or_update(doc: Path, begin: str, end: str, table: str, test: str) -> None:
    """Fail when ``doc``'s section between ``begin`` and ``end`` is not ``table``; with
    TUNNEL_UPDATE_DOCS=1, write it instead. ``test``: the test file to name in the message."""
    current = doc.read_text(encoding="utf-8")
    start, stop = current.index(begin), current.index(end) + len(end)
    updated = current[:start] + table + current[stop:]
    if updated == current:
        return
    if os.environ.get(UPDATE) == "1":
        doc.write_text(updated, encoding="utf-8")
    else:
        name = doc.relative_to(doc.parents[1]) if len(doc.parents) > 1 else doc
        pytest.fail(f"{name} is stale: run {UPDATE}=1 .venv/bin/pytest {test}")
