"""Pure ASGI middleware: the gate in front of any ASGI app (FastAPI, Starlette, Litestar...).

Only the app's ``http.response.start`` is held while the payment settles; the body then streams
through unbuffered. If settlement fails, the app's body is dropped and the refusal is sent instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from farebox.server.gate import Admission, Gate, Reply, merge_headers
from farebox.server.routes import RequestInfo

__all__ = ["PaymentMiddleware", "request_info", "run_lifespan"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

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


async def run_lifespan(
    receive: Receive, send: Send, on_shutdown: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Answer an ASGI ``lifespan`` scope for an app that needs no start-up work, running
    ``on_shutdown`` (closing connections) before it reports the shutdown complete."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


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
        decision = await self.gate.admit(request_info(scope))
        if decision is None:
            await self.app(scope, receive, send)
        elif isinstance(decision, Reply):
            await _send_reply(send, decision)
        else:
            await self._paid(decision, scope, receive, send)

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

        async def send_paid(message: Message) -> None:
            nonlocal state
            if message["type"] == "http.response.start":
                outcome = await self.gate.complete(admission, int(message["status"]))
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
                    message = dict(message)
                    message["headers"] = [
                        (k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in merge_headers(app_headers, outcome)
                    ]
                await send(message)
            elif state != "replaced":
                await send(message)

        try:
            await self.app(scope, receive, send_paid)
        except BaseException:
            if state == "waiting":
                with anyio.CancelScope(shield=True):
                    await self.gate.abandon(admission)
            raise
        if state == "waiting":  # the app returned without answering
            await self.gate.abandon(admission)
