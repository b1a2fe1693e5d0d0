"""What a refused caller is told, and what an admin can look up afterwards. Every refusal of a
tunnel gets a reference, written in its audit record and, on the native subprotocol, in the close
reason with a category (``policy; ref=7f3a0c9e1b2d``), as much as the operator lets callers see
(``tunnel.denial_detail``). The last refusals are kept in memory with their policy request, so
that ``tunnel-server policy explain --reference REF`` can say why without the caller's token.
The IAP subprotocol keeps IAP's codes and texts (gcloud shows them as they are)."""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from tunnel_protocol import CloseCode

from ..access.policy import AccessRequest

Detail = Literal["minimal", "reason"]

# Kept for explanations; older ones are only in the audit log.
KEEP = 10_000


@dataclass(frozen=True, slots=True)
class Denial:
    reference: str
    category: str  # policy, access-level, port, unknown-target, revoked, expired
    request: AccessRequest | None  # None when no policy request was made (unknown target)
    at: float
    reason: str  # the full reason, as audited (never sent to the caller)


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    message: str


class Denials:
    def __init__(self, detail: Detail = "reason", unknown_target: Detail = "minimal") -> None:
        self._detail = detail
        self._unknown_target = unknown_target
        self._kept: OrderedDict[str, Denial] = OrderedDict()

    def record(
        self, category: str, reason: str, request: AccessRequest | None, at: float
    ) -> Denial:
        denial = Denial(secrets.token_hex(6), category, request, at, reason)
        self._kept[denial.reference] = denial
        if len(self._kept) > KEEP:
            self._kept.popitem(last=False)
        return denial

    def get(self, reference: str) -> Denial | None:
        return self._kept.get(reference)

    def close(self, denial: Denial, *, native: bool, iap_code: int, iap_message: str) -> Close:
        """The close for this refusal: IAP's own for gcloud, typed with a reference for native
        clients. An unknown target is told apart from a policy refusal only when the operator
        allows it (naming it tells a caller which targets exist)."""
        if not native:
            return Close(iap_code, iap_message)
        unknown = denial.category == "unknown-target"
        detail = self._unknown_target if unknown else self._detail
        if detail == "minimal":
            return Close(CloseCode.NOT_AUTHORIZED, f"not authorized; ref={denial.reference}")
        code = CloseCode.LOOKUP_FAILED if unknown else CloseCode.NOT_AUTHORIZED
        return Close(code, f"{denial.category}; ref={denial.reference}")
