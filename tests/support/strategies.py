"""Hypothesis strategies of protocol values the wire tests share."""

from __future__ import annotations

from hypothesis import strategies as st

from farebox.protocol.models import Offer

__all__ = ["addresses", "offers"]

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())


offers = st.builds(
    Offer,
    scheme=st.sampled_from(["exact", "upto"]),
    network=st.sampled_from(["eip155:8453", "eip155:84532", "eip155:1"]),
    amount=st.integers(min_value=0, max_value=2**256 - 1),
    asset=addresses,
    pay_to=addresses,
    max_timeout_seconds=st.integers(min_value=1, max_value=2**31 - 1),
    extra=st.dictionaries(st.sampled_from(["name", "version", "memo"]), st.text(max_size=10)),
)
