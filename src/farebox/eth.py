"""Ethereum primitives: keccak-256, addresses (EIP-55), and a local secp256k1 account.

Pure computation on bytes and strings; no node, no RPC. coincurve (libsecp256k1) does the curve work
because signature recovery there takes tens of microseconds, where pure-Python code takes milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import coincurve
from sha3 import keccak_256 as _keccak_256

from farebox.errors import ConfigError

__all__ = [
    "SECP256K1_HALF_N",
    "SECP256K1_N",
    "UINT256_MAX",
    "EvmAccount",
    "address_bytes",
    "checked_address",
    "checksum_address",
    "is_address",
    "keccak256",
    "parse_uint256",
]

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
# Signatures with s above n/2 are malleable twins; EIP-2 and USDC's ECRecover refuse them.
SECP256K1_HALF_N = SECP256K1_N // 2

UINT256_MAX = 2**256 - 1

_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}\Z")


def keccak256(data: bytes) -> bytes:
    """Keccak-256 (Ethereum's hash, not NIST SHA3-256)."""
    digest: bytes = _keccak_256(data).digest()
    return digest


def parse_uint256(value: object) -> int | None:
    """A canonical decimal uint256 string as an int, else ``None``.

    Canonical: ASCII digits only (``str.isdigit`` alone admits other scripts' digits, which
    ``int`` would read), no sign, no leading zero, at most 2**256 - 1.
    """
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= 78
        or not value.isascii()
        or not value.isdigit()
        or (value[0] == "0" and len(value) > 1)
    ):
        return None
    number = int(value)
    return number if number <= UINT256_MAX else None


def is_address(value: object) -> bool:
    """Whether ``value`` is a ``0x``-prefixed 20-byte hex string (any letter case)."""
    return isinstance(value, str) and _ADDRESS_RE.match(value) is not None


def address_bytes(value: str) -> bytes:
    """The 20 bytes of a hex address; raises ``ValueError`` for anything else."""
    if not is_address(value):
        raise ValueError("not a 0x-prefixed 20-byte hex address")
    return bytes.fromhex(value[2:])


def checksum_address(value: str | bytes) -> str:
    """EIP-55 mixed-case form of an address given as hex or 20 raw bytes."""
    raw = value if isinstance(value, bytes) else address_bytes(value)
    if len(raw) != 20:
        raise ValueError("an address is 20 bytes")
    hex_lower = raw.hex()
    digest = keccak256(hex_lower.encode("ascii")).hex()
    # A letter is upper-cased where the matching nibble of the hash is 8 or more; digits ignore it.
    return "0x" + "".join(
        ch.upper() if nibble in "89abcdef" else ch
        for ch, nibble in zip(hex_lower, digest, strict=False)
    )


def checked_address(value: object, what: str = "address") -> str:
    """The EIP-55 form of an address a person wrote (a route's payTo, a config key, a policy).

    All-lower and all-upper hex carry no checksum and are taken as they are, as EIP-55 says; a
    mixed-case address must carry its checksum exactly, else :class:`~farebox.errors.ConfigError`
    names ``what`` and the address: one mistyped character would otherwise be re-checksummed into
    a valid address nobody holds, and the money sent there is lost. Addresses read from the wire
    (a peer's offer or proof) are protocol input and are not read through this.
    """
    if not isinstance(value, str) or not is_address(value):
        shown = (
            repr(value[:80])
            if isinstance(value, str)
            else f"a value of type {type(value).__name__}"
        )
        raise ConfigError(f"{what}: {shown} is not a 0x-prefixed 20-byte hex address")
    checksummed = checksum_address(value)
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and value != checksummed:
        # The correct checksum of the typed hex is not shown: it would invite pasting it back,
        # which re-validates the typo.
        raise ConfigError(
            f"{what}: {value} has a wrong EIP-55 checksum: check the address; a mixed-case "
            "address must carry its EIP-55 checksum (all-lower or all-upper case hex has none)"
        )
    return checksummed


def public_key_address(public_key: coincurve.PublicKey) -> bytes:
    """The 20-byte address of a secp256k1 public key."""
    return keccak256(public_key.format(compressed=False)[1:])[-20:]


class EvmAccount:
    """A secp256k1 key that signs 32-byte digests the Ethereum way (65 bytes, ``v`` 27/28).

    The private key stays inside: ``repr`` and ``str`` show only the address, and no error
    message includes it.
    """

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes) -> None:
        if len(private_key) != 32:
            raise ConfigError("an EVM private key is 32 bytes")
        try:
            self._key = coincurve.PrivateKey(private_key)
        except Exception as exc:
            raise ConfigError("invalid EVM private key (out of the curve's range)") from exc
        self.address: str = checksum_address(public_key_address(self._key.public_key))

    @classmethod
    def from_hex(cls, value: str) -> EvmAccount:
        """An account from a hex private key, with or without ``0x``."""
        text = value.strip()
        if text.startswith(("0x", "0X")):
            text = text[2:]
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
            raise ConfigError("an EVM private key is 64 hex digits")
        return cls(bytes.fromhex(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> EvmAccount:
        """An account from a file holding the hex private key."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read EVM key file {os.fspath(path)!r}") from exc
        return cls.from_hex(text)

    @classmethod
    def generate(cls) -> EvmAccount:
        """A fresh random account."""
        return cls(coincurve.PrivateKey().secret)

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest: ``r || s || v`` with low ``s`` and ``v`` in {27, 28}."""
        if len(digest) != 32:
            raise ValueError("a digest is 32 bytes")
        sig = self._key.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes([sig[64] + 27])

    def __repr__(self) -> str:
        return f"EvmAccount({self.address})"

    __str__ = __repr__
