"""The request target, read once: the one path the gate matches and the app or upstream receives.

A paid path must not be reachable under another spelling. If the gate matched the path as sent and
something downstream (an HTTP client, a framework, a file server) resolved ``..`` or ``%2e`` later,
``/x/../weather`` would be free while it serves ``/weather``. So every face asks
:func:`normalize_target` once, before the gate; the gate matches its ``path``, and the app (its scope
or environ rewritten) or the upstream (sent exactly ``raw_path``) sees the same path. What cannot be
normalized to one meaning is refused. The rules (RFC 3986 and RFC 9112, then the safe choice where
servers disagree):

- Origin-form only (``/path?query``). Absolute-form (``http://host/path``) is read as its path only
  when its authority is the request's own ``Host``; anything else (``@host/``, ``.evil/``,
  ``host:port``, ``*``, another authority, userinfo) is a 400.
- Percent-encoded unreserved characters are decoded (``%2e`` is ``.``, ``%65`` is ``e``), other
  escapes are upper-cased; then empty segments collapse (``//`` is ``/``) and dot segments are
  removed (RFC 3986 section 5.2.4; ``..`` above the root stays at the root). A trailing slash stays.
- Refused with a 400: a fragment or raw ``#``, an encoded slash ``%2F`` (servers split on it or not),
  a backslash raw or as ``%5C`` (a separator to some servers), a control character or NUL raw or
  encoded, a ``%`` not followed by two hex digits, a path that is not UTF-8, a dot segment carrying
  ``;`` parameters (``..;``, which servlet containers read as ``..``), non-ASCII bytes.
- Over :data:`MAX_TARGET_BYTES` (path and query together) is a 414.
- ``"<>[]^`{|}`` are percent-encoded (as HTTP clients would); the query is otherwise passed as sent.

Pure: bytes in, a frozen :class:`Target` out or :class:`BadTarget` raised; no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

import orjson

from farebox.errors import PROBLEM_TYPE_BASE, FareboxError

__all__ = [
    "MAX_TARGET_BYTES",
    "BadTarget",
    "Target",
    "check_framing",
    "normalize_target",
    "target_of_decoded",
]

# RFC 9112 section 3 asks for at least 8000 octets; more is far past any real API's paths.
MAX_TARGET_BYTES = 8 * 1024

_ALPHANUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_UNRESERVED = frozenset(_ALPHANUM + b"-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
# RFC 3986 pchar besides unreserved and pct-encoded: kept raw in a path.
_SUB_DELIMS = frozenset(b"!$&'()*+,;=:@")
# Printable, not allowed raw by RFC 3986, sent anyway by some clients: encoded, meaning unchanged.
_ENCODED = frozenset(b'"<>[]^`{|}')
# Decoded, these would give the path a second meaning downstream: refused even when encoded.
_NEVER = frozenset({ord("/"), ord("\\"), 0x7F, *range(0x20)})
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)", re.DOTALL)
# A path already in normal form, as nearly every request's is: segments of unreserved characters
# and sub-delimiters that do not start with a dot, no escapes, no empty segment but a trailing
# slash. It is its own normal form, and the byte-by-byte walk below is skipped for it.
_NORMAL_PATH = re.compile(rb"(?:/[A-Za-z0-9\-_~!$&'()*+,;=:@][A-Za-z0-9\-._~!$&'()*+,;=:@]*)*/?")
# A query of printable ASCII that needs no escaping.
_NORMAL_QUERY = re.compile(rb"[\x21-\x7e]*")
_QUERY_ESCAPED = re.compile(rb'["<>\[\]^`{|}\\#]')
_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}


class BadTarget(FareboxError, ValueError):
    """A request target (or its framing) that is refused: ``code``, HTTP ``status``, ``message``."""

    def __init__(self, message: str, *, code: str = "invalid_request_target", status: int = 400):
        self.code = code
        self.status = status
        self.message = message
        super().__init__(f"{code}: {message}")

    def to_problem(self) -> dict[str, Any]:
        """This refusal as an RFC 9457 ``application/problem+json`` document."""
        titles = {400: "Bad Request", 414: "URI Too Long"}
        return {
            "type": PROBLEM_TYPE_BASE + self.code,
            "title": titles.get(self.status, "Bad Request"),
            "status": self.status,
            "detail": self.message,
            "code": self.code,
        }

    def reply(self) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """Status, headers and body of the answer (a face wraps them in its reply type)."""
        headers = (("content-type", "application/problem+json"), ("cache-control", "no-store"))
        return self.status, headers, orjson.dumps(self.to_problem())


@dataclass(frozen=True, slots=True)
class Target:
    """A normalized origin-form target.

    ``raw_path`` is what goes on the wire (percent-encoded, no dot segments, never ``%2F``);
    ``path`` is it decoded, the string routes match; ``query`` is the bytes after ``?``.
    """

    path: str
    raw_path: bytes
    query: bytes


def normalize_target(raw_path: bytes, query: bytes = b"", *, host: str | None = None) -> Target:
    """The one normalized :class:`Target` of a request line's target, split at its first ``?``.

    ``host`` is the request's ``Host`` header: an absolute-form target is accepted only when its
    authority equals it. Raises :class:`BadTarget` (400, or 414 when too long).
    """
    _check_size(raw_path, query)
    if not raw_path.startswith(b"/"):
        found = _ABSOLUTE.fullmatch(raw_path)
        if found is not None:
            raw_path = _own_path(found, host)
        if not raw_path.startswith(b"/"):
            raise BadTarget("the request target must be a path starting with '/' (origin-form)")
    return Target(*_path(raw_path), _query(query))


def target_of_decoded(path: str, query: bytes = b"", *, encoding: str = "utf-8") -> Target:
    """:func:`normalize_target` for a face that has only the decoded path (a WSGI ``PATH_INFO``,
    an ASGI scope without ``raw_path``): it is encoded first, so ``%`` stays a literal percent."""
    try:
        raw = path.encode(encoding)
    except UnicodeEncodeError:
        raise BadTarget("the path is not text") from None
    _check_size(raw, query)  # before quoting makes it up to three times longer
    return normalize_target(quote_from_bytes(raw, safe="/!$&'()*+,;=:@").encode("ascii"), query)


def check_framing(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse a request body whose length two parties could read differently (request smuggling):
    ``Content-Length`` beside ``Transfer-Encoding``, or more than one ``Content-Length``."""
    lengths = 0
    chunked = False
    for name, _ in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            lengths += 1
        elif lowered == b"transfer-encoding":
            chunked = True
    if lengths > 1 or (lengths and chunked):
        raise BadTarget(
            "Content-Length with Transfer-Encoding, or Content-Length twice",
            code="invalid_request_framing",
        )


def _check_size(raw_path: bytes, query: bytes) -> None:
    if len(raw_path) + len(query) > MAX_TARGET_BYTES:
        raise BadTarget(
            f"request target over {MAX_TARGET_BYTES} bytes",
            code="request_target_too_long",
            status=414,
        )


def _own_path(found: re.Match[bytes], host: str | None) -> bytes:
    scheme, authority, path = found.group(1).lower(), found.group(2).lower(), found.group(3)
    if scheme not in _DEFAULT_PORT:
        raise BadTarget("only http and https targets are served")
    own = (host or "").strip().lower().encode("latin-1", "replace")
    default = _DEFAULT_PORT[scheme]
    if not own or b"@" in authority or authority.removesuffix(default) != own.removesuffix(default):
        # An absolute URL naming another host asks for a forward proxy, which this is not.
        raise BadTarget("an absolute-form target must name this server (its Host)")
    return path or b"/"


def _path(raw: bytes) -> tuple[str, bytes]:
    if _NORMAL_PATH.fullmatch(raw) is not None:
        return raw.decode("ascii"), raw
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # "%"
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not (pair[0] in _HEX and pair[1] in _HEX):
                raise BadTarget("a '%' in the path is not followed by two hex digits")
            value = int(pair, 16)
            if value in _NEVER:
                raise BadTarget(f"the path encodes %{value:02X}, which is refused")
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + pair.upper()
            i += 3
            continue
        if byte in _UNRESERVED or byte in _SUB_DELIMS or byte == 0x2F:
            out.append(byte)
        elif byte in _ENCODED:
            out += b"%%%02X" % byte
        else:  # "#", "\", controls, space, non-ASCII
            raise BadTarget(f"the path holds byte 0x{byte:02X}, which is refused")
        i += 1
    segments: list[bytes] = []
    trailing = False
    for segment in bytes(out).split(b"/")[1:]:
        trailing = segment in (b"", b".", b"..")
        if segment == b"..":
            if segments:
                segments.pop()
        elif trailing:
            continue
        elif segment.partition(b";")[0] in (b".", b".."):
            raise BadTarget("a dot segment with ';' parameters is refused")
        else:
            segments.append(segment)
    normalized = b"/" + b"/".join(segments) + (b"/" if trailing and segments else b"")
    try:
        decoded = unquote_to_bytes(normalized).decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("the path is not UTF-8 once decoded") from None
    return decoded, normalized


def _query(query: bytes) -> bytes:
    if not query:
        return b""
    if _NORMAL_QUERY.fullmatch(query) is not None and _QUERY_ESCAPED.search(query) is None:
        return query
    out = bytearray()
    for byte in query:
        if byte in _ENCODED or byte == 0x5C:
            out += b"%%%02X" % byte
        elif 0x21 <= byte <= 0x7E and byte != 0x23:  # printable ASCII but "#"
            out.append(byte)
        else:
            raise BadTarget(f"the query holds byte 0x{byte:02X}, which is refused")
    return bytes(out)
