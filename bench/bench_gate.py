"""Benchmark: requests per second through one ASGI app, free route against paid route.

The paid route runs the whole cycle: decode, verify, claim in the SQLite store, simulate and settle
on the embedded EVM, sign the PEAC record, record the events. A second paid run replaces only the
ledger with an instant one, so the gate's own overhead (everything but the ledger) shows on its
own; the ledger's simulate + settle is timed separately. Target: gate overhead under 0.5 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable for bench._harness
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench._harness import fmt_time
from farebox.dev.sample import AGENT, build_sample_api
from farebox.protocol.models import Offer, Settlement, VerifiedProof
from farebox.protocol.x402 import encode_proof
from farebox.schemes.evm_exact import make_proof
from farebox.server.asgi import PaymentMiddleware
from farebox.store.memory import MemoryStore
from farebox.store.sqlite import SqliteStore

HOST = "api.bench"


class _InstantLedger:
    """A facilitator that accepts and settles at once: isolates the gate's cost in the bench."""

    def supports(self, offer: Offer) -> bool:
        return True

    async def verify(self, verified: VerifiedProof) -> None:
        return None

    async def settle(self, verified: VerifiedProof) -> Settlement:
        return Settlement(True, verified.offer.network, "0x" + "ab" * 32, verified.payer)


async def _call(app: PaymentMiddleware, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "path": path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", HOST.encode()), *headers],
        "server": (HOST, 443),
    }
    await app(scope, receive, send)
    return status


async def _timed(
    name: str, run_one: Callable[[int], Awaitable[int]], count: int, batches: int = 10
) -> float:
    per_batch = max(1, count // batches)
    samples = []
    index = 0
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per_batch):
            status = await run_one(index)
            index += 1
            if status != 200:
                raise SystemExit(f"{name}: request {index} answered {status}")
        samples.append((time.perf_counter() - start) / per_batch)
    return statistics.median(samples)


async def _bench() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        api = build_sample_api(store=SqliteStore(os.path.join(tmp, "bench.sqlite")))
        payer = api.chain.accounts[AGENT].account
        offer = api.routes.match("GET", "/weather").route.offers(None)  # type: ignore[union-attr,arg-type]
        now = int(time.time())

        def proofs(n: int) -> list[list[tuple[bytes, bytes]]]:
            return [
                [
                    (
                        b"payment-signature",
                        encode_proof(
                            make_proof(payer, offer[0], now=now, nonce=os.urandom(32))
                        ).encode(),
                    )
                ]
                for _ in range(n)
            ]

        free = await _timed("free", lambda i: _call(api.app, "/health", []), 3000)
        chain_proofs = proofs(400)
        paid = await _timed("paid", lambda i: _call(api.app, "/weather", chain_proofs[i]), 400)

        instant = build_sample_api(api.chain, store=SqliteStore(os.path.join(tmp, "gate.sqlite")))
        instant.gate.facilitator = _InstantLedger()
        gate_proofs = proofs(3000)
        gate_only = await _timed(
            "gate", lambda i: _call(instant.app, "/weather", gate_proofs[i]), 3000
        )
        in_memory = build_sample_api(api.chain, store=MemoryStore())
        in_memory.gate.facilitator = _InstantLedger()
        memory_proofs = proofs(3000)
        gate_memory = await _timed(
            "gate-memory", lambda i: _call(in_memory.app, "/weather", memory_proofs[i]), 3000
        )

        # The ledger alone: simulate + settle one verified proof on the embedded chain.
        from farebox.schemes.evm_exact import verify

        ledger_samples = []
        for header in proofs(200):
            from farebox.protocol.x402 import decode_proof

            verified = verify(decode_proof(header[0][1].decode()), offer[0], now=now)
            start = time.perf_counter()
            await api.ledger.simulate(verified)
            settlement = await api.ledger.settle(verified)
            ledger_samples.append(time.perf_counter() - start)
            assert settlement.success, settlement
        ledger = statistics.median(ledger_samples)

    print("\n## The gate: one ASGI app, free route against paid route (median per request)")
    print(f"  free route (GET /health)          {fmt_time(free)}  ({1 / free:,.0f}/s)")
    print(
        f"  paid route, settled on the chain  {fmt_time(paid)}  ({1 / paid:,.0f}/s)"
        f"  {paid / free:6.1f}x the free route's time"
    )
    print(
        f"  paid route, instant ledger        {fmt_time(gate_only)}  ({1 / gate_only:,.0f}/s)"
        f"  {gate_only / free:6.1f}x the free route's time"
    )
    print(
        f"  same, memory store                {fmt_time(gate_memory)}  ({1 / gate_memory:,.0f}/s)"
        f"  {gate_memory / free:6.1f}x the free route's time"
    )
    print(f"  ledger alone (simulate + settle)  {fmt_time(ledger)}")
    for label, paid_time in (("SQLite store", gate_only), ("memory store", gate_memory)):
        overhead = paid_time - free
        verdict = "meets" if overhead < 0.5e-3 else "MISSES"
        print(
            f"  gate overhead, {label} (paid without ledger - free): {fmt_time(overhead)}"
            f"  {verdict} the 0.5 ms target"
        )


def run() -> None:
    """Measure and print the gate benchmark."""
    anyio.run(_bench)


if __name__ == "__main__":
    run()
