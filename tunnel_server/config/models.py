"""The relay's YAML configuration: pydantic schema, loading, precise errors (file, key, reason)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
_MEMBER = re.compile(r"^(user|group|serviceAccount|domain|subject):\S+$|^allAuthenticatedUsers$")

Name = Annotated[str, Field(pattern=_NAME)]
Port = Annotated[int, Field(ge=1, le=65535)]


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message names file, key and reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)


class TlsConfig(_Model):
    """TLS for the relay listener. ``self_signed`` (development only) writes a new self-signed
    certificate for localhost/127.0.0.1/::1 to ``cert_file``/``key_file`` when they are missing."""

    cert_file: Path
    key_file: Path
    self_signed: bool = False
    # Optional mTLS: client (device) certificates verified against this CA become device.*
    # attributes for policy; with require_device_cert a client without one is refused.
    device_ca: Path | None = None
    require_device_cert: bool = False

    @model_validator(mode="after")
    def _device(self) -> TlsConfig:
        if self.require_device_cert and self.device_ca is None:
            raise ValueError("require_device_cert needs device_ca")
        return self


class IntrospectionConfig(_Model):
    """RFC 7662 introspection for opaque access tokens (the relay's own client credentials)."""

    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$")
    cache_ttl: float = Field(default=30.0, ge=0, le=300)


class OidcConfig(_Model):
    issuer: str = Field(pattern=r"^https?://\S+$")
    audiences: list[str] = Field(min_length=1)
    algorithms: list[str] | None = None
    leeway: float = Field(default=30.0, ge=0, le=60)
    max_token_lifetime: float = Field(default=24 * 3600, gt=0)
    jwks_ttl: float = Field(default=300.0, gt=0)
    groups_claim: str = "groups"
    introspection: IntrospectionConfig | None = None


class LoginConfig(_Model):
    """Published unauthenticated at /.well-known/tunnel-client so that
    ``tunnel-client login --server URL`` needs nothing else."""

    issuer: str = Field(pattern=r"^https?://\S+$")
    client_id: str = Field(min_length=1)
    scopes: list[str] = Field(
        default_factory=lambda: ["openid", "email", "profile", "groups", "offline_access"]
    )
    resource: str | None = None


class InstanceConfig(_Model):
    """An instance of the inventory: ``interfaces`` maps nic0.. to a private address."""

    project: Name
    zone: Name
    name: Name
    interfaces: dict[Name, str] = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _address_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "address" in data:
            data = dict(data)
            if "interfaces" in data:
                raise ValueError("give 'address' or 'interfaces', not both")
            data["interfaces"] = {"nic0": data.pop("address")}
        return data

    @property
    def key(self) -> str:
        return f"{self.project}/{self.zone}/{self.name}"


class DestinationGroupConfig(_Model):
    """A destination group: CIDRs and FQDNs reachable in one region/network."""

    project: Name
    region: Name
    network: Name = "default"
    name: Name
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    fqdns: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]{1,253}$")]] = Field(
        default_factory=list
    )

    @property
    def key(self) -> str:
        return f"{self.project}/{self.region}/{self.network}/{self.name}"


class InventoryConfig(_Model):
    instances: list[InstanceConfig] = Field(default_factory=list)
    destination_groups: list[DestinationGroupConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> InventoryConfig:
        for what, keys in (
            ("instance", [i.key for i in self.instances]),
            ("destination group", [g.key for g in self.destination_groups]),
        ):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    raise ValueError(f"duplicate {what} {key!r}")
                seen.add(key)
        return self


class PortRange(_Model):
    first: Port
    last: Port

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last


def _parse_ports(value: Any) -> Any:
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for item in value:
        if isinstance(item, str) and re.fullmatch(r"[0-9]{1,5}-[0-9]{1,5}", item):
            first, last = (int(p) for p in item.split("-"))
            if first > last:
                raise ValueError(f"port range {item!r} is reversed")
            out.append({"first": first, "last": last})
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append({"first": item, "last": item})
        elif isinstance(item, str) and re.fullmatch(r"[0-9]{1,5}", item):
            out.append({"first": int(item), "last": int(item)})
        else:
            raise ValueError(f"port {item!r} must be an integer or a range like '8000-8080'")
    return out


class AllowRule(_Model):
    """Grant ``members`` access to ``ports`` on the listed instances and destination groups.

    ``instances``: ``project/zone/name`` keys, or ``*``. ``destination_groups``:
    ``project/region/network/name`` keys, or ``*``. Unknown keys are errors (typos fail loudly).
    """

    members: list[str] = Field(min_length=1)
    instances: list[str] = Field(default_factory=list)
    destination_groups: list[str] = Field(default_factory=list)
    ports: list[PortRange] = Field(min_length=1)

    _check_ports = field_validator("ports", mode="before")(_parse_ports)

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        for member in members:
            if not _MEMBER.match(member):
                raise ValueError(
                    f"member {member!r} must look like user:EMAIL, group:NAME, "
                    "serviceAccount:ID, domain:NAME or allAuthenticatedUsers"
                )
        return members

    @model_validator(mode="after")
    def _some_resource(self) -> AllowRule:
        if not self.instances and not self.destination_groups:
            raise ValueError("a rule needs 'instances' or 'destination_groups'")
        return self


class TunnelSettings(_Model):
    resume_window: float = Field(default=60.0, ge=0, description="seconds a dropped tunnel waits")
    resume_buffer: int = Field(default=8 * 1024 * 1024, ge=1024 * 1024, le=1024 * 1024 * 1024)
    dial_timeout: float = Field(default=10.0, gt=0)
    handshake_timeout: float = Field(default=10.0, gt=0)
    keepalive_interval: float = Field(default=20.0, gt=0)
    keepalive_timeout: float = Field(default=20.0, gt=0)
    # Seconds without DATA or EOF in either direction before a tunnel is closed with 4101;
    # 0 = no idle timeout.
    idle_timeout: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Seconds from connect after which a tunnel is closed with 4102, however active; 0 = none.
    max_session_duration: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # Seconds before either limit closes a tunnel that a limit_warning audit record is written
    # (at most a tenth of the limit); 0 = no warning.
    limit_warning: float = Field(default=60.0, ge=0, allow_inf_nan=False)
    # Open tunnels (attached or parked) at which a connect is refused with 429 (the lower of
    # the two applies to each principal).
    max_tunnels_per_principal: int = Field(default=100, ge=1)
    max_tunnels: int = Field(default=10000, ge=1)
    # Seconds open tunnels keep running after SIGTERM before they are closed with 4100.
    drain_grace: float = Field(default=30.0, ge=0, allow_inf_nan=False)


class AdminConfig(_Model):
    """The admin listener (sessions list / revoke). Plain HTTP: keep it on a private address."""

    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=8444))
    members: list[str] = Field(min_length=1)

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        for member in members:
            if not _MEMBER.match(member):
                raise ValueError(f"member {member!r} must look like user:EMAIL, group:NAME, ...")
        return members


class StateConfig(_Model):
    """Where the state shared between relay nodes lives (docs/scale-out.md): ``memory`` (one
    node, the default) or ``redis`` (several nodes behind a load balancer)."""

    backend: Literal["memory", "redis"] = "memory"
    # redis:// or rediss:// URL, password included; the environment variable TUNNEL_REDIS_URL
    # overrides it (keep the password in a Secret, not in the config file).
    redis_url: str | None = None
    key_prefix: str = Field(default="tunnel:", pattern=r"^[A-Za-z0-9:._-]{0,64}$")
    # New tunnels while Redis is unreachable: refused (503, the default: caps and the resume
    # registry cannot be kept) or accepted with this node's local caps only.
    on_unavailable: Literal["deny", "allow"] = "deny"
    # Seconds a node's leases (its cap slots and resume registry entries) outlive its last
    # heartbeat: a node that dies frees its slots after this long.
    lease_ttl: float = Field(default=15.0, ge=1, le=3600, allow_inf_nan=False)
    # Seconds between full revocation resyncs (pub/sub pushes them at once; this catches what a
    # node missed while disconnected).
    resync_interval: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    # Seconds a revocation is kept: longer than any token the issuers accept.
    revocation_retention: float = Field(default=86400.0, ge=60, allow_inf_nan=False)
    # Seconds each Redis command may take before the store counts as unavailable.
    timeout: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)

    @model_validator(mode="after")
    def _url(self) -> StateConfig:
        if self.backend == "redis":
            if not self.redis_url:
                raise ValueError("backend 'redis' needs redis_url (or TUNNEL_REDIS_URL)")
            if not re.match(r"^rediss?://", self.redis_url):
                raise ValueError("redis_url must start with redis:// or rediss://")
        return self


class ClusterConfig(_Model):
    """This node among several: how the others reach it to forward a resume it owns."""

    # Unique per node; the default is the host name (a pod's name on Kubernetes).
    node_id: str | None = Field(default=None, pattern=_NAME)
    # The relay listener's URL as other nodes reach it (ws:// or wss://, e.g. the pod IP).
    advertise_url: str = Field(pattern=r"^wss?://[^/?#\s]+$")
    # Shared key authenticating node-to-node forwards (at least 32 bytes); the environment
    # variable TUNNEL_CLUSTER_SECRET overrides it, or name a file holding it.
    secret: str | None = Field(default=None, min_length=32)
    secret_file: Path | None = None
    # CA bundle to verify other nodes' certificates (wss advertise URLs); default: system CAs.
    ca_file: Path | None = None
    # The name other nodes' certificates are checked against, when the advertise URL names the
    # node by address (a pod IP) and every node serves the certificate of the public name.
    # Default: the advertise URL's host.
    server_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.*-]{1,253}$")

    @model_validator(mode="after")
    def _secret(self) -> ClusterConfig:
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret, secret_file (or TUNNEL_CLUSTER_SECRET)")
        return self

    def secret_bytes(self) -> bytes:
        """The shared key; ConfigError when the file is unreadable or too short."""
        if self.secret is not None:
            return self.secret.encode()
        assert self.secret_file is not None
        try:
            data = self.secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cluster.secret_file: cannot read: {exc.strerror}") from None
        if len(data) < 32:
            raise ConfigError("cluster.secret_file: the secret must be at least 32 bytes")
        return data


class MetricsConfig(_Model):
    """Prometheus metrics (text exposition at /metrics) on their own listener."""

    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=9464))


class ServerConfig(_Model):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    tls: TlsConfig | None = None
    issuers: list[OidcConfig] = Field(min_length=1)
    login: LoginConfig | None = None
    inventory: InventoryConfig = Field(default_factory=InventoryConfig)
    access: list[AllowRule] = Field(default_factory=list)
    tunnel: TunnelSettings = Field(default_factory=TunnelSettings)
    admin: AdminConfig | None = None
    # IAM-style policy file (bindings, deny, access levels, CEL conditions): docs/policy.md.
    # The inline `access` allow-list still applies and is merged into it.
    policy_file: Path | None = None
    log_format: Literal["json", "text"] = "json"
    # HTTP mode (identity-aware reverse proxy for web apps): docs/http-mode.md.
    http: HttpModeConfig | None = None
    # Peers whose X-Forwarded-For the relay listener believes (a TLS-terminating load balancer
    # in front): the client address policy and audit records see is then the first untrusted
    # hop from the right. Empty (default): the TCP peer's address, whatever the headers say.
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list
    )
    # Shared state and clustering (docs/scale-out.md); metrics (docs/operations.md).
    state: StateConfig = Field(default_factory=StateConfig)
    cluster: ClusterConfig | None = None
    metrics: MetricsConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _single_issuer(cls, data: Any) -> Any:
        """``oidc: {...}`` is shorthand for ``issuers: [{...}]``."""
        if isinstance(data, dict) and "oidc" in data:
            data = dict(data)
            if "issuers" in data:
                raise ValueError("give 'oidc' (one issuer) or 'issuers', not both")
            data["issuers"] = [data.pop("oidc")]
        return data

    @model_validator(mode="after")
    def _references(self) -> ServerConfig:
        issuers = [i.issuer for i in self.issuers]
        if len(set(issuers)) != len(issuers):
            raise ValueError("an issuer is listed twice")
        if self.login is not None and self.login.issuer not in issuers:
            raise ValueError(f"login.issuer {self.login.issuer!r} is not one of the issuers")
        instances = {i.key for i in self.inventory.instances}
        groups = {g.key for g in self.inventory.destination_groups}
        if self.state.backend == "redis" and self.cluster is None:
            raise ValueError(
                "state.backend 'redis' needs a cluster section (advertise_url and secret)"
            )
        for n, rule in enumerate(self.access):
            for key in rule.instances:
                if key != "*" and key not in instances:
                    raise ValueError(f"access[{n}]: unknown instance {key!r}")
            for key in rule.destination_groups:
                if key != "*" and key not in groups:
                    raise ValueError(f"access[{n}]: unknown destination group {key!r}")
        return self


# After the models it builds on (ListenConfig, TlsConfig, _Model): it imports them from here.
from .http import HttpModeConfig  # noqa: E402

ServerConfig.model_rebuild()


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in part:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


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
        lines = [f"{source}: {_format_loc(err['loc'])}: {err['msg']}" for err in exc.errors()]
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


def load_config(path: Path) -> ServerConfig:
    """Read and validate a YAML file; relative paths are relative to the file."""
    return parse_config(read_yaml(path), source=str(path), base_dir=path.parent)
