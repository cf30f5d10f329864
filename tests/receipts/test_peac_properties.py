"""Property tests: hostile input raises only ReceiptError; issue -> verify round-trips."""

from __future__ import annotations

import contextlib
import json
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from farebox.errors import ReceiptError
from farebox.receipts import SigningKey, issue_receipt, payment_claims, verify_receipt
from farebox.receipts.ijson import MAX_SAFE_INTEGER, ijson_error, parse_ijson
from farebox.receipts.jws import b64url_encode, decode_compact, peek_compact

KEY = SigningKey.from_seed(bytes(range(32)), "prop-key")
NOW = 1_767_225_600

b64_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.+/ ")
json_bytes = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
).map(lambda v: json.dumps(v).encode())


def verify_only_receipt_errors(jws: Any) -> None:
    # Anything but ReceiptError escapes and fails the test.
    with contextlib.suppress(ReceiptError):
        verify_receipt(jws, KEY.public_key, now=NOW)


@given(st.text(max_size=300))
def test_random_strings_raise_only_receipt_error(text: str) -> None:
    verify_only_receipt_errors(text)
    with contextlib.suppress(ReceiptError):
        peek_compact(text)


@given(st.lists(b64_text, min_size=1, max_size=4).map(".".join))
def test_random_compact_shapes_raise_only_receipt_error(text: str) -> None:
    verify_only_receipt_errors(text)


@given(st.binary(max_size=200), st.binary(max_size=200), st.binary(max_size=80))
def test_random_segments_raise_only_receipt_error(
    header: bytes, payload: bytes, sig: bytes
) -> None:
    verify_only_receipt_errors(
        f"{b64url_encode(header)}.{b64url_encode(payload)}.{b64url_encode(sig)}"
    )


@given(json_bytes, json_bytes)
def test_random_json_segments_raise_only_receipt_error(header: bytes, payload: bytes) -> None:
    jws = f"{b64url_encode(header)}.{b64url_encode(payload)}.{b64url_encode(bytes(64))}"
    verify_only_receipt_errors(jws)
    with contextlib.suppress(ReceiptError):
        decode_compact(jws)


@given(st.binary(max_size=120) | json_bytes)
def test_fast_gate_and_exact_scanner_agree(raw: bytes) -> None:
    # parse_ijson (json + hooks) and ijson_error (the byte scanner) must accept the same documents.
    try:
        parse_ijson(raw)
        accepted = True
    except ReceiptError as err:
        accepted = False
        code = err.code
    scanner = ijson_error(raw)
    assert accepted == (scanner is None)
    if not accepted and code != "E_CONSTRAINT_VIOLATION":
        assert code == scanner


@given(
    st.integers(min_value=-MAX_SAFE_INTEGER - 10, max_value=MAX_SAFE_INTEGER + 10)
    | st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from(["", ".0", ".5", ".1", ".999", "e0", "E+1", "e-3", "0e-1", "e00"]),
)
def test_number_range_matches_exact_arithmetic(n: int, suffix: str) -> None:
    literal = f"{n}{suffix}"
    # 0 followed by "0e-1" is "00e-1": no JSON number (a leading zero), though Decimal reads it.
    assume(not literal.lstrip("-").startswith("00"))
    in_range = abs(Fraction(Decimal(literal))) <= MAX_SAFE_INTEGER
    assert (ijson_error(literal.encode()) is None) is in_range
    if in_range:
        exact, value = Fraction(Decimal(literal)), parse_ijson(literal.encode())
        if exact.denominator == 1:  # integral values come back as int, as JavaScript sees them
            assert type(value) is int
            assert value == exact
        else:
            assert value == float(literal)
    else:
        with pytest.raises(ReceiptError) as err:
            parse_ijson(literal.encode())
        assert err.value.code == "E_IJSON_NUMBER_OUT_OF_RANGE"


safe_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffe\uffff"),
    min_size=1,
    max_size=40,
).filter(lambda s: not any(0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE for c in s))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(
    amount=st.integers(min_value=-(10**30), max_value=10**30),
    currency=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=16),
    rail=safe_text.filter(lambda s: len(s) <= 128),
    reference=safe_text,
    sub=safe_text,
    iat=st.integers(min_value=0, max_value=NOW),
    jti=safe_text,
    env=st.sampled_from(["live", "test", None]),
)
def test_issue_verify_round_trip(
    amount: int, currency: str, rail: str, reference: str, sub: str, iat: int, jti: str, env: Any
) -> None:
    assume(len(jti.encode("utf-16-le")) // 2 <= 256)
    claims = payment_claims(
        iss=KEY.did_key,
        iat=iat,
        jti=jti,
        sub=sub,
        payment_rail=rail,
        amount_minor=amount,
        currency=currency,
        reference=reference,
        env=env,
    )
    issued = issue_receipt(claims, KEY)
    result = verify_receipt(issued.jws, None, now=NOW, issuer=KEY.did_key)
    assert result.claims == claims
    assert result.warnings == ()
    assert result.receipt_ref == issued.receipt_ref
