"""The relay's configuration schema (pydantic): every section of the YAML file. The parts own
their input types where they have them (the inventory, the inline allow-list, HTTP mode) and
this module assembles them into ``ServerConfig``."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..access.inventory import InventoryConfig
from ..access.policy import AllowRule
from ..schema import NAME_PATTERN, ConfigError, StrictModel, check_members
from .base import ListenConfig, TlsConfig
from .console import AuditStoreConfig, ConsoleConfig
from .http import HttpModeConfig


class IntrospectionConfig(StrictModel):
    """RFC 7662 introspection for opaque access tokens (the relay's own client credentials)."""

    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    endpoint: str | None = Field(default=None, pattern=r"^https?://\S+$")
    cache_ttl: float = Field(default=30.0, ge=0, le=300)


class OidcConfig(StrictModel):
    issuer: str = Field(pattern=r"^https?://\S+$")
    audiences: list[str] = Field(min_length=1)
    algorithms: list[str] | None = None
    leeway: float = Field(default=30.0, ge=0, le=60)
    max_token_lifetime: float = Field(default=24 * 3600, gt=0)
    jwks_ttl: float = Field(default=300.0, gt=0)
    groups_claim: str = "groups"
    introspection: IntrospectionConfig | None = None


class LoginConfig(StrictModel):
    """Published unauthenticated at /.well-known/tunnel-client so that
    ``tunnel-client login --server URL`` needs nothing else."""

    issuer: str = Field(pattern=r"^https?://\S+$")
    client_id: str = Field(min_length=1)
    scopes: list[str] = Field(
        default_factory=lambda: ["openid", "email", "profile", "groups", "offline_access"]
    )
    resource: str | None = None


class TunnelSettings(StrictModel):
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
    # What a refused native client is told besides a reference: "reason" (the kind of refusal:
    # policy, access-level, port) or "minimal" (only "not authorized"). An unknown target is
    # told apart only with denial_detail_unknown_target: reason, since that names which targets
    # exist. The IAP subprotocol always keeps IAP's codes and texts.
    denial_detail: Literal["minimal", "reason"] = "reason"
    denial_detail_unknown_target: Literal["minimal", "reason"] = "minimal"


class AdminConfig(StrictModel):
    """The admin listener (sessions list / revoke, and the console when ``console`` is set).
    Plain HTTP unless ``tls`` is given: keep it on a private address."""

    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=8444))
    members: list[str] = Field(min_length=1)
    tls: TlsConfig | None = None
    console: ConsoleConfig | None = None

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        check_members(members, hint="user:EMAIL, group:NAME, ...")
        return members


class StateConfig(StrictModel):
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


class ClusterConfig(StrictModel):
    """This node among several: how the others reach it to forward a resume it owns."""

    # Unique per node; the default is the host name (a pod's name on Kubernetes).
    node_id: str | None = Field(default=None, pattern=NAME_PATTERN)
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
        if self.secret_file is None:  # pragma: no cover - the validator requires one of them
            raise ConfigError("cluster: give secret or secret_file")
        try:
            data = self.secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cluster.secret_file: cannot read: {exc.strerror}") from None
        if len(data) < 32:
            raise ConfigError("cluster.secret_file: the secret must be at least 32 bytes")
        return data


class SshConfig(StrictModel):
    """The SSH certificate authority (docs/ssh-certificates.md): short-lived user certificates
    for the login names the policy grants, host certificates for VMs, a revocation list."""

    # The signing user CA (OpenSSH private key file, e.g. a Kubernetes Secret mounted as a file),
    # and the previous ones, still published and trusted during a rotation.
    user_ca_key_file: Path
    previous_user_ca_key_files: list[Path] = Field(default_factory=list)
    # Signs VMs' host keys (tunnel-server ssh sign-host); clients trust it for every instance.
    host_ca_key_file: Path | None = None
    # Seconds a user certificate is valid (never beyond the token's own lifetime).
    certificate_ttl: float = Field(default=3600.0, gt=0, le=7 * 86400, allow_inf_nan=False)
    # The relay's egress addresses: certificates carry them as the source-address critical
    # option, so that a stolen certificate is useless except through the relay.
    source_addresses: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        default_factory=list
    )


class MetricsConfig(StrictModel):
    """Prometheus metrics (text exposition at /metrics) on their own listener."""

    listen: ListenConfig = Field(default_factory=lambda: ListenConfig(port=9464))


class ServerConfig(StrictModel):
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
    # The relay listener reads a PROXY protocol header (v1 or v2) from trusted_proxies (a
    # TCP-passthrough balancer: HAProxy send-proxy-v2, AWS NLB, ...): docs/operations.md.
    proxy_protocol: bool = False
    # Shared state and clustering (docs/scale-out.md); metrics (docs/operations.md).
    state: StateConfig = Field(default_factory=StateConfig)
    cluster: ClusterConfig | None = None
    metrics: MetricsConfig | None = None
    # SSH certificates issued by the relay (docs/ssh-certificates.md).
    ssh: SshConfig | None = None
    # Audit records in a database too (SQLite or PostgreSQL): docs/audit.md.
    audit_store: AuditStoreConfig | None = None

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
        if self.http is not None and self.http.workers > 1 and self.state.backend != "redis":
            raise ValueError(
                "http.workers: more than one worker process needs state.backend: redis (browser "
                "sessions, sign-outs and signing keys are shared through it)"
            )
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol needs trusted_proxies (the balancers that send it)")
        if self.http is None:
            wanting = [
                item.key
                for items in (self.inventory.instances, self.inventory.destination_groups)
                for item in items
                if item.proxy_protocol is not None and item.proxy_protocol.identity
            ]
            for key in wanting:
                raise ValueError(
                    f"inventory {key}: proxy_protocol signs the caller's identity with "
                    "HTTP mode's keys: add an http section (its issuer_url and JWKS)"
                )
        for n, rule in enumerate(self.access):
            for key in rule.instances:
                if key != "*" and key not in instances:
                    raise ValueError(f"access[{n}]: unknown instance {key!r}")
            for key in rule.destination_groups:
                if key != "*" and key not in groups:
                    raise ValueError(f"access[{n}]: unknown destination group {key!r}")
        return self
