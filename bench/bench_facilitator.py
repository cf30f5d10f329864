"""Benchmark: verify + settle on a real node (anvil), the official Python facilitator against farebox.

One anvil (chain 84532, USDC placed at Base Sepolia's address, automine) serves every contender in
the same run, each with its own settler account so their nonces never mix:

* the official facilitator library (``x402Facilitator`` + the exact EVM scheme + its web3 signer),
  in-process;
* farebox in-process: ``evm_exact.verify`` + ``LocalFacilitator`` (simulate, settle) on
  ``EvmLedger(HttpRpc)``;
* farebox over HTTP: the official ``HTTPFacilitatorClient`` calling farebox's facilitator service
  (``facilitator_app`` under uvicorn), when that module exists.

Each payment is a fresh EIP-3009 authorization from the same payer; medians per payment of verify,
settle and both. anvil comes from ``$FAREBOX_ANVIL``, ``PATH``, or the interop tests' npm folder
(``tests/interop/anvil``, installed by the first interop test run); without one the bench says so
and skips.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable for bench._harness
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench._harness import fmt_time
from farebox.dev.anvil import DEV_KEYS, Anvil, AnvilError, find_anvil_binary, place_usdc
from farebox.errors import ConfigError
from farebox.eth import EvmAccount
from farebox.facilitator.local import LocalFacilitator
from farebox.ledgers.evm import EvmLedger
from farebox.ledgers.rpc import HttpRpc
from farebox.money import BASE_SEPOLIA_USDC as USDC
from farebox.protocol.models import Offer
from farebox.protocol.x402 import decode_proof, encode_proof, offer_to_json
from farebox.schemes import evm_exact
from farebox.store.memory import MemoryStore

PAYMENTS = 60
NPM_ANVIL = (
    Path(__file__).resolve().parent.parent
    / "tests/interop/anvil/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
)
# Development accounts by role: one settler per contender, one payee, one payer.
FAREBOX_SETTLER, OFFICIAL_SETTLER, PAYEE, PAYER, SERVICE_SETTLER = 1, 2, 3, 4, 5

Step = Callable[[str], Awaitable[None]]


def _anvil_binary() -> tuple[str | None, str]:
    try:
        found = find_anvil_binary()
    except ConfigError as exc:
        return None, str(exc)
    if found is None and NPM_ANVIL.exists():
        found = str(NPM_ANVIL)
    reason = (
        "anvil not found: set $FAREBOX_ANVIL, put anvil on PATH, or run the interop tests once "
        "(they install @foundry-rs/anvil into tests/interop/anvil)"
    )
    return found, reason


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def _timed(name: str, verify: Step, settle: Step, headers: list[str]) -> dict[str, float]:
    """Median seconds per payment of ``verify``, ``settle`` and both, after two warm-up payments."""
    for header in headers[:2]:
        await verify(header)
        await settle(header)
    verify_samples, settle_samples, both = [], [], []
    for header in headers[2:]:
        start = time.perf_counter()
        await verify(header)
        middle = time.perf_counter()
        await settle(header)
        end = time.perf_counter()
        verify_samples.append(middle - start)
        settle_samples.append(end - middle)
        both.append(end - start)
    return {
        "verify": statistics.median(verify_samples),
        "settle": statistics.median(settle_samples),
        "both": statistics.median(both),
    }


async def _bench(binary: str) -> None:
    from x402 import x402Facilitator
    from x402.http.utils import decode_payment_signature_header
    from x402.mechanisms.evm.exact.register import register_exact_evm_facilitator
    from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
    from x402.schemas import PaymentRequirements

    with Anvil(binary) as anvil:
        payer = EvmAccount.from_hex(DEV_KEYS[PAYER])
        await place_usdc(anvil.url, holders=[payer.address])
        offer = Offer(
            "exact",
            USDC.network,
            10_000,
            USDC.address,
            EvmAccount.from_hex(DEV_KEYS[PAYEE]).address,
            300,
            {"name": USDC.name, "version": USDC.version},
        )
        requirements = PaymentRequirements.model_validate(offer_to_json(offer))

        def headers() -> list[str]:
            now = int(time.time())
            return [
                encode_proof(evm_exact.make_proof(payer, offer, now=now, nonce=os.urandom(32)))
                for _ in range(PAYMENTS + 2)
            ]

        # The official facilitator library, in-process, settling through web3.
        official = register_exact_evm_facilitator(
            x402Facilitator(),
            FacilitatorWeb3Signer(DEV_KEYS[OFFICIAL_SETTLER], anvil.url),
            networks=USDC.network,
        )

        async def official_verify(header: str) -> None:
            result = await official.verify(decode_payment_signature_header(header), requirements)
            assert result.is_valid, result

        async def official_settle(header: str) -> None:
            result = await official.settle(decode_payment_signature_header(header), requirements)
            assert result.success, result

        results = {
            "official facilitator (web3)": await _timed(
                "official", official_verify, official_settle, headers()
            )
        }

        # farebox in-process: offline verify + simulate, then settle.
        ledger = EvmLedger(
            HttpRpc(anvil.url), EvmAccount.from_hex(DEV_KEYS[FAREBOX_SETTLER]), network=USDC.network
        )
        local = LocalFacilitator([ledger])
        verified_of: dict[str, evm_exact.VerifiedEvmProof] = {}

        async def farebox_verify(header: str) -> None:
            verified = evm_exact.verify(decode_proof(header), offer, now=int(time.time()))
            await local.verify(verified)
            verified_of[header] = verified

        async def farebox_settle(header: str) -> None:
            settlement = await local.settle(verified_of.pop(header))
            assert settlement.success, settlement

        results["farebox in-process"] = await _timed(
            "farebox", farebox_verify, farebox_settle, headers()
        )
        await local.aclose()

        # farebox's facilitator service over HTTP, called by the official HTTP client.
        skipped_http = None
        if importlib.util.find_spec("farebox.facilitator.service") is None:
            skipped_http = "farebox.facilitator.service does not exist yet"
        else:
            from x402.http import FacilitatorConfig, HTTPFacilitatorClient

            from farebox.facilitator.service import facilitator_app

            service = LocalFacilitator(
                [
                    EvmLedger(
                        HttpRpc(anvil.url),
                        EvmAccount.from_hex(DEV_KEYS[SERVICE_SETTLER]),
                        network=USDC.network,
                    )
                ]
            )
            app = facilitator_app(service, MemoryStore(), close_on_shutdown=True)
            with _serve(app) as url:
                client = HTTPFacilitatorClient(FacilitatorConfig(url=url))

                async def http_verify(header: str) -> None:
                    payload = decode_payment_signature_header(header)
                    result = await client.verify(payload, requirements)
                    assert result.is_valid, result

                async def http_settle(header: str) -> None:
                    payload = decode_payment_signature_header(header)
                    result = await client.settle(payload, requirements)
                    assert result.success, result

                results["farebox service over HTTP"] = await _timed(
                    "http", http_verify, http_settle, headers()
                )
                await client.aclose()

    baseline = results["official facilitator (web3)"]["both"]
    print(
        f"\n## Facilitators on anvil: verify + settle one EIP-3009 payment "
        f"(median of {PAYMENTS}, automine)"
    )
    width = max(len(name) for name in results)
    for name, timing in results.items():
        line = (
            f"  {name:<{width}}  verify {fmt_time(timing['verify'])}"
            f"  settle {fmt_time(timing['settle'])}  both {fmt_time(timing['both'])}"
        )
        if not name.startswith("official"):
            ratio = baseline / timing["both"]
            line += (
                f"  {ratio:5.1f}x faster than the official"
                if ratio >= 1
                else f"  takes {1 / ratio:4.2f}x the official's time"
            )
        print(line)
    if skipped_http:
        print(f"  farebox service over HTTP: skipped ({skipped_http})")


def run() -> None:
    """Measure and print the facilitator benchmark, or say why it cannot run."""
    binary, reason = _anvil_binary()
    if binary is None:
        print(f"\n## Facilitators on anvil: skipped ({reason})")
        return
    try:
        anyio.run(_bench, binary)
    except AnvilError as exc:
        print(f"\n## Facilitators on anvil: skipped (anvil cannot run: {exc})")


if __name__ == "__main__":
    run()
