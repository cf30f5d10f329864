"""farebox: charge AI agents per request with HTTP 402, and let agents pay within limits."""

from farebox.errors import ConfigError, FareboxError, PaymentError, ReceiptError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FareboxError",
    "PaymentError",
    "ReceiptError",
    "__version__",
]
