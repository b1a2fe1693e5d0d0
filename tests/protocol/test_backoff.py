"""Reconnect backoff: a pure generator, deterministic with a seeded random.Random."""

from __future__ import annotations

import random
from itertools import islice

import pytest

from tunnel_protocol.backoff import backoff


def test_without_jitter_grows_by_factor_until_the_cap() -> None:
    delays = list(islice(backoff(initial=1.0, factor=2.0, cap=10.0, jitter=0.0), 7))
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_gcloud_schedule() -> None:
    # gcloud: from 1.5 s, x1.1, capped at 20 s.
    delays = list(islice(backoff(initial=1.5, factor=1.1, cap=20.0, jitter=0.0), 40))
    assert delays[0] == 1.5
    assert delays[1] == pytest.approx(1.65)
    assert delays[2] == pytest.approx(1.815)
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert max(delays) == 20.0
    assert delays[-1] == 20.0


def test_defaults() -> None:
    delays = list(islice(backoff(jitter=0.0), 30))
    assert delays[0] == 0.1
    assert delays[1] == pytest.approx(0.15)
    assert delays[-1] == 10.0


def test_initial_above_cap_is_capped() -> None:
    delays = list(islice(backoff(initial=30.0, factor=2.0, cap=20.0, jitter=0.0), 3))
    assert delays == [20.0, 20.0, 20.0]


def test_seeded_rng_is_deterministic() -> None:
    first = list(islice(backoff(rng=random.Random(42)), 50))
    second = list(islice(backoff(rng=random.Random(42)), 50))
    other = list(islice(backoff(rng=random.Random(43)), 50))
    assert first == second
    assert first != other


@pytest.mark.parametrize("seed", range(5))
def test_jitter_bounds(seed: int) -> None:
    initial, factor, cap, jitter = 0.5, 1.5, 8.0, 0.25
    jittered = islice(backoff(initial, factor, cap, jitter, random.Random(seed)), 200)
    base = islice(backoff(initial, factor, cap, 0.0), 200)
    for delay, nominal in zip(jittered, base, strict=True):
        assert nominal * (1 - jitter) <= delay <= nominal * (1 + jitter)


def test_jitter_spreads_both_ways() -> None:
    rng = random.Random(7)
    delays = list(islice(backoff(initial=1.0, factor=1.0, cap=1.0, jitter=0.5, rng=rng), 500))
    assert min(delays) < 0.6
    assert max(delays) > 1.4
    assert all(0.5 <= d <= 1.5 for d in delays)


def test_jitter_uses_the_given_rng() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__(0)
            self.value = value

        def random(self) -> float:
            return self.value

    assert next(backoff(initial=2.0, jitter=0.1, rng=Fixed(0.0))) == pytest.approx(1.8)
    assert next(backoff(initial=2.0, jitter=0.1, rng=Fixed(0.5))) == pytest.approx(2.0)
    assert next(backoff(initial=2.0, jitter=0.1, rng=Fixed(1.0))) == pytest.approx(2.2)


def test_never_ends() -> None:
    gen = backoff(initial=1.0, factor=3.0, cap=5.0, jitter=0.0)
    for _ in range(10_000):
        assert next(gen) <= 5.0
