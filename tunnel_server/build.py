"""The relay's parts built from a config, each given what it needs (``build_relay``), and the
pieces that ``check-config`` and the HTTP-mode workers build alone (policy, verifiers, CA, link)."""

from __future__ import annotations

import socket
import ssl

from tunnel_protocol import NATIVE

from .access.addresses import DestinationPolicy
from .access.current import CurrentPolicy
from .access.identity import (
    DEFAULT_ALGORITHMS,
    Authenticator,
    Introspector,
    OidcVerifier,
)
from .access.inventory import Inventory
from .access.policy import Policy, load_policy
from .access.revocations import Revocations
from .access.ssh_ca import CertificateAuthority, load_ca_key
from .audit import AuditLog
from .config import ConfigError, OidcConfig, ServerConfig, SshConfig
from .relay import Relay
from .relay.admission import Admission
from .relay.certificates import CertificateIssuer
from .relay.cluster import Cluster, ClusterLink
from .relay.continuous import Reauthorizer
from .relay.denials import Denials
from .relay.events import RelayEvents
from .relay.handshake import Handshake
from .relay.limits import TunnelCaps
from .relay.registry import Registry
from .relay.tunnels import Tunnels
from .state import MemoryState, RedisState, StateStore

# One frame per message: the largest native DATA frame plus its header, with room for control.
MAX_MESSAGE = NATIVE.max_data + 1024


def build_verifier(oidc: OidcConfig) -> OidcVerifier:
    """One issuer's verifier (its JWKS cache), for the audiences the config gives it."""
    return OidcVerifier(
        oidc.issuer,
        oidc.audiences,
        algorithms=tuple(oidc.algorithms) if oidc.algorithms else DEFAULT_ALGORITHMS,
        leeway=oidc.leeway,
        max_lifetime=oidc.max_token_lifetime,
        jwks_ttl=oidc.jwks_ttl,
        groups_claim=oidc.groups_claim,
    )


def build_authenticator(config: ServerConfig) -> Authenticator:
    """The relay's token checks, built once: the relay listener, HTTP mode (for each app's
    audiences) and the admin API all use it, so each issuer's keys are fetched and cached once."""
    verifiers: list[OidcVerifier] = []
    introspectors: list[Introspector] = []
    for oidc in config.issuers:
        verifier = build_verifier(oidc)
        verifiers.append(verifier)
        if oidc.introspection is not None:
            introspectors.append(
                Introspector(
                    verifier,
                    client_id=oidc.introspection.client_id,
                    client_secret=oidc.introspection.client_secret,
                    endpoint=oidc.introspection.endpoint,
                    cache_ttl=oidc.introspection.cache_ttl,
                )
            )
    return Authenticator(verifiers, introspectors)


def build_policy(config: ServerConfig) -> Policy:
    """The inline allow-list, merged into the policy file when there is one. Raises
    ConfigError (precise file, key and reason) for an invalid policy file."""
    if config.policy_file is None:
        return Policy.from_allow_rules(config.access, inventory=config.inventory)
    return load_policy(
        config.policy_file, inventory=config.inventory, allow_rules=tuple(config.access)
    )


def build_link(config: ServerConfig) -> ClusterLink:
    """How this node talks to the others (ConfigError for an unreadable cluster secret)."""
    link = ClusterLink(
        fail_open=config.state.on_unavailable == "allow",
        open_timeout=config.tunnel.handshake_timeout,
        max_size=MAX_MESSAGE,
    )
    if config.cluster is not None:
        link.secret = config.cluster.secret_bytes()
        link.server_name = config.cluster.server_name
        if config.cluster.advertise_url.startswith("wss:"):
            cafile = str(config.cluster.ca_file) if config.cluster.ca_file else None
            try:
                link.ssl_context = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cluster.ca_file: cannot load {cafile}: {exc}") from None
    return link


def node_name(config: ServerConfig, node: str | None = None) -> str:
    if node is not None:
        return node
    if config.cluster is not None and config.cluster.node_id:
        return config.cluster.node_id
    return socket.gethostname()


def build_relay(
    config: ServerConfig, *, node: str | None = None, revocations: Revocations | None = None
) -> tuple[Relay, Authenticator]:
    """The relay's parts, each given what it needs, and the ``Relay`` that holds them."""
    authenticator = build_authenticator(config)
    revocations = revocations or Revocations()
    node = node_name(config, node)
    audit = AuditLog(node)
    events = RelayEvents()
    policies = CurrentPolicy(build_policy(config))
    settings = config.tunnel
    cluster = Cluster(
        build_state(config, node), build_link(config), audit, settings.max_tunnels_per_principal
    )
    registry = Registry(
        settings=settings,
        caps=TunnelCaps(settings.max_tunnels_per_principal, settings.max_tunnels),
        cluster=cluster,
        audit=audit,
        events=events,
    )
    admission = Admission(
        authenticator=authenticator,
        revoked=revocations.is_revoked,
        policies=policies,
        inventory=Inventory(config.inventory),
        destinations=DestinationPolicy(),
        audit=audit,
        events=events,
        denials=Denials(settings.denial_detail, settings.denial_detail_unknown_target),
    )
    reauthorizer = Reauthorizer(
        registry=registry,
        admission=admission,
        authenticator=authenticator,
        policies=policies,
        audit=audit,
        events=events,
    )
    handshake = Handshake(
        certificates=_certificates(config, admission, revocations, audit),
        admission=admission,
        registry=registry,
        cluster=cluster,
        authenticator=authenticator,
        audit=audit,
        login=config.login,
        trusted_proxies=config.trusted_proxies,
    )
    tunnels = Tunnels(
        admission=admission,
        registry=registry,
        reauthorizer=reauthorizer,
        cluster=cluster,
        settings=settings,
        audit=audit,
    )
    relay = Relay(
        admission=admission,
        registry=registry,
        reauthorizer=reauthorizer,
        cluster=cluster,
        handshake=handshake,
        tunnels=tunnels,
        policies=policies,
        events=events,
        audit=audit,
    )
    return relay, authenticator


def build_ca(ssh: SshConfig) -> CertificateAuthority:
    """The SSH certificate authority the config names (ConfigError for an unusable key)."""
    previous = [
        load_ca_key(path, f"ssh.previous_user_ca_key_files[{n}]")
        for n, path in enumerate(ssh.previous_user_ca_key_files)
    ]
    host = (
        load_ca_key(ssh.host_ca_key_file, "ssh.host_ca_key_file") if ssh.host_ca_key_file else None
    )
    return CertificateAuthority(
        load_ca_key(ssh.user_ca_key_file, "ssh.user_ca_key_file"),
        previous_user_keys=previous,
        host_key=host,
    )


def _certificates(
    config: ServerConfig, admission: Admission, revocations: Revocations, audit: AuditLog
) -> CertificateIssuer | None:
    if config.ssh is None:
        return None
    return CertificateIssuer(
        admission=admission,
        ca=build_ca(config.ssh),
        settings=config.ssh,
        revoked_at=revocations.revoked_at,
        audit=audit,
    )


def build_state(config: ServerConfig, node: str) -> StateStore:
    """The store the config names (not started yet)."""
    if config.state.backend == "memory":
        return MemoryState(node)
    state, cluster = config.state, config.cluster
    if state.redis_url is None or cluster is None:  # pragma: no cover - the config checks both
        raise ConfigError("state.backend 'redis' needs redis_url and a cluster section")
    return RedisState(
        state.redis_url,
        node=node,
        advertise_url=cluster.advertise_url,
        prefix=state.key_prefix,
        lease_ttl=state.lease_ttl,
        resync_interval=state.resync_interval,
        retention=state.revocation_retention,
        timeout=state.timeout,
    )
