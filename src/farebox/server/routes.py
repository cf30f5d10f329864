"""The route table: which requests cost what, in which assets, paid to whom.

A route is a method and a path pattern (``/items/{id}``, ``/files/{rest:path}``) with a price. The
price is written once for people (``"$0.01"``) and offered in every asset the route accepts, each
converted exactly to that asset's atomic units; it may also be a callable of the request, for
prices that depend on what is asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from farebox.errors import ConfigError
from farebox.eth import checked_address
from farebox.money import Asset, Price, parse_price
from farebox.protocol.models import Offer, Resource
from farebox.schemes.evm_exact import SCHEME

__all__ = ["CardOffer", "PriceFunction", "RequestInfo", "Route", "RouteMatch", "RouteTable"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the gate knows of a request, independent of the framework that received it.

    ``headers`` has lower-case names; ``url`` is the full URL the client asked for.
    """

    method: str
    path: str
    url: str
    headers: Mapping[str, str]
    path_params: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


PriceFunction = Callable[[RequestInfo], Price]

_CURRENCY = re.compile(r"[a-z]{3}")


@dataclass(frozen=True, slots=True)
class CardOffer:
    """A route's card price for the MPP ``stripe`` method (see :mod:`farebox.rails.card`).

    ``amount`` is in minor units of ``currency``; ``None`` derives it exactly from the route's USD
    price (``"$0.25"`` is 25 cents; a price finer than a cent is refused). Below ``minimum`` no card
    method is offered (card fees make small charges uneconomic; x402 stays offered).
    ``network_id`` is the seller's Stripe profile (``profile_…``) and ``realm`` the challenges'
    protection space (the API's host, say). ``spt`` offers the MPP ``stripe`` charge (Shared Payment
    Tokens); ``invoice`` offers the X-Receipt pattern (each 402 names an invoice backed by a
    PaymentIntent the server created; see :mod:`farebox.rails.card`).
    """

    network_id: str
    realm: str
    currency: str = "usd"
    amount: int | None = None
    minimum: int = 50
    spt: bool = True
    invoice: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency.lower()):
            raise ConfigError("card currency must be a three-letter ISO 4217 code")
        object.__setattr__(self, "currency", self.currency.lower())
        for name in ("amount", "minimum"):
            value = getattr(self, name)
            if value is None and name == "amount":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"card {name} must be a non-negative int of minor units")
        if self.amount is not None and self.amount < 1:
            raise ConfigError("card amount must be positive")
        if not self.network_id or not self.realm:
            raise ConfigError("a card offer needs a network_id and a realm")
        if not self.spt and not self.invoice:
            raise ConfigError("a card offer needs spt or invoice (or both)")
        if self.amount is None and self.currency != "usd":
            raise ConfigError("only a usd card amount can be derived from the route's price")


@dataclass(frozen=True, slots=True)
class Route:
    """A paid route. ``assets`` are the tokens it accepts; ``price`` is in their common unit
    (``"$0.01"`` for USD-pegged tokens) or an int of atomic units when there is one asset.

    ``pay_to`` is all-lower or all-upper case hex, or carries its exact EIP-55 checksum: a
    mixed-case address with a wrong checksum (a typo) is a :class:`ConfigError`."""

    method: str
    path: str
    price: Price | PriceFunction
    assets: tuple[Asset, ...]
    pay_to: str
    description: str = ""
    mime_type: str = ""
    max_timeout_seconds: int = 300
    card: CardOffer | None = None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _static: tuple[int, ...] | None = field(init=False, repr=False, compare=False)
    _static_offers: tuple[Offer, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        method = self.method.upper()
        if method not in _METHODS:
            raise ConfigError(f"unknown HTTP method {self.method!r}")
        object.__setattr__(self, "method", method)
        if not self.path.startswith("/"):
            raise ConfigError(f"route path {self.path!r} must start with '/'")
        if not self.assets:
            raise ConfigError(f"route {method} {self.path} accepts no asset")
        object.__setattr__(self, "pay_to", checked_address(self.pay_to, "pay_to"))
        if not 6 < self.max_timeout_seconds <= 86_400:
            raise ConfigError("max_timeout_seconds must be between 7 and 86400")
        object.__setattr__(self, "_pattern", _compile(self.path))
        # A fixed price is parsed now, so a bad one fails at start-up, not on the first request.
        static = None
        if not callable(self.price):
            static = tuple(parse_price(self.price, asset) for asset in self.assets)
        object.__setattr__(self, "_static", static)
        object.__setattr__(self, "_static_offers", None)
        if static is not None:
            object.__setattr__(self, "_static_offers", self._make_offers(static))
            if self.card is not None:
                self._card_amount(static)  # a price finer than a cent fails at start-up

    @property
    def name(self) -> str:
        """``"GET /weather"``: how logs and the store name the route."""
        return f"{self.method} {self.path}"

    def amounts(self, request: RequestInfo) -> tuple[int, ...]:
        """The price in atomic units of each accepted asset, for this request."""
        if self._static is not None:
            return self._static
        price = self.price(request) if callable(self.price) else self.price
        return tuple(parse_price(price, asset) for asset in self.assets)

    def card_amount(self, request: RequestInfo) -> int | None:
        """The card price in minor units for this request, or ``None`` when no card is offered
        (no card offer, or a price below its minimum)."""
        card = self.card
        if card is None:
            return None
        amount = (
            card.amount if card.amount is not None else self._card_amount(self.amounts(request))
        )
        return amount if amount >= card.minimum else None

    def _card_amount(self, amounts: tuple[int, ...]) -> int:
        card = self.card
        if card is not None and card.amount is not None:
            return card.amount
        for asset, atomic in zip(self.assets, amounts, strict=True):
            if asset.peg == "USD":
                cents, rest = divmod(atomic * 100, 10**asset.decimals)
                if rest:
                    raise ConfigError(f"route {self.name}: price is finer than a cent for cards")
                return int(cents)
        raise ConfigError(f"route {self.name}: no USD price to derive a card amount from")

    def offers(self, request: RequestInfo) -> tuple[Offer, ...]:
        """One x402 ``exact`` offer per accepted asset."""
        if self._static_offers is not None:
            return self._static_offers
        return self._make_offers(self.amounts(request))

    def _make_offers(self, amounts: tuple[int, ...]) -> tuple[Offer, ...]:
        return tuple(
            Offer(
                scheme=SCHEME,
                network=asset.network,
                amount=amount,
                asset=asset.address,
                pay_to=self.pay_to,
                max_timeout_seconds=self.max_timeout_seconds,
                extra={"name": asset.name, "version": asset.version},
            )
            for asset, amount in zip(self.assets, amounts, strict=True)
        )

    def resource(self, request: RequestInfo) -> Resource:
        return Resource(url=request.url, description=self.description, mime_type=self.mime_type)


def _compile(path: str) -> re.Pattern[str]:
    # A trailing slash does not make another route: many servers (Express by default) serve
    # /weather/ as /weather, so a route priced without it that let /weather/ through would be
    # free under a second spelling. Charging the other spelling costs nothing where it 404s.
    given = path
    if path != "/":
        path = path.removesuffix("/")
    out, last = [], 0
    for match in _PARAM.finditer(path):
        out.append(re.escape(path[last : match.start()]))
        name, kind = match.group(1), match.group(2)
        out.append(f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)")
        last = match.end()
    out.append(re.escape(path[last:]))
    try:
        # Case-insensitive for the same reason: Express, IIS and many file servers serve
        # /WEATHER as /weather. Parameters keep the case they were sent in.
        return re.compile("".join(out) + (r"\Z" if path == "/" else r"/?\Z"), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"bad route path {given!r}: {exc}") from None


def _spellings(path: str) -> tuple[str, ...]:
    """``path``, and without its segments' ``;`` parameters when it has any."""
    if ";" not in path:
        return (path,)
    return path, "/".join(segment.partition(";")[0] for segment in path.split("/"))


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    params: Mapping[str, str]


class RouteTable:
    """Paid routes, matched in the order they were added; anything unmatched is free.

    ``HEAD`` matches a ``GET`` route (it is answered like ``GET`` without a body). A path matches
    with or without one trailing slash (``/weather/`` is the ``/weather`` route, and the other way
    round), in any letter case, and with ``;`` parameters dropped from its segments
    (``/weather;jsessionid=1`` is ``/weather``, as servlet containers read it): every spelling
    some server serves as the priced resource is priced. Faces hand over the normalized path
    (:mod:`farebox.server.target`).
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: list[Route] = list(routes)

    def add(
        self,
        method: str,
        path: str,
        price: Price | PriceFunction,
        *,
        assets: Asset | Sequence[Asset],
        pay_to: str,
        description: str = "",
        mime_type: str = "",
        max_timeout_seconds: int = 300,
        card: CardOffer | None = None,
    ) -> Route:
        """Add a paid route and return it."""
        route = Route(
            method,
            path,
            price,
            (assets,) if isinstance(assets, Asset) else tuple(assets),
            pay_to,
            description,
            mime_type,
            max_timeout_seconds,
            card,
        )
        self._routes.append(route)
        return route

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The first route for ``method`` and ``path``, or ``None`` (a free request)."""
        method = method.upper()
        for spelling in _spellings(path):
            for route in self._routes:
                same = route.method in ("*", method) or (method == "HEAD" and route.method == "GET")
                if not same:
                    continue
                found = route._pattern.match(spelling)
                if found is not None:
                    return RouteMatch(route, MappingProxyType(found.groupdict()))
        return None

    def methods_at(self, path: str) -> frozenset[str]:
        """The methods some route prices at ``path`` (``"*"`` when one prices every method)."""
        return frozenset(
            route.method
            for spelling in _spellings(path)
            for route in self._routes
            if route._pattern.match(spelling)
        )

    def __iter__(self) -> Any:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)
