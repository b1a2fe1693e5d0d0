"""``make demo``: the whole stack on loopback until Ctrl-C: the development identity provider
(deploy/dev-idp), an unprivileged sshd as the demo target, the demo web app (scripts/demo_web)
and the relay in front of both (tunnels, and HTTP mode for the web app on its own listener),
with the admin console on its admin listener and the audit store in <state>/audit.db.
``--check`` (``make demo-check``) starts everything in its own state directory (.demo-check),
runs the printed commands end to end (scripts/demo_check), stops and exits 0 or 1.
Keys, certificate, configuration and logs live in the state directory (.demo by default), which
one demo or check at a time may use; see docs/demo.md. This module owns the command line, the
state directory's lock and the banner; scripts/demo_services starts the services."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

from .demo_check import check
from .demo_services import (
    ALICE,
    INSTANCE,
    LOCAL_PORT,
    PASSWORD,
    PROJECT,
    ROOT,
    ZONE,
    Demo,
    DemoError,
    console_url,
    show,
    start,
    web_url,
)

DEMO_STATE, CHECK_STATE = ROOT / ".demo", ROOT / ".demo-check"


@contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """Hold <state>/lock for as long as the demo runs: a second demo or check on the same state
    directory would rewrite its relay.yaml and truncate its logs. flock, not a pid file: the
    kernel drops it when we die, even by SIGKILL, so a stale lock never blocks the next run."""
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "lock", "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise DemoError(
                f"{show(state)} is in use by another demo or demo check (pid {holder}); "
                "stop it first, or give this run its own --state-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield  # closing the file releases the lock


def instructions(demo: Demo) -> str:
    """The banner: what runs where, and the commands to try in another terminal."""
    ca_file = show(Path(demo.env["TUNNEL_CA_FILE"]))
    env = demo.env | {"TUNNEL_CA_FILE": ca_file if ca_file[0] == "/" else f"$PWD/{ca_file}"}
    tunnel = ["start-tunnel", INSTANCE, str(demo.ssh_port), "--zone", ZONE]
    tunnel.append(f"--local-host-port=localhost:{LOCAL_PORT}")
    via_local = ["ssh", "-p", str(LOCAL_PORT), *demo.ssh_options(), f"{demo.user}@localhost"]
    cert = ["ssh-cert", INSTANCE, "--zone", ZONE, "--port", str(demo.ssh_port)]
    cert.append(f"--out={show(demo.state / 'ssh')}")
    app = web_url(demo.http_port) + "/"
    token = shlex.join(demo.client("print-access-token"))
    admin_token = show(demo.state / "admin.token")
    return "\n".join(
        [
            "",
            "identity-tunnel demo",
            f"  relay   {demo.env['TUNNEL_SERVER']}  (self-signed: {ca_file})",
            f"  IdP     {demo.issuer}  (every user's password: {PASSWORD})",
            f"          {ALICE} (groups ops, dev): allowed",
            "          bob@example.com (group dev), mallory@example.com (none): denied",
            f"  target  {PROJECT}/{ZONE}/{INSTANCE}, SSH as {demo.user}, only via the relay",
            f"  web app {app}  (HTTP mode; alice allowed, bob and mallory denied)",
            f"  console {console_url(demo.admin_port)}  (admins: group ops, i.e. alice)",
            f"  logs    {'  '.join(show(service.log) for service in demo.services)}",
            "",
            "In another terminal:",
            f"  cd {shlex.quote(str(ROOT))}",
            "  export " + " ".join(f"{name}={value}" for name, value in env.items()),
            "  # 1. log in: a browser, or the device flow (--no-browser, or no display)",
            f"  {shlex.join(demo.client('login'))}",
            "  # 2. SSH to the demo VM through the relay",
            f"  {shlex.join(demo.ssh())}",
            "  # 3. or forward a local port, then ssh to it from a third terminal with a",
            "  #    certificate written for other tools (the VM has no authorized_keys)",
            f"  {shlex.join(demo.client(*tunnel))}",
            f"  {shlex.join(demo.client(*cert))}",
            f"  {shlex.join(via_local)}",
            f"  # 4. Open {app} in a browser (sign in as alice), or after step 1:",
            f'  curl -H "Authorization: Bearer $({token})" {app}',
            f"  # 5. Open {console_url(demo.admin_port)} (sign in as alice): live tunnels,",
            "  #    revoke, audit search, policy explain",
            "  # 6. or the admin CLI (after step 1, as alice: an admin)",
            f"  {shlex.join(demo.client('print-access-token'))} > {shlex.quote(admin_token)}",
            f"  {shlex.join(demo.sessions_list(demo.state / 'admin.token'))}",
            f"  {shlex.join(demo.explain_bob())}",
            "",
        ]
    )  # fmt: skip


# -- main -------------------------------------------------------------------------------------


async def supervise(demo: Demo) -> None:
    """Until a signal cancels us; DemoError when a service dies first."""
    waits = {asyncio.ensure_future(s.process.wait()): s for s in demo.services}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    service = waits[done.pop()]
    code = service.process.returncode
    raise DemoError(f"{service.name} exited unexpectedly ({code}):\n{service.tail()}")


async def run_demo(state: Path, check_only: bool) -> int:
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None

    def interrupted() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the cleanup
            loop.add_signal_handler(sig, lambda: None)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted)
    try:
        async with AsyncExitStack() as stack:
            print("Starting the IdP, sshd, the demo web app and the relay...", flush=True)
            demo = await start(stack, state, well_known_ports=not check_only)
            print(instructions(demo), flush=True)
            if check_only:
                await check(demo)
                print("Demo check passed.", flush=True)
                return 0
            print("Ctrl-C stops the demo.", flush=True)
            await supervise(demo)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
    except asyncio.CancelledError:
        task.uncancel()
        return 1 if check_only else 0
    finally:
        print("Demo stopped.", flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify end to end, stop, exit 0/1")
    parser.add_argument(
        "--state-dir", type=Path, help="default: .demo, and .demo-check with --check"
    )
    args = parser.parse_args(argv)
    state: Path = (args.state_dir or (CHECK_STATE if args.check else DEMO_STATE)).resolve()
    try:
        with state_lock(state):
            return asyncio.run(run_demo(state, args.check))
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
