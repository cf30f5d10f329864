"""The protocol's values: what a server offers, what a client proves, what settlement returns.

Frozen dataclasses, independent of any wire version: the codecs in :mod:`farebox.protocol.x402`
and :mod:`farebox.protocol.plain` translate them to and from bytes. Amounts are ints of atomic units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "EMPTY",
    "Challenge",
    "Offer",
    "Proof",
    "Resource",
    "Settlement",
    "VerifiedProof",
    "frozen",
]

EMPTY: Mapping[str, Any] = MappingProxyType({})


def frozen(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of ``value`` (a copy of it), shared :data:`EMPTY` for an empty one."""
    if not value:
        return EMPTY
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


@dataclass(frozen=True, slots=True)
class Offer:
    """One way to pay for a resource (x402 ``PaymentRequirements``).

    ``extra`` holds scheme data such as the EIP-712 domain (``name``, ``version``).
    """

    scheme: str
    network: str
    amount: int
    asset: str
    pay_to: str
    max_timeout_seconds: int = 300
    extra: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", frozen(self.extra))


@dataclass(frozen=True, slots=True)
class Resource:
    """What is being paid for (x402 ``ResourceInfo``)."""

    url: str
    description: str = ""
    mime_type: str = ""


@dataclass(frozen=True, slots=True)
class Challenge:
    """A 402 answer: the offers for one resource, renderable in every wire form at once.

    ``reference`` is unique per challenge and shows in the plain JSON body; ``error`` is the
    x402 ``error`` text (why payment is required, or why the last proof was refused).
    """

    resource: Resource
    accepts: tuple[Offer, ...]
    error: str = "Payment required"
    reference: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=lambda: EMPTY)
    x402_version: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "accepts", tuple(self.accepts))
        object.__setattr__(self, "extensions", frozen(self.extensions))


@dataclass(frozen=True, slots=True)
class Proof:
    """A payment proof as a client sent it (x402 ``PaymentPayload``), not yet verified.

    In v2 ``accepted`` is the client's copy of the offer it chose, and ``scheme``/``network`` are
    taken from it; v1 carries only ``scheme`` and ``network``. ``payload`` is scheme-specific and is
    read by the scheme's verifier.
    """

    x402_version: int
    scheme: str
    network: str
    payload: Mapping[str, Any]
    accepted: Offer | None = None
    resource: Resource | None = None
    extensions: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", frozen(self.payload))
        object.__setattr__(self, "extensions", frozen(self.extensions))


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """A proof that passed its scheme's offline checks against the server's own ``offer``.

    Only this type reaches settlement. ``claim_key`` names the underlying authorization (for EVM:
    chain, token, payer and nonce), so a store can accept it once ever, whatever its encoding.
    """

    proof: Proof
    offer: Offer
    payer: str
    claim_key: str
    verified_at: int

    @property
    def valid_until(self) -> int | None:
        """The last unix second at which the authorization could still move money, when the
        scheme says (until then a claim on it that did not settle may yet settle)."""
        return None


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of settling a payment (x402 ``SettleResponse``).

    ``transaction`` is the ledger's reference (a transaction hash), empty when nothing was sent.
    A broadcast that was not confirmed in time is ``success=False`` with ``error_reason``
    ``settlement_pending`` and the transaction hash: not settled, not failed.
    """

    success: bool
    network: str
    transaction: str = ""
    payer: str | None = None
    error_reason: str | None = None
    error_message: str | None = None
    amount: int | None = None
    extensions: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", frozen(self.extensions))

    @property
    def pending(self) -> bool:
        return not self.success and self.error_reason == "settlement_pending"
