"""HTTP mode's decisions: the web adapter to the policy (``app:NAME`` with role ``webUser`` on the
normalized host and path), and the open WebSockets and streaming responses, each re-decided at
the moment its decision can next change (a time condition of the policy, the end of its
credential or of its session), when the policy is replaced, and closed at once when its user
is revoked or its session ends anywhere."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ..access.identity import Identity
from ..access.policy import WEB_USER, AccessRequest, Policy, evaluate, next_change
from ..audit import AuditLog
from ..config import RouteConfig
from .callers import Caller
from .sessions import session_key


def access_request(
    caller: Caller,
    route: RouteConfig,
    port: int,
    source_ip: str | None,
    host: str,
    path: str,
) -> AccessRequest:
    """The policy request for one HTTP-mode request (``path`` normalized)."""
    identity = caller.identity
    return AccessRequest(
        identity.members,
        f"app:{route.name}",
        port,
        source_ip=source_ip,
        principal=identity.principal,
        role=WEB_USER,
        request_host=host,
        request_path=path.lower() if route.path_case == "insensitive" else path,
        claims={
            "sub": identity.subject,
            "iss": identity.issuer,
            "email": identity.email or "",
            "groups": list(identity.groups),
        },
    )


@dataclass(eq=False)
class OpenStream:
    """An open WebSocket or streaming response, re-decided while it lasts."""

    route: RouteConfig
    identity: Identity
    request: AccessRequest
    close: Callable[[], None]
    session_id: str | None = None  # the browser session it runs on, if any
    session_key: str | None = None  # session_key(session_id): what announcements carry
    session_expires: float = math.inf
    timer: asyncio.TimerHandle | None = None


class OpenStreams:
    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        audit: AuditLog,
        is_revoked: Callable[[Identity], bool],
        clock: Callable[[], float],
    ) -> None:
        self._policy = policy
        self._audit = audit
        self._is_revoked = is_revoked
        self._clock = clock
        self._open: set[OpenStream] = set()

    def open(
        self,
        route: RouteConfig,
        caller: Caller,
        request: AccessRequest,
        close: Callable[[], None],
        *,
        grace: float = 0.0,
    ) -> OpenStream:
        """Track a stream from now until ``done``; ``close`` ends it (called at most once).
        With ``grace``, its own deadline is computed only once it has lasted that long (most
        responses are over by then, and computing it was a per-request cost): until then it
        is closed by revocations, sign-outs and policy reloads, not by its deadline."""
        stream = OpenStream(route, caller.identity, request, close)
        if caller.session is not None:
            stream.session_id = caller.session.sid
            stream.session_key = session_key(caller.session.sid)
            stream.session_expires = caller.session.expires
        self._open.add(stream)
        if grace > 0:
            stream.timer = asyncio.get_running_loop().call_later(grace, self._recheck, stream)
        else:
            self._schedule(stream, self._policy(), self._clock())
        return stream

    def done(self, stream: OpenStream) -> bool:
        """The stream ended; False if it had been closed by a decision already."""
        if stream.timer is not None:
            stream.timer.cancel()
        if stream not in self._open:
            return False
        self._open.discard(stream)
        return True

    def session_ids(self) -> set[str]:
        return {s.session_id for s in self._open if s.session_id is not None}

    # -- decisions ------------------------------------------------------------------------------

    def _refusal(self, stream: OpenStream, policy: Policy, now: float) -> str | None:
        if self._is_revoked(stream.identity):
            return "revoked"
        if stream.session_expires <= now:
            return "session ended"
        if stream.session_key is None and stream.identity.valid_until < now:
            return "credential expired"
        decision = evaluate(stream.request, policy, now)
        return None if decision.allowed else decision.reason

    def _schedule(self, stream: OpenStream, policy: Policy, now: float) -> None:
        """Wake the stream when its decision can next change: a time condition of the
        policy, its credential's end (bearer), or its session's end."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        ends = stream.session_expires if stream.session_key else stream.identity.valid_until
        when = min(next_change(stream.request, policy, now) or math.inf, ends)
        if math.isfinite(when):
            loop = asyncio.get_running_loop()
            # Wall-clock deadline onto the loop's clock; a hair late rather than early.
            delay = max(0.0, when - now)
            stream.timer = loop.call_at(loop.time() + delay + 0.001, self._recheck, stream)

    def _recheck(self, stream: OpenStream) -> None:
        stream.timer = None
        if stream not in self._open:
            return
        policy, now = self._policy(), self._clock()
        reason = self._refusal(stream, policy, now)
        if reason is not None:
            self._close(stream, reason)
        else:
            self._schedule(stream, policy, now)

    def redecide_all(self) -> int:
        """Re-decide every open stream against the policy in force (after a reload), close
        those no longer allowed and reschedule the others. Returns how many were closed."""
        closed = 0
        policy, now = self._policy(), self._clock()
        for stream in list(self._open):
            reason = self._refusal(stream, policy, now)
            if reason is not None:
                closed += self._close(stream, reason)
            else:
                self._schedule(stream, policy, now)
        return closed

    def end_sessions(self, keys: Collection[str]) -> int:
        """Close the streams running on the sessions with these keys (``session_key(sid)``)."""
        wanted = set(keys)
        return sum(
            self._close(s, "session ended") for s in list(self._open) if s.session_key in wanted
        )

    def revoke_user(self, principal: str) -> int:
        return sum(
            self._close(s, "revoked") for s in list(self._open) if s.identity.principal == principal
        )

    def close_all(self) -> None:
        for stream in list(self._open):
            if self.done(stream):
                stream.close()

    def _close(self, stream: OpenStream, reason: str) -> bool:
        if not self.done(stream):
            return False
        self._audit.record(
            "http_close", principal=stream.identity.principal, app=stream.route.name, reason=reason
        )
        stream.close()
        return True
