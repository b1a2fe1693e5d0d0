"""A real OpenSSH server for end-to-end tests: runs as the current user on 127.0.0.1 with a
generated host key, one authorized client key and a generated sshd_config (no PAM, no pid file,
no passwords), logging to a file the test can read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..helpers import UNIT
from ..ports import free_port

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
SSHD = shutil.which("sshd", path=SBIN_PATH)
SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")
# sshd's privilege separation chroots here when it runs as root.
PRIVSEP_DIR = Path("/run/sshd")
START_ATTEMPTS = 5


class SshdError(RuntimeError):
    """sshd could not be started; the message carries its log."""


def missing_tools() -> str | None:
    """Why the OpenSSH tests cannot run here, or None."""
    for name, path in (("sshd", SSHD), ("ssh", SSH), ("ssh-keygen", SSH_KEYGEN)):
        if path is None:
            return f"OpenSSH {name} not installed (make system-deps)"
    return None


def current_user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def keygen(path: Path, comment: str) -> Path:
    """A new passphrase-less ed25519 key at ``path`` (private) and ``path.pub``."""
    assert SSH_KEYGEN is not None
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=200 * UNIT,
    )
    path.chmod(0o600)
    return path


def _ensure_privsep_dir() -> None:
    if os.geteuid() != 0 or PRIVSEP_DIR.is_dir():
        return
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        raise SshdError(f"cannot create {PRIVSEP_DIR} for sshd: {exc}") from None


@dataclass
class Sshd:
    """A running sshd. ``client_key`` logs in as ``user``; ``log`` is sshd's stderr."""

    port: int
    user: str
    client_key: Path
    host_key: Path
    known_hosts: Path
    config: Path
    log: Path
    process: asyncio.subprocess.Process

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def accepted(self) -> int:
        """How many logins sshd accepted so far (``Accepted publickey for ...``)."""
        return self.log_text().count("Accepted publickey for ")

    def connections(self) -> int:
        """How many TCP connections sshd has seen (``Connection from ...``)."""
        return self.log_text().count("Connection from ")

    def ssh_options(self) -> list[str]:
        """Client options every test uses: our key only, no agent, no user config, no prompts,
        and a throw-away known_hosts file."""
        return [
            "-F",
            "none",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"ConnectTimeout={max(5, int(200 * UNIT))}",
            "-o",
            "LogLevel=ERROR",
        ]


def _write_config(
    directory: Path, port: int, host_key: Path, authorized: Path, extra: Sequence[str] = ()
) -> Path:
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        "AddressFamily inet",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized}",
        "PidFile none",
        "UsePAM no",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "PermitUserEnvironment no",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "MaxStartups 100",
        "LogLevel VERBOSE",
        # scp uses the SFTP protocol by default since OpenSSH 9.0.
        "Subsystem sftp internal-sftp",
        *extra,
    ]
    config = directory / "sshd_config"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


async def _banner(port: int) -> bool:
    """True once something on ``port`` speaks SSH."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        line = await reader.readline()
        return line.startswith(b"SSH-2.0-")
    except OSError:
        return False
    finally:
        writer.close()


def _read(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


async def _wait_ready(process: asyncio.subprocess.Process, port: int, log: Path) -> bool:
    """True when sshd answers on ``port``; False when it exited first. Callers bound it."""
    delay = UNIT / 10
    while process.returncode is None:
        # The log line proves it is our sshd (not a racing process) that owns the port.
        if f"Server listening on 127.0.0.1 port {port}." in _read(log) and await _banner(port):
            return True
        try:
            await asyncio.wait_for(process.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, UNIT * 2)
    return False


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 100 * UNIT)
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(frozen=True)
class _Files:
    directory: Path
    user: str
    host_key: Path
    client_key: Path
    authorized: Path
    known_hosts: Path
    log: Path


def _prepare(directory: Path) -> _Files:
    """Keys and files for sshd under ``directory`` (absolute paths: sshd insists on them)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    _ensure_privsep_dir()
    user = current_user()
    host_key = keygen(directory / "ssh_host_ed25519_key", "host@e2e")
    client_key = keygen(directory / "id_ed25519", f"{user}@e2e")
    authorized = directory / "authorized_keys"
    authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
    authorized.chmod(0o600)
    return _Files(
        directory,
        user,
        host_key,
        client_key,
        authorized,
        directory / "known_hosts",
        directory / "sshd.log",
    )


async def _start(
    files: _Files, port: int, extra: Sequence[str]
) -> tuple[asyncio.subprocess.Process, Path]:
    assert SSHD is not None
    config = _write_config(files.directory, port, files.host_key, files.authorized, extra)
    with files.log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            SSHD,
            "-D",
            "-e",
            "-f",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    return process, config


@contextlib.asynccontextmanager
async def running_sshd(
    directory: Path, *, extra: Sequence[str] = (), authorized_keys: bool = True
) -> AsyncIterator[Sshd]:
    """Start sshd (files under ``directory``) on a free loopback port; stop it on exit.
    ``extra``: more sshd_config lines (they override the defaults above them only where sshd
    takes the last value; put options sshd takes the first value of in ``extra`` carefully).
    ``authorized_keys=False``: the client key is not authorized (certificate logins only)."""
    reason = missing_tools()
    if reason is not None:
        raise SshdError(reason)
    files = await asyncio.to_thread(_prepare, directory)
    if not authorized_keys:
        files.authorized.write_text("")
    failures: list[str] = []
    for _ in range(START_ATTEMPTS):
        port = free_port()
        process, config = await _start(files, port, extra)
        try:
            async with asyncio.timeout(200 * UNIT):
                ready = await _wait_ready(process, port, files.log)
        except BaseException:
            await _stop(process)
            raise
        if ready:
            break
        await _stop(process)
        text = _read(files.log)
        failures.append(text)
        if "Address already in use" not in text:  # anything but a port race is fatal
            raise SshdError(f"sshd exited with {process.returncode}:\n{text}")
    else:
        raise SshdError("sshd could not bind a free port:\n" + "\n".join(failures))
    server = Sshd(
        port,
        files.user,
        files.client_key,
        files.host_key,
        files.known_hosts,
        config,
        files.log,
        process,
    )
    try:
        yield server
    finally:
        await _stop(process)
