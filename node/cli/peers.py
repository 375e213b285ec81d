"""`aihub peers`: the group that `federation.py` defines, with `peers discover`
(`discovery.py`) added to it."""

from __future__ import annotations

from node.cli.discovery import peers_discover
from node.cli.federation import peers_group

peers_group.add_command(peers_discover)

__all__ = ["peers_group"]
