"""The facilitator service: x402's ``/verify``, ``/settle`` and ``/supported`` as a pure ASGI app.

Any x402 resource server (farebox's gate through
:class:`~farebox.facilitator.remote.RemoteFacilitator`, or the official SDKs'
``HTTPFacilitatorClient``) can verify and settle ``exact`` EVM payments through it. Requests are
read the way the official client sends them (``{"x402Version", "paymentPayload",
"paymentRequirements"}``, x402 v1 and v2) and answered in the official shapes.

HTTP status rules: a refused payment is a 200 carrying ``isValid: false`` / ``success: false`` and
the x402 reason code (what the reference facilitators do); a request that cannot be read at all is
a 400 ``application/problem+json``; a body over the limit is a 413. Nothing raises out of the app.

One nonce is settled at most once, and answered ``success: true`` at most once: the proof's
``claim_key`` (network, token, payer, EIP-3009 nonce) is claimed in the
:class:`~farebox.store.base.Store` first, and only the request that took the claim broadcasts and
can answer success. A repeated or concurrent ``/settle`` (or ``/verify``) of a claimed nonce, for
the same authorization or another one signed with the same nonce, is refused with
``invalid_exact_evm_nonce_already_used``; the message says whether it was this authorization or
another, and names the transaction when there is one. A resource server that lost the answer to
its own ``/settle`` learns the outcome from that refusal (``this authorization was already
settled in transaction 0x...``) and can confirm it on chain: the token's
``authorizationState(payer, nonce)`` and the transaction's ``Transfer`` log.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import orjson

from farebox._asgi import Receive, Scope, Send, run_lifespan, send_response
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.openapi import openapi_document
from farebox.ledgers.evm import EvmLedger
from farebox.ops.reconcile import Reconciler
from farebox.protocol.lifecycle import claim_outcome
from farebox.protocol.models import Offer, Proof, Settlement, VerifiedProof
from farebox.protocol.x402 import (
    V1_NETWORKS,
    find_offer,
    proof_from_json,
    requirements_from_json,
    settlement_to_json,
)
from farebox.schemes import evm_exact, verifier
from farebox.schemes.evm_exact import VerifiedEvmProof
from farebox.settle import record_outcome, settlement_event
from farebox.store.base import Claim, Event, Store

__all__ = ["DEFAULT_MAX_BODY", "FacilitatorApp", "facilitator_app", "openapi_document"]

logger = logging.getLogger("farebox.facilitator")

DEFAULT_MAX_BODY = 64 * 1024

_JSON = "application/json"
_PROBLEM = "application/problem+json"
_SETTLE_ROUTE = "POST /settle"
_NONCE_USED = "invalid_exact_evm_nonce_already_used"
# Between the authorization's name and the attempt's random part, in a claim's owner.
_OWNER_SEP = ":"
# The claim's move for each settlement outcome (see farebox.protocol.lifecycle).
_MOVES: Mapping[str, Literal["settle", "hold_pending", "release"]] = {
    "settled": "settle",
    "pending": "hold_pending",
    "release": "release",
}


@dataclass(frozen=True, slots=True)
class _Request:
    """A readable ``/verify`` or ``/settle`` body."""

    version: int
    proof: Proof
    offer: Offer


class _BadRequest(Exception):
    """The request cannot be read: answered with a problem document, never a refusal body."""

    def __init__(self, error: PaymentError) -> None:
        super().__init__(error.code)
        self.error = error


def _problem(error: PaymentError, status: int | None = None) -> PaymentError:
    """``error`` answered with HTTP ``status`` (the problem's ``status`` must match the reply's)."""
    return PaymentError(error.code, error.message, status=status or error.status, payer=error.payer)


class FacilitatorApp:
    """The ASGI app :func:`facilitator_app` returns; see the module docstring for the contract."""

    def __init__(
        self,
        facilitator: LocalFacilitator,
        store: Store,
        *,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        clock: Callable[[], float] = time.time,
        settle_wait: float = 30.0,
        poll_interval: float = 0.02,
        close_on_shutdown: bool = False,
        reconcile_every: float | None = None,
    ) -> None:
        if max_body <= 0:
            raise ValueError("max_body must be positive")
        self.facilitator = facilitator
        self.store = store
        self._token = token.encode("utf-8") if token else None
        self.max_body = max_body
        self.clock = clock
        self.settle_wait = settle_wait
        self.poll_interval = poll_interval
        self.close_on_shutdown = close_on_shutdown
        self.reconcile_every = reconcile_every
        ledgers = list(facilitator.ledgers)
        self._supported = _supported_document(ledgers)
        self._openapi = orjson.dumps(openapi_document(bearer=self._token is not None))
        self._routes: Mapping[
            tuple[str, str], Callable[[Scope, Receive], Awaitable[tuple[int, str, bytes]]]
        ] = {
            ("POST", "/verify"): self._verify,
            ("POST", "/settle"): self._settle,
            ("GET", "/supported"): self._get_supported,
            ("GET", "/openapi.json"): self._get_openapi,
        }

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        extra: list[tuple[bytes, bytes]] = []
        try:
            status, content_type, body = await self._dispatch(scope, receive, extra)
        except Exception:
            # A bug, never a payment outcome: say nothing about it to the caller.
            logger.exception("facilitator: unexpected error on %s", scope.get("path", "?"))
            error = PaymentError("unexpected_error", "internal error", status=500)
            status, content_type, body = 500, _PROBLEM, orjson.dumps(error.to_problem())
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        await send_response(send, status, body, headers)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        every = self.reconcile_every
        background = None
        if every is not None:
            # Claims this service left pending (an answer lost) or held (a crash) are resolved
            # from the chain, so a later /settle of the same authorization is not stuck on them.
            reconciler = Reconciler(self.store, self.facilitator.ledgers)

            async def background() -> None:
                await reconciler.run_forever(interval=every)

        await run_lifespan(
            receive,
            send,
            self.aclose if self.close_on_shutdown else None,
            background=background,
        )

    async def aclose(self) -> None:
        """Close the facilitator's node connections and the store."""
        try:
            await self.facilitator.aclose()
        finally:
            await self.store.aclose()

    async def _dispatch(
        self, scope: Scope, receive: Receive, extra: list[tuple[bytes, bytes]]
    ) -> tuple[int, str, bytes]:
        method, path = scope.get("method", "GET"), scope.get("path", "/")
        handler = self._routes.get((method, path))
        if handler is None:
            allowed = [m for (m, p) in self._routes if p == path]
            if allowed:
                extra.append((b"allow", ", ".join(allowed).encode("latin-1")))
                error = PaymentError("method_not_allowed", f"use {allowed[0]}", status=405)
            else:
                error = PaymentError("not_found", "no such endpoint", status=404)
            return error.status, _PROBLEM, orjson.dumps(error.to_problem())
        if path == "/settle" and not self._authorized(scope):
            extra.append((b"www-authenticate", b'Bearer realm="farebox-facilitator"'))
            error = PaymentError("unauthorized", "a valid bearer token is required", status=401)
            return 401, _PROBLEM, orjson.dumps(error.to_problem())
        try:
            return await handler(scope, receive)
        except _BadRequest as bad:
            return bad.error.status, _PROBLEM, orjson.dumps(bad.error.to_problem())

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            return True
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).strip().partition(b" ")
                # Constant time: the comparison must not tell how much of a guess was right.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    given.strip(), self._token
                )
        return False

    # --- reading -----------------------------------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _BadRequest(
                        PaymentError("invalid_payload", "bad Content-Length", status=400)
                    ) from None
                if declared > self.max_body:
                    # Refused before reading a byte of it.
                    raise _BadRequest(self._too_large())
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _BadRequest(PaymentError("invalid_payload", "client went away", status=400))
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BadRequest(self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> PaymentError:
        return PaymentError(
            "payload_too_large", f"the body exceeds {self.max_body} bytes", status=413
        )

    async def _request(self, scope: Scope, receive: Receive) -> _Request:
        raw = await self._body(scope, receive)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _BadRequest(
                PaymentError("invalid_payload", "the body is not JSON", status=400)
            ) from None
        if not isinstance(data, dict):
            raise _BadRequest(
                PaymentError("invalid_payload", "the body must be a JSON object", status=400)
            )
        version = data.get("x402Version")
        if isinstance(version, bool) or version not in (1, 2):
            raise _BadRequest(
                PaymentError(
                    "invalid_x402_version", "x402Version must be the number 1 or 2", status=400
                )
            )
        try:
            proof = proof_from_json(data.get("paymentPayload"))
            if proof.x402_version != version:
                raise PaymentError(
                    "invalid_x402_version", "paymentPayload.x402Version differs from x402Version"
                )
            # An unknown network is unreadable here too (a v1 name has no CAIP-2 translation).
            offer = requirements_from_json(data.get("paymentRequirements"), x402_version=version)
        except PaymentError as exc:
            raise _BadRequest(_problem(exc, 400)) from None
        return _Request(version, proof, offer)

    def _check_offline(self, request: _Request) -> VerifiedProof:
        """The gate's checks: scheme and network served, proof matches, signature and terms."""
        offer = request.offer
        verify = verifier(offer)
        if verify is None:
            raise PaymentError("unsupported_scheme", f"cannot settle scheme {offer.scheme[:32]!r}")
        if not self.facilitator.supports(offer):
            raise PaymentError("invalid_network", f"no ledger for {offer.network[:64]}")
        find_offer(request.proof, (offer,))
        return verify(request.proof, offer, now=int(self.clock()))

    # --- /verify -----------------------------------------------------------------------------------

    async def _verify(self, scope: Scope, receive: Receive) -> tuple[int, str, bytes]:
        request = await self._request(scope, receive)
        try:
            verified = self._check_offline(request)
            # A nonce claimed here is spent, or being spent, whatever the chain says yet: the
            # official middleware runs the handler on a valid verdict, so refuse before that.
            claimed = await self.store.get_claim(verified.claim_key)
            if claimed is not None:
                raise PaymentError(*_taken(claimed, _identity(verified)), payer=verified.payer)
            await self.facilitator.verify(verified)
        except PaymentError as exc:
            answer: dict[str, Any] = {
                "isValid": False,
                "invalidReason": exc.code,
                "invalidMessage": exc.message,
            }
            payer = exc.payer or _payer_of(request.proof)
            if payer:
                answer["payer"] = payer
            return 200, _JSON, orjson.dumps(answer)
        return 200, _JSON, orjson.dumps({"isValid": True, "payer": verified.payer})

    # --- /settle -----------------------------------------------------------------------------------

    async def _settle(self, scope: Scope, receive: Receive) -> tuple[int, str, bytes]:
        request = await self._request(scope, receive)
        try:
            verified = self._check_offline(request)
        except PaymentError as exc:
            settlement = self._refused(request, exc)
        else:
            # Once a claim is taken, a caller hanging up must not interrupt the bookkeeping.
            with anyio.CancelScope(shield=True):
                settlement = await self._settle_once(verified)
        body = settlement_to_json(settlement, x402_version=request.version)
        return 200, _JSON, orjson.dumps(body)

    def _refused(self, request: _Request, exc: PaymentError) -> Settlement:
        return Settlement(
            success=False,
            network=request.offer.network,
            payer=exc.payer or _payer_of(request.proof),
            error_reason=exc.code,
            error_message=exc.message,
        )

    async def _settle_once(self, verified: VerifiedProof) -> Settlement:
        """Settle ``verified`` unless its nonce was (or is being) settled already.

        Only the request that takes the claim broadcasts, and only its answer can be a success:
        a resource server serves on that answer alone (the official middleware does), so a
        second "success" for one transfer is a response given away. Every other request, a
        retry or a concurrent duplicate of the same authorization, or another authorization
        that shares its nonce, is refused with ``invalid_exact_evm_nonce_already_used``, naming
        the transaction when one is known. A request that finds the claim held waits (up to
        ``settle_wait``) for the holder: released, the nonce is free again and it claims it.
        """
        key = verified.claim_key
        mine = _identity(verified)
        deadline = time.monotonic() + self.settle_wait
        while True:
            # The owner names the authorization as well as the attempt: whoever finds the claim
            # later can tell "this authorization" from "another one with this nonce".
            owner = f"{mine}{_OWNER_SEP}{secrets.token_hex(8)}"
            try:
                if await self.store.claim(key, owner=owner, now=int(self.clock())) is not None:
                    return await self._settle_claimed(verified, owner)
                existing = await self.store.get_claim(key)
            except PaymentError as exc:  # the store is down: nothing was broadcast
                return self._outcome(verified, exc.code, exc.message)
            late = time.monotonic() >= deadline
            if existing is None and not late:
                # Released between the two calls: claim again at once (after a yield).
                await anyio.sleep(0)
                continue
            if existing is None or existing.state != "held" or late:
                return self._outcome(verified, *_taken(existing, mine))
            await anyio.sleep(self.poll_interval)

    def _outcome(self, verified: VerifiedProof, code: str, message: str) -> Settlement:
        # A refusal names no transaction in its field (the official shape): a server must not
        # file someone else's transfer under this payment. The message names it.
        return Settlement(
            success=False,
            network=verified.offer.network,
            payer=verified.payer,
            error_reason=code,
            error_message=message,
        )

    async def _settle_claimed(self, verified: VerifiedProof, owner: str) -> Settlement:
        key = verified.claim_key
        try:
            # Settling re-checks against the chain (the token, then a simulation right before
            # signing): a transfer that would revert is refused without spending gas on it.
            settlement = await self.facilitator.settle(verified)
        except PaymentError as exc:
            # Nothing was broadcast (settle raises only then): the authorization stays usable.
            await self._record(key, owner, "release", None, ())
            return self._outcome(verified, exc.code, exc.message)
        except BaseException:
            # Unknown whether anything was sent: keep the claim, never settle it a second time.
            logger.exception("facilitator: settlement of %s failed unexpectedly", key)
            await self._record(key, owner, "hold_pending", None, ())
            raise
        offer = verified.offer
        event = settlement_event(
            _SETTLE_ROUTE,
            int(self.clock()),
            claim=key,
            success=settlement.success,
            network=offer.network,
            amount=offer.amount,
            payer=verified.payer,
            transaction=settlement.transaction,
            error=settlement.error_reason,
            asset=offer.asset,
            pay_to=offer.pay_to,
            valid_until=verified.valid_until,
            authorization=_identity(verified),
        )
        # Settled, or the money may have moved (the claim stays until reconciled), or mined and
        # reverted (no money moved, the payer may try again).
        move = _MOVES[claim_outcome(settlement)]
        await self._record(key, owner, move, settlement.transaction, (event,))
        return settlement

    async def _record(
        self,
        key: str,
        owner: str,
        move: Literal["settle", "hold_pending", "release"],
        transaction: str | None,
        events: tuple[Event, ...],
    ) -> None:
        await record_outcome(
            self.store,
            key,
            owner=owner,
            move=move,
            transaction=transaction,
            events=events,
            what=_SETTLE_ROUTE,
        )

    # --- documents ---------------------------------------------------------------------------------

    async def _get_supported(self, scope: Scope, receive: Receive) -> tuple[int, str, bytes]:
        return 200, _JSON, self._supported

    async def _get_openapi(self, scope: Scope, receive: Receive) -> tuple[int, str, bytes]:
        return 200, _JSON, self._openapi


def facilitator_app(
    facilitator: LocalFacilitator,
    store: Store,
    *,
    token: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    clock: Callable[[], float] = time.time,
    settle_wait: float = 30.0,
    close_on_shutdown: bool = False,
    reconcile_every: float | None = None,
) -> FacilitatorApp:
    """The x402 facilitator service over ``facilitator``'s ledgers, recording in ``store``.

    ``token``, when set, is required as ``Authorization: Bearer <token>`` on ``/settle`` (the
    endpoint that spends the settler's gas); ``/verify`` and ``/supported`` stay open. Bodies over
    ``max_body`` bytes are refused with 413. ``settle_wait`` bounds how long a ``/settle`` waits for
    a concurrent settlement of the same authorization. With ``close_on_shutdown`` the ASGI
    lifespan shutdown closes the facilitator and the store. With ``reconcile_every`` (seconds),
    the lifespan runs a :class:`~farebox.ops.reconcile.Reconciler` over the store's unfinished
    claims that often (``farebox facilitator`` does, every 30 s).
    """
    return FacilitatorApp(
        facilitator,
        store,
        token=token,
        max_body=max_body,
        clock=clock,
        settle_wait=settle_wait,
        close_on_shutdown=close_on_shutdown,
        reconcile_every=reconcile_every,
    )


def _identity(verified: VerifiedProof) -> str:
    """The whole authorization's name (the claim key names only its nonce)."""
    if isinstance(verified, VerifiedEvmProof):
        return evm_exact.authorization_id(verified)
    return verified.claim_key


def _taken(claim: Claim | None, mine: str) -> tuple[str, str]:
    """The refusal of a request that found ``claim`` taken by another: code and message.

    ``None`` is a claim that kept changing hands until this request stopped waiting.
    """
    if claim is None:
        return _NONCE_USED, "this nonce is being settled by other requests"
    holder = claim.owner.rpartition(_OWNER_SEP)[0] if _OWNER_SEP in claim.owner else ""
    whose = (
        "this authorization"
        if holder == mine
        else "another authorization with the same nonce"
        if holder
        else "an authorization with this nonce"
    )
    tx = claim.transaction
    if claim.state == "settled":
        where = f" in transaction {tx}" if tx else ""
        message = f"{whose} was already settled{where}"
    elif claim.state == "pending":
        what = f"transaction {tx}" if tx else "a transaction that may have been sent"
        message = f"{whose} was already broadcast, in {what}, not confirmed yet"
    else:
        message = f"{whose} is being settled by another request"
    return _NONCE_USED, message


def _payer_of(proof: Proof) -> str | None:
    authorization = proof.payload.get("authorization")
    if isinstance(authorization, Mapping):
        payer = authorization.get("from")
        if isinstance(payer, str) and len(payer) <= 64:
            return payer
    return None


def _supported_document(ledgers: Iterable[EvmLedger]) -> bytes:
    v1_names = {caip2: name for name, caip2 in V1_NETWORKS.items()}
    kinds: list[dict[str, Any]] = []
    signers: list[str] = []
    ledgers = list(ledgers)
    for ledger in ledgers:
        kinds.append({"x402Version": 2, "scheme": evm_exact.SCHEME, "network": ledger.network})
    for ledger in ledgers:
        name = v1_names.get(ledger.network)
        if name is not None:
            kinds.append({"x402Version": 1, "scheme": evm_exact.SCHEME, "network": name})
    for ledger in ledgers:
        settler: EvmAccount = ledger.settler
        if settler.address not in signers:
            signers.append(settler.address)
    return orjson.dumps(
        {"kinds": kinds, "extensions": [], "signers": {"eip155:*": signers} if signers else {}}
    )
