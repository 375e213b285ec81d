"""A node under several workers serves one advert seq (node/peers/peering.py `newest_seq`).
Each worker takes a new seq at its start; a worker still on an older one answered a
consumer's fetch of the advert with it, and the consumer, checking a receipt another worker
had priced under the newer seq, refused the receipt as priced under an advert it cannot get
(3 of 8 receipts refused, the two nodes' books apart until a reconciliation)."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path

import httpx

from federation.httpsig import sign_request
from federation.identity import NodeIdentity
from federation.ids import new_request_id
from node.config import DATABASE_FILE, IDENTITY_FILE
from node.peers.peering import ADVERT_SEQ
from node.storage import open_store
from tests.conftest import serve_process
from tests.procfs import client_sockets, listening_workers
from tests.test_federation import LLAMA, _bobs_key_at_alice, cli, invite, make_peer, wait_for

CONNECTIONS = 32  # spread over two workers by the kernel: all on one has a chance of 2**-31


def _signed_get(path: Path, url: str, key: str) -> dict[str, str]:
    identity = NodeIdentity.load(path / IDENTITY_FILE)
    headers = {"aihub-request-id": new_request_id(), "authorization": f"Bearer {key}"}
    return headers | sign_request(identity, "GET", url, headers, b"")


def _in_store(path: Path, what: str) -> int:
    """The node's advert seq counter, or how many receipts its ledger holds."""

    async def read() -> int:
        store = await open_store(path / DATABASE_FILE)
        try:
            if what == "seq":
                return await store.peers.counter(ADVERT_SEQ)
            pairs = await store.ledger.receipt_pairs()
            return sum([len(await store.ledger.receipts(*pair)) for pair in pairs])
        finally:
            await store.close()

    return asyncio.run(read())


def test_every_worker_serves_the_newest_seq_and_every_receipt_is_kept(tmp_path: Path) -> None:
    alice = make_peer(tmp_path, "alice", LLAMA)
    bob = make_peer(tmp_path, "bob")
    port = alice.port
    with serve_process(alice.path, port, tmp_path / "alice.log", "--workers", "2") as serve:
        workers = listening_workers(serve, port, 2)
        cli("join", invite(alice), "--data-dir", str(bob.path))
        key = _bobs_key_at_alice(bob.path)
        url = f"http://127.0.0.1:{port}/federation/advert"
        with ExitStack() as stack:
            clients = [stack.enter_context(httpx.Client()) for _ in range(CONNECTIONS)]
            seqs = set()
            for client in clients:
                answer = client.get(url, headers=_signed_get(bob.path, url, key))
                assert answer.status_code == 200, answer.text
                seqs.add(answer.json()["seq"])
            held = {pid: client_sockets(pid, port) for pid in workers}
        assert min(held.values()) >= 1, held  # both workers answered some
        assert seqs == {_in_store(alice.path, "seq")}

        # The story: bob's requests spread over both of alice's workers, every receipt kept.
        with bob.run() as b:

            async def burst() -> list[int]:
                headers = {"authorization": f"Bearer {bob.dir.key}"}
                body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
                async with httpx.AsyncClient(base_url=b.url, headers=headers, timeout=30) as c:
                    answers = await asyncio.gather(
                        *(c.post("/v1/chat/completions", json=body) for _ in range(16))
                    )
                return [answer.status_code for answer in answers]

            assert asyncio.run(burst()) == [200] * 16
            assert wait_for(lambda: _in_store(bob.path, "receipts") >= 16)
        assert _in_store(bob.path, "receipts") == _in_store(alice.path, "receipts") == 16
    assert "refused a receipt" not in (tmp_path / "alice.log").read_text()
