"""The development token: a USDC look-alike in Vyper, shipped compiled.

``usdc.vy`` is the source and ``usdc.json`` the artifact compiled from it (ABI, creation and
runtime bytecode, the compiler version and settings). Running farebox never compiles: the
artifact is loaded as is. After editing the source, rebuild the artifact with vyper installed::

    python -c "from farebox.dev.contracts import build; build()"

and commit both files; a test recompiles the source and compares it byte for byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

__all__ = ["VYPER_VERSION", "TokenArtifact", "build", "compile_token", "load_token"]

# The compiler the committed artifact was built with; the source pins it too (``#pragma version``).
VYPER_VERSION = "0.4.3"
_SOURCE = "usdc.vy"
_ARTIFACT = "usdc.json"


@dataclass(frozen=True, slots=True)
class TokenArtifact:
    """The compiled token: what deploying and calling it needs."""

    abi: tuple[dict[str, Any], ...]
    bytecode: bytes
    """Creation code; append the ABI-encoded constructor arguments ``(string name, string symbol)``."""
    runtime_bytecode: bytes
    """Runtime code without the immutables (the deployed code has them appended)."""
    method_identifiers: dict[str, str]
    vyper_version: str
    settings: dict[str, Any]
    source_sha256: str


def _source_text() -> str:
    return resources.files(__name__).joinpath(_SOURCE).read_text(encoding="utf-8")


def _hex(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


@cache
def load_token() -> TokenArtifact:
    """The committed artifact (read once; no compiler needed)."""
    # A file shipped in the package, not network input: orjson for speed and uniformity.
    document = orjson.loads(resources.files(__name__).joinpath(_ARTIFACT).read_bytes())
    return TokenArtifact(
        abi=tuple(document["abi"]),
        bytecode=_hex(document["bytecode"]),
        runtime_bytecode=_hex(document["runtimeBytecode"]),
        method_identifiers=dict(document["methodIdentifiers"]),
        vyper_version=document["vyperVersion"],
        settings=dict(document["settings"]),
        source_sha256=document["sourceSha256"],
    )


def compile_token() -> dict[str, Any]:
    """Compile ``usdc.vy`` with the installed vyper; the artifact document (not written).

    Raises ``RuntimeError`` when vyper is missing or is not the pinned version, because another
    version gives other bytes.
    """
    try:
        import vyper  # type: ignore[import-untyped]
        from vyper.compiler import compile_code  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError(f"compiling the token needs vyper=={VYPER_VERSION}") from exc
    if vyper.__version__ != VYPER_VERSION:
        raise RuntimeError(
            f"the token is built with vyper {VYPER_VERSION}, not {vyper.__version__}"
        )
    source = _source_text()
    output = compile_code(
        source,
        contract_path=_SOURCE,
        output_formats=[
            "abi",
            "bytecode",
            "bytecode_runtime",
            "method_identifiers",
            "settings_dict",
        ],
    )
    return {
        "contractName": "USDC",
        "source": _SOURCE,
        "sourceSha256": hashlib.sha256(source.encode("utf-8")).hexdigest(),
        "vyperVersion": vyper.__version__,
        # The settings come from the source's pragmas (evm-version, optimize).
        "settings": output["settings_dict"],
        "abi": output["abi"],
        "methodIdentifiers": output["method_identifiers"],
        "bytecode": output["bytecode"],
        "runtimeBytecode": output["bytecode_runtime"],
    }


def build(path: str | Path | None = None) -> Path:
    """Recompile the token and rewrite the artifact (``usdc.json`` next to the source by default)."""
    document = compile_token()
    target = Path(path) if path is not None else Path(__file__).with_name(_ARTIFACT)
    target.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    load_token.cache_clear()
    return target
