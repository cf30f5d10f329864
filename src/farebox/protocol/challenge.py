"""One challenge, every wire form: rendering a 402 and reading one back.

A farebox 402 carries the v2 ``PAYMENT-REQUIRED`` header, and a JSON body that is the plain body
merged with the x402 v1 keys (``x402Version``, ``error``, ``accepts``), so v2 clients, v1 clients and
plain readers each find what they look for in one response. Reading goes the way the official
clients go: the v2 header first, then a v1 body, then (farebox's addition) the plain body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from farebox._wire import MAX_JSON_DEPTH, nests_deeper_than
from farebox.errors import PaymentError
from farebox.money import ASSETS, AssetRegistry
from farebox.protocol.models import Challenge
from farebox.protocol.plain import decode_plain_body, plain_body
from farebox.protocol.x402 import (
    DEFAULT_MAX_HEADER_BYTES,
    PAYMENT_REQUIRED,
    decode_challenge_header,
    decode_v1_challenge,
    encode_challenge_header,
    v1_body,
)

__all__ = ["MAX_CHALLENGE_BODY_BYTES", "Rendered402", "read_challenge", "render_challenge"]

MAX_CHALLENGE_BODY_BYTES = 65536


@dataclass(frozen=True, slots=True)
class Rendered402:
    """A 402 ready to send: status, headers (in order) and the JSON body."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    status: int = 402


def render_challenge(
    challenge: Challenge,
    *,
    assets: AssetRegistry = ASSETS,
    detail: str | None = None,
    problem: PaymentError | None = None,
    extra_methods: Sequence[Mapping[str, Any]] = (),
    extra_instructions: str | None = None,
    problem_type: str | None = None,
) -> Rendered402:
    """Render ``challenge`` as one 402: v2 header + plain body merged with the v1 keys.

    With ``problem`` (why a proof was refused) the body is also an RFC 9457 problem document with
    the reason code, and the status is the reason's (402, or 400 for a malformed proof, 503 when
    the ledger or store is down); the challenge stays in it so the client can pay again.
    ``problem_type`` replaces the problem's ``type`` URI (another protocol's problem registry, such
    as MPP's for a refused ``Authorization: Payment`` credential); ``code`` stays farebox's.
    """
    if problem is not None:
        detail = problem.message
    body: dict[str, Any] = plain_body(
        challenge,
        assets=assets,
        detail=detail,
        extra_methods=extra_methods,
        extra_instructions=extra_instructions,
    )
    v1 = v1_body(challenge)
    if v1 is not None:
        body.update(v1)
    if problem is not None:
        body.update(problem.to_problem())
        if problem_type is not None:
            body["type"] = problem_type
    raw = orjson.dumps(body)
    headers = (
        ("content-type", "application/json" if problem is None else "application/problem+json"),
        ("cache-control", "no-store"),
        (PAYMENT_REQUIRED, encode_challenge_header(challenge)),
    )
    return Rendered402(headers=headers, body=raw, status=402 if problem is None else problem.status)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


def read_challenge(
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_body_bytes: int = MAX_CHALLENGE_BODY_BYTES,
) -> Challenge:
    """The challenge in a 402 response, from whichever form the server sent.

    A malformed v2 header does not hide a readable body; when nothing can be read, the first
    error found is raised.
    """
    errors: list[PaymentError] = []
    header = _header(headers, PAYMENT_REQUIRED)
    if header is not None:
        try:
            return decode_challenge_header(header, max_bytes=max_header_bytes)
        except PaymentError as exc:
            errors.append(exc)
    data: Any = None
    if len(body) > max_body_bytes:
        errors.append(PaymentError("payload_too_large", f"402 body exceeds {max_body_bytes} bytes"))
    elif body:
        try:
            # orjson caps nesting itself; json's C decoder would follow a raised recursion limit
            # into a stack overflow on a hostile body.
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            errors.append(PaymentError("invalid_payload", "402 body is not JSON"))
        if data is not None and nests_deeper_than(data, MAX_JSON_DEPTH):
            errors.append(PaymentError("invalid_payload", "402 body nests too deep"))
            data = None
    if isinstance(data, dict):
        if data.get("x402Version") == 1:
            try:
                return decode_v1_challenge(data)
            except PaymentError as exc:
                errors.append(exc)
        if "payment" in data:
            try:
                return decode_plain_body(data)
            except PaymentError as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    raise PaymentError("invalid_payload", "402 response carries no payment challenge")
