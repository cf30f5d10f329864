"""Ethereum JSON-RPC as one small async interface, over HTTP or in-process.

Settlement speaks only this interface, so the same code settles on the embedded chain (in-process,
no socket), on ``farebox devchain``, on anvil or on a public node. Errors come back as
:class:`RpcError` (the node answered with a JSON-RPC error, e.g. a revert) or
:class:`RpcUnavailable` (no usable answer: refused, timed out, not JSON).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import httpx
import orjson

from farebox.errors import FareboxError

__all__ = ["MAX_RPC_RESPONSE_BYTES", "HttpRpc", "Rpc", "RpcError", "RpcUnavailable"]

# A receipt with many logs or a block can be large, but a node never needs megabytes to answer us.
MAX_RPC_RESPONSE_BYTES = 4 * 1024 * 1024


class RpcError(FareboxError):
    """The node answered with a JSON-RPC error object.

    A revert is ``code`` 3 (geth, anvil) or -32000/-32015 with the revert bytes in ``data``
    (``0x08c379a0`` + ABI ``Error(string)``) and usually ``"execution reverted: <reason>"`` in
    ``message``.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code = code
        self.message = message
        self.data = data
        super().__init__(f"JSON-RPC error {code}: {message}")


class RpcUnavailable(FareboxError):
    """No usable answer from the node: connection refused, timeout, a non-JSON or oversized body."""


@runtime_checkable
class Rpc(Protocol):
    """Ethereum JSON-RPC: one method call, its ``result`` or an exception."""

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        """Call ``method`` with ``params``; the ``result``, or raise :class:`RpcError` /
        :class:`RpcUnavailable`."""
        ...


class HttpRpc:
    """JSON-RPC over HTTP(S) to a node URL, with a bounded response and a timeout."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._client = client
        self._own_client = client is None
        self._ids = itertools.count(1)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    async def request(self, method: str, params: Sequence[Any] = ()) -> Any:
        body = orjson.dumps(
            {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": list(params)}
        )
        try:
            async with self._http().stream(
                "POST", self.url, content=body, headers={"content-type": "application/json"}
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_RPC_RESPONSE_BYTES:
                        raise RpcUnavailable(f"{method}: the node's answer exceeds the size limit")
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            # The URL may embed an API key: name the failure, never the URL.
            raise RpcUnavailable(f"{method}: {type(exc).__name__} talking to the node") from None
        try:
            answer = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError:
            raise RpcUnavailable(
                f"{method}: the node answered HTTP {response.status_code} without JSON"
            ) from None
        if not isinstance(answer, dict):
            raise RpcUnavailable(f"{method}: the node's answer is not a JSON-RPC object")
        error = answer.get("error")
        if error is not None:
            if not isinstance(error, dict):
                raise RpcUnavailable(f"{method}: malformed JSON-RPC error")
            code = error.get("code")
            message = error.get("message")
            raise RpcError(
                code if isinstance(code, int) else -32603,
                message[:1024] if isinstance(message, str) else "",
                error.get("data"),
            )
        if "result" not in answer:
            raise RpcUnavailable(f"{method}: JSON-RPC answer without a result")
        return answer["result"]

    async def aclose(self) -> None:
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None
