"""Loading the relay's configuration: YAML (safe loader), environment overrides, validation,
and errors that name file, key and reason; relative paths are resolved against the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..schema import ConfigError, format_location, read_yaml
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
        lines = [f"{source}: {format_location(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    if config.policy_file is not None and base_dir is not None:
        config = config.model_copy(update={"policy_file": base_dir / config.policy_file})
    if config.tls is not None and base_dir is not None:
        tls = config.tls.model_copy(
            update={
                "cert_file": base_dir / config.tls.cert_file,
                "key_file": base_dir / config.tls.key_file,
                "device_ca": base_dir / config.tls.device_ca if config.tls.device_ca else None,
            }
        )
        config = config.model_copy(update={"tls": tls})
    if config.cluster is not None and base_dir is not None:
        cluster = config.cluster.model_copy(
            update={
                "secret_file": base_dir / config.cluster.secret_file
                if config.cluster.secret_file
                else None,
                "ca_file": base_dir / config.cluster.ca_file if config.cluster.ca_file else None,
            }
        )
        config = config.model_copy(update={"cluster": cluster})
    return config


def load_config(path: Path) -> ServerConfig:
    """Read and validate a YAML file; relative paths are relative to the file."""
    return parse_config(read_yaml(path), source=str(path), base_dir=path.parent)
