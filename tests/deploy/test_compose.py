"""deploy/compose: the local three-node cluster, checked without a Docker daemon. The compose
file is parsed (and schema-checked by docker-compose when installed), each node's config is
validated by the real loader with that node's environment, and the pieces must agree: node ids
and advertise URLs, one secret source, HAProxy's backends, the dev certificate's names."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from cryptography import x509

from tunnel_server.build import build_policy
from tunnel_server.config import ServerConfig, parse_config, read_yaml

from .files import (
    COMPOSE,
    DOCKERFILE,
    HAPROXY_CFG,
    Doc,
    config_path_of,
    dockerfile_instructions,
    dockerfile_stages,
    exec_form,
    haproxy_sections,
    haproxy_servers,
)

COMPOSE_DIR = COMPOSE.parent


def compose() -> Doc:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def relay_services(data: Doc) -> dict[str, Doc]:
    """The relay nodes: the services that set a node id."""
    return {
        name: svc
        for name, svc in data["services"].items()
        if "TUNNEL_NODE_ID" in (svc.get("environment") or {})
    }


def host_path(volume: str) -> tuple[str, PurePosixPath]:
    """'SOURCE:TARGET[:ro]' -> (source, target)."""
    source, target = volume.split(":")[:2]
    return source, PurePosixPath(target)


def mounts(svc: Doc) -> dict[PurePosixPath, str]:
    """Container path -> volume name or host path."""
    return {target: source for source, target in map(host_path, svc["volumes"])}


def node_config(svc: Doc) -> tuple[ServerConfig, Path]:
    """The node's relay.yaml (the bind mount at the image's --config path), loaded with the
    node's environment. Returns the config and the host file."""
    final = dockerfile_stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    entrypoint = [exec_form(i) for i in final if i.keyword == "ENTRYPOINT"][-1]
    config_path = PurePosixPath(config_path_of(entrypoint))
    mounted = mounts(svc)
    assert config_path in mounted, f"nothing mounted at {config_path}"
    host_file = (COMPOSE_DIR / mounted[config_path]).resolve()
    env = {k: str(v) for k, v in svc["environment"].items()}
    config = parse_config(
        read_yaml(host_file), source=str(host_file), base_dir=host_file.parent, env=env
    )
    return config, host_file


def _dev_certs_module() -> Any:
    spec = importlib.util.spec_from_file_location("dev_certs", COMPOSE_DIR / "dev_certs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_relay_nodes_with_distinct_identities() -> None:
    data = compose()
    relays = relay_services(data)
    assert sorted(relays) == ["relay-1", "relay-2", "relay-3"]
    ids = [svc["environment"]["TUNNEL_NODE_ID"] for svc in relays.values()]
    assert len(set(ids)) == 3, f"node ids {ids}"
    for name, svc in relays.items():
        config, _ = node_config(svc)
        assert config.state.backend == "redis"
        assert config.cluster is not None
        assert config.cluster.node_id == name
        url = urlsplit(config.cluster.advertise_url)
        # The other nodes reach this one by its service name, on the relay port, with TLS.
        assert url.hostname == name, f"{name} advertises {config.cluster.advertise_url}"
        assert url.port == config.listen.port
        assert url.scheme == ("wss" if config.tls is not None else "ws")
        assert svc["image"] == relays["relay-1"]["image"]


def test_every_node_has_the_same_config_and_secret_source() -> None:
    relays = relay_services(compose())
    volumes = {name: sorted(svc["volumes"]) for name, svc in relays.items()}
    assert len({tuple(v) for v in volumes.values()}) == 1, f"nodes mount different files: {volumes}"
    for svc in relays.values():
        config, host_file = node_config(svc)
        assert config.cluster is not None
        assert config.cluster.secret_file is not None
        assert config.cluster.ca_file is not None
        # secret_file is in the certs volume, which dev-certs fills
        secret = PurePosixPath("/etc/tunnel") / config.cluster.secret_file.relative_to(
            host_file.parent
        )
        sources = [src for target, src in mounts(svc).items() if target in secret.parents]
        assert sources == ["certs"], f"cluster secret {secret} not in the certs volume"
        build_policy(config)


def test_dev_certs_cover_every_node_and_make_a_long_secret(tmp_path: Path) -> None:
    data = compose()
    dev_certs = _dev_certs_module()
    assert dev_certs.generate(tmp_path) is True
    assert dev_certs.generate(tmp_path) is False  # kept on restart
    cert = x509.load_pem_x509_certificate((tmp_path / "relay.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    assert set(relay_services(data)) <= names, "node-to-node TLS verifies these names"
    assert "localhost" in names
    assert len((tmp_path / "cluster-secret").read_bytes().strip()) >= 32
    assert (tmp_path / "relay.key").stat().st_mode & 0o077 == 0o040
    service = data["services"]["dev-certs"]
    target = [host_path(v)[1] for v in service["volumes"] if host_path(v)[0] == "certs"]
    assert [str(t) for t in target] == [service["entrypoint"][-1]]


def test_haproxy_backends_are_the_relay_services() -> None:
    data = compose()
    relays = relay_services(data)
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    servers = haproxy_servers(sections[("backend", "relays")])
    ports = {name: node_config(svc)[0].listen.port for name, svc in relays.items()}
    assert {host: port for host, port in servers.values()} == ports
    haproxy = data["services"]["haproxy"]
    mounted = [host_path(v) for v in haproxy["volumes"]]
    assert [(COMPOSE_DIR / src).resolve() for src, _ in mounted] == [HAPROXY_CFG]
    binds = [line.split()[1] for line in sections[("frontend", "relay")] if line.startswith("bind")]
    frontend_port = int(binds[0].rpartition(":")[2])
    published = [p.split(":") for p in haproxy["ports"]]
    assert [(host, int(container)) for host, _, container in published] == [
        ("127.0.0.1", frontend_port)
    ], "publish the entry point on the host's loopback only"
    assert "ports" not in data["services"]["redis"], "Redis is never published"


def test_dev_idp_is_loopback_for_every_relay() -> None:
    """The relay accepts a plain-http issuer only on loopback: each relay needs a forwarder in
    its own network namespace, and the published IdP port must be the issuer's."""
    data = compose()
    services = data["services"]
    for name, svc in relay_services(data).items():
        config, _ = node_config(svc)
        issuer = urlsplit(config.issuers[0].issuer)
        assert issuer.hostname == "127.0.0.1"
        links = [s for s in services.values() if s.get("network_mode") == f"service:{name}"]
        assert len(links) == 1, f"{name}: no IdP forwarder in its network namespace"
        assert f"TCP-LISTEN:{issuer.port},bind=127.0.0.1" in links[0]["command"]
        assert "TCP:dev-idp:" in links[0]["command"]
    idp = services["dev-idp"]
    assert f"127.0.0.1:{issuer.port}:" in idp["ports"][0]
    assert idp["command"][idp["command"].index("--issuer") + 1] == config.issuers[0].issuer


def test_echo_target_is_the_inventory_address() -> None:
    data = compose()
    config, _ = node_config(next(iter(relay_services(data).values())))
    (instance,) = config.inventory.instances
    echo = data["services"]["echo"]
    assert echo["networks"]["targets"]["ipv4_address"] == instance.interfaces["nic0"]
    port = int(echo["command"].split()[0].split(":")[1].split(",")[0])
    assert [p.first for rule in config.access for p in rule.ports] == [port]


def test_stop_grace_covers_the_drain() -> None:
    for name, svc in relay_services(compose()).items():
        config, _ = node_config(svc)
        grace = svc["stop_grace_period"]
        assert grace.endswith("s")
        assert int(grace[:-1]) >= config.tunnel.drain_grace + 5, f"{name}: stop_grace_period"


def test_relays_run_hardened() -> None:
    final = dockerfile_stages(dockerfile_instructions(DOCKERFILE.read_text()))[-1]
    image_user = [i.args for i in final if i.keyword == "USER"][-1]
    for name, svc in relay_services(compose()).items():
        assert svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        assert svc["user"] == image_user, f"{name} runs as {svc['user']}, the image as {image_user}"
        assert "backend" in svc["networks"], f"{name} cannot reach Redis"
    compose_data = compose()
    assert compose_data["networks"]["backend"]["internal"] is True
    assert compose_data["services"]["redis"]["networks"] == ["backend"]


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose (Debian package docker-compose) is not installed: schema not checked",
)
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
