"""The ``farebox keys`` and ``farebox receipts`` commands."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from farebox.cli import app
from farebox.receipts import (
    SigningKey,
    issue_receipt,
    jwks_document,
    load_signing_key,
    payment_claims,
    uuid7,
)

runner = CliRunner()


def record(key: SigningKey, iss: str, iat: int | None = None) -> str:
    now = int(time.time()) if iat is None else iat
    claims = payment_claims(
        iss=iss,
        iat=now,
        jti=uuid7(now * 1000),
        payment_rail="x402",
        amount_minor=1,
        currency="USDC",
    )
    return issue_receipt(claims, key).jws


@pytest.fixture
def jwks_file(tmp_path: Path) -> tuple[SigningKey, Path]:
    key = SigningKey.generate()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document([key])))
    return key, path


def test_keys_generate(tmp_path: Path) -> None:
    out = tmp_path / "key.json"
    result = runner.invoke(app, ["keys", "generate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    key = load_signing_key(out)
    assert printed["kid"] == key.kid
    assert printed["public_jwk"] == key.public_jwk()
    assert printed["did"] == key.did_key
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert json.loads(out.read_text())["d"] not in result.output


def test_keys_generate_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "key.json"
    assert runner.invoke(app, ["keys", "generate", "--out", str(out)]).exit_code == 0
    first = out.read_bytes()
    refused = runner.invoke(app, ["keys", "generate", "--out", str(out)])
    assert refused.exit_code == 1
    assert "exists" in refused.stderr
    assert out.read_bytes() == first
    forced = runner.invoke(app, ["keys", "generate", "--out", str(out), "--force"])
    assert forced.exit_code == 0
    assert out.read_bytes() != first
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_verify_with_jwks(jwks_file: tuple[SigningKey, Path]) -> None:
    key, path = jwks_file
    jws = record(key, "https://api.example.com")
    result = runner.invoke(app, ["receipts", "verify", jws, "--jwks", str(path)])
    assert result.exit_code == 0, result.output
    claims = json.loads(result.stdout)
    assert claims["iss"] == "https://api.example.com"
    assert claims["extensions"]["org.peacprotocol/commerce"]["amount_minor"] == "1"


def test_verify_reads_stdin_and_checks_issuer(jwks_file: tuple[SigningKey, Path]) -> None:
    key, path = jwks_file
    jws = record(key, "https://api.example.com")
    ok = runner.invoke(
        app,
        ["receipts", "verify", "-", "--jwks", str(path), "--issuer", "https://api.example.com"],
        input=jws + "\n",
    )
    assert ok.exit_code == 0, ok.output
    wrong = runner.invoke(
        app, ["receipts", "verify", "--jwks", str(path), "--issuer", "https://x.example"], input=jws
    )
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("E_INVALID_ISSUER")
    assert wrong.stdout == ""


def test_verify_did_key_without_jwks() -> None:
    key = SigningKey.generate()
    result = runner.invoke(app, ["receipts", "verify", record(key, key.did_key)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["iss"] == key.did_key


def test_verify_failures_print_the_code(jwks_file: tuple[SigningKey, Path]) -> None:
    key, path = jwks_file
    forged = record(SigningKey.generate(kid=key.kid), "https://api.example.com")
    cases = [
        (["receipts", "verify", forged, "--jwks", str(path)], "E_INVALID_SIGNATURE"),
        (["receipts", "verify", "not-a-jws", "--jwks", str(path)], "E_INVALID_FORMAT"),
        (["receipts", "verify", record(key, "https://api.example.com")], "E_KEY_NOT_FOUND"),
        (
            ["receipts", "verify", record(key, "https://a.example", int(time.time()) + 3600),
             "--jwks", str(path)],
            "E_NOT_YET_VALID",
        ),
        (["receipts", "verify", forged, "--jwks", str(path.parent / "absent.json")], "E_IO"),
    ]  # fmt: skip
    for args, code in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith(code), result.stderr
        assert result.stdout == ""


def test_verify_rejects_a_bad_jwks(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [1]}')
    key = SigningKey.generate()
    result = runner.invoke(
        app, ["receipts", "verify", record(key, key.did_key), "--jwks", str(path)]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("E_VERIFY_JWKS_INVALID")


def test_inspect_is_marked_unverified() -> None:
    key = SigningKey.generate()
    jws = record(key, "https://api.example.com")
    forged = jws[: jws.rindex(".") + 1] + "A" * 86  # garbage signature: inspect does not care
    result = runner.invoke(app, ["receipts", "inspect", forged])
    assert result.exit_code == 0, result.output
    decoded = json.loads(result.stdout)
    assert decoded["verified"] is False
    assert decoded["header"]["kid"] == key.kid
    assert decoded["payload"]["iss"] == "https://api.example.com"
    assert "UNVERIFIED" in result.stderr
    bad = runner.invoke(app, ["receipts", "inspect", "-"], input="a.b")
    assert bad.exit_code == 1
    assert bad.stderr.startswith("E_INVALID_FORMAT")


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "receipts" in result.output
    assert "keys" in result.output
