"""Real servers for tests: a free loopback port, an ASGI app under uvicorn in a thread, and waiting
until something answers on a URL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

__all__ = ["free_port", "serve", "wait_for"]


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; its base URL."""
    # uvicorn is the 'serve' extra: imported here, so that a module using only free_port or
    # wait_for does not need it.
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(url: str, payload: dict[str, object] | None = None, timeout: float = 30.0) -> None:
    """Return once ``url`` answers a GET (or a JSON POST of ``payload``); raise after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if payload is None:
                httpx.get(url, timeout=1.0)
            else:
                httpx.post(url, json=payload, timeout=1.0)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
