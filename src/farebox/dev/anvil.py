"""anvil (Foundry's local EVM node) as a child process, with USDC where the official SDKs expect it.

:class:`Anvil` starts ``anvil`` on 127.0.0.1, on a free port, with chain id 84532 (Base Sepolia)
by default and the ten standard development accounts of the ``test test ... junk`` mnemonic, each
unlocked and holding 10,000 ETH. It mines every transaction at once (automine), so settlement
confirms in milliseconds.

:func:`place_usdc` then puts farebox's EIP-3009 token (:mod:`farebox.dev.contracts`) at the
canonical address of an asset (Base Sepolia USDC by default) with that asset's EIP-712 name and
version, and mints to the holders. Official x402 clients and facilitators, which sign and verify
against the canonical address, chain id and domain, then pay and settle there with their default
settings, as on the real testnet.

The binary is found by :func:`find_anvil_binary` (``$FAREBOX_ANVIL``, then ``PATH``); callers
that install it elsewhere (the interop tests install the ``@foundry-rs/anvil`` npm package) pass
its path.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final

import anyio
import httpx

from farebox.dev.contracts import load_token
from farebox.errors import ConfigError, FareboxError
from farebox.eth import address_bytes, checksum_address, keccak256
from farebox.ledgers.rpc import HttpRpc, RpcError, RpcUnavailable
from farebox.money import BASE_SEPOLIA_USDC, Asset
from farebox.schemes.evm_exact import domain_separator

__all__ = [
    "ANVIL_ENV",
    "DEFAULT_CHAIN_ID",
    "DEV_KEYS",
    "Anvil",
    "AnvilError",
    "find_anvil_binary",
    "place_usdc",
]

ANVIL_ENV: Final = "FAREBOX_ANVIL"
DEFAULT_CHAIN_ID: Final = BASE_SEPOLIA_USDC.chain_id
# The private keys of anvil's default accounts (mnemonic "test test ... junk", m/44'/60'/0'/0/i):
# public test keys, known to every Ethereum tool, never to hold real value.
DEV_KEYS: Final = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
# The token's EIP-712 version is a constant of its code (FiatTokenV2's "2").
_TOKEN_VERSION: Final = "2"  # noqa: S105 - a version string, not a secret
_MINT_SELECTOR: Final = keccak256(b"mint(address,uint256)")[:4]
_DOMAIN_SEPARATOR_SELECTOR: Final = keccak256(b"DOMAIN_SEPARATOR()")[:4]
# A start that fails to bind (another process took the free port first) is retried this often.
_START_ATTEMPTS: Final = 3


class AnvilError(FareboxError):
    """anvil could not be found or started, or a step of :func:`place_usdc` failed."""


def find_anvil_binary() -> str | None:
    """The anvil executable: ``$FAREBOX_ANVIL`` if set, else ``anvil`` on ``PATH``, else ``None``.

    A set ``$FAREBOX_ANVIL`` that names no executable file is an error rather than a silent
    fallback, so a misconfigured path is noticed.
    """
    configured = os.environ.get(ANVIL_ENV)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise ConfigError(f"${ANVIL_ENV} does not name an executable file")
        return configured
    return shutil.which("anvil")


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Anvil:
    """An anvil node in a child process; a context manager that stops it on exit.

    ``Anvil()`` starts at once and returns when the node answers ``eth_chainId`` with the
    requested chain id. ``binary`` defaults to :func:`find_anvil_binary`; ``args`` are passed to
    anvil as extra options (``["--block-time", "1"]``, say).
    """

    def __init__(
        self,
        binary: str | os.PathLike[str] | None = None,
        *,
        chain_id: int = DEFAULT_CHAIN_ID,
        host: str = "127.0.0.1",
        startup_timeout: float = 15.0,
        args: Sequence[str] = (),
    ) -> None:
        found = os.fspath(binary) if binary is not None else find_anvil_binary()
        if found is None:
            raise AnvilError(f"anvil is not installed: put it on PATH or set ${ANVIL_ENV}")
        self.binary = found
        self.chain_id = chain_id
        self.host = host
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0
        last: AnvilError | None = None
        for _ in range(_START_ATTEMPTS):
            try:
                self._start(startup_timeout, args)
                return
            except AnvilError as exc:
                last = exc
        assert last is not None
        raise last

    @property
    def url(self) -> str:
        """The node's JSON-RPC endpoint (HTTP)."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The process id of the running node."""
        if self._process is None:
            raise AnvilError("anvil is not running")
        return self._process.pid

    def _start(self, timeout: float, args: Sequence[str]) -> None:
        # Between picking the port and anvil binding it another process may take it: then anvil
        # exits at once and the caller retries with a fresh port.
        self.port = _free_port(self.host)
        command = [
            self.binary,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--silent",
            *args,
        ]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise AnvilError(f"cannot run anvil: {exc.strerror or type(exc).__name__}") from None
        self._process = process
        deadline = time.monotonic() + timeout
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        with httpx.Client(timeout=1.0) as client:
            while True:
                if process.poll() is not None:
                    stderr = process.stderr.read() if process.stderr is not None else b""
                    self._reap()
                    message = stderr.decode("utf-8", "replace").strip()[-300:]
                    raise AnvilError(f"anvil exited with {process.returncode}: {message}")
                try:
                    answer = client.post(self.url, json=body).json()
                except (httpx.HTTPError, ValueError):
                    answer = None
                if isinstance(answer, dict) and isinstance(answer.get("result"), str):
                    if int(answer["result"], 16) != self.chain_id:
                        self.stop()
                        raise AnvilError("the node on the port answers another chain id")
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise AnvilError(f"anvil did not answer within {timeout:g} s")
                time.sleep(0.02)

    def _reap(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.stderr is not None:
            process.stderr.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the node (this process id only), wait, and kill it if it lingers."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        self._reap()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._process is not None else "stopped"
        return f"Anvil({self.url}, chain {self.chain_id}, {state})"


# --- the token ------------------------------------------------------------------------------------


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _encode_strings(*values: str) -> bytes:
    """ABI encoding of ``(string, string, ...)``: a head of offsets, then length + padded bytes."""
    encoded = [value.encode("utf-8") for value in values]
    head = b""
    tail = b""
    offset = 32 * len(values)
    for raw in encoded:
        head += _word(offset + len(tail))
        tail += _word(len(raw)) + raw + b"\0" * (-len(raw) % 32)
    return head + tail


async def _transact(rpc: HttpRpc, sender: str, to: str | None, data: bytes, what: str) -> Any:
    """Send from an unlocked account and wait for the receipt (mined at once, or polled)."""
    call: dict[str, Any] = {"from": sender, "data": "0x" + data.hex(), "gas": hex(5_000_000)}
    if to is not None:
        call["to"] = to
    tx_hash = await rpc.request("eth_sendTransaction", [call])
    deadline = time.monotonic() + 30.0
    while True:
        receipt = await rpc.request("eth_getTransactionReceipt", [tx_hash])
        if isinstance(receipt, dict):
            if receipt.get("status") != "0x1":
                raise AnvilError(f"{what}: the transaction reverted")
            return receipt
        if time.monotonic() > deadline:
            raise AnvilError(f"{what}: not mined within 30 s")
        # Only reached when the node does not automine (--block-time, --no-mining).
        await anyio.sleep(0.05)


async def place_usdc(
    url: str,
    asset: Asset = BASE_SEPOLIA_USDC,
    *,
    holders: Sequence[str] = (),
    amount: int = 1_000 * 10**6,
) -> Asset:
    """Put the development token at ``asset.address`` on the anvil node at ``url``; the asset.

    The token is deployed by the node's first unlocked account (its owner and minter) with the
    asset's name and symbol, and its runtime code copied to the asset's address with
    ``anvil_setCode``; ``amount`` atomic units are then minted to each of ``holders``. The token's
    domain separator at the new address is checked against the asset's EIP-712 domain on the
    node's chain, so signatures made for the real token verify here.

    Raises :class:`AnvilError` when the node refuses a step or the domain does not match, and
    ``ValueError`` for an asset whose EIP-712 version is not the token's ``"2"``.
    """
    if asset.version != _TOKEN_VERSION:
        raise ValueError(f"the token signs as version {_TOKEN_VERSION!r}, not {asset.version!r}")
    if len(asset.name.encode()) > 64 or len(asset.symbol.encode()) > 32:
        raise ValueError("token names are at most 64 bytes and symbols 32")
    rpc = HttpRpc(url)
    try:
        chain_id = int(await rpc.request("eth_chainId", []), 16)
        if asset.chain_id != chain_id:
            raise AnvilError(f"the node is chain {chain_id}, the asset is on {asset.network}")
        accounts = await rpc.request("eth_accounts", [])
        if not isinstance(accounts, list) or not accounts:
            raise AnvilError("the node has no unlocked account to deploy from")
        owner = checksum_address(str(accounts[0]))
        artifact = load_token()
        receipt = await _transact(
            rpc,
            owner,
            None,
            artifact.bytecode + _encode_strings(asset.name, asset.symbol),
            "deploying the token",
        )
        deployed = str(receipt["contractAddress"])
        code = await rpc.request("eth_getCode", [deployed, "latest"])
        # The immutables (name, symbol, owner) live in the runtime code, so the copy keeps them.
        await rpc.request("anvil_setCode", [asset.address, code])
        for holder in holders:
            data = _MINT_SELECTOR + address_bytes(holder).rjust(32, b"\0") + _word(amount)
            await _transact(rpc, owner, asset.address, data, "minting")
        separator = await rpc.request(
            "eth_call",
            [{"to": asset.address, "data": "0x" + _DOMAIN_SEPARATOR_SELECTOR.hex()}, "latest"],
        )
        expected = domain_separator(asset.name, asset.version, chain_id, asset.address)
        if not isinstance(separator, str) or bytes.fromhex(separator[2:]) != expected:
            raise AnvilError("the placed token's DOMAIN_SEPARATOR is not the asset's domain")
    except (RpcError, RpcUnavailable) as exc:
        raise AnvilError(f"placing the token: {exc}") from exc
    finally:
        await rpc.aclose()
    return asset
