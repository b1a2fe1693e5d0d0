"""Shared fixtures: a test OIDC issuer and TCP targets on loopback, and the session-wide scan
proving that no minted token ever reaches a log line or an audit record."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from .helpers import LOG_LINES, TcpTarget
from .oidc_fixture import MINTED, TestIssuer
from .redis_fixture import redis as redis  # the `redis` fixture: a real redis-server on loopback


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
