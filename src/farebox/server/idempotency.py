"""Idempotent retries, with no web framework in sight: ids, fingerprints, store keys, replays.

A paid request may carry an idempotency id: the x402 ``payment-identifier`` extension inside the
proof (``extensions["payment-identifier"]["info"]["id"]``), else the ``Idempotency-Key`` header.
Either way the id must be 16 to 128 characters of ``[A-Za-z0-9_-]`` (the extension's rule, applied
to the header too so that both spellings of one id behave alike); anything else is refused with
``invalid_payload`` rather than silently ignored, because a client sending an id relies on it.

Design decisions:

* **Scope.** The store key is a SHA-256 over the API (the request's origin and the offer's payTo),
  the route and the payer address
  recovered from the verified proof, then the id. An ``Idempotency-Key`` is chosen by the client,
  so without the payer in the key anyone who saw (or guessed) a key could read another client's
  paid response by sending it with any cheap proof of their own. With it, reading a stored
  response requires a proof signed by the same payer. The id is therefore only honoured on
  requests with a readable, offline-verified proof; an unpaid request gets the 402 as always.
  Origin, payTo and route keep two APIs (or two routes) sharing one store apart. Not the
  receipt issuer: workers started without a persistent receipt key each sign as their own
  did:key, and one API behind a load balancer must find its retries on every worker.
* **Fingerprint.** Method, full URL and the SHA-256 of the request body; never the payment
  headers, so a retry with a freshly signed payment is the same request.
* **Limits.** The request body is read to fingerprint it, up to ``max_request_body`` (1 MiB by
  default; larger is a 413 on a paid route with an id). The response body is stored up to
  ``max_stored_body`` (1 MiB); beyond that only status and headers are kept, with a marker, and a
  retry gets a 409 ``idempotency_conflict`` saying the response cannot be replayed (the money moved
  once; the client must not be charged again, and cannot be served again either).
* **Concurrency.** The store's ``begin_idempotent`` is atomic: one request runs; the others poll
  the entry (50 ms, growing to 500 ms) for up to ``wait`` seconds (15 by default), then get a 409
  ``idempotency_in_progress`` with ``Retry-After``. An entry that disappears while waited on was
  abandoned (nothing charged), and the waiter tries to become the runner itself.
* **Withheld responses.** A settlement broadcast but not confirmed in time answers a 402
  ``settlement_pending`` instead of the app's response, and the entry keeps that answer with a
  marker naming the payment. A retry with the same id reads the payment's claim: still pending,
  it hears the same; settled since (the reconciler confirmed it), the one retry that reopens the
  entry (:meth:`~farebox.store.base.Store.reopen_idempotent`, atomic) runs the app and is
  delivered what was paid for, once, with a receipt naming the transaction, and spends nothing of
  its own proof; released (the money never moved), the entry is reopened and the retry pays as
  any request does.
* **Dead runners.** An entry still running after ``stale`` seconds (120 by default) belongs to a
  request whose process died. The entry records the claim key of the proof that request spent,
  and its claim tells what happened: settled or pending, a 409 names the transaction; released
  or never taken, the entry is dropped and the retry runs; still held, the retry keeps getting
  ``idempotency_in_progress`` until reconciliation resolves the claim.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from farebox._wire import IDEMPOTENCY_KEY as _IDEMPOTENCY_KEY
from farebox._wire import PAYMENT_IDENTIFIER
from farebox.errors import PaymentError
from farebox.protocol.models import Proof
from farebox.store.base import IdempotencyEntry, Store, StoredResponse, payer_key

__all__ = [
    "DEFAULT_MAX_REQUEST_BODY",
    "DEFAULT_MAX_STORED_BODY",
    "DEFAULT_STALE",
    "DEFAULT_WAIT",
    "IDEMPOTENCY_KEY",
    "PAYMENT_IDENTIFIER",
    "REPLAYED",
    "BodyCapture",
    "BodyReader",
    "IdempotentRun",
    "Withheld",
    "body_omitted",
    "declaration",
    "fingerprint",
    "late_owner",
    "new_id",
    "read_id",
    "replay_headers",
    "scope_key",
    "spent_by",
    "stored_response",
    "wait_for",
    "withheld",
    "withholding",
]

IDEMPOTENCY_KEY = _IDEMPOTENCY_KEY.lower()  # request headers are read in lower case
#: Added to a replayed response, so a client (and its operator) can tell it was not run again.
REPLAYED = "Idempotent-Replayed"

MIN_ID = 16
MAX_ID = 128
_ID = re.compile(r"[A-Za-z0-9_-]+")

DEFAULT_MAX_REQUEST_BODY = 1024 * 1024
DEFAULT_MAX_STORED_BODY = 1024 * 1024
DEFAULT_WAIT = 15.0
#: A running entry older than this (seconds) is taken for one whose request died: far longer than
#: a paid request runs (the app, then a settlement waiting for the chain), so never a live one.
DEFAULT_STALE = 120.0
_POLL_FIRST = 0.05
_POLL_MAX = 0.5

# Stored (never sent) in place of a body too large to keep; its value is the body's size.
_OMITTED = "x-farebox-idempotent-body-omitted"
# Stored (never sent) with an answer that withheld the response of a payment not confirmed yet;
# its value is that payment (JSON), for the retry that is delivered once it settled.
_WITHHELD = "x-farebox-idempotent-withheld"
_STORED_ONLY = ("content-length", "transfer-encoding", _OMITTED, _WITHHELD)
# Joins a claim's owner to the owner of the retry that delivers for it (owners are hex tokens).
_LATE = ".late."

#: Reads the request body for the gate, once: the body, or ``None`` when it exceeds the limit.
BodyReader = Callable[[], Awaitable[bytes | None]]

_SCHEMA: Mapping[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "required": {"type": "boolean"},
        "id": {
            "type": "string",
            "minLength": MIN_ID,
            "maxLength": MAX_ID,
            "pattern": "^[a-zA-Z0-9_-]+$",
        },
    },
    "required": ["required"],
}


@dataclass(frozen=True, slots=True)
class Withheld:
    """A payment whose response was withheld (not confirmed when it answered), as its entry
    keeps it: the claim it spent, who spent it, and what it paid (``network``, ``asset``,
    ``amount`` in atomic units, ``payer``). ``answer`` is the stored 402, marker included.
    ``transaction`` is the one that settled it, once a retry found it settled."""

    claim: str
    owner: str
    network: str
    asset: str
    amount: int
    payer: str
    answer: StoredResponse
    transaction: str = ""


@dataclass(frozen=True, slots=True)
class IdempotentRun:
    """A paid request that took its idempotency key and runs: who owns it, under which key.

    ``delivers`` is set for a retry that is delivered a payment settled after its response was
    withheld: it runs the app without spending a proof of its own."""

    key: str
    owner: str
    fingerprint: str
    delivers: Withheld | None = None


def declaration(*, required: bool = False) -> dict[str, Any]:
    """The ``payment-identifier`` entry a 402's ``extensions`` carries (x402 v2)."""
    return {"info": {"required": required}, "schema": dict(_SCHEMA)}


def new_id() -> str:
    """A fresh id for one logical request: ``pay_`` and 32 random hex digits."""
    return "pay_" + secrets.token_hex(16)


def _valid(value: str, where: str) -> str:
    if not MIN_ID <= len(value) <= MAX_ID or _ID.fullmatch(value) is None:
        raise PaymentError(
            "invalid_payload",
            f"{where} must be {MIN_ID} to {MAX_ID} characters of A-Z, a-z, 0-9, '_' and '-'",
        )
    return value


def read_id(proof: Proof | None, headers: Mapping[str, str]) -> str | None:
    """The request's idempotency id: the proof's ``payment-identifier``, else the header (the
    only place for it without an x402 proof).

    The extension wins when both are present: it is the x402 spelling and travels with the
    payment itself. ``Idempotency-Key`` may be an RFC 8941 string (``"..."``, as the IETF draft
    writes it) or bare. Raises ``invalid_payload`` for an id that breaks the format.
    """
    extension = proof.extensions.get(PAYMENT_IDENTIFIER) if proof is not None else None
    if isinstance(extension, Mapping):
        info = extension.get("info")
        found = info.get("id") if isinstance(info, Mapping) else None
        if found is not None:
            if not isinstance(found, str):
                raise PaymentError("invalid_payload", "payment-identifier id must be a string")
            return _valid(found, "payment-identifier id")
    header = headers.get(IDEMPOTENCY_KEY)
    if header is None:
        return None
    value = header.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return _valid(value, "Idempotency-Key")


def fingerprint(method: str, url: str, body: bytes) -> str:
    """What makes two requests the same: method, full URL and the body's SHA-256."""
    digest = hashlib.sha256(body).hexdigest()
    return hashlib.sha256(f"{method.upper()}\n{url}\n{digest}".encode()).hexdigest()


def scope_key(api: str, route: str, payer: str, request_id: str) -> str:
    """The store key of ``request_id``: scoped to one API, one route and one payer (see above)."""
    parts = "\n".join((api, route, payer_key(payer), request_id))
    return "idem:" + hashlib.sha256(parts.encode()).hexdigest()


def stored_response(
    status: int, headers: tuple[tuple[str, str], ...], body: bytes, *, overflow: int | None
) -> StoredResponse:
    """What to keep of a delivered response; ``overflow`` is the body's size when it was too
    large to keep (the body is then dropped and a marker header stored instead)."""
    # The markers are the gate's alone: an app (or an upstream) sending one would otherwise have
    # its response read back as withheld or cut short.
    headers = tuple((n, v) for n, v in headers if n.lower() not in (_OMITTED, _WITHHELD))
    if overflow is None:
        return StoredResponse(status, headers, body)
    return StoredResponse(status, (*headers, (_OMITTED, str(overflow))), b"")


def body_omitted(response: StoredResponse) -> bool:
    """Whether ``response`` was stored without its body (too large to replay)."""
    return any(name == _OMITTED for name, _ in response.headers)


def withholding(
    answer: StoredResponse,
    *,
    claim: str,
    owner: str,
    network: str,
    asset: str,
    amount: int,
    payer: str,
) -> StoredResponse:
    """``answer`` (the 402 sent instead of a response whose payment is not confirmed) as its
    entry keeps it: marked with the payment, so that a retry can be delivered once it settled."""
    payment = {
        "claim": claim,
        "owner": owner,
        "network": network,
        "asset": asset,
        "amount": str(amount),
        "payer": payer,
    }
    marker = (_WITHHELD, orjson.dumps(payment).decode())
    return StoredResponse(answer.status, (*answer.headers, marker), answer.body)


def withheld(response: StoredResponse) -> Withheld | None:
    """The payment a stored answer withheld the response of, or ``None`` for any other (and for
    a marker that does not read as one, which only a damaged store could hold)."""
    if response.status != 402:
        return None
    raw = next((value for name, value in response.headers if name == _WITHHELD), None)
    if raw is None:
        return None
    try:
        payment = orjson.loads(raw)
        return Withheld(
            claim=str(payment["claim"]),
            owner=str(payment["owner"]),
            network=str(payment["network"]),
            asset=str(payment["asset"]),
            amount=int(payment["amount"]),
            payer=str(payment["payer"]),
            answer=response,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def late_owner(claim_owner: str) -> str:
    """The owner of a retry delivering for ``claim_owner``'s claim: it is that payment's
    request, run again, so a dead delivery is judged by the claim like its first attempt."""
    return f"{claim_owner}{_LATE}{secrets.token_hex(8)}"


def spent_by(claim_owner: str, entry_owner: str) -> bool:
    """Whether an entry of ``entry_owner`` is the request that spent a claim of
    ``claim_owner``: its first attempt, or a retry delivering for it."""
    return entry_owner == claim_owner or entry_owner.startswith(claim_owner + _LATE)


def replay_headers(response: StoredResponse) -> tuple[tuple[str, str], ...]:
    """The stored headers, marked as a replay; length and framing are the face's to set."""
    kept = tuple(
        (name, value) for name, value in response.headers if name.lower() not in _STORED_ONLY
    )
    return (*kept, (REPLAYED, "true"))


async def wait_for(
    store: Store, key: str, *, timeout: float, clock: Callable[[], float] = anyio.current_time
) -> IdempotencyEntry | None:
    """Poll ``key`` until its request is done; ``None`` when the entry went away (abandoned).

    Returns the still-running entry when ``timeout`` seconds passed first. Polling, not a
    notification, because the runner may live in another process sharing the store.
    """
    deadline = clock() + timeout
    delay = _POLL_FIRST
    while True:
        entry = await store.get_idempotent(key)
        if entry is None or entry.response is not None:
            return entry
        left = deadline - clock()
        if left <= 0:
            return entry
        await anyio.sleep(min(delay, left))
        delay = min(delay * 2, _POLL_MAX)


class BodyCapture:
    """A copy of a response body as it streams by, up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._chunks: list[bytes] = []
        self._whole = True

    def add(self, chunk: bytes) -> None:
        """Count ``chunk``, keeping it while the whole still fits."""
        self.size += len(chunk)
        if self.size <= self.limit:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    def abandon(self) -> None:
        """The body ended early (the app failed mid-way): what was kept must not be replayed."""
        self._whole = False
        self._chunks.clear()

    @property
    def overflow(self) -> int | None:
        """The size seen when the body cannot be replayed (over the limit, or cut short)."""
        return self.size if self.size > self.limit or not self._whole else None

    @property
    def body(self) -> bytes:
        """The body kept so far (empty after an overflow or :meth:`abandon`)."""
        return b"".join(self._chunks)
