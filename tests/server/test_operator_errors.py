"""An operator's mistake is one line naming the config key and the path, exit 2, from both
``serve`` and ``check-config`` (issue 12): no traceback, no Python object in the message, and
the key as the operator wrote it, with a suggestion for a mistyped one."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tunnel_server.cli import main
from tunnel_server.ops.tls import write_self_signed


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def base(tls: dict[str, Any] | None = None, port: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "oidc": {"issuer": "http://127.0.0.1:9/", "audiences": ["tunnel"]},
    }
    if tls is not None:
        data["tls"] = tls
    return data


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: "), message
    assert "Traceback" not in message
    assert " object at 0x" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(autouse=True)
def keep_the_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` installs the relay's log handler on the root logger: not in this process."""
    monkeypatch.setattr("tunnel_server.cli.setup_logging", lambda *args, **kwargs: None)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_self_signed(cert, key)
    return cert, key


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_missing_certificate_names_the_key_and_the_path(tmp_path: Path, command: str) -> None:
    config = write(tmp_path / "relay.yaml", base({"cert_file": "nope.pem", "key_file": "k.pem"}))
    result = invoke(command, str(config))
    one_line_error(result, "tls.cert_file", str(tmp_path / "nope.pem"), "No such file")


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_a_key_that_is_not_the_certificates_key(
    tmp_path: Path, pair: tuple[Path, Path], command: str
) -> None:
    other_cert, other_key = tmp_path / "other.pem", tmp_path / "other-key.pem"
    write_self_signed(other_cert, other_key)
    tls = {"cert_file": str(pair[0]), "key_file": str(other_key)}
    result = invoke(command, "--config", str(write(tmp_path / "relay.yaml", base(tls))))
    one_line_error(result, "tls.key_file", str(other_key), "is not the key of tls.cert_file")


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_an_unreadable_key(tmp_path: Path, pair: tuple[Path, Path], command: str) -> None:
    # A directory where the key should be: unreadable even as root.
    tls = {"cert_file": str(pair[0]), "key_file": str(tmp_path)}
    result = invoke(command, str(write(tmp_path / "relay.yaml", base(tls))))
    one_line_error(result, "tls.key_file", "cannot read", str(tmp_path))


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_port_in_use(tmp_path: Path, busy_port: int) -> None:
    config = write(tmp_path / "relay.yaml", base(port=busy_port))
    result = invoke("serve", str(config))
    one_line_error(result, "listen:", f"127.0.0.1:{busy_port}", "already in use")


def test_config_errors_use_the_keys_as_written_and_suggest_names(tmp_path: Path) -> None:
    data = base()
    data["oidc"] = {"issuer": "http://127.0.0.1:9/", "audience": ["tunnel"]}
    data["tunnel"] = {"idle_timout": 5}
    result = invoke("check-config", str(write(tmp_path / "relay.yaml", data)))
    assert result.exit_code == 2
    assert "oidc.audiences: is required" in result.output
    assert "oidc.audience: unknown key; did you mean 'audiences'?" in result.output
    assert "tunnel.idle_timout: unknown key; did you mean 'idle_timeout'?" in result.output
    assert "issuers[0]" not in result.output


def test_the_file_is_given_the_same_way_to_both_commands(tmp_path: Path) -> None:
    config = write(tmp_path / "relay.yaml", base())
    assert invoke("check-config", str(config)).exit_code == 0
    assert invoke("check-config", "--config", str(config)).exit_code == 0
    assert invoke("check-config").exit_code == 2  # usage: no file
    assert invoke("serve", str(config), "--config", str(config)).exit_code == 2  # given twice


def test_relative_paths_are_relative_to_the_config_file_everywhere(
    tmp_path: Path, pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``http.tls`` like ``tls``: check-config run from another directory finds the files."""
    data = base({"cert_file": pair[0].name, "key_file": pair[1].name})
    data["http"] = {
        "issuer_url": "https://relay.example.com",
        "routes": [{"name": "app", "host": "app.example.com", "upstream": "http://127.0.0.1:9"}],
        "tls": {"cert_file": pair[0].name, "key_file": pair[1].name},
    }
    config = write(tmp_path / "relay.yaml", data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("check-config", str(config))
    assert result.exit_code == 0, result.output
