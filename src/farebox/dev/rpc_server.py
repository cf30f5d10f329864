"""JSON-RPC 2.0 over HTTP for a :class:`~farebox.dev.devchain.DevChain` (``farebox devchain``).

The standard library's threading HTTP server: POST a request object or a batch array to any path.
Bodies are bounded (1 MiB), malformed JSON gets -32700, a malformed request -32600, and nothing a
client sends produces a traceback or an HTTP 500: every failure is a JSON-RPC error object. CORS is
open, as anvil's is, so browser wallets and dapps on another origin can use the chain.
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Protocol

import orjson

from farebox.ledgers.rpc import RpcError

__all__ = ["MAX_BATCH", "MAX_BODY_BYTES", "DevChainServer", "Handler", "dispatch", "serve"]

_log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1024 * 1024
MAX_BATCH: Final = 1000
# A client that opens a connection and sends nothing is dropped after this many seconds.
_IDLE_TIMEOUT: Final = 30.0


class Handler(Protocol):
    """What the server serves: :meth:`DevChain.handle <farebox.dev.devchain.DevChain.handle>`."""

    def handle(self, method: str, params: list[Any] | None = None) -> Any:
        """The result of ``method``, or raise :class:`~farebox.ledgers.rpc.RpcError`."""
        ...


def _error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _answer(chain: Handler, request: Any) -> dict[str, Any] | None:
    """The response object for one request, or ``None`` for a notification."""
    if not isinstance(request, dict):
        return _error(None, -32600, "invalid request: expected an object")
    request_id = request.get("id")
    if not (request_id is None or isinstance(request_id, str | int | float)) or isinstance(
        request_id, bool
    ):
        return _error(None, -32600, "invalid request: id must be a string, a number or null")
    if request.get("jsonrpc") != "2.0":
        return _error(request_id, -32600, 'invalid request: jsonrpc must be "2.0"')
    method = request.get("method")
    if not isinstance(method, str):
        return _error(request_id, -32600, "invalid request: method must be a string")
    params = request.get("params", [])
    if params is None:
        params = []
    if not isinstance(params, list):
        # JSON-RPC allows named parameters; no Ethereum method uses them.
        response: dict[str, Any] | None = _error(request_id, -32602, "params must be an array")
    else:
        try:
            result = chain.handle(method, params)
        except RpcError as exc:
            response = _error(request_id, exc.code, exc.message, exc.data)
        except Exception:
            # DevChain.handle turns its own failures into RpcError; anything else is a bug.
            _log.exception("devchain rpc: %s failed", method[:64])
            response = _error(request_id, -32603, "internal error")
        else:
            response = {"jsonrpc": "2.0", "id": request_id, "result": result}
    return None if "id" not in request else response


def dispatch(chain: Handler, body: bytes) -> bytes | None:
    """The HTTP response body for a JSON-RPC request body; ``None`` when nothing is to be said
    (only notifications)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return orjson.dumps(_error(None, -32700, "parse error"))
    if isinstance(payload, list):
        if not payload:
            return orjson.dumps(_error(None, -32600, "invalid request: empty batch"))
        if len(payload) > MAX_BATCH:
            return orjson.dumps(
                _error(None, -32600, f"invalid request: batch of more than {MAX_BATCH}")
            )
        answers = [answer for item in payload if (answer := _answer(chain, item)) is not None]
        return _dumps(answers) if answers else None
    answer = _answer(chain, payload)
    return None if answer is None else _dumps(answer)


def _dumps(document: Any) -> bytes:
    try:
        return orjson.dumps(document)
    except TypeError:
        # orjson.JSONEncodeError: a result that is not JSON (an int beyond 64 bits, say) is a bug.
        _log.exception("devchain rpc: unserializable result")
        return orjson.dumps(_error(None, -32603, "internal error: unserializable result"))


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "farebox-devchain"
    timeout = _IDLE_TIMEOUT
    chain: Handler  # set on the subclass each server makes

    def _send(self, status: int, body: bytes | None, *, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Access-Control-Allow-Origin", "*")
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body or b"")))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _declared_length(self) -> int | None:
        """The body's length if it is acceptable; else answer the client and return ``None``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = orjson.dumps(_error(None, -32600, "chunked bodies are not supported"))
            self._send(HTTPStatus.LENGTH_REQUIRED, body, close=True)
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            body = orjson.dumps(_error(None, -32600, "a Content-Length header is required"))
            self._send(HTTPStatus.LENGTH_REQUIRED, body, close=True)
            return None
        if length > MAX_BODY_BYTES:
            # Not read: the connection is closed instead.
            message = f"request body exceeds {MAX_BODY_BYTES} bytes"
            body = orjson.dumps(_error(None, -32600, message))
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, body, close=True)
            return None
        return length

    def handle_expect_100(self) -> bool:
        # "Expect: 100-continue" (curl's habit for large bodies): refuse before the body is sent.
        if self._declared_length() is None:
            return False
        return super().handle_expect_100()

    def do_POST(self) -> None:
        length = self._declared_length()
        if length is None:
            return
        request = self.rfile.read(length)
        if len(request) < length:
            self.close_connection = True  # the client went away mid-body
            return
        answer = dispatch(self.chain, request)
        if answer is None:
            self._send(HTTPStatus.NO_CONTENT, None)
        else:
            self._send(HTTPStatus.OK, answer)

    def do_OPTIONS(self) -> None:
        # The CORS preflight of browser clients.
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        body = orjson.dumps(_error(None, -32600, "send JSON-RPC requests with POST"))
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "POST, OPTIONS")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Requests are not logged to stderr one by one (a benchmark sends thousands).
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops connections when several server processes
    # open their pools at once; a node (anvil, geth) accepts hundreds.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-request is not worth a traceback on stderr.
        _log.debug("devchain rpc: connection from %s failed", client_address, exc_info=True)


class DevChainServer:
    """A JSON-RPC HTTP server for a chain, bound at construction (``port=0`` picks a free one).

    ``serve_forever()`` blocks; ``start()`` serves from a daemon thread, ``stop()`` (or leaving
    the ``with`` block) shuts it down and closes the socket.
    """

    def __init__(self, chain: Handler, host: str = "127.0.0.1", port: int = 8545) -> None:
        handler = type("DevChainRequestHandler", (_RequestHandler,), {"chain": chain})
        self._server = _Server((host, port), handler)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The port the server listens on (the one chosen when constructed with 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The RPC URL, e.g. ``http://127.0.0.1:8545``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called from another thread (or Ctrl-C)."""
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> DevChainServer:
        """Serve from a daemon thread; returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, name="farebox-devchain-rpc", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> DevChainServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(chain: Handler, host: str = "127.0.0.1", port: int = 8545) -> None:
    """Serve ``chain`` over JSON-RPC HTTP on ``host:port`` until interrupted (blocks)."""
    server = DevChainServer(chain, host, port)
    try:
        server.serve_forever()
    finally:
        server.stop()
