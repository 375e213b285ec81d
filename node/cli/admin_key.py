"""`aihub admin-key reset`: a new admin key for a node whose admin key is lost.

Whoever can read the node's data folder holds its identity and database, so access to the
folder is what proves the right to do this (as for every command here). The admin key keeps
its id, and its old secret stops working at once (it may be lost to someone else); the reset is
written to the audit log (`admin_key.reset`, and the rotation itself as `key.rotate`).
"""

from __future__ import annotations

from pathlib import Path

import click

from node.cli.folder import cli_actor, manage
from node.cli.options import with_data_dir
from node.cli.output import console


@click.group("admin-key")
def admin_key() -> None:
    """Recover access to a node whose admin key is lost."""


@admin_key.command("reset")
@click.argument("key_id", required=False)
@with_data_dir
def admin_key_reset(directory: Path, key_id: str | None) -> None:
    """Give the node's admin key a new secret, shown once; the old one stops working at once.
    KEY_ID is needed only if the node has several admin keys (`aihub keys list` shows
    them)."""
    from node.admin.management import CreatedKey, Management, ManagementError
    from node.errors import Kind
    from node.storage.records import AuditEvent, now_ms

    async def reset(m: Management) -> CreatedKey:
        admins = [k for k in await m.store.keys.keys(include_revoked=False) if k.is_admin]
        chosen = [k for k in admins if key_id is None or k.id == key_id]
        if len(chosen) != 1:
            ids = ", ".join(k.id for k in admins) or "none"
            problem = "names no active admin key" if key_id else "has several admin keys"
            raise ManagementError(
                Kind.INVALID_REQUEST,
                f"{'KEY_ID ' + key_id if key_id else 'this node'} {problem}: give one of "
                f"its admin key ids ({ids})",
            )
        actor = cli_actor()
        created = await m.rotate_key(chosen[0].id, 0, actor)
        event = AuditEvent(now_ms(), "admin_key.reset", actor, chosen[0].id)
        await m.store.usage.write_batch([], [event])
        return created

    created = manage(directory, reset)
    console.print(f"New admin key for {created.record.id} (shown once, keep it safe):")
    console.print(f"  [bold green]{created.key}[/]", soft_wrap=True, highlight=False)
    console.print("The old admin key no longer works.", highlight=False)
