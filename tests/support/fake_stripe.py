"""The documented-API FAKE of Stripe the card tests run against, under the names they use.

It lives in :mod:`farebox.dev.devstripe` (``farebox demo`` and ``farebox devstripe`` serve it
too); its docstring lists the Stripe documentation it follows and the choices it makes where the
documentation is silent. It is not Stripe: the real API cannot be reached from the test machines.
"""

from farebox.dev.devstripe import (
    AGENT_KEY,
    ISSUED_TOKENS,
    SELLER_PROFILE,
    SPT_NESTED,
    SPT_TOP_LEVEL,
    Placement,
    RecordedRequest,
)
from farebox.dev.devstripe import DevStripe as FakeStripe
from farebox.dev.devstripe import running_devstripe as running_fake_stripe

__all__ = [
    "AGENT_KEY",
    "ISSUED_TOKENS",
    "SELLER_PROFILE",
    "SPT_NESTED",
    "SPT_TOP_LEVEL",
    "FakeStripe",
    "Placement",
    "RecordedRequest",
    "running_fake_stripe",
]
