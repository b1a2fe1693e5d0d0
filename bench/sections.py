"""Sections of the benchmark docs: each step of ``make bench`` replaces only its own part of a
shared Markdown file, between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, text: str, name: str) -> None:
    """Replace the section ``name`` of ``path`` (between its markers), or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}{end}\n"
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", lambda _: block, old,
                     flags=re.S)  # fmt: skip
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)
