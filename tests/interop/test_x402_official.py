"""farebox against the official x402 Python SDK (2.25), both ways, without a network.

The official client reads a 402 rendered by farebox and signs; farebox verifies. farebox signs; the
official facilitator's offline verification accepts. For the same bad payloads both give the same
reason code. The official facilitator reads the chain only through its signer; the stub below
answers the one read its offline path makes (``get_code``) as a chain would: payers are EOAs with
no code, the token is a contract.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import pytest
from eth_account import Account
from x402 import x402ClientSync
from x402.http.utils import (
    decode_payment_response_header,
    decode_payment_signature_header,
    encode_payment_response_header,
)
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme as OfficialFacilitatorScheme
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements, SettleResponse

from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.money import BASE_SEPOLIA_USDC
from farebox.protocol.challenge import render_challenge
from farebox.protocol.models import Challenge, Offer, Resource, Settlement
from farebox.protocol.x402 import (
    decode_proof,
    decode_settlement,
    encode_proof,
    encode_settlement,
    find_offer,
    offer_to_json,
)
from farebox.schemes import evm_exact

HARDHAT_1 = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
PAY_TO = "0x70997970C51812dC3A010C7D01E8aAe3c6a4E2D2"
OFFER = Offer(
    "exact",
    "eip155:84532",
    10000,
    BASE_SEPOLIA_USDC.address,
    PAY_TO,
    300,
    {"name": "USDC", "version": "2"},
)
CHALLENGE = Challenge(
    Resource("http://api.test/weather", "Weather", "application/json"), (OFFER,), reference="ch_1"
)


class OfflineChain:
    """The chain reads of the official FacilitatorEvmSigner protocol that offline verify makes."""

    def get_code(self, address: str) -> bytes:
        return b"\x60\x80" if address.lower() == OFFER.asset.lower() else b""


def official_client() -> x402HTTPClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(HARDHAT_1)))
    return x402HTTPClientSync(client)


def official_verify(header: str) -> Any:
    payload = decode_payment_signature_header(header)
    # The server's offer as farebox writes it, read by the official model.
    requirements = PaymentRequirements.model_validate(offer_to_json(OFFER))
    # The offline part of the official verify: every check but the eth_call simulation.
    result, _ = OfficialFacilitatorScheme(OfflineChain())._verify(
        payload, requirements, simulate=False
    )  # type: ignore[arg-type]
    return result


def test_official_client_pays_a_farebox_v2_challenge() -> None:
    rendered = render_challenge(CHALLENGE)
    headers, _payload = official_client().handle_402_response(
        dict(rendered.headers), rendered.body, CHALLENGE.resource.url
    )
    assert set(headers) == {"PAYMENT-SIGNATURE"}
    proof = decode_proof(headers["PAYMENT-SIGNATURE"])
    verified = evm_exact.verify(proof, find_offer(proof, CHALLENGE.accepts), now=int(time.time()))
    assert verified.payer == Account.from_key(HARDHAT_1).address
    assert proof.resource == CHALLENGE.resource


def test_official_v1_client_pays_from_the_farebox_v1_body() -> None:
    rendered = render_challenge(CHALLENGE)
    headers, _ = official_client().handle_402_response(
        {"content-type": "application/json"}, rendered.body, "u"
    )
    assert set(headers) == {"X-PAYMENT"}
    proof = decode_proof(headers["X-PAYMENT"])
    assert proof.x402_version == 1
    assert proof.network == "eip155:84532"
    verified = evm_exact.verify(proof, find_offer(proof, CHALLENGE.accepts), now=int(time.time()))
    assert verified.payer == Account.from_key(HARDHAT_1).address


@pytest.mark.parametrize("version", [1, 2])
def test_farebox_proofs_pass_the_official_facilitator_checks(version: int) -> None:
    account = EvmAccount.from_hex(HARDHAT_1)
    proof = evm_exact.make_proof(
        account,
        OFFER,
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=CHALLENGE.resource,
        x402_version=version,
    )
    header = encode_proof(proof)
    if version == 2:
        result = official_verify(header)
        assert result.is_valid, result
        assert result.payer == account.address
    else:
        assert decode_payment_signature_header(header).x402_version == 1


def _tamper(header: str, **auth_changes: str) -> str:
    obj = json.loads(base64.b64decode(header))
    obj["payload"]["authorization"].update(auth_changes)
    return base64.b64encode(json.dumps(obj).encode()).decode()


@pytest.mark.parametrize(
    "changes",
    [
        {"value": "20000"},
        {"to": "0x" + "12" * 20},
        {"validBefore": "1000"},
        {"validAfter": "99999999999"},
        {"nonce": "0x" + "00" * 32},
    ],
)
def test_same_bad_payload_same_code(changes: dict[str, str]) -> None:
    rendered = render_challenge(CHALLENGE)
    headers, _ = official_client().handle_402_response(dict(rendered.headers), rendered.body, "u")
    bad = _tamper(headers["PAYMENT-SIGNATURE"], **changes)
    official = official_verify(bad)
    assert not official.is_valid
    proof = decode_proof(bad)
    with pytest.raises(PaymentError) as info:
        evm_exact.verify(proof, OFFER, now=int(time.time()))
    assert info.value.code == official.invalid_reason


def test_settlement_headers_read_both_ways() -> None:
    ours = Settlement(True, "eip155:84532", "0x" + "ab" * 32, payer=PAY_TO)
    theirs = decode_payment_response_header(encode_settlement(ours))
    assert (theirs.success, theirs.transaction, theirs.network, theirs.payer) == (
        True,
        ours.transaction,
        ours.network,
        PAY_TO,
    )
    official = SettleResponse(
        success=False,
        error_reason="invalid_exact_evm_nonce_already_used",
        transaction="",
        network="eip155:84532",
        payer=PAY_TO,
    )
    back = decode_settlement(encode_payment_response_header(official))
    assert back == Settlement(
        False, "eip155:84532", "", PAY_TO, "invalid_exact_evm_nonce_already_used"
    )
