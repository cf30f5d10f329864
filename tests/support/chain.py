"""Money on the embedded chain for a test: a funded payer of its own, USDC sent, an authorization
canceled, an offer of the chain's USDC.

Each test makes its own payer (funded from development account #9), so tests sharing the
session's chain never share a balance.
"""

from __future__ import annotations

from farebox.dev.devchain import DevChain
from farebox.eth import EvmAccount, address_bytes, keccak256
from farebox.protocol.models import Offer
from farebox.schemes.evm_exact import chain_id_of, domain_separator

__all__ = ["cancel_on_chain", "fund", "offer_on", "send_usdc"]


def send_usdc(chain: DevChain, to: str, amount: int) -> None:
    """Send ``amount`` atomic USDC to ``to`` from development account #9."""
    data = (
        "0xa9059cbb"  # transfer(address,uint256)
        + to[2:].lower().rjust(64, "0")
        + amount.to_bytes(32, "big").hex()
    )
    sender = chain.accounts[9].address
    call = {"from": sender, "to": chain.token, "data": data, "gas": hex(100_000)}
    chain.handle("eth_sendTransaction", [call])


def fund(chain: DevChain, amount: int = 1_000_000) -> EvmAccount:
    """A fresh payer holding ``amount`` atomic USDC (sent by development account #9)."""
    payer = EvmAccount.generate()
    if amount:
        send_usdc(chain, payer.address, amount)
    return payer


def cancel_on_chain(chain: DevChain, payer: EvmAccount, nonce: bytes) -> None:
    """The payer cancels its authorization ``nonce`` (EIP-3009 ``cancelAuthorization``)."""
    asset = chain.asset
    separator = domain_separator(asset.name, asset.version, chain_id_of(asset.network), chain.token)
    typehash = keccak256(b"CancelAuthorization(address authorizer,bytes32 nonce)")
    struct_hash = keccak256(typehash + address_bytes(payer.address).rjust(32, b"\0") + nonce)
    signature = payer.sign_digest(keccak256(b"\x19\x01" + separator + struct_hash))
    selector = keccak256(b"cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)")[:4]
    data = (
        selector
        + address_bytes(payer.address).rjust(32, b"\0")
        + nonce
        + signature[64:].rjust(32, b"\0")
        + signature[:64]
    )
    sender = chain.accounts[9].address
    call = {"from": sender, "to": chain.token, "data": "0x" + data.hex(), "gas": hex(100_000)}
    chain.handle("eth_sendTransaction", [call])


def offer_on(chain: DevChain, pay_to: str, amount: int = 10_000) -> Offer:
    """An ``exact`` offer of ``amount`` of the chain's USDC to ``pay_to``."""
    asset = chain.asset
    return Offer(
        "exact",
        asset.network,
        amount,
        asset.address,
        pay_to,
        extra={"name": asset.name, "version": asset.version},
    )
