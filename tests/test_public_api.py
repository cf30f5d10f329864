"""The curated surface: everything exported exists, is farebox's own, and says what it is."""

import inspect

import pytest

import farebox


def test_every_exported_name_exists_and_is_documented() -> None:
    assert len(set(farebox.__all__)) == len(farebox.__all__)
    for name in farebox.__all__:
        member = getattr(farebox, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert member.__module__.startswith("farebox."), name
            assert (member.__doc__ or "").strip(), f"{name} has no docstring"


def test_nothing_public_is_left_out_of_all() -> None:
    public = {
        name
        for name, value in vars(farebox).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    # Names of I/O modules load on first use; everything else is there from the start.
    lazy = set(farebox._LAZY)
    assert public - lazy == set(farebox.__all__) - {"__version__"} - lazy
    assert lazy <= set(farebox.__all__)


def test_no_development_double_is_exported_from_the_root() -> None:
    # The embedded chain, the Stripe stand-in and the demo live in farebox.dev: the root is what
    # production uses. HttpRpc is a real ledger's transport and stays.
    assert "DevChain" not in farebox.__all__
    with pytest.raises(AttributeError):
        farebox.DevChain  # noqa: B018
    assert not [module for module in farebox._LAZY.values() if module.startswith("farebox.dev")]
    for name in farebox.__all__:
        module = getattr(getattr(farebox, name), "__module__", None) or ""
        assert not module.startswith("farebox.dev"), name
    assert farebox.HttpRpc.__module__ == "farebox.ledgers.rpc"
