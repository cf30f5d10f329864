import pytest

from farebox.errors import PROBLEM_TYPE_BASE, REASONS, FareboxError, PaymentError, reason_for


def test_payment_error_renders_rfc9457_with_its_code() -> None:
    error = PaymentError("invalid_exact_evm_payload_signature", payer="0xabc")
    problem = error.to_problem(instance="/weather", reference="ch_1")
    assert problem == {
        "type": PROBLEM_TYPE_BASE + "invalid_exact_evm_payload_signature",
        "title": "Signature does not match the payer",
        "status": 402,
        "detail": "Signature does not match the payer",
        "code": "invalid_exact_evm_payload_signature",
        "instance": "/weather",
        "reference": "ch_1",
    }
    assert isinstance(error, FareboxError)
    assert error.payer == "0xabc"


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("invalid_payload", 400),
        ("invalid_x402_version", 400),
        ("invalid_exact_evm_insufficient_balance", 402),
        ("invalid_exact_evm_nonce_already_used", 402),
        ("invalid_network", 402),
        ("proof_replayed", 402),
        ("budget_exceeded", 402),
        ("idempotency_conflict", 409),
        ("ledger_unavailable", 503),
    ],
)
def test_registry_statuses(code: str, status: int) -> None:
    assert PaymentError(code).status == status
    assert REASONS[code].status == status


def test_codes_from_other_implementations_are_opaque_402s() -> None:
    error = PaymentError("invalid_exact_svm_payload_memo_mismatch", "from a facilitator")
    assert (error.status, error.message) == (402, "from a facilitator")
    assert reason_for("unknown_thing").title == "Unknown thing"
    assert PaymentError("invalid_payload", status=413).status == 413
