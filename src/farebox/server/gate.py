"""The gate: the server's decisions for one request, with no web framework in sight.

A face (ASGI, WSGI) asks :meth:`Gate.admit` what to do with a request: pass it (a free route), answer
it (a 402, a refusal, a well-known document), or run the app for an admitted payment. When the app
has answered, :meth:`Gate.complete` settles and returns the headers to add, or a reply that replaces
the app's response when the money did not move; :meth:`Gate.abandon` releases the claim when the app
failed. The proof is claimed in the store before the app runs, so one payment serves one response.

A paid request with an idempotency id (see :mod:`farebox.server.idempotency`) also takes that id in
the store before its proof is claimed: a retry with the same id and the same request gets the stored
response and claims nothing (its proof stays usable), a different request under the id gets a 409,
and concurrent ones wait for the first. The face hands :meth:`Gate.admit` a reader for the request
body (the fingerprint needs it) and :meth:`Gate.remember` the delivered response.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import anyio

from farebox.errors import PaymentError
from farebox.facilitator.base import Facilitator
from farebox.money import ASSETS, AssetRegistry
from farebox.protocol.challenge import render_challenge
from farebox.protocol.models import Challenge
from farebox.protocol.x402 import DEFAULT_MAX_HEADER_BYTES
from farebox.rails.base import Admission, Headers, Offered, Outcome, Rail, Record
from farebox.rails.card import CardRail
from farebox.rails.x402 import X402Rail
from farebox.receipts import SigningKey, sign_payment_record, uuid7
from farebox.receipts.records import receipt_ref
from farebox.server.idempotency import (
    DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_MAX_STORED_BODY,
    DEFAULT_STALE,
    DEFAULT_WAIT,
    PAYMENT_IDENTIFIER,
    BodyCapture,
    BodyReader,
    Withheld,
    declaration,
    withholding,
)
from farebox.server.replies import EXPOSE, PEAC_RECEIPT, Reply
from farebox.server.retries import Retries, Scope
from farebox.server.routes import RequestInfo, Route, RouteTable
from farebox.server.wellknown import WellKnown
from farebox.settle import record_outcome
from farebox.store.base import Event, Store, StoredResponse, append_quietly

__all__ = ["Gate"]

logger = logging.getLogger("farebox.server")


class Gate:
    """Prices, challenges, admits, settles and records paid requests.

    ``signing_key`` signs the PEAC records; ``issuer`` is the records' ``iss``: the API's https
    origin when it has one (then ``/.well-known/peac-issuer.json`` is served), else the key's
    ``did:key``. ``clock`` returns Unix seconds and is the only place the gate reads time.

    Idempotent retries: ``max_request_body`` bounds the request body read to fingerprint a paid
    request that carries an id (larger is a 413), ``max_stored_body`` the response body kept for
    its retries (larger is kept without the body: a retry gets a 409), and ``idempotency_wait`` how
    long a concurrent request with the same id waits for the first before a 409.

    ``idempotency_stale`` (seconds, 120 by default) is the age past which a still-running entry is
    taken for one whose process died between taking the id and recording an outcome. It must be
    longer than any paid request runs (app plus settlement, which waits for the chain): a live
    request judged dead would be run a second time. A retry finding such an entry decides at
    once from the claim of the proof the first attempt spent: settled or pending, a 409 naming
    the transaction (the money moved, the response was lost); released or never taken, the entry
    is dropped and the retry runs with its own proof; still held, the usual 409 in progress until
    the reconciler resolves that claim.
    """

    def __init__(
        self,
        routes: RouteTable,
        facilitator: Facilitator,
        store: Store,
        *,
        signing_key: SigningKey,
        issuer: str | None = None,
        assets: AssetRegistry = ASSETS,
        clock: Callable[[], float] = time.time,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        log_challenges: bool = True,
        max_request_body: int = DEFAULT_MAX_REQUEST_BODY,
        max_stored_body: int = DEFAULT_MAX_STORED_BODY,
        idempotency_wait: float = DEFAULT_WAIT,
        idempotency_stale: float = DEFAULT_STALE,
        card: CardRail | None = None,
    ) -> None:
        self.routes = routes
        self.signing_key = signing_key
        self.issuer = issuer or signing_key.did_key
        self.clock = clock
        self.log_challenges = log_challenges
        self.max_stored_body = max_stored_body
        self.retries = Retries(
            store,
            lambda: self.clock(),
            max_request_body=max_request_body,
            wait=idempotency_wait,
            stale=idempotency_stale,
        )
        # The x402 rail reads the gate's facilitator, assets and clock (each may be replaced).
        self._x402 = X402Rail(
            facilitator, assets, max_header_bytes=max_header_bytes, clock=lambda: self.clock()
        )
        #: The rails, in the order a request's credential is recognized (x402 first, as clients
        #: expect).
        self.rails: tuple[Rail, ...] = ()
        self._card: CardRail | None = None
        self.card = card
        # Every challenge declares payment-identifier: clients may send an id, none must.
        self._extensions = {PAYMENT_IDENTIFIER: declaration(required=False)}
        self.wellknown = WellKnown(routes, signing_key, issuer, assets)

    @property
    def store(self) -> Store:
        """Claims, idempotency ids and the log."""
        return self.retries.store

    @store.setter
    def store(self, store: Store) -> None:
        self.retries.store = store

    @property
    def max_request_body(self) -> int:
        """The most request body read to fingerprint a paid request with an id."""
        return self.retries.max_request_body

    @max_request_body.setter
    def max_request_body(self, limit: int) -> None:
        self.retries.max_request_body = limit

    @property
    def idempotency_wait(self) -> float:
        """How long a request waits for another running under its id."""
        return self.retries.wait

    @idempotency_wait.setter
    def idempotency_wait(self, seconds: float) -> None:
        self.retries.wait = seconds

    @property
    def idempotency_stale(self) -> float:
        """The age past which a running entry is taken for one whose request died."""
        return self.retries.stale

    @idempotency_stale.setter
    def idempotency_stale(self, seconds: float) -> None:
        self.retries.stale = seconds

    @property
    def facilitator(self) -> Facilitator:
        """Verifies and settles x402 proofs."""
        return self._x402.facilitator

    @facilitator.setter
    def facilitator(self, facilitator: Facilitator) -> None:
        self._x402.facilitator = facilitator

    @property
    def assets(self) -> AssetRegistry:
        """The tokens the challenges and records name."""
        return self._x402.assets

    @assets.setter
    def assets(self, assets: AssetRegistry) -> None:
        self._x402.assets = assets

    @property
    def max_header_bytes(self) -> int:
        """The largest payment header read."""
        return self._x402.max_header_bytes

    @property
    def card(self) -> CardRail | None:
        """The card rail, if the API takes cards (it may be set after construction)."""
        return self._card

    @card.setter
    def card(self, card: CardRail | None) -> None:
        self._card = card
        self.rails = (self._x402,) if card is None else (self._x402, card)

    async def aclose(self) -> None:
        """Close the store and the facilitator's connections."""
        close = getattr(self.facilitator, "aclose", None)
        if close is not None:
            await close()
        await self.store.aclose()

    # --- before the app ------------------------------------------------------------------------

    async def admit(
        self, request: RequestInfo, body: BodyReader | None = None
    ) -> Reply | Admission | None:
        """``None`` to pass the request to the app untouched, a :class:`Reply` to answer it, or an
        :class:`~farebox.rails.base.Admission` to run the app for a verified, claimed payment.

        ``body`` reads the request body; it is called only for a paid request carrying an
        idempotency id, and the face then gives the app the body it read. Without it, ids are
        ignored (no fingerprint, so nothing could be replayed safely).
        """
        found = self.routes.match(request.method, request.path)
        if found is None:
            document = self.wellknown.reply(request)
            return Reply(*document) if document is not None else None
        route = found.route
        if found.params:
            request = replace(request, path_params=found.params)
        now = int(self.clock())
        challenge = Challenge(
            resource=route.resource(request),
            accepts=route.offers(request),
            reference=uuid7(now * 1000),
            extensions=self._extensions,
        )
        # A HEAD gets the GET's answer without a body; it is never charged (nothing is delivered).
        rail: Rail | None = None
        if request.method != "HEAD":
            for candidate in self.rails:
                if candidate.recognizes(route, request):
                    rail = candidate
                    break
        if rail is None:
            if self.log_challenges:
                await append_quietly(
                    self.store,
                    Event("challenge", now, route.name, reference=challenge.reference),
                )
            return await self._challenge(challenge, request, None, route)
        try:
            return await self._accept(rail, route, request, challenge, now, body)
        except PaymentError as exc:
            return await self._refuse(rail, route, request, challenge, now, exc)

    async def _refuse(
        self,
        rail: Rail,
        route: Route,
        request: RequestInfo,
        challenge: Challenge,
        now: int,
        exc: PaymentError,
    ) -> Reply:
        """Log why a payment was refused and answer with a fresh challenge naming it."""
        await append_quietly(
            self.store,
            Event(
                "refusal",
                now,
                route.name,
                payer=exc.payer,
                reference=challenge.reference,
                data={"code": exc.code, "rail": rail.name},
            ),
        )
        problem_type = rail.problem_type(request, exc.code)
        return await self._challenge(challenge, request, exc, route, problem_type=problem_type)

    async def _accept(
        self,
        rail: Rail,
        route: Route,
        request: RequestInfo,
        challenge: Challenge,
        now: int,
        body: BodyReader | None,
    ) -> Admission | Reply:
        # Checked first, taking nothing: the payer it proves scopes the idempotency key.
        checked = await rail.check(route, request, challenge, self.store, now)
        owner = secrets.token_hex(8)
        scope = Scope(checked.payee, checked.payer, checked.claim_key)
        run = await self.retries.take(route, request, checked.proof, scope, owner, now, body)
        if isinstance(run, Reply):
            return run

        if run is not None and run.delivers is not None:
            # Paid already (settled after its response was withheld): this payment is not spent.
            payment, owner = checked.payment, run.owner
        else:
            async with self.retries.forgotten_on_error(run):
                payment = await rail.take(checked, self.store, owner, now)
        return Admission(
            rail, route, request, challenge, owner, checked.claim_key, checked.payer, payment, run
        )

    async def remember(
        self,
        admission: Admission,
        status: int,
        headers: Iterable[tuple[str, str]],
        capture: BodyCapture,
    ) -> None:
        """Keep the settled response the face delivered (headers as sent, the captured body) for
        retries of the admission's idempotency id; nothing to do without one."""
        await self.retries.remember(admission, status, headers, capture)

    # --- after the app -------------------------------------------------------------------------

    async def abandon(self, admission: Admission) -> None:
        """The app failed or answered an error: nothing is charged (the rail gives back or undoes
        what it took), and a retry with the same idempotency id runs again."""
        with anyio.CancelScope(shield=True):
            run = admission.idempotency
            if run is not None and run.delivers is not None:
                # Paid for and still not delivered: the next retry may try again.
                await self.retries.keep(run, run.delivers.answer)
                return
            await admission.rail.abandon(admission, self.store)
            if run is not None:
                await self.retries.forget(run)

    async def complete(self, admission: Admission, status: int) -> Headers | Reply:
        """Settle for an app that answered ``status``.

        Returns the headers to add to the app's response, or a :class:`Reply` that replaces it
        when the payment did not settle. Only a 2xx is charged: an error or a redirect delivers
        nothing the client paid for, so the claim is released and the app's answer passes as is.
        """
        if not 200 <= status < 300:
            await self.abandon(admission)
            return ()
        # Once the money may move, a client hanging up must not interrupt the bookkeeping.
        outcome: Headers | Reply = ()
        with anyio.CancelScope(shield=True):
            run = admission.idempotency
            if run is not None and run.delivers is not None:
                outcome = await self._deliver(admission, run.delivers)
            else:
                outcome = await self._settle(admission)
        return outcome

    async def _settle(self, admission: Admission) -> Headers | Reply:
        """Settle through the admission's rail and record what it came to, by the lifecycle
        table: settled (the claim, the log and the PEAC record, then the headers), pending (the
        claim kept, the refusal withheld for retries of its id) or released."""
        outcome = await admission.rail.settle(admission, self.store)
        if outcome.problem is None:
            assert outcome.record is not None  # a paid outcome names its record
            now = int(self.clock())
            receipt, event = self._receipt(admission, outcome.record, outcome.payer, now)
            await self._record(admission, outcome, (*outcome.events, event))
            return (*outcome.headers, (PEAC_RECEIPT, receipt), EXPOSE)
        refusal = await self._challenge(
            admission.challenge,
            admission.request,
            outcome.problem,
            admission.route,
            problem_type=admission.rail.problem_type(admission.request, outcome.problem.code),
            settled=True,
        )
        refusal = replace(refusal, headers=(*refusal.headers, *outcome.headers))
        if outcome.move == "hold_pending":
            # The money may have moved: the claim stays until someone reconciles it, and a retry
            # under the same id hears the same, rather than paying a second time.
            await self._record(admission, outcome, outcome.events)
            if admission.idempotency is not None:
                answer = StoredResponse(refusal.status, refusal.headers, refusal.body)
                await self.retries.keep(
                    admission.idempotency, withholding(answer, **outcome.withhold)
                )
        else:
            await self._record(admission, outcome, outcome.events)
            await self._unrun(admission)
        return refusal

    async def _deliver(self, admission: Admission, paid: Withheld) -> Headers:
        """The headers of a response delivered for ``paid``, which settled after its first
        response was withheld: its rail's settlement headers and a receipt naming its
        transaction."""
        outcome = await admission.rail.deliver(admission, paid)
        assert outcome.record is not None
        now = int(self.clock())
        receipt, event = self._receipt(admission, outcome.record, outcome.payer, now, late=True)
        await append_quietly(self.store, event)
        return (*outcome.headers, (PEAC_RECEIPT, receipt), EXPOSE)

    async def _unrun(self, admission: Admission) -> None:
        if admission.idempotency is not None:
            await self.retries.forget(admission.idempotency)

    def _receipt(
        self, admission: Admission, record: Record, payer: str | None, now: int, late: bool = False
    ) -> tuple[str, Event]:
        """The signed PEAC record of a paid response, and its log line."""
        jws = sign_payment_record(
            self.signing_key,
            issuer=self.issuer,
            now=now,
            rail=record.rail,
            amount_minor=record.amount_minor,
            currency=record.currency,
            reference=record.reference,
            subject=admission.request.url,
            event="settlement",
            asset=record.asset,
            env=record.env,
        )
        data = {"transaction": record.reference, "jws": jws}
        if late:
            data["delivered"] = "late"
        event = Event(
            "receipt", now, admission.route.name, payer=payer, reference=receipt_ref(jws), data=data
        )
        return jws, event

    async def _record(
        self, admission: Admission, outcome: Outcome, events: Sequence[Event]
    ) -> None:
        assert outcome.move is not None  # a settlement's outcome moves its claim
        await record_outcome(
            self.store,
            admission.claim_key,
            owner=admission.owner,
            move=outcome.move,
            transaction=outcome.transaction,
            events=events,
            what=admission.route.name,
        )

    # --- replies -------------------------------------------------------------------------------

    async def _challenge(
        self,
        challenge: Challenge,
        request: RequestInfo,
        problem: PaymentError | None,
        route: Route | None = None,
        *,
        problem_type: str | None = None,
        settled: bool = False,
    ) -> Reply:
        """The 402 (or refusal) for ``challenge``, with what each rail adds to it; ``problem_type``
        types the problem with another protocol's registry (a refused MPP credential's). A refusal
        after a settlement was tried (``settled``), or of a service down (503), makes the rails
        call no outside service (no invoice is created for it)."""
        if problem is not None:
            challenge = replace(challenge, error=problem.code)
        offered = Offered()
        if route is not None:
            outside = not settled and (problem is None or problem.status != 503)
            offered = await self._offered(route, request, outside_calls=outside)
            if offered.reference is not None:
                # The 402 names the rail's reference (an invoice): what pays this request.
                challenge = replace(challenge, reference=offered.reference)
        rendered = render_challenge(
            challenge,
            assets=self.assets,
            problem=problem,
            extra_methods=offered.methods,
            extra_instructions=offered.instructions,
            problem_type=problem_type if problem is not None else None,
        )
        headers = (*rendered.headers, *offered.headers, EXPOSE)
        if problem is not None and problem.status == 503:
            headers = (*headers, ("retry-after", "2"))
        body = b"" if request.method == "HEAD" else rendered.body
        return Reply(rendered.status, headers, body)

    async def _offered(self, route: Route, request: RequestInfo, *, outside_calls: bool) -> Offered:
        """What the rails add to a 402 of ``route``, merged in rail order."""
        headers: list[tuple[str, str]] = []
        methods: list[dict[str, object]] = []
        reference = instructions = None
        for rail in self.rails:
            extra = await rail.offer(route, request, self.store, outside_calls=outside_calls)
            headers.extend(extra.headers)
            methods.extend(extra.methods)
            reference = reference or extra.reference
            instructions = instructions or extra.instructions
        return Offered(tuple(headers), tuple(methods), reference, instructions)
