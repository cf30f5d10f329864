"""One exception tree for farebox.

Everything farebox raises on purpose derives from :class:`FareboxError`. Payment failures carry a
machine-readable reason code (the x402 spelling where x402 has one), an HTTP status hint and a human
message, and render as RFC 9457 problem details. Receipt (PEAC) failures carry the PEAC ``E_*`` code.
Errors from third-party libraries are translated at the boundary that calls them (``raise ... from exc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "PROBLEM_TYPE_BASE",
    "REASONS",
    "ConfigError",
    "FareboxError",
    "PaymentError",
    "Reason",
    "ReceiptError",
    "reason_for",
]

# RFC 9457 wants a URI for `type`; farebox owns no domain, so a URN names the problem kind stably.
PROBLEM_TYPE_BASE = "urn:farebox:problem:"


class FareboxError(Exception):
    """Root of every error farebox raises on purpose."""


class ConfigError(FareboxError, ValueError):
    """A configuration or programming mistake: a bad price, an unknown asset, a malformed route."""


@dataclass(frozen=True, slots=True)
class Reason:
    """What a reason code means: the HTTP status a server answers with, and a short title."""

    code: str
    status: int
    title: str


def _table(*rows: tuple[str, int, str]) -> Mapping[str, Reason]:
    return MappingProxyType({code: Reason(code, status, title) for code, status, title in rows})


# The registry. x402 codes keep their spec (and Python SDK 2.25) spelling so that facilitators and
# clients of other implementations read them; farebox adds its own only where x402 has none.
# 400 is a malformed request (the proof cannot be read); 402 is "payment missing or not accepted";
# 409 and 503 are the idempotency and infrastructure cases.
REASONS: Mapping[str, Reason] = _table(
    # Reading the proof.
    ("invalid_payload", 400, "Malformed payment payload"),
    ("invalid_x402_version", 400, "Unsupported x402 version"),
    ("payload_too_large", 400, "Payment header too large"),
    # Matching the proof to an offer.
    ("invalid_payment_requirements", 402, "No matching payment requirements"),
    ("unsupported_scheme", 402, "Unsupported payment scheme"),
    ("invalid_scheme", 402, "Invalid payment scheme"),
    ("invalid_network", 402, "Unsupported network"),
    ("network_mismatch", 402, "Network does not match the offer"),
    # The exact scheme on EVM (x402 spellings).
    ("missing_eip712_domain", 402, "Offer lacks the EIP-712 domain (extra.name, extra.version)"),
    ("invalid_exact_evm_failed_to_get_network_config", 402, "Network is not an EVM chain"),
    ("invalid_exact_evm_payload_signature", 402, "Signature does not match the payer"),
    ("invalid_exact_evm_payload_recipient_mismatch", 402, "Authorization pays someone else"),
    ("invalid_exact_evm_payload_authorization_value_mismatch", 402, "Authorized amount differs"),
    ("invalid_exact_evm_payload_authorization_valid_before", 402, "Authorization expired"),
    ("invalid_exact_evm_payload_authorization_valid_after", 402, "Authorization not yet valid"),
    ("invalid_exact_evm_insufficient_balance", 402, "Payer's balance is too low"),
    ("insufficient_funds", 402, "Payer's balance is too low"),
    ("invalid_exact_evm_nonce_already_used", 402, "Authorization already used or canceled"),
    ("invalid_exact_evm_transaction_simulation_failed", 402, "Transfer simulation failed"),
    ("invalid_exact_evm_transfer_event_mismatch", 402, "Settlement produced no matching transfer"),
    ("invalid_exact_evm_token_name_mismatch", 402, "Token EIP-712 name differs"),
    ("invalid_exact_evm_token_version_mismatch", 402, "Token EIP-712 version differs"),
    ("asset_not_deployed_contract", 402, "No contract is deployed at the asset address"),
    ("invalid_exact_evm_eip3009_not_supported", 402, "The asset does not support EIP-3009"),
    ("invalid_exact_evm_failed_to_get_asset_info", 402, "The asset could not be read"),
    ("transaction_failed", 402, "Settlement transaction failed"),
    ("settlement_pending", 402, "Settlement broadcast but not yet confirmed"),
    ("invalid_transaction_state", 402, "Invalid transaction state"),
    ("unexpected_verify_error", 402, "Unexpected verification error"),
    ("unexpected_settle_error", 402, "Unexpected settlement error"),
    # The MPP "Payment" scheme (card payments).
    ("invalid_challenge", 402, "Payment challenge not issued here or altered"),
    ("payment_expired", 402, "Payment challenge expired"),
    ("card_declined", 402, "The card was declined"),
    ("card_action_required", 402, "The card needs the payer's action (3-D Secure)"),
    ("card_token_invalid", 402, "Payment token unknown, expired, used or revoked"),
    ("card_payment_failed", 402, "Card payment did not succeed as requested"),
    ("card_payment_not_found", 402, "Unknown card payment"),
    ("card_payment_mismatch", 402, "Card payment amount, currency or reference differs"),
    ("card_payment_refunded", 402, "Card payment refunded or disputed"),
    ("refund_refused", 409, "Refund refused: more than remains, or the payment failed"),
    ("refund_in_progress", 409, "Another refund of this payment is running"),
    ("receipt_not_found", 404, "No record with that receipt reference"),
    ("invoice_conflict", 409, "An invoice with that reference or PaymentIntent exists"),
    ("invalid_claim", 400, "Not a claim an operator may resolve by hand now"),
    # farebox's own.
    ("proof_replayed", 402, "Payment proof already used"),
    ("budget_exceeded", 402, "Agent budget refuses this payment"),
    ("policy_refused", 402, "Agent policy refuses this payment"),
    ("no_payable_offer", 402, "No offer the agent can pay"),
    ("receipt_invalid", 502, "Server receipt failed verification"),
    ("payment_redirected", 502, "The paid request was redirected; the proof was not sent on"),
    ("payment_unguarded", 502, "No guard keeps the payment proof from a redirect; nothing signed"),
    ("idempotency_conflict", 409, "Idempotency key reused with another request"),
    ("idempotency_in_progress", 409, "A request with this idempotency key is still running"),
    ("ledger_unavailable", 503, "Ledger unavailable"),
    ("store_unavailable", 503, "Store unavailable"),
    ("facilitator_unavailable", 503, "Facilitator unavailable"),
)


def reason_for(code: str) -> Reason:
    """The registry entry for ``code``; codes from other implementations are opaque and get 402."""
    found = REASONS.get(code)
    if found is not None:
        return found
    return Reason(code, 402, code.replace("_", " ").capitalize())


class PaymentError(FareboxError):
    """A payment was missing, malformed or not accepted.

    ``code`` is machine-readable and stable; ``status`` is the HTTP status a server answers with;
    ``message`` is for humans and never contains a secret. ``payer`` is the paying address when known.
    """

    code: str
    status: int
    message: str
    payer: str | None

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        status: int | None = None,
        payer: str | None = None,
    ) -> None:
        reason = reason_for(code)
        self.code = code
        self.status = status if status is not None else reason.status
        self.message = message or reason.title
        self.payer = payer
        super().__init__(f"{code}: {self.message}")

    @property
    def title(self) -> str:
        return reason_for(self.code).title

    def to_problem(self, instance: str | None = None, **extra: Any) -> dict[str, Any]:
        """This error as an RFC 9457 ``application/problem+json`` document."""
        problem: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.message,
            "code": self.code,
        }
        if instance is not None:
            problem["instance"] = instance
        problem.update(extra)
        return problem


class ReceiptError(FareboxError):
    """A PEAC record failed to issue or verify.

    ``code`` is the PEAC ``E_*`` code of the first failing check in the reference order;
    ``details`` may name a sub-code (``parse_code``, the rule that failed) and a JSON ``pointer``.
    """

    code: str
    message: str
    details: Mapping[str, Any]

    def __init__(
        self, code: str, message: str = "", details: Mapping[str, Any] | None = None
    ) -> None:
        self.code = code
        self.message = message or code
        self.details = MappingProxyType(dict(details or {}))
        super().__init__(f"{code}: {self.message}")
