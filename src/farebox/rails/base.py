"""What a rail is, and what the gate and a rail hand each other.

A rail is one way to pay (x402's schemes, MPP cards). For one request the gate asks each rail
what it adds to a 402 (:meth:`Rail.offer`), which rail the request's credential belongs to
(:meth:`Rail.recognizes`), and then that rail alone: check the credential without side effects
(:meth:`Rail.check`), take it (claim it once ever, and whatever must happen before the app runs),
settle it after a 2xx (:meth:`Rail.settle`), or give it back when nothing was delivered
(:meth:`Rail.abandon`). Settling returns an :class:`Outcome`, data the gate records: the claim's
move (by :mod:`farebox.protocol.lifecycle`), the log events, the PEAC record to sign, the headers
for the response or the refusal. A rail never renders a reply nor signs a record; the gate holds
the idempotency ids, the claim's bookkeeping and the replies, the same for every rail.

The values handed along a paid request are named tuples: built once or twice per request, they
cost a tuple, where a frozen dataclass costs a Python ``__setattr__`` call per field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from farebox.errors import PaymentError
from farebox.protocol.models import Challenge, Proof
from farebox.server.routes import RequestInfo, Route
from farebox.store.base import Event, Store

if TYPE_CHECKING:
    from farebox.server.idempotency import IdempotentRun, Withheld

__all__ = ["Admission", "Checked", "Headers", "Offered", "Outcome", "Rail", "Record"]

Headers = tuple[tuple[str, str], ...]
_NOTHING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Offered:
    """What a rail adds to a 402: header lines, plain-body methods, the challenge reference it
    names instead (an invoice), and instructions for the plain body."""

    headers: Headers = ()
    methods: tuple[dict[str, Any], ...] = ()
    reference: str | None = None
    instructions: str | None = None


class Checked(NamedTuple):
    """A credential its rail verified, not yet taken: whom it pays (``payee``) and who pays
    (``payer``), which scope the request's idempotency id; the key its claim takes; the x402
    proof when there is one (it may carry the idempotency id); and the rail's own ``payment``."""

    payee: str
    payer: str
    claim_key: str
    payment: Any
    proof: Proof | None = None


class Admission(NamedTuple):
    """A payment checked and taken by ``rail``: the app may run. ``owner`` holds the claim on
    ``claim_key``; ``payment`` is the rail's own (a verified proof, a charged card)."""

    rail: Rail
    route: Route
    request: RequestInfo
    challenge: Challenge
    owner: str
    claim_key: str
    payer: str
    payment: Any
    idempotency: IdempotentRun | None = None


class Record(NamedTuple):
    """The payment fields of the PEAC record a paid response carries (the gate signs it)."""

    rail: str
    amount_minor: int
    currency: str
    reference: str
    asset: str | None = None
    env: Literal["live", "test"] | None = None


Move = Literal["settle", "hold_pending", "release"]


class Outcome(NamedTuple):
    """What settling an admission came to.

    ``move`` is what becomes of the claim (the lifecycle table's ``settle``, ``hold_pending``, or
    ``release``; ``None`` when nothing changes: a late delivery of a payment already settled).
    Paid: ``record`` is the PEAC record to sign and ``headers`` go on the response before it. Not
    paid: ``problem`` says why and ``headers`` go on the refusal; ``withhold`` (for a payment that
    may have moved) is what a retry under the same idempotency id needs to learn its fate.
    ``events`` are logged with the outcome, ``payer`` names who paid in the receipt's log line.
    """

    move: Move | None
    transaction: str | None = None
    events: tuple[Event, ...] = ()
    record: Record | None = None
    headers: Headers = ()
    problem: PaymentError | None = None
    payer: str | None = None
    withhold: Mapping[str, Any] = _NOTHING


class Rail(Protocol):
    """One way to pay (see the module docstring). ``name`` is the rail's name in logs and
    records (``x402``, ``stripe``)."""

    name: str

    def recognizes(self, route: Route, request: RequestInfo) -> bool:
        """Whether ``request`` carries this rail's credential for ``route``."""
        ...

    async def offer(
        self, route: Route, request: RequestInfo, store: Store, *, outside_calls: bool
    ) -> Offered:
        """What a 402 of ``route`` adds for this rail. Without ``outside_calls`` it calls no
        outside service (a refusal after a failed settlement, or while a service is down)."""
        ...

    async def check(
        self, route: Route, request: RequestInfo, challenge: Challenge, store: Store, now: int
    ) -> Checked:
        """Verify the credential, taking nothing; raise :class:`PaymentError` to refuse it."""
        ...

    async def take(self, checked: Checked, store: Store, owner: str, now: int) -> Any:
        """Claim ``checked`` for ``owner`` (once ever) and do what must precede the app; the
        payment to admit. Raise to refuse; then nothing stays claimed."""
        ...

    async def settle(self, admission: Admission, store: Store) -> Outcome:
        """Settle a served payment; never raises for a payment refusal (it is the outcome's)."""
        ...

    async def deliver(self, admission: Admission, paid: Withheld) -> Outcome:
        """The outcome of delivering ``paid``, a payment of this rail that settled after its
        first response was withheld (``move`` ``None``)."""
        ...

    async def abandon(self, admission: Admission, store: Store) -> None:
        """Nothing was delivered for ``admission``: give back or undo what it took."""
        ...

    def problem_type(self, request: RequestInfo, code: str) -> str | None:
        """The problem ``type`` URI a refusal of ``request`` carries, if not farebox's own."""
        ...
