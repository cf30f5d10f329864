"""Request-target normalization, the one path the gate matches and the app or upstream receives:
RFC 3986 dot-segment removal, the refusals, absolute-form, framing, and the properties every face
relies on (idempotent; what it returns is what an HTTP client sends unchanged)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from farebox.server.target import (
    MAX_TARGET_BYTES,
    BadTarget,
    Target,
    check_framing,
    normalize_target,
    target_of_decoded,
)


@pytest.mark.parametrize(
    ("raw", "path", "wire"),
    [
        (b"/", "/", b"/"),
        (b"/weather", "/weather", b"/weather"),
        (b"/x/../weather", "/weather", b"/weather"),
        (b"/./weather", "/weather", b"/weather"),
        (b"/weather/.", "/weather/", b"/weather/"),
        (b"/weather/..", "/", b"/"),
        (b"/a/b/../../weather", "/weather", b"/weather"),
        (b"/../../weather", "/weather", b"/weather"),  # above the root stays at the root
        (b"/%2e%2E/weather", "/weather", b"/weather"),
        (b"/x/.%2e/weather", "/weather", b"/weather"),
        (b"//weather", "/weather", b"/weather"),
        (b"/a//b///c//", "/a/b/c/", b"/a/b/c/"),
        (b"/a//../b", "/b", b"/b"),  # slashes merge before dots resolve
        (b"/weath%65r", "/weather", b"/weather"),
        (b"/%7euser", "/~user", b"/~user"),
        (b"/a%3bb", "/a;b", b"/a%3Bb"),  # a reserved escape stays escaped, upper-cased
        (b"/a%20b", "/a b", b"/a%20b"),
        (b"/a%25b", "/a%b", b"/a%25b"),
        (b"/caf%c3%a9", "/café", b"/caf%C3%A9"),
        (b"/a{b}|c", "/a{b}|c", b"/a%7Bb%7D%7Cc"),
        (b"/a;b=1,c@d:e!$&'()*+", "/a;b=1,c@d:e!$&'()*+", b"/a;b=1,c@d:e!$&'()*+"),
        (b"/...", "/...", b"/..."),
        (b"/..a/.b", "/..a/.b", b"/..a/.b"),
    ],
)
def test_normalized(raw: bytes, path: str, wire: bytes) -> None:
    assert normalize_target(raw) == Target(path, wire, b"")


@pytest.mark.parametrize(
    "raw",
    [
        b"/weather#f",
        b"/weather%2f",
        b"/weather%2F..",
        b"/a%5cb",
        b"/a\\b",
        b"/a%00",
        b"/a%0A",
        b"/a%7F",
        b"/a\x00",
        b"/a b",
        b"/a\x80",
        b"/a%",
        b"/a%4",
        b"/a%g0",
        b"/a%ff",  # not UTF-8
        b"/..;/weather",
        b"/.;x/weather",
        b"/x/%2e%2e;x/weather",
        b"*",
        b"",
        b"weather",
        b"@127.0.0.1:6379/",
        b".evil.example/",
        b"127.0.0.1:6379",
        b"ftp://api.test/x",
        b"http://evil.example/weather",
        b"http://user@api.test/weather",
        b"http://api.test:8080/weather",
        b"http:/api.test/weather",
    ],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(BadTarget) as caught:
        normalize_target(raw, host="api.test")
    assert (caught.value.code, caught.value.status) == ("invalid_request_target", 400)
    problem = caught.value.to_problem()
    assert problem["code"] == "invalid_request_target"
    assert problem["status"] == 400


@pytest.mark.parametrize(
    ("raw", "host", "path"),
    [
        (b"http://api.test/x/../weather", "api.test", "/weather"),
        (b"HTTP://API.TEST/weather", "api.test", "/weather"),
        (b"http://api.test:80/weather", "api.test", "/weather"),
        (b"http://api.test/weather", "api.test:80", "/weather"),
        (b"https://api.test:443/weather", "api.test", "/weather"),
        (b"http://127.0.0.1:8402", "127.0.0.1:8402", "/"),
        (b"http://[::1]:8402/a", "[::1]:8402", "/a"),
    ],
)
def test_absolute_form_naming_the_host_is_its_path(raw: bytes, host: str, path: str) -> None:
    assert normalize_target(raw, host=host).path == path


def test_absolute_form_needs_a_host_to_compare() -> None:
    with pytest.raises(BadTarget):
        normalize_target(b"http://api.test/weather")
    with pytest.raises(BadTarget):
        normalize_target(b"https://api.test:80/weather", host="api.test")


def test_the_query_is_kept_but_checked() -> None:
    assert normalize_target(b"/a", b"x=%2e%2e/..&y=%zz").query == b"x=%2e%2e/..&y=%zz"
    assert normalize_target(b"/a", b'q="<{\\}>"').query == b"q=%22%3C%7B%5C%7D%3E%22"
    for query in (b"a#f", b"a b", b"a\x00", b"\xff"):
        with pytest.raises(BadTarget):
            normalize_target(b"/a", query)


def test_too_long_is_a_414() -> None:
    normalize_target(b"/" + b"a" * (MAX_TARGET_BYTES - 1))
    for raw, query in ((b"/" + b"a" * MAX_TARGET_BYTES, b""), (b"/a", b"q" * MAX_TARGET_BYTES)):
        with pytest.raises(BadTarget) as caught:
            normalize_target(raw, query)
        assert (caught.value.code, caught.value.status) == ("request_target_too_long", 414)
    with pytest.raises(BadTarget) as caught:
        target_of_decoded("/" + "\\" * MAX_TARGET_BYTES)
    assert caught.value.status == 414


def test_a_decoded_path_is_encoded_first() -> None:
    # A WSGI PATH_INFO or a scope without raw_path is already decoded: "%2e" there is literal.
    assert target_of_decoded("/a%2e%2e/../b").raw_path == b"/b"
    assert target_of_decoded("/x/%2e%2e/weather").path == "/x/%2e%2e/weather"
    assert target_of_decoded("/x/../weather").path == "/weather"
    assert target_of_decoded("/café").raw_path == b"/caf%C3%A9"
    assert target_of_decoded("/caf\xc3\xa9", encoding="latin-1").path == "/café"
    for path in ("/a\x00b", "/a\\..\\b", "/\ud800", "weather"):
        with pytest.raises(BadTarget):
            target_of_decoded(path)


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
        [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")],
        [(b"content-length", b"5"), (b"content-length", b"5")],
    ],
)
def test_a_body_framed_two_ways_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadTarget) as caught:
        check_framing(headers)
    assert (caught.value.code, caught.value.status) == ("invalid_request_framing", 400)


def test_one_framing_passes() -> None:
    check_framing([(b"content-length", b"5")])
    check_framing([(b"transfer-encoding", b"chunked")])
    check_framing([])


# Targets built from the characters that matter, so that most examples are interesting.
_PIECES = st.sampled_from(
    [
        *(b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%5c", b"%00", b"%41", b"%c3%a9", b"a"),
        *(b";", b"%", b"#", b"\\", b"{", b"~", b"%25", b"//", b"/./", b"/../", b"b"),
    ]
)
targets = st.lists(_PIECES, max_size=14).map(lambda parts: b"/" + b"".join(parts))


@given(targets)
def test_normalizing_is_idempotent_and_leaves_one_reading(raw: bytes) -> None:
    try:
        target = normalize_target(raw)
    except BadTarget:
        return
    assert normalize_target(target.raw_path) == target
    segments = target.raw_path.split(b"/")[1:]
    assert b"." not in segments
    assert b".." not in segments
    assert b"//" not in target.raw_path
    assert b"%2F" not in target.raw_path.upper()
    assert b"%5C" not in target.raw_path.upper()
    # An HTTP client sends these bytes as they are: it has nothing left to resolve or re-encode.
    url = httpx.URL("http://upstream.test:9000").copy_with(raw_path=target.raw_path)
    assert url.raw_path == target.raw_path
    assert url.host == "upstream.test"


def test_the_module_does_no_io() -> None:
    code = (
        "import json, sys\n"
        "import farebox.server.target\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert loaded & {"httpx", "anyio", "asyncio", "starlette", "uvicorn", "sqlite3"} == set()


@given(
    st.lists(st.sampled_from(["a", "Z", "9", "-", ".", "_", "~", "!", "$", "'", ";", "=", "@", ""]))
    .map(lambda parts: "/" + "/".join(parts))
    .map(str.encode),
    st.binary(max_size=12).filter(lambda q: b"#" not in q),
)
def test_the_fast_path_gives_what_the_full_walk_gives(raw: bytes, query: bytes) -> None:
    """Paths (and queries) already in normal form skip the byte-by-byte walk; whatever takes the
    shortcut must come out exactly as the walk would have made it, or be refused the same way."""
    import re

    from farebox.server import target as module

    def outcome() -> object:
        try:
            return normalize_target(raw, query)
        except BadTarget as exc:
            return exc.code

    fast = outcome()
    saved = module._NORMAL_PATH, module._NORMAL_QUERY
    module._NORMAL_PATH = module._NORMAL_QUERY = re.compile(rb"(?!)")  # never matches
    try:
        assert outcome() == fast
    finally:
        module._NORMAL_PATH, module._NORMAL_QUERY = saved
