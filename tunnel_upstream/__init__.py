"""For upstream apps behind identity-tunnel's HTTP mode: verify ``X-Tunnel-Jwt-Assertion``.
Depends on PyJWT[crypto] only."""

from .verify import ASSERTION_HEADER, AssertionError_, verify_assertion

__all__ = ["ASSERTION_HEADER", "AssertionError_", "verify_assertion"]
