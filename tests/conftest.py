"""Shared fixtures: a test OIDC issuer and TCP targets on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .helpers import TcpTarget
from .oidc_fixture import TestIssuer


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
