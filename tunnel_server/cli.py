"""``tunnel-server``: thin click CLI over the relay."""

from __future__ import annotations

import datetime
import json
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click

from tunnel_runtime.loop import run

from .access.device import device_attributes, device_from_certificate
from .access.policy import TUNNEL_USER, AccessRequest, explain
from .app import build_link, build_policy
from .config import ConfigError, ServerConfig, load_config
from .ops.logs import setup_logging
from .serve import serve_forever

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
@click.version_option(package_name="identity-tunnel")
def main() -> None:
    """Identity-aware tunnel relay."""


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="YAML configuration file.",
)
def serve(config_path: Path) -> None:
    """Serve the relay until SIGINT/SIGTERM."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    setup_logging(config.log_format)
    try:
        run(serve_forever(config, config_path))
    except ConfigError as exc:  # found while starting (a secret or CA file the config names)
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a configuration file and the policy file it names (exit 0 valid, 2 invalid)."""
    try:
        config = load_config(config_path)
        build_policy(config)
        build_link(config)  # the cluster secret and CA files are readable and valid
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{config_path}: ok", err=True)


def _admin_call(
    admin_url: str, token_file: Path, method: str, path: str, body: dict[str, str] | None = None
) -> dict[str, object]:
    """One request to the admin listener; exits with a clear message on failure."""
    token = token_file.read_text(encoding="ascii").strip()

    async def call() -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(method, admin_url.rstrip("/") + path, json=body, headers=headers) as r,
        ):
            return r.status, dict(await r.json(content_type=None))

    try:
        status, data = run(call(), use_uvloop=False)
    except (aiohttp.ClientError, ValueError) as exc:
        click.echo(f"error: admin request failed: {exc}", err=True)
        sys.exit(1)
    if status != 200:
        click.echo(f"error: HTTP {status}: {data.get('error', '')}", err=True)
        sys.exit(1)
    return data


def _admin_options(func: F) -> F:
    func = click.option(
        "--token-file",
        required=True,
        type=click.Path(path_type=Path, exists=True),
        help="File holding an admin's bearer token.",
    )(func)
    return click.option(
        "--admin-url",
        envvar="TUNNEL_ADMIN_URL",
        default="http://127.0.0.1:8444",
        show_default=True,
        help="The relay's admin listener (env TUNNEL_ADMIN_URL).",
    )(func)


@main.group()
def sessions() -> None:
    """List and revoke open tunnels (through the admin listener)."""


@sessions.command("list")
@_admin_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sessions_list(admin_url: str, token_file: Path, as_json: bool) -> None:
    """Print the relay's tunnels."""
    data = _admin_call(admin_url, token_file, "GET", "/admin/sessions")
    rows = data.get("sessions", [])
    if not isinstance(rows, list):
        raise click.ClickException("the admin API answered an unexpected document")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'TUNNEL':34} {'PRINCIPAL':32} {'RESOURCE':28} {'PORT':>5} {'STATE':8} {'AGE':>8}")
    for row in rows:
        click.echo(
            f"{row['tunnel_id']:34} {row['principal']:32} {row['resource']:28} "
            f"{row['port']:>5} {row['state']:8} {row['age']:>8.1f}"
        )


@sessions.command("revoke")
@_admin_options
@click.option("--user", help="Principal whose tunnels close (e.g. user:alice@example.com).")
@click.option("--session", "session_id", help="Tunnel id to close.")
def sessions_revoke(
    admin_url: str, token_file: Path, user: str | None, session_id: str | None
) -> None:
    """Close a user's tunnels (and refuse their current tokens) or one tunnel."""
    if (user is None) == (session_id is None):
        raise click.UsageError("give exactly one of --user or --session")
    body = {"user": user} if user is not None else {"session": str(session_id)}
    data = _admin_call(admin_url, token_file, "POST", "/admin/revoke", body)
    click.echo(f"Closed {data.get('closed', 0)} tunnel(s).", err=True)


@main.group()
def policy() -> None:
    """Inspect the access policy."""


@policy.command("explain")
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--member", "members", multiple=True, required=True,
              help="user:EMAIL, group:NAME, ... (repeat: one per member).")  # fmt: skip
@click.option("--instance", help="project/zone/name, or a name unique in the inventory.")
@click.option("--group", "dest_group", help="Destination group project/region/network/name.")
@click.option("--host", help="Destination host (with --group).")
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option("--source-ip", help="Caller's address, for IP access levels and conditions.")
@click.option("--device-cert", type=click.Path(path_type=Path, exists=True),
              help="The caller's device certificate (PEM), for device conditions.")  # fmt: skip
@click.option("--time", "at", help="ISO 8601 time to decide at (default: now).")
@click.option("--json", "as_json", is_flag=True)
def policy_explain(
    config_path: Path,
    members: tuple[str, ...],
    instance: str | None,
    dest_group: str | None,
    host: str | None,
    port: int,
    source_ip: str | None,
    device_cert: Path | None,
    at: str | None,
    as_json: bool,
) -> None:
    """Print the decision, the binding or level that decided it, and why every other
    candidate did not apply (the troubleshooter)."""
    try:
        config = load_config(config_path)
        policy_ = build_policy(config)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    resource = _explain_resource(config, instance, dest_group)
    device = None
    if device_cert is not None:
        der = ssl.PEM_cert_to_DER_cert(device_cert.read_text(encoding="ascii"))
        device = device_attributes(device_from_certificate(der))
    now = datetime.datetime.fromisoformat(at).timestamp() if at else time.time()
    principal = next((m for m in members if m.startswith(("user:", "serviceAccount:"))), None)
    request = AccessRequest(
        frozenset(members), resource, port, source_ip, principal=principal, role=TUNNEL_USER,
        destination_host=host, destination_ip=host, device=device or {},
    )  # fmt: skip
    result = explain(request, policy_, now)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        click.echo("\n".join(result.lines()))
    sys.exit(0 if result.decision.allowed else 1)


def _explain_resource(config: ServerConfig, instance: str | None, group: str | None) -> str:
    if (instance is None) == (group is None):
        raise click.UsageError("give exactly one of --instance or --group")
    if group is not None:
        return f"group:{group}"
    if instance is None:  # pragma: no cover - checked above: exactly one is given
        raise click.UsageError("give exactly one of --instance or --group")
    if instance.count("/") == 2:
        return f"instance:{instance}"
    keys = [i.key for i in config.inventory.instances if i.name == instance]
    if len(keys) != 1:
        raise click.UsageError(f"instance {instance!r} is {'ambiguous' if keys else 'unknown'}")
    return f"instance:{keys[0]}"
