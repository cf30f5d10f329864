"""The raw I-JSON gate (RFC 7493, PEAC Wire 0.2 §10.6) and the kernel constraints.

PEAC verifiers run the gate on the exact header and payload bytes before trusting any JSON in them,
and issuers run it on the bytes they are about to sign, so that no record is minted that a verifier
rejects. Python's ``json`` is too permissive on its own: it keeps the last of two duplicate member
names, accepts integers of any size, and lets lone surrogates and noncharacters through.

Two implementations of one predicate live here, on purpose:

- the fast path, :func:`parse_ijson`, drives the C scanner of :mod:`json` with hooks that reject
  duplicate names and out-of-range numbers, then looks for invalid strings;
- the exact scanner, :func:`ijson_error`, walks the bytes once in document order and names the first
  violation the way the reference gate (``@peac/crypto`` ``assertIJson``) does.

Valid input only ever takes the fast path. When the fast path finds anything wrong, the exact scanner
decides which code to report, so that an input with several faults gets the same first code as the
reference. The property tests check that the two agree on acceptance.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NoReturn

from farebox.errors import ReceiptError

__all__ = [
    "E_IJSON_DUPLICATE_MEMBER_NAME",
    "E_IJSON_INVALID_STRING",
    "E_IJSON_NUMBER_OUT_OF_RANGE",
    "MAX_SAFE_INTEGER",
    "check_kernel_constraints",
    "ijson_error",
    "parse_ijson",
]

E_IJSON_DUPLICATE_MEMBER_NAME: Final = "E_IJSON_DUPLICATE_MEMBER_NAME"
E_IJSON_NUMBER_OUT_OF_RANGE: Final = "E_IJSON_NUMBER_OUT_OF_RANGE"
E_IJSON_INVALID_STRING: Final = "E_IJSON_INVALID_STRING"
_E_INVALID_FORMAT: Final = "E_INVALID_FORMAT"

MAX_SAFE_INTEGER: Final = 9_007_199_254_740_991
_MAX_SAFE_DIGITS: Final = str(MAX_SAFE_INTEGER)

# Noncharacters (U+FDD0..U+FDEF and the last two code points of every plane) and surrogates. A
# surrogate can only reach a decoded ``str`` through a ``\u`` escape (the UTF-8 decoder refuses
# encoded surrogates), and a valid escaped pair is already combined by ``json``, so any surrogate
# left over is a lone one.
_BAD_CHARS: Final = re.compile(
    "[\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(17))
    + "]"
)

_NUMBER: Final = re.compile(r"-?(0|[1-9][0-9]*)(?:\.([0-9]+))?(?:[eE]([+-]?)([0-9]+))?")


class _Invalid(Exception):
    """Internal signal from a json hook: the fast path found a violation."""


def _raise(code: str, message: str) -> NoReturn:
    raise ReceiptError(code, message)


# --- numbers ---------------------------------------------------------------------------------------


def _split_number(literal: str) -> tuple[str, int]:
    """``literal`` as (significant digits without leading zeros, power of ten); "" means zero."""
    m = _NUMBER.fullmatch(literal)
    if m is None:  # pragma: no cover - json and the scanner only hand over well-formed literals
        raise _Invalid(literal)
    int_part, frac, exp_sign, exp_digits = m.group(1), m.group(2) or "", m.group(3), m.group(4)
    significant = (int_part + frac).lstrip("0")
    exponent = 0
    if exp_digits:
        stripped = exp_digits.lstrip("0") or "0"
        # Past 10**9 the exact exponent no longer matters: the number is huge or (nearly) zero.
        exponent = int(stripped) if len(stripped) <= 9 else 10**9
        if exp_sign == "-":
            exponent = -exponent
    return significant, exponent - len(frac)


def _out_of_range(significant: str, power: int) -> bool:
    """Whether significant * 10**power exceeds 2**53 - 1 in magnitude, decided on digits alone."""
    if not significant:
        return False
    integer_digits = len(significant) + power
    bound = len(_MAX_SAFE_DIGITS)
    if integer_digits != bound:
        return integer_digits > bound
    if power >= 0:
        return significant + "0" * power > _MAX_SAFE_DIGITS
    head, tail = significant[:bound], significant[bound:]
    if head != _MAX_SAFE_DIGITS:
        return head > _MAX_SAFE_DIGITS
    return tail.strip("0") != ""


def _number_value(literal: str) -> int | float:
    """The value of an in-range JSON number; integral values come back as ``int``.

    JSON has one number type, and JavaScript's ``Number.isInteger(1e3)`` is true, so ``1e3`` and
    ``1.0`` are integers here too (``iat: 1.7e9`` passes the reference schema's ``int()`` check).
    """
    significant, power = _split_number(literal)
    if _out_of_range(significant, power):
        raise _Invalid(E_IJSON_NUMBER_OUT_OF_RANGE)
    if not significant:
        return 0
    sign = -1 if literal.startswith("-") else 1
    if power >= 0:
        return sign * int(significant + "0" * power)  # at most 16 digits: in range
    trimmed = significant.rstrip("0")
    if len(significant) - len(trimmed) >= -power:
        return sign * int(significant[: len(significant) + power])
    return float(literal)


def _parse_int(literal: str) -> int:
    # JSON forbids leading zeros, so more than 17 characters is out of range without arithmetic.
    if len(literal) > 17:
        raise _Invalid(E_IJSON_NUMBER_OUT_OF_RANGE)
    value = int(literal)
    if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value
    raise _Invalid(E_IJSON_NUMBER_OUT_OF_RANGE)


def _parse_constant(name: str) -> NoReturn:
    raise _Invalid(_E_INVALID_FORMAT)  # NaN and Infinity are not JSON


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Invalid(E_IJSON_DUPLICATE_MEMBER_NAME)
    return obj


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_pairs,
    parse_int=_parse_int,
    parse_float=_number_value,
    parse_constant=_parse_constant,
)


def _strings_valid(value: Any) -> bool:
    """Whether every member name and string in ``value`` is free of surrogates and noncharacters."""
    stack = [value]
    search = _BAD_CHARS.search
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if search(item):
                return False
        elif isinstance(item, dict):
            for key, child in item.items():
                if search(key):
                    return False
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return True


# The C decoder recurses once per nesting level and trusts sys.getrecursionlimit(), which some
# libraries raise (importing py_ecc, under web3, sets it to 100,000): a few thousand levels then
# overflow the C stack and kill the process instead of raising. Text nested deeper than this never
# reaches it: below the default limit of 1,000, so an unmodified interpreter behaves the same.
_SAFE_DEPTH: Final = 900
_STRUCTURE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _deeper_than(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (cheap when they cannot)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for token in _STRUCTURE.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def parse_ijson(data: bytes) -> Any:
    """Parse ``data`` as one I-JSON document, or raise :class:`ReceiptError`.

    The codes are those of the reference gate: ``E_IJSON_DUPLICATE_MEMBER_NAME``,
    ``E_IJSON_NUMBER_OUT_OF_RANGE``, ``E_IJSON_INVALID_STRING``, and ``E_INVALID_FORMAT`` for any
    other syntax error. Integral numbers are returned as ``int``.
    """
    try:
        text = data.decode("utf-8")
        # Raw noncharacters are rare (and impossible in ASCII); when present, let the exact scanner
        # place them.
        if _deeper_than(text, _SAFE_DEPTH):
            raise RecursionError
        if text.isascii() or _BAD_CHARS.search(text) is None:
            value = _DECODER.decode(text)
            # Escapes are the only other way to smuggle a bad code point into a string.
            if "\\u" not in text or _strings_valid(value):
                return value
    except RecursionError:
        # Deeper than json can follow, and far past the kernel's depth limit of 32. The reference
        # would report that limit only after the signature check; we report it here, unless the
        # (iterative) exact scanner finds an I-JSON violation, which the reference reports first.
        code = ijson_error(data) or "E_CONSTRAINT_VIOLATION"
        _raise(code, _MESSAGES.get(code, "JSON nesting exceeds the kernel depth limit"))
    except (UnicodeDecodeError, ValueError, _Invalid):
        pass
    code = ijson_error(data) or _E_INVALID_FORMAT
    _raise(code, _MESSAGES.get(code, "not a valid JSON document"))


_MESSAGES: Final = {
    E_IJSON_DUPLICATE_MEMBER_NAME: "duplicate object member name",
    E_IJSON_NUMBER_OUT_OF_RANGE: "number is non-finite or beyond +/-(2**53 - 1); encode it as a string",
    E_IJSON_INVALID_STRING: "string holds a lone surrogate, a noncharacter, a bad escape or bad UTF-8",
}


# --- the exact scanner -----------------------------------------------------------------------------

_WS: Final = frozenset(b" \t\n\r")
_ESCAPES: Final = {
    ord('"'): '"',
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_DIGITS: Final = frozenset(b"0123456789")


class _ScanError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _Scanner:
    """A single pass over raw bytes with an explicit stack (no recursion, any nesting depth)."""

    def __init__(self, data: bytes) -> None:
        self.b = data
        self.i = 0
        self.n = len(data)

    def peek(self) -> int:
        return self.b[self.i] if self.i < self.n else -1

    def skip_ws(self) -> None:
        while self.i < self.n and self.b[self.i] in _WS:
            self.i += 1

    def run(self) -> None:
        # Each open container is a frame: a set of member names for an object, None for an array.
        stack: list[set[str] | None] = []
        while True:
            self.skip_ws()
            c = self.peek()
            if c == ord("{"):
                self.i += 1
                self.skip_ws()
                if self.peek() == ord("}"):
                    self.i += 1
                else:
                    names: set[str] = set()
                    stack.append(names)
                    self.member_name(names)
                    continue
            elif c == ord("["):
                self.i += 1
                self.skip_ws()
                if self.peek() == ord("]"):
                    self.i += 1
                else:
                    stack.append(None)
                    continue
            else:
                self.scalar(c)
            # A value is complete: close containers until one expects another element.
            while stack:
                self.skip_ws()
                frame = stack[-1]
                c = self.peek()
                if c == ord(","):
                    self.i += 1
                    if frame is not None:
                        self.skip_ws()
                        self.member_name(frame)
                    break
                if c == (ord("]") if frame is None else ord("}")):
                    self.i += 1
                    stack.pop()
                    continue
                raise _ScanError(_E_INVALID_FORMAT)
            if not stack:
                break
        self.skip_ws()
        if self.i != self.n:
            raise _ScanError(_E_INVALID_FORMAT)

    def member_name(self, names: set[str]) -> None:
        if self.peek() != ord('"'):
            raise _ScanError(_E_INVALID_FORMAT)
        name = self.string()
        if name in names:
            raise _ScanError(E_IJSON_DUPLICATE_MEMBER_NAME)
        names.add(name)
        self.skip_ws()
        if self.peek() != ord(":"):
            raise _ScanError(_E_INVALID_FORMAT)
        self.i += 1

    def scalar(self, c: int) -> None:
        if c == ord('"'):
            self.string()
        elif c == ord("t"):
            self.literal(b"true")
        elif c == ord("f"):
            self.literal(b"false")
        elif c == ord("n"):
            self.literal(b"null")
        elif c == ord("-") or c in _DIGITS:
            self.number()
        else:
            raise _ScanError(_E_INVALID_FORMAT)

    def literal(self, word: bytes) -> None:
        if self.b[self.i : self.i + len(word)] != word:
            raise _ScanError(_E_INVALID_FORMAT)
        self.i += len(word)

    def number(self) -> None:
        start = self.i
        if self.peek() == ord("-"):
            self.i += 1
        if self.peek() == ord("0"):
            self.i += 1
        elif self.peek() in _DIGITS:
            self.digits()
        else:
            raise _ScanError(_E_INVALID_FORMAT)
        if self.peek() == ord("."):
            self.i += 1
            if self.peek() not in _DIGITS:
                raise _ScanError(_E_INVALID_FORMAT)
            self.digits()
        if self.peek() in (ord("e"), ord("E")):
            self.i += 1
            if self.peek() in (ord("+"), ord("-")):
                self.i += 1
            if self.peek() not in _DIGITS:
                raise _ScanError(_E_INVALID_FORMAT)
            self.digits()
        if _out_of_range(*_split_number(self.b[start : self.i].decode("ascii"))):
            raise _ScanError(E_IJSON_NUMBER_OUT_OF_RANGE)

    def digits(self) -> None:
        while self.i < self.n and self.b[self.i] in _DIGITS:
            self.i += 1

    def hex4(self) -> int:
        chunk = self.b[self.i : self.i + 4]
        if len(chunk) < 4 or any(ch not in _HEX for ch in chunk):
            raise _ScanError(E_IJSON_INVALID_STRING)
        self.i += 4
        return int(chunk, 16)

    def string(self) -> str:
        """Consume a string and return its decoded value (names are compared after unescaping)."""
        self.i += 1
        parts: list[str] = []
        run = self.i
        while True:
            if self.i >= self.n:
                raise _ScanError(E_IJSON_INVALID_STRING)
            c = self.b[self.i]
            if c == ord('"') or c == ord("\\"):
                parts.append(_decode_run(self.b[run : self.i]))
                self.i += 1
                if c == ord('"'):
                    return "".join(parts)
                parts.append(self.escape())
                run = self.i
            elif c < 0x20:
                raise _ScanError(_E_INVALID_FORMAT)
            else:
                self.i += 1

    def escape(self) -> str:
        if self.i >= self.n:
            raise _ScanError(E_IJSON_INVALID_STRING)
        e = self.b[self.i]
        if e in _ESCAPES:
            self.i += 1
            return _ESCAPES[e]
        if e != ord("u"):
            raise _ScanError(E_IJSON_INVALID_STRING)
        self.i += 1
        unit = self.hex4()
        if 0xD800 <= unit <= 0xDBFF:
            if self.b[self.i : self.i + 2] != b"\\u":
                raise _ScanError(E_IJSON_INVALID_STRING)
            self.i += 2
            low = self.hex4()
            if not 0xDC00 <= low <= 0xDFFF:
                raise _ScanError(E_IJSON_INVALID_STRING)
            char = chr(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
        elif 0xDC00 <= unit <= 0xDFFF:
            raise _ScanError(E_IJSON_INVALID_STRING)
        else:
            char = chr(unit)
        if _BAD_CHARS.search(char):
            raise _ScanError(E_IJSON_INVALID_STRING)
        return char


def _decode_run(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _ScanError(E_IJSON_INVALID_STRING) from None
    if _BAD_CHARS.search(text):
        raise _ScanError(E_IJSON_INVALID_STRING)
    return text


def ijson_error(data: bytes) -> str | None:
    """The code of the first I-JSON violation in ``data`` in document order, or None if it is valid."""
    try:
        _Scanner(data).run()
    except _ScanError as exc:
        return exc.code
    return None


# --- kernel constraints ----------------------------------------------------------------------------

MAX_NESTED_DEPTH: Final = 32
MAX_ARRAY_LENGTH: Final = 10_000
MAX_OBJECT_KEYS: Final = 1_000
MAX_STRING_LENGTH: Final = 65_536  # UTF-16 code units, as JavaScript's String.length counts
MAX_TOTAL_NODES: Final = 100_000


def _utf16_length(s: str) -> int:
    if len(s) * 2 <= MAX_STRING_LENGTH:
        return len(s)  # cannot exceed the limit even if every character needs a surrogate pair
    return len(s.encode("utf-16-le")) // 2


def _violation(constraint: str, actual: int, limit: int, pointer: str) -> NoReturn:
    raise ReceiptError(
        "E_CONSTRAINT_VIOLATION",
        f"kernel constraint {constraint} violated (actual {actual}, limit {limit})",
        {"constraint": constraint, "actual": actual, "limit": limit, "pointer": pointer},
    )


def _escape_pointer(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def _within_limits(value: Any) -> bool:
    """The fast pass of the kernel check: no pointers, just whether every limit holds."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_TOTAL_NODES or depth > MAX_NESTED_DEPTH:
            return False
        kind = type(item)
        if kind is str:
            if _utf16_length(item) > MAX_STRING_LENGTH:
                return False
        elif kind is dict:
            if len(item) > MAX_OBJECT_KEYS:
                return False
            stack.extend([(child, depth + 1) for child in item.values()])
        elif kind is list:
            if len(item) > MAX_ARRAY_LENGTH:
                return False
            stack.extend([(child, depth + 1) for child in item])
    return True


def _small_and_shallow(source: bytes) -> bool:
    """Whether JSON text this small and flat cannot break any kernel limit, without parsing it.

    Within 4,000 bytes no string reaches 65,536 UTF-16 units (each unit costs at least a byte), no
    array 10,000 elements, no object 1,000 members (5+ bytes each) and no tree 100,000 nodes; and a
    node at depth d sits inside d containers, each opened by its own bracket byte, so at most 32
    brackets (counting those inside strings too) bounds the depth.
    """
    return len(source) <= 4000 and source.count(b"{") + source.count(b"[") <= MAX_NESTED_DEPTH


def check_kernel_constraints(value: Any, source: bytes | None = None) -> None:
    """Raise ``E_CONSTRAINT_VIOLATION`` if ``value`` breaks a PEAC kernel structural limit.

    Every node (container or scalar) counts once and is visited depth-first in document order, so
    the first violation reported is the one the reference reports. Values come from the JSON parser
    (``dict``, ``list``, ``str``, numbers, ``bool``, ``None``). ``source``, the JSON text ``value``
    was parsed from, lets small flat documents skip the walk.
    """
    if (source is not None and _small_and_shallow(source)) or _within_limits(value):
        return
    # Rare path: walk again, this time keeping JSON pointers, to name the first violation.
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    nodes = 0
    while stack:
        item, depth, pointer = stack.pop()
        nodes += 1
        if nodes > MAX_TOTAL_NODES:
            _violation("MAX_TOTAL_NODES", nodes, MAX_TOTAL_NODES, pointer)
        if depth > MAX_NESTED_DEPTH:
            _violation("MAX_NESTED_DEPTH", depth, MAX_NESTED_DEPTH, pointer)
        if isinstance(item, str):
            length = _utf16_length(item)
            if length > MAX_STRING_LENGTH:
                _violation("MAX_STRING_LENGTH", length, MAX_STRING_LENGTH, pointer)
        elif isinstance(item, list):
            if len(item) > MAX_ARRAY_LENGTH:
                _violation("MAX_ARRAY_LENGTH", len(item), MAX_ARRAY_LENGTH, pointer)
            stack.extend(
                (item[i], depth + 1, f"{pointer}/{i}") for i in range(len(item) - 1, -1, -1)
            )
        elif isinstance(item, dict):
            if len(item) > MAX_OBJECT_KEYS:
                _violation("MAX_OBJECT_KEYS", len(item), MAX_OBJECT_KEYS, pointer)
            stack.extend(
                (child, depth + 1, f"{pointer}/{_escape_pointer(key)}")
                for key, child in reversed(item.items())
            )
