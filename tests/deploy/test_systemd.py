"""deploy/systemd/tunnel-server.service: `systemd-analyze verify` (works without systemd as
PID 1; only the executable paths are pointed at this checkout's virtualenv), the sandbox's
exposure score (`systemd-analyze security --offline`), and the agreement between the unit and
the clustered example config (credentials, stop timeout vs drain grace)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from tunnel_server.build import build_policy
from tunnel_server.config import parse_config, read_yaml

from .files import DEPLOY, SYSTEMD_UNIT, command_words, systemd_seconds, unit_settings

CLUSTER_EXAMPLE = DEPLOY / "relay.cluster.example.yaml"
SINGLE_EXAMPLE = DEPLOY / "relay.example.yaml"
INSTALLED = "/opt/identity-tunnel/bin/tunnel-server"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze (Debian package systemd) is not installed"
)
# systemd-analyze security's 0-10 exposure scale; the unit is at 1.5 ("OK") today.
MAX_EXPOSURE = 2.0


def settings() -> dict[str, list[str]]:
    return unit_settings(SYSTEMD_UNIT.read_text())["Service"]


def one(key: str) -> str:
    values = settings()[key]
    assert len(values) == 1, f"{key} is set {len(values)} times"
    return values[0]


def credential_path(name: str) -> PurePosixPath:
    return PurePosixPath("/run/credentials") / SYSTEMD_UNIT.name / name


def _local_unit(tmp_path: Path) -> Path:
    """The unit with its executable pointed at this checkout's tunnel-server (verify checks
    that ExecStart's binary exists); nothing else changed."""
    local = Path(sys.executable).parent / "tunnel-server"
    assert local.exists()
    path = tmp_path / SYSTEMD_UNIT.name
    path.write_text(SYSTEMD_UNIT.read_text().replace(INSTALLED, str(local)))
    return path


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(_local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Unknown keys and unparsable values are only warnings (exit 0): any output is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_reports_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    assert SYSTEMD_ANALYZE is not None
    unit = _local_unit(tmp_path)
    unit.write_text(unit.read_text().replace("KillMode=", "KilMode="))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "Unknown key 'KilMode'" in result.stderr


@needs_systemd_analyze
def test_sandbox_exposure_stays_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [
            SYSTEMD_ANALYZE,
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(_local_unit(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_runs_the_relay_unprivileged_and_drains() -> None:
    service = settings()
    assert command_words(one("ExecStart")) == [
        INSTALLED,
        "serve",
        "--config",
        "/etc/tunnel/relay.yaml",
    ]
    reload = [command_words(v) for v in service["ExecReload"]]
    assert reload[-1] == ["/bin/kill", "-HUP", "$MAINPID"], "SIGHUP reloads the policy"
    assert reload[0][1:] == ["check-config", "/etc/tunnel/relay.yaml"]
    assert one("DynamicUser") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("KillSignal") == "SIGTERM"
    assert one("Restart") == "on-failure"
    assert int(one("LimitNOFILE")) >= 65536
    for example in (SINGLE_EXAMPLE, CLUSTER_EXAMPLE):
        config = parse_config(
            read_yaml(example), env={"TUNNEL_REDIS_URL": "rediss://:pw@redis.example:6380/0"}
        )
        assert systemd_seconds(one("TimeoutStopSec")) > config.tunnel.drain_grace + 5, example


def test_cluster_example_reads_its_secrets_from_credentials() -> None:
    credentials = {}
    for value in settings()["LoadCredential"]:
        name, _, source = value.partition(":")
        credentials[credential_path(name)] = source
    config = parse_config(
        read_yaml(CLUSTER_EXAMPLE),
        source=str(CLUSTER_EXAMPLE),
        base_dir=CLUSTER_EXAMPLE.parent,
        env={"TUNNEL_REDIS_URL": "rediss://:pw@redis.example:6380/0"},
    )
    build_policy(config)
    assert config.state.backend == "redis"
    assert config.cluster is not None
    assert config.tls is not None
    # The two secrets are credentials of this unit; DynamicUser could not read them otherwise.
    assert PurePosixPath(config.tls.key_file) in credentials
    assert PurePosixPath(str(config.cluster.secret_file)) in credentials
    assert config.admin is not None
    assert config.admin.listen.host == "127.0.0.1"
    assert settings()["EnvironmentFile"] == ["-/etc/tunnel/relay.env"]
