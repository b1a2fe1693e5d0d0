"""``make bench``: our tunnel against direct TCP, socat, websockify and the gcloud CLI, on
loopback, every side in its own process, bounded in time. Prints a markdown table and writes
docs/benchmarks.md.

Per run (fresh processes; repeated ``--runs`` times, interleaved across paths, medians kept):
bulk throughput with iperf3 (1 and 8 streams, each direction), 1-byte round trip (whole chain
pinned to one core), new tunnels per second (8 concurrent clients: open, 1-byte echo, close), and
the server side's CPU seconds per GB. Then, once per server: memory per idle tunnel.

    .venv/bin/python -m bench [--runs 3] [--seconds 1] [--quick] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt

from tunnel_server.ops.tls import write_self_signed

from . import analysis, gate, report
from .handshake import Issuer
from .paths import (
    GCLOUD,
    SOCAT,
    BareChain,
    Direct,
    Files,
    Gcloud,
    LoadSpec,
    PicowsChain,
    Relay,
    Socat,
    Subject,
    Websockify,
)
from .procs import (
    CLIENT_CPU,
    PINNING,
    SERVER_CPU,
    Proc,
    cpu_seconds,
    free_port,
    kill_all,
    pin,
    pss_bytes,
    python_argv,
    raise_nofile,
    rss_bytes,
    spawn,
    wait_listening,
)
from .results import Figures, Results, Settings

IPERF3 = shutil.which("iperf3")


def subjects(settings: Settings) -> list[Subject]:
    found = _all_subjects()
    if settings.only:
        found = [s for s in found if any(o in s.name for o in settings.only)]
    return found


def _all_subjects() -> list[Subject]:
    found: list[Subject] = [Direct()]
    if SOCAT is not None:
        found += [Socat(1), Socat(2)]
    found += [
        Websockify(False, frozenset({"throughput", "rtt", "churn", "idle"})),
        Websockify(True, frozenset({"churn", "idle"})),
        BareChain(False),
        BareChain(True),
    ]
    if importlib.util.find_spec("picows") is not None:  # the bench extra
        found += [PicowsChain(False), PicowsChain(True)]
    found += [
        Relay(False, "asyncio"),
        Relay(False, "uvloop"),
        Relay(True, "asyncio"),
        Relay(True, "uvloop"),
    ]
    if GCLOUD is not None:
        found.append(Gcloud())
    return found


# -- one measurement each ----------------------------------------------------------------------


async def _output(proc: Proc, within: float) -> str:
    try:
        await asyncio.wait_for(proc.process.wait(), within)
    except TimeoutError:
        await proc.stop()
        raise TimeoutError(f"{proc.name} took longer than {within:.0f}s") from None
    return proc.log_text()


async def iperf(
    files: Files, port: int, *, reverse: bool, streams: int, seconds: int
) -> tuple[float, int]:
    """Receiver-side Gbit/s and bytes of one iperf3 run against ``port``."""
    assert IPERF3 is not None
    argv = [IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    argv += ["-P", str(streams)] * (streams > 1) + ["-R"] * reverse
    for attempt in range(2):
        proc = await spawn("iperf3-client", argv, files.workdir, cpu=CLIENT_CPU)
        result = json.loads(await _output(proc, seconds + 30))
        error = result.get("error")
        if not error:
            received = result["end"]["sum_received"]
            return received["bits_per_second"] / 1e9, int(received["bytes"])
        if "busy" not in error or attempt:
            raise RuntimeError(f"iperf3: {error}")
        await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def rtt(files: Files, port: int, count: int, max_seconds: float) -> dict[str, float]:
    proc = await spawn(
        "rtt",
        python_argv(
            "bench.rtt", str(port), "--count", str(count), "--max-seconds", str(max_seconds)
        ),
        files.workdir,
        cpu=CLIENT_CPU,
    )
    text = await _output(proc, max_seconds + 60)
    return dict(json.loads(text.strip().splitlines()[-1]))


def _loadgen_argv(files: Files, mode: str, spec: LoadSpec, *extra: str) -> list[str]:
    return python_argv(
        "bench.loadgen",
        mode,
        "--kind",
        spec.kind,
        "--url",
        spec.url,
        "--target-port",
        str(spec.target_port),
        "--token-file",
        str(files.token_file),
        "--ca-file",
        str(files.cert),
        "--loop",
        spec.loop,
        *extra,
    )


async def churn(files: Files, spec: LoadSpec, seconds: float) -> dict[str, Any]:
    argv = _loadgen_argv(files, "rate", spec, "--seconds", str(seconds), "--concurrency", "8")
    proc = await spawn("loadgen-rate", argv, files.workdir, cpu=CLIENT_CPU)
    text = await _output(proc, seconds + 60)
    return dict(json.loads(text.strip().splitlines()[-1]))


# -- one run of one path ----------------------------------------------------------------------


async def _targets(files: Files, tag: str) -> tuple[Proc, int]:
    assert IPERF3 is not None
    port = free_port()
    proc = await spawn(
        f"{tag}-iperf3-server",
        [IPERF3, "-s", "-p", str(port), "-B", "127.0.0.1"],
        files.workdir,
        cpu=SERVER_CPU,
    )
    await wait_listening(port, proc)
    return proc, port


async def _throughput(
    subject: Subject, files: Files, port: int, settings: Settings, figures: Figures
) -> None:
    cases = [("up1", False, 1), ("down1", True, 1), ("up8", False, 8), ("down8", True, 8)]
    if isinstance(subject, Gcloud):
        cases = cases[:2]  # one stream only: gcloud's upload is pure-Python masking
    for key, reverse, streams in cases:
        server0 = sum(cpu_seconds(p) for p in subject.server_pids)
        client0 = sum(cpu_seconds(p) for p in subject.client_pids)
        gbps, moved = await iperf(
            files, port, reverse=reverse, streams=streams, seconds=settings.seconds
        )
        if subject.forking:
            await asyncio.sleep(0.2)  # forked children exit and are reaped
        server1 = sum(cpu_seconds(p) for p in subject.server_pids)
        client1 = sum(cpu_seconds(p) for p in subject.client_pids)
        figures[key] = gbps
        if streams == 1 and moved:
            figures[f"server_cpu_{key}"] = (server1 - server0) / (moved / 1e9)
            figures[f"client_cpu_{key}"] = (client1 - client0) / (moved / 1e9)


async def _rtt(
    subject: Subject, files: Files, port: int, echo: Proc, settings: Settings, figures: Figures
) -> None:
    for pid in [*subject.client_pids, *subject.server_pids, echo.pid]:
        pin(pid, CLIENT_CPU)
    try:
        count = 300 if isinstance(subject, Gcloud) else settings.rtt_count
        result = await rtt(files, port, count, settings.rtt_seconds)
    finally:
        for pid in subject.client_pids:
            pin(pid, CLIENT_CPU)
        for pid in [*subject.server_pids, echo.pid]:
            pin(pid, SERVER_CPU)
    figures["rtt_p50"] = result["p50"]
    figures["rtt_p99"] = result["p99"]


async def _churn(
    subject: Subject, files: Files, echo_port: int, settings: Settings, tag: str, figures: Figures
) -> None:
    spec = await subject.churn(files, tag, echo_port)
    if spec is None:
        return
    pids = subject.server_pids
    server0 = sum(cpu_seconds(p) for p in pids)
    result = await churn(files, spec, settings.churn_seconds)
    await asyncio.sleep(0.2)
    server1 = sum(cpu_seconds(p) for p in pids)
    figures["churn"] = result["rate"]
    if pids and result["total"]:
        figures["churn_server_ms"] = 1000 * (server1 - server0) / result["total"]
    if result["errors"]:
        figures["churn_errors"] = result["errors"]


async def run_subject(
    subject: Subject, files: Files, echo: Proc, echo_port: int, settings: Settings, tag: str
) -> Figures:
    """One run of one path: fresh processes, every figure it takes part in, stop."""
    figures: Figures = {}
    iperf_server: Proc | None = None
    try:
        wants = subject.figures
        iperf_port = 0
        if "throughput" in wants:
            (iperf_server, iperf_port), _ = await asyncio.gather(
                _targets(files, tag), subject.start(files, tag)
            )
        else:
            await subject.start(files, tag)
        targets = [
            port for port, want in ((iperf_port, iperf_port), (echo_port, "rtt" in wants)) if want
        ]
        chained = await asyncio.gather(*(subject.chain(files, tag, port) for port in targets))
        ports = dict(zip(targets, chained, strict=True))
        if iperf_server is not None:
            await _throughput(subject, files, ports[iperf_port], settings, figures)
        if "rtt" in wants:
            await _rtt(subject, files, ports[echo_port], echo, settings, figures)
        if "churn" in wants:
            await _churn(subject, files, echo_port, settings, tag, figures)
    finally:
        await subject.stop()
        if iperf_server is not None:
            await iperf_server.stop()
    return figures


# -- memory per idle tunnel ---------------------------------------------------------------------


async def _open_idle(
    files: Files, spec: LoadSpec, count: int, name: str
) -> tuple[Proc, dict[str, Any]]:
    argv = _loadgen_argv(files, "idle", spec, "--count", str(count), "--concurrency", "64")
    proc = await spawn(name, argv, files.workdir, cpu=CLIENT_CPU, stdin=asyncio.subprocess.PIPE)
    match = await proc.wait_for_line(r"(\{\"open\".*\})\n", within=max(60.0, count / 50))
    return proc, dict(json.loads(match.group(1)))


def _memory(pid: int, forking: bool) -> int:
    return pss_bytes(pid) if forking else rss_bytes(pid)


async def idle_memory(subject: Subject, files: Files, echo_port: int, count: int) -> dict[str, Any]:
    """Memory growth of the server side per idle tunnel: RSS (one process) or PSS summed over
    the process tree (fork per connection), between 100 held tunnels and 100 + ``count``."""
    forking = subject.forking
    held: list[Proc] = []
    try:
        spec = await subject.idle(files, echo_port)
        if spec is None:
            return {}
        pid = subject.memory_pid
        base_proc, _ = await _open_idle(files, spec, 100, "idle-base")
        held.append(base_proc)
        await asyncio.sleep(0.3)
        before = _memory(pid, forking)
        proc, opened = await _open_idle(files, spec, count, "idle-load")
        held.append(proc)
        if not opened["open"]:
            raise RuntimeError(f"no idle tunnel opened: {opened.get('first_error')}")
        await asyncio.sleep(0.5)
        after = _memory(pid, forking)
        return {
            "open": opened["open"],
            "errors": opened["errors"],
            "open_seconds": opened["seconds"],
            "per_tunnel": (after - before) / max(1, opened["open"]),
            "total": after,
            "measure": "PSS" if forking else "RSS",
            "first_error": opened.get("first_error"),
        }
    finally:
        for proc in held:
            stdin = proc.process.stdin
            if stdin is not None:
                stdin.close()
            await proc.stop()
        await subject.stop()


# -- the suite ----------------------------------------------------------------------------------


def _token(issuer: Issuer) -> str:
    now = int(time.time())
    claims = {
        "iss": issuer.url,
        "sub": "bench",
        "aud": "tunnel",
        "iat": now,
        "exp": now + 3600,
        "email": "bench@example.com",
        "email_verified": True,
    }
    return jwt.encode(claims, issuer.key, algorithm="ES256", headers={"kid": issuer.kid})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def suite(settings: Settings, workdir: Path) -> Results:
    results = Results()
    results.load.append(os.getloadavg()[0])
    started = time.monotonic()
    issuer = Issuer()
    await issuer.start()
    token_file = workdir / "token.txt"
    token_file.write_text(_token(issuer))
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    write_self_signed(cert, key)
    files = Files(workdir, cert, key, token_file, issuer.url)
    echo_port = free_port()
    echo = await spawn("echo", python_argv("bench.echo", str(echo_port)), workdir, cpu=SERVER_CPU)
    try:
        await wait_listening(echo_port, echo)
        all_subjects = subjects(settings)
        for run in range(settings.runs):
            for subject in all_subjects:
                if isinstance(subject, Gcloud) and run >= settings.gcloud_runs:
                    continue
                tag = f"r{run}-{subject.name.replace(' ', '').replace(',', '-')}"
                t0 = time.monotonic()
                try:
                    figures = await run_subject(subject, files, echo, echo_port, settings, tag)
                except Exception as exc:
                    results.errors.append(f"run {run + 1}, {subject.name}: {exc!r}")
                    _log(f"  ! {subject.name}: {exc!r}")
                    continue
                results.add(subject.name, figures)
                shown = ", ".join(f"{k}={v:.3g}" for k, v in figures.items())
                took = time.monotonic() - t0
                _log(f"run {run + 1}/{settings.runs} {subject.name} ({took:.1f}s): {shown}")
        await echo.stop()
        # A fresh target for the idle phase: no TIME_WAIT from the churn above on its port.
        echo_port = free_port()
        echo = await spawn(
            "echo-idle", python_argv("bench.echo", str(echo_port)), workdir, cpu=SERVER_CPU
        )
        await wait_listening(echo_port, echo)
        for subject in subjects(settings):
            if "idle" not in subject.figures:
                continue
            if subject.forking:
                counts = [settings.idle_fork_count]  # a process per connection
            elif (
                isinstance(subject, Relay)
                and (subject.transport, subject.loop) == ("wss", "uvloop")
                and settings.idle_big
            ):
                counts = [settings.idle_count, settings.idle_big]
            else:
                counts = [settings.idle_count]
            for count in counts:
                t0 = time.monotonic()
                try:
                    memory = await idle_memory(subject, files, echo_port, count)
                except Exception as exc:
                    results.errors.append(f"idle {count}, {subject.name}: {exc!r}")
                    _log(f"  ! idle {subject.name}: {exc!r}")
                    continue
                results.memory.setdefault(subject.name, {})[count] = memory
                _log(f"idle {subject.name} x{count} ({time.monotonic() - t0:.1f}s): {memory}")
    finally:
        await echo.stop()
        await issuer.stop()
    results.elapsed = time.monotonic() - started
    results.load.append(os.getloadavg()[0])
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh process sets per path")
    parser.add_argument("--seconds", type=int, default=1, help="per iperf3 measurement")
    parser.add_argument("--quick", action="store_true", help="one run, no 10,000-tunnel figure")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--only", action="append", default=[], help="only the paths whose name contains this"
    )
    args = parser.parse_args(argv)
    settings = Settings(runs=args.runs, seconds=args.seconds, only=tuple(args.only))
    if args.quick:
        settings.runs = 1
        settings.idle_big = 0
    if IPERF3 is None:
        sys.exit("iperf3 is required: run scripts/install-bench-deps.sh")
    results = Results(judge_load=gate.start_load())
    _log(f"load average (1 min) at the start: {results.judge_load:.2f}")
    if not results.judged:
        _log(f"busy machine (above {gate.QUIET}): measuring, but no target will be judged")
    settings.nofile = raise_nofile(65536)
    # The relay holds two descriptors per tunnel (WebSocket and target) plus a few of its own.
    fits = (settings.nofile - 200) // 2 - 100
    if settings.idle_big > fits:
        results.notes.append(
            f"RLIMIT_NOFILE is {settings.nofile} here (the hard limit; raising it needs "
            f"CAP_SYS_RESOURCE): the large idle figure holds 100 + {fits:,} tunnels instead of "
            f"100 + {settings.idle_big:,} (two descriptors per tunnel in the relay)."
        )
        settings.idle_big = fits
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        ran = asyncio.run(suite(settings, workdir))
    finally:
        kill_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _log(f"logs kept in {workdir}")
    ran.notes[:0] = results.notes
    ran.judge_load = results.judge_load
    if SOCAT is None:
        ran.notes.append("socat not installed: its rows are missing")
    if GCLOUD is None:
        ran.notes.append("gcloud not installed: its rows are missing")
    if not PINNING:
        ran.notes.append("no taskset or a single CPU: processes were not pinned")
    print(report.tables(ran, settings))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.render(ran, settings, analysis.text))
    _log(f"wrote {args.out} ({ran.elapsed:.0f}s)")
    gate.exit_if_busy(ran.judge_load, ran.load[-1] if ran.load else gate.load1())
