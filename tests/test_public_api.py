"""The curated surface: everything exported exists, is farebox's own, and says what it is."""

import inspect

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
