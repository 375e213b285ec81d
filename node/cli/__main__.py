"""`python -m node.cli`: the `aihub` command, where its script is not installed."""

from node.cli import main

main()
