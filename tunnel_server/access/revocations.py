"""Revoked users: every token a user held up to the moment of their revocation is refused, here
and (through the shared state) on every node; tokens issued later are the identity provider's
call."""

from __future__ import annotations

import time
from collections.abc import Callable

from .identity import Identity


class Revocations:
    """Principals whose tokens issued before a moment are refused, and revoked tunnels.

    Revoking a user closes their tunnels and refuses every token issued up to that moment, so
    they must log in again; tokens issued later are accepted (the IdP decides about those)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._users: dict[str, float] = {}
        self._clock = clock

    def revoke_user(self, principal: str, at: float | None = None) -> float:
        """Refuse ``principal``'s tokens issued up to ``at`` (default: now); returns the
        moment in force (a later revocation is never moved back)."""
        at = self._clock() if at is None else at
        self._users[principal] = max(at, self._users.get(principal, at))
        return self._users[principal]

    def revoked_at(self, principal: str) -> float | None:
        """When ``principal`` was last revoked (tokens issued up to then are refused)."""
        return self._users.get(principal)

    def is_revoked(self, identity: Identity) -> bool:
        revoked_at = self._users.get(identity.principal)
        if revoked_at is None:
            return False
        return identity.issued_at is None or identity.issued_at <= revoked_at
