"""Config of the audit store (``audit_store:``) and of the admin console (``admin.console:``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from ..schema import StrictModel
from .http import SessionConfig, WebLoginConfig

DAY = 86400.0


class AuditStoreConfig(StrictModel):
    """Audit records in a database besides the JSON log (docs/audit.md): ``sqlite`` (one node;
    a file next to the config by default) or ``postgres`` (a cluster: every node writes to the
    same database). Writing never delays a tunnel: a bounded queue, batches; records that
    cannot be written are counted in ``tunnel_audit_store_dropped_total``."""

    backend: Literal["sqlite", "postgres"] = "sqlite"
    # SQLite file; relative to the config file's directory.
    path: Path = Path("audit.db")
    # PostgreSQL connection string or URL (password included): the environment variable
    # TUNNEL_AUDIT_DSN overrides it (keep the password in a Secret, not in the config file).
    dsn: str | None = None
    # Retention: records older than this many seconds are deleted (default 30 days) ...
    max_age: float = Field(default=30 * DAY, ge=60, allow_inf_nan=False)
    # ... and, SQLite only, the oldest ones while the database uses more than this many bytes.
    max_bytes: int = Field(default=1024**3, ge=1024**2)
    # Records waiting for the database at most (beyond: dropped and counted) and per batch.
    queue_size: int = Field(default=10_000, ge=10, le=1_000_000)
    batch_size: int = Field(default=500, ge=1, le=10_000)
    # Seconds each database call may take before the store counts as unavailable.
    timeout: float = Field(default=5.0, gt=0, le=60, allow_inf_nan=False)
    # Seconds between retention runs.
    retention_interval: float = Field(default=300.0, ge=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _dsn(self) -> AuditStoreConfig:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("backend 'postgres' needs dsn (or TUNNEL_AUDIT_DSN)")
        if self.dsn and not self.dsn.startswith(("postgresql://", "postgres://", "host=")):
            raise ValueError("dsn must be a postgresql:// URL or a 'host=...' connection string")
        return self


class ConsoleConfig(StrictModel):
    """The admin console on the admin listener: browser sign-in with the same OIDC
    authorization code + PKCE flow as HTTP mode; only admins (``admin.members`` or the policy's
    ``admin`` role on ``relay:NODE``) get in."""

    # The console's origin as browsers reach it (scheme://host[:port], no path): the sign-in
    # redirect URI is EXTERNAL_URL/console/callback, and state-changing requests must come from
    # this origin. Session cookies are Secure: use https, or http on localhost/127.0.0.1.
    external_url: str = Field(pattern=r"^(?i:https?)://[^/?#\s]+/?$")
    login: WebLoginConfig
    session: SessionConfig = Field(default_factory=lambda: SessionConfig(max_age=8 * 3600))
    # Seconds between the pages' live updates (JSON polling).
    poll_interval: float = Field(default=2.0, ge=0.2, le=60, allow_inf_nan=False)

    @field_validator("external_url")
    @classmethod
    def _origin(cls, url: str) -> str:
        parts = urlsplit(url)
        if not parts.hostname or parts.username or parts.password:
            raise ValueError("external_url must be scheme://host[:port]")
        return url.lower().rstrip("/")
