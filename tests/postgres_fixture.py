"""A real PostgreSQL for the tests: Debian's server binaries (``make test`` installs the
``postgresql`` package when missing), a throwaway cluster in a temporary directory, listening on
a free loopback port only, started once per test session; each test gets its own database.

initdb refuses to run as root: as root, the cluster belongs to the ``postgres`` system user
that the Debian package creates."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from .ports import free_port

START_TIMEOUT = 60  # seconds for pg_ctl start -w


def bindir() -> Path:
    """The newest installed server's bin directory (/usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise AssertionError(
            "PostgreSQL server binaries not found: apt-get install postgresql (make system-deps)"
        )
    return Path(found[-1]).parent


class PostgresServer:
    """One cluster: trust authentication for the ``tunnel`` superuser on 127.0.0.1 only."""

    def __init__(self) -> None:
        self.port = 0
        self.directory = Path(tempfile.mkdtemp(prefix="tunnel-pg-"))
        self._owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self._owner is not None:
            os.chown(self.directory, self._owner.pw_uid, self._owner.pw_gid)

    def _run(self, *argv: str) -> None:
        user = self._owner.pw_name if self._owner is not None else None
        result = subprocess.run(
            argv,
            user=user,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=START_TIMEOUT + 30,
            check=False,
        )
        if result.returncode != 0:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise AssertionError(f"{argv[0]} failed: {result.stdout.decode()}\n{tail}")

    def start(self) -> PostgresServer:
        bin_ = bindir()
        data = self.directory / "data"
        self._run(
            str(bin_ / "initdb"), "-D", str(data), "-U", "tunnel", "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        self.port = free_port()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.directory}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            str(bin_ / "pg_ctl"), "-D", str(data), "-l", str(self.directory / "server.log"),
            "-o", options, "-w", "-t", str(START_TIMEOUT), "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.port:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self._run(
                    str(bindir() / "pg_ctl"), "-D", str(self.directory / "data"),
                    "-m", "immediate", "-w", "stop",
                )  # fmt: skip
        shutil.rmtree(self.directory, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://tunnel@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its DSN."""
        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        name = dsn.rsplit("/", 1)[1]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_cluster: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL server."""
    dsn = postgres_cluster.create_database()
    yield dsn
    postgres_cluster.drop_database(dsn)
