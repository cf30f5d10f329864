"""Deeply nested JSON never reaches a recursive parser, however high the recursion limit is.

Importing py_ecc (under web3) raises sys.getrecursionlimit() to 100,000; json's C decoder trusts
that limit and overflows the C stack on deep input, killing the process. Each decoder farebox
exposes to the network is fed such input in a child process with that limit, so a regression
crashes the child, not the test run.
"""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import base64, sys
    sys.setrecursionlimit(100_000)
    from farebox.errors import FareboxError
    from farebox.protocol.challenge import read_challenge
    from farebox.protocol.x402 import decode_proof, decode_settlement
    from farebox.receipts import parse_issuer_config, parse_jwks, verify_receipt
    from farebox.receipts.ijson import parse_ijson

    deep = b"[" * 200_000 + b"]" * 200_000
    deep_obj = b'{"a":' * 60_000 + b"1" + b"}" * 60_000
    b64 = lambda raw: base64.b64encode(raw).decode()
    b64url = lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")
    header = b64url(b'{"typ":"interaction-record+jwt","alg":"EdDSA","kid":"k1234567"}')
    cases = [
        lambda: parse_ijson(deep),
        lambda: parse_ijson(deep_obj),
        lambda: verify_receipt(header + "." + b64url(deep[:190_000] + deep[-190_000:]) + "." + "A" * 86, b"\\0" * 32, now=0),
        lambda: read_challenge({}, deep[:30_000] + deep[-30_000:]),
        lambda: read_challenge({}, deep_obj[:60_000]),
        lambda: decode_proof(b64(deep[:3_000] + deep[-3_000:])),
        lambda: decode_settlement(b64(deep[:3_000] + deep[-3_000:])),
        lambda: parse_jwks(deep[:30_000] + deep[-30_000:]),
        lambda: parse_issuer_config(deep[:30_000] + deep[-30_000:]),
    ]
    for i, case in enumerate(cases):
        try:
            case()
        except FareboxError:
            pass
        else:
            raise SystemExit(f"case {i} accepted hostile nesting")
    print("survived", len(cases))
    """
)


def test_hostile_nesting_is_refused_not_fatal() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:] or f"child died with {result.returncode}"
    assert result.stdout.strip() == "survived 9"
