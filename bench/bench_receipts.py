"""Benchmark: issue + verify of one PEAC payment record, against bare Ed25519 sign + verify.

The baseline signs and verifies the same payload bytes with ``cryptography`` and nothing else, so
the ratio is the price of farebox's checks (serialization, I-JSON gate, kernel constraints, claim
schema, header policy, the Ed25519 prechecks). Target: 3,000 issue + verify per second.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable for bench._harness
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._harness import measure, report
from farebox.receipts import (
    SigningKey,
    issue_receipt,
    payment_claims,
    uuid7,
    verify_receipt,
)
from farebox.receipts.jws import serialize_json

NOW = 1_767_225_600


def run() -> None:
    """Measure and print the receipts benchmark."""
    key = SigningKey.from_seed(bytes(range(32)), "bench-key")
    public_key = key.public_key
    counter = itertools.count()

    def claims() -> dict[str, object]:
        n = next(counter)
        return payment_claims(
            iss="https://api.example.com",
            iat=NOW,
            jti=uuid7(NOW * 1000 + n, n.to_bytes(10, "big")),
            sub="https://api.example.com/v1/report/42",
            occurred_at="2025-12-31T23:59:58Z",
            payment_rail="x402",
            amount_minor=250_000,
            currency="USDC",
            asset="eip155:8453/erc20:0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            env="test",
            event="settlement",
            reference="0x" + "ab" * 32,
        )

    def issue_and_verify() -> None:
        issued = issue_receipt(claims(), key)
        verify_receipt(issued.jws, public_key, now=NOW)

    raw_key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw_public = raw_key.public_key()
    payload = serialize_json(claims())

    def bare_sign_and_verify() -> None:
        raw_public.verify(raw_key.sign(payload), payload)

    subject = measure("farebox issue+verify (PEAC payment record)", issue_and_verify, calls=3000)
    baseline = measure(
        "cryptography Ed25519 sign+verify (same payload)", bare_sign_and_verify, calls=3000
    )
    report("PEAC receipts: issue + verify", subject, [baseline])
    print(
        f"  overhead of farebox's checks: {(subject.median - baseline.median) * 1e6:.1f} us per record"
    )


if __name__ == "__main__":
    run()
