"""Process-level tuning shared by the relay and the client: event loop choice and malloc."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("tunnel.runtime")

# glibc's dynamic mmap threshold makes a fresh process land in a fast or a 2x slower state
# depending on early allocations (shared performance guide): pin both thresholds at start.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Fix glibc's malloc thresholds; a no-op (False) on other platforms or libcs."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024) == 1)
    ok = bool(mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024) == 1) and ok
    return ok


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The event loop running here (or ``loop``), for start-up logs: ``uvloop 0.21.0`` or
    ``asyncio``. Read from the loop's class, so a loop started by someone else is named too."""
    if loop is None:
        loop = asyncio.get_running_loop()
    package = type(loop).__module__.partition(".")[0]
    if package == "asyncio":
        return "asyncio"
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    return f"{package} {version}" if isinstance(version, str) else package


async def _announced(main: Coroutine[Any, Any, T]) -> T:
    # Once per process, at debug level: the client's -vv shows it; the relay names the loop in
    # its own start-up line.
    log.debug("event loop: %s", loop_name())
    return await main


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """asyncio.run, on uvloop where it is installed (a regular dependency wherever it builds:
    not on Windows or PyPy, where plain asyncio runs). ``use_uvloop=False`` forces asyncio."""
    tune_malloc()
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(_announced(main))  # typed even where uvloop is not installed
            return result
    return asyncio.run(_announced(main))
