"""A FAKE facilitator for tests: settles instantly, in memory, with no chain.

It stands where :class:`~farebox.facilitator.local.LocalFacilitator` stands (the
:class:`~farebox.facilitator.base.Facilitator` protocol) and keeps the rules an EIP-3009 token
keeps, so that a test of a paid app meets the outcomes a real chain gives: an authorization moves
money once ever (a second settle of its nonce is refused with
``invalid_exact_evm_nonce_already_used``, as the token refuses it), an expired one is refused, and,
when the fake is given balances, an underfunded payer is refused. It checks no signature (the gate
did, offline, before it called the facilitator) and moves no money anywhere.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from farebox.errors import PaymentError
from farebox.eth import keccak256
from farebox.protocol.lifecycle import MAYBE_MOVED, may_have_moved
from farebox.protocol.models import Offer, Settlement, VerifiedProof
from farebox.schemes import evm_exact

__all__ = ["FakeFacilitator", "FakeTransfer", "fake_transaction"]

_NONCE_USED = "invalid_exact_evm_nonce_already_used"
_EXPIRED = "invalid_exact_evm_payload_authorization_valid_before"
_NOT_YET_VALID = "invalid_exact_evm_payload_authorization_valid_after"
_UNDERFUNDED = "invalid_exact_evm_insufficient_balance"
_PENDING = "settlement_pending"
# Keeps a fake transaction hash from ever equalling a hash computed for another purpose.
_TRANSACTION_DOMAIN = b"farebox.testing fake transaction\0"


def fake_transaction(verified: VerifiedProof) -> str:
    """The fake transaction hash of ``verified``: ``0x`` and 64 hex digits, a function of the
    whole authorization (network, token and every signed field), so the same proof always gets
    the same hash and two authorizations never share one."""
    if isinstance(verified, evm_exact.VerifiedEvmProof):
        name = bytes.fromhex(evm_exact.authorization_id(verified))
    else:
        name = verified.claim_key.encode("utf-8")
    return "0x" + keccak256(_TRANSACTION_DOMAIN + name).hex()


@dataclass(frozen=True, slots=True)
class FakeTransfer:
    """One payment the fake facilitator settled (or left pending): what moved, from whom to whom.

    ``amount`` is in atomic units of ``asset``; ``claim_key`` names the authorization as the
    gate's store does.
    """

    transaction: str
    network: str
    asset: str
    payer: str
    pay_to: str
    amount: int
    claim_key: str
    verified: VerifiedProof


@dataclass(frozen=True, slots=True)
class _Outcome:
    stage: Literal["verify", "settle"]
    code: str
    message: str | None = None
    broadcast: bool = False


class FakeFacilitator:
    """A FAKE facilitator for tests, never for real money: verifies nothing on a chain and
    settles at once with :func:`fake_transaction` as the hash.

    It supports ``exact`` offers on every ``eip155`` network, or only on ``networks`` when given.
    ``balances`` (address -> atomic units, any asset) makes it track funds: a payer must hold the
    amount, and a settlement moves it to the payee; without it every payer can pay. ``clock``
    (Unix seconds) decides when an authorization has expired.

    What it did is kept: :attr:`settled` and :attr:`pending` (:class:`FakeTransfer`, oldest first)
    and :attr:`calls` (``("verify" | "settle", claim key)`` in order). What it does next can be
    chosen, one call at a time, in the order given: :meth:`fail_next_settle`,
    :meth:`pend_next_settle` and :meth:`fail_next_verify`.

    The rules it keeps are the token's: an authorization's nonce moves money once ever, so a
    second settle of a settled or pending one raises ``invalid_exact_evm_nonce_already_used``
    (nothing broadcast), and so does a verify; an authorization outside its window raises
    ``invalid_exact_evm_payload_authorization_valid_after`` or ``..._valid_before``. A failure
    after which money may have moved (:func:`~farebox.protocol.lifecycle.may_have_moved`:
    ``settlement_pending``, a transfer-event mismatch) counts as a broadcast that lands: its
    authorization is spent, its amount moved, and it is listed in :attr:`pending`.
    """

    def __init__(
        self,
        *,
        networks: Iterable[str] | None = None,
        balances: Mapping[str, int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.networks = None if networks is None else frozenset(networks)
        self.clock = clock
        self.settled: list[FakeTransfer] = []
        self.pending: list[FakeTransfer] = []
        self.calls: list[tuple[str, str]] = []
        self._balances = (
            None if balances is None else {a.lower(): int(v) for a, v in balances.items()}
        )
        self._spent: set[str] = set()
        self._next: deque[_Outcome] = deque()
        # Threads may share one fake (a WSGI server runs each request on its own).
        self._lock = threading.Lock()

    # --- steering -------------------------------------------------------------------------------

    def fail_next_settle(
        self, code: str, message: str | None = None, *, broadcast: bool = False
    ) -> None:
        """Make the next settle fail with ``code``.

        Without ``broadcast`` it raises :class:`~farebox.errors.PaymentError` (nothing was sent,
        as when the ledger is down: ``ledger_unavailable``, or the token would revert); with it,
        it returns a failed :class:`~farebox.protocol.models.Settlement` carrying the transaction
        hash (sent, mined and reverted: the authorization stays unused). A code after which money
        may have moved (``invalid_exact_evm_transfer_event_mismatch``) is always a broadcast, and
        spends the authorization as :meth:`pend_next_settle` does.
        """
        self._queue(_Outcome("settle", code, message, broadcast))

    def pend_next_settle(self, message: str | None = None) -> None:
        """Make the next settle answer ``settlement_pending``: broadcast, not confirmed in time."""
        message = message or "broadcast, not confirmed in time"
        self._queue(_Outcome("settle", _PENDING, message, broadcast=True))

    def fail_next_verify(self, code: str, message: str | None = None) -> None:
        """Make the next verify raise :class:`~farebox.errors.PaymentError` with ``code``."""
        self._queue(_Outcome("verify", code, message))

    def _queue(self, outcome: _Outcome) -> None:
        with self._lock:
            self._next.append(outcome)

    def _take(self, stage: str) -> _Outcome | None:
        # The first outcome queued for this stage; the other stage's stay queued in order.
        for outcome in self._next:
            if outcome.stage == stage:
                self._next.remove(outcome)
                return outcome
        return None

    # --- state ----------------------------------------------------------------------------------

    def balance_of(self, address: str) -> int | None:
        """What ``address`` holds, or ``None`` when the fake does not track balances."""
        if self._balances is None:
            return None
        with self._lock:
            return self._balances.get(address.lower(), 0)

    def is_spent(self, verified: VerifiedProof) -> bool:
        """Whether ``verified``'s authorization has moved money (settled or pending)."""
        with self._lock:
            return verified.claim_key in self._spent

    # --- the Facilitator protocol ---------------------------------------------------------------

    def supports(self, offer: Offer) -> bool:
        """``exact`` offers on ``eip155`` networks (or on :attr:`networks`, when given)."""
        if offer.scheme != evm_exact.SCHEME:
            return False
        if self.networks is not None:
            return offer.network in self.networks
        return offer.network.startswith("eip155:")

    async def verify(self, verified: VerifiedProof) -> None:
        """Check the authorization as a simulation would: unused, unexpired, funded."""
        with self._lock:
            self.calls.append(("verify", verified.claim_key))
            forced = self._take("verify")
            if forced is not None:
                raise PaymentError(forced.code, forced.message, payer=verified.payer)
            self._check(verified)

    async def settle(self, verified: VerifiedProof) -> Settlement:
        """Settle at once; every outcome is a :class:`Settlement`, except a refusal before
        anything was sent, which raises :class:`~farebox.errors.PaymentError` (as the ledger's
        own simulation right before it signs)."""
        with self._lock:
            self.calls.append(("settle", verified.claim_key))
            forced = self._take("settle")
            # A code that may have moved money (settlement_pending...) is a broadcast's outcome.
            if forced is not None and not forced.broadcast and forced.code not in MAYBE_MOVED:
                raise PaymentError(forced.code, forced.message, payer=verified.payer)
            self._check(verified)
            offer = verified.offer
            settlement = Settlement(
                success=forced is None,
                network=offer.network,
                transaction=fake_transaction(verified),
                payer=verified.payer,
                error_reason=None if forced is None else forced.code,
                error_message=None if forced is None else forced.message,
                amount=offer.amount,
            )
            if may_have_moved(settlement):
                self._move(verified, settlement)
            return settlement

    def _move(self, verified: VerifiedProof, settlement: Settlement) -> None:
        # The token marks the authorization used and moves the amount, in one transaction.
        offer = verified.offer
        self._spent.add(verified.claim_key)
        if self._balances is not None:
            payer, payee = verified.payer.lower(), offer.pay_to.lower()
            self._balances[payer] -= offer.amount
            self._balances[payee] = self._balances.get(payee, 0) + offer.amount
        transfer = FakeTransfer(
            settlement.transaction,
            offer.network,
            offer.asset,
            verified.payer,
            offer.pay_to,
            offer.amount,
            verified.claim_key,
            verified,
        )
        (self.settled if settlement.success else self.pending).append(transfer)

    def _check(self, verified: VerifiedProof) -> None:
        """The token's refusals, in its order (FiatTokenV2: not yet valid, expired, used or
        canceled, then the transfer's balance)."""
        payer = verified.payer
        now = self.clock()
        if (
            isinstance(verified, evm_exact.VerifiedEvmProof)
            and now <= verified.authorization.valid_after
        ):
            raise PaymentError(_NOT_YET_VALID, "authorization is not yet valid", payer=payer)
        valid_until = verified.valid_until
        if valid_until is not None and now >= valid_until:
            raise PaymentError(_EXPIRED, "authorization is expired", payer=payer)
        if verified.claim_key in self._spent:
            raise PaymentError(_NONCE_USED, "authorization is used or canceled", payer=payer)
        if self._balances is not None:
            held = self._balances.get(payer.lower(), 0)
            if held < verified.offer.amount:
                raise PaymentError(_UNDERFUNDED, "transfer amount exceeds balance", payer=payer)
