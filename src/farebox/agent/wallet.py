"""The agent's signing key: from a file or the environment, never printed."""

from __future__ import annotations

import os

from farebox.errors import ConfigError
from farebox.eth import EvmAccount

__all__ = ["KEY_ENV", "load_wallet"]

KEY_ENV = "FAREBOX_PRIVATE_KEY"


def load_wallet(
    key_file: str | os.PathLike[str] | None = None, *, env: str = KEY_ENV
) -> EvmAccount:
    """The agent's EVM account: from ``key_file`` when given, else from the ``env`` variable.

    Errors name where the key was looked for, never the key.
    """
    if key_file is not None:
        return EvmAccount.from_file(key_file)
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"no EVM key: pass a key file or set {env}")
    try:
        return EvmAccount.from_hex(value)
    except ConfigError:
        raise ConfigError(f"{env} does not hold a 32-byte hex private key") from None
