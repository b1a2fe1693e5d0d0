"""``tunnel-client up [PROFILE]``: every forward of the profile in one process, with one login.

Each forward is a local listener whose connections are tunnels to its target. A forward that
fails (its port is taken, the relay denies it, the target is unreachable) shows its error and
leaves the others running. On a terminal a compact table redraws every second; otherwise each
event is one log line on stderr. Ctrl-C (or SIGTERM) closes every listener and tunnel. The
live state is also served on the control socket (tunnel_client.control) for ``status``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import click

from tunnel_protocol.urls import Target

from . import control
from .api import Client
from .cli_options import Settings, fail, resolve, target_options
from .cli_run import make_client, run_tunnel
from .config import ConfigError, ConfigFile, Forward
from .errors import TunnelFailed, describe_target
from .listener import LocalListener, PortUnavailable
from .session import check_connection, get_token

CONTEXT = {"help_option_names": ["-h", "--help"]}
REDRAW = 1.0


@dataclass
class Running:
    """One forward's live state."""

    forward: Forward
    target: Target | None
    state: str = "starting"
    listen: str = ""
    error: str = ""
    listener: LocalListener | None = None
    log: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        open_, resuming, up, down = self.listener.stats() if self.listener else (0, 0, 0, 0)
        return {
            "name": self.forward.name,
            "listen": self.listen,
            "target": describe_target(self.target) if self.target else self.forward.destination,
            "state": self.state,
            "open": open_,
            "resuming": resuming,
            "up": up,
            "down": down,
            "error": self.error,
        }


def _target(forward: Forward, client: Client) -> Target:
    if forward.host is not None:
        return client.host(
            forward.host, forward.port, region=forward.region, network=forward.network,
            group=forward.dest_group, project=forward.project,
        )  # fmt: skip
    assert forward.instance is not None
    return client.instance(forward.instance, forward.port, zone=forward.zone,
                           project=forward.project)  # fmt: skip


class Up:
    """The forwards of one profile, each isolated from the others' failures."""

    def __init__(self, client: Client, forwards: list[Forward], tty: bool) -> None:
        self.client = client
        self.tty = tty
        self.forwards: list[Running] = []
        for forward in forwards:
            try:
                self.forwards.append(Running(forward, _target(forward, client)))
            except ValueError as exc:
                self.forwards.append(Running(forward, None, state="failed", error=str(exc)))
        self._drawn = 0

    def emit(self, running: Running, message: str) -> None:
        if not self.tty:
            click.echo(f"{running.forward.name}: {message}", err=True)

    def snapshot(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "forwards": [r.row() for r in self.forwards]}

    async def start(self, running: Running) -> None:
        if running.target is None:
            self.emit(running, f"ERROR: {running.error}")
            return
        options = self.client.options(running.target)
        host, _, port = running.forward.local.rpartition(":")
        listener = LocalListener(
            options, host or "127.0.0.1", int(port), report=lambda m: self._failed(running, m)
        )
        listener.on_event = lambda message: self.emit(running, message)
        try:
            bound = await listener.start()
        except PortUnavailable as exc:
            running.state, running.error = "failed", str(exc)
            self.emit(running, f"ERROR: {exc}")
            return
        running.listener = listener
        running.listen = f"{host or '127.0.0.1'}:{bound}"
        running.state = "checking"
        try:
            await check_connection(options)
            running.state = "listening"
        except TunnelFailed as exc:
            running.state = "denied" if exc.code in (4033, 4047, 403) else "failing"
            running.error = " ".join(str(exc).splitlines())
            self.emit(running, f"ERROR: {running.error}")
        self.emit(running, f"listening on {running.listen} -> {describe_target(running.target)}")

    def _failed(self, running: Running, message: str) -> None:
        running.error = " ".join(message.removeprefix("ERROR: ").splitlines())
        self.emit(running, f"ERROR: {running.error}")

    async def serve(self, running: Running) -> None:
        await self.start(running)
        if running.listener is not None:
            await running.listener.serve()

    def draw(self) -> None:
        lines = [control.format_row(r.row()) for r in self.forwards]
        lines.append(f"{time.strftime('%H:%M:%S')}  Ctrl-C closes every forward.")
        out = sys.stderr
        if self._drawn:
            out.write(f"\033[{self._drawn}F")
        width = max(20, shutil.get_terminal_size().columns - 1)
        for line in lines:
            out.write("\033[2K" + line[:width] + "\n")
        out.flush()
        self._drawn = len(lines)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for running in self.forwards:
                tg.create_task(self.serve(running))
            if self.tty:
                tg.create_task(self._redraw())

    async def _redraw(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(REDRAW)


async def _up(settings: Settings, client: Client, forwards: list[Forward]) -> bool:
    """Run until a signal (True) or until every forward has failed (TunnelFailed)."""
    up = Up(client, forwards, sys.stderr.isatty())
    first = next((r.target for r in up.forwards if r.target is not None), None)
    if first is not None:
        await get_token(client.options(first))  # one login for all; fail now if there is none
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    async with control.serve(settings.profile, up.snapshot):
        task = asyncio.create_task(up.run())
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    total = sum(r.listener.connections for r in up.forwards if r.listener)
    click.echo(f"Closed {len(up.forwards)} forward(s) and their {total} connection(s).", err=True)
    if not stop.is_set():  # every forward ended by itself: none could listen
        raise TunnelFailed("no forward could be opened (see the errors above)")
    return True


def register(main: click.Group) -> None:
    @main.command("up", context_settings=CONTEXT)
    @click.argument("profile_name", metavar="[PROFILE]", required=False)
    @target_options
    @click.pass_context
    def up_command(ctx: click.Context, /, profile_name: str | None, **kw: Any) -> None:
        """Open every forward of PROFILE (default: --profile, TUNNEL_PROFILE or 'default')
        from the config file, in this one process, until Ctrl-C.

        \b
        Example:
          tunnel-client config add-forward db db-1 5432 --local 127.0.0.1:5432
          tunnel-client config add-forward web web-1 80 --local 127.0.0.1:8080
          tunnel-client up
        """
        if profile_name is not None:
            kw["profile"] = profile_name
        settings = resolve(ctx, kw)
        try:
            forwards = ConfigFile().forwards(settings.profile)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from None
        if not forwards:
            raise click.UsageError(
                f"profile {settings.profile} has no forwards: add one with "
                "`tunnel-client config add-forward NAME INSTANCE PORT --local HOST:PORT`"
            )
        client = make_client(settings)
        try:
            run_tunnel(settings, client, lambda c: _up(settings, c, forwards))
        except control.AlreadyRunning as exc:
            fail(str(exc))
        sys.exit(130)  # interrupted (Ctrl-C or SIGTERM), as start-tunnel reports it
