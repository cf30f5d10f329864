"""``farebox demo``: a paid request end to end on the embedded chain, or a sample paid API.

The demo's modules (and py-evm) are imported when the command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

__all__ = ["demo_command"]


def demo_command(
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the sample paid API running on the chain.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="Port for --serve.")] = 8402,
    host: Annotated[str, typer.Option("--host", help="Interface for --serve.")] = "127.0.0.1",
) -> None:
    """Run a paid request end to end on the embedded chain, or (--serve) keep a sample paid API up."""
    if serve:
        from farebox.dev.demo import serve_demo

        serve_demo(Console(highlight=False), host=host, port=port)
        return
    from farebox.dev.demo import run_demo

    run_demo(Console(highlight=False))
