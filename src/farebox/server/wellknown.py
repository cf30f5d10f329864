"""The documents a paid API publishes under ``/.well-known/``: its receipt keys and its terms.

``jwks.json`` holds the public keys of the PEAC records; ``peac-issuer.json`` points verifiers at
it (only for an https issuer: PEAC discovery is https-only, so a server on plain http signs as a
``did:key``, whose key is the identifier itself); ``peac.txt`` is the policy in its JSON form, with
the route table's prices and methods.
"""

from __future__ import annotations

from typing import Any

import orjson

from farebox._wire import ISSUER_PATH, JWKS_PATH
from farebox.money import AssetRegistry
from farebox.receipts import SigningKey, issuer_config_document, jwks_document
from farebox.receipts.keys import https_origin
from farebox.server.routes import RequestInfo, RouteTable

__all__ = ["JWKS_PATH", "PEAC_ISSUER_PATH", "PEAC_TXT_PATH", "WellKnown"]

PEAC_ISSUER_PATH = ISSUER_PATH
PEAC_TXT_PATH = "/.well-known/peac.txt"

Answer = tuple[int, tuple[tuple[str, str], ...], bytes]


class WellKnown:
    """Builds the documents once (they change only with the configuration) and answers for them."""

    def __init__(
        self,
        routes: RouteTable,
        signing_key: SigningKey,
        issuer: str | None,
        assets: AssetRegistry,
    ) -> None:
        self._documents: dict[str, tuple[str, bytes]] = {
            JWKS_PATH: ("application/json", orjson.dumps(jwks_document([signing_key]))),
            PEAC_TXT_PATH: ("application/json", orjson.dumps(policy_document(routes, assets))),
        }
        if issuer is not None and https_origin(issuer) == issuer:
            doc = issuer_config_document(issuer, issuer + JWKS_PATH, payment_rails=("x402",))
            self._documents[PEAC_ISSUER_PATH] = ("application/json", orjson.dumps(doc))

    def reply(self, request: RequestInfo) -> Answer | None:
        """The document at ``request.path``, or ``None`` when the path is not one of ours."""
        if not request.path.startswith("/.well-known/") or request.method not in ("GET", "HEAD"):
            return None
        found = self._documents.get(request.path)
        if found is None:
            if request.path == PEAC_ISSUER_PATH:
                body = orjson.dumps(
                    {
                        "type": "about:blank",
                        "title": "Not Found",
                        "status": 404,
                        "detail": "this server signs its records with a did:key issuer; "
                        "configure an https issuer to publish peac-issuer.json",
                    }
                )
                return 404, (("content-type", "application/problem+json"),), body
            return None
        content_type, body = found
        headers = (
            ("content-type", content_type),
            ("cache-control", "public, max-age=300"),
            ("access-control-allow-origin", "*"),
        )
        return 200, headers, b"" if request.method == "HEAD" else body


def policy_document(routes: RouteTable, assets: AssetRegistry) -> dict[str, Any]:
    """``peac.txt`` in JSON: ``peac-policy/0.1`` plus farebox's ``routes`` (unknown fields are
    ignored by PEAC readers), each with its price per accepted asset."""
    listed: list[dict[str, Any]] = []
    for route in routes:
        entry: dict[str, Any] = {"method": route.method, "path": route.path}
        if route.description:
            entry["description"] = route.description
        if callable(route.price):
            entry["price"] = "dynamic"
        methods = []
        for index, asset in enumerate(route.assets):
            method: dict[str, Any] = {
                "protocol": "x402",
                "scheme": "exact",
                "network": asset.network,
                "asset": asset.address,
                "payTo": route.pay_to,
            }
            if not callable(route.price):
                amount = route.amounts(_NO_REQUEST)[index]
                method["amount"] = str(amount)
                method["price"] = f"{asset.format(amount)} {asset.symbol}"
            methods.append(method)
        entry["methods"] = methods
        listed.append(entry)
    return {
        "version": "peac-policy/0.1",
        "usage": "conditional",
        "receipts": "required",
        "payment_methods": ["x402"],
        "routes": listed,
    }


# Static prices do not look at the request; this stands in for one when listing them.
_NO_REQUEST = RequestInfo("GET", "/", "", {})
