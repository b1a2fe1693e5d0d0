"""Pure, portable builders for the ssh and RDP launchers: ProxyCommand quoting, ssh argv,
generated ssh_config blocks and RDP client commands. No I/O apart from an injectable ``which``."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "INSTANCE_RE",
    "USER_RE",
    "CertificateLogin",
    "LauncherError",
    "TunnelArgs",
    "client_argv",
    "find_rdp_client",
    "host_key_alias",
    "merge_ssh_config",
    "proxy_command",
    "quote_proxy_token",
    "rdp_command",
    "certificate_options",
    "ssh_argv",
    "ssh_config_block",
    "tunnel_options",
    "validate_name",
]

# A leading "-" is refused so that a name can never be read as an option by ssh or by us.
INSTANCE_RE = re.compile(r"(?!-)[A-Za-z0-9._-]{1,253}")
# ssh splits user@host at the last "@", so "@" is allowed inside (user@domain); "\" for DOMAIN\user.
USER_RE = re.compile(r"(?!-)[A-Za-z0-9._@\\-]{1,256}")

# Option names of `start-tunnel`, in the order they are emitted (fixed order: deterministic output).
_VALUE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("profile", "--profile"),
    ("server", "--server"),
    ("project", "--project"),
    ("zone", "--zone"),
    ("region", "--region"),
    ("network", "--network"),
    ("dest_group", "--dest-group"),
    ("access_token_file", "--access-token-file"),
    ("credential_file", "--credential-file"),
    ("ca_file", "--ca-file"),
    ("device_cert", "--device-cert"),
    ("device_key", "--device-key"),
    ("proxy", "--proxy"),
)
_NAME_FIELDS = frozenset({"profile", "project", "zone", "region", "network", "dest_group"})
_PATH_FIELDS = frozenset(
    {"access_token_file", "credential_file", "ca_file", "device_cert", "device_key"}
)

# Tokens made only of these characters mean the same thing unquoted to sh/bash/dash/zsh/fish/csh
# and to the Windows argv parser. Everything else is double-quoted.
_BARE_RE = re.compile(r"[A-Za-z0-9_@+:,./-][A-Za-z0-9_@+=:,./-]*")
# Inside double quotes these are still special to some shell we may run under ($SHELL -c):
# $ ` " \ (POSIX), ! (csh history); control characters end or corrupt the line. The rest of the
# set cannot be quoted for ssh_config's own tokenizer (') or is refused as defence in depth in
# case some ssh port hands the line to a command interpreter (; & | < >).
_FORBIDDEN = frozenset("\"'`$;&|<>!")


class LauncherError(ValueError):
    """A value that cannot be used safely to build a launcher command; the message is for users."""


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe name (instance, zone, project...), else raise."""
    if not isinstance(value, str) or INSTANCE_RE.fullmatch(value) is None:
        raise LauncherError(
            f"invalid {kind} name {value!r}: use 1 to 253 letters, digits, '.', '_' or '-', "
            "not starting with '-'"
        )
    return value


def _validate_user(user: str) -> str:
    if USER_RE.fullmatch(user) is None:
        raise LauncherError(
            f"invalid user name {user!r}: use letters, digits, '.', '_', '-', '@' or '\\', "
            "not starting with '-'"
        )
    return user


@dataclass(frozen=True)
class TunnelArgs:
    """The ``start-tunnel`` options that a ProxyCommand must forward."""

    server: str | None = None
    project: str | None = None
    zone: str | None = None
    region: str | None = None
    network: str | None = None
    dest_group: str | None = None
    access_token_file: str | None = None
    insecure_skip_verify: bool = False
    credential_file: str | None = None
    ca_file: str | None = None
    device_cert: str | None = None
    device_key: str | None = None
    profile: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class CertificateLogin:
    """How ssh logs in with a relay certificate: the agent socket holding the ephemeral key and
    its certificate, and the known_hosts file with the relay's host CA (None: host keys are
    checked as without certificates)."""

    agent_socket: str
    known_hosts: str | None = None


# Paths written into ssh options: absolute, and nothing ssh_config's tokenizer would split.
_SSH_PATH_RE = re.compile(r"/[A-Za-z0-9_@+=:,./%-]*")


def _ssh_path(path: str, what: str) -> str:
    if _SSH_PATH_RE.fullmatch(path) is None:
        raise LauncherError(
            f"{what} {path!r} must be an absolute path without spaces, quotes or shell "
            "characters (set TUNNEL_CLIENT_HOME or XDG_RUNTIME_DIR to a plainer directory)"
        )
    return path.replace("%", "%%")  # ssh expands %-tokens in these options


def certificate_options(instance: str, login: CertificateLogin) -> list[tuple[str, str]]:
    """ssh options (name, value) for a certificate login to ``instance``. With a host CA, the
    relay's known_hosts file is the only one and strict: a host key not signed by the CA is
    refused, never prompted for; HostKeyAlias is the instance name, which the host
    certificate's principals name (``tunnel-server ssh sign-host --principal``)."""
    options = [
        ("IdentityAgent", _ssh_path(login.agent_socket, "agent socket")),
        # The agent is ours and holds only the certificate: a user's "IdentitiesOnly yes"
        # (meant to keep a crowded agent quiet) would otherwise hide it from ssh.
        ("IdentitiesOnly", "no"),
    ]
    if login.known_hosts is not None:
        options += [
            ("UserKnownHostsFile", _ssh_path(login.known_hosts, "known_hosts file")),
            ("GlobalKnownHostsFile", "none"),
            ("StrictHostKeyChecking", "yes"),
            # ssh compares it lower-cased with the certificate's principals.
            ("HostKeyAlias", validate_name("instance", instance).lower()),
        ]
    return options


def client_argv() -> list[str]:
    """How to re-invoke this client without relying on PATH, a shell or an entry-point script."""
    if not sys.executable:
        raise LauncherError("cannot find the Python interpreter running tunnel-client")
    if getattr(sys, "frozen", False):
        # A frozen build (PyInstaller and the like) is its own executable and has no "-m".
        return [sys.executable]
    return [sys.executable, "-m", "tunnel_client"]


def quote_proxy_token(value: str, what: str = "value") -> str:
    """Quote one literal word of a ProxyCommand so that OpenSSH's config tokenizer, then
    ``$SHELL -c`` (Unix) or the Windows argv parser (Win32-OpenSSH runs it without a shell), all
    see ``value`` unchanged. ``%`` becomes ``%%`` because ssh expands %-tokens first."""
    if value == "":
        raise LauncherError(f"{what} must not be empty")
    bad = sorted({c for c in value if c in _FORBIDDEN or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise LauncherError(
            f"{what} {value!r} contains {shown}, which cannot be quoted safely in an ssh "
            "ProxyCommand; move or rename the file or use a path without these characters"
        )
    escaped = value.replace("%", "%%")
    if _BARE_RE.fullmatch(value):
        return escaped
    # Within double quotes a POSIX shell turns "\\" into "\" (Windows does not), and a "\" just
    # before the closing quote escapes it for ssh_config and for Windows: refuse both.
    if "\\\\" in value or value.endswith("\\"):
        raise LauncherError(
            f"{what} {value!r} contains a doubled or trailing backslash, which Unix shells and "
            "Windows read differently in an ssh ProxyCommand; use a path without one "
            "(for a UNC path, map a drive letter)"
        )
    return f'"{escaped}"'


def _absolute(path: str) -> str:
    # A generated ssh_config is used from any working directory, so relative paths must go.
    return os.path.abspath(os.path.expanduser(path))


def tunnel_options(args: TunnelArgs) -> list[str]:
    """The ``start-tunnel`` options (as argv, unquoted) that forward ``args``; names validated,
    file paths made absolute."""
    out: list[str] = []
    for field, flag in _VALUE_OPTIONS:
        value = getattr(args, field)
        if value is None:
            continue
        if field in _NAME_FIELDS:
            validate_name(flag.lstrip("-"), value)
        elif field in _PATH_FIELDS:
            if value == "":
                raise LauncherError(f"{flag} must not be empty")
            value = _absolute(value)
        elif value == "":
            raise LauncherError(f"{flag} must not be empty")
        # One "--flag=value" word: a value that starts with "-" can never pass for an option.
        out.append(f"{flag}={value}")
    if args.insecure_skip_verify:
        out.append("--insecure-skip-verify")
    return out


def proxy_command(
    args: TunnelArgs,
    *,
    client: Sequence[str] | None = None,
    instance: str | None = None,
    agent_socket: str | None = None,
) -> str:
    """The ssh ProxyCommand: ``<client...> start-tunnel <instance|%h> %p --listen-on-stdin ...``.

    With ``instance`` the validated name is written literally instead of ``%h``; the launchers
    do that because ssh lower-cases ``%h`` (instance names are case-sensitive). With
    ``agent_socket`` the command first gets a certificate and serves it there (``--ssh-agent``)."""
    words = list(client_argv() if client is None else client)
    if not words:
        raise LauncherError("the client command must not be empty")
    parts = [quote_proxy_token(w, "client command word") for w in words]
    parts.append("start-tunnel")
    # %h and %p are left bare: ssh substitutes them after parsing, and the values are safe
    # (the host is validated before ssh runs, the port is numeric).
    parts.append("%h" if instance is None else validate_name("instance", instance))
    parts.append("%p")
    parts.append("--listen-on-stdin")
    for option in tunnel_options(args):
        flag = option.split("=", 1)[0]
        parts.append(quote_proxy_token(option, f"{flag} value"))
    if agent_socket is not None:
        _ssh_path(agent_socket, "agent socket")
        parts.append(quote_proxy_token(f"--ssh-agent={agent_socket}", "--ssh-agent value"))
    return " ".join(parts)


def host_key_alias(instance: str, args: TunnelArgs) -> str:
    """The known_hosts name for ``instance``: unique per project/location so that two
    same-named instances (or a LAN host of that name) never clash over a host key."""
    validate_name("instance", instance)
    parts = ["tunnel-client"]
    for field in ("project", "zone", "region", "network"):
        value = getattr(args, field)
        if value is not None:
            parts.append(f"{field}={validate_name(field, value)}")
    parts.append(f"instance={instance}")
    # ":" and "=" cannot occur in names, so the alias is unambiguous; ssh lower-cases it anyway.
    return ":".join(parts)


def ssh_argv(
    instance: str,
    ssh_args: Sequence[str],
    args: TunnelArgs,
    *,
    user: str | None = None,
    ssh_binary: str = "ssh",
    client: Sequence[str] | None = None,
    set_host_key_alias: bool = True,
    certificate: CertificateLogin | None = None,
) -> list[str]:
    """argv (no shell) for the system ssh through the tunnel.

    ``ssh_args`` go after the destination, as with ``gcloud compute ssh ... -- ARGS``: OpenSSH
    still parses options there, and any non-option words become the remote command instead of
    being mistaken for the host. Our ``-o`` options come first, and ssh keeps the first value it
    sees, so ``ssh_args`` cannot override them (pass ``set_host_key_alias=False`` to drop that one).
    With ``certificate`` ssh logs in through its agent (the caller runs it) and, with a host CA,
    checks host keys against the relay's known_hosts file only.
    """
    validate_name("instance", instance)
    destination = instance if user is None else f"{_validate_user(user)}@{instance}"
    argv = [
        ssh_binary,
        "-o",
        f"ProxyCommand={proxy_command(args, client=client, instance=instance)}",
        "-o",
        "ProxyUseFdpass=no",
    ]
    options = [] if certificate is None else certificate_options(instance, certificate)
    for name, value in options:
        argv += ["-o", f"{name}={value}"]
    if set_host_key_alias and not any(name == "HostKeyAlias" for name, _ in options):
        argv += ["-o", f"HostKeyAlias={host_key_alias(instance, args)}"]
    argv.append(destination)
    argv.extend(ssh_args)
    return argv


def _markers(marker: str) -> tuple[str, str]:
    if re.fullmatch(r"[A-Za-z0-9._-]+", marker) is None:
        raise LauncherError(f"invalid ssh-config marker {marker!r}")
    return (f"# Begin generated {marker} ssh-config", f"# End generated {marker} ssh-config")


def ssh_config_block(
    hosts: Sequence[tuple[str, TunnelArgs]],
    *,
    marker: str = "tunnel-client",
    client: Sequence[str] | None = None,
    certificates: Mapping[str, CertificateLogin] | None = None,
) -> str:
    """A marked ssh_config block with one ``Host`` per instance, sorted by name. An instance in
    ``certificates`` logs in with a fresh relay certificate per connection: its ProxyCommand
    serves one on the agent socket that IdentityAgent names."""
    begin, end = _markers(marker)
    names = [validate_name("instance", name) for name, _ in hosts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LauncherError(f"duplicate host in ssh-config: {', '.join(dupes)}")
    lines = [begin, f"# Edits between these markers are replaced when {marker} regenerates it."]
    for name, args in sorted(hosts, key=lambda h: h[0]):
        login = (certificates or {}).get(name)
        agent = None if login is None else login.agent_socket
        command = proxy_command(args, client=client, instance=name, agent_socket=agent)
        lines += [f"Host {name}", f"    ProxyCommand {command}", "    ProxyUseFdpass no"]
        options = [] if login is None else certificate_options(name, login)
        lines += [f"    {option} {value}" for option, value in options]
        if not any(option == "HostKeyAlias" for option, _ in options):
            lines.append(f"    HostKeyAlias {host_key_alias(name, args)}")
    if hosts:
        # ssh_config has no "end of Host": without this, lines a user later adds after the
        # block would silently apply only to our last host.
        lines.append("Host *")
    lines.append(end)
    return "\n".join(lines) + "\n"


def merge_ssh_config(existing: str, block: str) -> str:
    """Replace the marked block in ``existing`` (or append it), keeping all other text; running
    it again gives the same text. Line endings follow ``existing`` (CRLF stays CRLF)."""
    block_lines = block.splitlines()
    if (
        len(block_lines) < 2
        or not block_lines[0].startswith("# Begin generated ")
        or not block_lines[-1].startswith("# End generated ")
    ):
        raise LauncherError("not a generated ssh-config block (missing Begin/End markers)")
    begin, end = block_lines[0], block_lines[-1]
    newline = "\r\n" if "\r\n" in existing else "\n"
    new_block = [line + newline for line in block_lines]

    lines = existing.splitlines(keepends=True)
    out: list[str] = []
    inserted = False
    i = 0
    while i < len(lines):
        if lines[i].rstrip("\r\n") == begin:
            j = i + 1
            while j < len(lines) and lines[j].rstrip("\r\n") != end:
                j += 1
            if j == len(lines):
                raise LauncherError(
                    f"ssh config has {begin!r} without a matching {end!r}; "
                    "fix or remove the partial block by hand"
                )
            if not inserted:  # a second stale copy is dropped, not duplicated
                out.extend(new_block)
                inserted = True
            i = j + 1
            continue
        out.append(lines[i])
        i += 1
    if not inserted:
        if out and not out[-1].endswith("\n"):
            out[-1] += newline
        if out and out[-1].strip():
            out.append(newline)  # a blank line between the user's text and ours
        out.extend(new_block)
    return "".join(out)


def find_rdp_client(
    platform: str = sys.platform, which: Callable[[str], str | None] = shutil.which
) -> list[str] | None:
    """An RDP client command template (``{host}``/``{port}`` placeholders) for this platform, or
    None when none is installed."""
    if platform == "win32":
        return ["mstsc", "/v:{host}:{port}"]
    if platform == "darwin":
        # Microsoft's macOS client registers the rdp: URL scheme; `open` hands the URL to it.
        return ["open", "rdp://full%20address=s:{host}:{port}"]
    for name in ("xfreerdp3", "xfreerdp", "wlfreerdp"):
        if which(name):
            return [name, "/v:{host}:{port}"]
    if which("remmina"):
        return ["remmina", "-c", "rdp://{host}:{port}"]
    return None


_FORMATTER = string.Formatter()


def _substitute(word: str, values: dict[str, str]) -> str:
    out: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(word))
    except ValueError as e:
        raise LauncherError(f"invalid --exec argument {word!r}: {e} (write '{{{{' for '{{')") from e
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in values or spec or conversion:
            raise LauncherError(
                f"unknown placeholder {{{field}}} in --exec argument {word!r}: "
                "use {host} and {port} (and {{ }} for literal braces)"
            )
        out.append(values[field])
    return "".join(out)


def rdp_command(
    template: str | Sequence[str], host: str, port: int, *, platform: str = sys.platform
) -> list[str]:
    """argv (never run through a shell) from an RDP client template, ``{host}``/``{port}``
    substituted in each argument. A string is split like the platform's command lines."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise LauncherError(f"invalid port {port!r}")
    if isinstance(template, str):
        posix = platform != "win32"
        try:
            words = shlex.split(template, posix=posix)
        except ValueError as e:
            raise LauncherError(f"cannot parse --exec command {template!r}: {e}") from e
        if not posix:
            # Non-POSIX shlex keeps the quotes that protect spaces in Windows paths.
            words = [w[1:-1] if len(w) >= 2 and w[0] == w[-1] == '"' else w for w in words]
    else:
        words = list(template)
    if not words:
        raise LauncherError("the --exec command is empty")
    values = {"host": host, "port": str(port)}
    return [_substitute(w, values) for w in words]
