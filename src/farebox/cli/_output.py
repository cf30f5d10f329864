"""What the commands print: JSON results on stdout, messages and errors on stderr."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["emit", "fail", "stderr"]


def stderr() -> Console:
    """A console on stderr, built per call so that whatever ``sys.stderr`` is now (a test
    runner's capture) receives it."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit(document: Any) -> None:
    """Print ``document`` as indented JSON on stdout."""
    typer.echo(json.dumps(document, indent=2, ensure_ascii=False))


def fail(code: str, message: str) -> NoReturn:
    """Print ``code: message`` on stderr and exit 1."""
    # Text, not markup: messages may hold brackets that rich would read as style tags.
    stderr().print(Text.assemble((code, "bold red"), ": ", message))
    raise typer.Exit(1)
