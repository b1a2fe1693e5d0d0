"""The import paths of the flat layout still work for one release, with a DeprecationWarning,
and give the same objects as their new homes."""

from __future__ import annotations

import importlib
import sys

import pytest

from tunnel_server._moved import MOVED

# One name each old path must still offer (from each of its new homes where it was split).
NAMES = {
    "tunnel_server.identity": ["Authenticator", "OidcVerifier"],
    "tunnel_server.identity.jwt_verifier": ["OidcVerifier"],
    "tunnel_server.policy": ["evaluate", "Policy"],
    "tunnel_server.inventory": ["Inventory"],
    "tunnel_server.device": ["Device"],
    "tunnel_server.destinations": ["DestinationPolicy", "resolve_and_dial"],
    "tunnel_server.http_proxy": ["HttpProxy"],
    "tunnel_server.http_proxy.config": ["RouteConfig"],
    "tunnel_server.http_proxy.sessions": ["WebSession"],
    "tunnel_server.handshake": ["Handshake"],
    "tunnel_server.control": ["Reauthorizer"],
    "tunnel_server.limits": ["TunnelCaps", "REPLY_BACKLOG"],
    "tunnel_server.cluster": ["ClusterLink"],
    "tunnel_server.forward": ["bridge"],
    "tunnel_server.session": ["Session"],
    "tunnel_server.admin": ["admin_app", "Revocations"],
    "tunnel_server.metrics": ["Metrics"],
    "tunnel_server.listeners": ["serve_app"],
    "tunnel_server.tls": ["server_context"],
    "tunnel_protocol.aio.runtime": ["run", "tune_malloc"],
    "tunnel_protocol.aio.wsbridge": ["forward_messages"],
}


def test_every_moved_path_is_covered() -> None:
    assert set(MOVED) <= set(NAMES)


@pytest.mark.parametrize("old", sorted(NAMES))
def test_an_old_path_warns_and_gives_the_same_objects(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    sys.modules.pop(old, None)
    for name in NAMES[old]:
        value = getattr(module, name)
        homes = [m for m in sys.modules.values() if getattr(m, name, None) is value]
        assert any(not m.__name__.startswith(old) for m in homes), name


@pytest.mark.parametrize("name", ["serve_forever", "Reloader", "setup_logging", "RedactSecrets"])
def test_names_that_left_the_composition_root(name: str) -> None:
    app = importlib.import_module("tunnel_server.app")
    with pytest.warns(DeprecationWarning, match="moved to"):
        value = getattr(app, name)
    assert value.__module__ in ("tunnel_server.serve", "tunnel_server.ops.logs")
