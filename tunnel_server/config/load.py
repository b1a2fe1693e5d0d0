"""Loading the relay's configuration: YAML (safe loader), environment overrides, validation,
and errors that name file, key and reason; relative paths are resolved against the file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..schema import ConfigError, format_location, read_yaml
from .base import TlsConfig
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
        lines = [f"{source}: {format_location(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    return config if base_dir is None else _resolve_paths(config, base_dir)


def _tls_paths(tls: TlsConfig, base_dir: Path) -> TlsConfig:
    return tls.model_copy(
        update={
            "cert_file": base_dir / tls.cert_file,
            "key_file": base_dir / tls.key_file,
            "device_ca": base_dir / tls.device_ca if tls.device_ca else None,
        }
    )


def _resolve_paths(config: ServerConfig, base_dir: Path) -> ServerConfig:
    """Relative file names in the config are relative to the config file's directory."""
    update: dict[str, Any] = {}
    if config.policy_file is not None:
        update["policy_file"] = base_dir / config.policy_file
    if config.tls is not None:
        update["tls"] = _tls_paths(config.tls, base_dir)
    if config.admin is not None and config.admin.tls is not None:
        tls = _tls_paths(config.admin.tls, base_dir)
        update["admin"] = config.admin.model_copy(update={"tls": tls})
    if config.audit_store is not None:
        store = config.audit_store
        update["audit_store"] = store.model_copy(update={"path": base_dir / store.path})
    if config.cluster is not None:
        cluster = config.cluster
        update["cluster"] = cluster.model_copy(
            update={
                "secret_file": base_dir / cluster.secret_file if cluster.secret_file else None,
                "ca_file": base_dir / cluster.ca_file if cluster.ca_file else None,
            }
        )
    return config.model_copy(update=update)


def load_config(path: Path) -> ServerConfig:
    """Read and validate a YAML file; relative paths are relative to the file."""
    return parse_config(read_yaml(path), source=str(path), base_dir=path.parent)
