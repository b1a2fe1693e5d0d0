"""``make bench`` as a whole, and its one judging rule: targets are judged only when the 1-minute
load average at the start of the run was at most 0.5. A busy run still measures everything, says
that its targets are not judged, and exits 3 (1 when a step failed).

    .venv/bin/python -m bench.gate [--out docs/benchmarks.md]

Each step is its own process; the run's start load goes to them in ``BENCH_LOAD_START``, so a
step judges by the machine as the run found it, not by the load the previous steps made. A step
run alone reads the load itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

QUIET = 0.5  # 1-minute load average at the start above which no target is judged
BUSY_EXIT = 3  # exit code of a run that measured but judged nothing
FAILED_EXIT = 1
ENV = "BENCH_LOAD_START"

# The steps of `make bench`, in order: the suite writes docs/benchmarks.md whole, the next three
# replace their own sections of it.
STEPS: tuple[tuple[str, ...], ...] = (
    ("bench",),
    ("bench.http_mode", "--out", "docs/benchmarks.md"),
    ("bench.proxy_header", "--out", "docs/benchmarks.md"),
    ("bench.ssh_cert", "--out", "docs/benchmarks.md"),
    ("bench.cluster", "--out", "docs/benchmarks-cluster.md"),
    ("bench.audit_search", "--out", "docs/benchmarks-audit.md"),
)


def load1() -> float:
    """The 1-minute load average now."""
    return os.getloadavg()[0]


def start_load() -> float:
    """The load at the start of the ``make bench`` run this step belongs to, or now when the
    step runs alone."""
    given = os.environ.get(ENV)
    if given:
        try:
            return float(given)
        except ValueError:
            pass
    return load1()


def judged(start: float) -> bool:
    return start <= QUIET


def verdict(start: float, end: float) -> str:
    """One line for the output and the docs: the loads and whether targets were judged."""
    loads = f"load average (1 min) {start:.2f} at the start, {end:.2f} at the end"
    if judged(start):
        return f"{loads}: quiet at the start, targets judged."
    return (
        f"{loads}: above {QUIET} at the start, so the targets are NOT judged (other work was "
        f"running: figures are low and noisy); rerun on a quiet machine. Exit {BUSY_EXIT}."
    )


def exit_if_busy(start: float, end: float) -> None:
    """The end of a step: say whether its targets were judged, and exit 3 when they were not
    (``make bench`` counts that step as run, not as failed)."""
    print(verdict(start, end), file=sys.stderr, flush=True)
    if not judged(start):
        sys.exit(BUSY_EXIT)


@dataclass
class Step:
    argv: tuple[str, ...]
    code: int


def _section(start: float, end: float, steps: list[Step], began: str) -> str:
    lines = [
        "## This `make bench` run",
        "",
        f"Started {began}; {verdict(start, end)}",
        "",
        "| step | exit |",
        "|---|---:|",
    ]
    for step in steps:
        shown = "not judged (busy)" if step.code == BUSY_EXIT else str(step.code)
        lines.append(f"| `python -m {' '.join(step.argv)}` | {shown} |")
    return "\n".join(lines) + "\n"


def run_all(out: Path, steps: Sequence[tuple[str, ...]] = STEPS) -> int:
    """Run every step with the run's start load in the environment; returns the exit code."""
    start = load1()
    began = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"make bench: load average (1 min) at the start: {start:.2f}", flush=True)
    if not judged(start):
        print(
            f"make bench: the machine is busy (above {QUIET}): measuring anyway, but no target "
            f"will be judged and the run exits {BUSY_EXIT}.",
            flush=True,
        )
    env = {**os.environ, ENV: f"{start:.2f}"}
    done: list[Step] = []
    for argv in steps:
        code = subprocess.call([sys.executable, "-m", *argv], env=env)
        done.append(Step(argv, code))
        if code not in (0, BUSY_EXIT):
            print(f"make bench: python -m {' '.join(argv)} exited {code}", flush=True)
    end = load1()
    from .sections import write_section

    write_section(out, _section(start, end, done, began), name="make-bench")
    print(f"make bench: {verdict(start, end)}", flush=True)
    if any(step.code not in (0, BUSY_EXIT) for step in done):
        return FAILED_EXIT
    return 0 if judged(start) else BUSY_EXIT


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    sys.exit(run_all(args.out))


if __name__ == "__main__":
    main()
