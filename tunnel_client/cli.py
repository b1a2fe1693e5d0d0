"""``tunnel-client``: thin click CLI. Human messages go to stderr; stdout carries data (stdin
mode) or the one line wrappers wait for (``Listening on port [N].``)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnel_protocol.urls import HostTarget, InstanceTarget, Target
from tunnel_runtime.loop import run

from . import cli_auth, http_proxy, launchers
from .listener import LocalListener, PortUnavailable, run_stdio
from .session import ConnectOptions, TunnelFailed, check_connection, get_token
from .tokens import NoCredentials, token_provider

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PROJECT = "default"


def _err(message: str) -> None:
    click.echo(message, err=True)


def _fail(message: str, code: int = 1) -> None:
    _err(f"ERROR: {message}")
    sys.exit(code)


def tunnel_options(func: F) -> F:
    """The options every command that opens a tunnel accepts (gcloud's names where they exist)."""
    options = [
        click.option(
            "--server",
            envvar="TUNNEL_SERVER",
            metavar="URL",
            help="Relay URL, wss://HOST[:PORT] (env TUNNEL_SERVER).",
        ),
        click.option(
            "--project",
            envvar="TUNNEL_PROJECT",
            default=DEFAULT_PROJECT,
            show_default=True,
            help="Project of the instance (env TUNNEL_PROJECT).",
        ),
        click.option("--zone", help="Zone of the instance."),
        click.option("--region", help="Region of the destination group (host form)."),
        click.option("--network", help="Network of the destination group (host form)."),
        click.option("--dest-group", help="Destination group of the host."),
        click.option(
            "--credential-file",
            envvar="TUNNEL_CREDENTIAL_FILE",
            type=click.Path(path_type=Path),
            help="Service-account credential file (env TUNNEL_CREDENTIAL_FILE).",
        ),
        click.option(
            "--access-token-file",
            type=click.Path(path_type=Path),
            help="File holding the bearer token (re-read on every connect).",
        ),
        click.option(
            "--ca-file",
            envvar="TUNNEL_CA_FILE",
            type=click.Path(path_type=Path),
            help="CA bundle to verify the relay's certificate (env TUNNEL_CA_FILE).",
        ),
        click.option(
            "--device-cert",
            envvar="TUNNEL_DEVICE_CERT",
            type=click.Path(path_type=Path),
            help="Device certificate for relays that check devices (env TUNNEL_DEVICE_CERT).",
        ),
        click.option(
            "--device-key",
            envvar="TUNNEL_DEVICE_KEY",
            type=click.Path(path_type=Path),
            help="Key of --device-cert (default: in the same file).",
        ),
        click.option(
            "--insecure-skip-verify",
            is_flag=True,
            help="Do not verify the relay's TLS certificate (development only).",
        ),
        click.option("-v", "--verbose", count=True, help="More logging on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _ssl_context(
    ca_file: Path | None,
    insecure: bool,
    device_cert: Path | None = None,
    device_key: Path | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if device_cert is not None:
        try:
            context.load_cert_chain(device_cert, device_key)
        except (OSError, ssl.SSLError) as exc:
            raise click.UsageError(f"cannot load the device certificate: {exc}") from None
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _target(instance: str, port: int, kw: dict[str, Any]) -> Target:
    try:
        launchers.validate_name("instance", instance)
        project = launchers.validate_name("project", kw["project"])
        if kw["region"] or kw["network"]:
            if not (kw["region"] and kw["network"]):
                raise launchers.LauncherError("--region and --network go together")
            if kw["zone"]:
                raise launchers.LauncherError("--zone conflicts with --region/--network")
            return HostTarget(
                project,
                launchers.validate_name("region", kw["region"]),
                launchers.validate_name("network", kw["network"]),
                instance,
                kw["dest_group"],
                port,
            )
        if kw["dest_group"]:
            raise launchers.LauncherError("--dest-group needs --region and --network")
        if not kw["zone"]:
            raise launchers.LauncherError("--zone is required (or --region and --network)")
        return InstanceTarget(
            project, launchers.validate_name("zone", kw["zone"]), instance, "nic0", port
        )
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None


def _options(instance: str, port: int, kw: dict[str, Any]) -> ConnectOptions:
    if not kw["server"]:
        raise click.UsageError("no relay: pass --server wss://HOST:PORT or set TUNNEL_SERVER")
    server: str = kw["server"]
    if not server.startswith(("ws://", "wss://")):
        if server.startswith(("http://", "https://")):
            server = "ws" + server[4:]
        else:
            raise click.UsageError(f"--server must be a wss:// URL, got {server!r}")
    try:
        token = token_provider(
            kw["access_token_file"], server=server, credential_file=kw["credential_file"]
        )
    except NoCredentials as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(kw["verbose"], 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if kw["verbose"] < 2:
        logging.getLogger("websockets").setLevel(logging.WARNING)
    return ConnectOptions(
        server=server,
        target=_target(instance, port, kw),
        token=token,
        ssl_context=_ssl_context(
            kw["ca_file"], kw["insecure_skip_verify"], kw["device_cert"], kw["device_key"]
        ),
    )


def _launcher_args(kw: dict[str, Any]) -> launchers.TunnelArgs:
    def s(value: Any) -> str | None:
        return None if value is None else str(value)

    return launchers.TunnelArgs(
        server=kw["server"],
        project=kw["project"] if kw["project"] != DEFAULT_PROJECT else None,
        zone=kw["zone"],
        region=kw["region"],
        network=kw["network"],
        dest_group=kw["dest_group"],
        credential_file=s(kw["credential_file"]),
        access_token_file=s(kw["access_token_file"]),
        insecure_skip_verify=kw["insecure_skip_verify"],
        ca_file=s(kw["ca_file"]),
        device_cert=s(kw["device_cert"]),
        device_key=s(kw["device_key"]),
    )


def _parse_local(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "localhost", value
    if not port_text.isdigit() or int(port_text) > 65535:
        raise click.BadParameter(f"invalid port in {value!r}", param_hint="--local-host-port")
    return host or "localhost", int(port_text)


@click.group()
@click.version_option(package_name="identity-tunnel")
def main() -> None:
    """Identity-aware tunnel client: reach private SSH, RDP and TCP services through the relay."""


cli_auth.register(main, lambda ca_file, insecure: _ssl_context(ca_file, insecure))
http_proxy.register(main)


@main.command("start-tunnel")
@click.argument("instance")
@click.argument("port", type=click.IntRange(1, 65535))
@click.option(
    "--local-host-port",
    default=None,
    metavar="[HOST:]PORT",
    help="Where to listen (default localhost:0, a free port).",
)
@click.option(
    "--listen-on-stdin",
    is_flag=True,
    help="Carry stdin/stdout instead of listening (ssh ProxyCommand).",
)
@click.option(
    "--disable-connection-check", is_flag=True, help="Skip opening a test tunnel before listening."
)
@tunnel_options
def start_tunnel(
    instance: str,
    port: int,
    local_host_port: str | None,
    listen_on_stdin: bool,
    disable_connection_check: bool,
    **kw: Any,
) -> None:
    """Forward a local port (or stdin/stdout) to PORT on INSTANCE through the relay."""
    if listen_on_stdin and local_host_port is not None:
        raise click.UsageError("--listen-on-stdin conflicts with --local-host-port")
    options = _options(instance, port, kw)
    if listen_on_stdin:
        try:
            run(run_stdio(options))
        except TunnelFailed as exc:
            _fail(str(exc))
        return
    host, local_port = _parse_local(local_host_port or "localhost:0")
    try:
        run(_listen(options, host, local_port, not disable_connection_check))
    except TunnelFailed as exc:
        _fail(str(exc))
    except PortUnavailable as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        # Ctrl-C is how this mode ends; "Closed [N] local connection(s)." was printed.
        sys.exit(130)


async def _listen(
    options: ConnectOptions,
    host: str,
    port: int,
    check: bool,
    ready: Callable[[int], None] | None = None,
) -> None:
    listener = LocalListener(options, host, port, report=_err)
    if port == 0:
        port = await listener.start()
        _err(f"Picking local unused port [{port}].")
    else:
        await listener.start()
    if check:
        _err("Testing if tunnel connection works.")
        await check_connection(options)
    click.echo(f"Listening on port [{port}].")
    sys.stdout.flush()
    if ready is not None:
        ready(port)
    try:
        await listener.serve()
    except asyncio.CancelledError:
        _err(f"Closed [{listener.connections}] local connection(s).")
        raise


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("instance")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--user", help="Remote user name (default: ssh's).")
@click.option("--port", "ssh_port", type=click.IntRange(1, 65535), default=22, show_default=True)
@click.option("--ssh-binary", default="ssh", show_default=True, help="OpenSSH client to run.")
@click.option("--dry-run", is_flag=True, help="Print the ssh command instead of running it.")
@tunnel_options
def ssh(
    instance: str,
    ssh_args: tuple[str, ...],
    user: str | None,
    ssh_port: int,
    ssh_binary: str,
    dry_run: bool,
    **kw: Any,
) -> None:
    """Run OpenSSH to INSTANCE through the relay (arguments after -- go to ssh)."""
    options = _options(instance, ssh_port, kw)  # validate everything before ssh starts
    extra = list(ssh_args)
    if ssh_port != 22:
        extra = ["-p", str(ssh_port), *extra]
    try:
        argv = launchers.ssh_argv(
            instance, extra, _launcher_args(kw), user=user, ssh_binary=ssh_binary
        )
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None
    if dry_run:
        click.echo(subprocess.list2cmdline(argv) if sys.platform == "win32" else shlex.join(argv))
        return
    try:
        # A stale login fails here with one clear message, not inside ssh's ProxyCommand.
        run(get_token(options))
    except TunnelFailed as exc:
        _fail(str(exc))
    sys.exit(subprocess.call(argv))


@main.command("ssh-config")
@click.argument("instances", nargs=-1, required=True)
@click.option(
    "--write",
    "write_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Merge the block into this ssh_config file instead of printing it.",
)
@tunnel_options
def ssh_config(instances: tuple[str, ...], write_path: Path | None, **kw: Any) -> None:
    """Print (or merge into a file) a marked Host block per INSTANCE using this client."""
    args = _launcher_args(kw)
    try:
        block = launchers.ssh_config_block([(i, args) for i in instances])
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None
    if write_path is None:
        click.echo(block, nl=False)
        return
    existing = write_path.read_text(encoding="utf-8") if write_path.exists() else ""
    write_path.write_text(launchers.merge_ssh_config(existing, block), encoding="utf-8")
    _err(f"Updated {write_path}.")


@main.command()
@click.argument("instance")
@click.option("--port", "rdp_port", type=click.IntRange(1, 65535), default=3389, show_default=True)
@click.option("--local-host-port", default="localhost:0", metavar="[HOST:]PORT")
@click.option(
    "--exec",
    "exec_template",
    default=None,
    help="Command to run instead of the platform's RDP client; {host} and {port} are replaced.",
)
@tunnel_options
def rdp(
    instance: str, rdp_port: int, local_host_port: str, exec_template: str | None, **kw: Any
) -> None:
    """Open a tunnel to INSTANCE's RDP port and launch an RDP client on it."""
    options = _options(instance, rdp_port, kw)
    host, port = _parse_local(local_host_port)
    try:
        status = run(_rdp(options, host, port, exec_template))
    except (TunnelFailed, PortUnavailable) as exc:
        _fail(str(exc))
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status)  # the RDP client's exit status, like `ssh` returns ssh's


async def _rdp(options: ConnectOptions, host: str, port: int, template: str | None) -> int:
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    listen: asyncio.Future[None] = asyncio.ensure_future(
        _listen(options, host, port, True, started.set_result)
    )
    waiters: list[asyncio.Future[Any]] = [listen, started]
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if listen in done:
        listen.result()  # raises the failure
        return 0
    local_port = started.result()
    connect_host = "127.0.0.1" if host == "localhost" else host
    if template is not None:
        argv = launchers.rdp_command(template, connect_host, local_port)
    else:
        found = launchers.find_rdp_client()
        if found is None:
            _err(f"No RDP client found: connect yours to {connect_host}:{local_port}.")
            await listen
            return 0
        argv = launchers.rdp_command(found, connect_host, local_port)
    _err(f"Starting {argv[0]}.")
    try:
        process = await asyncio.create_subprocess_exec(*argv)
    except OSError as exc:
        process = None
        _err(f"ERROR: cannot run {argv[0]}: {exc.strerror or exc}")
    status = 1 if process is None else await process.wait()
    if status < 0:  # killed by a signal: report it like a shell does
        status = 128 - status
    listen.cancel()
    try:
        await listen
    except asyncio.CancelledError:
        pass
    return status
