"""A short-lived ssh-agent holding one ephemeral key and its certificate for one ssh connection:
asyncssh has no agent server, so the client runs OpenSSH's own (``ssh-agent -D``) on a socket in
a private 0700 directory, loads the key through asyncssh's agent client (from memory: the key is
never written to disk), and stops the agent when the connection ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from .errors import TunnelFailed
from .ssh_cert import Issued

__all__ = ["AgentError", "load_into_agent", "private_dir", "running_agent", "temporary_private_dir"]

# ssh-agent prints its socket line once it listens; it takes milliseconds, this is only a bound.
START_TIMEOUT = 10.0


class AgentError(TunnelFailed):
    """ssh-agent is missing or could not be started or loaded."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed and refuse one that others can reach or that is not
    ours: the agent socket in it gives its key to whoever can connect."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise AgentError(f"cannot create {path} for the ssh-agent: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise AgentError(f"{path} is not a directory owned by you; remove it and retry.")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def temporary_private_dir(parent: Path) -> Iterator[Path]:
    """A fresh 0700 directory under ``parent`` for one command's runtime files, removed on exit
    (whatever is left in it)."""
    private_dir(parent)
    path = Path(tempfile.mkdtemp(prefix="ssh-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _start(binary: str, path: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        binary, "-D", "-a", str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stderr is not None
    try:
        # ``SSH_AUTH_SOCK=...; export SSH_AUTH_SOCK;`` comes once the socket listens: no polling.
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        line = b""
    if not line.startswith(b"SSH_AUTH_SOCK="):
        await _stop(process)
        detail = (await process.stderr.read()).decode(errors="replace").strip()
        raise AgentError(f"ssh-agent did not start: {detail or 'no output'}")
    return process


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), START_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


async def load_into_agent(path: Path, issued: Issued) -> None:
    """Add the key and its certificate to the agent at ``path`` (ours, or the user's for
    ``ssh-cert --agent``) until the certificate expires."""
    import asyncssh  # here: slow to import, and only certificate logins need it

    agent = await asyncssh.connect_agent(str(path))
    try:
        # The agent forgets the key when the certificate expires.
        lifetime = max(1, issued.remaining())
        await agent.add_keys([(issued.key, issued.certificate)], lifetime=lifetime)
    except ValueError as exc:
        raise AgentError(f"ssh-agent refused the key: {exc}") from None
    finally:
        agent.close()
        await agent.wait_closed()


@contextlib.asynccontextmanager
async def running_agent(
    socket_path: Path, issued: Issued, *, binary: str | None = None
) -> AsyncIterator[Path]:
    """Serve ``issued`` on ``socket_path`` for the block.

    The agent binds a temporary name beside it and is renamed into place once the key is loaded:
    ssh never finds an empty agent there, and another connection's agent at the same path is
    replaced atomically (it keeps serving the ssh already talking to it). On exit the agent stops
    and the path is removed if it is still ours."""
    found = binary or shutil.which("ssh-agent")
    if found is None:
        raise AgentError("ssh-agent (OpenSSH) is not installed: it is needed for certificates.")
    private_dir(socket_path.parent)
    temporary = socket_path.parent / f".agent-{secrets.token_hex(6)}"
    process = await _start(found, temporary)
    inode: int | None = None
    try:
        await load_into_agent(temporary, issued)
        inode = _install(temporary, socket_path)
        yield socket_path
    finally:
        await _stop(process)
        _remove(temporary, socket_path, inode)


def _install(temporary: Path, socket_path: Path) -> int:
    os.replace(temporary, socket_path)
    return os.stat(socket_path).st_ino


def _remove(temporary: Path, socket_path: Path, inode: int | None) -> None:
    """Remove our socket names; a newer connection's agent at ``socket_path`` stays."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    with contextlib.suppress(FileNotFoundError):
        if inode is not None and os.stat(socket_path).st_ino == inode:
            os.unlink(socket_path)
