import dataclasses
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farebox.errors import PaymentError
from farebox.eth import SECP256K1_N, EvmAccount
from farebox.money import BASE_SEPOLIA_USDC, BASE_USDC
from farebox.protocol.models import Offer, Proof, Resource
from farebox.schemes import evm_exact
from farebox.schemes.evm_exact import Authorization, authorization_digest, domain_separator

HARDHAT_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
OFFER = Offer(
    "exact",
    "eip155:84532",
    10000,
    BASE_SEPOLIA_USDC.address,
    PAY_TO,
    300,
    {"name": "USDC", "version": "2"},
)
NOW = 1_800_000_000
PAYER = EvmAccount.from_hex(HARDHAT_0)


def test_domain_separators_of_the_brief() -> None:
    assert domain_separator("USDC", "2", 84532, BASE_SEPOLIA_USDC.address).hex() == (
        "71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818"
    )
    assert domain_separator("USD Coin", "2", 8453, BASE_USDC.address).hex() == (
        "02fa7265e7c5d81118673727957699e4d68f74cd74b7db77da710fe8a2c7834f"
    )


def test_the_briefs_golden_vector() -> None:
    """x402 brief 3.1.4: digest and signature of hardhat key #0 for a fixed authorization."""
    authorization = Authorization(
        from_=bytes.fromhex("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
        to=bytes.fromhex(PAY_TO[2:]),
        value=10000,
        valid_after=0,
        valid_before=1740672154,
        nonce=bytes.fromhex("f3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"),
    )
    separator = domain_separator("USDC", "2", 84532, BASE_SEPOLIA_USDC.address)
    digest = authorization_digest(authorization, separator)
    assert digest.hex() == "4f4985a0c4a7592c738a9d385dac72ed9932049a3a642b4923659213c54fa8c6"
    signature = (
        "887688bfda2adc60488cb21d8355641dc7e6cae2acf979a4e510569110fbeb69"
        "12bfec8521359ee79ecbd2c6f8ba9ada97d499a910f5c0d4e274d0da99b8f3561c"
    )
    assert PAYER.sign_digest(digest).hex() == signature
    # And it verifies offline at a time inside its window.
    payload = {"signature": "0x" + signature, "authorization": authorization.to_json()}
    proof = Proof(2, "exact", "eip155:84532", payload, accepted=OFFER)
    verified = evm_exact.verify(proof, OFFER, now=1740672000)
    assert verified.payer == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def _proof(offer: Offer = OFFER, account: EvmAccount = PAYER, **kwargs: Any) -> Proof:
    return evm_exact.make_proof(account, offer, now=NOW, nonce=os.urandom(32), **kwargs)


def _with_auth(proof: Proof, **changes: str) -> Proof:
    auth = dict(proof.payload["authorization"])
    auth.update(changes)
    return dataclasses.replace(proof, payload={**proof.payload, "authorization": auth})


def _with_sig(proof: Proof, signature: bytes) -> Proof:
    return dataclasses.replace(
        proof, payload={**proof.payload, "signature": "0x" + signature.hex()}
    )


def test_sign_then_verify() -> None:
    proof = _proof(resource=Resource("http://api.test/weather"))
    verified = evm_exact.verify(proof, OFFER, now=NOW)
    assert verified.payer == PAYER.address
    assert verified.offer is OFFER
    assert verified.proof is proof
    assert verified.verified_at == NOW
    auth = proof.payload["authorization"]
    assert auth["validBefore"] == str(NOW + 300)
    assert auth["validAfter"] == str(NOW - 600)
    assert verified.authorization.value == 10000
    assert verified.claim_key.endswith(auth["nonce"][2:])
    assert PAYER.address[2:].lower() in verified.claim_key


def test_v1_proofs_verify_too() -> None:
    proof = _proof(x402_version=1)
    assert proof.accepted is None
    assert evm_exact.verify(proof, OFFER, now=NOW).payer == PAYER.address


def test_claim_key_ignores_encoding_but_not_the_nonce() -> None:
    proof = _proof()
    auth = proof.payload["authorization"]
    recased = _with_auth(
        proof, **{"from": auth["from"].lower(), "to": auth["to"].upper().replace("0X", "0x")}
    )
    first = evm_exact.verify(proof, OFFER, now=NOW)
    assert evm_exact.verify(recased, OFFER, now=NOW).claim_key == first.claim_key
    assert evm_exact.verify(_proof(), OFFER, now=NOW).claim_key != first.claim_key


def test_validity_window_edges() -> None:
    proof = _proof()
    expiry = NOW + 300
    assert evm_exact.verify(proof, OFFER, now=expiry - 6)
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(proof, OFFER, now=expiry - 5)
    assert info.value.code == "invalid_exact_evm_payload_authorization_valid_before"
    future = _with_auth(proof, validAfter=str(NOW + 1))
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(future, OFFER, now=NOW)
    assert info.value.code == "invalid_exact_evm_payload_authorization_valid_after"


def test_an_authorization_valid_far_longer_than_asked_is_refused() -> None:
    """A validBefore the payer chose far past the offer's maxTimeoutSeconds would leave a claim
    that did not settle able to land long after the server gave up on it."""
    slack = evm_exact.VALID_BEFORE_SLACK
    # Signed at NOW - slack for NOW - slack + 300: the furthest ahead a payer's clock may be.
    ahead = evm_exact.make_proof(PAYER, OFFER, now=NOW + slack, nonce=os.urandom(32))
    verified = evm_exact.verify(ahead, OFFER, now=NOW)
    assert verified.valid_until == NOW + slack + 300
    too_far = evm_exact.make_proof(PAYER, OFFER, now=NOW + slack + 1, nonce=os.urandom(32))
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(too_far, OFFER, now=NOW)
    assert info.value.code == "invalid_exact_evm_payload_authorization_valid_before"
    assert "maxTimeoutSeconds" in info.value.message


def _replace_offer(**changes: Any) -> Offer:
    return dataclasses.replace(OFFER, **changes)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        # In the official facilitator's order: each case breaks one thing only.
        (lambda p: (dataclasses.replace(p, scheme="upto"), OFFER), "unsupported_scheme"),
        (lambda p: (p, _replace_offer(scheme="upto")), "unsupported_scheme"),
        (lambda p: (dataclasses.replace(p, network="eip155:8453"), OFFER), "network_mismatch"),
        (
            lambda p: (
                dataclasses.replace(p, network="solana:abc"),
                _replace_offer(network="solana:abc"),
            ),
            "invalid_exact_evm_failed_to_get_network_config",
        ),
        (lambda p: (p, _replace_offer(extra={"name": "USDC"})), "missing_eip712_domain"),
        (
            lambda p: (p, _replace_offer(pay_to="0x" + "44" * 20)),
            "invalid_exact_evm_payload_recipient_mismatch",
        ),
        (
            lambda p: (p, _replace_offer(amount=10001)),
            "invalid_exact_evm_payload_authorization_value_mismatch",
        ),
        (
            lambda p: (_with_auth(p, value="10001"), OFFER),
            "invalid_exact_evm_payload_authorization_value_mismatch",
        ),
        (
            lambda p: (_with_auth(p, validBefore=str(NOW)), OFFER),
            "invalid_exact_evm_payload_authorization_valid_before",
        ),
        # Signed for one thing, presented as another: only the signature can tell.
        (
            lambda p: (_with_auth(p, validBefore=str(NOW + 301)), OFFER),
            "invalid_exact_evm_payload_signature",
        ),
        (
            lambda p: (_with_auth(p, nonce="0x" + "00" * 32), OFFER),
            "invalid_exact_evm_payload_signature",
        ),
        (
            lambda p: (_with_auth(p, **{"from": "0x" + "55" * 20}), OFFER),
            "invalid_exact_evm_payload_signature",
        ),
        (
            lambda p: (p, _replace_offer(extra={"name": "USD Coin", "version": "2"})),
            "invalid_exact_evm_payload_signature",
        ),
        (
            lambda p: (p, _replace_offer(asset="0x" + "66" * 20)),
            "invalid_exact_evm_payload_signature",
        ),
    ],
)
def test_each_failure_has_its_code(make: Any, code: str) -> None:
    proof, offer = make(_proof())
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(proof, offer, now=NOW)
    assert info.value.code == code
    assert info.value.status == 402


def _signature_of(proof: Proof) -> bytes:
    return bytes.fromhex(proof.payload["signature"][2:])


def test_high_s_twin_of_a_valid_signature_is_refused() -> None:
    proof = _proof()
    sig = _signature_of(proof)
    s = int.from_bytes(sig[32:64], "big")
    twin = (
        sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    )  # flips v 27<->28
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(_with_sig(proof, twin), OFFER, now=NOW)
    assert info.value.code == "invalid_exact_evm_payload_signature"


def test_v_of_0_or_1_is_accepted_and_other_v_refused() -> None:
    proof = _proof()
    sig = _signature_of(proof)
    assert evm_exact.verify(_with_sig(proof, sig[:64] + bytes([sig[64] - 27])), OFFER, now=NOW)
    for v in (2, 26, 29, 255):
        with pytest.raises(PaymentError) as info:
            evm_exact.verify(_with_sig(proof, sig[:64] + bytes([v])), OFFER, now=NOW)
        assert info.value.code == "invalid_exact_evm_payload_signature"


@pytest.mark.parametrize("length", [64, 66, 97])
def test_signatures_of_other_lengths_are_refused_offline(length: int) -> None:
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(_with_sig(_proof(), os.urandom(length)), OFFER, now=NOW)
    assert info.value.code == "invalid_exact_evm_payload_signature"


def test_zero_r_or_s_is_refused() -> None:
    proof = _proof()
    sig = _signature_of(proof)
    for bad in (bytes(32) + sig[32:], sig[:32] + bytes(32) + sig[64:]):
        with pytest.raises(PaymentError):
            evm_exact.verify(_with_sig(proof, bad), OFFER, now=NOW)


@pytest.mark.parametrize(
    "changes",
    [
        {"from": "0x1234"},
        {"to": "0x" + "zz" * 20},
        {"to": "0x" + "ab" * 19 + " a"},
        {"value": "-1"},
        {"value": "01"},
        {"value": "1.0"},
        {"value": "²"},
        {"value": str(2**256)},
        {"validBefore": ""},
        {"validAfter": 5},
        {"nonce": "0x" + "ab" * 31},
        {"nonce": "0x" + "ab" * 31 + "  "},
        {"nonce": None},
    ],
)
def test_malformed_authorizations_are_invalid_payload(changes: dict[str, Any]) -> None:
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(_with_auth(_proof(), **changes), OFFER, now=NOW)
    assert info.value.code == "invalid_payload"


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"signature": "0x00", "authorization": "x"},
        {"signature": 5, "authorization": {}},
        {"signature": "0xabc", "authorization": {}},
        {"signature": "0x" + "a b" * 40, "authorization": {}},
    ],
)
def test_malformed_payloads_are_invalid_payload(payload: dict[str, Any]) -> None:
    proof = Proof(2, "exact", OFFER.network, payload, accepted=OFFER)
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(proof, OFFER, now=NOW)
    assert info.value.code == "invalid_payload"


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["from", "to", "value", "validAfter", "validBefore", "nonce", "junk"]),
        st.none() | st.integers() | st.text(max_size=80) | st.lists(st.integers(), max_size=2),
    ),
    st.none() | st.text(max_size=140) | st.integers(),
)
def test_random_payloads_raise_only_payment_error(auth: dict[str, Any], sig: Any) -> None:
    proof = Proof(
        2, "exact", OFFER.network, {"authorization": auth, "signature": sig}, accepted=OFFER
    )
    with pytest.raises(PaymentError):
        evm_exact.verify(proof, OFFER, now=NOW)


def test_payer_cannot_pay_other_schemes() -> None:
    with pytest.raises(PaymentError) as info:
        evm_exact.sign_authorization(
            PAYER, _replace_offer(scheme="upto"), now=NOW, nonce=os.urandom(32)
        )
    assert info.value.code == "unsupported_scheme"
    with pytest.raises(ValueError, match="32 bytes"):
        evm_exact.sign_authorization(PAYER, OFFER, now=NOW, nonce=b"short")
