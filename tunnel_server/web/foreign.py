"""The one table of request headers that HTTP mode never lets a client send to an upstream: the
identity and forwarding headers of this proxy and of every other authenticating proxy, SSO
gateway, CDN and load balancer an upstream might have been set up to believe, and the
URL/path/method-override headers that would steer an upstream to a path the policy never
decided on (docs/http-mode.md, "Stripped headers", prints this table).

Names are compared in a canonical form: lower case, every character other than a letter or a
digit turned into ``-``. So ``X_Remote_User``, ``x-REMOTE-user`` and ``X.Remote.User`` (names a
CGI, PHP or WSGI server would all present to the app as ``HTTP_X_REMOTE_USER``) are the same
name. A family lists exact names and name prefixes.

``HeaderFilter`` applies the table plus an operator's ``http.strip_headers`` (exact names, or
prefixes written ``name-*``) and a route's ``pass_headers`` (exact names passed through
unstripped, never this proxy's own ``x-tunnel-*``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def canonical(name: str) -> str:
    """``X_Remote.User`` -> ``x-remote-user``."""
    return _NOT_ALNUM.sub("-", name.lower())


@dataclass(frozen=True)
class Family:
    name: str
    source: str
    exact: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()

    def examples(self) -> list[str]:
        """A name of each entry (prefixes completed with ``user``), for docs and tests."""
        return [*self.exact, *(p + "user" for p in self.prefixes)]


FAMILIES: tuple[Family, ...] = (
    Family(
        "identity-tunnel (this proxy)",
        "the assertion and convenience headers HTTP mode adds itself",
        prefixes=("x-tunnel-",),
    ),
    Family(
        "forwarding",
        "RFC 7239 Forwarded; the X-Forwarded-* de-facto family (XFF, -Proto, -Host, -Port, "
        "-Prefix, -Uri, -Ssl; oauth2-proxy's -User/-Email/-Groups/-Access-Token; SonarQube, "
        "Jenkins and Traefik forward-auth user headers); Via is left alone (not trusted by apps)",
        exact=("forwarded",),
        prefixes=("x-forwarded-",),
    ),
    Family(
        "remote-user styles",
        "Apache/CGI REMOTE_USER as a header; Authelia and Caddy forward_auth (Remote-User, "
        "-Groups, -Email, -Name); the Kubernetes API server's authenticating proxy "
        "(X-Remote-User, X-Remote-Group, X-Remote-Extra-*); Oracle Access Manager "
        "(OAM_REMOTE_USER); CA SiteMinder (SM_USER); IBM WebSEAL (iv-user, iv-groups, iv-creds); "
        "Shibboleth SP attribute headers (Shib-*)",
        exact=(
            "oam-remote-user",
            "sm-user",
            "smuser",
            "sm-universalid",
            "iv-user",
            "iv-user-l",
            "iv-groups",
            "iv-creds",
            "iv-remote-address",
            "eppn",
        ),
        prefixes=("remote-", "x-remote-", "shib-"),
    ),  # fmt: skip
    Family(
        "auth-request styles",
        "nginx auth_request and oauth2-proxy (X-Auth-Request-User, -Email, -Groups, "
        "-Preferred-Username, -Access-Token, -Redirect); Keycloak Gatekeeper / Louketo "
        "(X-Auth-Username, -Userid, -Email, -Subject, -Roles, -Groups, -Token, -Audience); "
        "Vouch Proxy (X-Vouch-User, X-Vouch-Idp-*); authentik (X-authentik-*)",
        prefixes=("x-auth-", "x-vouch-", "x-authentik-"),
    ),
    Family(
        "web-auth and authenticated-user styles",
        "Grafana and Gitea auth proxy (X-WEBAUTH-USER, -EMAIL, -NAME, -GROUPS, -ROLE, "
        "-FULLNAME); X-Authenticated-User/-Userid/-Email/-Groups/-Scope (Kong, Squid ICAP); "
        "Kong consumers (X-Consumer-ID, -Username, -Custom-ID, -Groups, X-Anonymous-Consumer, "
        "X-Credential-Identifier, X-Userinfo); generic user headers (X-User, X-User-Id, "
        "X-Username, X-Email, X-Groups, X-Roles) and Elasticsearch run-as",
        exact=(
            "x-user",
            "x-user-id",
            "x-userid",
            "x-username",
            "x-user-name",
            "x-user-email",
            "x-email",
            "x-groups",
            "x-roles",
            "x-userinfo",
            "x-anonymous-consumer",
            "x-credential-identifier",
            "x-credential-username",
            "x-authenticated-user",
            "es-security-runas-user",
        ),
        prefixes=("x-webauth-", "x-authenticated-", "x-consumer-"),
    ),  # fmt: skip
    Family(
        "Google IAP and App Engine",
        "Cloud IAP (X-Goog-Authenticated-User-*, X-Goog-IAP-JWT-Assertion); App Engine "
        "(X-AppEngine-User-Email, -User-Id, -User-IP, -Cron, -QueueName, -Inbound-AppId)",
        prefixes=("x-goog-authenticated-", "x-goog-iap-", "x-appengine-"),
    ),
    Family(
        "Pomerium",
        "X-Pomerium-Jwt-Assertion and X-Pomerium-Claim-*",
        prefixes=("x-pomerium-",),
    ),
    Family(
        "Cloudflare (Access and the edge)",
        "Cf-Access-Jwt-Assertion, Cf-Access-Authenticated-User-Email, Cf-Access-Client-Id/"
        "-Secret; the edge's CF-Connecting-IP, CF-Connecting-IPv6, CF-Pseudo-IPv4, "
        "CF-IPCountry, CF-Visitor, CF-Worker and every other cf-* request header",
        prefixes=("cf-",),
    ),
    Family(
        "Azure App Service and Front Door",
        "Easy Auth (X-MS-CLIENT-PRINCIPAL, -ID, -NAME, -IDP; X-MS-TOKEN-*); ARR "
        "(X-ARR-ClientCert: the client certificate, X-ARR-SSL); Front Door (X-Azure-ClientIP, "
        "X-Azure-SocketIP, X-Azure-FDID); X-WAWS-Unencoded-URL, X-AppService-Proto",
        exact=("x-waws-unencoded-url", "x-appservice-proto", "x-site-deployment-id"),
        prefixes=("x-ms-client-principal", "x-ms-token-", "x-arr-", "x-azure-"),
    ),
    Family(
        "AWS (ALB, API Gateway, CloudFront)",
        "ALB authentication (X-Amzn-Oidc-Data, -Identity, -Accesstoken), ALB mutual TLS "
        "(X-Amzn-Mtls-Clientcert*), X-Amzn-*; CloudFront-Viewer-Address and the other "
        "CloudFront-* viewer headers",
        prefixes=("x-amzn-", "cloudfront-"),
    ),
    Family(
        "client-IP headers of CDNs and load balancers",
        "X-Real-IP (nginx), X-Client-IP and Client-IP, True-Client-IP (Akamai, Cloudflare "
        "Enterprise), X-Cluster-Client-IP (Rackspace, Riverbed), Fastly-Client-IP, "
        "X-Original-Forwarded-For (ingress-nginx), X-ProxyUser-IP, X-Envoy-* (Envoy: "
        "X-Envoy-External-Address, X-Envoy-Internal), Akamai's X-Akamai-Edgescape, "
        "X-Client-Port, X-Real-Port",
        exact=(
            "x-real-ip",
            "x-client-ip",
            "client-ip",
            "true-client-ip",
            "x-cluster-client-ip",
            "fastly-client-ip",
            "x-original-forwarded-for",
            "x-proxyuser-ip",
            "x-akamai-edgescape",
            "x-client-port",
            "x-real-port",
            "x-true-client-ip",
        ),
        prefixes=("x-envoy-",),
    ),  # fmt: skip
    Family(
        "URL, path and method overrides",
        "X-Original-URL and X-Rewrite-URL (IIS URL Rewrite, Symfony, Zend/Laminas, Drupal), "
        "X-Original-URI (nginx auth_request convention) and every other X-Original-* "
        "(-Host, -Method, -Path), X-Host, X-HTTP-Method-Override, X-HTTP-Method, "
        "X-Method-Override (Google APIs, Rails, Express method-override, ASP.NET), "
        "X-URL-Scheme, X-Scheme, Front-End-Https",
        exact=(
            "x-host",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "x-url-scheme",
            "x-scheme",
            "front-end-https",
        ),
        prefixes=("x-original-", "x-rewrite-"),
    ),  # fmt: skip
)

# The proxy's own headers: never passed through, whatever a route says.
OWN_PREFIX = "x-tunnel-"


def _split(names: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    exact: set[str] = set()
    prefixes: list[str] = []
    for name in names:
        if name.endswith("*"):
            prefixes.append(canonical(name[:-1]))
        else:
            exact.add(canonical(name))
    return frozenset(exact), tuple(prefixes)


_TABLE_EXACT = frozenset(name for family in FAMILIES for name in family.exact)
_TABLE_PREFIXES = tuple(prefix for family in FAMILIES for prefix in family.prefixes)
_CACHE_SIZE = 4096  # distinct header names remembered per filter (bounded)


class HeaderFilter:
    """``strips(name)``: True for a header the upstream must never get from the client.
    ``extra``: the operator's names (``name-*`` for a prefix); ``passed``: the route's
    ``pass_headers`` (exact names; ``x-tunnel-*`` can never be passed). Decisions are cached
    per raw name (bounded), since the same few names come on every request."""

    def __init__(self, extra: Iterable[str] = (), passed: Iterable[str] = ()) -> None:
        extra_exact, extra_prefixes = _split(extra)
        self._exact = _TABLE_EXACT | extra_exact
        self._prefixes = _TABLE_PREFIXES + extra_prefixes
        self._passed = frozenset(
            c for c in (canonical(n) for n in passed) if not c.startswith(OWN_PREFIX)
        )
        self._cache: dict[str, bool] = {}

    def strips(self, name: str) -> bool:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        key = canonical(name)
        strip = (key in self._exact or key.startswith(self._prefixes)) and (key not in self._passed)
        if len(self._cache) < _CACHE_SIZE:
            self._cache[name] = strip
        return strip


DEFAULT_FILTER = HeaderFilter()


def family_of(name: str) -> Family | None:
    """The table's family that strips ``name`` (None: not in the table)."""
    key = canonical(name)
    for family in FAMILIES:
        if key in family.exact or key.startswith(family.prefixes):
            return family
    return None
