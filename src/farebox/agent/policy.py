"""What an agent is willing to pay: networks, assets, hosts and payees, and the most per request."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from farebox.errors import ConfigError, PaymentError
from farebox.money import Asset
from farebox.net import is_loopback
from farebox.protocol.models import Offer

__all__ = ["DEFAULT_MAX_LIFETIME", "Policy"]

#: The longest an authorization the agent signs stays valid, in seconds, unless the policy says
#: otherwise: twice the official servers' default ``maxTimeoutSeconds`` (300). A signed
#: authorization counts against the budget until it provably cannot move money, so this is also
#: how long a refused payment can hold the budget before ``budget reconcile`` may release it.
DEFAULT_MAX_LIFETIME = 600


def _lowered(values: Iterable[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v.lower() for v in values)


@dataclass(frozen=True, slots=True)
class Policy:
    """Limits that do not depend on what was spent before (the :class:`Budget` has those).

    ``None`` means "any". ``networks`` are CAIP-2 ids; ``assets`` token addresses; ``hosts`` host
    names (``api.example.com``, or ``*.example.com`` for subdomains); ``payees`` payTo addresses.
    Card payments count as network ``stripe``, their payee being the seller's Stripe profile
    (``profile_…``, the challenge's ``networkId``).
    Only ``https`` URLs are paid, and plain ``http`` on the loopback interface (local development),
    unless ``allow_http`` is set.

    ``max_lifetime`` is the longest validity window (seconds) the agent signs, whatever the server
    asks: an offer whose ``maxTimeoutSeconds`` is longer is refused rather than cut (the server
    says it may need that long to answer and settle; a shorter window could expire under it).
    """

    networks: frozenset[str] | None = None
    assets: frozenset[str] | None = None
    hosts: frozenset[str] | None = None
    payees: frozenset[str] | None = None
    allow_http: bool = False
    max_lifetime: int = DEFAULT_MAX_LIFETIME

    def __post_init__(self) -> None:
        lifetime = self.max_lifetime
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, int)
            or not 6 < lifetime <= 86_400
        ):
            raise ConfigError("max_lifetime must be an int of seconds between 7 and 86400")

    @classmethod
    def build(
        cls,
        *,
        networks: Iterable[str] | None = None,
        assets: Iterable[str] | None = None,
        hosts: Iterable[str] | None = None,
        payees: Iterable[str] | None = None,
        allow_http: bool = False,
        max_lifetime: int = DEFAULT_MAX_LIFETIME,
    ) -> Policy:
        return cls(
            frozenset(networks) if networks is not None else None,
            _lowered(assets),
            _lowered(hosts),
            _lowered(payees),
            allow_http,
            max_lifetime,
        )

    def check_url(self, url: str) -> None:
        """Refuse to pay for ``url`` unless its scheme and host are allowed."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        plain_ok = self.allow_http or is_loopback(host)
        if parts.scheme != "https" and not (plain_ok and parts.scheme == "http"):
            raise PaymentError("policy_refused", f"will not pay over {parts.scheme or 'no'} scheme")
        if self.hosts is not None and not any(_host_matches(host, h) for h in self.hosts):
            raise PaymentError("policy_refused", f"host {host} is not in the agent's allowed hosts")

    def refusal(self, offer: Offer, asset: Asset | None) -> str | None:
        """Why ``offer`` may not be paid, or ``None`` when it may."""
        if asset is None:
            return f"unknown asset {offer.asset} on {offer.network}"
        if self.networks is not None and offer.network not in self.networks:
            return f"network {offer.network} is not allowed"
        if self.assets is not None and offer.asset.lower() not in self.assets:
            return f"asset {offer.asset} is not allowed"
        if self.payees is not None and offer.pay_to.lower() not in self.payees:
            return f"payee {offer.pay_to} is not allowed"
        if offer.max_timeout_seconds > self.max_lifetime:
            return (
                f"the offer asks for an authorization valid {offer.max_timeout_seconds} s; "
                f"the policy signs at most {self.max_lifetime} s (max_lifetime)"
            )
        return None

    def card_refusal(self, network_id: str) -> str | None:
        """Why a card payment to the Stripe profile ``network_id`` may not be made, or ``None``."""
        if self.networks is not None and "stripe" not in self.networks:
            return "card payments (network stripe) are not allowed"
        if self.payees is not None and network_id.lower() not in self.payees:
            return f"payee {network_id} is not allowed"
        return None


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern
