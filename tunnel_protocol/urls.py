"""The relay's URL contract (IAP relay v4 paths and query parameters), built and parsed purely.

Connect: ``/v4/connect?project=P&port=N&newWebsocket=True&zone=Z&instance=I&interface=nic0``
or the destination-group form ``...&region=R&network=N&host=H[&group=G]``.
Reconnect: ``/v4/reconnect?sid=SID&ack=N&newWebsocket=True&zone=Z`` (or ``region=R``).
Unknown parameters are ignored (IAP Desktop adds ``_=<guid>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

CONNECT_PATH = "/v4/connect"
RECONNECT_PATH = "/v4/reconnect"
# SSH certificates (docs/ssh-certificates.md): a user certificate for a target, the CA keys to
# trust, and the revocation list.
SSH_CERTIFICATE_PATH = "/v1/ssh/certificate"
SSH_CA_PATH = "/v1/ssh/ca"
SSH_KRL_PATH = "/v1/ssh/krl"
SSH_PUBLIC_KEY_HEADER = "X-Tunnel-Ssh-Public-Key"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$")
_HOST = re.compile(r"^[A-Za-z0-9._:%-]{1,253}$")
_PORT = re.compile(r"^[1-9][0-9]{0,4}$")  # no leading zeros: one spelling per port
_ACK = re.compile(r"^[0-9]{1,20}$")
_SID = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


class UrlError(ValueError):
    """The request URL is malformed; answered with HTTP 400 before any upgrade."""


@dataclass(frozen=True, slots=True)
class InstanceTarget:
    project: str
    zone: str
    instance: str
    interface: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.project}/{self.zone}/{self.instance}"


@dataclass(frozen=True, slots=True)
class HostTarget:
    project: str
    region: str
    network: str
    host: str
    group: str | None
    port: int

    @property
    def name(self) -> str:
        group = f"/{self.group}" if self.group else ""
        return f"{self.project}/{self.region}/{self.network}{group}/{self.host}"


Target = InstanceTarget | HostTarget


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    target: Target


@dataclass(frozen=True, slots=True)
class ReconnectRequest:
    sid: str
    ack: int


def parse_port(value: str) -> int:
    """Strict: decimal digits only, 1..65535."""
    # fullmatch: "$" in match() also accepts a trailing newline ("22\n").
    if not _PORT.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise UrlError(f"invalid port {value!r}")
    return int(value)


def _one(query: dict[str, list[str]], key: str, pattern: re.Pattern[str] = _NAME) -> str:
    values = query.get(key)
    if not values:
        raise UrlError(f"missing query parameter {key!r}")
    if len(values) > 1:
        raise UrlError(f"query parameter {key!r} given more than once")
    value = values[0]
    if not pattern.fullmatch(value):
        raise UrlError(f"invalid value for {key!r}")
    return value


def _opt(query: dict[str, list[str]], key: str) -> str | None:
    return _one(query, key) if key in query else None


def parse_target_query(query_string: str) -> Target:
    """The target a query string names (``project&zone&instance[&interface]&port``, or
    ``project&region&network&host[&group]&port``), as a connect names it. Raises UrlError."""
    try:
        query = parse_qs(query_string, keep_blank_values=True, max_num_fields=32)
    except ValueError as exc:  # more than max_num_fields
        raise UrlError(str(exc)) from None
    return _target(query)


def _target(query: dict[str, list[str]]) -> Target:
    project = _one(query, "project")
    port = parse_port(_one(query, "port", _PORT))
    if "instance" in query and "host" in query:
        raise UrlError("give 'instance' or 'host', not both")
    if "instance" in query:
        return InstanceTarget(
            project=project,
            zone=_one(query, "zone"),
            instance=_one(query, "instance"),
            interface=_opt(query, "interface") or "nic0",
            port=port,
        )
    if "host" in query:
        return HostTarget(
            project=project,
            region=_one(query, "region"),
            network=_one(query, "network"),
            host=_one(query, "host", _HOST),
            group=_opt(query, "group"),
            port=port,
        )
    raise UrlError("connect needs 'instance' or 'host'")


def parse_request_path(path: str) -> ConnectRequest | ReconnectRequest:
    """Parse the WebSocket request target (path and query). Raises UrlError."""
    parts = urlsplit(path)
    try:
        query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=32)
    except ValueError as exc:  # more than max_num_fields
        raise UrlError(str(exc)) from None
    if parts.path == CONNECT_PATH:
        return ConnectRequest(_target(query))
    if parts.path == RECONNECT_PATH:
        ack = _one(query, "ack", _ACK)
        return ReconnectRequest(sid=_one(query, "sid", _SID), ack=int(ack))
    raise UrlError(f"unknown path {parts.path!r}")


def connect_query(target: Target) -> str:
    params: dict[str, str] = {
        "project": target.project,
        "port": str(target.port),
        "newWebsocket": "True",
    }
    if isinstance(target, InstanceTarget):
        params.update(zone=target.zone, instance=target.instance, interface=target.interface)
    else:
        params.update(region=target.region, network=target.network, host=target.host)
        if target.group:
            params["group"] = target.group
    return f"{CONNECT_PATH}?{urlencode(params)}"


def certificate_query(target: Target) -> str:
    """The request for an SSH user certificate to reach ``target`` (same target fields as a
    connect)."""
    return SSH_CERTIFICATE_PATH + connect_query(target)[len(CONNECT_PATH) :]


def reconnect_query(sid: str, ack: int, target: Target) -> str:
    params = {"sid": sid, "ack": str(ack), "newWebsocket": "True"}
    if isinstance(target, InstanceTarget):
        params["zone"] = target.zone
    else:
        params["region"] = target.region
    return f"{RECONNECT_PATH}?{urlencode(params)}"
