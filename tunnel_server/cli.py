"""``tunnel-server``: thin click CLI over the relay."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import click

from tunnel_protocol.aio.runtime import run

from .app import serve_forever, setup_logging
from .config import ConfigError, load_config

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
    run(serve_forever(config, config_path))


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a configuration file and exit (0 valid, 2 invalid)."""
    try:
        load_config(config_path)
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
    assert isinstance(rows, list)
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
