"""Federation admin actions in the audit log: invites made, joins, approvals, revocations
(ours, and a peer's revocation of us), settlements. Written straight to the store, as the key
and tenant changes are (`node.admin.management`), whether the CLI or the running node acts."""

from __future__ import annotations

from node.storage.base import Store
from node.storage.records import AuditEvent, now_ms

Detail = str | int | None


async def record(
    store: Store, actor: str | None, action: str, target: str, **detail: Detail
) -> None:
    """Write one federation event; `target` is the peer's node id or the invite's id."""
    event = AuditEvent(now_ms(), action, actor, target, None, dict(detail))
    await store.usage.write_batch([], [event])
