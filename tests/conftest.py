"""Test-wide settings and the fixtures tests in several directories share.

Helpers that are not fixtures are in ``tests/support/``. The heavy libraries (py-evm, Stripe's,
psycopg, redis, uvicorn) are imported inside the fixtures, so that a run of tests needing none of
them does not load them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from farebox.dev.devchain import DevChain
    from tests.support.card_seller import Seller
    from tests.support.fake_stripe import FakeStripe

# Speed is measured in bench/, not here: on a loaded 2-core CI machine a deadline only adds flakes.
settings.register_profile("farebox", deadline=None)
settings.load_profile("farebox")


# --- the embedded chain -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def chain() -> DevChain:
    """One embedded chain per test process (so one per xdist worker), shared by every test.

    Tests keep out of each other's way on it: each pays from a payer of its own
    (``tests.support.chain.fund``) to a merchant of its own. A module that moves the chain's clock,
    rewinds it or rewrites state others read builds a private chain instead, and says why.
    """
    from farebox.dev.devchain import DevChain
    from farebox.money import ASSETS

    chain = DevChain()
    ASSETS.register(chain.asset)
    return chain


# --- node and the reference TypeScript packages -----------------------------------------------


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with ``tests/interop/js/node_modules`` installed from the lock file."""
    from tests.support.node import node_with_packages

    return node_with_packages()


# --- the shared stores' services ----------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A DSN on this worker's own migrated schema (``tests/facilitator`` overrides it with its own)."""
    from tests.support.stores import migrated_schema, worker_id

    with migrated_schema(f"farebox_test_{worker_id()}") as dsn:
        yield dsn


@pytest.fixture
def empty_postgres(postgres_dsn: str) -> str:
    """:func:`postgres_dsn`, with its tables emptied (faster than migrating for each test)."""
    from tests.support.stores import empty_tables

    return empty_tables(postgres_dsn)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    from tests.support.stores import redis_key_prefix

    with redis_key_prefix() as prefix:
        yield prefix


# --- card payments ------------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    """The Stripe FAKE (``tests/support/fake_stripe.py``) on a port of its own, for one test."""
    from tests.support.fake_stripe import running_fake_stripe

    with running_fake_stripe() as server:
        yield server


@pytest.fixture
def seller(chain: DevChain, fake: FakeStripe) -> Iterator[Seller]:
    """A seller taking x402 and cards (``tests.support.card_seller``), served on 127.0.0.1."""
    from tests.support.card_seller import serve_seller

    with serve_seller(chain, fake) as served:
        yield served


@pytest.fixture
def agent_stripe(fake: FakeStripe) -> Iterator[Any]:
    """A Stripe client with the AGENT's key, able to call sync and async."""
    from tests.support.card_seller import agent_stripe_client

    with agent_stripe_client(fake) as client:
        yield client
