import pytest
from typer.testing import CliRunner

from farebox.cli import app
from farebox.dev.demo import run_demo

# stripe 16.1's HTTPXClient hands httpx the form body as ``data=<bytes>`` (deprecated in 0.28); the
# test run turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload:DeprecationWarning")


def test_demo_tells_the_whole_story() -> None:
    facts = run_demo()
    assert facts["unpaid_status"] == 402
    assert facts["paid_status"] == 200
    assert facts["body"]["forecast"] == "sunny"
    assert facts["moved"] == (10_000, 10_000)  # read back from the chain: agent paid, merchant got
    assert facts["transaction"].startswith("0x")
    assert len(facts["transaction"]) == 66
    commerce = facts["receipt_claims"]["extensions"]["org.peacprotocol/commerce"]
    assert commerce["event"] == "settlement"
    assert commerce["reference"] == facts["transaction"]
    assert facts["retry"] == (200, "true")  # the same payment again: its stored answer
    assert facts["replay"] == (402, "proof_replayed")  # the authorization in another request
    assert facts["replays_charged"] == 0
    assert facts["budget"] == "budget_exceeded"
    assert facts["transfers"] == 2
    card = facts["card"]
    # One 402 offers x402, the MPP Payment challenge and an X-Receipt invoice.
    assert card["offered"] == ["x402", "mpp", "x-receipt"]
    assert (card["card_status"], card["card_rail"]) == (200, "stripe")
    assert card["card_intent"] == ("succeeded", 50, "usd")
    assert card["card_receipt"]["payment_rail"] == "stripe"
    assert card["card_receipt"]["event"] == "settlement"
    assert card["x402_status"] == (200, "x402")
    status, served, reference, again = card["x_receipt"]
    assert (status, served, again) == ("succeeded", 200, "proof_replayed")
    assert reference.startswith("pi_")
    assert card["refund"] == (25, 25, "-25")


def test_farebox_demo_command_runs() -> None:
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "402 Payment Required" in result.output
    assert "proof_replayed" in result.output
    assert "budget_exceeded" in result.output
    assert "X-Receipt" in result.output
    assert "refund of -25 USD" in result.output
