#pragma version 0.4.3
#pragma evm-version cancun
#pragma optimize gas
"""
@title USD Coin look-alike for development chains
@license Apache-2.0
@notice An ERC-20 with EIP-3009 (`transferWithAuthorization`, `receiveWithAuthorization`,
        `cancelAuthorization`) using the ABI, selectors, EIP-712 domain, check order and
        revert texts of Circle's FiatTokenV2_2 (USDC), so that x402 facilitators treat it
        exactly as they treat USDC. Not USDC: no proxy, pausing, blacklist or minter roles;
        the owner mints.
@dev The name, symbol and owner are immutables (kept in the runtime code, not in storage),
     so the deployed runtime code can be copied to any address (anvil_setCode) and work
     there, with the EIP-712 domain of that address: DOMAIN_SEPARATOR is computed on each
     call from chain.id and self, as FiatTokenV2_2 does.
"""

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

event Mint:
    minter: indexed(address)
    to: indexed(address)
    amount: uint256

event AuthorizationUsed:
    authorizer: indexed(address)
    nonce: indexed(bytes32)

event AuthorizationCanceled:
    authorizer: indexed(address)
    nonce: indexed(bytes32)


# keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
EIP712_DOMAIN_TYPEHASH: constant(bytes32) = 0x8b73c3c69bb8fe3d512ecc4cf759cc79239f7b179b0ffacaa9a75d522b39400f
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: public(constant(bytes32)) = 0x7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267
RECEIVE_WITH_AUTHORIZATION_TYPEHASH: public(constant(bytes32)) = 0xd099cc98ef71107a616c4f0f941f04c322d8e254fe26b3c6668db87aae413de8
CANCEL_AUTHORIZATION_TYPEHASH: public(constant(bytes32)) = 0x158b0a9edf7a828aad02f63cd515c68ef2f50ba807396f6d12842833a1597429

# The EIP-712 domain version of FiatTokenV2 and later.
VERSION: constant(String[1]) = "2"
# secp256k1n / 2: a larger s is the malleable twin of a valid signature (EIP-2).
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168

name: public(immutable(String[64]))
symbol: public(immutable(String[32]))
owner: public(immutable(address))
decimals: public(constant(uint8)) = 6
# keccak256(name), kept so that DOMAIN_SEPARATOR costs one hash of fixed-size words.
NAME_HASH: immutable(bytes32)

totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
_authorization_states: HashMap[address, HashMap[bytes32, bool]]


@deploy
def __init__(token_name: String[64], token_symbol: String[32]):
    name = token_name
    symbol = token_symbol
    owner = msg.sender
    NAME_HASH = keccak256(token_name)


@external
@pure
def version() -> String[1]:
    return VERSION


@external
@view
def DOMAIN_SEPARATOR() -> bytes32:
    return self._domain_separator()


@external
@view
def authorizationState(authorizer: address, nonce: bytes32) -> bool:
    return self._authorization_states[authorizer][nonce]


# --- ERC-20 -----------------------------------------------------------------------------------


@external
def transfer(to: address, amount: uint256) -> bool:
    self._transfer(msg.sender, to, amount)
    return True


@external
def transferFrom(sender: address, to: address, amount: uint256) -> bool:
    # As FiatTokenV2_2: the allowance check comes first and the maximum allowance is not
    # treated as infinite.
    allowed: uint256 = self.allowance[sender][msg.sender]
    assert amount <= allowed, "ERC20: transfer amount exceeds allowance"
    self._transfer(sender, to, amount)
    self.allowance[sender][msg.sender] = allowed - amount
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self._approve(msg.sender, spender, amount)
    return True


@external
def mint(to: address, amount: uint256) -> bool:
    assert msg.sender == owner, "FiatToken: caller is not a minter"
    assert to != empty(address), "FiatToken: mint to the zero address"
    assert amount > 0, "FiatToken: mint amount not greater than 0"
    self.totalSupply += amount
    self.balanceOf[to] += amount
    log Mint(minter=msg.sender, to=to, amount=amount)
    log Transfer(sender=empty(address), receiver=to, value=amount)
    return True


# --- EIP-3009 ---------------------------------------------------------------------------------


@external
def transferWithAuthorization(
    sender: address,
    to: address,
    amount: uint256,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    self._require_valid_authorization(sender, nonce, validAfter, validBefore)
    struct_hash: bytes32 = keccak256(
        abi_encode(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, sender, to, amount, validAfter, validBefore, nonce
        )
    )
    assert self._recover(struct_hash, v, r, s) == sender, "FiatTokenV2: invalid signature"
    self._mark_authorization_as_used(sender, nonce)
    self._transfer(sender, to, amount)


@external
def receiveWithAuthorization(
    sender: address,
    to: address,
    amount: uint256,
    validAfter: uint256,
    validBefore: uint256,
    nonce: bytes32,
    v: uint8,
    r: bytes32,
    s: bytes32,
):
    # The payee must submit it, so that nobody can front-run the payee's own contract call.
    assert to == msg.sender, "FiatTokenV2: caller must be the payee"
    self._require_valid_authorization(sender, nonce, validAfter, validBefore)
    struct_hash: bytes32 = keccak256(
        abi_encode(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, sender, to, amount, validAfter, validBefore, nonce
        )
    )
    assert self._recover(struct_hash, v, r, s) == sender, "FiatTokenV2: invalid signature"
    self._mark_authorization_as_used(sender, nonce)
    self._transfer(sender, to, amount)


@external
def cancelAuthorization(authorizer: address, nonce: bytes32, v: uint8, r: bytes32, s: bytes32):
    self._require_unused_authorization(authorizer, nonce)
    struct_hash: bytes32 = keccak256(abi_encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce))
    assert self._recover(struct_hash, v, r, s) == authorizer, "FiatTokenV2: invalid signature"
    self._authorization_states[authorizer][nonce] = True
    log AuthorizationCanceled(authorizer=authorizer, nonce=nonce)


# --- internals --------------------------------------------------------------------------------


@internal
@view
def _domain_separator() -> bytes32:
    return keccak256(
        abi_encode(EIP712_DOMAIN_TYPEHASH, NAME_HASH, keccak256(VERSION), chain.id, self)
    )


@internal
@view
def _recover(struct_hash: bytes32, v: uint8, r: bytes32, s: bytes32) -> address:
    # USDC's ECRecover library: refuse malleable signatures and v outside {27, 28}, and a
    # signature that recovers to nobody, with its revert texts.
    assert convert(s, uint256) <= HALF_N, "ECRecover: invalid signature 's' value"
    assert v == 27 or v == 28, "ECRecover: invalid signature 'v' value"
    digest: bytes32 = keccak256(concat(b"\x19\x01", self._domain_separator(), struct_hash))
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "ECRecover: invalid signature"
    return signer


@internal
@view
def _require_unused_authorization(authorizer: address, nonce: bytes32):
    assert not self._authorization_states[authorizer][nonce], "FiatTokenV2: authorization is used or canceled"


@internal
@view
def _require_valid_authorization(
    authorizer: address, nonce: bytes32, validAfter: uint256, validBefore: uint256
):
    assert block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid"
    assert block.timestamp < validBefore, "FiatTokenV2: authorization is expired"
    self._require_unused_authorization(authorizer, nonce)


@internal
def _mark_authorization_as_used(authorizer: address, nonce: bytes32):
    self._authorization_states[authorizer][nonce] = True
    log AuthorizationUsed(authorizer=authorizer, nonce=nonce)


@internal
def _transfer(sender: address, to: address, amount: uint256):
    assert sender != empty(address), "ERC20: transfer from the zero address"
    assert to != empty(address), "ERC20: transfer to the zero address"
    balance: uint256 = self.balanceOf[sender]
    assert amount <= balance, "ERC20: transfer amount exceeds balance"
    self.balanceOf[sender] = balance - amount
    self.balanceOf[to] += amount
    log Transfer(sender=sender, receiver=to, value=amount)


@internal
def _approve(holder: address, spender: address, amount: uint256):
    assert holder != empty(address), "ERC20: approve from the zero address"
    assert spender != empty(address), "ERC20: approve to the zero address"
    self.allowance[holder][spender] = amount
    log Approval(owner=holder, spender=spender, value=amount)
