"""Which event loop runs: uvloop by default where it is installed (a regular dependency), plain
asyncio on request or where it is absent, and the relay's start-up line names it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import sys
from pathlib import Path

import pytest
import yaml

from tunnel_runtime.loop import loop_name, run

from ..helpers import relay_config_data
from ..oidc_fixture import TestIssuer
from ..processes import started


async def _name() -> str:
    return loop_name()


def test_loop_name_on_asyncio() -> None:
    assert asyncio.run(_name()) == "asyncio"
    assert run(_name(), use_uvloop=False) == "asyncio"


def test_the_default_is_uvloop_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    assert run(_name()) == f"uvloop {uvloop.__version__}"


def test_run_says_which_loop_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    # The client's -vv output: tunnel_client's CLI runs every command through runtime.run.
    with caplog.at_level(logging.DEBUG, logger="tunnel.runtime"):
        run(_name(), use_uvloop=False)
    assert "event loop: asyncio" in caplog.messages


async def test_relay_start_up_line_names_the_loop(issuer: TestIssuer, tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(relay_config_data(issuer, tmp_path, tls=False)))
    argv = [sys.executable, "-m", "tunnel_server", "serve", "--config", str(path)]
    pattern = r"listening on ws://\S+ \(event loop: ([^)]+)\)"
    async with started(argv, pattern, stdout=False) as relay:
        expected = "asyncio"
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # Windows, PyPy
            expected = f"uvloop {importlib.metadata.version('uvloop')}"
        assert relay.found == expected
