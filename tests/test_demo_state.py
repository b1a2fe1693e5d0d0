"""The demo's state directory: one demo or check per directory (a second one is refused with a
clear message, not left to clobber relay.yaml and the logs), and the demo VM's sshd port stays
the same across restarts."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from scripts.demo import CHECK_STATE, DEMO_STATE, state_lock
from scripts.demo_services import DemoError, sshd_port


def test_check_and_demo_have_their_own_state() -> None:
    assert CHECK_STATE != DEMO_STATE
    assert CHECK_STATE.name == ".demo-check"


def test_second_user_of_a_state_directory_is_refused(tmp_path: Path) -> None:
    with state_lock(tmp_path / "demo"):
        with pytest.raises(DemoError) as refused, state_lock(tmp_path / "demo"):
            pass  # pragma: no cover - the lock is taken
        message = str(refused.value)
        assert f"in use by another demo or demo check (pid {os.getpid()})" in message
        assert "--state-dir" in message
        with state_lock(tmp_path / "check"):  # another directory is not blocked
            pass
    with state_lock(tmp_path / "demo"):  # released on exit
        pass


def test_sshd_port_is_kept_across_restarts(tmp_path: Path) -> None:
    first = sshd_port(tmp_path)
    assert sshd_port(tmp_path) == first
    with socket.socket() as busy:  # taken meanwhile: another free port, remembered from then on
        busy.bind(("127.0.0.1", first))
        second = sshd_port(tmp_path)
    assert second != first
    assert sshd_port(tmp_path) == second
