"""Fixtures of the interop tests: the anvil node (its helpers are in ``tests/support/anvil.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from farebox.dev.anvil import AnvilError
from farebox.money import BASE_SEPOLIA_USDC
from tests.support.anvil import AnvilChain, install_anvil, start_chain


@pytest.fixture(scope="session")
def anvil_chain() -> Iterator[AnvilChain]:
    """One anvil for this test process (each xdist worker starts its own), stopped at the end."""
    binary = install_anvil()
    try:
        chain = start_chain(binary)
    except AnvilError as exc:
        if "cannot run anvil" in str(exc):
            pytest.skip(f"the anvil binary cannot run here: {exc}")
        raise
    assert chain.asset == BASE_SEPOLIA_USDC
    try:
        yield chain
    finally:
        chain.anvil.stop()
