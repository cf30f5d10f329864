"""A paid API from a TOML file: the routes, their prices, who gets paid and how payments settle.

:func:`load_config` reads and validates the file into a frozen :class:`ServerConfig` (every mistake
is a :class:`~farebox.errors.ConfigError` naming its key, e.g. ``routes[2].price: ...``; unknown
keys are mistakes too, so a typo never passes silently). :func:`build_app` turns it into an ASGI
app: the gate in front of a reverse proxy to ``server.upstream``, or in front of a small built-in
app. The schema::

    [server]
    issuer = "https://api.example.com"  # optional: an https origin; else records are signed as
                                        #   the receipt key's did:key
    receipt_key = "receipts.key"        # optional Ed25519 key file; created (0600) if missing.
                                        #   Without it, a fresh key per start (needs no issuer).
    store = "payments.sqlite"           # required: a SQLite file, "memory", or a shared store's URL:
                                        # postgresql://... or redis://... (for many instances)
    upstream = "http://127.0.0.1:9000"  # optional: proxy every request to this URL
    upstream_timeout = 30               # optional, seconds (connect, and each wait for bytes)
    log_challenges = true               # optional: log each 402 challenge (it is counted anyway
                                        #   while true; false writes nothing for a 402)
    traffic_retention = 86400           # optional, seconds the reconciler keeps challenge,
                                        #   refusal and replay events (their daily counts stay)
    traffic_keep = 100000               # optional: at most this many of those events are kept

    [payment]
    network = "eip155:84532"            # CAIP-2, or "devchain" for the embedded chain
    asset = "0x036C..."                 # optional: the network's default USDC
    pay_to = "0x..."                    # required: the merchant's address
                                        # (addresses: all-lower or all-upper case hex, or with
                                        #   their exact EIP-55 checksum; a wrong one is an error)

    [settlement]                        # exactly one of ledger, rpc_url, facilitator
    ledger = "embedded"                 # the in-process chain (network "devchain"), settling
                                        #   with development account #1
    rpc_url = "https://sepolia.base.org"  # a node; with settler_key = "settler.key" (hex key
                                          #   file of the account paying the gas)
    facilitator = "https://x402.org/facilitator"  # an x402 facilitator; token_env optionally
                                                  #   names the variable holding its bearer token
                                                  #   (default: FAREBOX_FACILITATOR_TOKEN if set)
    timeout = 15                        # optional, seconds per call to the node or facilitator
    reconcile_rpc_url = "https://..."   # optional, with facilitator: a node to read the chain
                                        #   from, to resolve payments whose settlement was pending

    [[routes]]                          # one or more
    method = "GET"                      # optional, GET by default; "*" for any
    path = "/reports/{id}"              # {name} is one segment, {name:path} the rest
    price = "$0.01"                     # "$0.01", "0.01 USDC", or an int of atomic units
    description = "A report"            # optional
    mime_type = "application/json"      # optional
    max_timeout_seconds = 300           # optional
    content = '{"ok": true}'            # optional, without upstream: the paid body to serve
    card = true                         # optional, default false: also take cards ([card] needed)
    card_amount = 25                    # optional, minor units; default: derived from the USD price
    card_invoice = true                 # optional, default false: X-Receipt invoices
    card_spt = true                     # optional, default true: MPP Shared Payment Tokens

    [card]                              # optional: card payments through Stripe (farebox[stripe])
    network_id = "profile_..."          # required: the seller's Stripe profile (MPP networkId)
    realm = "api.example.com"           # optional; default: the issuer's host, else "farebox"
    currency = "usd"                    # optional
    minimum = 50                        # optional, minor units: below it no card method is offered
    secret_key_env = "STRIPE_SECRET_KEY"  # optional: the variable holding the Stripe secret key
                                          #   (never in the file); must be set
    challenge_secret_env = "FAREBOX_CARD_SECRET"  # optional: the variable with the challenge HMAC
                                          #   secret (hex, >= 32 bytes); required with several
                                          #   workers or instances; else FAREBOX_CARD_SECRET if
                                          #   set, else random per start (logged as a warning)
    api_base = "http://127.0.0.1:12111"  # optional: a Stripe-compatible API base; default Stripe's
    stripe_version = "..."              # optional, default farebox.ledgers.stripe's preview version
    spt_parameter = "top_level"         # optional: or "payment_method_data"
    lifetime = 300                      # optional, seconds a challenge may be answered
    invoice_lifetime = 900              # optional, seconds an X-Receipt invoice stays payable
    require_client_secret = false       # optional: accept only the client secret as an X-Receipt

Relative paths are resolved against the config file's folder. ``X402_FACILITATOR_URL`` (the x402
tools' variable) supplies the facilitator when ``[settlement]`` is absent and overrides a
configured ``facilitator``; it never replaces an explicit ``ledger`` or ``rpc_url`` (a stray
variable must not move settlement elsewhere). ``load_config(..., facilitator=URL)`` (the
``--facilitator`` option) overrides everything.

The package: :mod:`~farebox.config.schema` holds the validated types and the reading (the
``[card]`` table in :mod:`~farebox.config.card`), :mod:`~farebox.config.build` the objects built
from a checked config (keys, store, ledger or facilitator, card rail, gate, the ASGI apps).
"""

from farebox.config.build import (
    CONFIG_ENV,
    FareboxApp,
    app_from_env,
    build_app,
    card_ledger,
    open_store,
)
from farebox.config.build import EMBEDDED_SETTLER as EMBEDDED_SETTLER
from farebox.config.card import CARD_SECRET_ENV, STRIPE_KEY_ENV, CardConfig
from farebox.config.schema import (
    FACILITATOR_ENV,
    FACILITATOR_TOKEN_ENV,
    EmbeddedSettlement,
    FacilitatorSettlement,
    RouteConfig,
    RpcSettlement,
    ServerConfig,
    Settlement,
    load_config,
    parse_config,
)

__all__ = [
    "CARD_SECRET_ENV",
    "CONFIG_ENV",
    "FACILITATOR_ENV",
    "FACILITATOR_TOKEN_ENV",
    "STRIPE_KEY_ENV",
    "CardConfig",
    "EmbeddedSettlement",
    "FacilitatorSettlement",
    "FareboxApp",
    "RouteConfig",
    "RpcSettlement",
    "ServerConfig",
    "Settlement",
    "app_from_env",
    "build_app",
    "card_ledger",
    "load_config",
    "open_store",
    "parse_config",
]
