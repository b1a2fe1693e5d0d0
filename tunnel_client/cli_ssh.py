"""Certificate logins for ``tunnel-client ssh``, ``ssh-config`` and ``start-tunnel --ssh-agent``,
and the ``ssh-cert`` command (docs/ssh-certificates.md, "The client").

Discovery: ``--certificate/--no-certificate``, by default *auto*: the client asks the relay's
public ``/v1/ssh/ca``; a relay without an SSH CA answers 404 and the user's own keys are used
as before. In auto mode a relay that has a CA but grants this member no login name there (403)
is reported on one line and the user's own keys are used; ``--certificate`` makes both errors.

Each connection gets a fresh certificate for a fresh in-memory Ed25519 key, served to ssh by a
short-lived ssh-agent (tunnel_client.ssh_agent), so nothing needs renewing: the wrapper runs the
agent itself; the ssh-config form's ProxyCommand does (``start-tunnel --ssh-agent SOCKET``)."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from . import launchers
from .control import runtime_dir
from .credentials import state_dir
from .errors import ConnectionFailed, TunnelFailed
from .listener import run_stdio
from .session import ConnectOptions
from .ssh_agent import load_into_agent, running_agent, temporary_private_dir
from .ssh_cert import (
    CertificateRefused,
    Issued,
    ephemeral_key,
    fetch_ca,
    issue,
    known_hosts_path,
    write_known_hosts,
)

__all__ = [
    "Issued",
    "Prepared",
    "load_into_agent",
    "describe",
    "ephemeral_key",
    "issue",
    "agent_socket_for",
    "certificate_option",
    "config_logins",
    "prepare",
    "run_ssh",
    "stdio_with_agent",
    "write_for_tools",
]

F = TypeVar("F", bound=Callable[..., Any])

# What ssh prints when StrictHostKeyChecking refuses a host key it cannot verify.
_HOST_KEY_FAILED = b"Host key verification failed."


def certificate_option(func: F) -> F:
    return click.option(
        "--certificate/--no-certificate",
        "certificate",
        default=None,
        help="Log in with a short-lived certificate from the relay (default: when the relay "
        "issues them).",
    )(func)


def _report(message: str) -> None:
    click.echo(message, err=True)


def ssh_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the known_hosts files of relays' host CAs live (0700)."""
    return state_dir(environ) / "ssh"


# A Unix socket path has room for ~104 bytes; the agent's names inside need ~40 of them.
_SOCKET_DIR_MAX = 64


def agent_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where agent sockets live (0700): the runtime directory, gone at logout; a per-user
    directory in the system's temporary directory when that path is too long for sockets
    (``private_dir`` refuses one that someone else made)."""
    directory = runtime_dir(environ) / "ssh"
    if len(os.fsencode(directory)) <= _SOCKET_DIR_MAX:
        return directory
    return Path(tempfile.gettempdir()) / f"tunnel-client-{os.getuid()}"


def agent_socket_for(alias: str, environ: Mapping[str, str] = os.environ) -> Path:
    """The agent socket of one ssh-config host: short (Unix socket paths are limited to ~100
    bytes) and distinct per project/zone/instance."""
    digest = hashlib.sha256(alias.encode()).hexdigest()[:16]
    return agent_dir(environ) / f"agent-{digest}.sock"


@dataclass(frozen=True)
class Prepared:
    """A certificate login: the key and certificate, and the relay's known_hosts file (None
    without a host CA)."""

    issued: Issued
    known_hosts: Path | None


async def prepare(
    options: ConnectOptions,
    mode: bool | None,
    report: Callable[[str], None] = _report,
    environ: Mapping[str, str] = os.environ,
) -> Prepared | None:
    """A certificate for ``options.target``, or None to use the user's own keys (mode False;
    or auto and the relay issues none here)."""
    if mode is False:
        return None
    if sys.platform == "win32":  # OpenSSH for Windows has no `ssh-agent -D -a SOCKET`
        if mode:
            raise TunnelFailed("SSH certificates need a Unix ssh-agent: not on Windows yet.")
        return None
    ca = await fetch_ca(options)
    if ca is None:
        if mode:
            raise CertificateRefused(
                f"The relay at {options.where} issues no SSH certificates (it publishes no CA "
                "keys); drop --certificate to use your own keys.",
                code=404,
            )
        return None
    try:
        issued = usable(await issue(options, ephemeral_key()))
    except CertificateRefused as exc:
        if mode:
            raise
        report(f"{str(exc).splitlines()[0]} Using your own keys.")
        return None
    known_hosts = None
    if ca.host_ca is not None:
        path = known_hosts_path(options.server, ssh_state_dir(environ))
        known_hosts = await asyncio.to_thread(write_known_hosts, path, ca.host_ca)
    return Prepared(issued, known_hosts)


def usable(issued: Issued) -> Issued:
    """``issued``, unless it is expired or about to be (sshd would refuse it with no word to the
    user): then a clear error, since only a clock can be wrong here."""
    if issued.usable():
        return issued
    raise TunnelFailed(
        f"The relay issued a certificate that is expired or about to be ({describe(issued)}): "
        "check the clocks of this machine and of the relay."
    )


def default_login(
    user: str | None,
    issued: Issued,
    report: Callable[[str], None],
    ssh_args: Sequence[str] = (),
) -> str | None:
    """The login name: the user's choice (``--user``, ``USER@``, or ``-l`` among the ssh
    arguments); else ssh's default (the local user name) when the certificate grants it; else
    the certificate's first login name, said on stderr. A choice the certificate does not grant
    is warned about: sshd will refuse it."""
    granted = ", ".join(issued.principals) or "no login name"
    if user is not None:
        if user not in issued.principals:
            report(f"Warning: your certificate is for {granted}, not {user}: sshd will refuse it.")
        return user
    if any(arg.startswith("-l") for arg in ssh_args) or not issued.principals:
        return None
    if getpass.getuser() in issued.principals:
        return None
    report(f"Logging in as {issued.principals[0]} (your certificate's first login name).")
    return issued.principals[0]


async def _pump(stream: asyncio.StreamReader, tail: bytearray) -> None:
    """ssh's stderr to ours as it comes (prompts and remote errors stay live), keeping the end
    to explain a refused host key afterwards."""
    out = sys.stderr.buffer
    while chunk := await stream.read(4096):
        out.write(chunk)
        out.flush()
        tail.extend(chunk)
        del tail[:-4096]


@contextlib.contextmanager
def _forwarding_signals(process: asyncio.subprocess.Process) -> Iterator[None]:
    """SIGTERM and SIGHUP go to ssh instead of ending us at once: ssh exits, and the agent and
    its directory are cleaned up on the normal way out."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            loop.add_signal_handler(sig, process.send_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, not the main thread
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_ssh(
    build: Callable[[launchers.CertificateLogin], list[str]],
    prepared: Prepared,
    instance: str,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Run ssh (argv from ``build``) with the certificate in a private agent; its exit status.
    The agent's 0700 directory is removed on the way out."""
    with temporary_private_dir(agent_dir(environ)) as directory:
        socket_path = directory / "agent.sock"
        known = None if prepared.known_hosts is None else str(prepared.known_hosts)
        argv = build(launchers.CertificateLogin(str(socket_path), known))
        # ssh's stderr passes through us only to explain a refused host key, so only with a
        # host CA: the pipe is shared with the ProxyCommand, whose end of it closes a few
        # hundred milliseconds after ssh exits (it closes the tunnel first).
        piped = asyncio.subprocess.PIPE if known is not None else None
        tail = bytearray()
        async with running_agent(socket_path, prepared.issued):
            process = await asyncio.create_subprocess_exec(*argv, stderr=piped)
            with _forwarding_signals(process):
                if process.stderr is not None:
                    await _pump(process.stderr, tail)
                status = await process.wait()
    if status == 255 and _HOST_KEY_FAILED in tail:
        _report(
            f"ERROR: {instance} did not present a host certificate signed by the relay's host CA "
            "(tunnel-client refuses unsigned host keys when the relay has a host CA); an admin "
            "signs the VM's host key with `tunnel-server ssh sign-host`."
        )
    return 128 - status if status < 0 else status


async def stdio_with_agent(options: ConnectOptions, socket_path: Path) -> None:
    """The ssh-config ProxyCommand of a certificate login: a fresh certificate served on
    ``socket_path`` (the host's IdentityAgent) while stdin/stdout carry the tunnel, and the
    relay's host CA refreshed in its known_hosts file. ssh asks the agent only after the key
    exchange, which needs the tunnel, which starts after the agent."""
    issued, ca = await asyncio.gather(issue(options, ephemeral_key()), fetch_ca(options))
    if ca is not None and ca.host_ca is not None:
        # ssh reads known_hosts after the key exchange, so a rotated host CA is picked up by
        # this very connection.
        path = known_hosts_path(options.server, ssh_state_dir())
        await asyncio.to_thread(write_known_hosts, path, ca.host_ca)
    async with running_agent(socket_path, usable(issued)):
        await run_stdio(options)


async def config_logins(
    options: Callable[[str], ConnectOptions],
    instances: Sequence[tuple[str, str]],
    mode: bool | None,
    report: Callable[[str], None] = _report,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, launchers.CertificateLogin]:
    """ssh-config's certificate logins per instance (``instances``: name, host key alias),
    empty when the relay issues no certificates (auto) or ``mode`` is False."""
    if mode is False or not instances or sys.platform == "win32":
        return {}
    first = options(instances[0][0])
    try:
        ca = await fetch_ca(first)
    except ConnectionFailed as exc:
        if mode:
            raise
        report(f"{str(exc).splitlines()[0]} Writing the block without certificates.")
        return {}
    if ca is None:
        if mode:
            raise CertificateRefused(
                f"The relay at {first.where} issues no SSH certificates.", code=404
            )
        return {}
    known = None
    if ca.host_ca is not None:
        path = known_hosts_path(first.server, ssh_state_dir(environ))
        known = str(await asyncio.to_thread(write_known_hosts, path, ca.host_ca))
    return {
        name: launchers.CertificateLogin(str(agent_socket_for(alias, environ)), known)
        for name, alias in instances
    }


# -- ssh-cert: a certificate for other tools ---------------------------------------------------


def describe(issued: Issued) -> str:
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(issued.valid_before))
    serial = getattr(issued.certificate, "_serial", "?")
    return (
        f"Certificate for {', '.join(issued.principals) or 'no login name'}, valid until "
        f"{until} (serial {serial})."
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the user only, replacing ``path`` atomically."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def write_for_tools(issued: Issued, directory: Path, name: str) -> Path:
    """``NAME`` (the private key, OpenSSH format, unencrypted: tools must use it unattended;
    it is worthless once the certificate expires), ``NAME-cert.pub`` and ``NAME.pub``, each 0600
    in ``directory`` (created 0700). Returns the private key's path: ``ssh -i`` finds the
    certificate beside it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = directory / name
    _write_private(key, issued.key.export_private_key("openssh"))
    _write_private(directory / f"{name}-cert.pub", issued.text.encode() + b"\n")
    _write_private(directory / f"{name}.pub", issued.key.export_public_key("openssh"))
    return key
