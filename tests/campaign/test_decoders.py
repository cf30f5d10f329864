"""Bad-input campaign over every decoder of untrusted input: only the documented error escapes.

Extends ``tests/protocol`` (random text, bytes and small JSON), ``tests/receipts/test_peac_properties``
(random JWS segments) and ``tests/test_hostile_nesting`` (deep nesting in a child process) with
*mutated valid documents*: real proofs, challenges, settlements, receipts, JWKS and issuer configs,
each with one field dropped, replaced, retyped, made huge, deep, unicode, NUL-laden or numeric
beyond any limit, then encoded again (sometimes with broken base64). Each property: the decoder
returns its documented type or raises only :class:`PaymentError` / :class:`ReceiptError` (or, for
the RPC client, the RPC errors). Inputs over a size limit fail fast: ``tracemalloc`` shows no copy of
a 10 MB input is made.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farebox.errors import PaymentError, ReceiptError
from farebox.eth import EvmAccount
from farebox.facilitator.remote import RemoteFacilitator, SupportedKinds
from farebox.ledgers.rpc import HttpRpc, RpcError, RpcUnavailable
from farebox.protocol.challenge import read_challenge, render_challenge
from farebox.protocol.models import Challenge, Offer, Proof, Resource, Settlement
from farebox.protocol.plain import decode_plain_body
from farebox.protocol.x402 import (
    b64json_decode,
    decode_challenge_header,
    decode_proof,
    decode_settlement,
    decode_v1_challenge,
    encode_challenge_header,
    offer_from_json,
    offer_to_json,
    proof_from_json,
    proof_to_json,
    requirements_from_json,
    requirements_to_json,
    settlement_from_json,
    settlement_to_json,
    v1_body,
)
from farebox.receipts import (
    IssuerConfig,
    Jwks,
    SigningKey,
    VerifiedReceipt,
    issue_receipt,
    issuer_config_document,
    jwks_document,
    parse_issuer_config,
    parse_jwks,
    payment_claims,
    verify_receipt,
)
from farebox.schemes import evm_exact
from tests.support.campaign import tried

# --- fixtures of valid documents --------------------------------------------------------------------

PAYER = EvmAccount(bytes(range(1, 33)))
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
OFFER = Offer("exact", "eip155:84532", 10_000, USDC, PAY_TO, 300, {"name": "USDC", "version": "2"})
RESOURCE = Resource("https://api.test/weather", "weather", "application/json")
NOW = 1_800_000_000
PROOF_V2 = evm_exact.make_proof(PAYER, OFFER, now=NOW, nonce=b"\x07" * 32, resource=RESOURCE)
PROOF_V1 = evm_exact.make_proof(PAYER, OFFER, now=NOW, nonce=b"\x08" * 32, x402_version=1)
CHALLENGE = Challenge(RESOURCE, (OFFER,), reference="ref-1")
SETTLEMENT = Settlement(True, OFFER.network, "0x" + "ab" * 32, PAYER.address, amount=10_000)

KEY = SigningKey.from_seed(bytes(range(32)), "campaign-key")
ISS = "https://api.test"
RECEIPT = issue_receipt(
    payment_claims(
        iss=ISS,
        iat=NOW,
        jti="01890000-0000-7000-8000-000000000001",
        payment_rail="x402",
        amount_minor=10_000,
        currency="USD",
        reference="0x" + "ab" * 32,
        sub=RESOURCE.url,
    ),
    KEY,
).jws
JWKS_DOC = jwks_document([KEY])
ISSUER_DOC = issuer_config_document(ISS, jwks_uri=ISS + "/.well-known/jwks.json")

_PAYLOAD = RECEIPT.split(".")[1]
DOCS: dict[str, dict[str, Any]] = {
    "claims": json.loads(base64.urlsafe_b64decode(_PAYLOAD + "=" * (-len(_PAYLOAD) % 4))),
    "proof_v2": proof_to_json(PROOF_V2),
    "proof_v1": proof_to_json(PROOF_V1),
    "challenge": json.loads(base64.b64decode(encode_challenge_header(CHALLENGE))),
    "v1_body": v1_body(CHALLENGE) or {},
    "plain_body": json.loads(render_challenge(CHALLENGE).body),
    "settlement": settlement_to_json(SETTLEMENT),
    "offer": offer_to_json(OFFER),
    "requirements_v1": requirements_to_json(OFFER, RESOURCE, x402_version=1),
    "jwks": JWKS_DOC,
    "issuer": ISSUER_DOC,
}

# --- strategies -------------------------------------------------------------------------------------

# Raw JSON texts spliced in where a value was: what json.dumps cannot (or will not) write.
RAW_VALUES = [
    "[" * 2000 + "]" * 2000,  # deeper than orjson's 1024
    "[" * 900 + "]" * 900,  # under orjson's limit, over its encoder's 255
    '{"a":' * 600 + "1" + "}" * 600,
    "1" * 400,  # an integer far beyond uint256 (orjson reads it as a float)
    "1e999",
    "-0",
    "1.0",
    "NaN",
    "Infinity",
    '"\\ud800"',  # a lone surrogate
    '"\\u0000"',
    '"' + "x" * 100_000 + '"',
    '{"a":1,"a":2}',
    "",  # nothing at all: broken JSON
]
SENTINEL = "\x00campaign-raw\x00"

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "0",
            "00",
            "-1",
            "+1",
            "1e3",
            "0x",
            "0x" + "00" * 20,
            "٣",  # an Arabic-Indic digit: str.isdigit() says yes
            "\uff11\uff10",  # fullwidth digits
            str(2**256),
            str(2**256 - 1),
            "eip155:",
            ":",
            "base",
            "\u202e",
            "é" * 3000,
            "x" * 5000,
            SENTINEL,
        ]
    )
)
json_values = st.recursive(
    leaves,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from _paths(value, (*prefix, index))


@st.composite
def mutated(draw: st.DrawFn, name: str) -> tuple[Any, str]:
    """A valid document with 1-3 mutations, as a Python value and as JSON text with raw splices."""
    doc = copy.deepcopy(DOCS[name])
    raw = draw(st.sampled_from(RAW_VALUES))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        last = path[-1]
        action = draw(st.sampled_from(["drop", "replace", "retype", "raw", "add", "dup"]))
        if action == "drop":
            del parent[last]
        elif action == "replace":
            parent[last] = draw(json_values)
        elif action == "retype":
            value = parent[last]
            parent[last] = (
                [value]
                if not isinstance(value, list)
                else {"0": value}
                if draw(st.booleans())
                else str(value)[:50]
            )
        elif action == "raw":
            parent[last] = SENTINEL
        elif action == "add" and isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=10))] = draw(json_values)
        elif action == "dup" and isinstance(parent[last], list):
            parent[last] = parent[last] * draw(st.sampled_from([2, 33, 200]))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    text = text.replace(json.dumps(SENTINEL), raw)
    return doc, text


def b64_variants(text: str) -> st.SearchStrategy[str]:
    """Standard base64 of ``text``, or a broken variant of it."""
    good = base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()
    return st.sampled_from(
        [
            good,
            good.rstrip("="),  # padding dropped
            good + "=",  # padding added
            " \t" + good + "\r\n",  # whitespace around
            good[: len(good) // 2] + "\n" + good[len(good) // 2 :],  # whitespace inside
            good.replace("+", "-").replace("/", "_"),  # base64url alphabet
            good[:-1],  # truncated
            good + "\x00",
            good.replace("A", "é", 1),  # non-ASCII
        ]
    )


def only(allowed: type[Exception] | tuple[type[Exception], ...], call: Callable[[], Any]) -> Any:
    """``call()``'s value, or None when it raised one of ``allowed``; anything else fails the test."""
    try:
        return call()
    except allowed:
        return None


async def outcome(call: Awaitable[Any]) -> Any:
    """What ``call`` returns, or the PaymentError it raises (anything else escapes)."""
    try:
        return await call
    except PaymentError as exc:
        return exc


CAMPAIGN = settings(
    max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# --- farebox.protocol.x402 --------------------------------------------------------------------------

HEADER_DECODERS: dict[str, tuple[Callable[[str], Any], type]] = {
    "decode_proof": (decode_proof, Proof),
    "decode_challenge_header": (decode_challenge_header, Challenge),
    "decode_settlement": (decode_settlement, Settlement),
    "b64json_decode": (b64json_decode, dict),
}
HEADER_DOCS = {
    "decode_proof": ["proof_v2", "proof_v1"],
    "decode_challenge_header": ["challenge"],
    "decode_settlement": ["settlement"],
    "b64json_decode": ["proof_v2", "challenge"],
}


@pytest.mark.parametrize(
    ("decoder", "doc"), [(d, n) for d, names in HEADER_DOCS.items() for n in names]
)
def test_header_decoders_on_mutated_documents(decoder: str, doc: str) -> None:
    decode, kind = HEADER_DECODERS[decoder]

    @CAMPAIGN
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _, text = data.draw(mutated(doc))
        header = data.draw(b64_variants(text))
        tried(decoder)
        result = only(PaymentError, lambda: decode(header))
        assert result is None or isinstance(result, kind)

    run()


PARSED_DECODERS: dict[str, tuple[Callable[[Any], Any], type, list[str]]] = {
    "proof_from_json": (proof_from_json, Proof, ["proof_v2", "proof_v1"]),
    "settlement_from_json": (settlement_from_json, Settlement, ["settlement"]),
    "offer_from_json": (offer_from_json, Offer, ["offer"]),
    "requirements_from_json(v2)": (
        lambda d: requirements_from_json(d, x402_version=2),
        Offer,
        ["offer"],
    ),
    "requirements_from_json(v1)": (
        lambda d: requirements_from_json(d, x402_version=1),
        Offer,
        ["requirements_v1"],
    ),
    "decode_v1_challenge(mapping)": (decode_v1_challenge, Challenge, ["v1_body"]),
    "decode_plain_body": (decode_plain_body, Challenge, ["plain_body"]),
}


@pytest.mark.parametrize(
    ("decoder", "doc"), [(d, n) for d, (_, _, names) in PARSED_DECODERS.items() for n in names]
)
def test_parsed_decoders_on_mutated_documents(decoder: str, doc: str) -> None:
    decode, kind, _ = PARSED_DECODERS[decoder]

    @CAMPAIGN
    @given(st.data())
    def run(data: st.DataObject) -> None:
        value, _ = data.draw(mutated(doc))
        tried(decoder)
        result = only(PaymentError, lambda: decode(value))
        assert result is None or isinstance(result, kind)

    run()


@CAMPAIGN
@given(st.data())
def test_decode_v1_challenge_text_and_bytes(data: st.DataObject) -> None:
    _, text = data.draw(mutated("v1_body"))
    body: str | bytes = text if data.draw(st.booleans()) else text.encode("utf-8", "surrogatepass")
    tried("decode_v1_challenge(bytes|str)")
    result = only(PaymentError, lambda: decode_v1_challenge(body))
    assert result is None or isinstance(result, Challenge)


@settings(max_examples=100)
@given(json_values)
def test_parsed_decoders_on_random_values(value: Any) -> None:
    for name, (decode, kind, _) in PARSED_DECODERS.items():
        if name in ("decode_plain_body", "decode_v1_challenge(mapping)") and not isinstance(
            value, dict
        ):
            continue  # typed Mapping-only (read_challenge hands them only dicts)
        tried(name)
        result = only(PaymentError, lambda decode=decode: decode(value))
        assert result is None or isinstance(result, kind)


def _deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": [value]}
    return value


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(_deep(5000), id="5000-deep"),
        pytest.param("x" * 10_000_000, id="10MB-string"),
        pytest.param(list(range(100_000)), id="100k-list"),
        pytest.param({str(i): i for i in range(100_000)}, id="100k-keys"),
        pytest.param(2**70, id="int-over-64-bits"),
        pytest.param(-1, id="negative"),
        pytest.param(True, id="bool"),
    ],
)
def test_parsed_decoders_on_hostile_python_values(hostile: Any) -> None:
    """Already-parsed entry points (the facilitator hands them JSON it read): each field in turn
    holds the hostile value; Python-built documents may be deeper than any JSON parser allows."""
    for name, (decode, kind, docs) in PARSED_DECODERS.items():
        for doc in docs:
            for path in list(_paths(DOCS[doc]))[1:]:
                value = copy.deepcopy(DOCS[doc])
                parent = value
                for step in path[:-1]:
                    parent = parent[step]
                parent[path[-1]] = hostile
                tried(name)
                result = only(PaymentError, lambda decode=decode, value=value: decode(value))
                assert result is None or isinstance(result, kind)


# --- farebox.protocol.challenge / plain ---------------------------------------------------------------


@CAMPAIGN
@given(st.data())
def test_read_challenge_on_mutated_402s(data: st.DataObject) -> None:
    _, header_text = data.draw(mutated("challenge"))
    _, body_text = data.draw(mutated(data.draw(st.sampled_from(["plain_body", "v1_body"]))))
    headers: dict[str, str] = {}
    if data.draw(st.booleans()):
        name = data.draw(
            st.sampled_from(["PAYMENT-REQUIRED", "payment-required", "Payment-Required"])
        )
        headers[name] = data.draw(b64_variants(header_text))
    body = body_text.encode("utf-8", "surrogatepass")
    tried("read_challenge")
    result = only(PaymentError, lambda: read_challenge(headers, body))
    assert result is None or isinstance(result, Challenge)


# --- farebox.schemes.evm_exact ------------------------------------------------------------------------


@CAMPAIGN
@given(st.data())
def test_evm_exact_verify_on_mutated_proofs(data: st.DataObject) -> None:
    doc = data.draw(st.sampled_from(["proof_v2", "proof_v1"]))
    value, _ = data.draw(mutated(doc))
    proof = only(PaymentError, lambda: proof_from_json(value))
    if proof is None:
        # Mutated past reading: verify the real envelope with a random payload instead.
        payload = data.draw(st.dictionaries(st.text(max_size=15), json_values, max_size=4))
        proof = Proof(2, "exact", OFFER.network, payload, accepted=OFFER)
    tried("evm_exact.verify")
    result = only(PaymentError, lambda: evm_exact.verify(proof, OFFER, now=NOW))
    assert result is None or isinstance(result, evm_exact.VerifiedEvmProof)


AUTH_FIELDS = ["from", "to", "value", "validAfter", "validBefore", "nonce"]


@CAMPAIGN
@given(
    st.sampled_from([*AUTH_FIELDS, "signature"]),
    st.one_of(
        json_values,
        st.sampled_from(
            [
                "0x" + "00" * 65,
                "0x" + "ff" * 65,
                "0x" + "1b" * 65,
                "0x" + "ab" * 2047,
                "0x" + "ab" * 100_000,
                "0X" + "ab" * 32,
                "0x" + "g" * 64,
                "0x" + " 1" * 32,
                "0x" + "ab" * 31 + "a",
            ]
        ),
    ),
)
def test_evm_exact_verify_on_one_bad_field(field: str, value: Any) -> None:
    payload = copy.deepcopy(dict(PROOF_V2.payload))
    if field == "signature":
        payload["signature"] = value
    else:
        payload["authorization"][field] = value
    proof = Proof(2, "exact", OFFER.network, payload, accepted=OFFER)
    tried("evm_exact.verify")
    result = only(PaymentError, lambda: evm_exact.verify(proof, OFFER, now=NOW))
    assert result is None or isinstance(result, evm_exact.VerifiedEvmProof)


def test_evm_exact_verify_refuses_every_resigned_high_s_and_bad_v() -> None:
    """Signature bytes flipped one by one: never accepted, never anything but PaymentError."""
    signature = bytes.fromhex(PROOF_V2.payload["signature"][2:])
    accepted = 0
    for index in range(65):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(signature)
            bad[index] ^= flip
            payload = {**PROOF_V2.payload, "signature": "0x" + bad.hex()}
            proof = Proof(2, "exact", OFFER.network, payload, accepted=OFFER)
            tried("evm_exact.verify")
            if only(PaymentError, lambda proof=proof: evm_exact.verify(proof, OFFER, now=NOW)):
                accepted += 1
    assert accepted == 0


# --- farebox.receipts ---------------------------------------------------------------------------------


@st.composite
def mangled_receipts(draw: st.DrawFn) -> str:
    header, payload, signature = RECEIPT.split(".")
    how = draw(st.sampled_from(["segment", "char", "truncate", "parts", "swap", "json"]))
    if how == "segment":
        part = draw(st.integers(0, 2))
        parts = [header, payload, signature]
        parts[part] = draw(st.text(alphabet="ABCDEFGHabcdefgh0123456789-_=+/. \x00é", max_size=80))
        return ".".join(parts)
    if how == "char":
        index = draw(st.integers(0, len(RECEIPT) - 1))
        return RECEIPT[:index] + draw(st.characters()) + RECEIPT[index + 1 :]
    if how == "truncate":
        return RECEIPT[: draw(st.integers(0, len(RECEIPT) - 1))]
    if how == "parts":
        return ".".join([header, payload, signature][: draw(st.integers(0, 2))] + ["x"] * 2)
    if how == "swap":
        return f"{payload}.{header}.{signature}"
    # A payload that is a mutated claims document (signature then cannot match).
    _, text = draw(mutated("claims"))
    encoded = base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode().rstrip("=")
    return f"{header}.{encoded}.{signature}"


@CAMPAIGN
@given(mangled_receipts(), st.sampled_from(["bytes", "jwks", "none"]))
def test_verify_receipt_on_mangled_receipts(jws: str, key_kind: str) -> None:
    key = {"bytes": KEY.public_key, "jwks": parse_jwks(json.dumps(JWKS_DOC)), "none": None}[
        key_kind
    ]
    tried("verify_receipt")
    result = only(ReceiptError, lambda: verify_receipt(jws, key, now=NOW, issuer=ISS))
    assert result is None or isinstance(result, VerifiedReceipt)


@pytest.mark.parametrize(
    ("doc", "parse", "kind"),
    [("jwks", parse_jwks, Jwks), ("issuer", parse_issuer_config, IssuerConfig)],
)
def test_key_documents_on_mutated_documents(
    doc: str, parse: Callable[[Any], Any], kind: type
) -> None:
    @CAMPAIGN
    @given(st.data())
    def run(data: st.DataObject) -> None:
        _, text = data.draw(mutated(doc))
        as_bytes = data.draw(st.booleans())
        document: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
        tried(parse.__name__)
        result = only(ReceiptError, lambda: parse(document))
        assert result is None or isinstance(result, kind)

    run()


@settings(max_examples=100)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_key_documents_on_random_input(data: bytes | str) -> None:
    for parse in (parse_jwks, parse_issuer_config):
        tried(parse.__name__)
        only(ReceiptError, lambda parse=parse: parse(data))


# --- farebox.ledgers.rpc: a node answering garbage -----------------------------------------------------

NODE_BODIES = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"jsonrpc": st.just("2.0"), "id": json_values},
        optional={"result": json_values, "error": json_values},
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "error": st.fixed_dictionaries(
                {}, optional={"code": json_values, "message": json_values, "data": json_values}
            )
        }
    ).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"result":' + b"1" * 400 + b"}", b"\xff\xfe"]),
)


@CAMPAIGN
@given(NODE_BODIES, st.sampled_from([200, 400, 500, 502]))
def test_http_rpc_reads_any_answer_as_result_or_rpc_error(body: bytes, status: int) -> None:
    async def main() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            rpc = HttpRpc("http://node.test", client=client)
            tried("HttpRpc.request")
            # Whatever the node says: a result, or one of the two RPC errors.
            with contextlib.suppress(RpcError, RpcUnavailable):
                await rpc.request("eth_chainId")

    anyio.run(main)


# --- farebox.facilitator.remote: a facilitator answering garbage --------------------------------------

VERIFIED = evm_exact.verify(
    evm_exact.make_proof(PAYER, OFFER, now=NOW, nonce=b"\x09" * 32, resource=RESOURCE),
    OFFER,
    now=NOW,
)
FACILITATOR_BODIES = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.just(b""),
    st.sampled_from(["settlement"])
    .flatmap(mutated)
    .map(lambda m: m[1].encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries(
        {"isValid": st.booleans()},
        optional={
            "invalidReason": json_values,
            "invalidMessage": json_values,
            "payer": json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "kinds": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "x402Version": json_values,
                        "scheme": json_values,
                        "network": json_values,
                    },
                )
                | json_values,
                max_size=3,
            )
        },
        optional={"extensions": json_values, "signers": json_values},
    ).map(lambda v: json.dumps(v).encode()),
    st.just(b" " * 70_000),  # over max_response
)


@CAMPAIGN
@given(FACILITATOR_BODIES, st.sampled_from([200, 201, 302, 400, 402, 404, 429, 500, 503]))
def test_remote_facilitator_reads_any_answer_safely(body: bytes, status: int) -> None:
    async def main() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            remote = RemoteFacilitator("http://facilitator.test", client=client)
            tried("RemoteFacilitator.verify/settle/supported")
            with contextlib.suppress(PaymentError):
                await remote.verify(VERIFIED)
            settled = await outcome(remote.settle(VERIFIED))
            if isinstance(settled, PaymentError):
                assert settled.code == "facilitator_unavailable"
            else:
                assert isinstance(settled, Settlement)
                # Only a readable 2xx success counts as settled.
                if settled.success:
                    assert 200 <= status < 300
                    assert settlement_from_json(json.loads(body)).success
            found = await outcome(remote.supported())
            if not isinstance(found, PaymentError):
                assert isinstance(found, SupportedKinds)
                assert status == 200

    anyio.run(main)


# --- size limits fail fast ---------------------------------------------------------------------------

TEN_MB = 10 * 1024 * 1024
BIG_TEXT = "A" * TEN_MB
BIG_BYTES = b"[" * TEN_MB
BIG_SIGNATURE_PROOF = Proof(
    2, "exact", OFFER.network, {**PROOF_V2.payload, "signature": "0x" + BIG_TEXT}, accepted=OFFER
)

BIG_INPUTS: dict[str, tuple[Callable[[], Any], type[Exception]]] = {
    "b64json_decode": (lambda: b64json_decode(BIG_TEXT), PaymentError),
    "decode_proof": (lambda: decode_proof(BIG_TEXT), PaymentError),
    "decode_challenge_header": (lambda: decode_challenge_header(BIG_TEXT), PaymentError),
    "decode_settlement": (lambda: decode_settlement(BIG_TEXT), PaymentError),
    "decode_v1_challenge(bytes)": (lambda: decode_v1_challenge(BIG_BYTES), PaymentError),
    "decode_v1_challenge(str)": (lambda: decode_v1_challenge(BIG_TEXT), PaymentError),
    "read_challenge(body)": (lambda: read_challenge({}, BIG_BYTES), PaymentError),
    "read_challenge(header)": (
        lambda: read_challenge({"PAYMENT-REQUIRED": BIG_TEXT}, b""),
        PaymentError,
    ),
    "evm_exact.verify(signature)": (
        lambda: evm_exact.verify(BIG_SIGNATURE_PROOF, OFFER, now=NOW),
        PaymentError,
    ),
    "verify_receipt": (lambda: verify_receipt(BIG_TEXT, KEY.public_key, now=NOW), ReceiptError),
    "parse_jwks(bytes)": (lambda: parse_jwks(BIG_BYTES), ReceiptError),
    "parse_issuer_config(bytes)": (lambda: parse_issuer_config(BIG_BYTES), ReceiptError),
}


@pytest.mark.parametrize("target", sorted(BIG_INPUTS))
def test_ten_megabytes_fail_fast_without_a_copy(target: str) -> None:
    call, error = BIG_INPUTS[target]
    tracemalloc.start()
    try:
        with pytest.raises(error):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tried(f"10MB:{target}")
    # No copy of the input (nor a decoded or parsed version of it) is ever made.
    assert peak < TEN_MB // 10, f"{target} allocated {peak:,} bytes for a {TEN_MB:,}-byte input"


@pytest.mark.parametrize("parse", [parse_jwks, parse_issuer_config])
def test_ten_megabyte_key_documents_as_text_fail_fast(parse: Callable[[Any], Any]) -> None:
    """Text documents are measured before they are encoded (no 10 MB UTF-8 copy first)."""
    tracemalloc.start()
    try:
        with pytest.raises(ReceiptError):
            parse(BIG_TEXT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tried(f"10MB:{parse.__name__}(str)")
    assert peak < TEN_MB // 10, f"{parse.__name__} allocated {peak:,} bytes for a 10 MB text"


def test_oversized_node_and_facilitator_answers_are_cut_at_their_limit() -> None:
    """10 MB answers, streamed: reading stops at the limit (4 MiB for a node, 64 KiB for a
    facilitator), so memory stays far below the answer's size."""

    async def stream() -> AsyncIterator[bytes]:
        chunk = b" " * 65536
        for _ in range(TEN_MB // len(chunk)):
            yield chunk

    async def main() -> tuple[int, int]:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=stream()))
        async with httpx.AsyncClient(transport=transport) as client:
            rpc = HttpRpc("http://node.test", client=client)
            tracemalloc.start()
            with pytest.raises(RpcUnavailable):
                await rpc.request("eth_chainId")
            rpc_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            remote = RemoteFacilitator("http://facilitator.test", client=client)
            tracemalloc.start()
            with pytest.raises(PaymentError):
                await remote.verify(VERIFIED)
            remote_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return rpc_peak, remote_peak

    rpc_peak, remote_peak = anyio.run(main)
    tried("10MB:HttpRpc.request")
    tried("10MB:RemoteFacilitator.verify")
    assert rpc_peak < 2 * 4 * 1024 * 1024 + 1024 * 1024
    assert remote_peak < 2 * 1024 * 1024


def test_a_10mb_header_never_reaches_base64(monkeypatch: pytest.MonkeyPatch) -> None:
    """The size check comes before any decoding work."""
    import binascii

    calls: list[int] = []
    real = binascii.a2b_base64

    def spy(data: Any, **kw: Any) -> bytes:
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(binascii, "a2b_base64", spy)
    with pytest.raises(PaymentError) as refused:
        decode_proof(BIG_TEXT)
    assert refused.value.code == "payload_too_large"
    assert calls == []


@pytest.mark.parametrize("where", ["proof_from_json", "requirements_from_json"])
def test_a_version_with_5000_digits_is_a_payment_error(where: str) -> None:
    huge = 10**5000
    calls = {
        "proof_from_json": lambda: proof_from_json({**DOCS["proof_v2"], "x402Version": huge}),
        "requirements_from_json": lambda: requirements_from_json(DOCS["offer"], x402_version=huge),
    }
    with pytest.raises(PaymentError):
        calls[where]()
