"""``tunnel-client http APP_URL``: a local HTTP proxy to an app behind HTTP mode. Every request
(and WebSocket) is forwarded to APP_URL with ``Authorization: Bearer <token>`` (or
``Proxy-Authorization`` when the local client sends its own ``Authorization``), so curl,
scripts and a local browser reach the protected app. Bodies stream both ways."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import click
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tunnel_runtime.loop import run
from tunnel_runtime.wsbridge import forward_messages

from . import proxies
from .cli_options import common_options, fail, proxy_setting, resolve, ssl_context
from .credentials import CredentialManager
from .login import ServiceAccount, canonical_server
from .oidc import LoginRequired, OidcError
from .tokens import NoCredentials, token_provider

TokenSource = Callable[[], Awaitable[str]]
HOP_BY_HOP = frozenset(
    "connection keep-alive proxy-authenticate proxy-authorization proxy-connection te trailer "
    "trailers transfer-encoding upgrade host".split()
)


def _clean(
    headers: CIMultiDict[str] | web.BaseRequest | aiohttp.ClientResponse,
) -> CIMultiDict[str]:
    source = headers.headers if not isinstance(headers, CIMultiDict) else headers
    named = {t.strip().lower() for v in source.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in source.items():
        if name.lower() not in HOP_BY_HOP | named:
            out.add(name, value)
    return out


def proxy_app(
    app_url: str,
    token: TokenSource,
    *,
    ssl_context: ssl.SSLContext | None = None,
    proxy: str | None = None,
) -> web.Application:
    """``ssl_context`` verifies the app's certificate (``--ca-file``, ``--insecure-skip-verify``);
    ``proxy`` is the corporate proxy to reach it through (tunnel_client.proxies decides)."""
    base = app_url.rstrip("/")
    session: dict[str, aiohttp.ClientSession] = {}

    async def startup(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
            proxy=proxy,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def cleanup(app: web.Application) -> None:
        await session["s"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        client = session["s"]
        headers = _clean(request)
        bearer = f"Bearer {await token()}"
        if "Authorization" in headers:
            headers["Proxy-Authorization"] = bearer
        else:
            headers["Authorization"] = bearer
        headers.popall("Expect", None)
        target = URL(base + request.raw_path, encoded=True)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await _websocket(request, client, target, headers)
        try:
            upstream = await client.request(
                request.method,
                target,
                headers=headers,
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return web.Response(status=502, text=f"cannot reach {base}: {type(exc).__name__}\n")
        try:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=_clean(upstream)
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(65536):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    app = web.Application(client_max_size=0)
    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _websocket(
    request: web.Request, client: aiohttp.ClientSession, target: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    for name in list(headers.keys()):
        if name.lower().startswith("sec-websocket-") or name.lower() == "origin":
            headers.popall(name, None)
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    try:
        upstream = await client.ws_connect(
            target.with_scheme("wss" if target.scheme == "https" else "ws"),
            headers=headers,
            protocols=[p for p in protocols if p],
        )
    except (aiohttp.ClientError, OSError, TimeoutError):
        return web.Response(status=502, text="WebSocket refused by the app\n")
    local = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
    await local.prepare(request)

    tasks = [
        asyncio.create_task(forward_messages(local, upstream)),
        asyncio.create_task(forward_messages(upstream, local)),
    ]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await upstream.close()
    await local.close()
    return local


def make_token_source(
    *,
    server: str | None,
    profile: str,
    audience: str | None,
    credential_file: Path | None,
    access_token_file: Path | None,
    proxy: str | None = None,
) -> TokenSource:
    """``--audience``: a token for that resource (as ``print-identity-token --audience``);
    otherwise the same token as tunnels use."""
    if audience is None:
        return token_provider(
            access_token_file,
            server=server,
            credential_file=credential_file,
            profile=profile,
            proxy=proxy,
        )
    if credential_file is not None:
        account = ServiceAccount(credential_file, proxy=proxy)

        async def from_account() -> str:
            return (await account.tokens(resource=audience)).access_token

        return from_account
    if server is None:
        raise NoCredentials("--audience needs --server (the login to use) or --credential-file")
    manager = CredentialManager(canonical_server(server), profile=profile, proxy=proxy)
    return lambda: manager.token_for(audience)


async def serve(
    app_url: str,
    host: str,
    port: int,
    token: TokenSource,
    *,
    ssl_context: ssl.SSLContext | None = None,
    proxy: str | None = None,
) -> None:
    await token()  # fail now (not on the first request) when there are no credentials
    app = proxy_app(app_url, token, ssl_context=ssl_context, proxy=proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    click.echo(f"Listening on port [{bound}].")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@click.command("http", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("app_url")
@click.option(
    "--local-host-port",
    default="localhost:0",
    show_default=True,
    help="Where the local proxy listens.",
)
@common_options
@click.option("--audience", help="Resource to request a token for (the app's audience).")
@click.option(
    "--credential-file",
    type=click.Path(path_type=Path),
    envvar="TUNNEL_CREDENTIAL_FILE",
    help="Service-account credential file (env TUNNEL_CREDENTIAL_FILE).",
)
@click.option(
    "--access-token-file",
    type=click.Path(path_type=Path),
    help="File holding the bearer token (re-read for every request).",
)
@click.pass_context
def http_command(
    ctx: click.Context,
    /,
    app_url: str,
    local_host_port: str,
    audience: str | None,
    **kw: Any,
) -> None:
    """Serve a local HTTP proxy to APP_URL (an app behind HTTP mode) that adds your token.
    --ca-file and --insecure-skip-verify apply to APP_URL's certificate.

    \b
    Example:
      tunnel-client http https://app.example.com/ --local-host-port=localhost:8080
      curl http://localhost:8080/
    """
    if not app_url.startswith(("https://", "http://")):
        raise click.UsageError("APP_URL must be http(s)://HOST[:PORT]")
    host, sep, port_text = local_host_port.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise click.UsageError("--local-host-port must be HOST:PORT")
    settings = resolve(ctx, kw)
    proxy = proxy_setting(settings)
    context = ssl_context(settings) if app_url.startswith("https:") else None
    try:
        source = make_token_source(
            server=settings.server, profile=settings.profile, audience=audience,
            credential_file=settings.credential_file,
            access_token_file=settings.access_token_file, proxy=proxy,
        )  # fmt: skip
        with contextlib.suppress(KeyboardInterrupt):
            run(
                serve(
                    app_url,
                    host.strip("[]") or "localhost",
                    int(port_text),
                    source,
                    ssl_context=context,
                    proxy=proxies.proxy_for(app_url, proxy),
                )  # fmt: skip
            )
    except (NoCredentials, OidcError, LoginRequired) as exc:
        fail(str(exc))


def register(main: click.Group) -> None:
    main.add_command(http_command)
