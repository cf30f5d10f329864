"""Verify one PAYMENT-SIGNATURE header end to end: farebox against the official x402 SDK.

Both sides do the same work on the same header: decode the base64 JSON, check the authorization
against the offer (recipient, amount, time window) and recover the signer. The official side is
composed of the x402 package's own functions (``decode_payment_signature_header``,
``hash_eip3009_authorization``, ``verify_eoa_signature``). It runs twice: in this process, where
eth-keys finds coincurve, and in a subprocess where coincurve cannot be imported, as in an
environment without it (eth-keys then falls back to pure Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench._harness import Timing, measure, report
from bench._official import AMOUNT, NETWORK, PAY_TO, official_check
from farebox.eth import EvmAccount
from farebox.protocol.models import Offer, Resource
from farebox.protocol.x402 import decode_proof, encode_proof, find_offer
from farebox.schemes import evm_exact

OFFER = Offer(
    scheme="exact",
    network=NETWORK,
    amount=AMOUNT,
    asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    pay_to=PAY_TO,
    max_timeout_seconds=300,
    extra={"name": "USDC", "version": "2"},
)
PAYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def make_header(now: int) -> str:
    account = EvmAccount.from_hex(PAYER_KEY)
    proof = evm_exact.make_proof(
        account, OFFER, now=now, nonce=os.urandom(32), resource=Resource("http://api.test/weather")
    )
    return encode_proof(proof)


def farebox_check(header: str, now: int) -> str:
    proof = decode_proof(header)
    return evm_exact.verify(proof, find_offer(proof, [OFFER]), now=now).payer


def _official_in_subprocess(header: str, now: int) -> Timing:
    # Run this same module with coincurve made unimportable before anything imports eth-keys.
    code = (
        "import sys, json; sys.modules['coincurve'] = None\n"
        "from bench._harness import measure\n"
        "from bench._official import official_check\n"
        "from eth_keys.backends import get_backend\n"
        f"assert type(get_backend()).__name__ == 'NativeECCBackend'\n"
        f"t = measure('x', lambda: official_check({header!r}, {now}), calls=300, batches=15)\n"
        "print(json.dumps([t.median, t.calls]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=600
    )
    median, calls = json.loads(out.stdout.strip().splitlines()[-1])
    return Timing("official x402 2.25, no coincurve", median, calls)


def run() -> None:
    from eth_keys.backends import get_backend

    now = int(time.time())
    header = make_header(now)
    # Same answer on both sides, or the comparison means nothing.
    assert farebox_check(header, now) == official_check(header, now)
    assert type(get_backend()).__name__ == "CoinCurveECCBackend"
    subject = measure("farebox", lambda: farebox_check(header, now), calls=20000, batches=21)
    with_cc = measure(
        "official x402 2.25, coincurve", lambda: official_check(header, now), calls=3000
    )
    without_cc = _official_in_subprocess(header, now)
    report(
        "Verify one PAYMENT-SIGNATURE header (decode + checks + recover)",
        subject,
        [with_cc, without_cc],
    )
    target = "met" if subject.median <= 100e-6 else "MISSED"
    print(
        f"  target: median <= 100 us: {target}; >= 4x the official check with coincurve: "
        f"{'met' if with_cc.median / subject.median >= 4 else 'MISSED'}"
    )


if __name__ == "__main__":
    run()
