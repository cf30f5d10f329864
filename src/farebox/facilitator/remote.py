"""A facilitator over HTTP: any x402 facilitator's ``/verify``, ``/settle`` and ``/supported``.

Works against farebox's own service (:mod:`farebox.facilitator.service`) and third-party ones (the
official x402.org facilitator, CDP's). Answers are read defensively: bounded in size and time,
parsed with orjson, and anything that is not a well-formed answer is "not settled", never success.

What counts as what, for the gate (:mod:`farebox.server.gate`), which *releases* the payment's claim
when ``settle`` raises and *keeps* it when ``settle`` returns a pending settlement:

* ``verify`` raises :class:`~farebox.errors.PaymentError`: the facilitator's own reason code for a
  refusal (in a 200 or a 4xx body); ``facilitator_unavailable`` (503) when it could not be reached or
  its answer could not be read (transport error, timeout, 5xx, HTML, truncated or non-JSON body).
* ``settle`` raises ``facilitator_unavailable`` only when the facilitator certainly did nothing: the
  connection was never made, or it refused the request itself (a 3xx or a 4xx without a settle
  body). It returns the facilitator's :class:`~farebox.protocol.models.Settlement` for a readable
  2xx or 4xx answer. When the request may have reached the facilitator but no trustworthy answer came
  back (timeout, connection lost, 5xx, unreadable body, or a "success" in an error status), it
  returns ``settlement_pending``: the facilitator may have broadcast the transfer, so the claim
  must stay until someone reconciles it. Releasing it instead could let the same authorization be
  served twice while paying once; keeping it costs the payer nothing (the authorization expires).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import orjson

from farebox.errors import ConfigError, PaymentError
from farebox.protocol.models import Offer, Resource, Settlement, VerifiedProof
from farebox.protocol.x402 import (
    V1_NETWORKS,
    proof_to_json,
    requirements_to_json,
    settlement_from_json,
)
from farebox.schemes import evm_exact

__all__ = [
    "DEFAULT_V1_RESOURCE",
    "FACILITATOR_TOKEN_ENV",
    "FACILITATOR_URL_ENV",
    "RemoteFacilitator",
    "SupportedKind",
    "SupportedKinds",
]

FACILITATOR_URL_ENV = "X402_FACILITATOR_URL"
FACILITATOR_TOKEN_ENV = "FAREBOX_FACILITATOR_TOKEN"  # noqa: S105 (a variable name)
# x402 v1 requirements carry the resource URL, but the Facilitator protocol hands over only the
# verified proof, and v1 proofs do not name their resource. Facilitators do not check this field
# (it is descriptive), so a stable placeholder stands in when the proof has no resource.
DEFAULT_V1_RESOURCE = "urn:x402:resource"

# What a reason code from another implementation may look like before it reaches our headers.
_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_MESSAGE = 300
_MAX_KINDS = 256
# Connection set-up gets its own, shorter limit: a failure there is known to have sent nothing.
_MAX_CONNECT = 5.0


@dataclass(frozen=True, slots=True)
class SupportedKind:
    """One ``/supported`` kind; ``network`` is CAIP-2 (v1 names are translated)."""

    x402_version: int
    scheme: str
    network: str


@dataclass(frozen=True, slots=True)
class SupportedKinds:
    """A facilitator's ``/supported`` answer."""

    kinds: tuple[SupportedKind, ...]
    extensions: tuple[str, ...] = ()
    signers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def covers(self, offer: Offer) -> bool:
        """Whether some kind settles ``offer``'s scheme on its network."""
        return any(k.scheme == offer.scheme and k.network == offer.network for k in self.kinds)


@dataclass(frozen=True, slots=True)
class _Reply:
    """What came back: a status and parsed JSON, or why there is none."""

    status: int | None
    data: Any = None
    failure: str = ""
    # False only when the request certainly never reached the facilitator.
    delivered: bool = True


class RemoteFacilitator:
    """The :class:`~farebox.facilitator.base.Facilitator` protocol over x402's HTTP API.

    ``url`` is the facilitator's base (``/verify`` etc. are appended); it may embed credentials and
    is never logged or put in a message. ``timeout`` bounds each call in total; ``token`` is sent as
    ``Authorization: Bearer`` (farebox's service requires it on ``/settle``); answers over
    ``max_response`` bytes are unreadable. ``v1_resource`` is the resource URL sent in x402 v1
    requirements when the proof names none (see :data:`DEFAULT_V1_RESOURCE`).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 15.0,
        token: str | None = None,
        client: httpx.AsyncClient | None = None,
        max_response: int = 64 * 1024,
        v1_resource: str = DEFAULT_V1_RESOURCE,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise ConfigError("the facilitator URL is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError("the facilitator URL must be an http(s) URL")
        if timeout <= 0 or max_response <= 0:
            raise ConfigError("timeout and max_response must be positive")
        self._url = url.rstrip("/")
        self.timeout = timeout
        self.max_response = max_response
        self.v1_resource = v1_resource
        self._token = token
        self._client = client
        self._own_client = client is None
        self._supported: SupportedKinds | None = None

    def __repr__(self) -> str:
        # Never the URL (it may carry credentials) nor the token.
        return f"RemoteFacilitator(timeout={self.timeout})"

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **options: Any
    ) -> RemoteFacilitator:
        """A client for ``$X402_FACILITATOR_URL`` (the variable x402 tooling uses), with the bearer
        token from ``$FAREBOX_FACILITATOR_TOKEN`` when set; ``options`` go to the constructor."""
        env = os.environ if environ is None else environ
        url = env.get(FACILITATOR_URL_ENV, "").strip()
        if not url:
            raise ConfigError(f"set {FACILITATOR_URL_ENV} to the facilitator's URL")
        options.setdefault("token", env.get(FACILITATOR_TOKEN_ENV) or None)
        return cls(url, **options)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, _MAX_CONNECT)),
                # A redirect could carry the payment and the token elsewhere: never follow one.
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client, if this object created it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the Facilitator protocol ------------------------------------------------------------------

    def supports(self, offer: Offer) -> bool:
        """``exact`` offers, or, once :meth:`supported` was fetched, the kinds it lists."""
        if self._supported is not None:
            return self._supported.covers(offer)
        return offer.scheme == evm_exact.SCHEME

    async def supported(self) -> SupportedKinds:
        """Fetch ``/supported``; from then on :meth:`supports` follows it."""
        reply = await self._call("GET", "/supported", None)
        if reply.status != 200 or not isinstance(reply.data, dict):
            raise self._unavailable("/supported", reply)
        found = _read_supported(reply.data)
        if found is None:
            raise PaymentError(
                "facilitator_unavailable", "facilitator /supported: malformed answer"
            )
        self._supported = found
        return found

    async def verify(self, verified: VerifiedProof) -> None:
        """Ask ``/verify``; return if valid, else raise with the facilitator's reason code."""
        reply = await self._call("POST", "/verify", self._body(verified))
        status, data = reply.status, reply.data
        readable = status is not None and (200 <= status < 300 or 400 <= status < 500)
        if not readable or not isinstance(data, dict) or not isinstance(data.get("isValid"), bool):
            raise self._unavailable("/verify", reply)
        assert status is not None
        if data["isValid"]:
            if status < 300:
                return
            # "Valid" with an error status contradicts itself: trust neither half.
            raise self._unavailable("/verify", _Reply(status, failure="contradictory answer"))
        raise PaymentError(
            _code(data.get("invalidReason"), "unexpected_verify_error"),
            _message(data.get("invalidMessage")),
            payer=_short(data.get("payer")) or verified.payer,
        )

    async def settle(self, verified: VerifiedProof) -> Settlement:
        """Ask ``/settle``; see the module docstring for how each kind of answer is read."""
        body = self._body(verified)
        reply = await self._call("POST", "/settle", body)
        status, data = reply.status, reply.data
        if status is None:
            if not reply.delivered:
                raise self._unavailable("/settle", reply)
            return self._pending(verified, reply.failure)
        if 300 <= status < 400 or (400 <= status < 500 and not _is_settle_body(data)):
            # Refused before it was handled (redirect, auth, bad request, rate limit): no effect.
            raise self._unavailable("/settle", reply)
        if status >= 500 or status < 200 or data is None:
            return self._pending(verified, reply.failure or f"HTTP {status}", _tx_of(data))
        try:
            settlement = settlement_from_json(data)
        except PaymentError:
            return self._pending(verified, f"unreadable answer (HTTP {status})", _tx_of(data))
        if settlement.success and status >= 300:
            return self._pending(verified, f"success with HTTP {status}", settlement.transaction)
        if settlement.success:
            return settlement
        return Settlement(
            success=False,
            network=settlement.network,
            transaction=settlement.transaction,
            payer=settlement.payer or verified.payer,
            error_reason=_code(settlement.error_reason, "unexpected_settle_error"),
            error_message=_message(settlement.error_message),
            amount=settlement.amount,
            extensions=settlement.extensions,
        )

    # --- helpers -----------------------------------------------------------------------------------

    def _body(self, verified: VerifiedProof) -> bytes:
        proof = verified.proof
        version = proof.x402_version
        resource = proof.resource or Resource(self.v1_resource)
        try:
            payload = proof_to_json(proof)
        except ValueError as exc:
            raise PaymentError("invalid_payload", str(exc)) from None
        document = {
            "x402Version": version,
            "paymentPayload": payload,
            "paymentRequirements": requirements_to_json(
                verified.offer, resource, x402_version=version
            ),
        }
        try:
            return orjson.dumps(document)
        except (TypeError, orjson.JSONEncodeError):
            # A proof built in code (not decoded, so not depth-checked) may not be encodable.
            raise PaymentError("invalid_payload", "the payment cannot be encoded as JSON") from None

    async def _call(self, method: str, path: str, body: bytes | None) -> _Reply:
        headers = {"accept": "application/json"}
        if body is not None:
            headers["content-type"] = "application/json"
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        try:
            with anyio.fail_after(self.timeout):
                async with self._http().stream(
                    method, self._url + path, content=body, headers=headers
                ) as response:
                    status = response.status_code
                    raw = bytearray()
                    async for chunk in response.aiter_bytes():
                        raw += chunk
                        if len(raw) > self.max_response:
                            return _Reply(status, failure="answer too large")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            return _Reply(None, failure="could not connect", delivered=False)
        except TimeoutError:
            return _Reply(None, failure=f"no answer within {self.timeout:g}s")
        except httpx.HTTPError as exc:
            # Name the failure, never the URL (it may embed an API key).
            return _Reply(None, failure=type(exc).__name__)
        try:
            return _Reply(status, orjson.loads(raw))
        except orjson.JSONDecodeError:
            return _Reply(status, failure=f"HTTP {status} without JSON")

    def _unavailable(self, path: str, reply: _Reply) -> PaymentError:
        why = reply.failure or f"HTTP {reply.status}"
        return PaymentError("facilitator_unavailable", f"facilitator {path}: {why}")

    def _pending(self, verified: VerifiedProof, why: str, transaction: str = "") -> Settlement:
        return Settlement(
            success=False,
            network=verified.offer.network,
            transaction=transaction,
            payer=verified.payer,
            error_reason="settlement_pending",
            error_message=f"facilitator /settle: {why}; it may have settled",
        )


def _short(value: Any, limit: int = 128) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _code(value: Any, default: str) -> str:
    # Codes end up in our own response headers: only a plain identifier is passed on.
    return value if isinstance(value, str) and _CODE.fullmatch(value) else default


def _message(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    text = "".join(c if c.isprintable() else " " for c in value[:_MAX_MESSAGE])
    return text.strip() or None


def _is_settle_body(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("success"), bool)


def _tx_of(data: Any) -> str:
    """The transaction an unreliable answer names, so a reconciler knows where to look."""
    if isinstance(data, dict):
        tx = _short(data.get("transaction"))
        if tx is not None and _CODE.fullmatch(tx):
            return tx
    return ""


def _read_supported(data: dict[str, Any]) -> SupportedKinds | None:
    raw_kinds = data.get("kinds")
    if not isinstance(raw_kinds, list) or len(raw_kinds) > _MAX_KINDS:
        return None
    kinds: list[SupportedKind] = []
    for item in raw_kinds:
        if not isinstance(item, dict):
            return None
        version, scheme, network = item.get("x402Version"), item.get("scheme"), item.get("network")
        if isinstance(version, bool) or not isinstance(version, int):
            return None
        if _short(scheme) is None or _short(network) is None:
            return None
        assert isinstance(scheme, str)
        assert isinstance(network, str)
        if ":" not in network:
            translated = V1_NETWORKS.get(network)
            if translated is None:
                continue  # a v1 network we cannot name in CAIP-2: we could never pay on it
            network = translated
        kinds.append(SupportedKind(version, scheme, network))
    extensions = data.get("extensions")
    signers = data.get("signers")
    return SupportedKinds(
        kinds=tuple(kinds),
        extensions=tuple(e for e in extensions if _short(e))[:_MAX_KINDS]
        if isinstance(extensions, list)
        else (),
        signers={
            family: tuple(s for s in addresses[:_MAX_KINDS] if _short(s))
            for family, addresses in list(signers.items())[:_MAX_KINDS]
            if isinstance(family, str) and isinstance(addresses, list)
        }
        if isinstance(signers, dict)
        else {},
    )
