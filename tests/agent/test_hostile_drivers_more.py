"""The drivers against hostile servers, second round (tests/agent/raw_http.py, real sockets).

A requests discovery fetch carries none of the session's credentials.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from farebox.agent.requests_adapter import PaymentSession
from farebox.errors import PaymentError
from farebox.eth import EvmAccount
from tests.agent.raw_http import RawServer, response
from tests.agent.test_hostile_drivers import Discovering, asks_payment

# --- 6. a requests discovery fetch carries no session credential -----------------------------


@pytest.mark.parametrize("source", ["session", "netrc"])
def test_a_discovery_fetch_carries_none_of_the_sessions_credentials(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == "netrc":
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login user password pw\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
    with (
        RawServer(lambda s: response(200, [], b"{}")) as elsewhere,
        RawServer(lambda s: asks_payment()) as api,
    ):
        agent = Discovering(EvmAccount.generate(), documents=[elsewhere.url + "/jwks.json"])
        with PaymentSession(agent) as session:
            if source == "session":
                session.headers["x-api-key"] = "caller-secret"
                session.auth = ("user", "pw")
                session.cookies.set("sid", "caller-cookie")
            with pytest.raises(PaymentError):
                session.get(api.url, timeout=10)
    # The caller's own request carried them, as it should.
    assert api.seen[0].headers.get("authorization", "").startswith("Basic ")
    # Before: the fetch to the host the server named got x-api-key and the Basic credentials.
    fetched = elsewhere.seen[0].headers
    assert "authorization" not in fetched
    assert "x-api-key" not in fetched
    assert "cookie" not in fetched
    assert fetched["accept"] == "application/json"
