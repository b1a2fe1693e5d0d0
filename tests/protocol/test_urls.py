"""The relay's URL contract: strict parsing of connect/reconnect request targets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel_protocol.urls import (
    ConnectRequest,
    HostTarget,
    InstanceTarget,
    ReconnectRequest,
    Target,
    UrlError,
    connect_query,
    parse_port,
    parse_request_path,
    reconnect_query,
)

GCLOUD_CONNECT = (
    "/v4/connect?project=test-proj&port=22&newWebsocket=True"
    "&zone=us-central1-a&instance=vm1&interface=nic0"
)


def test_instance_form() -> None:
    assert parse_request_path(GCLOUD_CONNECT) == ConnectRequest(
        InstanceTarget(
            project="test-proj", zone="us-central1-a", instance="vm1", interface="nic0", port=22
        )
    )


def test_instance_form_name() -> None:
    request = parse_request_path(GCLOUD_CONNECT)
    assert isinstance(request, ConnectRequest)
    assert request.target.name == "test-proj/us-central1-a/vm1"


def test_interface_defaults_to_nic0() -> None:
    request = parse_request_path("/v4/connect?project=p&port=3389&zone=z&instance=i")
    assert request == ConnectRequest(
        InstanceTarget(project="p", zone="z", instance="i", interface="nic0", port=3389)
    )


def test_host_form() -> None:
    request = parse_request_path(
        "/v4/connect?project=p&port=443&newWebsocket=True"
        "&region=us-east1&network=default&host=10.0.0.5"
    )
    target = HostTarget(
        project="p", region="us-east1", network="default", host="10.0.0.5", group=None, port=443
    )
    assert request == ConnectRequest(target)
    assert target.name == "p/us-east1/default/10.0.0.5"


def test_host_form_with_group() -> None:
    request = parse_request_path(
        "/v4/connect?project=p&port=22&region=r&network=n&host=db.internal&group=dbs"
    )
    target = HostTarget(
        project="p", region="r", network="n", host="db.internal", group="dbs", port=22
    )
    assert request == ConnectRequest(target)
    assert target.name == "p/r/n/dbs/db.internal"


def test_host_form_ipv6_host() -> None:
    request = parse_request_path(
        "/v4/connect?project=p&port=22&region=r&network=n&host=fd00%3A%3A1"
    )
    assert isinstance(request, ConnectRequest)
    assert isinstance(request.target, HostTarget)
    assert request.target.host == "fd00::1"


def test_reconnect_form() -> None:
    assert parse_request_path(
        "/v4/reconnect?sid=abc-123&ack=49152&newWebsocket=True&zone=us-central1-a"
    ) == ReconnectRequest(sid="abc-123", ack=49152)


def test_reconnect_region_form() -> None:
    assert parse_request_path("/v4/reconnect?sid=s&ack=0&region=r") == ReconnectRequest("s", 0)


def test_unknown_parameters_are_ignored() -> None:
    # IAP Desktop: adds _=<guid>, omits newWebsocket.
    request = parse_request_path(
        "/v4/connect?project=p&port=22&zone=z&instance=i&interface=nic0"
        "&_=6f1c2b9e-2a55-4a27-8f7e-1d0c5b1a8e33&foo=bar&foo=baz"
    )
    assert request == ConnectRequest(
        InstanceTarget(project="p", zone="z", instance="i", interface="nic0", port=22)
    )


def test_missing_new_websocket_is_fine_on_reconnect() -> None:
    assert parse_request_path("/v4/reconnect?sid=s&ack=5&zone=z&_=x") == ReconnectRequest("s", 5)


@pytest.mark.parametrize("port", ["1", "22", "443", "65535"])
def test_parse_port_valid(port: str) -> None:
    assert parse_port(port) == int(port)


@pytest.mark.parametrize(
    "port",
    ["0", "00000", "00022", "022", "65536", "99999", "123456", "22a", "+22", "-22", " 22",
     "22 ", "0x16", "", "22\n", "\u0662\u0662", "\uff12\uff12", "2_2", "22.0"],
)  # fmt: skip
def test_parse_port_strict(port: str) -> None:
    with pytest.raises(UrlError):
        parse_port(port)


@pytest.mark.parametrize(
    "raw",
    ["0", "65536", "22a", "%2B22", "+22", "%2022", "0x16", "", "22%0A", "%EF%BC%92%EF%BC%92"],
)
def test_port_in_query_is_strict(raw: str) -> None:
    with pytest.raises(UrlError):
        parse_request_path(f"/v4/connect?project=p&port={raw}&zone=z&instance=i")


@pytest.mark.parametrize(
    "path",
    [
        "/v4/connect?project=p&project=q&port=22&zone=z&instance=i",
        "/v4/connect?project=p&port=22&port=23&zone=z&instance=i",
        "/v4/connect?project=p&port=22&zone=z&instance=i&instance=j",
        "/v4/connect?project=p&port=22&zone=z&instance=i&interface=nic0&interface=nic1",
        "/v4/connect?project=p&port=22&region=r&network=n&host=h&host=k",
        "/v4/connect?project=p&port=22&region=r&network=n&host=h&group=a&group=b",
        "/v4/reconnect?sid=a&sid=b&ack=0",
        "/v4/reconnect?sid=a&ack=0&ack=1",
    ],
)
def test_duplicated_parameters_are_rejected(path: str) -> None:
    with pytest.raises(UrlError, match="more than once"):
        parse_request_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "/v4/connect?port=22&zone=z&instance=i",  # no project
        "/v4/connect?project=p&zone=z&instance=i",  # no port
        "/v4/connect?project=p&port=22&instance=i",  # no zone
        "/v4/connect?project=p&port=22&zone=z",  # neither instance nor host
        "/v4/connect?project=p&port=22&network=n&host=h",  # no region
        "/v4/connect?project=p&port=22&region=r&host=h",  # no network
        "/v4/connect?project=&port=22&zone=z&instance=i",  # blank project
        "/v4/connect?project=p&port=22&zone=z&instance=i&interface=",  # blank interface
        "/v4/connect?project=p&port=22&zone=z&instance=-i",  # name starts with '-'
        "/v4/connect?project=p&port=22&zone=z&instance=a%2Fb",  # slash in name
        "/v4/connect?project=p&port=22&zone=z&instance=vm1%0A",  # trailing newline
        "/v4/connect?project=p%0Ax&port=22&zone=z&instance=i",  # embedded newline
        "/v4/connect?project=p&port=22&region=r&network=n&host=h%20x",  # space in host
        "/v4/connect?project=p&port=22&region=r&network=n&host=h%0A",  # newline in host
        "/v4/reconnect?ack=0",  # no sid
        "/v4/reconnect?sid=s",  # no ack
        "/v4/reconnect?sid=s&ack=-1",
        "/v4/reconnect?sid=s&ack=1e3",
        "/v4/reconnect?sid=s&ack=1%0A",
        "/v4/reconnect?sid=s&ack=123456789012345678901",  # > 20 digits
        "/v4/reconnect?sid=a:b&ack=0",  # sids are url-safe base64
        "/v4/reconnect?sid=a%20b&ack=0",
    ],
)
def test_invalid_parameters_are_rejected(path: str) -> None:
    with pytest.raises(UrlError):
        parse_request_path(path)


@pytest.mark.parametrize(
    "path",
    ["/", "", "/v4/connect/", "/v4/Connect?project=p", "/v3/connect?project=p&port=22",
     "/v4/reconnect/x?sid=s&ack=0", "/v4/connect%3Fproject=p", "//v4/connect?project=p"],
)  # fmt: skip
def test_unknown_paths_are_rejected(path: str) -> None:
    with pytest.raises(UrlError, match="unknown path"):
        parse_request_path(path)


def test_too_many_fields_is_a_url_error() -> None:
    junk = "&".join(f"x{i}=1" for i in range(40))
    with pytest.raises(UrlError):
        parse_request_path(f"{GCLOUD_CONNECT}&{junk}")


def test_url_error_is_a_value_error() -> None:
    assert issubclass(UrlError, ValueError)


# -- building URLs ------------------------------------------------------------------------------


def test_connect_query_instance_is_gcloud_shaped() -> None:
    target = InstanceTarget(
        project="test-proj", zone="us-central1-a", instance="vm1", interface="nic0", port=22
    )
    assert connect_query(target) == GCLOUD_CONNECT


def test_reconnect_query_is_gcloud_shaped() -> None:
    target = InstanceTarget(project="p", zone="z", instance="i", interface="nic0", port=22)
    assert (
        reconnect_query("s1", 42, target) == "/v4/reconnect?sid=s1&ack=42&newWebsocket=True&zone=z"
    )
    host = HostTarget(project="p", region="r", network="n", host="h", group=None, port=22)
    assert reconnect_query("s1", 0, host) == "/v4/reconnect?sid=s1&ack=0&newWebsocket=True&region=r"


name = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,30}\Z")
hostname = st.from_regex(r"\A[A-Za-z0-9._:%-]{1,40}\Z")
port = st.integers(min_value=1, max_value=65535)

instance_targets = st.builds(
    InstanceTarget, project=name, zone=name, instance=name, interface=name, port=port
)
host_targets = st.builds(
    HostTarget,
    project=name,
    region=name,
    network=name,
    host=hostname,
    group=st.none() | name,
    port=port,
)
targets: st.SearchStrategy[Target] = instance_targets | host_targets


@given(target=targets)
def test_connect_query_round_trip(target: Target) -> None:
    assert parse_request_path(connect_query(target)) == ConnectRequest(target)


@given(
    sid=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    ack=st.integers(min_value=0, max_value=2**64 - 1),
    target=targets,
)
def test_reconnect_query_round_trip(sid: str, ack: int, target: Target) -> None:
    assert parse_request_path(reconnect_query(sid, ack, target)) == ReconnectRequest(sid, ack)
