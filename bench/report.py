"""Markdown for the suite: machine information, the tables, the targets of issue 7."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .gate import QUIET
from .procs import PINNING

if TYPE_CHECKING:
    from .results import Results, Settings

DIRECT = "direct TCP"
SOCAT1 = "socat, one hop"
SOCAT2 = "socat, two hops"
GCLOUD = "gcloud CLI + relay, wss, uvloop"


def websockify(scheme: str) -> str:
    return f"websockify, {scheme}"


def bare(scheme: str) -> str:
    return f"bare websockets chain, {scheme}, uvloop"


def picows(scheme: str) -> str:
    return f"bare picows chain, {scheme}, uvloop"


def relay(scheme: str, loop: str) -> str:
    return f"tunnel-client + relay, {scheme}, {loop}"


OURS = [relay(s, loop) for s in ("ws", "wss") for loop in ("asyncio", "uvloop")]
ROWS = [
    DIRECT,
    SOCAT1,
    SOCAT2,
    websockify("ws"),
    websockify("wss"),
    bare("ws"),
    bare("wss"),
    picows("ws"),
    picows("wss"),
    *OURS,
    GCLOUD,
]


def _scheme(name: str) -> str:
    return "wss" if "wss" in name else "ws"


# -- machine ------------------------------------------------------------------------------------


def _version(command: list[str], pattern: str) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    match = re.search(pattern, out)
    return match.group(1) if match else "unknown"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(results: Results, settings: Settings) -> list[tuple[str, str]]:
    load = " → ".join(f"{x:.2f}" for x in results.load)
    busy = not results.judged or any(x > QUIET for x in results.load)
    return [
        ("Date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{_cpu_model()}, {os.cpu_count()} cores"),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("websockets", _package("websockets")),
        ("uvloop", _package("uvloop")),
        ("picows", _package("picows")),
        ("websockify", _package("websockify")),
        ("OpenSSL (Python)", ssl.OPENSSL_VERSION),
        ("socat", _version(["socat", "-V"], r"socat version (\S+)")),
        ("iperf3", _version(["iperf3", "--version"], r"iperf (\S+)")),
        ("gcloud", _version(["gcloud", "version"], r"Google Cloud SDK (\S+)")),
        (
            "Pinning",
            "client side `taskset -c 0`, server side `taskset -c 1`"
            if PINNING
            else "none (no taskset or one CPU)",
        ),
        ("RLIMIT_NOFILE", str(settings.nofile)),
        (
            "Load average (1 min), start → end",
            load
            + (" — **other work was running: absolute figures are low and noisy**" if busy else ""),
        ),
        (
            "Targets",
            f"judged (load {results.judge_load:.2f} at the start of the run, ≤ {QUIET})"
            if results.judged
            else f"**not judged**: load {results.judge_load:.2f} at the start of the run "
            f"(above {QUIET}); `make bench` exits 3",
        ),
    ]


# -- formatting ---------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _r(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fraction(value: float | None) -> str:
    if value is None:
        return "—"
    return f"1/{1 / value:.0f}" if value > 0 else "≈0"


def _table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _memory_entry(results: Results, name: str, count: int | None = None) -> dict[str, Any]:
    """The idle figure of ``name`` at ``count`` tunnels (None: the smallest count measured)."""
    by_count = results.memory.get(name, {})
    if not by_count:
        return {}
    key = min(by_count) if count is None else count
    return by_count.get(key) or {}


def per_tunnel(results: Results, name: str, count: int | None = None) -> float | None:
    value = _memory_entry(results, name, count).get("per_tunnel")
    return float(value) if isinstance(value, int | float) else None


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    measured: str
    holds: bool | None  # None: not measured


def targets(results: Results) -> list[Target]:
    """Issue 7's targets, for the product's default configuration (uvloop installed)."""
    m = results.median
    found: list[Target] = []

    def check(text: str, value: float | None, ok: bool, shown: str) -> None:
        found.append(
            Target(text, shown, ok) if value is not None else Target(text, "not measured", None)
        )

    for scheme, limit in (("ws", 0.9), ("wss", 0.7)):
        ours = relay(scheme, "uvloop")
        for key, what in (("up1", "up"), ("down1", "down")):
            r = _ratio(m(ours, key), m(SOCAT2, key))
            shown = f"{_r(r)} ({_f(m(ours, key))} vs {_f(m(SOCAT2, key))} Gbit/s)"
            check(
                f"{scheme} {what}, 1 stream ≥ {limit}× socat two hops",
                r,
                r is not None and r >= limit,
                shown,
            )
    ours_ws = relay("ws", "uvloop")
    for key, what, limit in (("up1", "upload", 2.0), ("down1", "download", 1.0)):
        r = _ratio(m(ours_ws, key), m(websockify("ws"), key))
        check(f"ws {what} ≥ {limit:g}× websockify", r, r is not None and r >= limit, _r(r))
    for scheme in ("ws", "wss"):
        r = _ratio(m(relay(scheme, "uvloop"), "churn"), m(websockify(scheme), "churn"))
        check(f"{scheme} new tunnels/s ≥ 4× websockify", r, r is not None and r >= 4, _r(r))
    for scheme in ("ws", "wss"):
        r = _ratio(
            per_tunnel(results, relay(scheme, "uvloop")), per_tunnel(results, websockify(scheme))
        )
        check(
            f"{scheme} memory per idle tunnel ≤ 1/50 of websockify",
            r,
            r is not None and r <= 1 / 50,
            _fraction(r),
        )
    for scheme in ("ws", "wss"):
        ours = relay(scheme, "uvloop")
        for key, limit in (("rtt_p50", 1.5), ("rtt_p99", 2.0)):
            r = _ratio(m(ours, key), m(SOCAT2, key))
            shown = f"{_r(r)} ({_f(m(ours, key), 0)} vs {_f(m(SOCAT2, key), 0)} µs)"
            check(
                f"{scheme} round trip {key[4:]} ≤ {limit}× socat two hops",
                r,
                r is not None and r <= limit,
                shown,
            )
    rate = m(relay("wss", "uvloop"), "churn")
    bare_rate = m(bare("wss"), "churn")
    check(
        "≥ 800 new wss tunnels/s (token verification + policy)",
        rate,
        rate is not None and rate >= 800,
        f"{_f(rate, 0)}/s (bare wss chain: {_f(bare_rate, 0)}/s)",
    )
    for loop in ("uvloop", "asyncio"):
        name = relay("wss", loop)
        counts = sorted(results.memory.get(name, {}))
        per = per_tunnel(results, name, counts[-1]) if counts else None
        kib = None if per is None else per / 1024
        check(
            f"≤ 64 KiB per idle wss tunnel ({loop})",
            kib,
            kib is not None and kib <= 64,
            f"{_f(kib, 1)} KiB" + (f" at {counts[-1]:,}" if counts else ""),
        )
    counts = sorted(results.memory.get(relay("wss", "uvloop"), {}))
    big = _memory_entry(results, relay("wss", "uvloop"), counts[-1]) if len(counts) > 1 else {}
    text = "10,000 concurrent wss tunnels in one relay process"
    if not big:
        found.append(Target(text, "not measured", None))
    else:
        held = 100 + int(big["open"])
        shown = f"{held:,} held, {big['errors']} errors"
        holds: bool | None = held >= 10000 and not big["errors"]
        if held < 10000 and not big["errors"]:
            shown += " (all the descriptor limit allows here)"
            holds = None
        found.append(Target(text, shown, holds))
    return found


# -- tables -------------------------------------------------------------------------------------


def tables(results: Results, settings: Settings) -> str:
    m = results.median
    out: list[str] = []

    def runs(name: str) -> str:
        return str(len(results.runs.get(name, [])))

    present = [n for n in ROWS if m(n, "up1") is not None]
    rows = [[n, runs(n), *(_f(m(n, k)) for k in ("up1", "down1", "up8", "down8"))] for n in present]
    out.append("### Bulk throughput (Gbit/s, receiver side, iperf3; up = client → target)\n")
    out.append(
        _table(
            ["path", "runs", "up, 1 stream", "down, 1 stream", "up, 8 streams", "down, 8 streams"],
            rows,
        )
    )

    def pair(name: str, base: str, keys: tuple[str, str] = ("up1", "down1")) -> str:
        return " / ".join(_r(_ratio(m(name, k), m(base, k))) for k in keys)

    rows = []
    for n in present:
        rows.append(
            [
                n,
                pair(n, DIRECT),
                pair(n, SOCAT2),
                pair(n, bare(_scheme(n))),
                pair(n, websockify("ws")),
                pair(n, SOCAT2, ("up8", "down8")),
                " / ".join(_f(m(n, f"server_cpu_{k}")) for k in ("up1", "down1")),
                " / ".join(_f(m(n, f"client_cpu_{k}")) for k in ("up1", "down1")),
            ]
        )
    out.append("\n### Throughput ratios (medians, up / down) and CPU seconds per GB (1 stream)\n")
    out.append(
        _table(
            [
                "path",
                "× direct",
                "× socat 2 hops",
                "× bare chain (same scheme)",
                "× websockify ws",
                "× socat 2 hops, 8 streams",
                "server CPU s/GB",
                "client CPU s/GB",
            ],
            rows,
        )
    )

    rows = []
    for n in [n for n in ROWS if m(n, "rtt_p50") is not None]:
        p50, p99 = m(n, "rtt_p50"), m(n, "rtt_p99")
        rows.append(
            [
                n,
                _f(p50, 1),
                _f(p99, 1),
                _r(_ratio(p50, m(SOCAT2, "rtt_p50"))),
                _r(_ratio(p99, m(SOCAT2, "rtt_p99"))),
            ]
        )
    out.append("\n### 1-byte round trip (µs; the whole chain pinned to one core)\n")
    out.append(_table(["path", "p50", "p99", "p50 × socat 2 hops", "p99 × socat 2 hops"], rows))

    rows = []
    for n in [n for n in ROWS if m(n, "churn") is not None]:
        rate = m(n, "churn")
        rows.append(
            [
                n,
                _f(rate, 0),
                _f(m(n, "churn_server_ms")),
                _r(_ratio(rate, m(websockify(_scheme(n)), "churn"))),
                _r(_ratio(rate, m(bare(_scheme(n)), "churn"))),
            ]
        )
    out.append(
        "\n### New tunnels per second (8 concurrent clients: open, 1-byte echo, close; ours "
        "include JWT verification, policy and the target dial)\n"
    )
    out.append(
        _table(
            [
                "path",
                "tunnels/s",
                "server CPU ms per tunnel",
                "× websockify (same scheme)",
                "× bare chain (same scheme)",
            ],
            rows,
        )
    )

    rows = []
    for n in [n for n in ROWS if n in results.memory]:
        peer = per_tunnel(results, websockify(_scheme(n)))
        bare_per = per_tunnel(results, bare(_scheme(n)))
        for count, entry in sorted(results.memory[n].items()):
            if not entry:
                continue
            per = float(entry["per_tunnel"])
            rows.append(
                [
                    n,
                    f"{count:,}",
                    f"{entry['open']:,}",
                    entry["measure"],
                    _f(per / 1024, 1),
                    "—" if n.startswith("websockify") else _fraction(_ratio(per, peer)),
                    "—" if n.startswith("bare websockets") else _r(_ratio(per, bare_per)),
                    _f(entry["open"] / entry["open_seconds"], 0),
                    _f(entry["total"] / 2**20, 0),
                ]
            )
    out.append(
        "\n### Server memory per idle tunnel (growth from 100 held tunnels to 100 + N, each "
        "after a 1-byte echo)\n"
    )
    out.append(
        _table(
            [
                "server",
                "N",
                "opened",
                "measure",
                "KiB per tunnel",
                "× websockify",
                "× bare chain",
                "opened/s",
                "total MiB",
            ],
            rows,
        )
    )

    def held(t: Target) -> str:
        if t.holds is None:
            return "—"
        if not results.judged:
            return "not judged (busy)"
        return "yes" if t.holds else "**no**"

    rows = [[t.text, t.measured, held(t)] for t in targets(results)]
    out.append("\n### Targets (issue 7; product default: uvloop installed)\n")
    if not results.judged:
        out.append(
            f"Not judged: the load average at the start of the run was {results.judge_load:.2f} "
            f"(above {QUIET}). The figures are recorded, not evidence.\n"
        )
    out.append(_table(["target", "measured (medians)", "holds"], rows, "lll"))
    if results.notes:
        out.append("\nNotes:\n" + "\n".join(f"- {n}" for n in results.notes))
    if results.errors:
        out.append("\nErrors:\n" + "\n".join(f"- {e}" for e in results.errors))
    return "\n".join(out) + "\n"


def raw_runs(results: Results) -> str:
    keys = ["up1", "down1", "up8", "down8", "rtt_p50", "rtt_p99", "churn", "churn_server_ms"]
    rows = []
    for name in [n for n in ROWS if n in results.runs]:
        for number, run in enumerate(results.runs[name], 1):
            cells = [
                _f(run[k], 0 if k in ("rtt_p50", "rtt_p99", "churn") else 2) if k in run else "—"
                for k in keys
            ]
            rows.append([name, str(number), *cells])
    return _table(["path", "run", *keys], rows)


METHOD = """\
- **Paths.** *direct TCP*; *socat* (`socat -b 65536`, fork per connection) as one hop and as a
  two-hop chain, the same topology as client + relay (hop 1 on the client core, hop 2 on the
  server core); *websockify* (PyPI; a process per connection) behind `bench/wsclient.py`, a bare
  websockets TCP-to-WebSocket forwarder on uvloop (websockify has no client of its own); the
  *bare websockets chain*: the same `bench/wsclient.py` in front of `bench/bare_relay.py`, a
  websockets relay with no authentication, acks, resume or policy (the issue's calibration
  point: the ceiling of a websockets design on this machine); the *bare picows chain*
  (`bench/picows_chain.py`: a picows client and relay, asyncio Protocols on both legs, no task
  per message, one message per TCP read; issue 18's second calibration point, the ceiling of a
  callback-driven engine); *tunnel-client + relay* over ws
  and wss, both on asyncio or both on uvloop (`bench/client_proc.py` and `bench/relay_proc.py`
  make the library calls of `tunnel-client start-tunnel` and `tunnel-server serve` with
  `runtime.run(use_uvloop=...)`); the *gcloud CLI* (`gcloud compute start-iap-tunnel`, IAP
  subprotocol, wss) through our relay on uvloop.
- **Pinning.** Client side (iperf3 client, tunnel-client, socat hop 1, wsclient, gcloud, load
  generators) on CPU 0; server side (relay, socat hop 2, websockify, bare relay, iperf3 server,
  echo target) on CPU 1, like two one-core hosts. Round trips re-pin the whole chain to CPU 0.
- **Throughput.** iperf3 (C) as source and sink through each path's local port, {seconds} s per
  measurement, receiver-side Gbit/s; 1 and 8 parallel streams, each direction (down =
  `iperf3 -R`). iperf3's control connection is a tunnel too. gcloud: 1 stream only; its upload
  moves only what its pure-Python masking manages in the same {seconds} s (a few MB, far less
  than the others).
- **CPU per GB.** utime + stime from `/proc/PID/stat` (plus reaped and live children for the
  forking servers) around each 1-stream transfer, divided by the bytes received.
- **Round trip.** `bench/rtt.py`: 1 byte out, 1 byte back, blocking socket, TCP_NODELAY, up to
  {rtt_count} samples ({rtt_seconds} s at most) after a warm-up, against `bench/echo.py`.
- **New tunnels per second.** `bench/loadgen.py rate`: 8 concurrent clients loop open → 1-byte
  echo → close for {churn_seconds} s after a warm-up, on the client core. Ours use the client
  library (`TunnelSession`, native subprotocol, EOF both ways, close 1000, same event loop as
  the relay) with a real ES256 JWT that the relay verifies on every handshake, then the policy
  decision, the target dial and two audit records. websockify and the bare chain: a WebSocket
  with a 1-byte echo. socat and direct: a TCP connection. Server CPU per tunnel: the server
  side's CPU time over the whole load (warm-up included) divided by the tunnels it served.
- **Idle memory.** `bench/loadgen.py idle` holds 100 tunnels, then 100 + N, each after a 1-byte
  echo; the figure is the growth divided by N: RSS of the server (one process), or PSS summed
  over the process tree for websockify and socat (a process per connection; PSS splits their
  copy-on-write pages fairly). A fresh server for each figure. N = {idle_count:,} for the relay
  and the bare chain (and {idle_big:,} for wss on uvloop, the default), {idle_fork_count} for
  the forking servers.
- **Noise.** {runs} runs, each a fresh set of processes, interleaved across paths; medians.
  glibc malloc's dynamic mmap threshold makes a fresh process land in a fast or a 2× slower
  state (`../shared/guide/performance.md`): the relay, the client and the bench's own Python
  helpers fix the thresholds at start (`runtime.tune_malloc`); socat, websockify and iperf3 do
  not, so the median over fresh processes is their fair figure.
"""


def render(results: Results, settings: Settings, analysis: Callable[[Results], str]) -> str:
    info = "\n".join(f"| {k} | {v} |" for k, v in machine(results, settings))
    method = METHOD.format(
        seconds=settings.seconds,
        rtt_count=settings.rtt_count,
        rtt_seconds=settings.rtt_seconds,
        churn_seconds=settings.churn_seconds,
        idle_count=settings.idle_count,
        idle_big=settings.idle_big,
        idle_fork_count=settings.idle_fork_count,
        runs=settings.runs,
    )
    return f"""# Benchmarks

Generated by `make bench` (`.venv/bin/python -m bench`) in {results.elapsed:.0f} s: loopback
only, every program in its own process. Compare figures within one run, as ratios: absolute
numbers move with the machine and with whatever else it is running.

| machine | |
|---|---|
{info}

## Method

{method}
## Results

{tables(results, settings)}
{analysis(results)}
## Every run

{raw_runs(results)}
"""
