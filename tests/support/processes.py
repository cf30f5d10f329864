"""farebox in processes of its own: the command line, ``farebox devchain`` served on a free port,
and reading that chain over JSON-RPC."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.support.servers import free_port, wait_for

__all__ = ["DEV_KEYS", "FAREBOX", "balance", "devchain_in_a_process", "rpc"]

FAREBOX = [sys.executable, "-m", "farebox.cli"]

# The standard development accounts (the "test test ... junk" mnemonic): public test keys.
DEV_KEYS = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
)


@contextmanager
def devchain_in_a_process() -> Iterator[str]:
    """``farebox devchain`` on a free loopback port, until the block ends; its JSON-RPC URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "farebox.cli", "devchain", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def rpc(url: str, method: str, *params: object) -> object:
    """The ``result`` of one JSON-RPC call to the node at ``url``."""
    answer = httpx.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
    ).json()
    return answer["result"]


def balance(url: str, token: str, holder: str) -> int:
    """``holder``'s balance of ``token`` on the node at ``url``, in atomic units."""
    data = "0x70a08231" + holder[2:].lower().rjust(64, "0")
    return int(str(rpc(url, "eth_call", {"to": token, "data": data}, "latest")), 16)
