"""Fixtures of the end-to-end tests: ``farebox devchain`` in a process of its own.

The apps are real FastAPI, Flask and other ASGI apps behind farebox's ASGI and WSGI middleware,
settling on the embedded EVM (the session's ``chain`` of ``tests/conftest.py``), with the gate
helpers of ``tests/support/gates.py``; the agent is farebox's, driving httpx or requests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import devchain_in_a_process


@pytest.fixture(scope="module")
def devchain_process() -> Iterator[str]:
    """``farebox devchain`` served on a free port for one module; its JSON-RPC URL."""
    with devchain_in_a_process() as url:
        yield url
