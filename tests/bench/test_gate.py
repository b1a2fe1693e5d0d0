"""``make bench``'s gate: the load at the start decides whether targets are judged; a busy run
measures anyway, says so in its output and its docs, and exits 3 (a failed step: 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import analysis, gate, report
from bench.results import Results, Settings

OK = ("json.tool", "--help")  # any module that exits 0
FAILS = ("bench.no_such_step",)


def _load(monkeypatch: pytest.MonkeyPatch, value: float) -> None:
    monkeypatch.setattr(gate, "load1", lambda: value)
    monkeypatch.delenv(gate.ENV, raising=False)


def test_quiet_run_is_judged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _load(monkeypatch, 0.2)
    out = tmp_path / "benchmarks.md"
    assert gate.run_all(out, [OK]) == 0
    text = out.read_text()
    assert "0.20 at the start, 0.20 at the end: quiet at the start, targets judged." in text
    assert "<!-- make-bench:begin -->" in text


def test_busy_run_measures_but_exits_3(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _load(monkeypatch, 2.5)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    assert gate.run_all(out, [OK, OK]) == gate.BUSY_EXIT
    text = out.read_text()
    assert text.startswith("# Benchmarks\n")  # the section is added, nothing else replaced
    assert "targets are NOT judged" in text
    assert text.count("`python -m json.tool --help`") == 2
    printed = capsys.readouterr().out
    assert "load average (1 min) at the start: 2.50" in printed
    assert "no target will be judged" in printed


def test_a_failed_step_wins_over_busy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _load(monkeypatch, 2.5)
    assert gate.run_all(tmp_path / "b.md", [FAILS, OK]) == gate.FAILED_EXIT


def test_a_step_judges_by_the_runs_start_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate, "load1", lambda: 3.0)  # what the previous steps left
    monkeypatch.setenv(gate.ENV, "0.30")
    assert gate.start_load() == pytest.approx(0.3)
    gate.exit_if_busy(gate.start_load(), 3.0)  # quiet at the run's start: no exit
    monkeypatch.setenv(gate.ENV, "0.80")
    with pytest.raises(SystemExit) as info:
        gate.exit_if_busy(gate.start_load(), 3.0)
    assert info.value.code == gate.BUSY_EXIT


def test_suite_report_says_targets_are_not_judged() -> None:
    results = Results(load=[1.7, 2.1], judge_load=1.7)
    for name in (report.relay("ws", "uvloop"), report.SOCAT2):
        results.add(name, {"up1": 5.0, "down1": 5.0})
    tables = report.tables(results, Settings())
    assert "not judged (busy)" in tables
    assert "**no**" not in tables
    assert "| yes |" not in tables
    rows = dict(report.machine(results, Settings()))
    assert rows["Targets"].startswith("**not judged**: load 1.70")


def test_prose_of_a_busy_run_judges_nothing() -> None:
    results = Results(load=[1.7, 2.1], judge_load=1.7)
    for name, gbps in ((report.picows("ws"), 10.0), (report.SOCAT2, 8.0)):
        results.add(name, {"up1": gbps, "down1": gbps, "rtt_p50": 60.0})
    text = analysis.text(results)
    assert "None is judged: the load average at the start of the run was 1.70" in text
    assert "targets hold in this run" not in text
    assert "it carried 1.25× / 1.25× (ws, up / down)" in text  # picows vs socat two hops
