"""The ``vectorsync`` command's entry point: signal handlers first (a stop request from the
first instant of the process on), then the CLI and everything it imports."""

from __future__ import annotations


def main() -> None:
    from . import stopping

    stopping.install()
    from .cli import main as cli

    cli()
