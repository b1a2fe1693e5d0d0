"""Assertion-signing keys across a cluster: each node publishes its public keys in the session
store, and the JWKS any node serves lists every node's keys, so an upstream that fetches the
JWKS through the load balancer can verify an assertion signed by any node. Private keys never
leave their node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .assertion import AssertionSigner
from .sessions import SessionStore, SessionStoreUnavailable

log = logging.getLogger("tunnel.http")

# Seconds the other nodes' published keys are cached for the JWKS endpoint.
SHARED_KEYS_TTL = 5.0


class SharedKeys:
    """Publishes ``signer``'s current key (at start, and after each rotation) and merges the
    published keys into the JWKS. ``spawn`` runs a background coroutine (the proxy keeps it)."""

    def __init__(
        self,
        signer: AssertionSigner,
        store: SessionStore,
        *,
        spawn: Callable[[Coroutine[Any, Any, object]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signer = signer
        self.store = store
        self._spawn = spawn
        self._clock = clock
        self._published_kid: str | None = None
        self._publishing = False
        self._cached: tuple[float, list[dict[str, Any]]] | None = None

    async def jwks(self) -> dict[str, Any]:
        """This node's keys and every other node's published ones; the shared part is cached
        for SHARED_KEYS_TTL, and when the store is down the last copy (or none) is used."""
        local: list[dict[str, Any]] = self.signer.jwks()["keys"]
        now = self._clock()
        cached = self._cached
        if cached is None or not 0 <= now - cached[0] < SHARED_KEYS_TTL:
            try:
                shared = await self.store.published_keys()
            except SessionStoreUnavailable as exc:
                log.warning("published assertion keys unavailable: %s", exc)
                shared = cached[1] if cached is not None else []
            self._cached = cached = (now, shared)
        kids = {key["kid"] for key in local}
        return {"keys": [*local, *(key for key in cached[1] if key.get("kid") not in kids)]}

    async def publish_now(self) -> None:
        """Publish the current key; a store that is down is retried by ``ensure_published``."""
        try:
            await self._publish()
        except SessionStoreUnavailable as exc:
            log.warning("assertion key not published yet: %s", exc)

    def ensure_published(self) -> None:
        """Publish the current key in the background unless it already is (call after anything
        that may rotate it; cheap when nothing changed)."""
        if self.signer.current.kid != self._published_kid and not self._publishing:
            self._publishing = True
            self._spawn(self._publish_in_background())

    async def _publish(self) -> None:
        key = self.signer.current
        # It signs until the next rotation; what it signed lives `lifetime` longer. Twice the
        # rotation period (at least twice the lifetime) covers a late rotation too.
        await self.store.publish_key(key.public_jwk(), key.created + 2 * self.signer.rotation)
        self._published_kid = key.kid

    async def _publish_in_background(self) -> None:
        try:
            await self.publish_now()
        finally:
            self._publishing = False
