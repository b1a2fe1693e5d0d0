"""Child processes for the benchmark suite: start pinned, wait until ready, read CPU time and
memory from /proc, re-pin every thread, stop. Linux only (the suite reads /proc)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

CLIENT_CPU = 0  # sources, local forwarders, load generators
SERVER_CPU = 1  # relays, targets, sinks
TASKSET = shutil.which("taskset")
PINNING = TASKSET is not None and (os.cpu_count() or 1) >= 2
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT = 30.0


def raise_nofile(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for this process and its children; returns the soft limit reached
    (the hard limit rises only for root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (read from /proc: no probe connection,
    which iperf3 would take for a client)."""
    needle = f":{port:04X} "
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                    return True
    return False


async def wait_listening(
    port: int, proc: Proc | None = None, within: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + within
    while not _listening(port):
        if proc is not None and proc.process.returncode is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.process.returncode}): {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        await asyncio.sleep(0.02)


@dataclass(eq=False)
class Proc:
    """One child process; its stdout and stderr go to a log file in the work directory."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    cpu: int | None
    extra_pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def wait_for_line(self, pattern: str, within: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (the process prints its port)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + within
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if self.process.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r}:\n{self.log_tail()}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        _LIVE.discard(self)
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 3.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        # Fork-per-connection servers (socat, websockify) may leave children behind.
        for pid in descendants(self.pid) + self.extra_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


async def spawn(
    name: str,
    argv: list[str],
    workdir: Path,
    *,
    cpu: int | None,
    env: dict[str, str] | None = None,
    stdin: int | None = asyncio.subprocess.DEVNULL,
) -> Proc:
    """Start ``argv`` pinned to ``cpu`` with ``taskset -c`` (when pinning is possible)."""
    log = workdir / f"{name}.log"
    if PINNING and cpu is not None:
        assert TASKSET is not None
        argv = [TASKSET, "-c", str(cpu), *argv]
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=out, stderr=asyncio.subprocess.STDOUT, env=env
        )
    finally:
        os.close(out)
    proc = Proc(name, process, log, cpu)
    _LIVE.add(proc)
    return proc


_LIVE: set[Proc] = set()


def kill_all() -> None:
    """Last resort on the way out (an error or Ctrl-C): no child outlives the suite."""
    for proc in list(_LIVE):
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    _LIVE.clear()


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# -- /proc readers ------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc/PID/task/TID/children)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid``, its reaped children and its live descendants."""
    total = 0
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # After ")": state is field 3, utime 14, stime 15, cutime 16, cstime 17 (1-based in proc(5)).
    total += sum(int(v) for v in fields[11:15])
    for child in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += sum(int(v) for v in _stat_fields(child)[11:13])
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def pss_bytes(pid: int, *, with_descendants: bool = True) -> int:
    """Proportional set size of ``pid`` (and its descendants): the fair memory figure for
    fork-per-connection servers whose children share copy-on-write pages."""
    pids = [pid, *descendants(pid)] if with_descendants else [pid]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def pin(pid: int, cpu: int | None) -> None:
    """Move every thread of ``pid`` and of its descendants to ``cpu`` (None: all CPUs)."""
    if not PINNING:
        return
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    for p in [pid, *descendants(pid)]:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)
