"""The paid reverse proxy attacked over a socket: raw request lines, no client that tidies them first.

uvicorn serves ``farebox serve``'s app (the gate in front of the proxy, settling on the embedded
chain) in a thread, in front of a real upstream (uvicorn too) that records every request exactly as
it arrived, and beside a bare TCP listener that stands for "any other host": it must never be
reached. Each test writes bytes, reads the answer back, and looks at what the upstream received.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn

from farebox._asgi import run_lifespan
from farebox.config import FareboxApp, build_app, parse_config
from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount
from farebox.protocol.challenge import read_challenge
from farebox.protocol.x402 import encode_proof
from farebox.schemes.evm_exact import make_proof
from tests.support.chain import fund
from tests.support.gates import PRICE

PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


# --- the parts: a recording upstream, a stranger that must hear nothing, the proxy ---------------


@dataclass
class Recorder:
    """An ASGI upstream that keeps the request as uvicorn parsed it off the wire."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "method": scope["method"],
                "target": scope["raw_path"]
                + (b"?" + scope["query_string"] if scope["query_string"] else b""),
                "headers": [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                ],
                "body": body,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"from upstream"})


class Stranger:
    """A bare TCP listener: any connection at all means the proxy was sent elsewhere."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.received.append(conn.recv(65536) or b"<connected>")
                except OSError:
                    self.received.append(b"<connected>")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextmanager
def serve(app: Any) -> Iterator[int]:
    """Run ``app`` under uvicorn (h11, as ``farebox serve`` does) in a thread; yield its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", lifespan="on", http="h11")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@dataclass
class Stand:
    port: int
    recorder: Recorder
    stranger: Stranger
    app: FareboxApp
    chain: DevChain

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def stand(chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stand]:
    recorder = Recorder()
    stack = ExitStack()
    stranger = Stranger()
    stack.callback(stranger.close)
    upstream_port = stack.enter_context(serve(recorder))
    routes = [
        {"method": method, "path": path, "price": "$0.01"}
        for method, path in (("GET", "/weather"), ("POST", "/items"), ("GET", "/reports/{id}"))
    ]
    config = parse_config(
        {
            "server": {"store": "memory", "upstream": f"http://127.0.0.1:{upstream_port}"},
            "payment": {"network": "devchain", "pay_to": PAY_TO},
            "settlement": {"ledger": "embedded"},
            "routes": routes,
        },
        base_dir=tmp_path_factory.mktemp("proxy"),
        env={},
    )
    app = build_app(config, chain=chain)
    with stack:
        yield Stand(stack.enter_context(serve(app)), recorder, stranger, app, chain)


# --- a raw HTTP/1.1 exchange -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, head: bytes, body: bytes = b"") -> Answer:
    """Send ``head`` (request line and headers, without the blank line) and ``body`` as they are;
    read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + b"\r\nconnection: close\r\n\r\n" + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        rest = decoded
    # Whatever went in, the server answers on purpose: never a 500.
    assert status < 500, (status, rest[:300])
    return Answer(status, headers, rest)


def get(stand: Stand, target: bytes, *headers: bytes, method: bytes = b"GET") -> Answer:
    lines = [method + b" " + target + b" HTTP/1.1", b"host: " + stand.host.encode(), *headers]
    return exchange(stand.port, b"\r\n".join(lines))


def pay(stand: Stand, payer: EvmAccount, target: bytes, *headers: bytes) -> Answer:
    """The 402 for ``target``, then the same request line again with a signed proof for it."""
    challenge = get(stand, target, *headers)
    assert challenge.status == 402, challenge
    offer = read_challenge(challenge.headers, challenge.body)
    proof = make_proof(
        payer,
        offer.accepts[0],
        now=int(time.time()),
        nonce=os.urandom(32),
        resource=offer.resource,
    )
    signature = b"payment-signature: " + encode_proof(proof).encode()
    return get(stand, target, *headers, signature)


def last_seen(stand: Stand, count: int) -> list[dict[str, Any]]:
    return stand.recorder.seen[count:]


# --- dot segments and other spellings of a paid path -------------------------------------------

DOT_TRICKS = [
    (b"/x/../weather", b"/weather"),
    (b"/./weather", b"/weather"),
    (b"/weather/.", b"/weather/"),
    (b"/a/b/../../weather", b"/weather"),
    (b"/weather/../weather", b"/weather"),
    (b"/../weather", b"/weather"),
    (b"/%2e/weather", b"/weather"),
    (b"/x/%2E%2e/weather", b"/weather"),
    (b"/x/.%2e/weather", b"/weather"),
    (b"//weather", b"/weather"),
    (b"/x//..//weather", b"/weather"),
    (b"/weath%65r", b"/weather"),
    (b"/weather/", b"/weather/"),
    (b"/reports/%37/../9", b"/reports/9"),
    # Spellings that case-insensitive or servlet upstreams serve as /weather: charged too.
    (b"/WEATHER", b"/WEATHER"),
    (b"/Weather/", b"/Weather/"),
    (b"/weather;jsessionid=1", b"/weather;jsessionid=1"),
    (b"/x/../WEATHER;v=2", b"/WEATHER;v=2"),
]


@pytest.mark.parametrize(("target", "normalized"), DOT_TRICKS)
def test_a_dot_segment_trick_is_charged_and_the_upstream_gets_the_normalized_path(
    stand: Stand, target: bytes, normalized: bytes
) -> None:
    payer = fund(stand.chain)
    count = len(stand.recorder.seen)
    unpaid = get(stand, target)
    assert unpaid.status == 402, (target, unpaid)
    assert last_seen(stand, count) == []  # nothing reached the upstream unpaid
    paid = pay(stand, payer, target)
    assert paid.status == 200, paid
    assert paid.body == b"from upstream"
    assert [seen["target"] for seen in last_seen(stand, count)] == [normalized]
    assert stand.chain.balance_of(payer.address) == 1_000_000 - PRICE


REFUSED_TARGETS = [
    b"/weather#f",  # a fragment is never part of a request target (RFC 9112 section 3.2)
    b"/weather?a=1#f",
    b"/weather%2F",  # an encoded slash: one upstream splits on it, another does not
    b"/x%2f..%2fweather",
    b"/x%5C..%5Cweather",  # an encoded backslash, a separator to some servers
    b"/x\\..\\weather",  # a raw backslash
    b"/weather%00.json",  # NUL: C code stops reading there
    b"/weather%0d%0aX-Injected:%201",
    b"/weather%7f",
    b"/..;/weather",  # a dot segment with a path parameter (servlet containers drop ";...")
    b"/x/.%2e;x/weather",
    b"/weath%zzer",  # not a percent-encoding
    b"/weather%e2%28%a1",  # not UTF-8
    b"*",
]


@pytest.mark.parametrize("target", REFUSED_TARGETS)
def test_a_target_that_cannot_be_normalized_safely_is_a_400(stand: Stand, target: bytes) -> None:
    count = len(stand.recorder.seen)
    answer = get(stand, target)
    assert answer.status == 400, (target, answer)
    assert answer.headers["content-type"] == "application/problem+json"
    assert b'"code":"invalid_request_target"' in answer.body
    assert last_seen(stand, count) == []


@pytest.mark.parametrize(
    "target", [b"/" + b"a" * 9000, b"/free?" + b"q" * 9000, b"/weather/" + b"%2e%2e/" * 1400]
)
def test_an_overlong_target_is_a_414(stand: Stand, target: bytes) -> None:
    count = len(stand.recorder.seen)
    answer = get(stand, target)
    assert answer.status == 414, answer
    assert last_seen(stand, count) == []


def test_a_raw_control_character_never_reaches_anything(stand: Stand) -> None:
    count = len(stand.recorder.seen)
    for target in (b"/weather\x00", b"/weather\x01x", b"/we\x7father", b"/caf\xc3\xa9"):
        assert get(stand, target).status == 400
    assert last_seen(stand, count) == []


def test_free_paths_keep_their_spelling_and_query(stand: Stand) -> None:
    count = len(stand.recorder.seen)
    for target in (
        b"/free/a;b=1,c@d:e!$&'()*+",
        b"/free?x=%2e%2e/..&y=%ZZ",
        b"/free/%C3%A9t%c3%a9",
    ):
        assert get(stand, target).status == 200
    targets = [seen["target"] for seen in last_seen(stand, count)]
    assert targets == [
        b"/free/a;b=1,c@d:e!$&'()*+",
        b"/free?x=%2e%2e/..&y=%ZZ",  # the query is the upstream's business, passed as sent
        b"/free/%C3%A9t%C3%A9",
    ]


# --- not an open proxy ---------------------------------------------------------------------------


def test_a_target_that_is_not_origin_form_is_a_400_and_no_other_host_hears_of_it(
    stand: Stand,
) -> None:
    count = len(stand.recorder.seen)
    other = f"127.0.0.1:{stand.stranger.port}".encode()
    for target in (
        b"@" + other + b"/",
        b"@" + other + b"/weather",
        b".evil.example/",
        b"evil.example/weather",
        other,  # authority-form
        b":" + str(stand.stranger.port).encode() + b"/",
        b"http://" + other + b"/weather",  # absolute-form naming another host
        b"http://" + other + b"/free",
        b"http://user@" + stand.host.encode() + b"/free",
        b"ftp://" + stand.host.encode() + b"/free",
    ):
        answer = get(stand, target)
        assert answer.status == 400, (target, answer)
    connect = get(stand, other, method=b"CONNECT")
    assert connect.status == 400
    time.sleep(0.3)  # the stranger polls its socket every 0.2 s
    assert stand.stranger.received == []
    assert last_seen(stand, count) == []


def test_absolute_form_naming_this_server_is_the_origin_form_request(stand: Stand) -> None:
    payer = fund(stand.chain)
    count = len(stand.recorder.seen)
    own = b"http://" + stand.host.encode()
    assert get(stand, own + b"/free?q=1").status == 200
    assert get(stand, own.upper() + b"/x/../weather").status == 402
    paid = pay(stand, payer, own + b"/x/../weather")
    assert paid.status == 200
    assert [seen["target"] for seen in last_seen(stand, count)] == [b"/free?q=1", b"/weather"]
    assert stand.chain.balance_of(payer.address) == 1_000_000 - PRICE


# --- framing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [b"/free", b"/items"])
def test_content_length_with_chunked_is_a_400(stand: Stand, path: bytes) -> None:
    count = len(stand.recorder.seen)
    head = b"\r\n".join(
        [
            b"POST " + path + b" HTTP/1.1",
            b"host: " + stand.host.encode(),
            b"content-length: 5",
            b"transfer-encoding: chunked",
        ]
    )
    answer = exchange(stand.port, head, b"5\r\nhello\r\n0\r\n\r\n")
    assert answer.status == 400
    assert b'"code":"invalid_request_framing"' in answer.body
    assert last_seen(stand, count) == []


def test_a_chunked_body_is_forwarded_whole(stand: Stand) -> None:
    count = len(stand.recorder.seen)
    head = (
        b"POST /free HTTP/1.1\r\nhost: " + stand.host.encode() + b"\r\ntransfer-encoding: chunked"
    )
    answer = exchange(stand.port, head, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert answer.status == 200
    [seen] = last_seen(stand, count)
    assert seen["body"] == b"hello world"


# --- credentials --------------------------------------------------------------------------------

CREDENTIALS = [
    b"payment-signature: eyJ4NDAyVmVyc2lvbiI6Mn0",
    b"X-Payment: eyJ4NDAyVmVyc2lvbiI6MX0",
    b"Authorization: Payment eyJjaGFsbGVuZ2UiOnt9fQ",
    b"Payment-Authorization: Payment eyJjaGFsbGVuZ2UiOnt9fQ",
    b"X-Receipt: pi_3QabcdefGHIJKLMN_secret_abcdefghijklmnop",
]
PAYMENT_HEADERS = {"payment-signature", "x-payment", "payment-authorization", "x-receipt"}


def test_no_payment_credential_of_any_rail_reaches_the_upstream(stand: Stand) -> None:
    count = len(stand.recorder.seen)
    assert get(stand, b"/free", *CREDENTIALS).status == 200
    assert get(stand, b"/free", b"authorization: PAYMENT eyJ9", b"x-kept: 1").status == 200
    first, second = last_seen(stand, count)
    for seen in (first, second):
        names = {name for name, _ in seen["headers"]}
        assert not names & PAYMENT_HEADERS, names
        assert "authorization" not in names
    assert ("x-kept", "1") in second["headers"]


def test_the_upstreams_own_bearer_token_passes_beside_a_payment(stand: Stand) -> None:
    payer = fund(stand.chain)
    count = len(stand.recorder.seen)
    bearer = b"Authorization: Bearer upstream-token"
    paid = pay(stand, payer, b"/weather", bearer, b"x-receipt: pi_x")
    assert paid.status == 200
    [seen] = last_seen(stand, count)
    assert ("authorization", "Bearer upstream-token") in seen["headers"]
    assert not {name for name, _ in seen["headers"]} & PAYMENT_HEADERS


# --- methods --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        (b"POST", b"/weather", "GET, HEAD"),
        (b"PUT", b"/x/../weather", "GET, HEAD"),
        (b"DELETE", b"/weather/", "GET, HEAD"),
        (b"OPTIONS", b"/weather", "GET, HEAD"),
        (b"PATCH", b"/reports/7", "GET, HEAD"),
        (b"GET", b"/items", "POST"),
        (b"BREW", b"/weather", "GET, HEAD"),
    ],
)
def test_a_method_no_route_prices_on_a_priced_path_is_a_405(
    stand: Stand, method: bytes, target: bytes, allow: str
) -> None:
    count = len(stand.recorder.seen)
    answer = get(stand, target, b"content-length: 0", method=method)
    assert answer.status == 405, answer
    assert answer.headers["allow"] == allow
    assert b'"code":"method_not_allowed"' in answer.body
    assert last_seen(stand, count) == []


def test_priced_methods_are_charged_and_free_paths_take_any_method(stand: Stand) -> None:
    count = len(stand.recorder.seen)
    assert get(stand, b"/items", b"content-length: 0", method=b"POST").status == 402
    assert get(stand, b"/weather", method=b"HEAD").status == 402
    assert get(stand, b"/free", b"content-length: 0", method=b"DELETE").status == 200
    assert [seen["method"] for seen in last_seen(stand, count)] == ["DELETE"]


def test_the_banner_states_the_method_rule(stand: Stand) -> None:
    from farebox.cli.serve import serve_banner

    banner = serve_banner(stand.app, "http://127.0.0.1:8402")
    assert "other methods on these paths are 405" in banner


# --- the in-process faces read the same path as their gate ---------------------------------------


@dataclass
class Paths:
    """What an app behind a face routed on, one entry per request it ran."""

    seen: list[tuple[str, str]] = field(default_factory=list)


def asgi_app(paths: Paths) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        paths.seen.append((scope["path"], scope["raw_path"].decode("latin-1")))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})

    return app


def flask_app(paths: Paths) -> Any:
    from flask import Flask, request

    app = Flask(__name__)

    @app.route("/", defaults={"rest": ""}, methods=["GET", "POST"])
    @app.route("/<path:rest>", methods=["GET", "POST"])
    def anything(rest: str) -> str:
        paths.seen.append((request.path, request.environ["PATH_INFO"]))
        return "served"

    return app.wsgi_app


@contextmanager
def serve_wsgi(app: Any) -> Iterator[int]:
    """A real WSGI server (the standard library's) in a thread."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, handler_class=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture(scope="module", params=["asgi", "wsgi"])
def face(request: pytest.FixtureRequest, chain: DevChain) -> Iterator[tuple[str, int, Paths]]:
    from farebox.server.asgi import PaymentMiddleware
    from farebox.server.wsgi import WsgiPaymentMiddleware
    from tests.support.gates import make_gate

    paths = Paths()
    gate = make_gate(chain).gate
    if request.param == "asgi":
        with serve(PaymentMiddleware(asgi_app(paths), gate)) as port:
            yield "asgi", port, paths
    else:
        middleware = WsgiPaymentMiddleware(flask_app(paths), gate)
        try:
            with serve_wsgi(middleware) as port:
                yield "wsgi", port, paths
        finally:
            middleware.close()


def face_get(port: int, target: bytes) -> Answer:
    return exchange(port, b"GET " + target + b" HTTP/1.1\r\nhost: 127.0.0.1:" + str(port).encode())


@pytest.mark.parametrize("target", [b"/x/../weather", b"/%2e/weather", b"/weather/.", b"//weather"])
def test_an_in_process_face_charges_every_spelling(
    face: tuple[str, int, Paths], target: bytes
) -> None:
    _, port, paths = face
    count = len(paths.seen)
    answer = face_get(port, target)
    assert answer.status == 402, answer
    assert paths.seen[count:] == []


def test_an_in_process_app_routes_on_the_path_its_gate_matched(
    face: tuple[str, int, Paths],
) -> None:
    kind, port, paths = face
    count = len(paths.seen)
    assert face_get(port, b"/free/./a/%2e%2e/b//c").status == 200
    assert face_get(port, b"/free/caf%C3%A9").status == 200
    # ASGI: (path, raw_path); WSGI: (Flask's request.path, PATH_INFO as PEP 3333 spells it).
    wire = "/free/caf%C3%A9" if kind == "asgi" else "/free/caf\xc3\xa9"
    assert paths.seen[count:] == [("/free/b/c", "/free/b/c"), ("/free/café", wire)]
    for refused in (b"/free/a%00", b"/free/%5C", b"/free/a\\b"):
        assert face_get(port, refused).status == 400
    assert len(paths.seen) == count + 2
    # An encoded slash: ASGI keeps raw_path, so it is refused; a WSGI server hands over PATH_INFO
    # already decoded, and the gate and the app both read that one decoded path.
    encoded_slash = face_get(port, b"/free%2Fx")
    if kind == "asgi":
        assert encoded_slash.status == 400
    else:
        assert encoded_slash.status == 200
        assert paths.seen[-1] == ("/free/x", "/free/x")
