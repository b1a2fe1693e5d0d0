"""HTTP mode's other processes (``http.workers`` > 1), seen from the relay's process: start
``workers - 1`` of ``tunnel_server.http_worker`` on this process's HTTP port, tell them of every
policy change and user revocation on their standard input (length-prefixed pickles, parent to
child only), watch them, stop them on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
import time

from ..access.policy import Policy
from ..config import ConfigError, ServerConfig

log = logging.getLogger("tunnel.http")


class HttpWorkers:
    """The other ``http.workers - 1`` HTTP-mode processes (``tunnel_server.http_worker``) on
    this process's HTTP port: started with the config, told of every policy change and user
    revocation on their standard input, stopped on the way out."""

    START_TIMEOUT = 60.0

    def __init__(self) -> None:
        self._procs: list[asyncio.subprocess.Process] = []
        self._watches: list[asyncio.Task[None]] = []

    async def _watch(self, n: int, proc: asyncio.subprocess.Process) -> None:
        """A worker that exits while the relay runs is not restarted: say so (the kernel
        sends new connections to the processes still listening)."""
        code = await proc.wait()
        log.error("HTTP-mode worker %d exited (code %s); the other processes serve", n, code)

    @classmethod
    async def start(cls, config: ServerConfig, port: int, count: int, node: str) -> HttpWorkers:
        workers = cls()
        try:
            for n in range(count):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tunnel_server.http_worker",
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                workers._procs.append(proc)
                workers._send(proc, {"config": config, "port": port, "node": f"{node}/w{n + 1}"})
                assert proc.stdout is not None
                ready = await asyncio.wait_for(proc.stdout.readline(), cls.START_TIMEOUT)
                if ready != b"ready\n":
                    raise ConfigError(f"http.workers: worker {n + 1} did not start (see its log)")
                workers._watches.append(asyncio.create_task(workers._watch(n + 1, proc)))
        except BaseException:
            await workers.aclose()
            raise
        return workers

    @staticmethod
    def _send(proc: asyncio.subprocess.Process, message: dict[str, object]) -> None:
        data = pickle.dumps(message)
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(struct.pack("!I", len(data)) + data)

    def policy_changed(self, policy: Policy) -> None:
        for proc in self._procs:
            self._send(proc, {"policy": (policy.source, policy.rules)})

    def revoke_user(self, principal: str, at: float | None = None) -> None:
        moment = time.time() if at is None else at
        for proc in self._procs:
            self._send(proc, {"revoke_user": (principal, moment)})

    async def aclose(self) -> None:
        for watch in self._watches:
            watch.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        for proc in self._procs:
            if proc.stdin is not None:
                proc.stdin.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._procs.clear()
