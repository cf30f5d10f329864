import pytest

from farebox.errors import ConfigError
from farebox.eth import SECP256K1_HALF_N, EvmAccount, checksum_address, is_address, keccak256

HARDHAT_0 = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def test_keccak256_is_ethereum_keccak_not_sha3() -> None:
    assert (
        keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )


@pytest.mark.parametrize(
    "address",
    [
        # The examples of EIP-55 itself.
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
        "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
    ],
)
def test_checksum_address_follows_eip55(address: str) -> None:
    assert checksum_address(address.lower()) == address
    assert checksum_address(bytes.fromhex(address[2:])) == address


def test_is_address() -> None:
    assert is_address("0x" + "aB" * 20)
    assert not is_address("0x" + "ab" * 19)
    assert not is_address("ab" * 20)
    assert not is_address(None)
    assert not is_address("0x" + "zz" * 20)


def test_account_derives_the_well_known_address() -> None:
    account = EvmAccount.from_hex(HARDHAT_0)
    assert account.address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def test_account_never_shows_its_key() -> None:
    account = EvmAccount.from_hex(HARDHAT_0)
    for text in (repr(account), str(account), f"{account}"):
        assert HARDHAT_0[2:] not in text.lower()
        assert account.address in text


def test_signatures_are_low_s_with_v_27_or_28() -> None:
    account = EvmAccount.generate()
    for i in range(20):
        sig = account.sign_digest(keccak256(bytes([i])))
        assert len(sig) == 65
        assert sig[64] in (27, 28)
        assert int.from_bytes(sig[32:64], "big") <= SECP256K1_HALF_N


@pytest.mark.parametrize("key", ["0x1234", "zz" * 32, "00" * 32, "ff" * 32])
def test_bad_keys_are_refused_without_echoing_them(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        EvmAccount.from_hex(key)
    assert key not in str(info.value)


def test_key_file(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "key"  # type: ignore[operator]
    path.write_text(HARDHAT_0 + "\n")
    assert EvmAccount.from_file(path).address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    with pytest.raises(ConfigError, match="cannot read"):
        EvmAccount.from_file(tmp_path / "missing")  # type: ignore[operator]
