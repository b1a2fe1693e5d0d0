"""The policy in force: one holder that every decider reads (the relay's admission and its
continuous re-authorization, HTTP mode, the admin surface), swapped atomically on reload, with
subscribers told of each swap so they re-decide what is open."""

from __future__ import annotations

from collections.abc import Callable

from .policy import Policy

PolicyListener = Callable[[Policy], object]


class CurrentPolicy:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._listeners: list[PolicyListener] = []

    def subscribe(self, listener: PolicyListener) -> None:
        """``listener(new_policy)`` after every swap, in subscription order."""
        self._listeners.append(listener)

    def replace(self, policy: Policy) -> None:
        self.policy = policy
        for listener in self._listeners:
            listener(policy)
