"""``tunnel-server``: thin click CLI over the relay."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tunnel_protocol.aio.runtime import run

from .app import serve_forever, setup_logging
from .config import ConfigError, load_config


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
    run(serve_forever(config))


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
