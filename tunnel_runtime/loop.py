"""Process-level tuning shared by the relay and the client: event loop choice and malloc."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

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


def run(main: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """asyncio.run, on uvloop when it is installed (the optional ``uvloop`` extra)."""
    tune_malloc()
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(main)  # typed even where uvloop is not installed
            return result
    return asyncio.run(main)
