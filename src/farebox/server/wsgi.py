"""WSGI middleware (Flask, Django...): the same gate, driven from a blocking portal.

The gate is async; a WSGI server calls us on its own threads, so one event loop runs in a background
thread (an anyio blocking portal) and each request hands its gate calls to it. There is no second
copy of the payment logic here: only the translation between WSGI and the gate.

For a paid request with an idempotency id the gate asks for the request body: ``wsgi.input`` is read
(bounded by the gate's ``max_request_body``) and replaced by a ``BytesIO`` of what was read. A
settled response's body is copied as the server iterates it and stored for retries; a server that
closes the iterable early (the client went away) still gets the rest drained into the copy.

Before the gate, ``PATH_INFO`` is normalized once (:mod:`farebox.server.target`) and rewritten, so
the gate and the app route on the same path; a path that cannot be normalized is a 400.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from farebox.rails.base import Admission
from farebox.server.gate import Gate
from farebox.server.idempotency import BodyCapture, BodyReader
from farebox.server.replies import Reply, merge_headers
from farebox.server.routes import RequestInfo
from farebox.server.target import BadTarget, target_of_decoded

__all__ = ["WsgiPaymentMiddleware", "normalize_path", "wsgi_request_info"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_MAX_HEADER_VALUE = 64 * 1024


def wsgi_request_info(environ: Environ) -> RequestInfo:
    """The framework-free view of a WSGI request."""
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if not isinstance(value, str) or len(value) > _MAX_HEADER_VALUE:
            continue
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").lower()] = value
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            headers[key.replace("_", "-").lower()] = value
    scheme = environ.get("wsgi.url_scheme", "http")
    host = headers.get("host")
    if not host:
        port = environ.get("SERVER_PORT", "80")
        host = environ.get("SERVER_NAME", "localhost") + (
            "" if port in ("80", "443") else f":{port}"
        )
    # PEP 3333 hands the path over as latin-1 decoded bytes; the URL keeps them as they came, the
    # routes match them as the UTF-8 text that normalize_path checked they are.
    path = environ.get("PATH_INFO", "") or "/"
    try:
        route_path = path.encode("latin-1").decode("utf-8")
    except UnicodeError:
        route_path = path
    script = environ.get("SCRIPT_NAME", "")
    query = environ.get("QUERY_STRING", "")
    url = f"{scheme}://{host}{script}{path}" + (f"?{query}" if query else "")
    return RequestInfo(environ.get("REQUEST_METHOD", "GET"), route_path, url, headers)


def normalize_path(environ: Environ) -> None:
    """Rewrite ``PATH_INFO`` (and ``QUERY_STRING``) in place to their one normalized spelling, the
    path the gate matches and the app routes on. Raises
    :class:`~farebox.server.target.BadTarget`."""
    query = environ.get("QUERY_STRING", "").encode("latin-1")
    target = target_of_decoded(environ.get("PATH_INFO", "") or "/", query, encoding="latin-1")
    environ["PATH_INFO"] = unquote_to_bytes(target.raw_path).decode("latin-1")
    environ["QUERY_STRING"] = target.query.decode("latin-1")


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class WsgiPaymentMiddleware:
    """``app.wsgi_app = WsgiPaymentMiddleware(app.wsgi_app, gate)``."""

    def __init__(self, app: WSGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None

    def portal(self) -> BlockingPortal:
        """The event loop the gate runs on, started on first use."""
        if self._portal is None:
            with self._lock:
                if self._portal is None:
                    self._portal_cm = start_blocking_portal()
                    self._portal = self._portal_cm.__enter__()
        return self._portal

    def close(self) -> None:
        """Stop the gate's event loop thread."""
        with self._lock:
            if self._portal_cm is not None:
                self._portal_cm.__exit__(None, None, None)
            self._portal = self._portal_cm = None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            normalize_path(environ)
        except BadTarget as exc:
            return self._reply(Reply(*exc.reply()), start_response)
        portal = self.portal()
        decision = portal.call(self.gate.admit, wsgi_request_info(environ), self._reader(environ))
        if decision is None:
            return self.app(environ, start_response)
        if isinstance(decision, Reply):
            return self._reply(decision, start_response)
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured[:] = [status, headers]
            return _no_write

        try:
            result = self.app(environ, capture)
            iterator = iter(result)
            # A generator app calls start_response when first iterated: pull one chunk.
            first = next(iterator, None)
        except BaseException:
            portal.call(self.gate.abandon, decision)
            raise
        if not captured:
            portal.call(self.gate.abandon, decision)
            _close(result)
            raise RuntimeError("the WSGI app returned without calling start_response")
        status_text, app_headers = captured
        outcome = portal.call(self.gate.complete, decision, int(status_text.split(" ", 1)[0]))
        if isinstance(outcome, Reply):
            _close(result)
            return self._reply(outcome, start_response)
        headers = merge_headers(app_headers, outcome) if outcome else app_headers
        start_response(status_text, headers)
        if outcome and decision.idempotency is not None:
            status = int(status_text.split(" ", 1)[0])
            return _Stream(first, iterator, result, self._keeper(decision, status, headers))
        return _Stream(first, iterator, result)

    def _reader(self, environ: Environ) -> BodyReader:
        limit = self.gate.max_request_body

        def read() -> bytes | None:
            stream = environ.get("wsgi.input")
            length = environ.get("CONTENT_LENGTH") or ""
            if stream is None:
                body = b""
            elif length.strip().isdigit():
                if int(length) > limit:
                    return None
                body = stream.read(int(length))
            elif environ.get("wsgi.input_terminated"):
                body = stream.read(limit + 1)
                if len(body) > limit:
                    return None
            else:
                body = b""  # PEP 3333: without a length (or a terminated input) there is none
            # The app reads what was read here, as if it came from the server.
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            return body

        async def read_off_loop() -> bytes | None:
            # The gate's loop serves every request: the blocking read happens on a worker thread.
            return await anyio.to_thread.run_sync(read)

        return read_off_loop

    def _keeper(self, admission: Admission, status: int, headers: list[tuple[str, str]]) -> _Keeper:
        capture = BodyCapture(self.gate.max_stored_body)

        def done(complete: bool) -> None:
            if not complete:
                capture.abandon()
            self.portal().call(self.gate.remember, admission, status, headers, capture)

        return _Keeper(capture, done)

    @staticmethod
    def _reply(reply: Reply, start_response: StartResponse) -> list[bytes]:
        headers = [*reply.headers, ("content-length", str(len(reply.body)))]
        start_response(_status_line(reply.status), headers)
        return [reply.body]


def _no_write(data: bytes) -> None:
    raise RuntimeError("the legacy WSGI write() callable is not supported behind farebox")


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


class _Keeper:
    """Where a settled body's copy goes: the capture, and what to call once the body ended."""

    def __init__(self, capture: BodyCapture, done: Callable[[bool], None]) -> None:
        self.capture = capture
        self.done = done


class _Stream:
    """The app's body: the chunk already pulled, then the rest, closing the app's iterable.

    With a keeper, every chunk is also copied, and the copy is handed over once: when the body
    ended, or at ``close`` (after draining what the server did not read, within the limit).
    """

    def __init__(
        self,
        first: bytes | None,
        rest: Iterator[bytes],
        result: Iterable[bytes],
        keeper: _Keeper | None = None,
    ):
        self._first = first
        self._rest = rest
        self._result = result
        self._keeper = keeper
        self._ended = False
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        if self._first is not None:
            self._copy(self._first)
            yield self._first
        try:
            for chunk in self._rest:
                self._copy(chunk)
                yield chunk
        except Exception:
            # The app broke mid-body: its iterator is spent, so draining it would look complete.
            self._failed = True
            raise
        self._ended = True

    def _copy(self, chunk: bytes) -> None:
        if self._keeper is not None:
            self._keeper.capture.add(chunk)

    def close(self) -> None:
        keeper, self._keeper = self._keeper, None
        try:
            if keeper is not None:
                self._drain(keeper)
        finally:
            _close(self._result)

    def _drain(self, keeper: _Keeper) -> None:
        complete = self._ended
        try:
            if self._failed:
                return
            if not complete and self._first is not None and not keeper.capture.size:
                keeper.capture.add(self._first)  # the server never even took the first chunk
            while not complete and keeper.capture.overflow is None:
                chunk = next(self._rest, None)
                if chunk is None:
                    complete = True
                else:
                    keeper.capture.add(chunk)
        finally:
            keeper.done(complete)
