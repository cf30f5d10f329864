"""Helpers the tests share. Nothing here is a test module (pytest collects nothing from it) and
nothing here is a fixture: the shared fixtures are in ``tests/conftest.py`` (and a directory's own
in its ``conftest.py``). Test modules import from farebox, from here and from third parties, never
from one another or from a conftest (``tests/test_test_layout.py`` checks).
"""
