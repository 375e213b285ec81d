"""Revoking a peer, and telling it (`federation/revocations.py` has the signed notice).

The revoking side cuts the peer off in its store (status, and the key it issued), records it
in the audit log, and posts a notice to the peer; a peer that was away learns it from the
answer to its next signed request for an advert (`refusal`), which carries a fresh notice
instead of the bare 401 an unknown key gets (and writes no audit event: a peer that keeps
checking does not fill the log; that answer is `revoked_refusal` in `node/peers/routes.py`).
The revoked side acts on a notice only once it checks out against the issuer's pinned key and
the key that issuer gave it (`Peering.take_revocation`).
"""

from __future__ import annotations

import time

import httpx
import msgspec

from federation.descriptors import NodeDescriptor
from federation.identity import NodeIdentity
from federation.revocations import NOTICE_PATH, make_revocation
from node.peers import audit
from node.peers.peering import signed_request
from node.storage.base import Store
from node.storage.records import PeerRecord

# What the revoking side's store says of a peer it cut off (by its admin, or for cheating).
CUT_OFF = ("revoked", "suspended")
NOTICE_TIMEOUT = 5.0


async def revoke(store: Store, peer: str, actor: str) -> PeerRecord | None:
    """Revoke the active peer named or numbered `peer` and audit it: its record as it was,
    or None if there is no such peer."""
    for record in await store.peers.peers():
        if peer in (record.name, record.node_id) and record.status == "active":
            await store.peers.revoke_peer(record.node_id, int(time.time()))
            await audit.record(store, actor, "peer.revoke", record.node_id, name=record.name)
            return record
    return None


async def tell_revoked(
    client: httpx.AsyncClient, identity: NodeIdentity, record: PeerRecord
) -> str | None:
    """Post the revoked peer its notice: None once one of its URLs took it, else what went
    wrong (it then learns at its next health check). Nothing to tell a peer we gave no key."""
    if record.key_for_them is None:
        return None
    notice = msgspec.json.encode(make_revocation(identity, record.node_id, record.key_for_them))
    urls = msgspec.json.decode(record.descriptor, type=NodeDescriptor).urls
    problem = "it has no URL"
    for url in urls:
        try:
            response = await signed_request(
                client, identity, "POST", url + NOTICE_PATH, None, notice, seconds=NOTICE_TIMEOUT
            )
        except httpx.HTTPError as exc:
            problem = f"it could not be reached ({type(exc).__name__})"
            continue
        if response.status_code == 200:
            return None
        problem = f"it answered {response.status_code}"
    return problem
