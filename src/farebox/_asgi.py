"""ASGI types and the few helpers every ASGI face uses (the middleware, the reverse proxy, the
facilitator service, the configured server).

The types are the ASGI specification's shapes, kept loose (``MutableMapping[str, Any]``) the way
servers and frameworks hand them over; nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio

__all__ = ["ASGIApp", "Message", "Receive", "Scope", "Send", "run_lifespan", "send_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    """Send a complete response in two messages: the start with ``headers`` and a
    ``content-length`` of ``body``, then the body (empty for a ``HEAD``, the length still the
    body's, as a ``GET`` would have sent it)."""
    start = [*headers, (b"content-length", str(len(body)).encode("latin-1"))]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def run_lifespan(
    receive: Receive,
    send: Send,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    *,
    background: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Answer an ASGI ``lifespan`` scope for an app that needs no start-up work, running
    ``on_shutdown`` (closing connections) before it reports the shutdown complete.

    ``background`` (a reconciler's loop) runs from start-up until shutdown begins; only it is
    cancelled then, so the lifespan itself still reports the shutdown complete."""
    if background is None:
        await _answer_lifespan(receive, send, on_shutdown)
        return
    running = anyio.CancelScope()

    async def run() -> None:
        with running:
            await background()

    async def shutdown() -> None:
        running.cancel()
        if on_shutdown is not None:
            await on_shutdown()

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        await _answer_lifespan(receive, send, shutdown)


async def _answer_lifespan(
    receive: Receive, send: Send, on_shutdown: Callable[[], Awaitable[None]] | None
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
