"""``tunnel-client``: thin click CLI over the library API (tunnel_client.api). Human messages go
to stderr; stdout carries data (stdin mode) or the one line wrappers wait for
(``Listening on port [N].``). Options resolve flag > env > profile > default
(tunnel_client.cli_options); failures print ``ERROR: ...`` and exit 1, usage errors exit 2."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tunnel_protocol.urls import HostTarget, InstanceTarget, Target

from . import cli_auth, cli_config, cli_ssh, cli_up, http_proxy, launchers, proxies
from .api import Client
from .cli_options import (
    Settings,
    resolve,
    target_options,
)
from .cli_run import make_client, run_tunnel
from .listener import LocalListener, run_stdio
from .session import ConnectOptions, check_connection, get_token

T = TypeVar("T")

CONTEXT = {"help_option_names": ["-h", "--help"]}


def _err(message: str) -> None:
    click.echo(message, err=True)


def target_for(instance: str, port: int, settings: Settings) -> Target:
    s = settings
    try:
        launchers.validate_name("instance", instance)
        project = launchers.validate_name("project", s.project_or_default)
        if s.region or s.network:
            if not (s.region and s.network):
                raise launchers.LauncherError("--region and --network go together")
            if s.zone and s.sources.get("zone") != "profile":
                raise launchers.LauncherError("--zone conflicts with --region/--network")
            region = launchers.validate_name("region", s.region)
            network = launchers.validate_name("network", s.network)
            return HostTarget(project, region, network, instance, s.dest_group, port)
        if s.dest_group:
            raise launchers.LauncherError("--dest-group needs --region and --network")
        if not s.zone:
            raise launchers.LauncherError(
                "--zone is required (or --region and --network); "
                "`tunnel-client config set zone ZONE` remembers it"
            )
        zone = launchers.validate_name("zone", s.zone)
        return InstanceTarget(project, zone, instance, "nic0", port)
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None


def _options(instance: str, port: int, kw: dict[str, Any]) -> ConnectOptions:
    """The ConnectOptions of one command's tunnels, from ``kw`` = {"settings", "client"}: the
    one place they are built (tests/reliability wraps it to shorten the keepalive)."""
    settings: Settings = kw["settings"]
    client: Client = kw["client"]
    return client.options(target_for(instance, port, settings))


def launcher_args(settings: Settings) -> launchers.TunnelArgs:
    """What a ProxyCommand must pass on: values from flags and the environment (the child
    resolves the profile's own values itself, from ``--profile``)."""

    def given(name: str) -> str | None:
        if settings.sources.get(name) not in ("flag", "env"):
            return None
        value = getattr(settings, name)
        return None if value is None else str(value)

    proxy = given("proxy")
    if proxy is not None and proxies.has_credentials(proxy):
        raise click.UsageError(
            "a proxy password would be written into the ssh command line: put the proxy in "
            "the profile (`tunnel-client config set proxy URL`) or in HTTPS_PROXY instead"
        )
    return launchers.TunnelArgs(
        server=given("server"),
        project=given("project"),
        zone=given("zone"),
        region=given("region"),
        network=given("network"),
        dest_group=given("dest_group"),
        credential_file=given("credential_file"),
        access_token_file=given("access_token_file"),
        insecure_skip_verify=settings.insecure_skip_verify
        and settings.sources.get("insecure_skip_verify") == "flag",
        ca_file=given("ca_file"),
        device_cert=given("device_cert"),
        device_key=given("device_key"),
        profile=settings.profile if settings.profile != "default" else None,
        proxy=proxy,
    )


def _parse_local(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep:
        host, port_text = "localhost", value
    if not port_text.isdigit() or int(port_text) > 65535:
        raise click.BadParameter(f"invalid port in {value!r}", param_hint="--local-host-port")
    return host or "localhost", int(port_text)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="identity-tunnel")
def main() -> None:
    """Identity-aware tunnel client: reach private SSH, RDP and TCP services through the relay.

    \b
    Example:
      tunnel-client config set server wss://relay.example.com:8443
      tunnel-client login
      tunnel-client ssh bastion --zone europe-west1-b

    Shell completion (bash; zsh and fish likewise, see README):
      eval "$(_TUNNEL_CLIENT_COMPLETE=bash_source tunnel-client)"
    """


cli_auth.register(main)
cli_config.register(main)
cli_up.register(main)
http_proxy.register(main)


@main.command("start-tunnel", context_settings=CONTEXT)
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
    "--disable-connection-check",
    "--iap-tunnel-disable-connection-check",
    "disable_connection_check",
    is_flag=True,
    help="Skip opening a test tunnel before listening (gcloud's spelling works too).",
)
@click.option(
    "--ssh-agent",
    "ssh_agent",
    type=click.Path(path_type=Path),
    default=None,
    metavar="SOCKET",
    help="With --listen-on-stdin: first get an SSH certificate from the relay and serve it on "
    "this agent socket (ssh-config's certificate logins).",
)
@target_options
@click.pass_context
def start_tunnel(
    ctx: click.Context,
    /,
    instance: str,
    port: int,
    local_host_port: str | None,
    listen_on_stdin: bool,
    disable_connection_check: bool,
    ssh_agent: Path | None,
    **kw: Any,
) -> None:
    """Forward a local port (or stdin/stdout) to PORT on INSTANCE through the relay.

    \b
    Example:
      tunnel-client start-tunnel db-1 5432 --zone europe-west1-b --local-host-port=localhost:5432
      ssh -o ProxyCommand='tunnel-client start-tunnel %h %p --listen-on-stdin --zone Z' vm1
    """
    if listen_on_stdin and local_host_port is not None:
        raise click.UsageError("--listen-on-stdin conflicts with --local-host-port")
    if ssh_agent is not None and not listen_on_stdin:
        raise click.UsageError("--ssh-agent needs --listen-on-stdin")
    settings = resolve(ctx, kw)
    client = make_client(settings)
    target_for(instance, port, settings)  # usage errors before anything else

    def options(c: Client) -> ConnectOptions:
        return _options(instance, port, {"settings": settings, "client": c})

    if ssh_agent is not None:
        socket_path = ssh_agent.absolute()
        run_tunnel(settings, client, lambda c: cli_ssh.stdio_with_agent(options(c), socket_path))
        return
    if listen_on_stdin:
        run_tunnel(settings, client, lambda c: run_stdio(options(c)))
        return
    host, local_port = _parse_local(local_host_port or "localhost:0")
    check = not disable_connection_check
    try:
        run_tunnel(settings, client, lambda c: _listen(options(c), host, local_port, check))
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
        try:
            await check_connection(options)
        except BaseException:
            listener.close()
            raise
    click.echo(f"Listening on port [{port}].")
    sys.stdout.flush()
    if ready is not None:
        ready(port)
    try:
        await listener.serve()
    except asyncio.CancelledError:
        _err(f"Closed [{listener.connections}] local connection(s).")
        raise


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("instance", metavar="[USER@]INSTANCE")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--user", help="Remote user name (default: ssh's; or USER@INSTANCE).")
@click.option(
    "--port",
    "ssh_port",
    type=click.IntRange(1, 65535),
    default=22,
    show_default=True,
    help="SSH port on the instance.",
)
@click.option("--ssh-binary", default="ssh", show_default=True, help="OpenSSH client to run.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the ssh command (without certificate options) instead of running it.",
)
@cli_ssh.certificate_option
@target_options
@click.pass_context
def ssh(
    ctx: click.Context,
    /,
    instance: str,
    ssh_args: tuple[str, ...],
    user: str | None,
    ssh_port: int,
    ssh_binary: str,
    dry_run: bool,
    certificate: bool | None,
    **kw: Any,
) -> None:
    """Run OpenSSH to INSTANCE through the relay (arguments after -- go to ssh).

    When the relay issues SSH certificates, ssh logs in with a fresh one for a key made in
    memory (held by a private ssh-agent until ssh exits) and checks the VM's host certificate.

    \b
    Example:
      tunnel-client ssh alice@bastion --zone europe-west1-b -- -L 8080:localhost:80
    """
    if "@" in instance:
        at_user, _, instance = instance.rpartition("@")
        if user is not None and user != at_user:
            raise click.UsageError("give the user once: USER@INSTANCE or --user")
        user = at_user
    settings = resolve(ctx, kw)
    client = make_client(settings)  # validate everything before ssh starts
    target = target_for(instance, ssh_port, settings)
    extra = list(ssh_args)
    if ssh_port != 22:
        extra = ["-p", str(ssh_port), *extra]
    args = launcher_args(settings)

    def build(login: str | None, cert: launchers.CertificateLogin | None = None) -> list[str]:
        try:
            return launchers.ssh_argv(
                instance, extra, args, user=login, ssh_binary=ssh_binary, certificate=cert
            )
        except launchers.LauncherError as exc:
            raise click.UsageError(str(exc)) from None

    argv = build(user)
    if dry_run:
        click.echo(subprocess.list2cmdline(argv) if sys.platform == "win32" else shlex.join(argv))
        return

    async def connect(c: Client) -> int:
        options = c.options(target)
        # A stale login fails here with one clear message, not inside ssh's ProxyCommand.
        await get_token(options)
        prepared = await cli_ssh.prepare(options, certificate)
        if prepared is None:
            return await asyncio.to_thread(subprocess.call, argv)
        login = cli_ssh.default_login(user, prepared.issued, _err, ssh_args)
        return await cli_ssh.run_ssh(lambda cert: build(login, cert), prepared, instance)

    sys.exit(run_tunnel(settings, client, connect))


@main.command("ssh-config", context_settings=CONTEXT)
@click.argument("instances", nargs=-1, required=True)
@click.option(
    "--write",
    "write_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Merge the block into this ssh_config file instead of printing it.",
)
@cli_ssh.certificate_option
@target_options
@click.pass_context
def ssh_config(
    ctx: click.Context,
    /,
    instances: tuple[str, ...],
    write_path: Path | None,
    certificate: bool | None,
    **kw: Any,
) -> None:
    """Print (or merge into a file) a marked Host block per INSTANCE using this client.

    When the relay issues SSH certificates, each connection of plain `ssh INSTANCE` gets a
    fresh one (the ProxyCommand serves it on the host's IdentityAgent).

    \b
    Example:
      tunnel-client ssh-config bastion db-1 --zone europe-west1-b --write ~/.ssh/config
    """
    settings = resolve(ctx, kw)
    args = launcher_args(settings)
    hosts = [(i, args) for i in instances]
    try:
        launchers.ssh_config_block(hosts)  # usage errors before asking the relay anything
        named = [(i, launchers.host_key_alias(i, args)) for i in instances]
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None
    logins: dict[str, launchers.CertificateLogin] = {}
    # Auto asks the relay only when one is configured: the block works without one.
    if certificate or (certificate is None and settings.server):
        client = make_client(settings)
        logins = run_tunnel(
            settings,
            client,
            lambda c: cli_ssh.config_logins(
                lambda i: c.options(target_for(i, 22, settings)), named, certificate
            ),
        )
    try:
        block = launchers.ssh_config_block(hosts, certificates=logins)
    except launchers.LauncherError as exc:
        raise click.UsageError(str(exc)) from None
    if write_path is None:
        click.echo(block, nl=False)
        return
    existing = write_path.read_text(encoding="utf-8") if write_path.exists() else ""
    write_path.write_text(launchers.merge_ssh_config(existing, block), encoding="utf-8")
    _err(f"Updated {write_path}.")


@main.command("ssh-cert", context_settings=CONTEXT)
@click.argument("instance")
@click.option(
    "--port",
    "ssh_port",
    type=click.IntRange(1, 65535),
    default=22,
    show_default=True,
    help="SSH port on the instance.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write tunnel-INSTANCE (private key), -cert.pub and .pub here, each 0600.",
)
@click.option(
    "--agent",
    "to_agent",
    is_flag=True,
    help="Add the key and certificate to the ssh-agent at $SSH_AUTH_SOCK until it expires.",
)
@target_options
@click.pass_context
def ssh_cert(
    ctx: click.Context,
    /,
    instance: str,
    ssh_port: int,
    out_dir: Path | None,
    to_agent: bool,
    **kw: Any,
) -> None:
    """Get a short-lived SSH certificate for INSTANCE for other tools (scp, rsync, Ansible,
    VS Code Remote). Without --out or --agent, prints the private key then the certificate.

    \b
    Example:
      tunnel-client ssh-cert db-1 --zone europe-west1-b --agent
      tunnel-client ssh-cert db-1 --zone europe-west1-b --out ~/.ssh/tunnel
      scp -i ~/.ssh/tunnel/tunnel-db-1 -o ProxyCommand=... file db-1:
    """
    if out_dir is not None and to_agent:
        raise click.UsageError("--out conflicts with --agent")
    agent_path = os.environ.get("SSH_AUTH_SOCK")
    if to_agent and not agent_path:
        raise click.UsageError("--agent needs a running ssh-agent (SSH_AUTH_SOCK is not set)")
    settings = resolve(ctx, kw)
    client = make_client(settings)
    target = target_for(instance, ssh_port, settings)

    async def get(c: Client) -> cli_ssh.Issued:
        issued = await cli_ssh.issue(c.options(target), cli_ssh.ephemeral_key())
        if to_agent and agent_path:
            await cli_ssh.load_into_agent(Path(agent_path), issued)
        return issued

    issued = run_tunnel(settings, client, get)
    if not issued.usable():
        _err("WARNING: the certificate is expired or about to be: check the clocks.")
    if out_dir is not None:
        key = cli_ssh.write_for_tools(issued, out_dir, f"tunnel-{instance}")
        _err(f"Wrote {key}, {key}-cert.pub and {key}.pub (0600; the key is not encrypted).")
    elif not to_agent:
        click.echo(issued.key.export_private_key("openssh").decode(), nl=False)
        click.echo(issued.text)
    else:
        _err("Added to the ssh-agent until the certificate expires.")
    _err(cli_ssh.describe(issued))


@main.command(context_settings=CONTEXT)
@click.argument("instance")
@click.option(
    "--port",
    "rdp_port",
    type=click.IntRange(1, 65535),
    default=3389,
    show_default=True,
    help="RDP port on the instance.",
)
@click.option(
    "--local-host-port",
    default="localhost:0",
    metavar="[HOST:]PORT",
    help="Where to listen (default: a free port).",
)
@click.option(
    "--exec",
    "exec_template",
    default=None,
    help="Command to run instead of the platform's RDP client; {host} and {port} are replaced.",
)
@target_options
@click.pass_context
def rdp(
    ctx: click.Context,
    /,
    instance: str,
    rdp_port: int,
    local_host_port: str,
    exec_template: str | None,
    **kw: Any,
) -> None:
    """Open a tunnel to INSTANCE's RDP port and launch an RDP client on it.

    \b
    Example:
      tunnel-client rdp win-desktop --zone europe-west1-b --exec 'xfreerdp /v:{host}:{port}'
    """
    settings = resolve(ctx, kw)
    client = make_client(settings)
    target = target_for(instance, rdp_port, settings)
    host, port = _parse_local(local_host_port)
    try:
        status = run_tunnel(
            settings, client, lambda c: _rdp(c.options(target), host, port, exec_template)
        )
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
