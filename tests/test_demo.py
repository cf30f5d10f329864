from typer.testing import CliRunner

from farebox.cli import app
from farebox.demo import run_demo


def test_demo_tells_the_whole_story() -> None:
    facts = run_demo(now=1_800_000_000)
    assert facts["status"] == 402
    assert facts["payer"] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    assert facts["refusals"] == [
        "invalid_exact_evm_payload_authorization_value_mismatch",
        "invalid_exact_evm_payload_recipient_mismatch",
        "invalid_exact_evm_payload_authorization_valid_before",
        "invalid_payment_requirements",
    ]
    commerce = facts["receipt_claims"]["extensions"]["org.peacprotocol/commerce"]
    assert commerce["amount_minor"] == "10000"
    assert commerce["event"] == "authorization"  # nothing settled: no finality is claimed
    assert facts["warnings"] == ()


def test_farebox_demo_command_runs() -> None:
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "402 Payment Required" in result.output
    assert "invalid_exact_evm_payload_recipient_mismatch" in result.output
    assert "warnings: 0" in result.output
