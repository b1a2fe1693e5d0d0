"""The HTTP-mode section of docs/benchmarks.md: the table of ``bench.http_mode``'s medians, the
ratios, and issue 17's targets, judged only when the machine was quiet."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float = 0.0  # the proxy's CPU (user + system) per request, from /proc


@dataclass
class Results:
    load_start: float
    load_end: float = 0.0
    runs: dict[str, list[Run]] = field(default_factory=dict)

    def median(self, case: str) -> Run:
        runs = self.runs[case]
        return Run(*(statistics.median(getattr(r, f) for r in runs)
                     for f in ("rps", "p50_ms", "p99_ms", "cpu_us")))  # fmt: skip


BARE = "bare aiohttp proxy, uvloop"
NGINX = "nginx reverse proxy"


def _targets(results: Results) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for bearer and cookie: the median over rounds of each
    round's own figure (ratios between cases measured minutes apart on a busy machine would
    mostly measure the machine)."""
    runs = results.runs
    rounds = range(min(len(r) for r in runs.values()))
    nginx, bare = runs[NGINX], runs[BARE]
    rows = []
    for kind in ("bearer", "cookie"):
        ours = runs[f"HTTP mode, {kind}"]
        one, two = runs[f"1 worker, {kind}"], runs[f"2 workers, {kind}"]
        to_bare = statistics.median(ours[i].rps / bare[i].rps for i in rounds)
        to_nginx = statistics.median(ours[i].rps / nginx[i].rps for i in rounds)
        added = statistics.median(ours[i].p50_ms - nginx[i].p50_ms for i in rounds)
        scale = statistics.median(two[i].rps / one[i].rps for i in rounds)
        rows += [
            (f"{kind}: × bare proxy (same stack)", to_bare, "≥ 0.9", to_bare >= 0.9),
            (f"{kind}: × nginx, one core", to_nginx, "≥ 0.3", to_nginx >= 0.3),
            (f"{kind}: added p50 over nginx (ms)", added, "≤ 1", added <= 1.0),
            (f"{kind}: 2 workers × 1 worker", scale, "≥ 1.7", scale >= 1.7),
        ]
    return rows


def _cpu_ratio(results: Results, kind: str) -> float:
    ours, bare = results.runs[f"HTTP mode, {kind}"], results.runs[BARE]
    rounds = range(min(len(ours), len(bare)))
    return statistics.median(ours[i].cpu_us / bare[i].cpu_us for i in rounds)


def render(results: Results, quiet: float, args: argparse.Namespace) -> str:
    judged = results.load_start <= quiet
    lines = [
        "## HTTP mode (issue 17)",
        "",
        "`python -m bench.http_mode` (part of `make bench`): wrk (1 thread) and the upstream "
        "(nginx, one worker, a 1 KiB response) on CPU 0, each proxy alone on CPU 1; 8 "
        "keep-alive connections; the worker rows unpinned with 32 connections. "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s, medians. Load average "
        f"{results.load_start:.2f} at the start, {results.load_end:.2f} at the end.",
        "",
        "| path | req/s | × nginx | × bare | p50 ms | p99 ms | CPU µs/req | runs (req/s) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    nginx, bare = results.median(NGINX), results.median(BARE)
    for case, runs in results.runs.items():
        m = results.median(case)
        every = ", ".join(f"{r.rps:.0f}" for r in runs)
        lines.append(
            f"| {case} | {m.rps:.0f} | {m.rps / nginx.rps:.3f} | {m.rps / bare.rps:.2f} | "
            f"{m.p50_ms:.3f} | {m.p99_ms:.3f} | {m.cpu_us:.0f} | {every} |"
        )
    ratios = ", ".join(f"{kind} {_cpu_ratio(results, kind):.2f}×" for kind in ("bearer", "cookie"))
    lines += ["", "CPU µs/req: the proxy processes' user + system CPU per request (/proc); other "
              "work on the machine disturbs it less than the throughput (it still shares caches "
              f"and cores). By it, HTTP mode costs {ratios} the bare proxy's CPU per request.",
              "",
              "Targets: medians over the rounds of each round's own ratio.", "",
              "| target | measured | wanted | " + ("met" if judged else "judged") + " |",
              "|---|---:|---|---|"]  # fmt: skip
    for what, value, wanted, met in _targets(results):
        verdict = ("yes" if met else "**no**") if judged else "not judged"
        lines.append(f"| {what} | {value:.2f} | {wanted} | {verdict} |")
    if not judged:
        lines += ["", f"Not judged: the load average at the start ({results.load_start:.2f}) "
                  f"was above {quiet}; rerun on a quiet machine."]  # fmt: skip
    return "\n".join(lines) + "\n"
