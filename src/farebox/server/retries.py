"""Idempotent retries of paid requests: a request's id is taken before its payment is claimed,
and its response kept for the retries (see :mod:`farebox.server.idempotency` for the pieces).

A retry with the same id and the same request gets the stored response and claims nothing (its
payment stays usable), a different request under the id gets a 409, and concurrent ones wait for
the first. An entry whose request died is judged by the claim of the payment it spent; one whose
response was withheld (its payment pending) is delivered once that payment settles.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import anyio

from farebox.errors import PaymentError
from farebox.protocol.models import Proof
from farebox.rails.base import Admission
from farebox.server.idempotency import (
    BodyCapture,
    BodyReader,
    IdempotentRun,
    Withheld,
    body_omitted,
    fingerprint,
    late_owner,
    read_id,
    replay_headers,
    scope_key,
    spent_by,
    stored_response,
    wait_for,
    withheld,
)
from farebox.server.replies import Reply
from farebox.server.routes import RequestInfo, Route
from farebox.store.base import Event, IdempotencyEntry, Store, StoredResponse, append_quietly

__all__ = ["Retries", "Scope"]

logger = logging.getLogger("farebox.server")


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose idempotency ids these are: the payee and payer they are scoped by, and the claim the
    request will spend (a stale entry is judged by that claim)."""

    payee: str
    payer: str
    claim_key: str


class Retries:
    """The idempotency ids of paid requests, in ``store``.

    ``max_request_body`` bounds the body read to fingerprint a request (larger is a 413); ``wait``
    is how long a concurrent request with the same id waits for the first before a 409; ``stale``
    is the age past which a still-running entry is taken for one whose process died (see
    :class:`~farebox.server.gate.Gate`); ``clock`` returns Unix seconds.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        *,
        max_request_body: int,
        wait: float,
        stale: float,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_request_body = max_request_body
        self.wait = wait
        self.stale = stale

    async def take(
        self,
        route: Route,
        request: RequestInfo,
        proof: Proof | None,
        scope: Scope,
        owner: str,
        now: int,
        body: BodyReader | None,
    ) -> IdempotentRun | Reply | None:
        """Take the request's idempotency id (from the x402 ``proof`` or ``Idempotency-Key``), or
        answer from the request that has it; ``None`` without an id, or without a body reader
        (nothing to fingerprint, so nothing could be replayed safely)."""
        if body is None:
            return None
        request_id = read_id(proof, request.headers)
        if request_id is None:
            return None
        return await self._begin(route, request, scope, request_id, owner, now, body)

    @asynccontextmanager
    async def forgotten_on_error(self, run: IdempotentRun | None) -> AsyncIterator[None]:
        """Give the id back when the payment is not admitted, so a retry runs afresh."""
        try:
            yield
        except BaseException:
            if run is not None:
                with anyio.CancelScope(shield=True):
                    await self.forget(run)
            raise

    async def _begin(
        self,
        route: Route,
        request: RequestInfo,
        scope: Scope,
        request_id: str,
        owner: str,
        now: int,
        body: BodyReader,
    ) -> IdempotentRun | Reply:
        """Take the id for this request, or answer it from (or despite) the request that has."""
        raw = await body()
        if raw is None:
            raise PaymentError(
                "payload_too_large",
                f"a paid request with an idempotency id may carry at most "
                f"{self.max_request_body} bytes of body (it is fingerprinted)",
                status=413,
                payer=scope.payer,
            )
        origin = urlsplit(request.url)
        api = f"{origin.scheme}://{origin.netloc} {scope.payee}"
        key = scope_key(api, route.name, scope.payer, request_id)
        request_print = fingerprint(request.method, request.url, raw)
        while True:
            entry = await self.store.begin_idempotent(
                key, fingerprint=request_print, owner=owner, now=now, claim=scope.claim_key
            )
            if entry is None:
                return IdempotentRun(key, owner, request_print)
            if entry.fingerprint != request_print:
                raise PaymentError(
                    "idempotency_conflict",
                    "this idempotency id was used for another request (method, URL or body)",
                    payer=scope.payer,
                )
            if entry.response is None:
                # An entry already stale is decided at once: waiting cannot make a dead request
                # finish, and its retry would only sit out the wait to get the same answer.
                if not self._stale(entry):
                    entry = await wait_for(self.store, key, timeout=self.wait)
                    if entry is None:
                        continue  # the first request charged nothing and gave the id back: run
                if entry.response is None:
                    if self._stale(entry) and await self._orphaned(entry, scope.payer):
                        continue  # the dead request moved no money and its entry is gone: run
                    raise PaymentError(
                        "idempotency_in_progress",
                        "a request with this idempotency id is still running; retry later",
                        status=409,
                        payer=scope.payer,
                    )
            stored = entry.response
            paid = withheld(stored)
            if paid is not None:
                retry = await self._after_withheld(entry, paid, scope.claim_key, owner, now)
                if isinstance(retry, IdempotentRun):
                    return retry
                if retry:
                    continue  # another retry reopened the entry meanwhile: meet it
            if body_omitted(stored):
                raise PaymentError(
                    "idempotency_conflict",
                    "the request with this idempotency id was served and paid for, but its "
                    "response was too large to keep (or cut short) and cannot be replayed",
                    payer=scope.payer,
                )
            await append_quietly(
                self.store,
                Event(
                    "replay",
                    now,
                    route.name,
                    payer=scope.payer,
                    data={"status": stored.status, "resource": request.url},
                ),
            )
            replayed = b"" if request.method == "HEAD" else stored.body
            return Reply(stored.status, replay_headers(stored), replayed)

    async def _after_withheld(
        self, entry: IdempotencyEntry, paid: Withheld, claim_key: str, owner: str, now: int
    ) -> IdempotentRun | bool:
        """A retry of a request whose response was withheld, its payment not confirmed then.

        What that payment became decides: still pending, ``False`` (the stored answer is
        replayed); settled, a run that delivers it (the app runs, since nothing was delivered);
        released or spent by someone else since, it never moved money, and a run that pays with
        this retry's own proof. Reopening the entry is atomic, so of concurrent retries one runs
        and the others (``True``) meet it running and wait for its response.
        """
        claim = await self.store.get_claim(paid.claim)
        if claim is not None and claim.owner == paid.owner:
            # Delivered only against a transaction that moved the money: a settled claim names one.
            if claim.state != "settled" or not claim.transaction:
                return False
            runner = late_owner(paid.owner)
            if await self.store.reopen_idempotent(
                entry.key, owner=entry.owner, new_owner=runner, now=now, claim=paid.claim
            ):
                settled = replace(paid, transaction=claim.transaction)
                return IdempotentRun(entry.key, runner, entry.fingerprint, delivers=settled)
            return True
        if await self.store.reopen_idempotent(
            entry.key, owner=entry.owner, new_owner=owner, now=now, claim=claim_key
        ):
            return IdempotentRun(entry.key, owner, entry.fingerprint)
        return True

    def _stale(self, entry: IdempotencyEntry) -> bool:
        """Whether a running ``entry`` is older than any live request can be (see the class)."""
        return self.clock() - entry.at >= self.stale

    async def _orphaned(self, entry: IdempotencyEntry, payer: str) -> bool:
        """Settle the fate of a stale running ``entry`` from the claim of the proof it spent.

        Raises a 409 naming the transaction when that claim moved money (settled or pending):
        the client learns where its payment went instead of paying again. Returns True when the
        entry was dropped because its request moved no money (the claim was released, or taken
        since by another request, or never recorded), so the caller may run; False when the claim
        is still held and nobody knows yet (the reconciler will resolve it).
        """
        claim = await self.store.get_claim(entry.claim) if entry.claim is not None else None
        # A claim of another owner is a later request that spent the same proof after the dead
        # one released it: the dead request itself moved nothing. A dead delivery of a withheld
        # payment is judged like that payment's own request: it may have delivered, so a 409.
        if claim is not None and spent_by(claim.owner, entry.owner):
            if claim.state == "held" or (claim.state == "pending" and not claim.transaction):
                return False
            where = f" in transaction {claim.transaction}" if claim.transaction else ""
            if claim.state == "pending":
                raise PaymentError(
                    "settlement_pending",
                    f"the first attempt paid{where}, not confirmed yet; its response was lost",
                    status=409,
                    payer=payer,
                )
            raise PaymentError(
                "idempotency_conflict",
                f"the first attempt settled{where}; its response was lost",
                payer=payer,
            )
        # Only this owner's running entry is removed: if it changed hands meanwhile, the loop
        # meets whichever entry is there now.
        await self.store.abandon_idempotent(entry.key, owner=entry.owner)
        return True

    async def remember(
        self,
        admission: Admission,
        status: int,
        headers: Iterable[tuple[str, str]],
        capture: BodyCapture,
    ) -> None:
        """Keep the settled response the face delivered (headers as sent, the captured body) for
        retries of the admission's idempotency id; nothing to do without one."""
        run = admission.idempotency
        if run is None:
            return
        response = stored_response(status, tuple(headers), capture.body, overflow=capture.overflow)
        with anyio.CancelScope(shield=True):
            await self.keep(run, response)

    async def keep(self, run: IdempotentRun, response: StoredResponse) -> None:
        try:
            await self.store.complete_idempotent(run.key, owner=run.owner, response=response)
        except PaymentError as exc:
            # The response was delivered; its retries will wait and get a 409 instead of it.
            logger.error("could not store the response for an idempotency id: %s", exc.code)

    async def forget(self, run: IdempotentRun) -> None:
        try:
            await self.store.abandon_idempotent(run.key, owner=run.owner)
        except PaymentError as exc:
            logger.warning("could not release an idempotency id: %s", exc.code)
