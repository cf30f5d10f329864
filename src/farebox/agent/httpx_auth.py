"""The agent as an ``httpx.Auth``: one flow for ``httpx.Client`` and ``httpx.AsyncClient``.

``paying_client(agent)`` (or ``paying_async_client``) builds the client to use: ``PaymentAuth(agent)``
as its auth and :class:`PaymentTransport` around every transport it sends through (its own, each
mount, the environment's proxies). A 402 is paid and the request retried; the paid response comes
back with its :class:`~farebox.agent.agent.Payment` in ``response.extensions["farebox.payment"]``.
Only refusals and discovery documents are read here; the paid response streams to the caller
untouched.

Redirects. The agent pays the URL that answered 402 (after any redirect the client followed to get
there), checked by the policy, and sends the proof there only:

- the paid retry's own answer is never followed, whatever ``follow_redirects`` says: a 3xx comes
  back to the caller as it is (with its ``Location``, and its Payment if it carried a settlement),
  same origin or not, and following it is the caller's decision; ``response.next_request`` is then
  ``None``, or (with ``follow_redirects=False`` and no :class:`PaymentTransport`) a request
  stripped of the proof and the ``Idempotency-Key``;
- discovery documents (``peac-issuer.json``, the JWKS) are not followed either (PEAC's discovery
  profile: ``redirect: "error"``): a 3xx there is a receipt problem, not the document.

Following is httpx's, below the auth flow, so it is :class:`PaymentTransport` that hides the
``Location`` of the agent's own requests from httpx (``paying_client`` installs it; it knows the
paid retry by its proof headers, whatever a request hook does to the extensions). Without it, the
auth guards from httpcore's ``trace`` extension, and signs only when that guard is known to run:

- a 402 that :class:`PaymentTransport` passed, or whose exchange called the auth's trace (httpx's
  own transports), is paid. On the paid retry the trace stops httpx before it reads a 3xx to
  follow it (``payment_redirected``, the 3xx's headers as ``exc.response`` and, when it carried a
  settlement, the Payment as ``exc.payment``), and refuses to write a proof to any other target;
  a discovery document's 3xx ends the payment there, before anything is signed;
- a 402 that came off a network connection (httpcore's ``network_stream``) without calling the
  trace (an event hook or instrumentation replaced the ``trace`` extension, or a transport wrapper
  dropped it) is refused before anything is signed: ``payment_unguarded``; build the client with
  ``paying_client``;
- an in-process transport (ASGI, WSGI, mock: neither trace nor network stream) is paid as before:
  a redirect httpx follows reaches the same app, and the followed answer is never taken as the
  paid one (``payment_redirected``, with the 3xx the paid URL gave as ``exc.response``). A
  third-party network transport that reports neither is not guarded: use ``paying_client``.

Bodies. Every body the agent parses (402s and refusals, discovery documents) is read through a
streaming bound: at most ``max_body`` decoded bytes (64 KiB), and at most 16 times that off the
wire in body bytes, in at most 256 pieces as the HTTP library hands them over. gzip and deflate
are decoded under the same cap; a body past the bound, or in an encoding the bound cannot decode
(``br``, ``zstd``), reaches the flow empty and its stream is closed instead of read. The chunk
framing around each piece (its size line and any extensions) is the library's: httpcore takes up
to 100 KiB of it a chunk, so a server padding its chunks reaches at most about 25 MiB off the wire
with the default bound, within the deadline. A read also ends, as one past the bound does, once it
has run ``max_body_seconds`` (30 s): ``httpx.AsyncClient`` cancels it then; ``httpx.Client`` checks
between pieces, so it can overrun by one wait for the next piece (each bounded by the client's
read timeout). httpx then keeps what was read for the response's history (nothing when it was too
large). A response handed to the caller with its body past the bound or the deadline (a refusal
as ``exc.response``, the first 402) keeps only the prefix read (none when it was compressed: a
compressed prefix can decode to far more than the bound), and its connection is closed, not kept
checked out of the pool by a response nobody reads.

httpx gives an auth flow no say when sending fails, so resending a paid request after a transport
error (same signed payment, same idempotency id) is also the job of :class:`PaymentTransport`. It
resends only the paid retries this auth marks, and only errors raised before the response arrived
(a body cut mid-stream is not resent).

When the paid retry got an answer and the flow still fails (:class:`PaymentFailed`, e.g.
``receipt_invalid`` under ``require_receipt``), the exception carries that answer as
``exc.response``, its body unread: read it (``exc.response.read()``, ``await
exc.response.aread()``) or close it.

A card payment's token is minted with the agent's card: ``httpx.Client`` calls the wallet's
blocking :meth:`~farebox.agent.card.CardWallet.mint`, ``httpx.AsyncClient`` awaits
:meth:`~farebox.agent.card.CardWallet.mint_async`.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio
import httpx

from farebox.agent.agent import Agent, Answer, Fetch, MintToken, Payment, PaymentFailed, Retry
from farebox.errors import PaymentError

__all__ = [
    "MAX_402_BODY",
    "MAX_BODY_SECONDS",
    "PAYMENT_EXTENSION",
    "REDIRECTED",
    "UNGUARDED",
    "BodyBound",
    "PaymentAuth",
    "PaymentTransport",
    "paying_async_client",
    "paying_client",
]

PAYMENT_EXTENSION = "farebox.payment"
MAX_402_BODY = 64 * 1024
#: How long one bounded read may run, in seconds, before it ends as one past the bound does.
MAX_BODY_SECONDS = 30.0
#: The code of the refusal to send a payment proof on to where a redirect points.
REDIRECTED = "payment_redirected"
#: The code of the refusal to sign when nothing is known to keep the proof from a redirect.
UNGUARDED = "payment_unguarded"
# How much more than max_body may come off the wire for one body: compressed data is smaller than
# what it decodes to, but padding (empty deflate blocks) decodes to nothing for ever.
_WIRE_FACTOR = 16
# How many pieces one body may come in: the chunk framing around each (its size line, extensions)
# never reaches the bound, so a server could pad one byte of body with kilobytes of it.
_MAX_PIECES = 256
# Marks the agent's own requests (the paid retry, discovery fetches) with their _Own.
_OWN = "farebox.own"
# Marks a paid retry, with how many times PaymentTransport may send it again.
_RESENDS = "farebox.resends"
# A Location that PaymentTransport took off one of the agent's own answers so httpx would not
# follow it; the auth puts it back.
_HIDDEN = "farebox.location"
# On every response PaymentTransport passed: the guard that needs no trace is in place.
_PASSED = "farebox.transport"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# httpcore's trace events (HTTP/1.1 and HTTP/2): before it writes a request's headers, around
# reading a response's head, and when something starts reading a response's body.
_SEND_HEADERS = ".send_request_headers.started"
_HEAD_STARTED = ".receive_response_headers.started"
_HEAD_DONE = ".receive_response_headers.complete"
_BODY_STARTED = ".receive_response_body.started"

Exchange = tuple[httpx.Response, bytes | None]
# What the shared flow asks the sync or async face to do, and what it gets back.
Outgoing = httpx.Request | MintToken
Incoming = Exchange | str | BaseException
_Target = tuple[bytes, bytes, int | None, bytes]
_Head = tuple[int, list[tuple[bytes, bytes]]]
_Flow = Generator[Any, Any, Payment | None]


# --- bounded bodies --------------------------------------------------------------------------


class _Inflate:
    """One zlib layer (gzip or deflate) that yields at most ``room + 1`` bytes a call."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self.first = True
        self.inflater = zlib.decompressobj(
            zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS
        )

    def run(self, data: bytes, room: int) -> bytes:
        first, self.first = self.first, False
        try:
            return self.inflater.decompress(data, room + 1)
        except zlib.error:
            if self.coding == "deflate" and first:
                # Servers send raw deflate as often as zlib-wrapped; httpx and urllib3 take both.
                self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.run(data, room)
            raise

    def flush(self) -> bytes:
        return self.inflater.flush()


class BodyBound:
    """Undoes a body's ``Content-Encoding`` while it streams in, within a bound.

    At most ``limit`` decoded bytes, at most ``_WIRE_FACTOR * limit`` body bytes off the wire, in
    at most ``_MAX_PIECES`` pieces (each :meth:`feed`). ``identity`` and codings the HTTP library
    ignores pass through; gzip and deflate are decoded with zlib's output cap (a gzip bomb stops
    at the bound, not in memory); ``br``, ``zstd`` and anything nested deeper than three codings
    cannot be bounded here: ``readable`` is then false and the body should not be read at all.
    ``x_gzip`` says whether the library decodes ``x-gzip`` (urllib3 does, httpx does not).
    """

    def __init__(self, codings: Iterable[str], limit: int, *, x_gzip: bool = False) -> None:
        self.limit = limit
        self.wire_limit = _WIRE_FACTOR * limit
        self.readable = True
        self.ok = True  # False once past a bound or undecodable
        self._wire = 0
        self._pieces = 0
        self._out: list[bytes] = []
        self._size = 0
        layers: list[_Inflate] = []
        for value in codings:
            coding = value.strip().lower()
            if coding == "x-gzip" and x_gzip:
                coding = "gzip"
            if coding in ("gzip", "deflate"):
                layers.append(_Inflate(coding))
            elif coding in ("br", "zstd"):
                self.readable = False
        if len(layers) > 3:
            self.readable = False
        self._layers = list(reversed(layers))  # the last coding applied is undone first
        self._made = [0] * len(self._layers)
        if not self.readable:
            self.ok = False

    @property
    def plain(self) -> bool:
        """Whether what comes off the wire is the body itself (no coding to undo)."""
        return self.readable and not self._layers

    def feed(self, data: bytes) -> bool:
        """Take the next bytes off the wire; ``False`` once the body is past the bound (stop)."""
        if not self.ok:
            return False
        self._wire += len(data)
        self._pieces += 1
        if self._wire > self.wire_limit or self._pieces > _MAX_PIECES:
            self.ok = False
            return False
        return self._take(self._decode(data, flush=False))

    def finish(self) -> bytes | None:
        """The decoded body once the wire ended, or ``None`` if it went past the bound or did not
        decode."""
        if self.ok:
            self._take(self._decode(b"", flush=True))
        return b"".join(self._out) if self.ok else None

    def _decode(self, data: bytes, *, flush: bool) -> bytes:
        for index, layer in enumerate(self._layers):
            # Inner layers may make up to the wire bound (their output is still compressed).
            cap = self.limit if index == len(self._layers) - 1 else self.wire_limit
            try:
                out = layer.run(data, cap - self._made[index]) if data else b""
                while layer.inflater.unconsumed_tail and len(out) <= cap - self._made[index]:
                    out += layer.run(
                        layer.inflater.unconsumed_tail, cap - self._made[index] - len(out)
                    )
                if flush and len(out) <= cap - self._made[index]:
                    out += layer.flush()
            except zlib.error:
                self.ok = False
                return b""
            self._made[index] += len(out)
            if self._made[index] > cap:
                self.ok = False
                return b""
            data = out
        return data

    def _take(self, data: bytes) -> bool:
        if not self.ok:
            return False
        self._size += len(data)
        if self._size > self.limit:
            self.ok = False
            self._out = []
            return False
        if data:
            self._out.append(data)
        return True


def _bound_for(response: httpx.Response, limit: int) -> BodyBound:
    return BodyBound(response.headers.get_list("content-encoding", split_commas=True), limit)


@dataclass(eq=False)
class _Read:
    """A body read up to the bound: what came off the wire, its decoded form (``None`` past the
    bound, the deadline, or undecodable), the rest of the stream (``None`` when it was read to its
    end) and whether the wire is the body itself (no content coding)."""

    stream: httpx.SyncByteStream | httpx.AsyncByteStream | None  # None: read before us
    wire: bytes
    body: bytes | None
    rest: Iterator[bytes] | AsyncIterator[bytes] | None
    plain: bool = False


def _read_before(response: httpx.Response, limit: int) -> _Read:
    # Something read the body before the auth flow (a response event hook): the memory is spent
    # already; the flow still gets no more than the bound.
    try:
        content: bytes | None = response.content
    except httpx.ResponseNotRead:
        content = None
    body = content if content is not None and len(content) <= limit else None
    return _Read(None, b"", body, None)


def _read_sync(response: httpx.Response, limit: int, seconds: float) -> _Read:
    if response.is_stream_consumed:
        return _read_before(response, limit)
    stream = response.stream
    assert isinstance(stream, httpx.SyncByteStream)
    bound = _bound_for(response, limit)
    chunks = iter(stream)
    wire = bytearray()
    if not bound.readable:
        return _Read(stream, b"", None, chunks)
    deadline = time.monotonic() + seconds
    for chunk in chunks:
        wire += chunk
        # Between pieces only: a blocking read cannot be interrupted from here.
        if not bound.feed(chunk) or time.monotonic() > deadline:
            return _Read(stream, bytes(wire), None, chunks, bound.plain)
    return _Read(stream, bytes(wire), bound.finish(), None, bound.plain)


async def _read_async(response: httpx.Response, limit: int, seconds: float) -> _Read:
    if response.is_stream_consumed:
        return _read_before(response, limit)
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    bound = _bound_for(response, limit)
    chunks = aiter(stream)
    wire = bytearray()
    if not bound.readable:
        return _Read(stream, b"", None, chunks)
    # Cancelled mid-read at the deadline, even while the server dribbles framing and no piece
    # comes; httpcore closes the connection it was reading.
    with anyio.move_on_after(seconds):
        async for chunk in chunks:
            wire += chunk
            if not bound.feed(chunk):
                return _Read(stream, bytes(wire), None, chunks, bound.plain)
        return _Read(stream, bytes(wire), bound.finish(), None, bound.plain)
    return _Read(stream, bytes(wire), None, chunks, bound.plain)


def _settle_sync(response: httpx.Response, read: _Read, *, theirs: bool) -> None:
    """Give ``response`` what it goes on with, its stream closed (a body cut short closes its
    connection instead of keeping it checked out of the pool by a response nobody reads). httpx reads every response an auth flow answered with another request (``theirs``
    false) in full: it gets only what was read, and nothing when that was too much or did not
    decode. The caller's (``theirs``) gets what was read, a plain prefix included."""
    if read.stream is None:
        return
    assert isinstance(read.stream, httpx.SyncByteStream)
    if read.rest is not None:
        _close_iterator(read.rest)
    read.stream.close()
    response.stream = httpx.ByteStream(_kept(read, theirs=theirs))


async def _settle_async(response: httpx.Response, read: _Read, *, theirs: bool) -> None:
    if read.stream is None:
        return
    assert isinstance(read.stream, httpx.AsyncByteStream)
    aclose = getattr(read.rest, "aclose", None)
    if aclose is not None:
        await aclose()
    await read.stream.aclose()
    response.stream = httpx.ByteStream(_kept(read, theirs=theirs))


def _kept(read: _Read, *, theirs: bool) -> bytes:
    # httpx decodes what it is given again: only what decoded within the bound, or for the caller
    # the prefix of a plain body cut short (a compressed prefix could decode to far more).
    return read.wire if read.body is not None or (theirs and read.plain) else b""


def _close_iterator(chunks: Iterator[bytes] | AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


# --- the agent's own requests ----------------------------------------------------------------


def _target(url: httpx.URL) -> _Target:
    # What httpx's transport writes for ``url``: scheme, host, port, request target.
    return (url.raw_scheme.lower(), url.raw_host.lower(), url.port, url.raw_path)


def _wire_target(url: Any) -> _Target | None:
    """Where an httpcore request is bound: its URL, or the absolute target a forward proxy gets."""
    target = getattr(url, "target", None)
    if not isinstance(target, bytes):
        return None
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        try:
            return _target(httpx.URL(target.decode("ascii")))
        except (httpx.InvalidURL, UnicodeDecodeError):
            return None
    scheme, host = getattr(url, "scheme", b""), getattr(url, "host", b"")
    return (bytes(scheme).lower(), bytes(host).lower(), getattr(url, "port", None), target)


def _traced(info: Mapping[str, Any]) -> _Target | None:
    return _wire_target(getattr(info.get("request"), "url", None))


def _head_of(value: Any) -> _Head | None:
    """Status and headers from httpcore's ``receive_response_headers.complete``: ``(version,
    status, reason, headers)`` over HTTP/1.1, ``(status, headers)`` over HTTP/2."""
    if not isinstance(value, tuple) or not value:
        return None
    status = next((item for item in value if isinstance(item, int)), None)
    try:
        headers = [(bytes(name).lower(), bytes(data)) for name, data in value[-1]]
    except (TypeError, ValueError):
        return None
    return None if status is None else (status, headers)


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode()}"


def _callers(trace: Any) -> Any:
    # The caller's own trace under one of ours (a request sent again, a redirect httpx built).
    owner = getattr(trace, "__self__", None)
    return owner.trace if isinstance(owner, _Probe | _Own) else trace


@dataclass(eq=False)
class _Probe:
    """The trace on the caller's request: notes where httpcore wrote it, so that the auth knows,
    before it signs, that its trace runs on this client (event hooks and instrumentation may
    replace it; other transports never call it)."""

    trace: Any = None  # the caller's own trace extension, still called
    seen: set[_Target] = field(default_factory=set)

    def _note(self, event: str, info: Mapping[str, Any]) -> None:
        if event.endswith(_SEND_HEADERS):
            where = _traced(info)
            if where is not None:
                self.seen.add(where)

    def sync_trace(self, event: str, info: Mapping[str, Any]) -> None:
        self._note(event, info)
        if self.trace is not None:
            self.trace(event, info)

    async def async_trace(self, event: str, info: Mapping[str, Any]) -> None:
        self._note(event, info)
        if self.trace is not None:
            await self.trace(event, info)


def _guarded(response: httpx.Response, probe: _Probe) -> bool:
    """Whether a redirect httpx follows cannot carry a proof for this 402 away: PaymentTransport
    passed it, or the auth's trace ran on its exchange (it runs on the paid retry's too), or it
    came from an in-process transport (no network connection: a redirect reaches the same app)."""
    if response.extensions.get(_PASSED):
        return True
    if _target(response.request.url) in probe.seen:
        return True
    return "network_stream" not in response.extensions


def _unguarded(url: httpx.URL) -> PaymentError:
    return PaymentError(
        UNGUARDED,
        f"the 402 of {_origin(url)} came over a connection where this client's redirect guard "
        "(the payment auth's httpcore trace extension) did not run: an event hook or "
        "instrumentation replaced the request's trace, or its transport dropped it, so httpx "
        "could follow a redirect of the paid request with the proof. Nothing was signed; build "
        "the client with farebox.agent.httpx_auth.paying_client (or wrap its transport in "
        "PaymentTransport)",
    )


@dataclass(eq=False)
class _Own:
    """One of the agent's own requests: the paid retry (with the proof headers it carries, as
    sent, and the agent's flow that sent it) or a discovery fetch (no proof). httpx copies a
    request's extensions and headers into a redirect it follows, so a request carrying this (or
    the proof) but not being ``request`` is such a redirect."""

    request: httpx.Request
    proof: frozenset[tuple[bytes, bytes]] = frozenset()
    trace: Any = None  # the caller's own trace extension, still called
    flow: _Flow | None = None
    transported: bool = False  # PaymentTransport carries it (and hides its Location itself)
    received: bool = False  # the auth flow has its response
    head: _Head | None = None  # the status and headers of its response, as they came
    target: _Target = field(init=False)
    _receiving: _Target | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.target = _target(self.request.url)

    def refusal(self, where: str) -> PaymentFailed:
        paid = self.request.url
        if not self.proof:
            return PaymentFailed(
                REDIRECTED,
                f"a discovery document of {_origin(paid)} is not followed to {where} (httpx "
                "follows redirects below the auth flow; a client built with "
                "farebox.agent.httpx_auth.paying_client hands the 3xx to the flow instead)",
            )
        return PaymentFailed(
            REDIRECTED,
            f"the paid request to {_origin(paid)}{paid.raw_path.decode()} was redirected to "
            f"{where}; a payment proof goes only where its 402 came from, so it was not sent on "
            "(build the client with farebox.agent.httpx_auth.paying_client to get the redirect "
            "back instead)",
        )

    def _check(self, event: str, info: Mapping[str, Any]) -> None:
        if event.endswith(_SEND_HEADERS):
            self._check_send(info)
        elif event.endswith(_HEAD_STARTED):
            self._receiving = _traced(info)
        elif event.endswith(_HEAD_DONE):
            if self._receiving == self.target:
                self.head = _head_of(info.get("return_value"))
        elif (
            event.endswith(_BODY_STARTED)
            and _traced(info) == self.target
            and self._followed_by_httpx()
        ):
            self._stop()

    def _check_send(self, info: Mapping[str, Any]) -> None:
        if not self.proof:
            return
        sent = info.get("request")
        headers = getattr(sent, "headers", None) or ()
        if not any((bytes(k).lower(), bytes(v)) in self.proof for k, v in headers):
            return
        where = _wire_target(getattr(sent, "url", None))
        if where != self.target:
            shown = (
                "another target" if where is None else f"{where[0].decode()}://{where[1].decode()}"
            )
            raise self.refusal(shown)

    def _followed_by_httpx(self) -> bool:
        # httpx reads a redirect's whole body before following it, below the auth flow: a 3xx
        # read before the flow got it is about to be followed (PaymentTransport, when it carries
        # the request, has hidden its Location, and httpx leaves it alone).
        if self.received or self.transported or self.head is None:
            return False
        status, headers = self.head
        return status in _REDIRECTS and any(name == b"location" for name, _ in headers)

    def _stop(self) -> NoReturn:
        """Stop httpx from reading this 3xx to follow it: the paid retry's still concludes the
        agent's flow (a settlement it carried lands on the refusal), a fetch's ends the payment
        before anything is signed. The caller gets its status and headers as ``exc.response``
        (the body is never read)."""
        assert self.head is not None
        status, raw = self.head
        response = httpx.Response(status, headers=raw, request=self.request)
        try:
            where = _origin(self.request.url.join(response.headers.get("location", "")))
        except httpx.InvalidURL:
            where = "another target"
        refusal = self.refusal(where)
        if self.flow is None:
            refusal.status = status
            refusal.response = response
            raise refusal
        _refuse(self.flow, refusal, response, _answer(response, b""))

    def sync_trace(self, event: str, info: Mapping[str, Any]) -> None:
        self._check(event, info)
        if self.trace is not None:
            self.trace(event, info)

    async def async_trace(self, event: str, info: Mapping[str, Any]) -> None:
        self._check(event, info)
        if self.trace is not None:
            await self.trace(event, info)


def _refuse(
    flow: _Flow, refusal: PaymentFailed, response: httpx.Response, answer: Answer
) -> NoReturn:
    """The paid retry's answer was a 3xx httpx would follow: the agent's flow still concludes on
    it, so that a settlement it carried reaches the caller on ``refusal`` (``exc.payment``,
    ``exc.settlement``, and the Payment in ``exc.response.extensions``); then ``refusal`` is
    raised."""
    error: PaymentError | None = None
    try:
        flow.send(answer)
    except StopIteration as done:
        if isinstance(done.value, Payment):
            refusal.payment, refusal.settlement = done.value, done.value.settlement
            response.extensions[PAYMENT_EXTENSION] = done.value
    except PaymentError as exc:
        error = exc
        refusal.payment = getattr(exc, "payment", None)
        refusal.settlement = getattr(exc, "settlement", None)
    refusal.status = response.status_code
    refusal.answer = answer
    _attach(refusal, response)
    raise refusal from error


# The paid retries whose flows are running, by the proof headers they carry: PaymentTransport and
# the auth know them (and the redirects httpx copies them into) even when a request hook replaced
# the extensions.
_CARRIED: dict[tuple[bytes, bytes], _Own] = {}
_CARRIED_LOCK = threading.Lock()


def _carry(own: _Own) -> None:
    with _CARRIED_LOCK:
        for pair in own.proof:
            _CARRIED[pair] = own


def _drop(own: _Own) -> None:
    with _CARRIED_LOCK:
        for pair in own.proof:
            if _CARRIED.get(pair) is own:
                del _CARRIED[pair]


def _own_of(request: httpx.Request) -> _Own | None:
    own = request.extensions.get(_OWN)
    if isinstance(own, _Own):
        return own
    if _CARRIED:
        for name, value in request.headers.raw:
            found = _CARRIED.get((name.lower(), value))
            if found is not None:
                return found
    return None


def _hide_location(response: httpx.Response) -> None:
    if response.status_code not in _REDIRECTS or "location" not in response.headers:
        return
    hidden = [(k, v) for k, v in response.headers.raw if k.lower() == b"location"]
    del response.headers["location"]
    response.extensions = {**response.extensions, _HIDDEN: hidden}


def _restore(response: httpx.Response) -> None:
    """Put back a Location PaymentTransport hid; strip the proof off a redirect httpx offers."""
    hidden = response.extensions.get(_HIDDEN)
    if hidden is not None:
        response.headers = httpx.Headers([*response.headers.raw, *hidden])
        response.extensions = {k: v for k, v in response.extensions.items() if k != _HIDDEN}
    own = _own_of(response.request)
    if own is not None and own.request is response.request:
        own.received = True
    offered = response.next_request
    own = None if offered is None else _own_of(offered)
    if offered is not None and own is not None:
        for name, _ in own.proof:
            offered.headers.pop(name.decode("latin-1"), None)
        # httpx copies the followed request's extensions (our marker, our trace) into it.
        extensions = {
            k: v for k, v in offered.extensions.items() if k not in (_OWN, _RESENDS, "trace")
        }
        if own.trace is not None:
            extensions["trace"] = own.trace
        offered.extensions = extensions


def _already_paying(request: httpx.Request) -> bool:
    # The caller set a payment header itself: its 402 is the caller's to handle.
    authorization = request.headers.get("authorization", "")
    return "payment-signature" in request.headers or authorization[:8].lower() == "payment "


def _wants_body(response: httpx.Response) -> bool:
    own = _own_of(response.request)
    if own is None:
        # The caller's request: its 402 is paid, unless the caller pays it itself.
        return response.status_code == 402 and not _already_paying(response.request)
    if own.request is not response.request:
        return False  # a redirect httpx followed: never the answer the flow reads
    if not own.proof:
        return True  # a discovery document
    # A refusal from the gate (402, or 400/503 with the challenge) explains itself in its body.
    return response.status_code == 402 or "payment-required" in response.headers


def _answer(response: httpx.Response, body: bytes | None) -> Answer:
    headers = {k.lower(): v for k, v in response.headers.items()}
    return Answer(response.status_code, headers, body if body is not None else b"")


def _attach(exc: PaymentFailed, response: httpx.Response) -> None:
    if exc.response is None:  # a refused redirect carries its 3xx already
        exc.response = response


def _carries_none(exc: PaymentFailed, outgoing: Outgoing) -> bool:
    # After a token was minted there is no new answer; a refused redirect carries its 3xx.
    return not isinstance(outgoing, MintToken) and exc.response is None


def _detached(response: httpx.Response) -> httpx.Response:
    """``response`` for the caller to read after an exception: httpx closes the one the auth flow
    raised on, so its stream moves to a copy that stays open."""
    copy = httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=response.stream,
        request=response.request,
        extensions=response.extensions,
        history=response.history,
        default_encoding=response.default_encoding,
    )
    response.stream = httpx.ByteStream(b"")
    return copy


class PaymentAuth(httpx.Auth):
    """Pays 402 challenges with ``agent``; raises the agent's errors when it cannot or may not.

    Prefer :func:`paying_client`, which also installs :class:`PaymentTransport`; see the module
    docstring for what each part does about redirects. ``max_body`` and ``max_body_seconds``
    bound every body the agent reads (402s, refusals, discovery documents).
    """

    def __init__(
        self,
        agent: Agent,
        *,
        max_body: int = MAX_402_BODY,
        max_body_seconds: float = MAX_BODY_SECONDS,
    ) -> None:
        self.agent = agent
        self.max_body = max_body
        self.max_body_seconds = max_body_seconds

    def _flow(
        self, request: httpx.Request, *, is_async: bool
    ) -> Generator[Outgoing, Incoming, None]:
        extensions = request.extensions
        probe = _Probe(_callers(extensions.get("trace")))
        request.extensions = {
            **extensions,
            "trace": probe.async_trace if is_async else probe.sync_trace,
        }
        try:
            first = yield request
        finally:
            request.extensions = extensions
        assert isinstance(first, tuple)
        response, body = first
        # The request that got this answer: after redirects the client followed, the URL whose
        # 402 this is, and so the one the policy checks and the proof goes to.
        asked = response.request
        if response.status_code != 402 or _already_paying(asked):
            return
        if not _guarded(response, probe):
            raise _unguarded(asked.url)
        flow = self.agent.pay(asked.method, str(asked.url), _answer(response, body))
        payment: Payment | None = None
        carried: list[_Own] = []
        try:
            step = next(flow)
            while True:
                if isinstance(step, MintToken):
                    minted = yield step
                    if isinstance(minted, BaseException):
                        step = flow.throw(minted)
                    else:
                        assert isinstance(minted, str)
                        step = flow.send(minted)
                    continue
                if isinstance(step, Retry):
                    sent = self._retry(asked, step, flow, is_async=is_async)
                    own = _own_of(sent)
                    assert own is not None
                    carried.append(own)
                    _carry(own)
                else:
                    sent = self._fetch(asked, step, is_async=is_async)
                exchange = yield sent
                assert isinstance(exchange, tuple)
                response, body = exchange
                if response.request is sent:
                    step = flow.send(_answer(response, body))
                else:
                    step = self._followed(flow, sent, response)
        except StopIteration as done:
            payment = done.value
        finally:
            for own in carried:
                _drop(own)
            flow.close()
        if payment is not None:
            response.extensions[PAYMENT_EXTENSION] = payment

    def _retry(
        self, asked: httpx.Request, step: Retry, flow: _Flow, *, is_async: bool
    ) -> httpx.Request:
        headers = httpx.Headers(asked.headers)
        for name, value in step.headers.items():
            headers[name] = value
        retry = httpx.Request(asked.method, asked.url, headers=headers, stream=asked.stream)
        names = {name.lower().encode("latin-1") for name in step.headers}
        proof = frozenset((k.lower(), v) for k, v in retry.headers.raw if k.lower() in names)
        own = _Own(retry, proof, _callers(asked.extensions.get("trace")), flow)
        retry.extensions = {
            **asked.extensions,
            _RESENDS: self.agent.resends,
            _OWN: own,
            # httpx's transports call this around each exchange: the proof is never written
            # anywhere but where it was paid for, and a 3xx is not read for httpx to follow.
            "trace": own.async_trace if is_async else own.sync_trace,
        }
        return retry

    @staticmethod
    def _fetch(asked: httpx.Request, step: Fetch, *, is_async: bool) -> httpx.Request:
        fetch = httpx.Request("GET", step.url, headers={"accept": "application/json"})
        own = _Own(fetch)
        extensions: dict[str, Any] = {
            _OWN: own,
            "trace": own.async_trace if is_async else own.sync_trace,
        }
        if "timeout" in asked.extensions:
            extensions["timeout"] = asked.extensions["timeout"]
        fetch.extensions = extensions
        return fetch

    def _followed(self, flow: _Flow, sent: httpx.Request, response: httpx.Response) -> Any:
        """httpx followed a redirect of the agent's own request (an in-process transport: no
        PaymentTransport, no trace). The flow gets the 3xx the URL itself gave; a paid retry's
        then ends in ``payment_redirected``: what the redirect's target answered is never the
        paid answer."""
        hop = next((r for r in response.history if r.request is sent), None)
        own = _own_of(sent)
        assert own is not None
        where = _origin(response.request.url)
        if hop is None:
            raise own.refusal(where)
        body = hop.content if len(hop.content) <= self.max_body else None
        answer = _answer(hop, body)
        if not own.proof:
            return flow.send(answer)
        _refuse(flow, own.refusal(where), hop, answer)

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self._flow(request, is_async=False)
        try:
            outgoing = next(flow)
            while True:
                incoming: Incoming
                read: _Read | None = None
                if isinstance(outgoing, MintToken):
                    try:
                        incoming = outgoing.wallet.mint(outgoing.request)
                    except Exception as exc:  # handed to the flow, which releases and raises it
                        incoming = exc
                else:
                    response = yield outgoing
                    _restore(response)
                    if _wants_body(response):
                        read = _read_sync(response, self.max_body, self.max_body_seconds)
                    incoming = (response, None if read is None else read.body)
                try:
                    outgoing = flow.send(incoming)
                except StopIteration:
                    if read is not None:
                        _settle_sync(response, read, theirs=True)
                    return
                except PaymentFailed as exc:
                    if read is not None:
                        _settle_sync(response, read, theirs=True)
                    if _carries_none(exc, outgoing):
                        _attach(exc, _detached(response))
                    raise
                except BaseException:
                    if read is not None:
                        _settle_sync(response, read, theirs=True)
                    raise
                if read is not None:
                    _settle_sync(response, read, theirs=False)
        finally:
            flow.close()

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self._flow(request, is_async=True)
        try:
            # Each step of the flow runs in a worker thread: it reads and writes the agent's
            # SQLite budget and book, which must not block the event loop.
            done, outgoing = await anyio.to_thread.run_sync(_step, flow, _START)
            if done:
                return
            while True:
                incoming: Incoming
                read: _Read | None = None
                if isinstance(outgoing, MintToken):
                    try:
                        incoming = await outgoing.wallet.mint_async(outgoing.request)
                    except Exception as exc:  # handed to the flow, which releases and raises it
                        incoming = exc
                else:
                    response = yield outgoing
                    _restore(response)
                    if _wants_body(response):
                        read = await _read_async(response, self.max_body, self.max_body_seconds)
                    incoming = (response, None if read is None else read.body)
                try:
                    done, outgoing = await anyio.to_thread.run_sync(_step, flow, incoming)
                    if done:
                        if read is not None:
                            await _settle_async(response, read, theirs=True)
                        return
                except PaymentFailed as exc:
                    if read is not None:
                        await _settle_async(response, read, theirs=True)
                    if _carries_none(exc, outgoing):
                        _attach(exc, _detached(response))
                    raise
                except BaseException:
                    if read is not None:
                        await _settle_async(response, read, theirs=True)
                    raise
                if read is not None:
                    await _settle_async(response, read, theirs=False)
        finally:
            flow.close()


_START: Any = object()


def _step(flow: Generator[Outgoing, Incoming, None], value: Any) -> tuple[bool, Any]:
    """One step of ``flow`` (``_START`` for its first): ``(True, None)`` once it has finished.
    Its end is returned, not raised: a StopIteration cannot cross a thread into a coroutine."""
    try:
        return False, next(flow) if value is _START else flow.send(value)
    except StopIteration:
        return True, None


class PaymentTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wraps a transport (sync or async) for the agent's own requests.

    A request :class:`PaymentAuth` marked as a paid retry is sent again, unchanged, up to the
    agent's ``resends`` times on :class:`httpx.TransportError` (connect, read, write, timeouts,
    protocol errors); the server's idempotency then replays a response it already settled. A
    redirect answering the paid retry or a discovery fetch has its ``Location`` hidden from httpx
    (the auth puts it back), so httpx never follows it with the proof, whatever
    ``follow_redirects`` says; a redirect of such a request that still reaches this transport is
    refused unsent (``payment_redirected``). The paid retry is known by its proof headers too, so
    a request hook that replaces its extensions does not undo this. Every response it passes is
    marked for the auth, which then signs knowing the guard is in place. Everything else passes
    straight through.
    """

    def __init__(self, inner: httpx.BaseTransport | httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    @staticmethod
    def _own(request: httpx.Request) -> _Own | None:
        own = _own_of(request)
        if own is not None:
            if own.request is not request:
                raise own.refusal(_origin(request.url))
            own.transported = True
        return own

    @staticmethod
    def _passed(response: httpx.Response, own: _Own | None) -> httpx.Response:
        if own is not None:
            _hide_location(response)
        response.extensions = {**response.extensions, _PASSED: True}
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.BaseTransport):
            raise TypeError("PaymentTransport wraps an async transport: use httpx.AsyncClient")
        own = self._own(request)
        resends = int(request.extensions.get(_RESENDS, 0))
        while True:
            try:
                response = self.inner.handle_request(request)
                break
            except httpx.TransportError:
                if resends <= 0:
                    raise
                resends -= 1
        return self._passed(response, own)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.AsyncBaseTransport):
            raise TypeError("PaymentTransport wraps a sync transport: use httpx.Client")
        own = self._own(request)
        resends = int(request.extensions.get(_RESENDS, 0))
        while True:
            try:
                response = await self.inner.handle_async_request(request)
                break
            except httpx.TransportError:
                if resends <= 0:
                    raise
                resends -= 1
        return self._passed(response, own)

    def close(self) -> None:
        if isinstance(self.inner, httpx.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncBaseTransport):
            await self.inner.aclose()


def _wrap_transports(client: httpx.Client | httpx.AsyncClient) -> None:
    # httpx picks a mount (the environment's proxies are mounts) before the client's transport,
    # so every one of them is wrapped. httpx has no public setter for them.
    transport = getattr(client, "_transport", None)
    mounts = getattr(client, "_mounts", None)
    if transport is None or not isinstance(mounts, dict):
        raise TypeError(
            "this httpx keeps its transports elsewhere: build the client with "
            "auth=PaymentAuth(agent), transport=PaymentTransport(...) yourself"
        )

    def wrapped(inner: Any) -> Any:
        return (
            inner
            if inner is None or isinstance(inner, PaymentTransport)
            else PaymentTransport(inner)
        )

    client._transport = wrapped(transport)
    client._mounts = {pattern: wrapped(inner) for pattern, inner in mounts.items()}


def paying_client(
    agent: Agent,
    *,
    max_body: int = MAX_402_BODY,
    max_body_seconds: float = MAX_BODY_SECONDS,
    **kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client(**kwargs)`` that pays with ``agent``: :class:`PaymentAuth` as its auth
    and :class:`PaymentTransport` around each transport it uses (``transport=``, ``mounts=``,
    proxies). The client to use: a paid retry is resent after a dropped connection and its
    redirects come back to the caller, never followed with the proof."""
    auth = PaymentAuth(agent, max_body=max_body, max_body_seconds=max_body_seconds)
    client = httpx.Client(auth=auth, **kwargs)
    _wrap_transports(client)
    return client


def paying_async_client(
    agent: Agent,
    *,
    max_body: int = MAX_402_BODY,
    max_body_seconds: float = MAX_BODY_SECONDS,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """:func:`paying_client` for ``httpx.AsyncClient``."""
    auth = PaymentAuth(agent, max_body=max_body, max_body_seconds=max_body_seconds)
    client = httpx.AsyncClient(auth=auth, **kwargs)
    _wrap_transports(client)
    return client
