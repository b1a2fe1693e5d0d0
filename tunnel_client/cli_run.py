"""From resolved CLI settings to a running library client: the credential, proxy and TLS choices,
and the one place a command's tunnels run (a proxy's 407 prompts once; failures exit 1)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from tunnel_runtime.loop import run

from . import proxies
from .api import Client
from .cli_options import Settings, fail, proxy_setting, require_server, ssl_context
from .errors import ProxyRefused, TunnelFailed
from .listener import PortUnavailable
from .tokens import NoCredentials, token_provider

T = TypeVar("T")


def make_client(settings: Settings) -> Client:
    """The library client for these settings (the CLI's only way to open tunnels)."""
    server = require_server(settings)
    proxy = proxy_setting(settings)
    try:
        token = token_provider(
            settings.access_token_file,
            server=server,
            credential_file=settings.credential_file,
            profile=settings.profile,
            proxy=proxy,
        )
    except NoCredentials as exc:
        raise click.UsageError(str(exc)) from None
    return Client(
        server=server,
        token=token,
        profile=settings.profile,
        project=settings.project_or_default,
        zone=settings.zone,
        region=settings.region,
        network=settings.network,
        proxy=proxy,
        ssl_context=ssl_context(settings) if server.startswith("wss:") else None,
    )


def run_tunnel(
    settings: Settings, client: Client, main: Callable[[Client], Coroutine[Any, Any, T]]
) -> T:
    """Run ``main(client)``; a proxy asking for credentials (407) gets them from a prompt on a
    terminal, once. Failures print their message and exit 1."""
    try:
        try:
            return run(main(client))
        except ProxyRefused as exc:
            proxy = proxies.proxy_for(client.server, client.proxy)
            if exc.code != 407 or proxy is None or proxies.has_credentials(proxy):
                raise
            if not sys.stdin.isatty():
                raise
            click.echo(
                f"The proxy {proxies.redact(proxy)} asks for a user name and password.", err=True
            )
            user = click.prompt("Proxy user", err=True)
            password = click.prompt("Proxy password", hide_input=True, err=True)
            client.proxy = proxies.with_credentials(proxy, user, password)
            client._source = None
            return run(main(client))
    except TunnelFailed as exc:
        fail(str(exc))
    except PortUnavailable as exc:
        fail(str(exc))
