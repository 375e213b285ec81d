"""The `aihub` command line (`node.cli.main` builds it, one module per command group)."""

from node.cli.main import main

__all__ = ["main"]
