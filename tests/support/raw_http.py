"""A hostile HTTP/1.1 server on a real loopback socket, byte by byte.

Each connection reads one request, records it, and writes whatever the test's ``answer`` yields
(raw bytes: status line, headers, body), then closes. It counts what it managed to write before the
client hung up, so a test sees how much of an endless body a client read.
"""

from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RawServer",
    "Seen",
    "chunked",
    "endless",
    "gzip_bomb",
    "response",
]


@dataclass(frozen=True)
class Seen:
    """One request as it arrived: method, target and headers (lower-case names)."""

    method: str
    target: str
    headers: dict[str, str]


Answer = Callable[[Seen], Iterable[bytes]]


@dataclass
class RawServer:
    """Serves ``answer`` on ``host`` (a loopback name) and a free port; a context manager."""

    answer: Answer
    host: str = "127.0.0.1"
    seen: list[Seen] = field(default_factory=list)
    written: list[int] = field(default_factory=list)  # bytes written, per connection
    port: int = 0
    _sock: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> RawServer:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=10)
        assert self._sock is not None
        self._sock.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def saw(self, header: str) -> list[str]:
        """The values of ``header`` in every request that reached this server."""
        return [s.headers[header] for s in self.seen if header in s.headers]

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                seen = _read_request(conn)
            except (OSError, ValueError):
                return
            if seen is None:
                return
            self.seen.append(seen)
            written = 0
            try:
                for piece in self.answer(seen):
                    if self._stop.is_set():
                        break
                    conn.sendall(piece)
                    written += len(piece)
            except OSError:
                pass  # the client hung up: what it did not read is what the test measures
            finally:
                self.written.append(written)


def _read_request(conn: socket.socket) -> Seen | None:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return None
        data += part
        if len(data) > 1 << 20:
            raise ValueError("request head too large")
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        part = conn.recv(65536)
        if not part:
            break
        rest += part
    return Seen(method, target, headers)


def response(
    status: int, headers: Sequence[tuple[str, str]] = (), body: bytes = b""
) -> Iterator[bytes]:
    """A whole response with its Content-Length; the connection closes after it."""
    lines = [f"HTTP/1.1 {status} Hostile"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"content-length: {len(body)}", "connection: close", "", ""]
    yield "\r\n".join(lines).encode("latin-1") + body


def chunked(
    status: int, headers: Sequence[tuple[str, str]], pieces: Iterable[bytes]
) -> Iterator[bytes]:
    """A chunked response of ``pieces``, however many there are."""
    lines = [f"HTTP/1.1 {status} Hostile"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += ["transfer-encoding: chunked", "connection: close", "", ""]
    yield "\r\n".join(lines).encode("latin-1")
    for piece in pieces:
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def endless(piece: bytes, *, give_up: int) -> Iterator[bytes]:
    """``piece`` again and again: for the client, a body without end. The server stops after
    ``give_up`` bytes so that a client that reads everything still finishes the test (and fails it)."""
    sent = 0
    while sent < give_up:
        yield piece
        sent += len(piece)


_BOMBS: dict[int, bytes] = {}


def gzip_bomb(decoded: int) -> bytes:
    """``decoded`` zero bytes, gzip-compressed (about a thousandth of the size)."""
    if decoded not in _BOMBS:
        packer: Any = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        block = bytes(1 << 20)
        parts = [packer.compress(block) for _ in range(decoded // len(block))]
        parts.append(packer.flush())
        _BOMBS[decoded] = b"".join(parts)
    return _BOMBS[decoded]
