"""Running the relay as a process: serve until a signal (SIGTERM drains, SIGINT stops at once,
a second signal ends a drain's grace), and reload the policy on SIGHUP or when the config or
policy file changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from tunnel_runtime.loop import loop_name

from .app import RunningServer, running
from .build import build_policy
from .config import ConfigError, ServerConfig, load_config

log = logging.getLogger("tunnel.server")


class Reloader:
    """Re-reads the config file on SIGHUP and when it changes (mtime polled every
    ``interval`` s): a valid file swaps the policy atomically and re-decides open tunnels; an
    invalid one is logged with its precise error while the old policy stays in force."""

    def __init__(self, path: Path, server: RunningServer, interval: float = 1.0) -> None:
        self.path = path
        self.server = server
        self.interval = interval
        self._mtime = self._stat()

    def _stat(self) -> tuple[float, ...]:
        """Modification times of the config file and of the policy file it names."""
        paths = [self.path]
        if self.server.policy_file is not None:
            paths.append(self.server.policy_file)
        times = []
        for path in paths:
            try:
                times.append(path.stat().st_mtime)
            except OSError:
                times.append(-1.0)
        return tuple(times)

    def reload(self, why: str) -> bool:
        try:
            config = load_config(self.path)
            policy = build_policy(config)
        except ConfigError as exc:
            log.error("configuration not reloaded (%s), the previous policy stays: %s", why, exc)
            return False
        closed = self.server.relay.set_policy(policy)  # HTTP mode re-decides too (subscribed)
        log.info("policy reloaded (%s); %d tunnel(s) closed", why, closed)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
                self.reload("file changed")


async def serve_forever(config: ServerConfig, path: Path | None = None) -> None:
    """Run until SIGTERM (graceful drain, ``tunnel.drain_grace``) or SIGINT (at once: tunnels
    close with 1001); a second signal during a drain ends its grace. SIGHUP (and file changes)
    reload the policy from ``path``."""
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass
    async with running(config) as srv, asyncio.TaskGroup() as tasks:
        try:
            await srv.verifier.refresh()
        except Exception as exc:  # the relay still starts; /readyz reports it
            log.warning("issuer not reachable at start: %s", exc)
        watcher = None
        if path is not None:
            reloader = Reloader(path, srv)
            watcher = tasks.create_task(reloader.watch())
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        log.info("listening on %s (event loop: %s)", srv.url, loop_name())
        print(f"Listening on {srv.url}", file=sys.stderr, flush=True)
        if srv.http_port is not None:
            print(f"HTTP mode listening on port {srv.http_port}", file=sys.stderr, flush=True)
        if srv.admin_port is not None:
            print(f"Admin listening on port {srv.admin_port}", file=sys.stderr, flush=True)
        if srv.metrics_port is not None:
            print(f"Metrics listening on port {srv.metrics_port}", file=sys.stderr, flush=True)
        received = await signals.get()
        if received == signal.SIGTERM:
            srv.relay.draining = True  # /readyz answers 503 from this instant
            print("SIGTERM: draining", file=sys.stderr, flush=True)
            drain = tasks.create_task(srv.drain())
            again = tasks.create_task(signals.get())
            await asyncio.wait((drain, again), return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                log.info("second signal: ending the grace period")
                srv.relay.end_grace()
                await drain
            again.cancel()
        log.info("shutting down")
        if watcher is not None:
            watcher.cancel()
