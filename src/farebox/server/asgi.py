"""Pure ASGI middleware: the gate in front of any ASGI app (FastAPI, Starlette, Litestar...).

Only the app's ``http.response.start`` is held while the payment settles; the body then streams
through unbuffered. If settlement fails, the app's body is dropped and the refusal is sent instead.

For a paid request with an idempotency id the gate asks for the request body (to fingerprint it):
it is read here, bounded by the gate's ``max_request_body``, and handed to the app through a
wrapped ``receive`` exactly as it came. A settled response's body is copied as it streams by (up to
``max_stored_body``) and stored for retries; if the client goes away mid-body after the money
moved, the app's remaining body is still drained into the copy, so a retry gets all it paid for.

Before the gate, the request target is normalized once (:mod:`farebox.server.target`) and the app
gets a scope carrying that path, so the gate and the app never read two different paths; a target
that cannot be normalized, or a body framed two ways, is a 400 that reaches neither.
"""

from __future__ import annotations

import anyio

from farebox._asgi import ASGIApp, Message, Receive, Scope, Send, send_response
from farebox.rails.base import Admission
from farebox.server.gate import Gate
from farebox.server.idempotency import BodyCapture
from farebox.server.replies import Reply, merge_headers
from farebox.server.routes import RequestInfo
from farebox.server.target import BadTarget, check_framing, normalize_target, target_of_decoded

__all__ = ["PaymentMiddleware", "checked_scope", "request_info"]

# Headers beyond these sizes are not read as proofs (the gate bounds the decoded size too).
_MAX_HEADER_VALUE = 64 * 1024


def request_info(scope: Scope) -> RequestInfo:
    """The framework-free view of an ASGI HTTP request."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        if len(raw_value) > _MAX_HEADER_VALUE:
            continue
        name = raw_name.decode("latin-1").lower()
        headers.setdefault(name, raw_value.decode("latin-1"))
    scheme = scope.get("scheme", "http")
    host = headers.get("host")
    if not host:
        server = scope.get("server") or ("localhost", None)
        host = server[0] if server[1] in (None, 80, 443) else f"{server[0]}:{server[1]}"
    path = scope.get("path", "/")
    query = scope.get("query_string", b"").decode("latin-1")
    url = f"{scheme}://{host}{scope.get('root_path', '')}{path}" + (f"?{query}" if query else "")
    return RequestInfo(scope.get("method", "GET"), path, url, headers)


def checked_scope(scope: Scope) -> Scope:
    """The HTTP ``scope`` with its target normalized: ``path``, ``raw_path`` and ``query_string``
    are the one spelling the gate matches and the app (or the upstream) receives. Idempotent.

    Raises :class:`~farebox.server.target.BadTarget` for a target that cannot be normalized
    safely or a body framed both by ``Content-Length`` and ``Transfer-Encoding``.
    """
    headers = scope.get("headers", ())
    check_framing(headers)
    query = bytes(scope.get("query_string", b""))
    raw_path = scope.get("raw_path")
    if raw_path is None:  # optional in ASGI: then the decoded path is all there is
        target = target_of_decoded(scope.get("path", "/"), query)
    else:
        raw_path = bytes(raw_path)
        host = None
        if not raw_path.startswith(b"/"):  # absolute-form: accepted only naming this Host
            host = next((v for k, v in headers if k.lower() == b"host"), b"").decode("latin-1")
        target = normalize_target(raw_path, query, host=host)
        if (
            target.raw_path == raw_path
            and target.query == query
            and scope.get("path") == target.path
        ):
            return scope  # already the one spelling (nearly every request): nothing to rewrite
    checked = dict(scope)
    checked.update(path=target.path, raw_path=target.raw_path, query_string=target.query)
    return checked


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send_response(send, reply.status, reply.body, headers)


class PaymentMiddleware:
    """``app = PaymentMiddleware(app, gate)``: charge for the gate's routes, pass the rest."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._closing(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            scope = checked_scope(scope)
        except BadTarget as exc:
            await _send_reply(send, Reply(*exc.reply()))
            return
        body = _BufferedBody(receive, self.gate.max_request_body)
        decision = await self.gate.admit(request_info(scope), body.read)
        if decision is None:
            await self.app(scope, body.receive, send)
        elif isinstance(decision, Reply):
            await _send_reply(send, decision)
        else:
            await self._paid(decision, scope, body.receive, send)

    def _closing(self, receive: Receive) -> Receive:
        # The gate's connections (store, node) close when the server shuts down.
        async def receive_lifespan() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.gate.aclose()
            return message

        return receive_lifespan

    async def _paid(self, admission: Admission, scope: Scope, receive: Receive, send: Send) -> None:
        state = "waiting"  # -> "passing" (settled or not charged) | "replaced" (refusal sent)
        # A settled response under an idempotency id: what was sent, kept for its retries.
        kept: tuple[int, list[tuple[str, str]], BodyCapture] | None = None
        body_done = False
        client_gone = False

        async def send_paid(message: Message) -> None:
            nonlocal state, kept, body_done, client_gone
            if message["type"] == "http.response.start":
                status = int(message["status"])
                outcome = await self.gate.complete(admission, status)
                if isinstance(outcome, Reply):
                    state = "replaced"
                    await _send_reply(send, outcome)
                    return
                state = "passing"
                if outcome:
                    app_headers = [
                        (k.decode("latin-1"), v.decode("latin-1"))
                        for k, v in message.get("headers", ())
                    ]
                    merged = merge_headers(app_headers, outcome)
                    message = dict(message)
                    message["headers"] = [
                        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in merged
                    ]
                    if admission.idempotency is not None:
                        kept = (status, merged, BodyCapture(self.gate.max_stored_body))
                await send(message)
            elif state != "replaced":
                if kept is not None and message["type"] == "http.response.body":
                    kept[2].add(bytes(message.get("body", b"")))
                    body_done = not message.get("more_body", False)
                if client_gone:
                    return
                try:
                    await send(message)
                except Exception:
                    # Paid for and still being copied: let the app finish into the copy, so
                    # the client's retry gets the whole response instead of paying again.
                    if kept is None or kept[2].overflow is not None:
                        raise
                    client_gone = True

        try:
            await self.app(scope, receive, send_paid)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if state == "waiting":
                    await self.gate.abandon(admission)
                elif kept is not None:
                    await self._remember(admission, kept, complete=body_done)
            raise
        if state == "waiting":  # the app returned without answering
            await self.gate.abandon(admission)
        elif kept is not None:
            await self._remember(admission, kept, complete=body_done)

    async def _remember(
        self,
        admission: Admission,
        kept: tuple[int, list[tuple[str, str]], BodyCapture],
        *,
        complete: bool,
    ) -> None:
        status, headers, capture = kept
        if not complete:
            # The app died mid-body after the money moved: a partial body must not be replayed
            # as if whole, and the request must not run (and charge) again either.
            capture.abandon()
        await self.gate.remember(admission, status, headers, capture)


class _BufferedBody:
    """The request body, read once when the gate asks for it and then replayed to the app."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._pending: list[Message] = []

    async def read(self) -> bytes | None:
        """The whole body, or ``None`` past the limit (the gate then refuses the request)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                # The client went away before the body was complete: the app hears it too.
                self._pending = [{"type": "http.request", "body": b"".join(chunks)}, message]
                return b"".join(chunks)
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self._limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                body = b"".join(chunks)
                self._pending = [{"type": "http.request", "body": body, "more_body": False}]
                return body

    async def receive(self) -> Message:
        """The app's ``receive``: what :meth:`read` took first, then the server's own."""
        if self._pending:
            return self._pending.pop(0)
        return await self._receive()
