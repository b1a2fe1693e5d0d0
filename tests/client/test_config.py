"""The client config file and profiles: ``config set|get|list|unset|add-forward``, gcloud's
resolution order (flag > env > profile > default) on every command, per-profile logins, and the
gcloud spellings (--iap-tunnel-disable-connection-check, --verbosity, ssh USER@INSTANCE)."""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from tunnel_client.cli import main
from tunnel_client.config import ConfigFile, config_dir

SERVER = "wss://relay.example:8443"


def invoke(home: Path, *args: str, **env: str | None) -> Result:
    environ: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TUNNEL_")}
    environ.update(TUNNEL_CLIENT_HOME=str(home), TUNNEL_ACCESS_TOKEN="tok")
    environ.update(env)
    return CliRunner().invoke(main, list(args), env=environ, prog_name="tunnel-client")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.exit_code, result.output)
    return result


def test_set_get_list_unset(tmp_path: Path) -> None:
    ok(invoke(tmp_path, "config", "set", "server", SERVER))
    ok(invoke(tmp_path, "config", "set", "zone", "z1"))
    ok(invoke(tmp_path, "config", "set", "zone", "z2", "--profile", "staging"))
    assert ok(invoke(tmp_path, "config", "get", "server")).stdout == f"{SERVER}\n"
    assert ok(invoke(tmp_path, "config", "get", "zone", "--profile", "staging")).stdout == "z2\n"
    listed = ok(invoke(tmp_path, "config", "list", "--all")).stdout
    assert listed == f"[default]\nserver = {SERVER}\nzone = z1\n[staging]\nzone = z2\n"
    ok(invoke(tmp_path, "config", "unset", "zone"))
    missing = invoke(tmp_path, "config", "get", "zone")
    assert missing.exit_code == 1
    assert missing.stderr == "ERROR: zone is not set in profile default\n"
    path = tmp_path / "config.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text())["profiles"]["default"] == {"server": SERVER}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("set", "colour", "x"), "unknown setting 'colour'"),
        (("set", "server", "relay.example"), "server must be a wss:// URL"),
        (("set", "insecure-skip-verify", "maybe"), "must be true or false"),
        (("set", "verbosity", "loud"), "verbosity must be debug, info, warning or error"),
        (("set", "zone", "z", "--profile", "bad/name"), "invalid profile name"),
    ],
)
def test_config_refuses_bad_values(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    result = invoke(tmp_path, "config", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ok(invoke(tmp_path, "config", "set", "ca-file", "ca.pem"))
    assert ok(invoke(tmp_path, "config", "get", "ca-file")).stdout == f"{tmp_path / 'ca.pem'}\n"


def test_config_dir_follows_xdg() -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/x"}) == Path("/x/identity-tunnel")
    assert config_dir({"TUNNEL_CLIENT_HOME": "/h", "XDG_CONFIG_HOME": "/x"}) == Path("/h")


def dry_run_proxy_command(result: Result) -> str:
    argv = shlex.split(ok(result).stdout)
    return next(a for a in argv if a.startswith("ProxyCommand="))


def test_profile_supplies_defaults_and_the_child_resolves_them(tmp_path: Path) -> None:
    """Profile values are not copied into the ProxyCommand: the child gets --profile and reads
    the same config (so `config set` later applies); flags and env values are passed on."""
    for key, value in (("server", SERVER), ("zone", "z"), ("project", "p")):
        ok(invoke(tmp_path, "config", "set", key, value, "--profile", "work"))
    proxy = dry_run_proxy_command(invoke(tmp_path, "ssh", "vm1", "--profile", "work", "--dry-run"))
    assert "--profile=work" in proxy
    assert "--server" not in proxy
    assert "--zone" not in proxy
    by_env = invoke(tmp_path, "ssh", "vm1", "--dry-run", TUNNEL_PROFILE="work")
    assert "--profile=work" in dry_run_proxy_command(by_env)
    # A flag wins over the profile, and is passed on.
    flagged = invoke(tmp_path, "ssh", "vm1", "--profile", "work", "--zone", "z9", "--dry-run")
    assert "--zone=z9" in dry_run_proxy_command(flagged)


def test_precedence_flag_env_profile_default(tmp_path: Path) -> None:
    ok(invoke(tmp_path, "config", "set", "server", "wss://from-profile"))
    ok(invoke(tmp_path, "config", "set", "zone", "z"))

    def server_used(*extra: str, **env: str) -> str:
        proxy = dry_run_proxy_command(invoke(tmp_path, "ssh", "vm1", "--dry-run", *extra, **env))
        words = [w for w in shlex.split(proxy.split("=", 1)[1]) if w.startswith("--server=")]
        return words[0] if words else "(profile)"

    assert server_used() == "(profile)"
    assert server_used(TUNNEL_SERVER="wss://from-env") == "--server=wss://from-env"
    assert (
        server_used("--server", "wss://from-flag", TUNNEL_SERVER="wss://from-env")
        == "--server=wss://from-flag"
    )


def test_missing_zone_suggests_config(tmp_path: Path) -> None:
    result = invoke(tmp_path, "start-tunnel", "vm1", "22", "--listen-on-stdin", "--server", SERVER)
    assert result.exit_code == 2
    assert "`tunnel-client config set zone ZONE` remembers it" in result.stderr


def test_profile_zone_does_not_conflict_with_region_flags(tmp_path: Path) -> None:
    ok(invoke(tmp_path, "config", "set", "zone", "z"))
    result = invoke(tmp_path, "ssh", "10.0.0.5", "--server", SERVER, "--region", "r",
                    "--network", "n", "--dry-run")  # fmt: skip
    assert "--region=r" in dry_run_proxy_command(result)


def test_ssh_user_at_instance(tmp_path: Path) -> None:
    result = ok(invoke(tmp_path, "ssh", "alice@vm1", "--zone", "z", "--server", SERVER,
                       "--dry-run"))  # fmt: skip
    assert "alice@vm1" in shlex.split(result.stdout)
    clash = invoke(tmp_path, "ssh", "alice@vm1", "--user", "bob", "--zone", "z",
                   "--server", SERVER, "--dry-run")  # fmt: skip
    assert clash.exit_code == 2
    assert "give the user once" in clash.stderr


def test_gcloud_spellings_are_accepted(tmp_path: Path) -> None:
    help_text = ok(invoke(tmp_path, "start-tunnel", "--help")).stdout
    assert "--iap-tunnel-disable-connection-check" in help_text
    assert "--verbosity [debug|info|warning|error]" in help_text
    bad = invoke(tmp_path, "ssh", "vm1", "--zone", "z", "--server", SERVER, "--verbosity=loud")
    assert bad.exit_code == 2


def test_forwards_in_config(tmp_path: Path) -> None:
    ok(invoke(tmp_path, "config", "add-forward", "db", "db-1", "5432", "--local",
              "127.0.0.1:15432"))  # fmt: skip
    ok(invoke(tmp_path, "config", "add-forward", "web", "web-1", "80", "--zone", "z2"))
    forwards = ConfigFile(tmp_path / "config.yaml").forwards("default")
    assert [(f.name, f.instance, f.port, f.local, f.zone) for f in forwards] == [
        ("db", "db-1", 5432, "127.0.0.1:15432", None),
        ("web", "web-1", 80, "127.0.0.1:0", "z2"),
    ]
    listed = ok(invoke(tmp_path, "config", "list")).stdout
    assert "forward db = instance db-1 port 5432 on 127.0.0.1:15432" in listed
    ok(invoke(tmp_path, "config", "remove-forward", "db"))
    assert [f.name for f in ConfigFile(tmp_path / "config.yaml").forwards("default")] == ["web"]
    assert invoke(tmp_path, "config", "remove-forward", "db").exit_code == 1


def test_broken_config_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("profiles: [1, 2\n")
    result = invoke(tmp_path, "ssh", "vm1", "--zone", "z", "--server", SERVER, "--dry-run")
    assert result.exit_code == 2
    assert "is not valid YAML" in result.stderr
    (tmp_path / "config.yaml").write_text("profiles:\n  default:\n    zoen: z\n")
    result = invoke(tmp_path, "ssh", "vm1", "--zone", "z", "--server", SERVER, "--dry-run")
    assert "profiles.default.zoen is not a setting" in result.stderr


@pytest.mark.parametrize(
    "command",
    ["start-tunnel", "ssh", "ssh-config", "rdp", "http", "login", "logout", "print-access-token",
     "print-identity-token", "status", "up", "config", "config set"],
)  # fmt: skip
def test_every_command_has_an_example_and_option_help(tmp_path: Path, command: str) -> None:
    text = ok(invoke(tmp_path, *command.split(), "--help")).stdout
    assert "Example:" in text
    cmd: click.Command = main
    for part in command.split():
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[part]
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{command} {param.opts} has no help text"


@pytest.mark.parametrize(
    "command", ["start-tunnel", "ssh", "ssh-config", "rdp", "http", "print-identity-token"]
)
def test_every_command_takes_profile_and_ca_file(tmp_path: Path, command: str) -> None:
    text = ok(invoke(tmp_path, command, "--help")).stdout
    for option in ("--profile", "--ca-file", "--insecure-skip-verify", "--proxy"):
        assert option in text, (command, option)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_as_documented(tmp_path: Path, shell: str) -> None:
    """README: eval "$(_TUNNEL_CLIENT_COMPLETE=bash_source tunnel-client)"."""
    result = invoke(tmp_path, _TUNNEL_CLIENT_COMPLETE=f"{shell}_source")
    assert result.exit_code == 0, result.output
    assert "_TUNNEL_CLIENT_COMPLETE" in result.stdout
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert f"_TUNNEL_CLIENT_COMPLETE={shell}_source tunnel-client" in readme


def test_bad_proxy_url_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke(tmp_path, "start-tunnel", "vm1", "22", "--zone", "z", "--server", SERVER,
                    "--listen-on-stdin", "--proxy", "ftp://user:pw@proxy:21")  # fmt: skip
    assert result.exit_code == 2
    assert "unsupported proxy 'ftp://user:***@proxy:21'" in result.stderr
    assert "pw" not in result.stderr.replace("proxy", "")


def test_proxy_password_is_never_written_into_a_proxy_command(tmp_path: Path) -> None:
    args = ["--zone", "z", "--server", SERVER, "--proxy", "http://u:secretpw@proxy:3128"]
    result = invoke(tmp_path, "ssh", "vm1", *args, "--dry-run")
    assert result.exit_code == 2
    assert "a proxy password would be written into the ssh command line" in result.stderr
    assert "secretpw" not in result.output
    plain = invoke(tmp_path, "ssh-config", "vm1", "--zone", "z", "--proxy", "http://proxy:3128")
    assert "--proxy=http://proxy:3128" in ok(plain).stdout
