"""x402 v1 and v2 on the wire: header and body codecs, and matching a proof to an offer.

Headers carry standard padded base64 (never base64url) of camelCase JSON with nulls omitted; amounts
are strings of atomic units and ``x402Version`` is a number. Decoding is strict and bounded: anything
that is not exactly that raises :class:`~farebox.errors.PaymentError` with a reason code, and nothing
else escapes. Readers are looked up by version in a table, not chosen by ``if`` chains.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from farebox._wire import MAX_JSON_DEPTH, nests_deeper_than
from farebox.errors import PaymentError
from farebox.eth import parse_uint256
from farebox.protocol.models import Challenge, Offer, Proof, Resource, Settlement

__all__ = [
    "CREDENTIALS",
    "DEFAULT_MAX_HEADER_BYTES",
    "PAYMENT_REQUIRED",
    "PAYMENT_RESPONSE",
    "PAYMENT_SIGNATURE",
    "V1_NETWORKS",
    "X_PAYMENT",
    "X_PAYMENT_RESPONSE",
    "b64json_decode",
    "b64json_encode",
    "decode_challenge_header",
    "decode_proof",
    "decode_settlement",
    "decode_v1_challenge",
    "encode_challenge_header",
    "encode_proof",
    "encode_settlement",
    "find_offer",
    "offer_from_json",
    "offer_to_json",
    "proof_from_json",
    "proof_to_json",
    "requirements_from_json",
    "requirements_to_json",
    "settlement_from_json",
    "settlement_to_json",
    "v1_body",
]

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
X_PAYMENT = "X-PAYMENT"
X_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"
# Where an x402 client puts its proof (v2, v1), as ``(header, auth scheme or None)``: a face that
# forwards a request removes these (see farebox.server.proxy).
CREDENTIALS: tuple[tuple[str, str | None], ...] = (
    (PAYMENT_SIGNATURE.lower(), None),
    (X_PAYMENT.lower(), None),
)

DEFAULT_MAX_HEADER_BYTES = 8192
# Deep enough for any real requirements, extension schema or payload; shallow enough that every
# document read can be written back (orjson writes at most 255 levels).

# Bounds on free-form strings inside a payload: generous for real use, small enough that a hostile
# header cannot make us hold or log much.
_MAX_STR = 2048
_MAX_TIMEOUT = 2**31 - 1

# v1 names networks by legacy name; v2 by CAIP-2. Chain ids as the official SDKs agree on them
# (the SDKs disagree on story/educhain/skale, so those are left out on purpose).
V1_NETWORKS: Mapping[str, str] = {
    "base": "eip155:8453",
    "base-sepolia": "eip155:84532",
    "avalanche": "eip155:43114",
    "avalanche-fuji": "eip155:43113",
    "polygon": "eip155:137",
    "polygon-amoy": "eip155:80002",
    "sei": "eip155:1329",
    "sei-testnet": "eip155:1328",
    "iotex": "eip155:4689",
    "abstract": "eip155:2741",
    "abstract-testnet": "eip155:11124",
    "peaq": "eip155:3338",
    "ethereum": "eip155:1",
    "solana": "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
    "solana-devnet": "solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1",
}
_V1_NAMES: Mapping[str, str] = {caip2: name for name, caip2 in V1_NETWORKS.items()}


# --- base64 JSON ---------------------------------------------------------------------------------


def b64json_encode(obj: Mapping[str, Any]) -> str:
    """Standard padded base64 of compact UTF-8 JSON, as the official SDKs emit it."""
    return base64.b64encode(orjson.dumps(obj)).decode("ascii")


def _loads(data: bytes | str, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise PaymentError("payload_too_large", f"payment data exceeds {max_bytes} bytes")
    try:
        # orjson is strict where it matters (no NaN or Infinity, no lone surrogates, invalid UTF-8
        # refused, nesting capped) and four times faster than json on a proof. Duplicate keys
        # resolve last-wins, as in the official SDKs: the signature is checked over the values
        # parsed here, so a duplicate cannot smuggle in terms the payer did not sign.
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise PaymentError("invalid_payload", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PaymentError("invalid_payload", "expected a JSON object")
    if nests_deeper_than(obj, MAX_JSON_DEPTH):
        # orjson reads 1023 levels but writes only 255: a proof nested deeper than that would be
        # accepted here and fail later when forwarded to a facilitator.
        raise PaymentError("invalid_payload", f"payment data nests deeper than {MAX_JSON_DEPTH}")
    return obj


def b64json_decode(value: str, *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Any]:
    """Decode a header value: strict standard base64 of a JSON object, at most ``max_bytes``."""
    if not isinstance(value, str):
        raise PaymentError("invalid_payload", "header value must be text")
    if len(value) > max_bytes:
        raise PaymentError("payload_too_large", f"payment header exceeds {max_bytes} bytes")
    try:
        # strict_mode refuses the base64url alphabet, missing or misplaced padding and stray bytes.
        raw = binascii.a2b_base64(value.strip(), strict_mode=True)
    except (binascii.Error, ValueError):
        raise PaymentError("invalid_payload", "header is not standard padded base64") from None
    if not raw:
        raise PaymentError("invalid_payload", "header is empty")
    return _loads(raw, max_bytes)


# --- field readers ---------------------------------------------------------------------------------


class _Fields:
    """Typed access to one JSON object, naming the path in every error."""

    __slots__ = ("data", "where")

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise PaymentError("invalid_payload", f"{where} must be an object")
        self.data: dict[str, Any] = data
        self.where = where

    def _fail(self, key: str, what: str) -> PaymentError:
        return PaymentError("invalid_payload", f"{self.where}.{key} {what}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def text(self, key: str, *, empty: bool = False) -> str:
        value = self.data.get(key)
        if not isinstance(value, str):
            raise self._fail(key, "must be a string")
        if len(value) > _MAX_STR:
            raise self._fail(key, f"is longer than {_MAX_STR} characters")
        if not empty and not value:
            raise self._fail(key, "must not be empty")
        return value

    def opt_str(self, key: str, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > _MAX_STR:
            raise self._fail(key, f"must be a string of at most {_MAX_STR} characters")
        return value

    def amount(self, key: str) -> int:
        number = parse_uint256(self.data.get(key))
        if number is None:
            raise self._fail(key, "must be a canonical decimal uint256 string")
        return number

    def positive_int(self, key: str) -> int:
        value = self.data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_TIMEOUT:
            raise self._fail(key, "must be a positive integer")
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self.data.get(key), f"{self.where}.{key}")

    def opt_obj(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._fail(key, "must be an object")
        return value

    def items(self, key: str, *, max_items: int = 32) -> list[Any]:
        value = self.data.get(key)
        if not isinstance(value, list) or not value:
            raise self._fail(key, "must be a non-empty list")
        if len(value) > max_items:
            raise self._fail(key, f"has more than {max_items} items")
        return value


def _version(fields: _Fields) -> int:
    value = fields.data.get("x402Version")
    if isinstance(value, bool) or not isinstance(value, int):
        raise PaymentError("invalid_x402_version", "x402Version must be the number 1 or 2")
    if value not in (1, 2):
        # Never the value itself in the message: a huge int cannot even be formatted.
        raise PaymentError("invalid_x402_version", "x402Version must be 1 or 2")
    return value


def _network_from_v1(name: str) -> str:
    try:
        return V1_NETWORKS[name]
    except KeyError:
        raise PaymentError("invalid_network", f"unknown x402 v1 network {name!r}") from None


def _network_v2(fields: _Fields, key: str = "network") -> str:
    network = fields.text(key)
    if ":" not in network or len(network) < 3:
        raise PaymentError("invalid_network", f"network {network[:64]!r} is not CAIP-2")
    return network


# --- offers ------------------------------------------------------------------------------------------


def offer_to_json(offer: Offer) -> dict[str, Any]:
    """An offer as x402 v2 ``PaymentRequirements`` JSON."""
    return {
        "scheme": offer.scheme,
        "network": offer.network,
        "amount": str(offer.amount),
        "asset": offer.asset,
        "payTo": offer.pay_to,
        "maxTimeoutSeconds": offer.max_timeout_seconds,
        "extra": dict(offer.extra),
    }


def offer_from_json(data: Any, where: str = "offer") -> Offer:
    """Read x402 v2 ``PaymentRequirements`` JSON; ``where`` names it in errors. Unknown keys are
    ignored, as the official schemas do."""
    f = _Fields(data, where)
    return Offer(
        scheme=f.text("scheme"),
        network=_network_v2(f),
        amount=f.amount("amount"),
        asset=f.text("asset"),
        pay_to=f.text("payTo"),
        max_timeout_seconds=f.positive_int("maxTimeoutSeconds"),
        extra=f.opt_obj("extra"),
    )


def _offer_to_v1(offer: Offer, resource: Resource) -> dict[str, Any] | None:
    name = _V1_NAMES.get(offer.network)
    if name is None:
        return None
    return {
        "scheme": offer.scheme,
        "network": name,
        "maxAmountRequired": str(offer.amount),
        "resource": resource.url,
        "description": resource.description,
        "mimeType": resource.mime_type,
        "payTo": offer.pay_to,
        "maxTimeoutSeconds": offer.max_timeout_seconds,
        "asset": offer.asset,
        "extra": dict(offer.extra),
    }


def _read_offer_v1(data: Any, where: str) -> tuple[Offer, Resource]:
    f = _Fields(data, where)
    offer = Offer(
        scheme=f.text("scheme"),
        network=_network_from_v1(f.text("network")),
        amount=f.amount("maxAmountRequired"),
        asset=f.text("asset"),
        pay_to=f.text("payTo"),
        max_timeout_seconds=f.positive_int("maxTimeoutSeconds"),
        extra=f.opt_obj("extra"),
    )
    resource = Resource(f.text("resource"), f.opt_str("description"), f.opt_str("mimeType"))
    return offer, resource


def _resource_to_json(resource: Resource) -> dict[str, Any]:
    # The official server emits unset description/mimeType as empty strings; keep that shape.
    return {
        "url": resource.url,
        "description": resource.description,
        "mimeType": resource.mime_type,
    }


def _read_resource(data: Any, where: str) -> Resource:
    f = _Fields(data, where)
    return Resource(f.text("url"), f.opt_str("description"), f.opt_str("mimeType"))


# --- challenges (server -> client) --------------------------------------------------------------------


def encode_challenge_header(challenge: Challenge) -> str:
    """The v2 ``PAYMENT-REQUIRED`` header value."""
    obj: dict[str, Any] = {
        "x402Version": 2,
        "error": challenge.error,
        "resource": _resource_to_json(challenge.resource),
        "accepts": [offer_to_json(o) for o in challenge.accepts],
    }
    if challenge.extensions:
        obj["extensions"] = dict(challenge.extensions)
    return b64json_encode(obj)


def decode_challenge_header(value: str, *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Challenge:
    """Read a v2 ``PAYMENT-REQUIRED`` header."""
    f = _Fields(b64json_decode(value, max_bytes=max_bytes), "PaymentRequired")
    if _version(f) != 2:
        raise PaymentError("invalid_x402_version", "PAYMENT-REQUIRED must be x402 version 2")
    accepts = f.items("accepts")
    resource = (
        _read_resource(f.data["resource"], "PaymentRequired.resource")
        if f.has("resource")
        else Resource("")
    )
    return Challenge(
        resource=resource,
        accepts=tuple(
            offer_from_json(o, f"PaymentRequired.accepts[{i}]") for i, o in enumerate(accepts)
        ),
        error=f.opt_str("error"),
        extensions=f.opt_obj("extensions"),
        x402_version=2,
    )


def v1_body(challenge: Challenge) -> dict[str, Any] | None:
    """The x402 v1 402 body keys, or ``None`` when no offer is on a network v1 can name."""
    accepts = [v1 for o in challenge.accepts if (v1 := _offer_to_v1(o, challenge.resource))]
    if not accepts:
        return None
    return {"x402Version": 1, "error": challenge.error, "accepts": accepts}


def decode_v1_challenge(
    body: bytes | str | Mapping[str, Any], *, max_bytes: int = 65536
) -> Challenge:
    """Read an x402 v1 402 body (extra keys, such as the plain body's, are ignored)."""
    data = dict(body) if isinstance(body, Mapping) else _loads(body, max_bytes)
    f = _Fields(data, "PaymentRequirementsResponse")
    if _version(f) != 1:
        raise PaymentError("invalid_x402_version", "body is not an x402 version 1 challenge")
    pairs = [
        _read_offer_v1(o, f"PaymentRequirementsResponse.accepts[{i}]")
        for i, o in enumerate(f.items("accepts"))
    ]
    return Challenge(
        resource=pairs[0][1],
        accepts=tuple(offer for offer, _ in pairs),
        error=f.opt_str("error"),
        x402_version=1,
    )


# --- proofs (client -> server) ------------------------------------------------------------------------


def encode_proof(proof: Proof) -> str:
    """The header value for ``proof``: ``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1)."""
    return b64json_encode(proof_to_json(proof))


def proof_to_json(proof: Proof) -> dict[str, Any]:
    """``proof`` as the x402 ``PaymentPayload`` JSON object of its version (what a facilitator's
    ``/verify`` and ``/settle`` take as ``paymentPayload``)."""
    obj: dict[str, Any]
    if proof.x402_version == 1:
        obj = {
            "x402Version": 1,
            "scheme": proof.scheme,
            "network": _V1_NAMES.get(proof.network, proof.network),
            "payload": dict(proof.payload),
        }
    else:
        if proof.accepted is None:
            raise ValueError("a v2 proof needs the accepted offer")
        obj = {"x402Version": 2}
        if proof.resource is not None:
            obj["resource"] = _resource_to_json(proof.resource)
        obj["accepted"] = offer_to_json(proof.accepted)
        obj["payload"] = dict(proof.payload)
        if proof.extensions:
            obj["extensions"] = dict(proof.extensions)
    return obj


def _read_proof_v1(f: _Fields) -> Proof:
    return Proof(
        x402_version=1,
        scheme=f.text("scheme"),
        network=_network_from_v1(f.text("network")),
        payload=f.obj("payload").data,
    )


def _read_proof_v2(f: _Fields) -> Proof:
    accepted = offer_from_json(f.data.get("accepted"), "PaymentPayload.accepted")
    resource = (
        _read_resource(f.data["resource"], "PaymentPayload.resource") if f.has("resource") else None
    )
    return Proof(
        x402_version=2,
        scheme=accepted.scheme,
        network=accepted.network,
        payload=f.obj("payload").data,
        accepted=accepted,
        resource=resource,
        extensions=f.opt_obj("extensions"),
    )


_PROOF_READERS: Mapping[int, Callable[[_Fields], Proof]] = {1: _read_proof_v1, 2: _read_proof_v2}


def decode_proof(value: str, *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Proof:
    """Read a ``PAYMENT-SIGNATURE`` or ``X-PAYMENT`` header; the version inside decides the shape."""
    return proof_from_json(b64json_decode(value, max_bytes=max_bytes))


def proof_from_json(data: Any) -> Proof:
    """Read an x402 ``PaymentPayload`` JSON object (already parsed); the version decides the shape."""
    f = _Fields(data, "PaymentPayload")
    return _PROOF_READERS[_version(f)](f)


def requirements_to_json(
    offer: Offer, resource: Resource, *, x402_version: int = 2
) -> dict[str, Any]:
    """``offer`` as ``PaymentRequirements`` of ``x402_version`` (v1 carries the resource inside)."""
    if x402_version == 1:
        v1 = _offer_to_v1(offer, resource)
        if v1 is None:
            raise PaymentError("invalid_network", f"x402 v1 has no name for {offer.network}")
        return v1
    return offer_to_json(offer)


def requirements_from_json(data: Any, *, x402_version: int) -> Offer:
    """Read ``PaymentRequirements`` of ``x402_version`` (a facilitator's ``paymentRequirements``)."""
    if x402_version == 1:
        return _read_offer_v1(data, "paymentRequirements")[0]
    if x402_version == 2:
        return offer_from_json(data, "paymentRequirements")
    raise PaymentError("invalid_x402_version", "x402 version must be 1 or 2")


# --- settlements (server -> client) -------------------------------------------------------------------


def encode_settlement(settlement: Settlement, *, x402_version: int = 2) -> str:
    """The ``PAYMENT-RESPONSE`` (v2) or ``X-PAYMENT-RESPONSE`` (v1) header value."""
    return b64json_encode(settlement_to_json(settlement, x402_version=x402_version))


def settlement_to_json(settlement: Settlement, *, x402_version: int = 2) -> dict[str, Any]:
    """``settlement`` as the x402 ``SettleResponse`` JSON object of ``x402_version``."""
    network = settlement.network
    if x402_version == 1:
        network = _V1_NAMES.get(network, network)
    obj: dict[str, Any] = {
        "success": settlement.success,
        "transaction": settlement.transaction,
        "network": network,
    }
    optional: dict[str, Any] = {
        "payer": settlement.payer,
        "errorReason": settlement.error_reason,
        "errorMessage": settlement.error_message,
        "amount": None if settlement.amount is None else str(settlement.amount),
        "extensions": dict(settlement.extensions) or None,
    }
    obj.update((k, v) for k, v in optional.items() if v is not None)
    return obj


def decode_settlement(value: str, *, max_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> Settlement:
    """Read a ``PAYMENT-RESPONSE`` or ``X-PAYMENT-RESPONSE`` header."""
    return settlement_from_json(b64json_decode(value, max_bytes=max_bytes))


def settlement_from_json(data: Any) -> Settlement:
    """Read an x402 ``SettleResponse`` JSON object (already parsed)."""
    f = _Fields(data, "SettleResponse")
    success = f.data.get("success")
    if not isinstance(success, bool):
        raise PaymentError("invalid_payload", "SettleResponse.success must be a boolean")
    network = f.text("network")
    if ":" not in network:
        network = _network_from_v1(network)
    return Settlement(
        success=success,
        network=network,
        transaction=f.opt_str("transaction"),
        payer=f.opt_str("payer") or None,
        error_reason=f.opt_str("errorReason") or None,
        error_message=f.opt_str("errorMessage") or None,
        amount=f.amount("amount") if f.has("amount") else None,
        extensions=f.opt_obj("extensions"),
    )


# --- matching -------------------------------------------------------------------------------------


def _is_subset(required: Any, given: Any) -> bool:
    if isinstance(required, Mapping):
        return isinstance(given, Mapping) and all(
            k in given and _is_subset(v, given[k]) for k, v in required.items()
        )
    return bool(required == given and type(required) is type(given))


def _same_address(a: str, b: str) -> bool:
    # EVM addresses compare case-insensitively (EIP-55 case is only a checksum); others exactly.
    if a.startswith("0x") and b.startswith("0x"):
        return a.lower() == b.lower()
    return a == b


def find_offer(proof: Proof, offers: Sequence[Offer]) -> Offer:
    """The server's own offer that ``proof`` pays, as the official servers match it.

    v2: scheme, network, amount, asset, payTo (EVM addresses case-insensitive) and
    maxTimeoutSeconds equal, and the offer's ``extra`` a subset of the accepted one. v1 proofs name
    only scheme and network, so the first offer with both is taken; its amount is enforced when the
    scheme verifies the authorization.
    """
    accepted = proof.accepted
    for offer in offers:
        if offer.scheme != proof.scheme or offer.network != proof.network:
            continue
        if accepted is None:
            return offer
        if (
            offer.amount == accepted.amount
            and (offer.asset == accepted.asset or _same_address(offer.asset, accepted.asset))
            and (offer.pay_to == accepted.pay_to or _same_address(offer.pay_to, accepted.pay_to))
            and offer.max_timeout_seconds == accepted.max_timeout_seconds
            and (offer.extra == accepted.extra or _is_subset(offer.extra, accepted.extra))
        ):
            return offer
    raise PaymentError("invalid_payment_requirements", "No matching payment requirements")
