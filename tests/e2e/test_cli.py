"""The command line, as a user runs it: ``farebox demo --serve`` in one process, ``farebox get``
paying it from another, with a budget file and a receipt book."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_processes import DEV_KEYS, free_port, wait_for

FAREBOX = [sys.executable, "-m", "farebox.cli"]


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [*FAREBOX, "demo", "--serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def farebox_get(*args: str, key: str = DEV_KEYS[3]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FAREBOX_PRIVATE_KEY=key)
    return subprocess.run(
        [*FAREBOX, "get", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def test_get_pays_the_demo_server_within_its_budget(demo_server: str, tmp_path: Path) -> None:
    assert httpx.get(demo_server + "/weather").status_code == 402
    budget, book = str(tmp_path / "budget.sqlite"), str(tmp_path / "book.sqlite")
    common = ("--budget-file", budget, "--per-day", "$0.02", "--book", book)
    first = farebox_get(demo_server + "/weather", *common)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["forecast"] == "sunny"
    payment = json.loads(first.stderr[first.stderr.index("{") :])
    assert payment["paid"] == "0.01 USDC"
    assert payment["transaction"].startswith("0x")
    assert payment["receipt_verified"] is True
    assert DEV_KEYS[3][2:] not in first.stdout + first.stderr  # the key is never printed
    assert farebox_get(demo_server + "/weather", *common).returncode == 0
    refused = farebox_get(demo_server + "/weather", *common)  # a third cent: over the day's limit
    assert refused.returncode == 1
    assert "budget_exceeded" in refused.stderr
    too_dear = farebox_get(demo_server + "/weather", "--max", "$0.001")
    assert too_dear.returncode == 1
    assert "budget_exceeded" in too_dear.stderr


def test_get_without_a_key_or_funds(demo_server: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FAREBOX_PRIVATE_KEY"}
    no_key = subprocess.run(
        [*FAREBOX, "get", demo_server + "/weather"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert no_key.returncode == 1
    assert "FAREBOX_PRIVATE_KEY" in no_key.stderr
    broke = farebox_get(demo_server + "/weather", key="0x" + "7" * 64)
    assert broke.returncode == 1
    assert "invalid_exact_evm_insufficient_balance" in broke.stderr
    free = farebox_get(demo_server + "/health")
    assert free.returncode == 0
    assert json.loads(free.stdout) == {"ok": True}
