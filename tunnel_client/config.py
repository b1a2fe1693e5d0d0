"""The client's config file: named profiles, each a set of defaults (server, project, zone, ...)
and the forwards ``tunnel-client up`` opens. One YAML file in the platform's config directory
(``$XDG_CONFIG_HOME/identity-tunnel/config.yaml`` on Linux, ``%APPDATA%`` on Windows,
``~/Library/Application Support`` on macOS; ``TUNNEL_CLIENT_HOME`` moves it, as it moves the
token cache)::

    profiles:
      default:
        server: wss://relay.example.com:8443
        project: prod
        zone: europe-west1-b
        forwards:
          - {name: db, instance: db-1, port: 5432, local: "127.0.0.1:5432"}

Values resolve as gcloud's do: a flag, then its environment variable, then the profile, then the
built-in default. The profile is ``--profile``, else ``TUNNEL_PROFILE``, else ``default``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BOOL_KEYS",
    "KEYS",
    "ConfigError",
    "ConfigFile",
    "Forward",
    "config_dir",
    "config_path",
]

DEFAULT_PROFILE = "default"
# key -> help text; these are exactly the option names (with "-") every command resolves.
KEYS: dict[str, str] = {
    "server": "relay URL, wss://HOST[:PORT]",
    "project": "project of the instances",
    "zone": "zone of the instances",
    "region": "region of destination-group hosts",
    "network": "network of destination-group hosts",
    "dest-group": "destination group of hosts",
    "ca-file": "CA bundle for the relay's certificate",
    "credential-file": "service-account credential file",
    "access-token-file": "file holding a bearer token",
    "device-cert": "device certificate",
    "device-key": "key of the device certificate",
    "insecure-skip-verify": "do not verify the relay's certificate (true/false)",
    "proxy": "HTTP(S) or SOCKS5 proxy URL for the relay and the identity provider",
    "verbosity": "debug, info, warning or error",
}
BOOL_KEYS = frozenset({"insecure-skip-verify"})
PATH_KEYS = frozenset(
    {"ca-file", "credential-file", "access-token-file", "device-cert", "device-key"}
)
_PROFILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FORWARD_KEYS = frozenset(
    {"name", "instance", "host", "port", "local", "project", "zone", "region", "network",
     "dest-group"}
)  # fmt: skip


class ConfigError(ValueError):
    """The config file or a value for it is wrong; the message names the file and key."""


def config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("TUNNEL_CLIENT_HOME"):
        return Path(environ["TUNNEL_CLIENT_HOME"])
    if sys.platform == "win32":
        base = environ.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "identity-tunnel"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "identity-tunnel"
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "identity-tunnel"


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    return config_dir(environ) / "config.yaml"


def validate_profile(name: str) -> str:
    if _PROFILE_RE.fullmatch(name) is None:
        raise ConfigError(
            f"invalid profile name {name!r}: use letters, digits, '.', '_' or '-' (64 at most)"
        )
    return name


def parse_bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Forward:
    """One forward of ``tunnel-client up``: ``name`` listens on ``local`` and carries each
    connection to ``port`` on an instance (``instance``) or a destination-group ``host``."""

    name: str
    port: int
    local: str
    instance: str | None = None
    host: str | None = None
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    network: str | None = None
    dest_group: str | None = None

    @property
    def destination(self) -> str:
        return self.instance or self.host or "?"

    @classmethod
    def from_data(cls, data: Any, where: str) -> Forward:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: each forward is a mapping (name, instance, port, local)")
        unknown = sorted(set(map(str, data)) - _FORWARD_KEYS)
        if unknown:
            known = ", ".join(sorted(_FORWARD_KEYS))
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
        name = data.get("name")
        if not isinstance(name, str) or not _PROFILE_RE.fullmatch(name):
            raise ConfigError(f"{where}.name: a name of letters, digits, '.', '_' or '-'")
        where = f"{where} ({name})"
        if ("instance" in data) == ("host" in data):
            raise ConfigError(f"{where}: give exactly one of instance or host")
        port = data.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{where}.port: a port number 1..65535")
        local = data.get("local", "127.0.0.1:0")
        if isinstance(local, int):
            local = f"127.0.0.1:{local}"
        if not isinstance(local, str):
            raise ConfigError(f"{where}.local: HOST:PORT")

        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{where}.{key}: a string")
            return value

        return cls(
            name=name, port=port, local=local, instance=text("instance"), host=text("host"),
            project=text("project"), zone=text("zone"), region=text("region"),
            network=text("network"), dest_group=text("dest-group"),
        )  # fmt: skip

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        for key, value in (
            ("instance", self.instance), ("host", self.host), ("port", self.port),
            ("local", self.local), ("project", self.project), ("zone", self.zone),
            ("region", self.region), ("network", self.network), ("dest-group", self.dest_group),
        ):  # fmt: skip
            if value is not None:
                data[key] = value
        return data


class ConfigFile:
    """Reads and writes the config file (atomically; 0600 since it may name a proxy password)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path()
        self._data: dict[str, Any] | None = None

    def data(self) -> dict[str, Any]:
        if self._data is None:
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            except OSError as exc:
                raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
            try:
                loaded = yaml.safe_load(text) if text.strip() else {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{self.path} is not valid YAML: {exc}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{self.path}: expected a mapping with 'profiles'")
            profiles = loaded.setdefault("profiles", {})
            if not isinstance(profiles, dict):
                raise ConfigError(f"{self.path}: 'profiles' must be a mapping of names")
            self._data = loaded
        return self._data

    def profiles(self) -> list[str]:
        return sorted(map(str, self.data()["profiles"]))

    def profile(self, name: str) -> dict[str, Any]:
        raw = self.data()["profiles"].get(name) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{self.path}: profiles.{name} must be a mapping")
        for key in raw:
            if key != "forwards" and key not in KEYS:
                raise ConfigError(
                    f"{self.path}: profiles.{name}.{key} is not a setting "
                    f"(known: {', '.join(KEYS)}, forwards)"
                )
        return raw

    def get(self, profile: str, key: str) -> Any:
        return self.profile(profile).get(key)

    def values(self, profile: str) -> dict[str, Any]:
        return {k: v for k, v in self.profile(profile).items() if k != "forwards"}

    def forwards(self, profile: str) -> list[Forward]:
        raw = self.profile(profile).get("forwards") or []
        where = f"{self.path}: profiles.{profile}.forwards"
        if not isinstance(raw, list):
            raise ConfigError(f"{where} must be a list")
        forwards = [Forward.from_data(item, f"{where}[{i}]") for i, item in enumerate(raw)]
        names = [f.name for f in forwards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{where}: duplicate forward name {dupes[0]!r}")
        return forwards

    def set(self, profile: str, key: str, value: str) -> Any:
        validate_profile(profile)
        if key not in KEYS:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
        stored: Any = value
        if key in BOOL_KEYS:
            stored = parse_bool(key, value)
        elif key in PATH_KEYS:
            stored = os.path.abspath(os.path.expanduser(value))
        elif key == "server" and not value.startswith(("wss://", "ws://", "https://", "http://")):
            raise ConfigError(f"server must be a wss:// URL, got {value!r}")
        elif key == "verbosity" and value not in ("debug", "info", "warning", "error"):
            raise ConfigError("verbosity must be debug, info, warning or error")
        self.profile(profile)  # validate what is there
        self.data()["profiles"].setdefault(profile, {})
        if self.data()["profiles"][profile] is None:
            self.data()["profiles"][profile] = {}
        self.data()["profiles"][profile][key] = stored
        self.save()
        return stored

    def unset(self, profile: str, key: str) -> bool:
        if key not in KEYS:
            raise ConfigError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
        section = self.profile(profile)
        if key not in section:
            return False
        del section[key]
        self.save()
        return True

    def add_forward(self, profile: str, forward: Forward) -> None:
        validate_profile(profile)
        existing = [f for f in self.forwards(profile) if f.name != forward.name]
        section = self.data()["profiles"].setdefault(profile, {}) or {}
        self.data()["profiles"][profile] = section
        section["forwards"] = [f.to_data() for f in [*existing, forward]]
        self.save()

    def remove_forward(self, profile: str, name: str) -> bool:
        forwards = self.forwards(profile)
        kept = [f for f in forwards if f.name != name]
        if len(kept) == len(forwards):
            return False
        self.profile(profile)["forwards"] = [f.to_data() for f in kept]
        self.save()
        return True

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(self.data(), f, sort_keys=False, default_flow_style=False)
        os.replace(tmp, self.path)
