"""The OpenAPI 3.1 description of the facilitator service (:mod:`farebox.facilitator.service`)."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]

_JSON = "application/json"
_PROBLEM = "application/problem+json"

_STR = {"type": "string"}
_OBJ = {"type": "object"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], media: str = _JSON) -> dict[str, Any]:
    return {media: {"schema": schema}}


def openapi_document(*, bearer: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service; ``bearer`` adds the token on ``/settle``."""
    problem = {"description": "", "content": _content(_ref("Problem"), _PROBLEM)}

    def problem_as(description: str) -> dict[str, Any]:
        return {**problem, "description": description}

    request_body = {"required": True, "content": _content(_ref("FacilitatorRequest"))}
    settle: dict[str, Any] = {
        "operationId": "settle",
        "summary": "Settle a payment on chain (success at most once per nonce)",
        "description": (
            "Only the request that broadcasts the transfer is answered success=true. A repeated "
            "or concurrent settle of the same nonce, by the same authorization or another one, "
            "is success=false with invalid_exact_evm_nonce_already_used; its errorMessage names "
            "the transaction and whether it was this authorization's."
        ),
        "requestBody": request_body,
        "responses": {
            "200": {
                "description": "The outcome; a refused payment is success=false with a reason",
                "content": _content(_ref("SettleResponse")),
            },
            "400": problem_as("The request cannot be read"),
            "413": problem_as("The body is too large"),
        },
    }
    if bearer:
        settle["security"] = [{"bearer": []}]
        settle["responses"]["401"] = problem_as("Missing or wrong bearer token")
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "farebox x402 facilitator",
            "version": "1",
            "description": "Verifies and settles x402 `exact` payments (EIP-3009) on EVM chains.",
        },
        "paths": {
            "/verify": {
                "post": {
                    "operationId": "verify",
                    "summary": "Check a payment against its requirements and the chain",
                    "requestBody": request_body,
                    "responses": {
                        "200": {
                            "description": "The verdict; a refused payment is isValid=false",
                            "content": _content(_ref("VerifyResponse")),
                        },
                        "400": problem_as("The request cannot be read"),
                        "413": problem_as("The body is too large"),
                    },
                }
            },
            "/settle": {"post": settle},
            "/supported": {
                "get": {
                    "operationId": "supported",
                    "summary": "The payment kinds this facilitator settles",
                    "responses": {
                        "200": {
                            "description": "Kinds, extensions and signer addresses",
                            "content": _content(_ref("SupportedResponse")),
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "FacilitatorRequest": {
                    "type": "object",
                    "required": ["x402Version", "paymentPayload", "paymentRequirements"],
                    "properties": {
                        "x402Version": {"type": "integer", "enum": [1, 2]},
                        "paymentPayload": {
                            **_OBJ,
                            "description": "An x402 PaymentPayload of that version",
                        },
                        "paymentRequirements": {
                            **_OBJ,
                            "description": "An x402 PaymentRequirements of that version",
                        },
                    },
                },
                "VerifyResponse": {
                    "type": "object",
                    "required": ["isValid"],
                    "properties": {
                        "isValid": {"type": "boolean"},
                        "invalidReason": _STR,
                        "invalidMessage": _STR,
                        "payer": _STR,
                    },
                },
                "SettleResponse": {
                    "type": "object",
                    "required": ["success", "transaction", "network"],
                    "properties": {
                        "success": {"type": "boolean"},
                        "errorReason": _STR,
                        "errorMessage": _STR,
                        "payer": _STR,
                        "transaction": _STR,
                        "network": _STR,
                        "amount": {"type": "string", "pattern": "^[0-9]+$"},
                        "extensions": _OBJ,
                    },
                },
                "SupportedResponse": {
                    "type": "object",
                    "required": ["kinds", "extensions", "signers"],
                    "properties": {
                        "kinds": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["x402Version", "scheme", "network"],
                                "properties": {
                                    "x402Version": {"type": "integer", "enum": [1, 2]},
                                    "scheme": _STR,
                                    "network": _STR,
                                    "extra": _OBJ,
                                },
                            },
                        },
                        "extensions": {"type": "array", "items": _STR},
                        "signers": {
                            "type": "object",
                            "additionalProperties": {"type": "array", "items": _STR},
                        },
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail", "code"],
                    "properties": {
                        "type": _STR,
                        "title": _STR,
                        "status": {"type": "integer"},
                        "detail": _STR,
                        "code": _STR,
                    },
                },
            }
        },
    }
    if bearer:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
