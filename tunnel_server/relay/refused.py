"""The one error of the relay's parts after the upgrade: a tunnel refused, with its close."""

from __future__ import annotations


class Refused(Exception):
    """A tunnel refused after the upgrade: ``code`` and ``message`` make the close, ``reason``
    (default: the message) goes to the audit record."""

    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or message
