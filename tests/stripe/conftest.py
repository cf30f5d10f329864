"""The localstripe fixtures of the Stripe contract tests: one localstripe server per test process
(so one per xdist worker), and the official client on a freshly cleared store for each test. How
the server is started and cleared: ``tests/support/localstripe.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.localstripe import API_KEY, LAUNCHER, LocalStripe, wait_until_up

if TYPE_CHECKING:
    import stripe


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    """One localstripe server for this test process: its base URL and process id."""
    if find_spec("localstripe") is None:
        pytest.skip("localstripe is not installed (it comes with farebox's dev extra)")
    workdir = tmp_path_factory.mktemp("localstripe")
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    with out.open("wb") as out_file, err.open("wb") as err_file:
        # aiohttp 3.14 warns (DeprecationWarning) that localstripe registers plain functions as
        # handlers; they still work.
        proc = subprocess.Popen(
            [sys.executable, "-W", "ignore::DeprecationWarning", "-c", LAUNCHER],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=err_file,
        )
    http = httpx.Client(timeout=5.0, trust_env=False)
    try:
        url = wait_until_up(proc, out, err, http)
        yield LocalStripe(url=url, pid=proc.pid, http=http)
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def stripe_client(localstripe: LocalStripe) -> Iterator[stripe.StripeClient]:
    """The official client pointed at a freshly cleared localstripe; no retries."""
    stripe = pytest.importorskip("stripe", reason="the 'stripe' extra is not installed")
    localstripe.clear()
    http_client = stripe.new_default_http_client()
    client = stripe.StripeClient(
        API_KEY,
        base_addresses={"api": localstripe.url},
        max_network_retries=0,
        http_client=http_client,
    )
    yield client
    http_client.close()
