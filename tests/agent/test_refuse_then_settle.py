"""The budget against a server that refuses every payment and settles the authorizations later.

Every authorization that left the agent counts until the chain proves it cannot move money; the
money the hostile server takes never exceeds the budget, in one process or in three sharing one
budget file, and ``budget reconcile`` settles the account from the chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from farebox.agent.agent import Agent
from farebox.agent.budget import Budget
from farebox.agent.httpx_auth import PaymentAuth
from farebox.agent.policy import Policy
from farebox.agent.reconcile import reconcile_sync
from farebox.dev.devchain import DevChain
from farebox.dev.rpc_server import DevChainServer
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from farebox.ledgers.evm import EvmReader
from tests.support.chain import cancel_on_chain, fund, send_usdc
from tests.support.refuse_then_settle import RefuseThenSettle
from tests.support.servers import serve

CENT = 10_000  # atomic units of 6-decimal USDC
ROOT = Path(__file__).resolve().parents[2]
FAREBOX = [sys.executable, "-m", "farebox.cli"]


def pay_until_refused(agent: Agent, url: str, attempts: int) -> list[str]:
    codes = []
    with httpx.Client(auth=PaymentAuth(agent), timeout=10) as client:
        for _ in range(attempts):
            try:
                client.get(url)
                codes.append("served")
            except PaymentError as exc:
                codes.append(exc.code)
    return codes


def reader(chain: DevChain) -> EvmReader:
    return EvmReader(chain.rpc, network=chain.network)


def test_refusals_do_not_walk_past_the_daily_limit(chain: DevChain, tmp_path: Path) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    payer = fund(chain)
    budget = Budget.from_prices(tmp_path / "budget.db", per_request="$0.02", per_day="$0.05")
    agent = Agent(payer, budget=budget)
    with serve(hostile) as base:
        codes = pay_until_refused(agent, base + "/report", 12)
    # Five authorizations left (5 x $0.01 = the day's limit), each refused; then the budget
    # refuses to sign more. Before the fix each refusal released its reservation: 12 left.
    assert codes == ["invalid_exact_evm_insufficient_balance"] * 5 + ["budget_exceeded"] * 7
    assert len(hostile.proofs) == 5
    spent = budget.spent(now=int(time.time()))
    assert spent.today_committed == 5 * CENT * 10**12
    assert (spent.outstanding_count, spent.outstanding) == (5, 5 * CENT * 10**12)

    moved, transactions = hostile.settle_all()
    assert moved == 5 * CENT  # the thief got no more than the limit
    assert chain.balance_of(payer.address) == 1_000_000 - 5 * CENT

    report = reconcile_sync(budget, [reader(chain)])
    assert sorted(r.transaction or "" for r in report.committed) == sorted(transactions)
    assert report.released == []
    assert report.pending == []
    spent = budget.spent(now=int(time.time()))
    assert spent.today_committed == 5 * CENT * 10**12
    assert spent.outstanding_count == 0
    budget.close()


def test_an_offer_asking_for_a_long_window_is_refused_before_signing(chain: DevChain) -> None:
    # The run in the issue signed authorizations valid for 24,855 days: maxTimeoutSeconds 2**31-1.
    hostile = RefuseThenSettle(chain, max_timeout=2**31 - 1)
    agent = Agent(fund(chain))
    with serve(hostile) as base:
        codes = pay_until_refused(agent, base + "/report", 1)
    assert codes == ["no_payable_offer"]
    assert hostile.proofs == []  # nothing was signed


def test_the_signed_window_is_the_servers_and_never_past_the_cap(chain: DevChain) -> None:
    hostile = RefuseThenSettle(chain, max_timeout=900)
    agent = Agent(fund(chain), policy=Policy(max_lifetime=900))
    with serve(hostile) as base:
        before = int(time.time())
        pay_until_refused(agent, base + "/report", 1)
        after = int(time.time())
    (proof,) = hostile.proofs
    valid_before = int(proof.payload["authorization"]["validBefore"])
    assert before + 900 <= valid_before <= after + 900
    with pytest.raises(Exception, match="max_lifetime"):
        Policy(max_lifetime=3)


def test_reconcile_releases_what_expired_unused_and_keeps_what_is_valid(
    chain: DevChain, tmp_path: Path
) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    payer = fund(chain)
    path = tmp_path / "budget.db"
    # An agent whose clock runs 2000 s slow signs authorizations that are already expired.
    slow = Agent(
        payer,
        budget=Budget.from_prices(path, per_day="$1"),
        clock=lambda: time.time() - 2000,
    )
    on_time = Agent(payer, budget=Budget.from_prices(path, per_day="$1"))
    with serve(hostile) as base:
        pay_until_refused(slow, base + "/old", 1)
        pay_until_refused(on_time, base + "/new", 1)
    budget = on_time.budget
    assert budget.spent(now=int(time.time())).outstanding_count == 2

    report = reconcile_sync(budget, [reader(chain)])
    assert [r.outcome for r in report.released] == ["expired"]
    assert [r.outstanding.resource for r in report.released] == [base + "/old"]
    assert [r.outcome for r in report.pending] == ["waiting"]
    assert report.pending[0].outstanding.resource == base + "/new"
    spent = budget.spent(now=int(time.time()))
    assert spent.outstanding_count == 1
    assert spent.total_committed == CENT * 10**12
    # What is still valid the thief may still take, and it was counted all along.
    moved, _ = hostile.settle_all()
    assert moved == CENT
    report = reconcile_sync(budget, [reader(chain)])
    assert [r.outcome for r in report.committed] == ["used"]
    assert budget.spent(now=int(time.time())).total_committed == CENT * 10**12


def test_reconcile_releases_a_cancelled_authorization(chain: DevChain, tmp_path: Path) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    payer = fund(chain)
    agent = Agent(payer, budget=Budget.from_prices(tmp_path / "b.db", per_day="$1"))
    with serve(hostile) as base:
        pay_until_refused(agent, base + "/report", 1)
    (proof,) = hostile.proofs
    nonce = bytes.fromhex(proof.payload["authorization"]["nonce"][2:])
    report = reconcile_sync(agent.budget, [reader(chain)])
    assert [r.outcome for r in report.pending] == ["waiting"]  # valid: it still counts
    cancel_on_chain(chain, payer, nonce)
    report = reconcile_sync(agent.budget, [reader(chain)])
    assert [r.outcome for r in report.released] == ["cancelled"]
    assert agent.budget.spent(now=int(time.time())).total_committed == 0
    assert hostile.settle_all() == (0, [])  # and the thief can no longer use it


def test_a_network_without_a_chain_keeps_counting(chain: DevChain, tmp_path: Path) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    agent = Agent(fund(chain), budget=Budget.from_prices(tmp_path / "b.db", per_day="$1"))
    with serve(hostile) as base:
        pay_until_refused(agent, base + "/report", 1)
    report = reconcile_sync(agent.budget, [])
    assert [r.outcome for r in report.pending] == ["unreadable"]
    assert agent.budget.spent(now=int(time.time())).outstanding_count == 1


def test_an_app_error_after_the_payment_left_keeps_it_counted(
    chain: DevChain, tmp_path: Path
) -> None:
    """A 500 without a settlement is the server's word: the authorization may still move."""
    hostile = RefuseThenSettle(chain, price=CENT, status=500)
    agent = Agent(fund(chain), budget=Budget.from_prices(tmp_path / "b.db", per_day="$1"))
    with serve(hostile) as base, httpx.Client(auth=PaymentAuth(agent)) as client:
        assert client.get(base + "/report").status_code == 500
    assert agent.budget.spent(now=int(time.time())).outstanding_count == 1
    assert hostile.settle_all()[0] == CENT


@pytest.fixture
def rpc_url(chain: DevChain) -> Iterator[str]:
    with DevChainServer(chain, port=0) as server:
        yield server.url


_AGENT = textwrap.dedent(
    """
    import sys, httpx
    from farebox.agent.agent import Agent
    from farebox.agent.budget import Budget
    from farebox.agent.httpx_auth import PaymentAuth
    from farebox.agent.wallet import load_wallet
    from farebox.errors import PaymentError
    budget = Budget.from_prices(sys.argv[1], per_request="$0.02", per_day="$0.05")
    agent = Agent(load_wallet(), budget=budget)
    with httpx.Client(auth=PaymentAuth(agent), timeout=10) as client:
        for _ in range(6):
            try:
                client.get(sys.argv[2])
            except PaymentError as exc:
                print(exc.code, flush=True)
    """
)


def funded_key(chain: DevChain) -> tuple[str, EvmAccount]:
    """A fresh payer's hex key (for a process's environment) and account, holding $1."""
    key = os.urandom(32).hex()
    payer = EvmAccount.from_hex(key)
    send_usdc(chain, payer.address, 1_000_000)
    return key, payer


def _env(payer_key: str) -> dict[str, str]:
    env = dict(os.environ, FAREBOX_PRIVATE_KEY=payer_key)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_two_agent_processes_and_farebox_get_share_one_budget(
    chain: DevChain, tmp_path: Path, rpc_url: str
) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    key, _ = funded_key(chain)
    path = tmp_path / "shared.db"
    env = _env(key)
    with serve(hostile) as base:
        agents = [
            subprocess.Popen(
                [sys.executable, "-c", _AGENT, str(path), f"{base}/a{i}"],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        cli = [*FAREBOX, "get", f"{base}/cli"]
        cli += ["--budget-file", str(path), "--max", "$0.02", "--per-day", "$0.05"]
        gets = [subprocess.run(cli, env=env, capture_output=True, text=True) for _ in range(4)]
        outputs = [p.communicate(timeout=60)[0] for p in agents]
    assert all(g.returncode == 1 for g in gets)
    codes = [line for out in outputs for line in out.split()]
    codes += [g.stderr.split(":")[0].strip() for g in gets]
    # 16 attempts, five authorizations in all: the rest refused by the shared budget.
    assert len(hostile.proofs) == 5
    assert codes.count("budget_exceeded") == 16 - 5

    moved, transactions = hostile.settle_all()
    assert moved == 5 * CENT  # never more than the day's limit left the payer

    # farebox budget reconcile settles the account from the chain.
    done = subprocess.run(
        [*FAREBOX, "budget", "reconcile", "--budget-file", str(path), "--rpc-url", rpc_url],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["committed"] == 5
    assert report["pending"] == 0
    found = sorted(a["transaction"] for a in report["authorizations"])
    assert found == sorted(transactions)
    assert report["spending"]["today_committed"] == "0.05 USD"
    assert report["spending"]["outstanding_authorizations"] == 0


class Hold:
    """An ASGI app that takes the paid retry and never answers it (the agent dies waiting)."""

    def __init__(self, inner: RefuseThenSettle) -> None:
        self.inner = inner
        self.paid = threading.Event()
        self.done = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and any(k == b"payment-signature" for k, _ in scope["headers"]):
            self.paid.set()
            while not self.done.is_set():  # until the test is over: the agent dies waiting
                await anyio.sleep(0.05)
        await self.inner(scope, receive, send)


def test_an_agent_killed_after_sending_leaves_the_authorization_counted(
    chain: DevChain, tmp_path: Path
) -> None:
    hostile = RefuseThenSettle(chain, price=CENT)
    key, _ = funded_key(chain)
    path = tmp_path / "killed.db"
    app = Hold(hostile)
    with serve(app) as base:
        cli = [*FAREBOX, "get", f"{base}/report"]
        cli += ["--budget-file", str(path), "--per-day", "$1"]
        process = subprocess.Popen(cli, env=_env(key))
        try:
            assert app.paid.wait(30), "the agent never sent its payment"
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            app.done.set()
    budget = Budget.from_prices(path, per_day="$1")
    # Hours later (past any reservation's time to live) the authorization still counts.
    spent = budget.spent(now=int(time.time()) + 7200)
    assert spent.total_committed == CENT * 10**12
    assert spent.outstanding_count == 1
    budget.close()
