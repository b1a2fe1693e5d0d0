"""The library API: tunnels from Python without the CLI (docs/library.md).

    client = Client("wss://relay.example.com", zone="europe-west1-b")
    async with client.connect(client.instance("db-1", 5432)) as (reader, writer): ...
    async with client.forward(client.instance("db-1", 5432)) as (host, port): ...
    with client.forward(client.instance("db-1", 5432)) as (host, port): ...     # own thread
    sock = client.open_socket(client.instance("vm1", 22))                        # paramiko
    issued = await client.ssh_certificate(client.instance("vm1", 22))           # SSH certificate
    await asyncssh.connect("vm1", tunnel=client.asyncssh_tunnel())               # asyncssh

A ``Client`` holds the relay, TLS, proxy and credential settings; the same sources as the CLI
(a cached login for a server and profile, a token file, ``$TUNNEL_ACCESS_TOKEN``, a service
account, or any callable returning a token). ``Client.from_profile`` reads them like the CLI
does: environment, then the config profile. Failures raise ``tunnel_client.errors`` types,
which carry the close code and reason. Every tunnel resumes transparently after a dropped
WebSocket, as the CLI's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnel_protocol.aio.stream import TcpStream
from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

from . import ssh_cert, tokens
from .config import ConfigFile
from .errors import TunnelFailed
from .listener import LocalListener
from .proxies import ProxySetting
from .session import ConnectOptions, TunnelSession, get_token, wait_established
from .sync import SyncForward, TunnelSocket

__all__ = ["AsyncsshTunnel", "Client", "Forward", "TokenLike"]

TokenLike = str | Callable[[], str] | Callable[[], Awaitable[str]] | tokens.TokenSource


def _parse_local(local: str) -> tuple[str, int]:
    host, sep, port = local.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"local must be HOST:PORT, got {local!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Client:
    """Settings shared by every tunnel it opens. ``token`` (a string, a callable or a
    TokenSource) wins over ``access_token_file``, then ``$TUNNEL_ACCESS_TOKEN``,
    ``credential_file``, and the login cached for ``server`` and ``profile``."""

    server: str
    token: TokenLike | None = None
    profile: str = "default"
    project: str = "default"
    zone: str | None = None
    region: str | None = None
    network: str | None = None
    ca_file: str | Path | None = None
    insecure_skip_verify: bool = False
    access_token_file: str | Path | None = None
    credential_file: str | Path | None = None
    device_cert: str | Path | None = None
    device_key: str | Path | None = None
    proxy: ProxySetting = None
    open_timeout: float = 10.0
    resume_timeout: float = 900.0
    ssl_context: ssl.SSLContext | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    _source: tokens.TokenSource | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_profile(cls, profile: str | None = None, **overrides: Any) -> Client:
        """Settings as the CLI resolves them: ``overrides``, then TUNNEL_* variables, then the
        config profile (``profile``, else $TUNNEL_PROFILE, else ``default``)."""
        environ: Mapping[str, str] = overrides.get("environ", os.environ)
        name = profile or environ.get("TUNNEL_PROFILE") or "default"
        values = ConfigFile().values(name)
        env = {
            "server": "TUNNEL_SERVER", "project": "TUNNEL_PROJECT", "zone": "TUNNEL_ZONE",
            "ca_file": "TUNNEL_CA_FILE", "credential_file": "TUNNEL_CREDENTIAL_FILE",
        }  # fmt: skip
        kwargs: dict[str, Any] = {"profile": name}
        for attr in ("server", "project", "zone", "region", "network", "ca_file",
                     "credential_file", "access_token_file", "device_cert", "device_key",
                     "insecure_skip_verify", "proxy"):  # fmt: skip
            if attr in overrides:
                continue
            if attr in env and environ.get(env[attr]):
                kwargs[attr] = environ[env[attr]]
            elif values.get(attr.replace("_", "-")) is not None:
                kwargs[attr] = values[attr.replace("_", "-")]
        kwargs.update(overrides)
        if not kwargs.get("server"):
            raise ValueError(f"no relay: set server in profile {name!r} or TUNNEL_SERVER")
        return cls(**kwargs)

    # -- targets --------------------------------------------------------------------------------

    def instance(
        self, name: str, port: int, *, zone: str | None = None, project: str | None = None
    ) -> InstanceTarget:
        chosen = zone or self.zone
        if not chosen:
            raise ValueError("an instance target needs a zone (Client(zone=...) or zone=)")
        return InstanceTarget(project or self.project, chosen, name, "nic0", port)

    def host(
        self,
        address: str,
        port: int,
        *,
        region: str | None = None,
        network: str | None = None,
        group: str | None = None,
        project: str | None = None,
    ) -> HostTarget:
        r, n = region or self.region, network or self.network
        if not (r and n):
            raise ValueError("a host target needs a region and a network")
        return HostTarget(project or self.project, r, n, address, group, port)

    # -- plumbing -------------------------------------------------------------------------------

    def token_source(self) -> tokens.TokenSource:
        if self._source is None:
            self._source = self._make_source()
        return self._source

    def _make_source(self) -> tokens.TokenSource:
        token = self.token
        if isinstance(token, tokens.TokenSource):
            return token
        if isinstance(token, str):
            fixed = token
            return tokens.from_callable(lambda: fixed)
        if token is not None:
            return tokens.from_callable(token)
        try:
            return tokens.token_provider(
                Path(self.access_token_file) if self.access_token_file else None,
                self.environ,
                server=self.server,
                credential_file=Path(self.credential_file) if self.credential_file else None,
                profile=self.profile,
                proxy=self.proxy,
            )
        except tokens.NoCredentials as exc:
            raise TunnelFailed(str(exc)) from None

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.server.startswith("wss:"):
            return None
        if self.ssl_context is None:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.device_cert:
                context.load_cert_chain(self.device_cert, self.device_key)
            if self.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self.ssl_context = context
        return self.ssl_context

    def options(self, target: Target) -> ConnectOptions:
        return ConnectOptions(
            server=self.server.rstrip("/"),
            target=target,
            token=self.token_source(),
            ssl_context=self._ssl(),
            open_timeout=self.open_timeout,
            resume_timeout=self.resume_timeout,
            proxy=self.proxy,
        )

    # -- SSH certificates ---------------------------------------------------------------------

    async def ssh_certificate(self, target: Target) -> ssh_cert.Issued:
        """A fresh in-memory Ed25519 key and the relay's certificate for it to reach ``target``:
        ``asyncssh.connect(..., client_keys=[(issued.key, issued.certificate)])``."""
        return await ssh_cert.issue(self.options(target), ssh_cert.ephemeral_key())

    async def ssh_ca(self) -> ssh_cert.CaKeys | None:
        """The relay's published CA keys (None: it issues no certificates); ``host_ca`` is a
        known_hosts line for ``asyncssh.import_known_hosts``."""
        # The request names no target; the options carry the relay, TLS and proxy settings.
        unused = InstanceTarget(self.project, "any", "any", "nic0", 22)
        return await ssh_cert.fetch_ca(self.options(unused))

    # -- the forms ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connect(
        self, target: Target
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """One tunnel as a (reader, writer) pair; raises on denial before the block runs.
        ``writer.write_eof()`` half-closes; leaving the block closes the tunnel."""
        async with _tunnel(self.options(target)) as local:
            reader, writer = await asyncio.open_connection(sock=local)
            try:
                yield reader, writer
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    def forward(self, target: Target, local: str = "127.0.0.1:0") -> Forward:
        """A local listener for the block: ``async with`` or ``with`` (own thread) gives
        (host, port); each accepted connection is its own tunnel."""
        return Forward(self.options(target), local)

    def open_socket(self, target: Target, timeout: float | None = None) -> TunnelSocket:
        """A connected socket whose peer is the target (for ``sock=`` of paramiko and others):
        the tunnel runs in its own thread until the socket is closed."""
        return TunnelSocket.open(self.options(target), timeout or self.open_timeout * 3)

    def asyncssh_tunnel(self, **target: Any) -> AsyncsshTunnel:
        """An object for ``asyncssh.connect(NAME, tunnel=...)``: NAME is the instance (or with
        ``region=``/``network=``, the host); keyword arguments as for ``instance``/``host``."""
        return AsyncsshTunnel(self, target)


@contextlib.asynccontextmanager
async def _tunnel(options: ConnectOptions) -> AsyncIterator[socket.socket]:
    """A tunnel to ``options.target`` whose local end is one half of a socketpair (yielded, for
    the caller to wrap): established (SID received) before the block runs."""
    near, far = socket.socketpair()
    loop = asyncio.get_running_loop()
    try:
        _, stream = await loop.create_connection(TcpStream, sock=near)
    except BaseException:
        near.close()
        far.close()
        raise
    session = TunnelSession(options)
    runner = asyncio.create_task(session.run(stream))
    try:
        await wait_established(session, runner)
        yield far
    finally:
        far.close()
        if not runner.done():
            try:
                async with asyncio.timeout(options.open_timeout):
                    await asyncio.shield(runner)
            except TimeoutError:
                runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, TunnelFailed):
            await runner
        stream.close()
        await stream.wait_closed()


class Forward:
    """``async with`` or ``with``: (host, port) of a listener whose connections are tunnels."""

    def __init__(self, options: ConnectOptions, local: str) -> None:
        self.options = options
        self.host, self.port = _parse_local(local)
        self.listener: LocalListener | None = None
        self._serve: asyncio.Task[None] | None = None
        self._sync: SyncForward | None = None

    async def __aenter__(self) -> tuple[str, int]:
        await get_token(self.options)
        listener = LocalListener(self.options, self.host, self.port, report=lambda _: None)
        port = await listener.start()
        self.listener = listener
        self._serve = asyncio.create_task(listener.serve())
        return self.host, port

    async def __aexit__(self, *exc: object) -> None:
        if self._serve is not None:
            self._serve.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve

    def __enter__(self) -> tuple[str, int]:
        self._sync = SyncForward(lambda: replace_forward(self))
        return self._sync.start(self.options.open_timeout * 3)

    def __exit__(self, *exc: object) -> None:
        if self._sync is not None:
            self._sync.stop()


def replace_forward(forward: Forward) -> Forward:
    """A fresh copy for another event loop (the sync form's thread)."""
    return Forward(forward.options, f"{forward.host}:{forward.port}")


class AsyncsshTunnel:
    """asyncssh's tunnel protocol: ``create_connection(session_factory, host, port)`` opens a
    tunnel to (host, port) and runs asyncssh's connection over a socketpair: no local port."""

    def __init__(self, client: Client, target: Mapping[str, Any]) -> None:
        self.client = client
        self.target = dict(target)
        self._runners: set[asyncio.Task[None]] = set()

    def _target(self, host: str, port: int) -> Target:
        if "region" in self.target or "network" in self.target or self.client.region:
            return self.client.host(host, port, **self.target)
        return self.client.instance(host, port, **self.target)

    async def create_connection(
        self, session_factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        opened: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def hold() -> None:
            try:
                async with _tunnel(self.client.options(self._target(host, port))) as local:
                    opened.set_result(local)
                    await done.wait()
            except BaseException as exc:
                if not opened.done():
                    opened.set_exception(exc)
                    return
                raise

        runner = asyncio.create_task(hold())
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        local = await opened
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(session_factory, sock=local)
        # The tunnel ends when asyncssh closes the transport: the far end then sees EOF.
        _on_close(transport, done.set)
        return transport, protocol

    def close(self) -> None:
        for runner in list(self._runners):
            runner.cancel()


def _on_close(transport: asyncio.BaseTransport, callback: Callable[[], None]) -> None:
    protocol = transport.get_protocol()
    lost = protocol.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        try:
            lost(exc)
        finally:
            callback()

    protocol.connection_lost = connection_lost  # type: ignore[method-assign]
