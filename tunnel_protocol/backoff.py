"""Reconnect backoff as a pure generator; the caller does the sleeping."""

from __future__ import annotations

import random
from collections.abc import Iterator


def backoff(
    initial: float = 0.1,
    factor: float = 1.5,
    cap: float = 10.0,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Yield delays: ``initial``, growing by ``factor`` up to ``cap``, each +/- ``jitter``."""
    rnd = rng or random.Random()
    delay = min(cap, initial)
    while True:
        yield delay * (1 + jitter * (2 * rnd.random() - 1))
        delay = min(cap, delay * factor)
