"""The protocol core does no I/O: importing it loads no framework, HTTP client, database or asyncio."""

import json
import pkgutil
import subprocess
import sys

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
