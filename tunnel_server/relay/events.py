"""What the relay reports as it works (a decision's latency, a tunnel's end, a revocation that
took effect), fanned out to whoever subscribed: the metrics, when they are configured."""

from __future__ import annotations

from typing import Literal, Protocol

from .session import Session

Origin = Literal["local", "remote"]


class RelayObserver(Protocol):
    def observe_decision(self, seconds: float) -> None: ...

    def session_ended(self, session: Session, duration_seconds: float) -> None: ...

    def revocation_applied(self, origin: Origin) -> None: ...


class RelayEvents:
    """The relay's parts report here; observers subscribe (none by default)."""

    def __init__(self) -> None:
        self._observers: list[RelayObserver] = []

    def subscribe(self, observer: RelayObserver) -> None:
        self._observers.append(observer)

    def decision(self, seconds: float) -> None:
        for observer in self._observers:
            observer.observe_decision(seconds)

    def ended(self, session: Session, duration_seconds: float) -> None:
        for observer in self._observers:
            observer.session_ended(session, duration_seconds)

    def revocation(self, origin: Origin) -> None:
        for observer in self._observers:
            observer.revocation_applied(origin)
