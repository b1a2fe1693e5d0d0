"""Tests for tunnel_client.launchers, including real OpenSSH parsing and execution of the
generated ProxyCommand (no network: the proxy only records its argv)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tunnel_client.launchers import (
    LauncherError,
    TunnelArgs,
    client_argv,
    find_rdp_client,
    host_key_alias,
    merge_ssh_config,
    proxy_command,
    quote_proxy_token,
    rdp_command,
    ssh_argv,
    ssh_config_block,
    tunnel_options,
    validate_name,
)

PY = ["/usr/bin/python3", "-m", "tunnel_client"]
SSH = shutil.which("ssh")
needs_ssh = pytest.mark.skipif(SSH is None, reason="OpenSSH client not installed")

INJECTIONS = [
    "a;rm -rf /",
    "$(id)",
    "`id`",
    "a b",
    "a\nb",
    "web-1\n",
    "-oProxyCommand=touch /tmp/pwned",
    "-",
    "",
    "a|b",
    "a&b",
    "a>b",
    "%h",
    "a/b",
    "caf\u00e9",
    "x" * 254,
]


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["web-1", "a", "A.b_c-d", "1" * 253, "..", "_x"])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name("instance", name) == name


@pytest.mark.parametrize("name", INJECTIONS)
def test_validate_name_rejects_injection(name: str) -> None:
    with pytest.raises(LauncherError, match="invalid instance name"):
        validate_name("instance", name)


def test_validate_name_message() -> None:
    with pytest.raises(LauncherError) as e:
        validate_name("zone", "x;rm")
    assert str(e.value).startswith("invalid zone name 'x;rm': ")
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("field", ["project", "zone", "region", "network", "dest_group"])
@pytest.mark.parametrize("bad", ["a;b", "$(id)", "-x", "a b"])
def test_name_options_are_validated(field: str, bad: str) -> None:
    args = TunnelArgs(**{field: bad})  # type: ignore[arg-type]
    with pytest.raises(LauncherError, match="invalid"):
        proxy_command(args, client=PY)


# --- client_argv -----------------------------------------------------------------------------


def test_client_argv_uses_this_interpreter() -> None:
    assert client_argv() == [sys.executable, "-m", "tunnel_client"]


def test_client_argv_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert client_argv() == [sys.executable]


def test_proxy_command_defaults_to_client_argv() -> None:
    assert proxy_command(TunnelArgs()).startswith(
        " ".join(quote_proxy_token(w) for w in client_argv()) + " start-tunnel %h %p"
    )


# --- quoting ---------------------------------------------------------------------------------


def test_proxy_command_minimal() -> None:
    assert (
        proxy_command(TunnelArgs(), client=PY)
        == "/usr/bin/python3 -m tunnel_client start-tunnel %h %p --listen-on-stdin"
    )


def test_proxy_command_all_options() -> None:
    args = TunnelArgs(
        server="https://relay.example.com:8443",
        project="p1",
        zone="us-east1-b",
        region="us-east1",
        network="default",
        dest_group="grp",
        access_token_file="/run/token",
        insecure_skip_verify=True,
        ca_file="/etc/ca.pem",
    )
    assert proxy_command(args, client=PY, instance="Web-1") == (
        "/usr/bin/python3 -m tunnel_client start-tunnel Web-1 %p --listen-on-stdin"
        " --server=https://relay.example.com:8443 --project=p1 --zone=us-east1-b"
        " --region=us-east1 --network=default --dest-group=grp"
        " --access-token-file=/run/token --ca-file=/etc/ca.pem --insecure-skip-verify"
    )


def test_path_with_spaces_is_double_quoted() -> None:
    cmd = proxy_command(
        TunnelArgs(ca_file="/home/jane doe/my ca.pem"), client=["/opt/My Apps/bin/python"]
    )
    assert cmd.startswith('"/opt/My Apps/bin/python" start-tunnel')
    assert cmd.endswith(' "--ca-file=/home/jane doe/my ca.pem"')
    # A POSIX shell splits it back into the intended words.
    assert shlex.split(cmd) == [
        "/opt/My Apps/bin/python",
        "start-tunnel",
        "%h",
        "%p",
        "--listen-on-stdin",
        "--ca-file=/home/jane doe/my ca.pem",
    ]


def test_windows_path_is_quoted_and_keeps_backslashes() -> None:
    exe = r"C:\Program Files (x86)\Python311\python.exe"
    assert quote_proxy_token(exe) == f'"{exe}"'
    # Backslashes inside double quotes survive a POSIX shell too (none precedes a special char).
    assert shlex.split(quote_proxy_token(exe)) == [exe]
    assert quote_proxy_token(r"C:\Python\python.exe") == r'"C:\Python\python.exe"'


def test_percent_is_escaped_in_literal_parts() -> None:
    cmd = proxy_command(
        TunnelArgs(server="https://relay/p%20x", ca_file="/tmp/100%/ca.pem"),
        client=["/opt/50%off/python"],
    )
    assert cmd.startswith('"/opt/50%%off/python" start-tunnel %h %p ')
    assert '"--server=https://relay/p%%20x"' in cmd
    assert '"--ca-file=/tmp/100%%/ca.pem"' in cmd
    assert cmd.count("%") == 2 + 2 + 2 + 2  # three escaped pairs plus %h and %p


@pytest.mark.parametrize(
    "bad",
    [
        '/tmp/a"b',
        "/tmp/a'b",
        "/tmp/a`id`",
        "/tmp/$HOME",
        "/tmp/a\nb",
        "/tmp/a\rb",
        "/tmp/a\x00b",
        "/tmp/a;b",
        "/tmp/a&b",
        "/tmp/a|b",
        "/tmp/a<b",
        "/tmp/a>b",
        "/tmp/a!b",
        "/tmp/a\\\\b",
        "/tmp/dir\\",
    ],
)
def test_unquotable_paths_are_rejected(bad: str) -> None:
    with pytest.raises(LauncherError, match="ProxyCommand"):
        proxy_command(TunnelArgs(ca_file=bad), client=PY)
    with pytest.raises(LauncherError, match="ProxyCommand"):
        proxy_command(TunnelArgs(), client=[bad])


def test_empty_values_rejected() -> None:
    with pytest.raises(LauncherError, match="empty"):
        proxy_command(TunnelArgs(ca_file=""), client=PY)
    with pytest.raises(LauncherError, match="empty"):
        proxy_command(TunnelArgs(server=""), client=PY)
    with pytest.raises(LauncherError, match="empty"):
        proxy_command(TunnelArgs(), client=[])


def test_relative_paths_become_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert tunnel_options(TunnelArgs(access_token_file="tok")) == [
        f"--access-token-file={tmp_path / 'tok'}"
    ]


@pytest.mark.parametrize("token", ["~/x", "#x", "a*b", "a?b", "{a,b}", "[ab]", "=x", "a b", "^x"])
def test_shell_metacharacters_are_quoted(token: str) -> None:
    quoted = quote_proxy_token(token)
    assert quoted == f'"{token}"'
    assert shlex.split(quoted) == [token]


# --- ssh argv --------------------------------------------------------------------------------


def test_ssh_argv_shape() -> None:
    args = TunnelArgs(project="p", zone="z")
    argv = ssh_argv("web-1", ["-L", "8080:localhost:80", "uptime"], args, user="alice", client=PY)
    assert argv == [
        "ssh",
        "-o",
        "ProxyCommand=/usr/bin/python3 -m tunnel_client start-tunnel web-1 %p"
        " --listen-on-stdin --project=p --zone=z",
        "-o",
        "ProxyUseFdpass=no",
        "-o",
        "HostKeyAlias=tunnel-client:project=p:zone=z:instance=web-1",
        "alice@web-1",
        "-L",
        "8080:localhost:80",
        "uptime",
    ]


def test_ssh_argv_options_and_binary() -> None:
    argv = ssh_argv(
        "vm", [], TunnelArgs(), ssh_binary="/usr/bin/ssh", client=PY, set_host_key_alias=False
    )
    assert argv[0] == "/usr/bin/ssh"
    assert argv[-1] == "vm"
    assert not any(a.startswith("HostKeyAlias") for a in argv)


@pytest.mark.parametrize("instance", INJECTIONS)
def test_ssh_argv_rejects_injection(instance: str) -> None:
    with pytest.raises(LauncherError):
        ssh_argv(instance, [], TunnelArgs(), client=PY)


@pytest.mark.parametrize("user", ["-oProxyCommand=id", "a b", "a;b", "", "$(id)", "a\n"])
def test_ssh_argv_rejects_bad_user(user: str) -> None:
    with pytest.raises(LauncherError, match="invalid user"):
        ssh_argv("vm", [], TunnelArgs(), user=user, client=PY)


@pytest.mark.parametrize("user", ["alice", "a.b-c_d", "alice@corp.example", "CORP\\alice"])
def test_ssh_argv_accepts_users(user: str) -> None:
    assert ssh_argv("vm", [], TunnelArgs(), user=user, client=PY)[-1] == f"{user}@vm"


def test_host_key_alias_distinguishes_locations() -> None:
    a = host_key_alias("web", TunnelArgs(project="p", zone="a"))
    b = host_key_alias("web", TunnelArgs(project="p", zone="b"))
    c = host_key_alias("web", TunnelArgs(project="p", region="r", network="n"))
    assert len({a, b, c}) == 3
    assert c == "tunnel-client:project=p:region=r:network=n:instance=web"
    with pytest.raises(LauncherError):
        host_key_alias("a;b", TunnelArgs())


# --- ssh-config --------------------------------------------------------------------------------

BLOCK_ONE = (
    "# Begin generated tunnel-client ssh-config\n"
    "# Edits between these markers are replaced when tunnel-client regenerates it.\n"
    "Host web-1\n"
    "    ProxyCommand /usr/bin/python3 -m tunnel_client start-tunnel web-1 %p"
    ' --listen-on-stdin --zone=z "--ca-file=/etc/my ca%%.pem"\n'
    "    ProxyUseFdpass no\n"
    "    HostKeyAlias tunnel-client:zone=z:instance=web-1\n"
    "Host *\n"
    "# End generated tunnel-client ssh-config\n"
)


def test_ssh_config_block_exact() -> None:
    block = ssh_config_block(
        [("web-1", TunnelArgs(zone="z", ca_file="/etc/my ca%.pem"))], client=PY
    )
    assert block == BLOCK_ONE


def test_ssh_config_block_sorted_and_deterministic() -> None:
    hosts = [("b", TunnelArgs(zone="z")), ("a", TunnelArgs(zone="y"))]
    one = ssh_config_block(hosts, client=PY)
    assert one == ssh_config_block(list(reversed(hosts)), client=PY)
    assert one.index("Host a\n") < one.index("Host b\n")


def test_ssh_config_block_empty_and_marker() -> None:
    assert ssh_config_block([], marker="acme", client=PY) == (
        "# Begin generated acme ssh-config\n"
        "# Edits between these markers are replaced when acme regenerates it.\n"
        "# End generated acme ssh-config\n"
    )
    with pytest.raises(LauncherError, match="marker"):
        ssh_config_block([], marker="bad marker\n")


def test_ssh_config_block_rejects_bad_and_duplicate_hosts() -> None:
    with pytest.raises(LauncherError, match="invalid instance"):
        ssh_config_block([("*", TunnelArgs())], client=PY)
    with pytest.raises(LauncherError, match="duplicate host in ssh-config: a"):
        ssh_config_block([("a", TunnelArgs()), ("a", TunnelArgs(zone="z"))], client=PY)


USER_TEXT_BEFORE = "Host github.com\n    User git\n\n"
USER_TEXT_AFTER = "\nHost *.corp\n    ForwardAgent no\n"


def _block(zone: str) -> str:
    return ssh_config_block([("web-1", TunnelArgs(zone=zone))], client=PY)


def test_merge_into_empty() -> None:
    assert merge_ssh_config("", _block("z")) == _block("z")


def test_merge_appends_and_preserves_text() -> None:
    existing = "Host github.com\n    User git"  # no trailing newline
    merged = merge_ssh_config(existing, _block("z"))
    assert merged == existing + "\n\n" + _block("z")


def test_merge_twice_equals_once() -> None:
    for existing in ["", "Host x\n", USER_TEXT_BEFORE, "Host x\n  User y\n\n\n"]:
        once = merge_ssh_config(existing, _block("z"))
        assert merge_ssh_config(once, _block("z")) == once


def test_merge_replaces_old_block_in_place() -> None:
    existing = USER_TEXT_BEFORE + _block("old") + USER_TEXT_AFTER
    merged = merge_ssh_config(existing, _block("new"))
    assert merged == USER_TEXT_BEFORE + _block("new") + USER_TEXT_AFTER
    assert "zone=old" not in merged


def test_merge_collapses_duplicate_blocks() -> None:
    existing = _block("a") + "middle\n" + _block("b")
    assert merge_ssh_config(existing, _block("c")) == _block("c") + "middle\n"


def test_merge_keeps_other_markers() -> None:
    other = ssh_config_block([("db", TunnelArgs())], marker="other", client=PY)
    merged = merge_ssh_config(other, _block("z"))
    assert merged == other + "\n" + _block("z")
    assert merge_ssh_config(merged, _block("z")) == merged


def test_merge_keeps_crlf() -> None:
    existing = "Host x\r\n    User y\r\n"
    merged = merge_ssh_config(existing, _block("z"))
    assert merged == existing + "\r\n" + _block("z").replace("\n", "\r\n")
    assert merge_ssh_config(merged, _block("z")) == merged
    assert "\n" not in merged.replace("\r\n", "")


def test_merge_refuses_unterminated_block() -> None:
    existing = "Host x\n" + "# Begin generated tunnel-client ssh-config\nHost web-1\n"
    with pytest.raises(LauncherError, match="without a matching"):
        merge_ssh_config(existing, _block("z"))


def test_merge_refuses_non_block() -> None:
    with pytest.raises(LauncherError, match="markers"):
        merge_ssh_config("", "Host x\n")


# --- RDP -------------------------------------------------------------------------------------


def _which(*present: str) -> Callable[[str], str | None]:
    return lambda name: f"/usr/bin/{name}" if name in present else None


def test_rdp_windows_and_macos() -> None:
    none = _which()
    assert find_rdp_client("win32", none) == ["mstsc", "/v:{host}:{port}"]
    assert find_rdp_client("darwin", none) == ["open", "rdp://full%20address=s:{host}:{port}"]


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (("xfreerdp3", "xfreerdp", "remmina"), ["xfreerdp3", "/v:{host}:{port}"]),
        (("xfreerdp", "wlfreerdp"), ["xfreerdp", "/v:{host}:{port}"]),
        (("wlfreerdp", "remmina"), ["wlfreerdp", "/v:{host}:{port}"]),
        (("remmina",), ["remmina", "-c", "rdp://{host}:{port}"]),
        ((), None),
    ],
)
def test_rdp_linux(present: tuple[str, ...], expected: list[str] | None) -> None:
    assert find_rdp_client("linux", _which(*present)) == expected
    assert find_rdp_client("freebsd14", _which(*present)) == expected


def test_rdp_client_templates_substitute() -> None:
    for platform in ("win32", "darwin", "linux"):
        template = find_rdp_client(platform, _which("xfreerdp"))
        assert template is not None
        assert rdp_command(template, "127.0.0.1", 50123)[-1].endswith("127.0.0.1:50123")
    assert rdp_command(["open", "rdp://full%20address=s:{host}:{port}"], "127.0.0.1", 3) == [
        "open",
        "rdp://full%20address=s:127.0.0.1:3",
    ]


def test_rdp_command_string_template_posix() -> None:
    argv = rdp_command(
        "'/opt/My RDP/client' /v:{host}:{port} /title:'{{x}} {host}'",
        "127.0.0.1",
        4000,
        platform="linux",
    )
    assert argv == ["/opt/My RDP/client", "/v:127.0.0.1:4000", "/title:{x} 127.0.0.1"]


def test_rdp_command_string_template_windows() -> None:
    argv = rdp_command(
        r'"C:\Program Files\RDP\rdp.exe" /v:{host}:{port} C:\x\y',
        "127.0.0.1",
        4000,
        platform="win32",
    )
    assert argv == [r"C:\Program Files\RDP\rdp.exe", "/v:127.0.0.1:4000", r"C:\x\y"]


def test_rdp_command_never_uses_a_shell() -> None:
    # Whatever the host string holds, it stays inside its one argument.
    argv = rdp_command("client --host={host} --port {port}", "a; rm -rf / $(id)", 1)
    assert argv == ["client", "--host=a; rm -rf / $(id)", "--port", "1"]


@pytest.mark.parametrize(
    "template",
    ["client {user}", "client {}", "client {0}", "client {port:>6}", "client {host!r}", "c {x.y}"],
)
def test_rdp_command_unknown_placeholder(template: str) -> None:
    with pytest.raises(LauncherError, match="placeholder"):
        rdp_command(template, "127.0.0.1", 3389, platform="linux")


@pytest.mark.parametrize("template", ["client {host", "client }", "'unterminated", "", []])
def test_rdp_command_malformed(template: str | list[str]) -> None:
    with pytest.raises(LauncherError):
        rdp_command(template, "127.0.0.1", 3389, platform="linux")


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_rdp_command_bad_port(port: int) -> None:
    with pytest.raises(LauncherError, match="port"):
        rdp_command(["c", "{port}"], "127.0.0.1", port)


# --- real OpenSSH ------------------------------------------------------------------------------

RECORDER = """\
import json, os, sys
with open(os.environ["RECORD_ARGV_TO"], "w") as f:
    json.dump(sys.argv[1:], f)
"""

# Option values that exercise every quoting rule we rely on.
TRICKY = TunnelArgs(
    server="https://relay.example.com/p%20ath?x=1",
    project="proj",
    zone="us-east1-b",
    ca_file="/tmp/dir with space/ca (1) 50%.pem",
    access_token_file="/tmp/C:\\Users\\Jane Doe\\tok",
    insecure_skip_verify=True,
)


@pytest.fixture
def recorder(tmp_path: Path) -> list[str]:
    # The fake client lives in a directory whose name needs quoting and %-escaping.
    d = tmp_path / "my client 100%"
    d.mkdir()
    script = d / "rec.py"
    script.write_text(RECORDER)
    return [sys.executable, str(script)]


def _shells() -> list[str]:
    found = [shutil.which(s) for s in ("sh", "dash", "bash", "zsh", "fish", "tcsh", "csh")]
    return sorted({s for s in found if s is not None})


def _run_ssh(argv: list[str], tmp_path: Path, shell: str) -> list[str]:
    out = tmp_path / "argv.json"
    env = dict(os.environ, SHELL=shell, RECORD_ARGV_TO=str(out))
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert out.exists(), "the ProxyCommand did not run"
    result: list[str] = json.loads(out.read_text())
    return result


def _isolated(*extra: str) -> list[str]:
    # Options placed after the destination (OpenSSH parses them there too): no user config,
    # no prompts, no known_hosts writes.
    return [
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=10",
        *extra,
    ]


@needs_ssh
def test_ssh_parses_proxy_command_verbatim(recorder: list[str]) -> None:
    assert SSH is not None
    cmd = proxy_command(TRICKY, client=recorder)
    out = subprocess.run(
        [SSH, "-G", "-F", "/dev/null", "-o", f"ProxyCommand={cmd}", "web-1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("proxycommand ")]
    assert lines == [f"proxycommand {cmd}"]


@needs_ssh
@pytest.mark.parametrize("shell", _shells())
def test_ssh_runs_proxy_command_with_expanded_tokens(
    recorder: list[str], tmp_path: Path, shell: str
) -> None:
    assert SSH is not None
    cmd = proxy_command(TRICKY, client=recorder)
    argv = [SSH, "-o", f"ProxyCommand={cmd}", "web-1", "-p", "2222", *_isolated()]
    assert _run_ssh(argv, tmp_path, shell) == [
        "start-tunnel",
        "web-1",
        "2222",
        "--listen-on-stdin",
        *tunnel_options(TRICKY),
    ]


@needs_ssh
@pytest.mark.parametrize("shell", _shells())
def test_ssh_argv_runs_for_real(recorder: list[str], tmp_path: Path, shell: str) -> None:
    assert SSH is not None
    # Mixed case survives: ssh would lower-case %h, so the launcher writes the name literally.
    argv = ssh_argv("Web-1", _isolated(), TRICKY, user="alice", ssh_binary=SSH, client=recorder)
    recorded = _run_ssh(argv, tmp_path, shell)
    assert recorded == [
        "start-tunnel",
        "Web-1",
        "22",
        "--listen-on-stdin",
        *tunnel_options(TRICKY),
    ]
    assert "--ca-file=/tmp/dir with space/ca (1) 50%.pem" in recorded


@needs_ssh
def test_generated_ssh_config_works_with_ssh(recorder: list[str], tmp_path: Path) -> None:
    assert SSH is not None
    block = ssh_config_block([("Web-1", TRICKY), ("db", TunnelArgs(zone="z"))], client=recorder)
    config = tmp_path / "config"
    config.write_text(merge_ssh_config("Host other\n    User bob\n", block))
    resolved = subprocess.run(
        [SSH, "-G", "-F", str(config), "Web-1"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert f"proxycommand {proxy_command(TRICKY, client=recorder, instance='Web-1')}" in resolved
    assert "proxyusefdpass no" in resolved
    assert f"hostkeyalias {host_key_alias('Web-1', TRICKY).lower()}" in resolved
    # Lines after the block are back in global scope ("Host *"), not part of our last host.
    other = subprocess.run(
        [SSH, "-G", "-F", str(config), "other"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not any(line.startswith("proxycommand ") for line in other)
    assert "user bob" in other

    argv = [SSH, "-F", str(config), "Web-1", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    assert _run_ssh(argv, tmp_path, "/bin/sh") == [
        "start-tunnel",
        "Web-1",
        "22",
        "--listen-on-stdin",
        *tunnel_options(TRICKY),
    ]
