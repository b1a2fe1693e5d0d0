"""``tunnel-client`` with a shorter keepalive, for tests that black-hole the relay path: the CLI
has no flag for ``ConnectOptions.keepalive`` (default 20 s ping interval, 20 s pong timeout),
which would not notice a 15 s outage at all.

    python tests/reliability/keepalive_client.py --keepalive=2,2 start-tunnel vm1 22 ...

Everything after the leading ``--keepalive=INTERVAL,TIMEOUT`` goes to the real CLI unchanged;
only the options it builds get the keepalive (run as a script: it imports no test code).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any
from unittest import mock

from tunnel_client import cli
from tunnel_client.session import ConnectOptions


def with_keepalive(
    build: Callable[[str, int, dict[str, Any]], ConnectOptions], keepalive: tuple[float, float]
) -> Callable[[str, int, dict[str, Any]], ConnectOptions]:
    def options(instance: str, port: int, kw: dict[str, Any]) -> ConnectOptions:
        return dataclasses.replace(build(instance, port, kw), keepalive=keepalive)

    return options


def main(argv: list[str]) -> None:
    if not argv or not argv[0].startswith("--keepalive="):
        sys.exit("usage: keepalive_client.py --keepalive=INTERVAL,TIMEOUT COMMAND ...")
    interval, timeout = (float(x) for x in argv[0].split("=", 1)[1].split(","))
    with mock.patch.object(cli, "_options", with_keepalive(cli._options, (interval, timeout))):
        cli.main(args=argv[1:], prog_name="tunnel-client")


if __name__ == "__main__":
    main(sys.argv[1:])
