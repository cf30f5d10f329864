"""Fixed keys and a known asset for tests. PUBLIC: never use them for real money.

Every key here is printed in public documents, so anyone can sign with it: a test that uses them is
reproducible (the same payer, the same receipt issuer, run after run), and nothing paid to or from
them is safe. A server that sees :data:`TEST_PAYER` or :data:`TEST_SIGNING_KEY` outside a test is
misconfigured.
"""

from __future__ import annotations

from typing import Final

from farebox.eth import EvmAccount
from farebox.money import DEVCHAIN_USDC, Asset
from farebox.receipts import SigningKey

__all__ = [
    "TEST_ASSET",
    "TEST_CARD_SECRET",
    "TEST_NETWORK",
    "TEST_PAYER",
    "TEST_PAYER_KEY",
    "TEST_PAY_TO",
    "TEST_SIGNING_KEY",
    "TEST_SIGNING_SEED",
]

#: The payer's private key: account #3 of the standard development mnemonic ("test test ... junk",
#: ``m/44'/60'/0'/0/3``), printed by every Ethereum development tool. It is also the payer of
#: ``farebox demo``, and holds test USDC on farebox's embedded chain, so the same account pays a
#: fake facilitator and a real (development) chain alike.
TEST_PAYER_KEY: Final = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6"
#: The test payer (``0x90F79bf6EB2c4f870365E785982E1f101E93b906``).
TEST_PAYER: Final = EvmAccount.from_hex(TEST_PAYER_KEY)
#: A merchant address to put in routes' ``pay_to``: account #2 of the same mnemonic (the demo's).
TEST_PAY_TO: Final = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"

#: The receipt signing key's Ed25519 seed: RFC 8032 section 7.1, TEST 1 (a published test vector).
TEST_SIGNING_SEED: Final = bytes.fromhex(
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
)
#: A fixed PEAC receipt signing key: receipts it signs verify against its ``public_key``.
TEST_SIGNING_KEY: Final = SigningKey.from_seed(TEST_SIGNING_SEED)

#: A fixed card challenge secret for :class:`~farebox.CardRail` (it needs 32 bytes).
TEST_CARD_SECRET: Final = b"farebox.testing card secret: PUBLIC, for tests only"

#: The test asset: the embedded chain's USDC (6 decimals, USD-pegged), known to farebox's registry,
#: so receipts name it as USDC and mark it ``env: test``.
TEST_ASSET: Final[Asset] = DEVCHAIN_USDC
#: The test asset's network (CAIP-2).
TEST_NETWORK: Final = DEVCHAIN_USDC.network
