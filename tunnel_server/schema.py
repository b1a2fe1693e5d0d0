"""What every config-shaped input of the relay shares (the config file, the policy file): the
strict pydantic base model, YAML reading, errors that name file, key and reason, and the name,
port and member formats."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def validation_errors(
    exc: ValidationError,
    source: str,
    model: type[BaseModel],
    rename: Callable[[tuple[int | str, ...]], tuple[int | str, ...]] = lambda loc: loc,
) -> str:
    """One line per problem, in the user's terms: the key path as written in the file
    (``rename`` maps shorthands back), a plain sentence, and a suggestion for a mistyped key."""
    lines = []
    schema = model.model_json_schema()
    for error in exc.errors():
        loc = tuple(part for part in error["loc"] if not _internal(part))
        shown = rename(loc)
        if error["type"] == "missing":
            message = "is required"
        elif error["type"] == "extra_forbidden":
            message = "unknown key"
            guess = difflib.get_close_matches(str(loc[-1]), _known_keys(schema, loc[:-1]), n=1)
            if guess:
                message += f"; did you mean {guess[0]!r}?"
        else:
            message = re.sub(r"^(Value|Assertion) error, ", "", error["msg"])
        lines.append(f"{source}: {format_location(shown)}: {message}")
    return "\n".join(lines)


def _internal(part: int | str) -> bool:
    """pydantic's own steps in an error location (validators, union members)."""
    return isinstance(part, str) and (
        part in ("function-after", "function-before", "function-wrap") or "[" in part
    )


def _known_keys(schema: dict[str, Any], loc: tuple[int | str, ...]) -> list[str]:
    """The keys a JSON schema (pydantic's) allows at ``loc``, for "did you mean"."""
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while True:
            if "$ref" in node:
                node = defs.get(node["$ref"].rsplit("/", 1)[-1], {})
            elif "anyOf" in node:
                objects = [n for n in node["anyOf"] if "$ref" in n or "properties" in n]
                node = objects[0] if objects else {}
            else:
                return node

    node = resolve(schema)
    for part in loc:
        if isinstance(part, int):
            node = resolve(node.get("items", {}))
        else:
            properties = node.get("properties", {})
            node = resolve(properties.get(part, node.get("additionalProperties") or {}))
    return list(node.get("properties", {}))


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
