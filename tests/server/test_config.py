"""Config loading: valid files load; every invalid one names the file, the key and the reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tunnel_server.build import build_policy
from tunnel_server.cli import main
from tunnel_server.config import ConfigError, load_config, parse_config

VALID: dict[str, Any] = {
    "listen": {"host": "127.0.0.1", "port": 8443},
    "tls": {"cert_file": "cert.pem", "key_file": "key.pem", "self_signed": True},
    "issuers": [{"issuer": "https://idp.example.com", "audiences": ["tunnel"]}],
    "login": {"issuer": "https://idp.example.com", "client_id": "tunnel-cli"},
    "inventory": {
        "instances": [
            {"project": "p", "zone": "z", "name": "vm1", "address": "10.0.0.5"},
            {
                "project": "p",
                "zone": "z",
                "name": "vm2",
                "interfaces": {"nic0": "10.0.0.6", "nic1": "10.1.0.6"},
            },
        ],
        "destination_groups": [
            {
                "project": "p",
                "region": "r",
                "network": "n",
                "name": "db",
                "cidrs": ["10.2.0.0/16"],
                "fqdns": ["db.internal"],
            },
        ],
    },
    "access": [
        {
            "members": ["user:alice@example.com", "group:ops"],
            "instances": ["p/z/vm1"],
            "ports": [22, "3389", "8000-8080"],
        },
        {"members": ["allAuthenticatedUsers"], "destination_groups": ["p/r/n/db"], "ports": [5432]},
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    data = yaml.safe_load(yaml.safe_dump(VALID))
    node = data
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return dict(data)


_DELETE = object()


def test_valid_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(VALID))
    config = load_config(path)
    assert config.tls is not None
    assert config.tls.cert_file == tmp_path / "cert.pem"  # relative to the file
    assert config.inventory.instances[0].interfaces == {"nic0": "10.0.0.5"}
    ports = config.access[0].ports
    assert 8080 in ports[2]
    assert 8081 not in ports[2]
    assert config.tunnel.resume_buffer == 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("issuers.0.issuer", _DELETE, "issuers[0].issuer: is required"),
        ("issuers.0.issuer", "ftp://x", "issuers[0].issuer: String should match pattern"),
        ("issuers.0.audiences", [], "issuers[0].audiences: List should have at least 1 item"),
        ("issuers.0.leeway", 120, "issuers[0].leeway: Input should be less than or equal to 60"),
        ("listen.port", 70000, "listen.port: Input should be less than or equal to 65535"),
        ("access.0.ports", [0], "access[0].ports[0].first: Input should be greater than"),
        ("access.0.ports", ["22-21"], "access[0].ports: port range '22-21'"),
        ("access.0.ports", ["ssh"], "access[0].ports: port 'ssh' must be"),
        ("access.0.members", ["alice"], "access[0].members: member 'alice'"),
        ("access.0.instances", ["p/z/typo"], "unknown instance 'p/z/typo'"),
        ("access.1.destination_groups", ["p/r/n/nope"], "unknown destination group"),
        ("inventory.instances.0.name", "bad name", "inventory.instances[0].name: String"),
        (
            "inventory.destination_groups.0.cidrs",
            ["10.0.0.300/8"],
            "inventory.destination_groups[0].cidrs[0]",
        ),
        ("tunnel", {"resume_buffer": 1024}, "tunnel.resume_buffer: Input should be greater"),
        (
            "tunnel",
            {"resume_windw": 5},
            "tunnel.resume_windw: unknown key; did you mean 'resume_window'?",
        ),
        ("login.issuer", "https://other.example.com", "login.issuer 'https://other.example"),
        (
            "issuers.0.introspection",
            {"client_id": "relay"},
            "issuers[0].introspection.client_secret: is required",
        ),
    ],
)
def test_invalid_configs_name_key_and_reason(path: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_with(path, value), source="relay.yaml")
    message = str(info.value)
    assert message.startswith("relay.yaml: ")
    assert expected in message


def test_duplicate_instances_refused() -> None:
    data = _with("inventory.instances", [VALID["inventory"]["instances"][0]] * 2)
    with pytest.raises(ConfigError, match="duplicate instance 'p/z/vm1'"):
        parse_config(data)


def test_single_oidc_shorthand() -> None:
    data = {k: v for k, v in VALID.items() if k not in ("issuers", "login")}
    data["oidc"] = VALID["issuers"][0]
    config = parse_config(data)
    assert [i.issuer for i in config.issuers] == ["https://idp.example.com"]
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**data, "issuers": VALID["issuers"]})


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("oidc:\n  issuer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(VALID))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("issuers.0.audiences", [])))
    runner = CliRunner()
    assert runner.invoke(main, ["check-config", str(good)]).exit_code == 0
    result = runner.invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 2
    assert "issuers[0].audiences" in result.output


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "relay.example.yaml"
    config = load_config(example)
    assert config.access
    assert config.inventory.instances
    policy = build_policy(config)  # the example policy file loads and compiles too
    assert policy.source.endswith("policy.example.yaml")


def test_check_config_and_serve_report_unreadable_cluster_files(tmp_path: Path) -> None:
    """A cluster secret or CA file that cannot be read is a configuration error (exit 2, one
    line naming the key), both for check-config and at serve's start, never a traceback."""
    data = {
        **VALID,
        "state": {"backend": "redis", "redis_url": "redis://127.0.0.1:1"},
        "cluster": {"advertise_url": "ws://10.0.0.1:8443", "secret_file": "missing-secret"},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2, result.output
    assert "cluster.secret_file: cannot read" in result.output
    # serve in its own process: it sets up logging for the whole process.
    served = subprocess.run(
        [sys.executable, "-m", "tunnel_server", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert served.returncode == 2, served.stderr
    assert (
        served.stderr.strip()
        == "error: cluster.secret_file: cannot read: No such file or directory"
    )
