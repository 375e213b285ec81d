"""The three-node demo that `aihub network` drives (`network.py`), outside the node's core.

Its defaults are here so that the command line can show them in `--help` without importing
the demo (which brings httpx and the store)."""

DEFAULT_DIR = "./.aihub-network"
DEFAULT_BASE_PORT = 8801
