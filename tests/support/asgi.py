"""Driving an ASGI app without a server: one GET and the messages it sent, and a streaming app."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["call", "chunked_app"]


async def call(
    app: Any, path: str, headers: Sequence[tuple[bytes, bytes]] = (), *, method: str = "GET"
) -> list[dict[str, Any]]:
    """The messages ``app`` sends for one ``method path`` (a GET by default) on
    ``https://api.test`` with ``headers``."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": method,
        "scheme": "https",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"api.test"), *headers],
        "server": ("api.test", 443),
    }
    await app(scope, receive, send)
    return sent


async def chunked_app(scope: Any, receive: Any, send: Any) -> None:
    """A 200 streamed in three body messages."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    for i in range(3):
        await send({"type": "http.response.body", "body": f"part {i}".encode(), "more_body": i < 2})
