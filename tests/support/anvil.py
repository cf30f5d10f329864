"""An anvil node with USDC at Base Sepolia's address (``tests/interop/conftest.py`` starts one per
test process, so one per xdist worker).

The node is the pinned ``@foundry-rs/anvil`` npm package, installed into ``tests/interop/anvil/node_modules``
on first use. It runs chain 84532 with farebox's EIP-3009 token placed at the canonical Base
Sepolia USDC address (EIP-712 name "USDC", version "2"), so the official SDKs pay and settle there
with their default settings. Roles of the development accounts, fixed so that no two signers share
a transaction nonce: #0 deploys and mints (unlocked on the node), #1 settles for farebox, #2 for
the official facilitator, #3 receives payments in the benchmark. Payers are fresh keys funded by
:meth:`AnvilChain.fund`, so tests never share a balance.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from farebox.dev.anvil import DEV_KEYS, Anvil, find_anvil_binary, place_usdc
from farebox.errors import ConfigError
from farebox.eth import EvmAccount
from farebox.money import Asset

ANVIL_DIR = Path(__file__).resolve().parents[1] / "interop" / "anvil"
ANVIL_BINARY = ANVIL_DIR / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
_STAMP = ANVIL_DIR / "node_modules" / ".farebox-package-sha256"
_BALANCE_OF = "0x70a08231"
_MINT = "0x40c10f19"
DEV_FUNDS = 1_000 * 10**6  # USDC minted to each development account


def install_anvil() -> str:
    """The anvil binary of the pinned npm package, installed once under a lock; else skip.

    xdist workers share the folder: the first takes the lock and installs, the others wait and
    find the stamp. ``npm install`` (no lock file, see package.json) fetches only this platform's
    binary, so a platform the registry has no binary for skips here, naming why.
    """
    npm = shutil.which("npm")
    if npm is None:
        # Without npm, an anvil the user installed (PATH or $FAREBOX_ANVIL) still serves.
        try:
            found = find_anvil_binary()
        except ConfigError as exc:
            pytest.skip(f"npm is missing and {exc}")
        if found is None:
            pytest.skip("npm is not installed and no anvil is on PATH or in $FAREBOX_ANVIL")
        return found
    manifest = ANVIL_DIR / "package.json"
    wanted = hashlib.sha256(manifest.read_bytes()).hexdigest()
    with manifest.open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _STAMP.exists() or _STAMP.read_text().strip() != wanted:
                completed = subprocess.run(
                    [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
                    cwd=ANVIL_DIR,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if completed.returncode != 0:
                    raise RuntimeError(f"npm install of anvil failed: {completed.stderr[-2000:]}")
                if ANVIL_BINARY.exists():
                    _STAMP.write_text(wanted + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not ANVIL_BINARY.exists():
        pytest.skip(
            "@foundry-rs/anvil has no binary for this platform in the registry "
            "(only anvil-linux-amd64 is published here)"
        )
    return str(ANVIL_BINARY)


def rpc(url: str, method: str, *params: Any) -> Any:
    """One synchronous JSON-RPC call; the result, or an AssertionError naming the node's error."""
    answer = httpx.post(
        url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}, timeout=10
    ).json()
    assert "error" not in answer, answer["error"]
    return answer["result"]


@dataclass
class AnvilChain:
    """The running node and what tests need from it."""

    anvil: Anvil
    asset: Asset
    keys: tuple[str, ...]
    """The development accounts' private keys (public test keys), index = account number."""

    @property
    def url(self) -> str:
        return self.anvil.url

    @property
    def accounts(self) -> tuple[EvmAccount, ...]:
        return tuple(EvmAccount.from_hex(key) for key in self.keys)

    def balance(self, holder: str) -> int:
        """The USDC balance of ``holder``, read with ``eth_call balanceOf``."""
        data = _BALANCE_OF + holder[2:].lower().rjust(64, "0")
        return int(
            rpc(self.url, "eth_call", {"to": self.asset.address, "data": data}, "latest"), 16
        )

    def fund(self, holder: str, amount: int = 1_000_000) -> None:
        """Mint ``amount`` USDC to ``holder`` (account #0, the token's owner, is unlocked)."""
        data = _MINT + holder[2:].lower().rjust(64, "0") + amount.to_bytes(32, "big").hex()
        owner = EvmAccount.from_hex(self.keys[0]).address
        tx = rpc(
            self.url, "eth_sendTransaction", {"from": owner, "to": self.asset.address, "data": data}
        )
        assert rpc(self.url, "eth_getTransactionReceipt", tx)["status"] == "0x1"


def start_chain(binary: str) -> AnvilChain:
    """An anvil with USDC placed at Base Sepolia's address and minted to every dev account."""
    anvil = Anvil(binary)
    try:
        holders = [EvmAccount.from_hex(key).address for key in DEV_KEYS]
        asset = anyio.run(lambda: place_usdc(anvil.url, holders=holders, amount=DEV_FUNDS))
    except BaseException:
        anvil.stop()
        raise
    return AnvilChain(anvil, asset, DEV_KEYS)
