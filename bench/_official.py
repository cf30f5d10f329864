"""The official x402 SDK's offline EIP-3009 check, as a baseline. Imports nothing of farebox, so it
can run where coincurve is absent (farebox needs it; the official SDK does not)."""

from __future__ import annotations

NETWORK = "eip155:84532"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
AMOUNT = 10000


def official_check(header: str, now: int) -> str:
    """Decode, check and recover, step for step as the official facilitator runs them."""
    from x402.http.utils import decode_payment_signature_header
    from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
    from x402.mechanisms.evm.types import ExactEIP3009Payload
    from x402.mechanisms.evm.utils import get_evm_chain_id, hex_to_bytes
    from x402.mechanisms.evm.verify import verify_eoa_signature

    payload = decode_payment_signature_header(header)
    accepted = payload.accepted
    evm = ExactEIP3009Payload.from_dict(payload.payload)
    auth = evm.authorization
    if accepted.scheme != "exact" or accepted.network != NETWORK:
        raise ValueError("scheme or network")
    if auth.to.lower() != PAY_TO.lower() or int(auth.value) != AMOUNT:
        raise ValueError("recipient or amount")
    if int(auth.valid_before) < now + 6 or int(auth.valid_after) > now:
        raise ValueError("window")
    digest = hash_eip3009_authorization(
        auth,
        get_evm_chain_id(accepted.network),
        accepted.asset,
        accepted.extra["name"],
        accepted.extra["version"],
    )
    if not verify_eoa_signature(digest, hex_to_bytes(evm.signature or ""), auth.from_address):
        raise ValueError("signature")
    return str(auth.from_address)
