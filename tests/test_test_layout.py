"""The test suite's own layout: shared fixtures in conftest files, shared helpers in ``tests/support``,
and no test module importing another test module or a conftest (pytest gives every test the
fixtures of its conftests; importing them makes a second copy, and a test module imported by
another runs its module-level setup twice)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Test modules that still import another one, each with what it imports and why it may for now.
# An entry that no longer matches a real import fails the test: delete it then.
STILL_IMPORTING: dict[str, set[str]] = {}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def is_test_module_or_conftest(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def imported_modules(source: str, importer: str) -> set[str]:
    """Every module of ``tests`` that ``source`` (the module ``importer``) imports, by full name:
    ``import a.b``, ``from a.b import c`` (``a.b.c`` too, in case ``c`` is a module) and relative
    imports."""
    package = importer.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "tests" or name.startswith("tests.")}


def suite_modules() -> list[Path]:
    return sorted(
        path
        for path in TESTS.rglob("*.py")
        if "node_modules" not in path.parts
        and (path.name == "conftest.py" or path.name.startswith("test_"))
    )


def offending_imports() -> dict[str, set[str]]:
    offending: dict[str, set[str]] = {}
    for path in suite_modules() + sorted((TESTS / "support").rglob("*.py")):
        importer = module_name(path)
        bad = {
            name
            for name in imported_modules(path.read_text(encoding="utf-8"), importer)
            if is_test_module_or_conftest(name) and name != importer
        }
        if bad:
            offending[str(path.relative_to(ROOT))] = bad
    return offending


def test_no_test_module_or_conftest_imports_a_test_module_or_a_conftest() -> None:
    offending = offending_imports()
    # What is allowed for now must still be there: a stale entry is removed, not kept.
    for path, allowed in STILL_IMPORTING.items():
        assert offending.get(path, set()) >= allowed, f"{path} no longer imports {allowed}"
        offending[path] = offending[path] - allowed
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_check_sees_every_kind_of_import() -> None:
    # The checker itself: each spelling of importing a test module or a conftest is found.
    importer = "tests.server.test_x"
    cases = {
        "from tests.e2e.conftest import chain": {"tests.e2e.conftest"},
        "import tests.ledgers.test_settlement": {"tests.ledgers.test_settlement"},
        "from tests.ledgers import test_settlement": {"tests.ledgers.test_settlement"},
        "from . import test_card": {"tests.server.test_card"},
        "from .conftest import thing": {"tests.server.conftest"},
        "from ..stripe.conftest import API_KEY": {"tests.stripe.conftest"},
        "def f():\n    from tests.e2e.test_cli import FAREBOX\n": {"tests.e2e.test_cli"},
    }
    for source, expected in cases.items():
        found = {n for n in imported_modules(source, importer) if is_test_module_or_conftest(n)}
        assert found == expected, source
    allowed = "from tests.support.gates import make_gate\nimport farebox.testing\n"
    assert not {n for n in imported_modules(allowed, importer) if is_test_module_or_conftest(n)}
    # And it reads the whole suite, not an empty folder.
    scanned = suite_modules()
    assert len(scanned) > 80
    assert TESTS / "e2e" / "conftest.py" in scanned


def test_support_is_no_test_module_and_holds_no_fixture() -> None:
    # pytest collects nothing from tests/support, and its helpers are plain code: the fixtures
    # are in the conftest files, where pytest finds them without an import.
    for path in sorted((TESTS / "support").rglob("*.py")):
        assert not path.name.startswith("test_"), path
        assert path.name != "conftest.py", path
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                decorators = [ast.unparse(d) for d in node.decorator_list]
                assert not any("fixture" in d for d in decorators), f"{path}: {node.name}"
