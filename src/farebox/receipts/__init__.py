"""PEAC Wire 0.2 interaction records (receipts): signed evidence of a paid request, and 402 challenges.

The safe recipes are :func:`issue_receipt` and :func:`verify_receipt`; build claims with
:func:`payment_claims` (evidence of a payment, ``org.peacprotocol/commerce``) or
:func:`challenge_claims` (a 402, ``org.peacprotocol/challenge``). Keys, JWKS, ``did:key`` and
``peac-issuer.json`` live in :mod:`farebox.receipts.keys`; the JWS and Ed25519 hazmat layer in
:mod:`farebox.receipts.jws`; the I-JSON gate in :mod:`farebox.receipts.ijson`.
"""

from farebox.receipts.keys import (
    IssuerConfig,
    Jwks,
    SigningKey,
    did_key_from_public_key,
    issuer_config_document,
    jwk_thumbprint,
    jwks_document,
    load_signing_key,
    parse_issuer_config,
    parse_jwks,
    public_key_from_did_key,
    save_signing_key,
)
from farebox.receipts.records import (
    IssuedReceipt,
    KeySource,
    ReceiptWarning,
    Strictness,
    VerifiedReceipt,
    build_claims,
    challenge_claims,
    issue_receipt,
    payment_claims,
    policy_digest,
    receipt_ref,
    rfc3339,
    sign_payment_record,
    uuid7,
    validate_claims,
    verify_receipt,
)

__all__ = [
    "IssuedReceipt",
    "IssuerConfig",
    "Jwks",
    "KeySource",
    "ReceiptWarning",
    "SigningKey",
    "Strictness",
    "VerifiedReceipt",
    "build_claims",
    "challenge_claims",
    "did_key_from_public_key",
    "issue_receipt",
    "issuer_config_document",
    "jwk_thumbprint",
    "jwks_document",
    "load_signing_key",
    "parse_issuer_config",
    "parse_jwks",
    "payment_claims",
    "policy_digest",
    "public_key_from_did_key",
    "receipt_ref",
    "rfc3339",
    "save_signing_key",
    "sign_payment_record",
    "uuid7",
    "validate_claims",
    "verify_receipt",
]
