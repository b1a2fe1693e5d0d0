"""The options every ``tunnel-client`` command shares, and how their values resolve: a flag, then
its environment variable, then the profile in the config file, then the built-in default
(gcloud's order). Also the mapping of failures to messages and exit codes:

    0    success
    1    a runtime failure: connection, login, denial, tunnel closed (gcloud exits 1 too)
    2    a usage or config error (click's own code)
    130  interrupted (Ctrl-C), as a shell reports SIGINT
"""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from . import proxies
from .config import BOOL_KEYS, PATH_KEYS, ConfigError, ConfigFile, parse_bool, validate_profile

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PROJECT = "default"
VERBOSITIES = ("debug", "info", "warning", "error")


def _opt(*names: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*names, **kw)


def _apply(func: F, options: list[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


def common_options(func: F) -> F:
    """Relay, profile, TLS, proxy and logging: every command that talks to the relay."""
    return _apply(
        func,
        [
            _opt("--profile", envvar="TUNNEL_PROFILE", metavar="NAME",
                 help="Config profile: its defaults and its login (env TUNNEL_PROFILE; "
                      "default: 'default')."),
            _opt("--server", envvar="TUNNEL_SERVER", metavar="URL",
                 help="Relay URL, wss://HOST[:PORT] (env TUNNEL_SERVER)."),
            _opt("--ca-file", envvar="TUNNEL_CA_FILE", type=click.Path(path_type=Path),
                 help="CA bundle to verify the relay's certificate (env TUNNEL_CA_FILE)."),
            _opt("--insecure-skip-verify", is_flag=True, default=None,
                 help="Do not verify the relay's TLS certificate (development only)."),
            _opt("--proxy", metavar="URL",
                 help="Proxy for the relay and the identity provider: http://[USER:PASS@]HOST:"
                      "PORT or socks5://HOST:PORT; 'none' to go direct (default: HTTPS_PROXY, "
                      "NO_PROXY)."),
            _opt("--verbosity", type=click.Choice(VERBOSITIES), default=None,
                 help="Log level on stderr, as gcloud's --verbosity (default: warning)."),
            _opt("-v", "--verbose", count=True, help="More logging on stderr (-vv: debug)."),
        ],
    )  # fmt: skip


def target_options(func: F) -> F:
    """Where the target is, and which credential reaches it (start-tunnel, ssh, rdp, ...)."""
    return _apply(
        func,
        [
            _opt("--project", envvar="TUNNEL_PROJECT",
                 help="Project of the instance (env TUNNEL_PROJECT; default: 'default')."),
            _opt("--zone", envvar="TUNNEL_ZONE", help="Zone of the instance (env TUNNEL_ZONE)."),
            _opt("--region", help="Region of the destination group (host form)."),
            _opt("--network", help="Network of the destination group (host form)."),
            _opt("--dest-group", help="Destination group of the host."),
            _opt("--credential-file", envvar="TUNNEL_CREDENTIAL_FILE",
                 type=click.Path(path_type=Path),
                 help="Service-account credential file (env TUNNEL_CREDENTIAL_FILE)."),
            _opt("--access-token-file", type=click.Path(path_type=Path),
                 help="File holding the bearer token (re-read on every connect)."),
            _opt("--device-cert", envvar="TUNNEL_DEVICE_CERT", type=click.Path(path_type=Path),
                 help="Device certificate for relays that check devices (env "
                      "TUNNEL_DEVICE_CERT)."),
            _opt("--device-key", envvar="TUNNEL_DEVICE_KEY", type=click.Path(path_type=Path),
                 help="Key of --device-cert (default: in the same file)."),
            common_options,
        ],
    )  # fmt: skip


_SETTINGS = (
    "server", "project", "zone", "region", "network", "dest_group", "ca_file", "credential_file",
    "access_token_file", "device_cert", "device_key", "insecure_skip_verify", "proxy",
    "verbosity",
)  # fmt: skip


@dataclass
class Settings:
    """The resolved values of one command run; ``sources`` says where each came from (flag,
    env, profile or default), so a ProxyCommand can forward only what the profile won't give."""

    profile: str = "default"
    server: str | None = None
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    network: str | None = None
    dest_group: str | None = None
    ca_file: Path | None = None
    credential_file: Path | None = None
    access_token_file: Path | None = None
    device_cert: Path | None = None
    device_key: Path | None = None
    insecure_skip_verify: bool = False
    proxy: str | None = None
    verbosity: str = "warning"
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def project_or_default(self) -> str:
        return self.project or DEFAULT_PROJECT


def _source(ctx: click.Context, name: str) -> str:
    source = ctx.get_parameter_source(name)
    if source is ParameterSource.COMMANDLINE:
        return "flag"
    if source is ParameterSource.ENVIRONMENT:
        return "env"
    return "default"


def resolve(ctx: click.Context, kw: dict[str, Any], config: ConfigFile | None = None) -> Settings:
    """Flag > env > profile > default, for the options this command has. Raises UsageError."""
    profile = kw.pop("profile", None) or "default"
    try:
        validate_profile(profile)
        values = (config or ConfigFile()).values(profile)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    settings = Settings(profile=profile)
    for name in _SETTINGS:
        if name not in kw:
            continue
        value, source = kw.pop(name), _source(ctx, name)
        key = name.replace("_", "-")
        if source == "default" and values.get(key) is not None:
            value, source = values[key], "profile"
            if key in BOOL_KEYS and isinstance(value, str):
                value = parse_bool(key, value)
            elif key in PATH_KEYS:
                value = Path(str(value))
            elif not isinstance(value, bool):
                value = str(value)
        if value is not None:
            setattr(settings, name, value)
            settings.sources[name] = source
    verbose = kw.pop("verbose", 0)
    if verbose and settings.sources.get("verbosity") != "flag":
        settings.verbosity = "debug" if verbose >= 2 else "info"
    _setup_logging(settings.verbosity)
    return settings


def _setup_logging(verbosity: str) -> None:
    level = getattr(logging, verbosity.upper(), logging.WARNING)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("tunnel").setLevel(level)
    if level > logging.DEBUG:
        logging.getLogger("websockets").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
        logging.getLogger("httpcore2").setLevel(logging.WARNING)


def require_server(settings: Settings) -> str:
    server = settings.server
    if not server:
        raise click.UsageError(
            "no relay: pass --server wss://HOST:PORT, set TUNNEL_SERVER, or "
            "`tunnel-client config set server wss://HOST:PORT`"
        )
    server = server.strip().rstrip("/")
    if server.startswith(("http://", "https://")):
        server = "ws" + server[4:]
    if not server.startswith(("ws://", "wss://")):
        raise click.UsageError(f"--server must be a wss:// URL, got {server!r}")
    return server


def proxy_setting(settings: Settings) -> proxies.ProxySetting:
    if settings.proxy is None:
        return None
    try:
        proxies.check(settings.proxy) if settings.proxy.lower() not in (
            "none",
            "direct",
            "",
        ) else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return settings.proxy


def ssl_context(settings: Settings) -> ssl.SSLContext:
    ca = settings.ca_file
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise click.UsageError(f"cannot load the CA file {ca}: {why}") from None
    if settings.device_cert is not None:
        try:
            context.load_cert_chain(settings.device_cert, settings.device_key)
        except (OSError, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            raise click.UsageError(f"cannot load the device certificate: {why}") from None
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def fail(message: str, code: int = 1) -> NoReturn:
    """``ERROR: <first line>`` then the explanation lines, to stderr; exit ``code``."""
    lines = message.rstrip().splitlines() or ["unknown error"]
    click.echo(f"ERROR: {lines[0]}", err=True)
    for line in lines[1:]:
        click.echo(line, err=True)
    sys.exit(code)
