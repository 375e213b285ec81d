"""Creating a node's data folder: identity, database with an admin key, and config."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from federation.identity import NodeIdentity
from node.config import CONFIG_FILE, DATABASE_FILE, IDENTITY_FILE, parse_config, render_template
from node.gateway.keys import HASH_PURPOSE, generate_key, hash_key
from node.storage import opened
from node.storage.records import KeyRecord


class NodeExists(Exception):
    pass


def node_exists(directory: Path) -> bool:
    return (directory / CONFIG_FILE).exists() or (directory / IDENTITY_FILE).exists()


def create_node(directory: Path, name: str, port: int | None = None) -> tuple[NodeIdentity, str]:
    """Create a node in `directory` (serving on `port`, else the template's); answer its
    identity and its admin key (shown once)."""
    if node_exists(directory):
        raise NodeExists(f"a node already exists at {directory}; refusing to overwrite it")
    # Check the name before anything is written: a half-made node would lose its admin key.
    parse_config(render_template(name, port).encode(), "--name")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity = NodeIdentity.generate()
    identity.save(directory / IDENTITY_FILE)
    key, key_id = generate_key()
    asyncio.run(_store_admin_key(directory, identity, key, key_id))
    # The config goes last: its presence marks a complete node.
    config_path = directory / CONFIG_FILE
    config_path.write_text(render_template(name, port))
    config_path.chmod(0o600)
    return identity, key


async def _store_admin_key(directory: Path, identity: NodeIdentity, key: str, key_id: str) -> None:
    path = directory / DATABASE_FILE
    record = KeyRecord(
        id=key_id,
        name="admin",
        hash=hash_key(identity.derive_secret(HASH_PURPOSE), key),
        is_admin=True,
        created_at=int(time.time()),
    )
    async with opened(path) as store:
        await store.keys.insert_key(record)
    path.chmod(0o600)
