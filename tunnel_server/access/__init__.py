"""Who may reach what, decided without touching a connection: the caller's identity (``identity``:
OIDC tokens, JWKS, introspection, the bearer header), the policy engine (``policy``: a pure
function of a request and ``now``), the policy in force (``current``), the address rules that keep
tunnels off forbidden networks (``addresses``, pure), the inventory of targets, the source
address behind trusted proxies (``source``), device certificates and revoked users."""
