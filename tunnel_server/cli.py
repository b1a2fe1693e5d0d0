"""``tunnel-server``: thin click CLI over the relay."""

from __future__ import annotations

import datetime
import json
import secrets
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import click

from tunnel_runtime.loop import run

from .access.device import device_attributes, device_from_certificate
from .access.policy import TUNNEL_USER, AccessRequest, explain
from .access.ssh_ca import CertificateAuthority, KeyRefused
from .build import build_ca, build_link, build_policy
from .config import ConfigError, ServerConfig, load_config
from .ops.logs import setup_logging
from .ops.tls import check_tls
from .serve import serve_forever

F = TypeVar("F", bound=Callable[..., Any])


@click.group()
@click.version_option(package_name="identity-tunnel")
def main() -> None:
    """Identity-aware tunnel relay."""


def _config_argument(func: F) -> F:
    """The config file, as ``FILE`` or ``--config FILE`` (the same for every command)."""
    func = click.option(
        "--config",
        "config_option",
        type=click.Path(path_type=Path),
        help="YAML configuration file (or give it as the argument).",
    )(func)
    return click.argument(
        "config_argument", required=False, type=click.Path(path_type=Path), metavar="[FILE]"
    )(func)


def _config_path(argument: Path | None, option: Path | None) -> Path:
    path = argument if option is None else option
    if path is None or (argument is not None and option is not None):
        raise click.UsageError("give the configuration file once, as FILE or --config FILE")
    return path


def _fail(exc: ConfigError) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@main.command()
@_config_argument
def serve(config_argument: Path | None, config_option: Path | None) -> None:
    """Serve the relay until SIGINT/SIGTERM (SIGTERM drains first; SIGHUP reloads the policy).

    \b
    Example:
      tunnel-server serve --config /etc/tunnel/relay.yaml
    """
    config_path = _config_path(config_argument, config_option)
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(exc)
    setup_logging(config.log_format)
    try:
        run(serve_forever(config, config_path))
    except ConfigError as exc:  # found while starting: a file the config names, a busy port
        _fail(exc)


@main.command("check-config")
@_config_argument
def check_config(config_argument: Path | None, config_option: Path | None) -> None:
    """Validate a configuration file as serve loads it: the file, the policy file it names, the
    TLS certificates and keys, the cluster secret and CA (exit 0 valid, 2 invalid).

    \b
    Example:
      tunnel-server check-config /etc/tunnel/relay.yaml
    """
    config_path = _config_path(config_argument, config_option)
    try:
        config = load_config(config_path)
        build_policy(config)
        build_link(config)  # the cluster secret and CA files are readable and valid
        if config.tls is not None:
            check_tls(config.tls, "tls")
        if config.http is not None and config.http.tls is not None:
            check_tls(config.http.tls, "http.tls")
        if config.admin is not None and config.admin.tls is not None:
            check_tls(config.admin.tls, "admin.tls")
        if config.ssh is not None:
            build_ca(config.ssh)  # the CA keys are readable SSH private keys
    except ConfigError as exc:
        _fail(exc)
    click.echo(f"{config_path}: ok", err=True)


def _admin_call(
    admin_url: str, token_file: Path, method: str, path: str, body: dict[str, str] | None = None
) -> dict[str, object]:
    """One request to the admin listener; exits with a clear message on failure."""
    token = token_file.read_text(encoding="ascii").strip()

    async def call() -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.request(method, admin_url.rstrip("/") + path, json=body, headers=headers) as r,
        ):
            return r.status, dict(await r.json(content_type=None))

    try:
        status, data = run(call(), use_uvloop=False)
    except (aiohttp.ClientError, ValueError) as exc:
        click.echo(f"error: admin request failed: {exc}", err=True)
        sys.exit(1)
    if status != 200:
        click.echo(f"error: HTTP {status}: {data.get('error', '')}", err=True)
        sys.exit(1)
    return data


def _admin_options(func: F) -> F:
    func = click.option(
        "--token-file",
        required=True,
        type=click.Path(path_type=Path, exists=True),
        help="File holding an admin's bearer token.",
    )(func)
    return click.option(
        "--admin-url",
        envvar="TUNNEL_ADMIN_URL",
        default="http://127.0.0.1:8444",
        show_default=True,
        help="The relay's admin listener (env TUNNEL_ADMIN_URL).",
    )(func)


@main.group()
def sessions() -> None:
    """List and revoke open tunnels (through the admin listener)."""


@sessions.command("list")
@_admin_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sessions_list(admin_url: str, token_file: Path, as_json: bool) -> None:
    """Print the relay's tunnels."""
    data = _admin_call(admin_url, token_file, "GET", "/admin/sessions")
    rows = data.get("sessions", [])
    if not isinstance(rows, list):
        raise click.ClickException("the admin API answered an unexpected document")
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'TUNNEL':34} {'PRINCIPAL':32} {'RESOURCE':28} {'PORT':>5} {'STATE':8} {'AGE':>8}")
    for row in rows:
        click.echo(
            f"{row['tunnel_id']:34} {row['principal']:32} {row['resource']:28} "
            f"{row['port']:>5} {row['state']:8} {row['age']:>8.1f}"
        )


@sessions.command("revoke")
@_admin_options
@click.option("--user", help="Principal whose tunnels close (e.g. user:alice@example.com).")
@click.option("--session", "session_id", help="Tunnel id to close.")
def sessions_revoke(
    admin_url: str, token_file: Path, user: str | None, session_id: str | None
) -> None:
    """Close a user's tunnels (and refuse their current tokens) or one tunnel."""
    if (user is None) == (session_id is None):
        raise click.UsageError("give exactly one of --user or --session")
    body = {"user": user} if user is not None else {"session": str(session_id)}
    data = _admin_call(admin_url, token_file, "POST", "/admin/revoke", body)
    click.echo(f"Closed {data.get('closed', 0)} tunnel(s).", err=True)


@main.group()
def policy() -> None:
    """Inspect the access policy."""


@policy.command("explain")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    help="The relay's configuration (for a request described by the options below).",
)
@click.option(
    "--member",
    "members",
    multiple=True,
    help="user:EMAIL, group:NAME, ... (repeat: one per member).",
)
@click.option("--instance", help="project/zone/name, or a name unique in the inventory.")
@click.option("--group", "dest_group", help="Destination group project/region/network/name.")
@click.option("--host", help="Destination host (with --group).")
@click.option("--port", type=click.IntRange(1, 65535))
@click.option("--source-ip", help="Caller's address, for IP access levels and conditions.")
@click.option(
    "--device-cert",
    type=click.Path(path_type=Path, exists=True),
    help="The caller's device certificate (PEM), for device conditions.",
)
@click.option("--time", "at", help="ISO 8601 time to decide at (default: now).")
@click.option(
    "--reference",
    help="Explain the refusal a user was given this reference for "
    "(asks the relay's admin listener: --admin-url, --token-file).",
)
@click.option(
    "--admin-url",
    envvar="TUNNEL_ADMIN_URL",
    default="http://127.0.0.1:8444",
    show_default=True,
    help="The relay's admin listener (with --reference).",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, exists=True),
    help="File holding an admin's bearer token (with --reference).",
)
@click.option("--json", "as_json", is_flag=True)
def policy_explain(
    config_path: Path | None,
    members: tuple[str, ...],
    instance: str | None,
    dest_group: str | None,
    host: str | None,
    port: int | None,
    source_ip: str | None,
    device_cert: Path | None,
    at: str | None,
    reference: str | None,
    admin_url: str,
    token_file: Path | None,
    as_json: bool,
) -> None:
    """Print the decision, the binding or level that decided it, and why every other
    candidate did not apply (the troubleshooter). Either describe a request (--config,
    --member, --port and a target) or give the --reference a refused user was shown.

    \b
    Examples:
      tunnel-server policy explain --config relay.yaml --member user:bob@example.com \\
          --instance db-1 --port 5432
      tunnel-server policy explain --reference 7f3a0c9e1b2d --token-file admin.token
    """
    if reference is not None:
        _explain_reference(reference, admin_url, token_file, as_json)
        return
    if config_path is None or not members or port is None:
        raise click.UsageError("give --reference, or --config, --member and --port with a target")
    try:
        config = load_config(config_path)
        policy_ = build_policy(config)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    resource = _explain_resource(config, instance, dest_group)
    device = None
    if device_cert is not None:
        der = ssl.PEM_cert_to_DER_cert(device_cert.read_text(encoding="ascii"))
        device = device_attributes(device_from_certificate(der))
    now = datetime.datetime.fromisoformat(at).timestamp() if at else time.time()
    principal = next((m for m in members if m.startswith(("user:", "serviceAccount:"))), None)
    request = AccessRequest(
        frozenset(members), resource, port, source_ip, principal=principal, role=TUNNEL_USER,
        destination_host=host, destination_ip=host, device=device or {},
    )  # fmt: skip
    result = explain(request, policy_, now)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        click.echo("\n".join(result.lines()))
    sys.exit(0 if result.decision.allowed else 1)


def _explain_reference(
    reference: str, admin_url: str, token_file: Path | None, as_json: bool
) -> None:
    if token_file is None:
        raise click.UsageError("--reference asks the relay: give --token-file (an admin's token)")
    data = _admin_call(admin_url, token_file, "GET", f"/admin/explain?reference={reference}")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(
            f"refusal {data.get('reference')}: {data.get('category')} ({data.get('reason')})"
        )
        lines = data.get("lines")
        if isinstance(lines, list):
            click.echo("\n".join(str(line) for line in lines))
    sys.exit(1)


def _explain_resource(config: ServerConfig, instance: str | None, group: str | None) -> str:
    if (instance is None) == (group is None):
        raise click.UsageError("give exactly one of --instance or --group")
    if group is not None:
        return f"group:{group}"
    if instance is None:  # pragma: no cover - checked above: exactly one is given
        raise click.UsageError("give exactly one of --instance or --group")
    if instance.count("/") == 2:
        return f"instance:{instance}"
    keys = [i.key for i in config.inventory.instances if i.name == instance]
    if len(keys) != 1:
        raise click.UsageError(f"instance {instance!r} is {'ambiguous' if keys else 'unknown'}")
    return f"instance:{keys[0]}"


@main.group("ssh")
def ssh_group() -> None:
    """The relay's SSH certificate authority (docs/ssh-certificates.md)."""


def _ca(config_path: Path) -> CertificateAuthority:
    try:
        config = load_config(config_path)
        if config.ssh is None:
            raise ConfigError(f"{config_path}: no ssh section: SSH certificates are off")
        return build_ca(config.ssh)
    except ConfigError as exc:
        _fail(exc)


@ssh_group.command("ca-keys")
@_config_argument
def ssh_ca_keys(config_argument: Path | None, config_option: Path | None) -> None:
    """Print the lines VMs and clients trust: sshd's TrustedUserCAKeys file (every user CA,
    the previous ones too during a rotation), then the @cert-authority line for known_hosts.

    \b
    Example:
      tunnel-server ssh ca-keys relay.yaml > /etc/ssh/tunnel_user_ca.pub
    """
    ca = _ca(_config_path(config_argument, config_option))
    click.echo("# TrustedUserCAKeys (sshd_config: TrustedUserCAKeys /etc/ssh/tunnel_user_ca.pub)")
    for line in ca.trusted_user_ca_keys():
        click.echo(line)
    known_hosts = ca.known_hosts_line()
    if known_hosts is not None:
        click.echo("# known_hosts (clients): verifies every VM's host certificate")
        click.echo(known_hosts)


@ssh_group.command("sign-host")
@_config_argument
@click.option(
    "--host-key",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="The VM's public host key (e.g. /etc/ssh/ssh_host_ed25519_key.pub).",
)
@click.option(
    "--principal",
    "principals",
    multiple=True,
    required=True,
    help="A name clients reach the VM by (repeat): instance name, DNS name.",
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=365,
    show_default=True,
    help="Validity of the host certificate.",
)
def ssh_sign_host(
    config_argument: Path | None,
    config_option: Path | None,
    host_key: Path,
    principals: tuple[str, ...],
    days: int,
) -> None:
    """Print a host certificate for a VM's host key, signed by the host CA (for provisioning:
    sshd_config HostCertificate).

    \b
    Example:
      tunnel-server ssh sign-host relay.yaml --host-key ssh_host_ed25519_key.pub \\
          --principal db-1 > ssh_host_ed25519_key-cert.pub
    """
    ca = _ca(_config_path(config_argument, config_option))
    try:
        certificate = ca.sign_host(
            host_key.read_text(encoding="ascii"),
            principals=principals,
            validity=days * 86400,
            serial=secrets.randbits(63) or 1,
        )
    except KeyRefused as exc:
        raise click.UsageError(f"--host-key: {exc}") from None
    except ConfigError as exc:
        _fail(exc)
    click.echo(certificate)


@ssh_group.command("krl")
@_config_argument
@click.option(
    "--audit-log",
    "audit_logs",
    type=click.Path(path_type=Path, exists=True),
    multiple=True,
    help="Audit log (JSON lines) to read issued certificates and "
    "user revocations from (repeat for several nodes or rotated files).",
)
@click.option(
    "--serial",
    "serials",
    type=int,
    multiple=True,
    help="A certificate serial to revoke besides (repeat).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write the KRL (sshd_config: RevokedKeys FILE).",
)
def ssh_krl(
    config_argument: Path | None,
    config_option: Path | None,
    audit_logs: tuple[Path, ...],
    serials: tuple[int, ...],
    output: Path,
) -> None:
    """Write a key revocation list: every certificate the audit logs show was issued to a user
    revoked afterwards (and still valid), and the serials given.

    \b
    Example:
      tunnel-server ssh krl relay.yaml --audit-log /var/log/tunnel/audit.log \\
          --output /etc/ssh/tunnel_revoked.krl
    """
    ca = _ca(_config_path(config_argument, config_option))
    revoked = set(serials) | revoked_in_audit(audit_logs, time.time())
    output.write_bytes(ca.krl(revoked, version=int(time.time())))
    click.echo(f"{output}: {len(revoked)} certificate(s) revoked", err=True)


def revoked_in_audit(paths: tuple[Path, ...], now: float) -> set[int]:
    """Serials of certificates issued to a user before the user's revocation, still valid."""
    issued: list[tuple[int, str, float, float]] = []
    revoked_at: dict[str, float] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            event = record.get("event")
            if event == "ssh_certificate" and record.get("decision") == "allow":
                issued.append((int(record["serial"]), str(record["principal"]),
                               float(record["time"]), float(record["valid_before"])))  # fmt: skip
            elif event == "user_revoked":
                principal = str(record["principal"])
                revoked_at[principal] = max(float(record["at"]), revoked_at.get(principal, 0.0))
    return {
        serial
        for serial, principal, at, valid_before in issued
        if principal in revoked_at and at <= revoked_at[principal] and valid_before > now
    }
