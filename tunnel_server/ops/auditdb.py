"""The audit store the config names (``audit_store:``), built for the composition root: the
backend, and the writer between the audit log and it (docs/audit.md)."""

from __future__ import annotations

from ..audit_store import AuditBackend, AuditWriter, SqliteBackend
from ..config import AuditStoreConfig, ConfigError


def build_audit_store(config: AuditStoreConfig) -> AuditWriter:
    """The writer (not started) over the configured backend. ConfigError when the PostgreSQL
    driver is not installed (the ``postgres`` extra)."""
    backend: AuditBackend
    if config.backend == "sqlite":
        backend = SqliteBackend(
            config.path, max_age=config.max_age, max_bytes=config.max_bytes, timeout=config.timeout
        )
    else:
        if not config.dsn:  # pragma: no cover - the config requires it
            raise ConfigError("audit_store: backend 'postgres' needs dsn")
        try:
            from ..audit_store.postgres import PostgresBackend
        except ImportError as exc:
            raise ConfigError(
                f"audit_store: backend 'postgres' needs psycopg: pip install "
                f"'identity-tunnel[postgres]' ({exc})"
            ) from None
        backend = PostgresBackend(config.dsn, max_age=config.max_age, timeout=config.timeout)
    return AuditWriter(
        backend,
        queue_size=config.queue_size,
        batch_size=config.batch_size,
        retention_interval=config.retention_interval,
    )
