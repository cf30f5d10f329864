"""The replies the gate hands its faces, and the headers every paid reply carries."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from farebox._wire import PEAC_RECEIPT
from farebox.protocol import mpp
from farebox.protocol.x402 import PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE
from farebox.rails.base import Headers

__all__ = ["EXPOSE", "EXPOSED_HEADERS", "PEAC_RECEIPT", "Reply", "merge_headers"]

logger = logging.getLogger("farebox.server")

# Browsers hide response headers from scripts unless the server lists them.
EXPOSED_HEADERS = ", ".join(
    (
        PAYMENT_REQUIRED,
        PAYMENT_RESPONSE,
        X_PAYMENT_RESPONSE,
        PEAC_RECEIPT,
        mpp.WWW_AUTHENTICATE,
        mpp.PAYMENT_RECEIPT,
    )
)
#: The header that lists them.
EXPOSE = ("access-control-expose-headers", EXPOSED_HEADERS)


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete response the face sends instead of running (or instead of finishing) the app."""

    status: int
    headers: Headers
    body: bytes


def merge_headers(app_headers: Iterable[tuple[str, str]], added: Headers) -> list[tuple[str, str]]:
    """The app's headers with the payment headers added; a paid response is never shared-cached."""
    out: list[tuple[str, str]] = []
    cache_control = None
    for name, value in app_headers:
        lowered = name.lower()
        if lowered == "cache-control":
            cache_control = value
            continue
        if lowered == "access-control-expose-headers":
            continue
        out.append((name, value))
    keep = cache_control is not None and any(
        d.strip().lower() in ("no-store", "private") for d in cache_control.split(",")
    )
    out.append(("cache-control", cache_control if keep and cache_control else "private"))
    out.extend(added)
    return out
