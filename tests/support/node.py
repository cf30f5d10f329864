"""Node.js for the cross-checks against the reference TypeScript packages (``@peac/*``, the
official x402 peers): the packages installed from ``tests/interop/js/package-lock.json``, and
records verified by ``js/peac_verify.mjs``."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from farebox.receipts.jws import b64url_encode

__all__ = ["JS_DIR", "node_verify", "node_with_packages", "run_node"]

JS_DIR = Path(__file__).resolve().parents[1] / "interop" / "js"
STAMP = JS_DIR / "node_modules" / ".farebox-lock-sha256"


def node_with_packages() -> str:
    """The node executable, with ``js/node_modules`` installed from the lock file (skips the test
    when node or npm is missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed; the PEAC TypeScript cross-check needs them")
    lock_file = JS_DIR / "package-lock.json"
    wanted = hashlib.sha256(lock_file.read_bytes()).hexdigest()
    # xdist workers share the folder: the first takes the lock and installs, the others wait and
    # find the stamp. The lock is the committed lock file itself (npm ci only reads it).
    with lock_file.open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not STAMP.exists() or STAMP.read_text().strip() != wanted:
                subprocess.run(
                    [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                    cwd=JS_DIR,
                    check=True,
                    capture_output=True,
                    timeout=600,
                )
                STAMP.write_text(wanted + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return node


def run_node(node: str, request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    completed = subprocess.run(
        [node, str(JS_DIR / "peac_verify.mjs")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    results: list[dict[str, Any]] = json.loads(completed.stdout)
    assert len(results) == len(request)
    return results


def node_verify(node: str, cases: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return run_node(node, [{"jws": jws, "public_key": b64url_encode(key)} for jws, key in cases])
