"""The ``[card]`` table (card payments through Stripe) and a route's ``card*`` options, read into
a :class:`CardConfig` and :class:`~farebox.server.routes.CardOffer` (see :mod:`farebox.config` for
the schema). Secrets are read from the environment variables the file names, never from the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from farebox.config._read import _check_url, _only, _string, _table
from farebox.errors import ConfigError
from farebox.server.routes import CardOffer

# Variable names, not secrets.
STRIPE_KEY_ENV = "STRIPE_SECRET_KEY"
CARD_SECRET_ENV = "FAREBOX_CARD_SECRET"  # noqa: S105

_MIN_CARD_SECRET = 32
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class CardConfig:
    """The ``[card]`` section: card payments through Stripe.

    ``secret_key`` is the Stripe secret key read from the variable ``secret_key_env`` names;
    ``challenge_secret`` the challenge HMAC secret (``None``: random per start). Neither appears in
    the repr. ``stripe_version`` ``None`` is the ledger's pinned preview version; ``api_base``
    ``None`` is Stripe's own API.
    """

    network_id: str
    realm: str
    secret_key: str = field(repr=False)
    secret_key_env: str = STRIPE_KEY_ENV
    challenge_secret: bytes | None = field(default=None, repr=False)
    challenge_secret_env: str | None = None
    currency: str = "usd"
    minimum: int = 50
    api_base: str | None = None
    stripe_version: str | None = None
    spt_parameter: str = "top_level"
    lifetime: float = 300.0
    invoice_lifetime: float = 900.0
    require_client_secret: bool = False


def _card(
    document: Mapping[str, Any], issuer: str | None, env: Mapping[str, str]
) -> CardConfig | None:
    if "card" not in document:
        return None
    table = _table(document, "card", required=True)
    _only(
        table,
        "card",
        {
            "network_id",
            "realm",
            "currency",
            "minimum",
            "secret_key_env",
            "challenge_secret_env",
            "api_base",
            "stripe_version",
            "spt_parameter",
            "lifetime",
            "invoice_lifetime",
            "require_client_secret",
        },
    )
    network_id = _string(table, "card.network_id", "network_id")
    if network_id is None:
        raise ConfigError('card.network_id: required: the seller\'s Stripe profile ("profile_...")')
    realm = _string(table, "card.realm", "realm")
    if realm is None:
        realm = (urlsplit(issuer).hostname if issuer else None) or "farebox"
    currency = (_string(table, "card.currency", "currency") or "usd").lower()
    if not re.fullmatch(r"[a-z]{3}", currency):
        raise ConfigError(f"card.currency: {currency!r} is not a three-letter ISO 4217 code")
    minimum = table.get("minimum", 50)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise ConfigError("card.minimum: must be a non-negative integer of minor units")
    key_env = _env_name(table, "card.secret_key_env", "secret_key_env") or STRIPE_KEY_ENV
    secret_key = env.get(key_env)
    if not secret_key:
        # Name the variable, never a value.
        raise ConfigError(
            f"card.secret_key_env: environment variable {key_env} (the Stripe secret key) is not set"
        )
    secret_env = _env_name(table, "card.challenge_secret_env", "challenge_secret_env")
    challenge_secret: bytes | None = None
    if secret_env is not None or env.get(CARD_SECRET_ENV):
        name = secret_env or CARD_SECRET_ENV
        text = env.get(name)
        if not text:
            raise ConfigError(f"card.challenge_secret_env: environment variable {name} is not set")
        try:
            challenge_secret = bytes.fromhex(text.strip())
        except ValueError:
            raise ConfigError(
                f"card.challenge_secret_env: {name} must hold hex (e.g. openssl rand -hex 32)"
            ) from None
        if len(challenge_secret) < _MIN_CARD_SECRET:
            raise ConfigError(
                f"card.challenge_secret_env: {name} must hold at least {_MIN_CARD_SECRET} bytes "
                f"({2 * _MIN_CARD_SECRET} hex digits)"
            )
        secret_env = name
    api_base = _string(table, "card.api_base", "api_base")
    if api_base is not None:
        _check_url(api_base, "card.api_base")
        parts = urlsplit(api_base)
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError("card.api_base: must be a bare http(s) base URL")
        api_base = api_base.rstrip("/")
    stripe_version = _string(table, "card.stripe_version", "stripe_version")
    spt_parameter = _string(table, "card.spt_parameter", "spt_parameter") or "top_level"
    if spt_parameter not in ("top_level", "payment_method_data"):
        raise ConfigError(
            f'card.spt_parameter: {spt_parameter!r} is not "top_level" or "payment_method_data"'
        )
    lifetime = _card_seconds(table, "lifetime", 300, 86_400)
    invoice_lifetime = _card_seconds(table, "invoice_lifetime", 900, 7 * 86_400)
    require_secret = table.get("require_client_secret", False)
    if not isinstance(require_secret, bool):
        raise ConfigError("card.require_client_secret: must be true or false")
    return CardConfig(
        network_id=network_id,
        realm=realm,
        secret_key=secret_key,
        secret_key_env=key_env,
        challenge_secret=challenge_secret,
        challenge_secret_env=secret_env,
        currency=currency,
        minimum=minimum,
        api_base=api_base,
        stripe_version=stripe_version,
        spt_parameter=spt_parameter,
        lifetime=lifetime,
        invoice_lifetime=invoice_lifetime,
        require_client_secret=require_secret,
    )


def _env_name(table: Mapping[str, Any], where: str, key: str) -> str | None:
    name = _string(table, where, key)
    if name is not None and not _ENV_NAME.fullmatch(name):
        # Someone pasted the secret itself here: do not repeat it.
        raise ConfigError(f"{where}: must name an environment variable (letters, digits, _)")
    return name


def _card_seconds(table: Mapping[str, Any], key: str, default: float, most: int) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"card.{key}: must be a number of seconds")
    if not (math.isfinite(value) and 0 < value <= most):
        raise ConfigError(f"card.{key}: must be more than 0 and at most {most} seconds")
    return float(value)


def _card_offer(item: Mapping[str, Any], where: str, card: CardConfig | None) -> CardOffer | None:
    options = ("card", "card_amount", "card_invoice", "card_spt")
    wanted = item.get("card", False)
    if not isinstance(wanted, bool):
        raise ConfigError(f"{where}.card: must be true or false")
    for option in ("card_invoice", "card_spt"):
        if option in item and not isinstance(item[option], bool):
            raise ConfigError(f"{where}.{option}: must be true or false")
    amount = item.get("card_amount")
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int) or amount < 1
    ):
        raise ConfigError(f"{where}.card_amount: must be a positive integer of minor units")
    used = [option for option in options if option in item]
    if used and card is None:
        raise ConfigError(f"{where}.{used[0]}: card payments need a [card] section")
    if not wanted:
        extra = [option for option in used if option != "card"]
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: only used with card = true")
        return None
    assert card is not None
    try:
        return CardOffer(
            network_id=card.network_id,
            realm=card.realm,
            currency=card.currency,
            amount=amount,
            minimum=card.minimum,
            spt=item.get("card_spt", True),
            invoice=item.get("card_invoice", False),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}.card: {exc}") from None
