"""The FastAPI app of the end-to-end tests, behind farebox's ASGI middleware: the routes
``tests.support.gates.make_gate`` prices, plus a free ``/health``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from farebox.server.asgi import PaymentMiddleware
from tests.support.gates import Paid

__all__ = ["fastapi_app"]


def fastapi_app(paid: Paid) -> PaymentMiddleware:
    api = FastAPI()
    state = {"flaky_calls": 0}

    @api.get("/weather")
    async def weather() -> dict[str, object]:
        return {"forecast": "sunny"}

    @api.post("/items", status_code=201)
    async def create_item() -> JSONResponse:
        return JSONResponse({"id": 7}, status_code=201, headers={"Location": "/items/7"})

    @api.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.get("/flaky")
    async def flaky() -> JSONResponse:
        state["flaky_calls"] += 1
        if state["flaky_calls"] == 1:
            return JSONResponse({"detail": "upstream down"}, status_code=500)
        return JSONResponse({"ok": True})

    @api.get("/redirect")
    async def redirect() -> RedirectResponse:
        return RedirectResponse("/weather", status_code=302)

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return PaymentMiddleware(api, paid.gate)
