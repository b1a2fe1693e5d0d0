"""Loading the relay's configuration: YAML (safe loader), environment overrides, validation,
and errors that name file, key and reason; relative paths are resolved against the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ..schema import ConfigError, read_yaml, validation_errors
from .models import ServerConfig

# Values that may come from the environment instead of the file (secrets from a Kubernetes
# Secret or a systemd credential; per-node values): variable -> (section, key). A variable only
# completes a section the file has.
ENV_OVERRIDES = {
    "TUNNEL_REDIS_URL": ("state", "redis_url"),
    "TUNNEL_CLUSTER_SECRET": ("cluster", "secret"),
    # Per-node values on a shared config (a Kubernetes Deployment: the pod name and IP).
    "TUNNEL_NODE_ID": ("cluster", "node_id"),
    "TUNNEL_ADVERTISE_URL": ("cluster", "advertise_url"),
    "TUNNEL_AUDIT_DSN": ("audit_store", "dsn"),
}


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    data = dict(data)
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = env.get(variable)
        part = data.get(section)
        if not value or not isinstance(part, dict):  # only completes a section the file has
            continue
        part = dict(part)
        part[key] = value
        if key == "secret":
            part.pop("secret_file", None)  # the environment wins over the file
        data[section] = part
    return data


def parse_config(
    data: Any,
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerConfig:
    """Validate already-parsed YAML. Raises ConfigError listing every problem. ``env``
    (default: the process environment) supplies ENV_OVERRIDES."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = _apply_env(data, os.environ if env is None else env)
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as exc:
        shorthand = "oidc" in data

        def as_written(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
            # ``oidc: {...}`` is shorthand for ``issuers: [{...}]``: name the key the user wrote.
            if shorthand and loc[:2] == ("issuers", 0):
                return ("oidc", *loc[2:])
            return loc

        raise ConfigError(validation_errors(exc, source, ServerConfig, as_written)) from None
    if base_dir is not None:
        config = _rebased(config, base_dir)
    return config


def load_config(path: Path) -> ServerConfig:
    """Read and validate a YAML file; relative paths are relative to the file."""
    return parse_config(read_yaml(path), source=str(path), base_dir=path.parent)


M = TypeVar("M", bound=BaseModel)


def _rebased(model: M, base_dir: Path) -> M:
    """Every relative path anywhere in the config (TLS files of every listener, the policy
    file, the cluster's secret and CA) taken relative to the config file's directory, not to
    wherever the relay was started from."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = base_dir / value
        elif isinstance(value, BaseModel):
            rebased = _rebased(value, base_dir)
            if rebased is not value:
                update[name] = rebased
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            update[name] = [_rebased(v, base_dir) if isinstance(v, BaseModel) else v for v in value]
    return model.model_copy(update=update) if update else model
