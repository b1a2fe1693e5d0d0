"""``tunnel-client config set|get|list|unset|add-forward|remove-forward`` (the config file of
tunnel_client.config) and ``tunnel-client status``: who am I, for which relay and profile, is
the relay reachable, and which forwards a running ``tunnel-client up`` holds."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from tunnel_runtime.loop import run

from . import control, proxies
from .cli_auth import claims_of, expiry_text, who
from .cli_options import (
    Settings,
    common_options,
    fail,
    proxy_setting,
    require_server,
    resolve,
    ssl_context,
)
from .config import KEYS, ConfigError, ConfigFile, Forward, validate_profile
from .credentials import CredentialManager
from .errors import TunnelFailed
from .http import probe, relay_where
from .login import canonical_server
from .tokens import NoCredentials, TokenSource, token_provider

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _profile(profile: str | None) -> str:
    import os

    name = profile or os.environ.get("TUNNEL_PROFILE") or "default"
    try:
        return validate_profile(name)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _key(key: str) -> str:
    key = key.replace("_", "-")
    if key not in KEYS:
        raise click.UsageError(f"unknown setting {key!r}; known: {', '.join(KEYS)}")
    return key


profile_option = click.option(
    "--profile",
    metavar="NAME",
    help="Profile to change or read (env TUNNEL_PROFILE; default: 'default').",
)


@click.group("config", context_settings=CONTEXT)
def config_group() -> None:
    """Remember settings per profile (server, project, zone, ...) and forwards for `up`.

    \b
    Example:
      tunnel-client config set server wss://relay.example.com:8443
      tunnel-client config set zone europe-west1-b --profile staging
      tunnel-client config list
    """


@config_group.command("set", context_settings=CONTEXT)
@click.argument("key", metavar="KEY")
@click.argument("value")
@profile_option
def config_set(key: str, value: str, profile: str | None) -> None:
    """Set KEY to VALUE in the profile. KEY is one of: server, project, zone, region,
    network, dest-group, ca-file, credential-file, access-token-file, device-cert,
    device-key, insecure-skip-verify, proxy, verbosity.

    \b
    Example:
      tunnel-client config set project prod
    """
    name, config = _profile(profile), ConfigFile()
    try:
        stored = config.set(name, _key(key), value)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"Set {_key(key)} = {stored} in profile {name} ({config.path}).", err=True)


@config_group.command("get", context_settings=CONTEXT)
@click.argument("key", metavar="KEY")
@profile_option
def config_get(key: str, profile: str | None) -> None:
    """Print KEY's value in the profile (exit 1 when it is not set).

    \b
    Example:
      tunnel-client config get server
    """
    name = _profile(profile)
    try:
        value = ConfigFile().get(name, _key(key))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if value is None:
        fail(f"{_key(key)} is not set in profile {name}")
    click.echo(str(value).lower() if isinstance(value, bool) else value)


@config_group.command("unset", context_settings=CONTEXT)
@click.argument("key", metavar="KEY")
@profile_option
def config_unset(key: str, profile: str | None) -> None:
    """Remove KEY from the profile.

    \b
    Example:
      tunnel-client config unset zone
    """
    name = _profile(profile)
    try:
        removed = ConfigFile().unset(name, _key(key))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    word = "Unset" if removed else "Was not set:"
    click.echo(f"{word} {_key(key)} in profile {name}.", err=True)


@config_group.command("list", context_settings=CONTEXT)
@click.option("--all", "all_profiles", is_flag=True, help="Every profile, not only one.")
@profile_option
def config_list(all_profiles: bool, profile: str | None) -> None:
    """Print the profile's settings and forwards (KEY = VALUE lines).

    \b
    Example:
      tunnel-client config list --all
    """
    config = ConfigFile()
    try:
        names = config.profiles() if all_profiles else [_profile(profile)]
        for name in names:
            click.echo(f"[{name}]")
            for key, value in config.values(name).items():
                click.echo(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
            for forward in config.forwards(name):
                click.echo(f"forward {forward.name} = {_forward_text(forward)}")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@config_group.command("add-forward", context_settings=CONTEXT)
@click.argument("name")
@click.argument("instance")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option("--local", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Where `up` listens for this forward.")  # fmt: skip
@click.option("--host", "is_host", is_flag=True,
              help="INSTANCE is a destination-group host (needs region, network).")  # fmt: skip
@click.option("--zone", help="Zone, when not the profile's.")
@click.option("--project", help="Project, when not the profile's.")
@profile_option
def add_forward(
    name: str, instance: str, port: int, local: str, is_host: bool,
    zone: str | None, project: str | None, profile: str | None,
) -> None:  # fmt: skip
    """Add (or replace) forward NAME: `up` listens on --local for INSTANCE's PORT.

    \b
    Example:
      tunnel-client config add-forward db db-1 5432 --local 127.0.0.1:5432
    """
    data: dict[str, Any] = {"name": name, "port": port, "local": local}
    data["host" if is_host else "instance"] = instance
    data.update({k: v for k, v in (("zone", zone), ("project", project)) if v})
    config, pname = ConfigFile(), _profile(profile)
    try:
        config.add_forward(pname, Forward.from_data(data, "forward"))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"Forward {name} saved in profile {pname}.", err=True)


@config_group.command("remove-forward", context_settings=CONTEXT)
@click.argument("name")
@profile_option
def remove_forward(name: str, profile: str | None) -> None:
    """Remove forward NAME from the profile.

    \b
    Example:
      tunnel-client config remove-forward db
    """
    pname = _profile(profile)
    if not ConfigFile().remove_forward(pname, name):
        fail(f"no forward {name!r} in profile {pname}")
    click.echo(f"Removed forward {name} from profile {pname}.", err=True)


@click.command("status", context_settings=CONTEXT)
@common_options
@click.option("--access-token-file", type=click.Path(), help="Show this token's identity.")
@click.option("--credential-file", type=click.Path(), envvar="TUNNEL_CREDENTIAL_FILE",
              help="Show this service account's identity.")  # fmt: skip
@click.pass_context
def status(ctx: click.Context, /, **kw: Any) -> None:
    """Who you are for the relay, whether it is reachable, and the forwards of a running
    `tunnel-client up`. Exit 0 when logged in and reachable, else 1.

    \b
    Example:
      tunnel-client status --profile staging
    """
    settings = resolve(ctx, kw)
    ok = run(_status(settings))
    if not ok:
        raise SystemExit(1)


def register(main: click.Group) -> None:
    main.add_command(config_group)
    main.add_command(status)


def _forward_text(forward: Forward) -> str:
    kind = "instance" if forward.instance else "host"
    return f"{kind} {forward.destination} port {forward.port} on {forward.local}"


def _line(label: str, value: str) -> None:
    click.echo(f"{label + ':':<10} {value}")


async def _status(settings: Settings) -> bool:
    server = canonical_server(require_server(settings))
    _line("Server", f"{server} (from {settings.sources.get('server', 'default')})")
    _line("Profile", settings.profile)
    proxy = proxy_setting(settings)
    ok = await _identity(settings, server, proxy)
    where = relay_where(server)
    try:
        await probe(
            server,
            ssl_context=ssl_context(settings) if server.startswith("wss:") else None,
            proxy=proxies.proxy_for(server, proxy),
            limit=10.0,
            where=where,
        )
        _line("Relay", f"reachable at {where}")
    except TunnelFailed as exc:
        _line("Relay", "NOT reachable: " + " ".join(str(exc).splitlines()))
        ok = False
    await _forwards(settings.profile)
    return ok


async def _identity(settings: Settings, server: str, proxy: str | None) -> bool:
    if settings.access_token_file or settings.credential_file or _env_token():
        try:
            source: TokenSource = token_provider(
                settings.access_token_file, server=server,
                credential_file=settings.credential_file, proxy=proxy,
            )  # fmt: skip
            token = await source()
        except (NoCredentials, Exception) as exc:  # any source failure is shown, not raised
            _line("Identity", f"none: {exc}")
            return False
        claims = claims_of(token)
        _line(
            "Identity", f"{claims.get('email') or claims.get('sub') or '?'} (from {source.source})"
        )
        _groups(claims.get("groups"))
        if isinstance(claims.get("exp"), int | float):
            _line("Token", expiry_text(float(claims["exp"])))
        return True
    cached = CredentialManager(server, profile=settings.profile).load()
    if cached is None:
        _line("Identity", f"not logged in (run: tunnel-client login --server {server})")
        return False
    _, tokens = cached
    name, groups = who(tokens)
    _line("Identity", f"{name} (cached login)")
    _groups(groups)
    renew = "; renewed automatically" if tokens.refresh_token else ""
    _line("Token", expiry_text(tokens.expires_at) + renew)
    return True


def _groups(groups: Any) -> None:
    if isinstance(groups, list) and groups:
        _line("Groups", ", ".join(map(str, groups)))


def _env_token() -> bool:
    import os

    return bool(os.environ.get("TUNNEL_ACCESS_TOKEN"))


async def _forwards(profile: str) -> None:
    try:
        snapshot = await asyncio.wait_for(control.query(profile), 5.0)
    except (OSError, TimeoutError, ValueError):
        snapshot = None
    if snapshot is None:
        _line("Forwards", f"no `tunnel-client up` running for profile {profile}")
        return
    _line("Forwards", f"`tunnel-client up` (pid {snapshot.get('pid')}) holds:")
    for row in snapshot.get("forwards", []):
        click.echo("  " + control.format_row(row))
