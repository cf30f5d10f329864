"""Schemathesis over the facilitator service's own OpenAPI document (served at ``/openapi.json``).

Positive and negative cases for every operation; the checks: never a 5xx, every status code and
content type documented, every response body conforming to its schema. The service runs in-process
on the embedded chain, as ``tests/facilitator/test_service.py`` builds it.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from farebox.dev.devchain import DevChain
from farebox.facilitator.local import LocalFacilitator
from farebox.facilitator.service import facilitator_app, openapi_document
from farebox.ledgers.evm import EvmLedger
from farebox.store.memory import MemoryStore
from tests.support.campaign import tried

TOKEN = "s3cret"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def service(chain: DevChain, **options: Any) -> Any:
    ledger = EvmLedger(chain.rpc, chain.accounts[1].account, network=chain.network)
    return facilitator_app(LocalFacilitator([ledger]), MemoryStore(), **options)


@pytest.fixture(scope="module")
def open_service(chain: DevChain) -> Any:
    return service(chain)


@pytest.fixture(scope="module")
def token_service(chain: DevChain) -> Any:
    return service(chain, token=TOKEN)


# The documents as the service serves them (checked below), loaded at collection time:
# ``schemathesis.pytest.from_fixture`` fails under pytest 9 (it reads ``request.node._nodeid``).
def _schema(document: dict[str, Any]) -> Any:
    schema = schemathesis.openapi.from_dict(document)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


open_schema = _schema(openapi_document())
token_schema = _schema(openapi_document(bearer=True))


def test_the_served_documents_are_the_ones_tested(open_service: Any, token_service: Any) -> None:
    async def fetch(app: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://f.test") as client:
            return await client.get("/openapi.json")

    for app, bearer in ((open_service, False), (token_service, True)):
        served = anyio.run(fetch, app)
        assert served.status_code == 200
        assert served.json() == openapi_document(bearer=bearer)


@open_schema.parametrize()
@settings(max_examples=40, suppress_health_check=list(HealthCheck), deadline=None)
def test_facilitator_conforms_to_its_openapi_document(case: Any, open_service: Any) -> None:
    tried(f"schemathesis:{case.operation.label}")
    case.call_and_validate(app=open_service, checks=CHECKS)


@token_schema.parametrize()
@settings(max_examples=15, suppress_health_check=list(HealthCheck), deadline=None)
def test_facilitator_with_a_token_conforms_to_its_openapi_document(
    case: Any, token_service: Any
) -> None:
    tried(f"schemathesis(token):{case.operation.label}")
    case.call_and_validate(app=token_service, checks=CHECKS)
