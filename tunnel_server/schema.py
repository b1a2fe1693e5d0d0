"""What every config-shaped input of the relay shares (the config file, the policy file): the
strict pydantic base model, YAML reading, errors that name file, key and reason, and the name,
port and member formats."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
_MEMBER = re.compile(r"^(user|group|serviceAccount|domain|subject):\S+$|^allAuthenticatedUsers$")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """A configuration or policy file is unreadable or invalid; the message names file, key and
    reason."""


class StrictModel(BaseModel):
    """Unknown keys are errors (typos fail loudly); values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_members(members: Iterable[str], *, hint: str) -> None:
    """ValueError for the first member that is not ``user:EMAIL``, ``group:NAME``, ... ."""
    for member in members:
        if not _MEMBER.match(member):
            raise ValueError(f"member {member!r} must look like {hint}")


def format_location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def read_yaml(path: Path) -> Any:
    """Parse a YAML file (safe loader); ConfigError names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
