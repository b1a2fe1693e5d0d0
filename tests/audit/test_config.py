"""The ``audit_store:`` and ``admin.console:`` config sections: defaults, precise errors, the
TUNNEL_AUDIT_DSN override, and paths relative to the config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tunnel_server.config import ConfigError, load_config, parse_config

BASE: dict[str, Any] = {"oidc": {"issuer": "https://idp.example.com", "audiences": ["tunnel"]}}
LOGIN = {"issuer": "https://idp.example.com", "client_id": "c", "client_secret": "s"}


def test_audit_store_defaults_and_env_override() -> None:
    config = parse_config(BASE | {"audit_store": {}}, env={})
    store = config.audit_store
    assert store is not None
    assert (store.backend, store.path.name, store.queue_size) == ("sqlite", "audit.db", 10000)
    data = BASE | {"audit_store": {"backend": "postgres"}}
    dsn = "postgresql://tunnel:secret@db.internal/audit"
    config = parse_config(data, env={"TUNNEL_AUDIT_DSN": dsn})
    assert config.audit_store is not None
    assert config.audit_store.dsn == dsn
    assert parse_config(BASE, env={"TUNNEL_AUDIT_DSN": dsn}).audit_store is None


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"backend": "postgres"}, "audit_store: backend 'postgres' needs dsn"),
        ({"backend": "postgres", "dsn": "mysql://x"}, "dsn must be a postgresql:// URL"),
        ({"backend": "mongo"}, "audit_store.backend: Input should be 'sqlite' or 'postgres'"),
        ({"queue_size": 1}, "audit_store.queue_size: Input should be greater than or equal to 10"),
        ({"max_age": 1}, "audit_store.max_age: Input should be greater than or equal to 60"),
        ({"surprise": 1}, "audit_store.surprise: unknown key"),
    ],
)
def test_audit_store_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="relay.yaml: ") as caught:
        parse_config(BASE | {"audit_store": section}, source="relay.yaml", env={})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://admin.example.com/console", "String should match pattern"),
        ("admin.example.com", "String should match pattern"),
        ("https://user:pw@admin.example.com", "external_url must be scheme://host[:port]"),
    ],
)
def test_console_external_url_is_an_origin(url: str, message: str) -> None:
    admin = {"members": ["group:ops"], "console": {"external_url": url, "login": LOGIN}}
    with pytest.raises(ConfigError, match="admin.console.external_url") as caught:
        parse_config(BASE | {"admin": admin}, env={})
    assert message in str(caught.value)


def test_console_defaults_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(
        "oidc: {issuer: 'https://idp.example.com', audiences: [tunnel]}\n"
        "admin:\n"
        "  members: [group:ops]\n"
        "  tls: {cert_file: admin.pem, key_file: admin-key.pem}\n"
        "  console:\n"
        "    external_url: HTTPS://Admin.Example.com:8444/\n"
        "    login: {issuer: 'https://idp.example.com', client_id: c, client_secret: s}\n"
        "audit_store: {path: data/audit.db}\n"
    )
    config = load_config(tmp_path / "relay.yaml")
    assert config.admin is not None
    assert config.admin.console is not None
    assert config.admin.console.external_url == "https://admin.example.com:8444"
    assert config.admin.console.poll_interval == 2.0
    assert config.admin.console.session.max_age == 8 * 3600
    assert config.admin.tls is not None
    assert config.admin.tls.cert_file == tmp_path / "admin.pem"
    assert config.audit_store is not None
    assert config.audit_store.path == tmp_path / "data" / "audit.db"
