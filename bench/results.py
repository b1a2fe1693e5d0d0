"""What the benchmark suite measures with (``Settings``) and what it found (``Results``): shared
by the suite that fills them, and the report and analysis that read them."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from . import gate

Figures = dict[str, float]


@dataclass
class Settings:
    runs: int = 3
    seconds: int = 1  # per iperf3 measurement
    churn_seconds: float = 1.0
    rtt_count: int = 3000
    rtt_seconds: float = 1.0
    idle_count: int = 1000
    idle_big: int = 10000  # wss on uvloop only (the product's default); 0 to skip
    idle_fork_count: int = 100  # websockify / socat: a process per connection
    gcloud_runs: int = 1
    nofile: int = 0
    only: tuple[str, ...] = ()


@dataclass
class Results:
    runs: dict[str, list[Figures]] = field(default_factory=dict)
    memory: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    load: list[float] = field(default_factory=list)  # 1-minute load average, start and end
    # The load at the start of the `make bench` run (this suite's own start when run alone):
    # targets are judged only when it was at most gate.QUIET.
    judge_load: float = 0.0

    @property
    def judged(self) -> bool:
        return gate.judged(self.judge_load)

    def add(self, name: str, figures: Figures) -> None:
        self.runs.setdefault(name, []).append(figures)

    def median(self, name: str, key: str) -> float | None:
        values = [run[key] for run in self.runs.get(name, []) if key in run]
        return statistics.median(values) if values else None
