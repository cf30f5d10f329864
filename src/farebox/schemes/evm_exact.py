"""The x402 ``exact`` scheme on EVM chains: EIP-3009 ``transferWithAuthorization`` (USDC's).

The payer signs an EIP-712 ``TransferWithAuthorization`` for exactly the offered amount to the
offered recipient; the server checks it offline here and the ledger later moves the money with it.
The checks run in the order of the official Python facilitator (2.25) so that the first failure
gets the same x402 reason code there and here. Chain state (balance, nonce unused) is the ledger's
business: this module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import coincurve

from farebox.errors import PaymentError
from farebox.eth import (
    SECP256K1_HALF_N,
    EvmAccount,
    address_bytes,
    checksum_address,
    keccak256,
    parse_uint256,
    public_key_address,
)
from farebox.protocol.models import Offer, Proof, Resource, VerifiedProof

__all__ = [
    "NAMESPACE",
    "SCHEME",
    "VALID_BEFORE_MARGIN",
    "VALID_BEFORE_SLACK",
    "Authorization",
    "VerifiedEvmProof",
    "authorization_digest",
    "authorization_id",
    "chain_id_of",
    "domain_separator",
    "make_proof",
    "sign_authorization",
    "verify",
]

SCHEME = "exact"
#: The CAIP-2 namespace of the networks this module pays on (with :data:`SCHEME`, its registry key).
NAMESPACE = "eip155"
# The official facilitators refuse an authorization that expires within 6 seconds: settlement
# must still have time to land before validBefore.
VALID_BEFORE_MARGIN = 6
# How far past ``maxTimeoutSeconds`` a validBefore may lie (the payer's clock may run ahead).
# Beyond, the authorization is refused: a claim on it that did not settle could otherwise be
# settled by someone else long after the server gave up on it, so the server must know when
# it provably cannot move money any more (at most maxTimeoutSeconds + this after verifying).
VALID_BEFORE_SLACK = 600
# How far back the payer dates validAfter, so a server whose clock runs behind still accepts it.
VALID_AFTER_SLACK = 600

_DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_TRANSFER_TYPEHASH = keccak256(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


@dataclass(frozen=True, slots=True)
class Authorization:
    """An EIP-3009 ``TransferWithAuthorization`` message. Addresses are 20 raw bytes."""

    from_: bytes
    to: bytes
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def to_json(self) -> dict[str, str]:
        """The x402 JSON form: checksummed addresses, decimal strings, ``0x`` nonce."""
        return {
            "from": checksum_address(self.from_),
            "to": checksum_address(self.to),
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": "0x" + self.nonce.hex(),
        }


@dataclass(frozen=True, slots=True)
class VerifiedEvmProof(VerifiedProof):
    """A verified ``exact`` EVM proof, with what settlement needs to call the token."""

    authorization: Authorization
    signature: bytes

    @property
    def valid_until(self) -> int | None:
        """``validBefore``: from then on the token refuses the authorization."""
        return self.authorization.valid_before


@lru_cache(maxsize=256)
def chain_id_of(network: str) -> int:
    """The chain id of an ``eip155:N`` network; ``ValueError`` otherwise."""
    namespace, _, reference = network.partition(":")
    chain_id = parse_uint256(reference)
    if namespace != "eip155" or not chain_id:
        raise ValueError(f"{network[:64]!r} is not an eip155 network")
    return chain_id


@lru_cache(maxsize=1024)
def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    """The EIP-712 domain separator of a token; cached because every proof for it reuses it."""
    return keccak256(
        _DOMAIN_TYPEHASH
        + keccak256(name.encode("utf-8"))
        + keccak256(version.encode("utf-8"))
        + chain_id.to_bytes(32, "big")
        + address_bytes(verifying_contract).rjust(32, b"\0")
    )


@lru_cache(maxsize=1024)
def _offer_constants(
    pay_to: str, name: str, version: str, chain_id: int, asset: str
) -> tuple[bytes, bytes]:
    # A server verifies many proofs against few offers: derive an offer's bytes once.
    return address_bytes(pay_to), domain_separator(name, version, chain_id, asset)


def authorization_digest(authorization: Authorization, separator: bytes) -> bytes:
    """The EIP-712 digest a payer signs: ``keccak256(0x1901 || domain || structHash)``."""
    struct_hash = keccak256(
        _TRANSFER_TYPEHASH
        + authorization.from_.rjust(32, b"\0")
        + authorization.to.rjust(32, b"\0")
        + authorization.value.to_bytes(32, "big")
        + authorization.valid_after.to_bytes(32, "big")
        + authorization.valid_before.to_bytes(32, "big")
        + authorization.nonce
    )
    return keccak256(b"\x19\x01" + separator + struct_hash)


def _offer_terms(offer: Offer, payer: str | None = None) -> tuple[bytes, bytes]:
    """The offer's recipient bytes and EIP-712 domain separator, or raise with the x402 code.

    Order as the official facilitator checks: the network is an EVM chain, then the domain is given.
    """
    try:
        chain_id = chain_id_of(offer.network)
    except ValueError as exc:
        raise PaymentError(
            "invalid_exact_evm_failed_to_get_network_config", str(exc), payer=payer
        ) from None
    name, version = offer.extra.get("name"), offer.extra.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise PaymentError(
            "missing_eip712_domain", "offer.extra needs the token's name and version", payer=payer
        )
    try:
        return _offer_constants(offer.pay_to, name, version, chain_id, offer.asset)
    except ValueError:
        raise PaymentError(
            "invalid_payment_requirements", "offer has a malformed address"
        ) from None


def authorization_id(proof: VerifiedEvmProof) -> str:
    """What names one signed authorization: network, token and every signed field, hashed.

    The claim key names only the EIP-3009 nonce (the token's own uniqueness: one of the payer's
    authorizations with that nonce can ever move money), but one payer can sign several
    authorizations with the same nonce, to different recipients or amounts. An answer about a
    settlement (``this one moved money``) must be about the whole authorization, never about
    another one that shares its nonce.
    """
    auth = proof.authorization
    return keccak256(
        proof.offer.network.encode("utf-8")
        + b"\0"
        + address_bytes(proof.offer.asset)
        + auth.from_
        + auth.to
        + auth.value.to_bytes(32, "big")
        + auth.valid_after.to_bytes(32, "big")
        + auth.valid_before.to_bytes(32, "big")
        + auth.nonce
    ).hex()


# --- the payer's side -----------------------------------------------------------------------------


def sign_authorization(
    account: EvmAccount,
    offer: Offer,
    *,
    now: int,
    nonce: bytes,
    valid_after: int | None = None,
) -> dict[str, Any]:
    """Sign an authorization paying ``offer`` exactly; returns the x402 ``payload`` object.

    ``nonce`` must be 32 fresh random bytes (the token refuses a reused one). The window runs
    from ``valid_after`` (default ``now - 600``) to ``now + offer.max_timeout_seconds``.
    """
    if offer.scheme != SCHEME:
        raise PaymentError("unsupported_scheme", f"cannot pay scheme {offer.scheme!r}")
    if len(nonce) != 32:
        raise ValueError("an EIP-3009 nonce is 32 bytes")
    to, separator = _offer_terms(offer)
    authorization = Authorization(
        from_=address_bytes(account.address),
        to=to,
        value=offer.amount,
        valid_after=max(0, now - VALID_AFTER_SLACK) if valid_after is None else valid_after,
        valid_before=now + offer.max_timeout_seconds,
        nonce=nonce,
    )
    signature = account.sign_digest(authorization_digest(authorization, separator))
    return {"signature": "0x" + signature.hex(), "authorization": authorization.to_json()}


def make_proof(
    account: EvmAccount,
    offer: Offer,
    *,
    now: int,
    nonce: bytes,
    resource: Resource | None = None,
    x402_version: int = 2,
    extensions: Mapping[str, Any] | None = None,
) -> Proof:
    """A complete proof paying ``offer``: signed payload plus the version's envelope."""
    payload = sign_authorization(account, offer, now=now, nonce=nonce)
    if x402_version == 1:
        return Proof(1, offer.scheme, offer.network, payload)
    return Proof(
        x402_version=2,
        scheme=offer.scheme,
        network=offer.network,
        payload=payload,
        accepted=offer,
        resource=resource,
        extensions=extensions or {},
    )


# --- the server's side ----------------------------------------------------------------------------


def _hex_bytes(value: Any, size: int) -> bytes | None:
    # bytes.fromhex validates the digits; the length checks catch the whitespace it would skip.
    if not isinstance(value, str) or len(value) != 2 + 2 * size or not value.startswith("0x"):
        return None
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError:
        return None
    return raw if len(raw) == size else None


def _read_payload(payload: Mapping[str, Any]) -> tuple[Authorization, bytes]:
    auth = payload.get("authorization")
    if not isinstance(auth, Mapping):
        raise PaymentError("invalid_payload", "payload.authorization must be an object")
    sig = payload.get("signature")
    signature = (
        _hex_bytes(sig, (len(sig) - 2) // 2)
        if isinstance(sig, str) and 4 <= len(sig) <= 4096 and len(sig) % 2 == 0
        else None
    )
    if signature is None:
        raise PaymentError("invalid_payload", "payload.signature must be 0x-prefixed hex")
    from_, to, nonce = (
        _hex_bytes(auth.get("from"), 20),
        _hex_bytes(auth.get("to"), 20),
        _hex_bytes(auth.get("nonce"), 32),
    )
    value, valid_after, valid_before = (
        parse_uint256(auth.get("value")),
        parse_uint256(auth.get("validAfter")),
        parse_uint256(auth.get("validBefore")),
    )
    if from_ is None or to is None or nonce is None:
        bad = "from" if from_ is None else "to" if to is None else "nonce"
        size = "32 bytes" if bad == "nonce" else "an EVM address"
        raise PaymentError("invalid_payload", f"authorization.{bad} must be 0x-prefixed {size}")
    if value is None or valid_after is None or valid_before is None:
        bad = "value" if value is None else "validAfter" if valid_after is None else "validBefore"
        raise PaymentError(
            "invalid_payload", f"authorization.{bad} must be a decimal uint256 string"
        )
    return Authorization(from_, to, value, valid_after, valid_before, nonce), signature


def _recover(digest: bytes, signature: bytes) -> bytes | None:
    """The address that signed ``digest``, or ``None`` for a malformed or malleable signature."""
    if len(signature) != 65:
        return None
    v = signature[64]
    recovery_id = v - 27 if v >= 27 else v
    if recovery_id not in (0, 1):
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    # High-s twins of valid signatures are refused on-chain (USDC's ECRecover), so refuse them here.
    if r == 0 or s == 0 or s > SECP256K1_HALF_N:
        return None
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes([recovery_id]), digest, hasher=None
        )
    except Exception:
        return None
    return public_key_address(key)


def verify(proof: Proof, offer: Offer, *, now: int) -> VerifiedEvmProof:
    """Check ``proof`` against the server's ``offer`` offline; the verified proof, or raise.

    Order and codes follow the official facilitator: scheme, network, chain, EIP-712 domain,
    recipient, exact amount, ``validBefore >= now + 6``, ``validAfter <= now``, signature.
    Signatures other than a 65-byte EOA signature (ERC-1271/6492 smart wallets) need the chain
    and are refused here.
    """
    authorization, signature = _read_payload(proof.payload)
    # The payer as the payload names it, as the official facilitator reports it.
    payer: str = proof.payload["authorization"]["from"]
    if proof.scheme != SCHEME or offer.scheme != SCHEME:
        raise PaymentError(
            "unsupported_scheme", f"scheme {proof.scheme!r} is not exact", payer=payer
        )
    if proof.network != offer.network:
        raise PaymentError(
            "network_mismatch",
            f"proof is for {proof.network}, offer for {offer.network}",
            payer=payer,
        )
    pay_to, separator = _offer_terms(offer, payer)
    if authorization.to != pay_to:
        raise PaymentError(
            "invalid_exact_evm_payload_recipient_mismatch",
            "authorization pays another recipient than the offer's payTo",
            payer=payer,
        )
    if authorization.value != offer.amount:
        raise PaymentError(
            "invalid_exact_evm_payload_authorization_value_mismatch",
            f"authorization is for {authorization.value}, the offer asks {offer.amount}",
            payer=payer,
        )
    if authorization.valid_before < now + VALID_BEFORE_MARGIN:
        raise PaymentError(
            "invalid_exact_evm_payload_authorization_valid_before",
            "authorization expired or expires within 6 seconds",
            payer=payer,
        )
    if authorization.valid_before > now + offer.max_timeout_seconds + VALID_BEFORE_SLACK:
        raise PaymentError(
            "invalid_exact_evm_payload_authorization_valid_before",
            f"authorization is valid for more than the offer's maxTimeoutSeconds "
            f"({offer.max_timeout_seconds}) plus {VALID_BEFORE_SLACK} seconds",
            payer=payer,
        )
    if authorization.valid_after > now:
        raise PaymentError(
            "invalid_exact_evm_payload_authorization_valid_after",
            "authorization is not valid yet",
            payer=payer,
        )
    signer = _recover(authorization_digest(authorization, separator), signature)
    if signer != authorization.from_:
        raise PaymentError(
            "invalid_exact_evm_payload_signature",
            "signature does not recover to authorization.from"
            + ("" if len(signature) == 65 else " (only 65-byte EOA signatures are accepted)"),
            payer=payer,
        )
    # EIP-3009 nonces are per payer and token: this names the nonce, however encoded (the unit
    # the token lets move money once). Authorizations sharing it differ: see authorization_id.
    claim_key = f"{offer.network}/{offer.asset.lower()}/{authorization.from_.hex()}/{authorization.nonce.hex()}"
    return VerifiedEvmProof(
        proof=proof,
        offer=offer,
        payer=payer,
        claim_key=claim_key,
        verified_at=now,
        authorization=authorization,
        signature=signature,
    )
