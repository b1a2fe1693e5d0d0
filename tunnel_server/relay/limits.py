"""Resource limits of the relay: caps on open tunnels (per principal and global), and the idle
timeout and maximum session duration of each tunnel (announced in advance in the audit log and
in the close reason)."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Callable

from tunnel_protocol import CloseCode

from ..audit import AuditLog
from ..config import TunnelSettings

# Timers may fire up to the loop's clock resolution early (uvloop: 1 ms): a deadline this close
# counts as reached, so a check never re-arms itself for a sliver of time.
_SLACK = 0.005


class TunnelCaps:
    """Counts open tunnels (attached, parked, or being dialed) per principal and in total."""

    def __init__(self, per_principal: int, total: int) -> None:
        self.per_principal = per_principal
        self.total = total
        self.open = 0
        self._counts: Counter[str] = Counter()

    def count(self, principal: str) -> int:
        return self._counts[principal]

    def refusal(self, principal: str) -> str | None:
        """Why one more tunnel for ``principal`` would exceed a cap, or None."""
        if self.open >= self.total:
            return f"too many tunnels on this relay (limit {self.total})"
        if self._counts[principal] >= self.per_principal:
            return f"too many tunnels for this principal (limit {self.per_principal})"
        return None

    def acquire(self, principal: str) -> str | None:
        """Reserve a tunnel for ``principal``; returns the refusal instead when at a cap."""
        reason = self.refusal(principal)
        if reason is None:
            self._counts[principal] += 1
            self.open += 1
        return reason

    def release(self, principal: str) -> None:
        self.open -= 1
        remaining = self._counts[principal] - 1
        if remaining > 0:
            self._counts[principal] = remaining
        else:
            del self._counts[principal]


def human_duration(seconds: float) -> str:
    """``600 s``, ``1.5 s``, ``8 h``, ``2 h 30 min``: for close reasons."""
    if seconds < 120 or seconds % 60:
        return f"{seconds:g} s"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes} min"
    return f"{hours} h" + (f" {minutes} min" if minutes else "")


def warning_advance(warning: float, limit: float) -> float:
    """How long before a limit its warning is recorded: ``warning``, at most a tenth of it."""
    return min(warning, limit / 10)


class SessionLimits:
    """The idle timeout and maximum session duration of one tunnel, across its attachments
    (the clocks keep running while it is parked). ``close(code, reason)`` ends the tunnel;
    ``warn(limit, seconds_left)`` records the advance warning."""

    def __init__(
        self,
        *,
        idle_timeout: float,
        max_duration: float,
        warning: float,
        last_activity: Callable[[], float],
        close: Callable[[int, str], None],
        warn: Callable[[str, float], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_activity = last_activity
        self._close = close
        self._warn = warn
        self.idle_timeout = idle_timeout
        self._idle_advance = warning_advance(warning, idle_timeout)
        self._idle_warned_for: float | None = None  # the activity time last warned about
        self._idle_handle: asyncio.TimerHandle | None = None
        self._handles: list[asyncio.TimerHandle] = []
        # Set when a limit has been reached: the tunnel must not be parked or resumed after it.
        self.expired: tuple[int, str] | None = None
        now = self._loop.time()
        if max_duration > 0:
            advance = warning_advance(warning, max_duration)
            if advance > 0:
                self._handles.append(
                    self._loop.call_at(
                        now + max_duration - advance, warn, "max_session_duration", advance
                    )
                )
            reason = f"maximum session duration {human_duration(max_duration)} reached"
            self._handles.append(
                self._loop.call_at(
                    now + max_duration, self._expire, CloseCode.MAX_SESSION_DURATION, reason
                )
            )
        if idle_timeout > 0:
            self._check_idle()

    def _expire(self, code: int, reason: str) -> None:
        if self.expired is None:
            self.expired = (code, reason)
            self._close(code, reason)

    def _check_idle(self) -> None:
        self._idle_handle = None
        last = self._last_activity()
        now = self._loop.time()
        deadline = last + self.idle_timeout
        if now >= deadline - _SLACK:
            self._expire(CloseCode.IDLE_TIMEOUT, f"idle for {human_duration(self.idle_timeout)}")
            return
        if self._idle_advance > 0 and self._idle_warned_for != last:
            warn_at = deadline - self._idle_advance
            if now < warn_at - _SLACK:
                self._idle_handle = self._loop.call_at(warn_at, self._check_idle)
                return
            self._idle_warned_for = last
            self._warn("idle_timeout", deadline - now)
        self._idle_handle = self._loop.call_at(deadline, self._check_idle)

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()
        if self._idle_handle is not None:
            self._idle_handle.cancel()


class Limits:
    """Starts the idle timeout and maximum session duration of each tunnel, when configured,
    and records their advance warnings (``limit_warning`` audit records)."""

    def __init__(
        self, settings: TunnelSettings, audit: AuditLog, on_warning: Callable[[], None]
    ) -> None:
        self._settings = settings
        self._audit = audit
        self._on_warning = on_warning

    def start(
        self,
        sid: str,
        principal: str,
        *,
        activity: Callable[[], float],
        close: Callable[[int, str], None],
    ) -> SessionLimits | None:
        """The limits of one tunnel (None when none is configured). ``activity``: loop time of
        its last DATA or EOF; ``close(code, reason)`` ends it when a limit is reached."""
        settings = self._settings
        if not settings.idle_timeout and not settings.max_session_duration:
            return None
        return SessionLimits(
            idle_timeout=settings.idle_timeout,
            max_duration=settings.max_session_duration,
            warning=settings.limit_warning,
            last_activity=activity,
            close=close,
            warn=functools.partial(self._warn, sid, principal),
        )

    def _warn(self, sid: str, principal: str, limit: str, seconds_left: float) -> None:
        self._audit.record(
            "limit_warning",
            tunnel_id=sid,
            principal=principal,
            limit=limit,
            closes_in=round(seconds_left, 3),
        )
        self._on_warning()
