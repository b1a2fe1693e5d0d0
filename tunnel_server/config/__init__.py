"""The relay's configuration: one YAML file, validated at start with errors that name file, key
and reason (``load_config``), environment overrides for secrets and per-node values. ``base``:
listen and TLS; ``http``: HTTP mode; ``models``: every other section and ``ServerConfig``;
``load``: reading and validating. The inventory and the inline allow-list are the access
layer's own input types, re-exported here."""

from ..access.inventory import DestinationGroupConfig, InstanceConfig, InventoryConfig
from ..access.policy import AllowRule, PortRange
from ..schema import ConfigError, read_yaml
from .base import ListenConfig, TlsConfig
from .console import AuditStoreConfig, ConsoleConfig
from .http import HttpModeConfig, RouteConfig, SessionConfig, WebLoginConfig
from .load import ENV_OVERRIDES, load_config, parse_config
from .models import (
    AdminConfig,
    ClusterConfig,
    IntrospectionConfig,
    LoginConfig,
    MetricsConfig,
    OidcConfig,
    ServerConfig,
    SshConfig,
    StateConfig,
    TunnelSettings,
)

__all__ = [
    "ENV_OVERRIDES",
    "AdminConfig",
    "AllowRule",
    "AuditStoreConfig",
    "ClusterConfig",
    "ConfigError",
    "ConsoleConfig",
    "DestinationGroupConfig",
    "HttpModeConfig",
    "InstanceConfig",
    "IntrospectionConfig",
    "InventoryConfig",
    "ListenConfig",
    "LoginConfig",
    "MetricsConfig",
    "OidcConfig",
    "PortRange",
    "RouteConfig",
    "ServerConfig",
    "SessionConfig",
    "SshConfig",
    "StateConfig",
    "TlsConfig",
    "TunnelSettings",
    "WebLoginConfig",
    "load_config",
    "parse_config",
    "read_yaml",
]
