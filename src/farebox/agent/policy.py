"""What an agent is willing to pay: networks, assets, hosts and payees, and the most per request."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from farebox.errors import ConfigError, PaymentError
from farebox.eth import checked_address
from farebox.money import DEVCHAIN_USDC, Asset
from farebox.net import is_loopback
from farebox.protocol.models import Offer
from farebox.protocol.x402 import V1_NETWORKS

__all__ = ["DEFAULT_MAX_LIFETIME", "NETWORK_NAMES", "Policy"]

#: The longest an authorization the agent signs stays valid, in seconds, unless the policy says
#: otherwise: twice the official servers' default ``maxTimeoutSeconds`` (300). A signed
#: authorization counts against the budget until it provably cannot move money, so a refused
#: payment holds the budget until the chain's clock passes its ``validBefore`` (at most this long
#: after signing, by the agent's clock) plus the reconcile's grace (two minutes).
DEFAULT_MAX_LIFETIME = 600


#: Network names a policy may use for their CAIP-2 ids: the embedded chain's ``devchain`` (as in
#: the server's TOML) and x402 v1's names (``base-sepolia``), as the official SDKs map them.
NETWORK_NAMES: Mapping[str, str] = {"devchain": DEVCHAIN_USDC.network, **V1_NETWORKS}
# Card payments count as this pseudo-network (see Policy).
_CARD_NETWORK = "stripe"

_CAIP2 = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")
_CHAIN_ID = re.compile(r"[1-9][0-9]*")
_STRIPE_PROFILE = re.compile(r"profile_[A-Za-z0-9_]+")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DEFAULT_PORTS: Mapping[str, int] = {"https": 443, "http": 80}
_HOST_FORMS = (
    "api.example.com, *.example.com (its subdomains), api.example.com:8443 (one port), "
    "https://api.example.com or http://127.0.0.1:8402 (one origin)"
)


@dataclass(frozen=True, slots=True)
class Policy:
    """Limits that do not depend on what was spent before (the :class:`Budget` has those).

    ``None`` means "any". Every entry is checked when the policy is built: one that could never
    match what the agent pays is a :class:`~farebox.errors.ConfigError` then, not a refusal of
    every request later.

    - ``networks``: CAIP-2 ids (``eip155:8453``), or the names in :data:`NETWORK_NAMES`
      (``devchain``, ``base-sepolia``, ...), kept as their CAIP-2 ids. Card payments count as
      network ``stripe``.
    - ``assets``: token addresses; ``payees``: payTo addresses, or for cards the seller's Stripe
      profile (``profile_…``, the challenge's ``networkId``). An address is all-lower or
      all-upper case hex, or carries its exact EIP-55 checksum: a mixed-case address with a wrong
      one is a typo, and is refused.
    - ``hosts``: ``api.example.com`` (any port), ``*.example.com`` (its subdomains, not itself),
      ``api.example.com:8443`` (that port only), or an origin, ``https://api.example.com`` or
      ``http://127.0.0.1:8402`` (that scheme, host and port; an origin without a port means its
      scheme's default). Letter case does not matter; a path, query or user name is refused.

    Only ``https`` URLs are paid, and plain ``http`` on the loopback interface (local development),
    unless ``allow_http`` is set; an ``http`` origin off the loopback interface in ``hosts`` needs
    ``allow_http`` too.

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
    _host_rules: tuple[_HostRule, ...] | None = field(
        init=False, repr=False, compare=False, default=None
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "networks", _entries(self.networks, "networks", _network))
        object.__setattr__(self, "assets", _entries(self.assets, "assets", _asset))
        object.__setattr__(self, "payees", _entries(self.payees, "payees", _payee))
        rules: dict[str, _HostRule] = {}
        if self.hosts is not None:
            for entry in _entries(self.hosts, "hosts", str) or ():
                rule = _host_rule(entry)
                local = is_loopback(rule.host) and not rule.wildcard
                if rule.scheme == "http" and not self.allow_http and not local:
                    raise ConfigError(
                        f"hosts: {entry!r} is plain http off the loopback interface: write "
                        "https://, or set allow_http to pay over http"
                    )
                rules[rule.shown] = rule
            object.__setattr__(self, "hosts", frozenset(rules))
            object.__setattr__(self, "_host_rules", tuple(rules.values()))
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
        """A policy from lists (any iterable of strings, not one string); see the class."""
        return cls(
            _frozen(networks, "networks"),
            _frozen(assets, "assets"),
            _frozen(hosts, "hosts"),
            _frozen(payees, "payees"),
            allow_http,
            max_lifetime,
        )

    def check_url(self, url: str) -> None:
        """Refuse to pay for ``url`` unless its scheme, host and port are allowed."""
        parts = urlsplit(url)
        host = _url_host(parts.hostname or "")
        plain_ok = self.allow_http or is_loopback(host)
        if parts.scheme != "https" and not (plain_ok and parts.scheme == "http"):
            raise PaymentError("policy_refused", f"will not pay over {parts.scheme or 'no'} scheme")
        rules = self._host_rules
        if rules is None:
            return
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        except ValueError:
            raise PaymentError("policy_refused", "the URL's port is not a number") from None
        if not any(rule.matches(parts.scheme, host, port) for rule in rules):
            shown = f"[{host}]" if ":" in host else host
            if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
                shown = f"{shown}:{port}"
            raise PaymentError(
                "policy_refused", f"{parts.scheme}://{shown} is not in the agent's allowed hosts"
            )

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


@dataclass(frozen=True, slots=True)
class _HostRule:
    """One ``hosts`` entry: ``scheme`` and ``port`` ``None`` mean any; a ``wildcard`` rule's
    ``host`` is the domain whose subdomains match."""

    shown: str
    scheme: str | None
    host: str
    wildcard: bool
    port: int | None

    def matches(self, scheme: str, host: str, port: int | None) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        if self.port is not None and port != self.port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


def _frozen(values: Iterable[str] | None, name: str) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        # frozenset("api.example.com") would be a set of letters, each a "host".
        raise ConfigError(f"{name}: a list of strings, not one string")
    return frozenset(values)


def _entries(
    values: Iterable[str] | None, name: str, read: Callable[[str], str]
) -> frozenset[str] | None:
    checked = _frozen(values, name)
    if checked is None:
        return None
    out = set()
    for value in checked:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: {value!r} is not a string")
        out.add(read(value))
    return frozenset(out)


def _network(value: str) -> str:
    text = value.strip()
    if _CAIP2.fullmatch(text):
        namespace, _, reference = text.partition(":")
        if namespace == "eip155" and not _CHAIN_ID.fullmatch(reference):
            # Offers name the chain id in decimal without leading zeros; no other spelling matches.
            raise ConfigError(f"networks: {value!r}: an eip155 reference is the decimal chain id")
        return text
    name = text.lower()
    if name == _CARD_NETWORK:
        return name
    caip2 = NETWORK_NAMES.get(name)
    if caip2 is None:
        raise ConfigError(
            f"networks: {value[:80]!r} is neither a CAIP-2 id (namespace:reference, e.g. "
            f"eip155:8453) nor a known name ({', '.join(sorted(NETWORK_NAMES))}, or "
            f"{_CARD_NETWORK} for cards)"
        )
    return caip2


def _asset(value: str) -> str:
    return checked_address(value, "assets").lower()


def _payee(value: str) -> str:
    if _STRIPE_PROFILE.fullmatch(value):
        return value.lower()
    if not value.startswith("0x"):
        raise ConfigError(
            f"payees: {value[:80]!r} is neither an EVM address (0x and 40 hex digits) nor a "
            "Stripe profile (profile_...)"
        )
    return checked_address(value, "payees").lower()


def _url_host(host: str) -> str:
    """A host as rules compare it: lower case, no trailing dot, an IP literal in its short form."""
    host = host.lower().removesuffix(".")
    try:
        return ipaddress.ip_address(host.strip("[]")).compressed
    except ValueError:
        return host


def _host_rule(entry: str) -> _HostRule:
    text = entry.strip().lower()
    bad = f"hosts: {entry[:80]!r} is not a host; write one of: {_HOST_FORMS}"
    scheme: str | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"{bad} (origins are https or http)")
        text = text.removesuffix("/")
    if not text.isascii():
        raise ConfigError(f"{bad} (write an international name in its ASCII xn-- form)")
    if not text or any(ch in text for ch in "/?#@\\ \t"):
        raise ConfigError(f"{bad} (no path, query or user name)")
    name, port = _split_port(text, bad)
    wildcard = name.startswith("*.")
    host = _url_host(name.removeprefix("*."))
    if _is_ip(host):
        if wildcard:
            raise ConfigError(bad)
    elif not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ConfigError(bad)
    shown = ("*." if wildcard else "") + (f"[{host}]" if ":" in host else host)
    if port is not None and port != _DEFAULT_PORTS.get(scheme or ""):
        shown = f"{shown}:{port}"
    if scheme is not None:
        shown = f"{scheme}://{shown}"
        # An origin without a port is its scheme's default port, as in a URL.
        port = _DEFAULT_PORTS[scheme] if port is None else port
    return _HostRule(shown, scheme, host, wildcard, port)


def _split_port(text: str, bad: str) -> tuple[str, int | None]:
    """``host`` and ``port`` of ``host[:port]`` (an IPv6 literal bare or in brackets)."""
    if _is_ip(text):
        return text, None  # a bare IPv6 literal has colons and no port
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or ":" not in host or not _is_ip(host):
            raise ConfigError(f"{bad} (brackets hold an IPv6 address)")
    else:
        host, colon, digits = text.partition(":")
        rest = colon + digits
    if not rest:
        return host, None
    digits = rest.removeprefix(":")
    if not rest.startswith(":") or not digits.isdigit() or not 0 < int(digits) <= 65_535:
        raise ConfigError(f"{bad} (a port is a number from 1 to 65535)")
    return host, int(digits)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
