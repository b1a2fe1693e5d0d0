"""Shared fixtures: a test OIDC issuer and TCP targets on loopback, the session-wide scan
proving that no minted token ever reaches a log line or an audit record, and the per-test check
that no test leaves a file descriptor (socket, pipe, transport) open for the next one."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from .helpers import LOG_LINES, TcpTarget
from .oidc_fixture import MINTED, TestIssuer
from .postgres_fixture import postgres_cluster as postgres_cluster  # Debian's PostgreSQL
from .postgres_fixture import postgres_dsn as postgres_dsn  # a fresh database on it per test
from .redis_fixture import redis as redis  # the `redis` fixture: a real redis-server on loopback

# A suite started in the background by a shell without job control (`make test &` in a script,
# some CI runners) inherits SIGINT ignored, and so does every program it starts: the tests that end
# a client or a relay with Ctrl-C (SIGINT) would wait for it forever. With a handler here instead,
# the programs the tests start begin with the default disposition again (exec resets handlers).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            LOG_LINES.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not a leak
            pass


@pytest.fixture(scope="session", autouse=True)
def no_token_in_any_log() -> Iterator[None]:
    """Collect every record at INFO and above (the production level) from every logger, then
    fail the session if any token minted by a test appears in any of them or in an audit line."""
    handler = _Collect(level=logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(previous, logging.INFO) if previous else logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(previous)
    text = "\n".join(LOG_LINES)
    leaked = [token[:12] + "..." for token in set(MINTED) if len(token) > 20 and token in text]
    assert not leaked, f"{len(leaked)} token(s) appeared in logs or audit records: {leaked}"


_FD_DIR = "/proc/self/fd"
_warmed_up = False


def _open_fds() -> dict[str, str]:
    fds = {}
    for name in os.listdir(_FD_DIR):
        try:
            fds[name] = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:  # the fd listdir itself used, or one closed meanwhile
            pass
    return fds


def _warm_up_process_wide_descriptors() -> None:
    """libuv opens one signal pipe per process, the first time any uvloop loop handles a signal
    (tunnel-client's stdin mode does): open it before the first test, so that it is not taken
    for that test's leak."""
    try:
        import uvloop
    except ImportError:
        return

    async def handle_a_signal() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR2, lambda: None)
        loop.remove_signal_handler(signal.SIGUSR2)

    uvloop.run(handle_a_signal())


@pytest.fixture(autouse=True)
def no_leaked_descriptors() -> Iterator[None]:
    """Fail the test that leaves a descriptor open, not a later one: an unreferenced socket or
    transport is collected here, so its ResourceWarning (an error) is raised in this test's
    teardown; one still referenced fails with what it points at. Cheap when nothing leaked (one
    listing of /proc/self/fd); Linux only."""
    if not os.path.isdir(_FD_DIR):
        yield
        return
    global _warmed_up
    if not _warmed_up:
        _warm_up_process_wide_descriptors()
        _warmed_up = True
    before = _open_fds()
    yield
    leaked = {fd: target for fd, target in _open_fds().items() if before.get(fd) != target}
    if not leaked:
        return
    gc.collect()
    leaked = {fd: target for fd, target in _open_fds().items() if before.get(fd) != target}
    if leaked:
        pytest.fail(f"the test left {len(leaked)} descriptor(s) open: {sorted(leaked.values())}")


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as test_issuer:
        yield test_issuer


@pytest.fixture
async def echo() -> AsyncIterator[TcpTarget]:
    target = await TcpTarget("echo").start()
    yield target
    await target.stop()


@pytest.fixture
async def sink() -> AsyncIterator[TcpTarget]:
    target = await TcpTarget("sink").start()
    yield target
    await target.stop()
