"""Fixtures of the interop tests: the anvil node (see ``anvil_fixtures``)."""

from tests.interop.anvil_fixtures import anvil_chain

__all__ = ["anvil_chain"]
