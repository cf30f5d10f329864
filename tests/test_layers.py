"""The protocol core does no I/O: importing it loads no framework, HTTP client, database or asyncio."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import farebox
import farebox.protocol
import farebox.receipts
import farebox.schemes

FORBIDDEN = {
    "httpx",
    "requests",
    "starlette",
    "fastapi",
    "flask",
    "django",
    "uvicorn",
    "web3",
    "redis",
    "psycopg",
    "sqlite3",
    "asyncio",
    "anyio",
}
TOP_LEVEL_CORE = ["farebox", "farebox.errors", "farebox.money", "farebox.eth"]


def core_modules() -> list[str]:
    names = list(TOP_LEVEL_CORE)
    for package in (farebox.protocol, farebox.schemes, farebox.receipts):
        names.append(package.__name__)
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return names


def test_core_imports_no_io_library_in_a_fresh_interpreter() -> None:
    modules = core_modules()
    assert "farebox.protocol.x402" in modules
    assert "farebox.schemes.evm_exact" in modules
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert "farebox" in loaded
    assert loaded & FORBIDDEN == set()


# The layers of ../shared/ARCHITECTURE.md, by module prefix (the longest prefix names a module's
# layer): the core, the effects, the engines, the faces, then the wiring (config) and the CLI.
# Arrows point down only: a module imports nothing from a higher layer, lazily or not.
LAYERS: dict[str, int] = {
    "farebox": 0,
    "farebox.protocol": 0,
    "farebox.schemes": 0,
    "farebox.receipts": 0,
    "farebox.store": 1,
    "farebox.ledgers": 1,
    "farebox.facilitator": 1,
    "farebox.settle": 2,
    "farebox.rails": 2,
    "farebox.server": 2,
    "farebox.agent": 2,
    "farebox.ops": 2,
    "farebox._asgi": 3,
    "farebox.server.asgi": 3,
    "farebox.server.wsgi": 3,
    "farebox.server.proxy": 3,
    "farebox.facilitator.service": 3,
    "farebox.agent.httpx_auth": 3,
    "farebox.agent.requests_adapter": 3,
    "farebox.config": 4,
    "farebox.cli": 5,
}
# Development doubles and test helpers stand aside: they may use any layer, and only the CLI
# and the wiring (which start them on request) may use them.
ASIDE = ("farebox.dev", "farebox.testing")


def _layer(module: str) -> int | None:
    if any(module == a or module.startswith(a + ".") for a in ASIDE):
        return None
    found = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(found, key=len)] if found else None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "farebox" or n.startswith("farebox.")}


def test_import_arrows_point_down_only() -> None:
    root = Path(farebox.__file__).parent
    upward: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(("farebox", *path.relative_to(root).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        if module == "farebox":
            continue  # the curated root names every layer (lazily)
        mine = _layer(module)
        for imported in _imports(path):
            theirs = _layer(imported)
            aside = any(imported == a or imported.startswith(a + ".") for a in ASIDE)
            if aside and mine is not None and mine < LAYERS["farebox.config"]:
                upward.append(f"{module} -> {imported} (a development double)")
            elif mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) -> {imported} (layer {theirs})")
    assert upward == []
